"""MoE dispatch and combine: latency and logical bandwidth per rank, against the torch backend.

Per configuration (experts, top-k, hidden size of a real model) and tokens per rank: the median time
of moe_dispatch and of moe_combine (max over ranks), the logical bandwidth per rank as pplx-kernels
reports it (tokens x top-k x hidden x itemsize / time), the baseline (the torch backend's
implementation, called directly, in the same run) and speedup = baseline / ours; on a GPU, the share
of the measured device-to-device copy bandwidth that the bytes each op must move through HBM take.

Each rank draws its own tokens and k distinct experts per token, uniformly. The expert buffers are
sized to fit this routing exactly (the most pairs any expert receives), not for the worst case
(world x tokens per expert), which at prefill sizes would not fit in memory.

Check: our dispatch fills the same slots, counts and routing as the baseline, and a combine of the
dispatched rows themselves (each expert the identity) gives back x[t] * sum_j w[t, j].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from symcomm import moe, ops, runtime
from symcomm.bench import harness


@dataclass(frozen=True)
class Config:
    name: str
    experts: int
    top_k: int
    hidden: int


GPU_CONFIGS = (Config("DeepSeek-V2-Lite", 64, 6, 2048), Config("DeepSeek-V3", 256, 8, 7168))
GPU_TOKENS = (1, 8, 32, 128, 4096)  # decode, then one prefill size
# On a CPU the models' experts and top-k with small rows (see the hidden column), so a run takes seconds.
CPU_CONFIGS = (Config("DeepSeek-V2-Lite", 64, 6, 256), Config("DeepSeek-V3", 256, 8, 512))
CPU_TOKENS = (1, 8, 32, 128, 512)

# Largest |combine - reference| accepted, relative to the largest |reference|: one rounding of the
# float32 sum to the output dtype.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SEED = 0


@dataclass
class Row:
    config: str
    experts: int
    top_k: int
    hidden: int
    tokens: int  # per rank
    dtype: str
    path: str  # p2p (load/store), rma (NVSHMEM puts and gets) or torch.distributed
    capacity: int
    dispatch_us: float  # median over iterations, max over ranks
    combine_us: float
    dispatch_gbs: float  # logical bytes per rank / time
    combine_gbs: float
    base_dispatch_us: float
    base_combine_us: float
    dispatch_speedup: float  # baseline time / ours
    combine_speedup: float
    dispatch_of_copy: float | None  # HBM bytes moved / time / measured copy bandwidth (GPU only)
    combine_of_copy: float | None
    correct: bool


def _capacity(ids: torch.Tensor, experts: int) -> int:
    """The most (token, expert) pairs any expert receives from all ranks together."""
    counts = torch.bincount(ids.flatten(), minlength=experts)
    torch.distributed.all_reduce(counts)
    return max(1, int(counts.max()))


def run_one(config: Config, tokens: int, dtype: torch.dtype, warmup: int, iters: int, header: dict) -> Row:
    dev, rank, world = runtime.device(), runtime.rank(), runtime.world_size()
    experts, k, hidden = config.experts, config.top_k, config.hidden
    gen = torch.Generator().manual_seed(SEED + rank)
    x = torch.randn(tokens, hidden, generator=gen).to(dev, dtype)
    ids = torch.rand(tokens, experts, generator=gen).topk(k, 1).indices
    weights = torch.rand(tokens, k, generator=gen).to(dev)
    capacity = _capacity(ids, experts)
    ids = ids.to(dev)
    shape = (experts // world, capacity, hidden)
    expert_x, counts = runtime.empty(shape, dtype), runtime.empty((shape[0],), torch.int32)
    base_x, base_counts = torch.empty_like(expert_x), torch.empty_like(counts)

    routing = torch.ops.symcomm.moe_dispatch(x, ids, experts, expert_x, counts)
    base_routing = ops.torch_moe_dispatch(x, ids, experts, base_x, base_counts)
    valid = (torch.arange(capacity, device=dev) < counts.unsqueeze(1)).unsqueeze(-1)
    same = (torch.equal(routing, base_routing) and torch.equal(counts, base_counts)
            and torch.equal(expert_x.where(valid, 0), base_x.where(valid, 0)))
    ref = x.double() * weights.double().sum(1, keepdim=True)
    y = torch.ops.symcomm.moe_combine(expert_x, weights, routing)
    close = float((y.double() - ref).abs().max()) <= TOLERANCE[dtype] * float(ref.abs().max())
    correct = harness.all_ranks(same and close)

    def timed(fn) -> float:
        return harness.max_over_ranks(harness.time_us(fn, dev, warmup, iters))

    times = [
        timed(lambda: torch.ops.symcomm.moe_dispatch(x, ids, experts, expert_x, counts)),
        timed(lambda: torch.ops.symcomm.moe_combine(expert_x, weights, routing)),
        timed(lambda: ops.torch_moe_dispatch(x, ids, experts, base_x, base_counts)),
        timed(lambda: ops.torch_moe_combine(base_x, weights, base_routing)),
    ]
    dispatch_us, combine_us, base_dispatch_us, base_combine_us = times
    runtime.free(expert_x)
    runtime.free(counts)

    logical = tokens * k * hidden * dtype.itemsize
    # Through HBM: dispatch reads and writes every pair's row; combine reads them and writes one row
    # per token. Ranks sharing one GPU share its bandwidth, so their bytes count together.
    hbm = {"dispatch": 2 * logical, "combine": logical + tokens * hidden * dtype.itemsize}
    ranks_per_gpu = world if dev.type == "cuda" and runtime.shared_gpu() else 1
    copy_gbs = header.get("d2d_copy_gbs")

    def of_copy(op: str, us: float) -> float | None:
        return None if copy_gbs is None else hbm[op] * ranks_per_gpu / us / 1e3 / copy_gbs

    return Row(config.name, experts, k, hidden, tokens, str(dtype).removeprefix("torch."),
               path(), capacity,
               dispatch_us, combine_us, logical / dispatch_us / 1e3, logical / combine_us / 1e3,
               base_dispatch_us, base_combine_us, base_dispatch_us / dispatch_us, base_combine_us / combine_us,
               of_copy("dispatch", dispatch_us), of_copy("combine", combine_us), correct)


def fits(config: Config, tokens: int, dtype: torch.dtype) -> bool:
    """Whether the remote path (if taken) holds the batch in the workspace's data area."""
    most = moe.max_tokens(config.top_k, config.hidden * dtype.itemsize)
    return most is None or tokens <= most


def path() -> str:
    """How dispatch and combine reach their peers: p2p, rma (flat), rma/hierarchical, or torch.distributed."""
    return (runtime.transport() or "torch.distributed") + ("/hierarchical" if moe.hierarchy() else "")


def run(configs, token_counts, dtype: torch.dtype, warmup: int, iters: int, header: dict) -> list[Row]:
    cases = [(c, t) for c in configs for t in token_counts if fits(c, t, dtype)]
    left_out = [f"{c.name} x {t} tokens" for c in configs for t in token_counts if not fits(c, t, dtype)]
    if left_out:
        header["left_out"] = (f"{', '.join(left_out)}: more tokens than the workspace's data area holds on the "
                              "remote path (raise SYMCOMM_WORKSPACE_BYTES)")
    rows = []
    with harness.progress("moe", len(cases), enabled=runtime.rank() == 0) as progress:
        for config, tokens in cases:
            rows.append(run_one(config, tokens, dtype, warmup, iters, header))
            progress.advance()
    return rows


def table(rows: list[Row]) -> str:
    def of_copy(r: Row) -> str | None:
        if r.dispatch_of_copy is None:
            return None
        return f"{r.dispatch_of_copy:.0%}/{r.combine_of_copy:.0%}"

    return harness.format_table(rows, [
        ("config", lambda r: r.config, ""), ("E", lambda r: r.experts, "d"), ("k", lambda r: r.top_k, "d"),
        ("hidden", lambda r: r.hidden, "d"), ("tokens", lambda r: r.tokens, "d"), ("path", lambda r: r.path, ""),
        ("dispatch us", lambda r: r.dispatch_us, ".1f"), ("GB/s", lambda r: r.dispatch_gbs, ".2f"),
        ("base us", lambda r: r.base_dispatch_us, ".1f"), ("speedup", lambda r: r.dispatch_speedup, ".2f"),
        ("combine us", lambda r: r.combine_us, ".1f"), ("GB/s", lambda r: r.combine_gbs, ".2f"),
        ("base us", lambda r: r.base_combine_us, ".1f"), ("speedup", lambda r: r.combine_speedup, ".2f"),
        ("of copy d/c", of_copy, ""), ("check", lambda r: harness.check(r.correct), ""),
    ])


def write(out_dir: Path, stem: str, rows: list[Row], header: dict) -> list[Path]:
    png = out_dir / f"{stem}.png"
    paths = harness.write_rows(out_dir, stem, rows, header)
    _plot(png, rows, header)
    return [*paths, png]


def series(rows: list[Row], header: dict) -> dict[str, list[tuple[str, list, list]]]:
    """What the plot draws per op, (label, tokens, latencies): columns of the table, ours then the
    baseline's for each config."""
    out = {}
    for op in ("dispatch", "combine"):
        out[op] = []
        for config in dict.fromkeys(r.config for r in rows):
            mine = [r for r in rows if r.config == config]
            tokens = [r.tokens for r in mine]
            out[op] += [(f"{config} ({header['backend']})", tokens, [getattr(r, f"{op}_us") for r in mine]),
                        (f"{config} (baseline)", tokens, [getattr(r, f"base_{op}_us") for r in mine])]
    return out


def _plot(path: Path, rows: list[Row], header: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (op, drawn) in zip(axes, series(rows, header).items()):
        for (label, tokens, ours), (base_label, _, base) in zip(drawn[::2], drawn[1::2]):
            line, = ax.plot(tokens, ours, "o-", label=label)
            ax.plot(tokens, base, "s--", color=line.get_color(), label=base_label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens per rank")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency (us, median, max over ranks)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"MoE: {header.get('gpu', header['device'])}, {header['world_size']} ranks, {header['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> None:
    """The benchmark on the backend symcomm was initialised with (the CLI calls init with args.backend);
    rank 0 prints the table and writes <args.out>/moe-w<N>.json, .csv and .png."""
    dev = runtime.device()
    gpu = dev.type == "cuda"
    # The nvshmem kernels combine 16-bit rows (also on the emulated device, whose tensors are on the CPU).
    args.dtype = args.dtype or ("bfloat16" if gpu or runtime.backend() == "nvshmem" else "float32")
    configs, token_counts = (GPU_CONFIGS, GPU_TOKENS) if gpu else (CPU_CONFIGS, CPU_TOKENS)
    header = {**harness.environment(), **harness.ceilings(dev), "dtype": args.dtype,
              "capacity": "exact fit: the most pairs any expert receives in this routing"}
    rows = run(configs, token_counts, getattr(torch, args.dtype), args.warmup, args.iters, header)
    if runtime.rank() != 0:
        return
    paths = write(Path(args.out), f"moe-w{runtime.world_size()}", rows, header)
    print("\n# moe: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in header.items()))
    print(f"# baseline: the torch backend's dispatch and combine (torch.distributed {header['pg_backend']}), "
          "called directly in the same run; GB/s = tokens x top-k x hidden x itemsize / time, per rank")
    if header["backend"] == "torch":
        print("# note: on the torch backend our op runs the baseline's code plus dispatch and argument checks; "
              "the speedup column measures that overhead and noise only")
    print(table(rows))
    print(f"# wrote {', '.join(str(p) for p in paths)}")
