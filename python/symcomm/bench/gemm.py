"""python -m symcomm.bench gemm-all-reduce | gemm-reduce-scatter | all-gather-gemm | gemm (the three).

Each GEMM op against its two parts, at the tensor-parallel shard shapes of Llama-3 8B and 70B on the
run's W ranks, for M (tokens) from 1 to 8192:

    gemm-all-reduce, gemm-reduce-scatter  row-parallel o_proj and down_proj: a [M, K/W] @ b [K/W, N],
                                          the partial products summed over the ranks
    all-gather-gemm                       column-parallel gate_proj: every rank's a [M/W, K] gathered,
                                          then @ b [K, N/W]

Per row (median over iterations, max over ranks): the matmul alone; our collective alone on the
tensor it moves in the op (the matmul's output; for all-gather-gemm, a); unfused = the matmul and our
collective (torch.ops.symcomm.*) one after the other; baseline = the same with the torch backend's
collective (ops.torch_*); fused = the op with path='fused' (on the torch backend, which has one path:
the op itself; blank where the fused kernels cannot take the shape). path = what path='auto' takes.
speedup = unfused / fused; overlap = (matmul + comm - fused) / min(matmul, comm): 1 when the shorter
part is wholly hidden, 0 when the op costs the sum of its parts. TFLOP/s = 2 M K N / fused, for the
matmul each rank runs (the M, K, N columns). Each table ends with the M from which fused beats
unfused at every larger M of every shape: the number for tuning.json's gemm_fused_min_m.

Where M is split over the ranks (reduce-scatter's output rows, all-gather's input rows) it is rounded
up to a multiple of W, as a model pads its tokens.

Check: integer-valued inputs that every rank can rebuild for every rank, so the op's output is
compared exactly with the unsharded product computed in float64. The times are then taken on random
values: a GEMM's speed depends on its data (zeros draw less power), and the check's sparse integers
would flatter it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from symcomm import gemm, ops, runtime
from symcomm.bench import harness


@dataclass(frozen=True)
class Shape:
    name: str
    k: int  # the unsharded layer's K and N
    n: int


GPU_SHAPES = {
    "row": (Shape("8B o_proj", 4096, 4096), Shape("8B down_proj", 14336, 4096),
            Shape("70B o_proj", 8192, 8192), Shape("70B down_proj", 28672, 8192)),
    "column": (Shape("8B gate_proj", 4096, 14336), Shape("70B gate_proj", 8192, 28672)),
}
GPU_MS = (1, 7, 16, 64, 256, 1000, 1024, 4096, 8192)
# On a CPU the same layers with K and N divided by this (still divisible by 16 ranks), so a run takes seconds.
CPU_SCALE = 32
CPU_SHAPES = {kind: tuple(Shape(s.name, s.k // CPU_SCALE, s.n // CPU_SCALE) for s in shapes)
              for kind, shapes in GPU_SHAPES.items()}
CPU_MS = (1, 4, 7, 16, 64)
SEED = 0


def _dense(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """The unsharded row-parallel product, from every rank's shards of K."""
    return torch.cat(a, 1).double() @ torch.cat(b).double()


@dataclass(frozen=True)
class Bench:
    op: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # the fused op
    ours: Callable[[torch.Tensor], torch.Tensor]  # our collective, as the op applies it
    theirs: Callable[[torch.Tensor], torch.Tensor]  # the torch backend's (the baseline)
    parallel: str  # "row": the collective reduces a @ b; "column": it gathers a before the matmul
    splits_m: bool  # M is divided over the ranks
    # (every rank's a, every rank's b, rank, world) -> this rank's expected output, in float64
    reference: Callable[[list[torch.Tensor], list[torch.Tensor], int, int], torch.Tensor]

    def unfused(self, collective: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor,
                b: torch.Tensor) -> torch.Tensor:
        return collective(a) @ b if self.parallel == "column" else collective(a @ b)


BENCHES = {
    "gemm-all-reduce": Bench(
        torch.ops.symcomm.gemm_all_reduce, torch.ops.symcomm.all_reduce, ops.torch_all_reduce, "row", False,
        lambda a, b, r, w: _dense(a, b)),
    "gemm-reduce-scatter": Bench(
        torch.ops.symcomm.gemm_reduce_scatter, lambda x: torch.ops.symcomm.reduce_scatter(x, 0),
        lambda x: ops.torch_reduce_scatter(x, 0), "row", True, lambda a, b, r, w: _dense(a, b).chunk(w)[r]),
    "all-gather-gemm": Bench(
        torch.ops.symcomm.all_gather_gemm, lambda x: torch.ops.symcomm.all_gather(x, 0),
        lambda x: ops.torch_all_gather(x, 0), "column", True, lambda a, b, r, w: torch.cat(a).double() @ b[r].double()),
}


@dataclass
class Row:
    op: str
    shape: str
    m: int  # the matmul each rank runs is [m, k] @ [k, n] (all-gather-gemm: m counts the gathered rows)
    k: int
    n: int
    dtype: str
    path: str  # what path='auto' takes (path_of)
    matmul_us: float  # median over iterations, max over ranks
    comm_us: float
    unfused_us: float
    baseline_us: float
    fused_us: float
    speedup: float  # unfused / fused
    overlap: float  # (matmul + comm - fused) / min(matmul, comm)
    tflops: float  # 2 m k n / fused
    correct: bool


def _op_name(bench_name: str) -> str:
    return bench_name.replace("-", "_")


def fused_runs(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the op has a fused path here for these operands (the torch backend has one path)."""
    if runtime.backend() != "nvshmem":
        return True
    try:
        gemm.path_for(_op_name(name), a, b, "fused")
    except ValueError:
        return False
    return True


def path_of(name: str, a: torch.Tensor, b: torch.Tensor) -> str:
    """How torch.ops.symcomm.<op> computes on these operands with path='auto' (gemm.choose's rule)."""
    if runtime.backend() != "nvshmem":
        return "matmul+collective"
    return gemm.path_for(_op_name(name), a, b)


def fused_min_m(rows: list[Row]) -> int | None:
    """The smallest M from which the fused path beats unfused at every larger M, in every shape."""
    worst = None
    for shape in dict.fromkeys(r.shape for r in rows):
        mine = sorted((r for r in rows if r.shape == shape), key=lambda r: r.m)
        first = len(mine)  # the start of the last run of wins (a NaN fused time never wins)
        while first > 0 and mine[first - 1].fused_us < mine[first - 1].unfused_us:
            first -= 1
        if first == len(mine):
            return None
        worst = max(worst or 0, mine[first].m)
    return worst


def shard_shapes(bench: Bench, shape: Shape, m: int, world: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """This rank's a and b for an M-row product of the layer `shape` over `world` ranks."""
    split = shape.n if bench.parallel == "column" else shape.k
    if split % world:
        raise ValueError(f"gemm: shape {shape.name!r} cannot be split over {world} ranks ({split} is not divisible)")
    if bench.parallel == "column":
        return (m // world, shape.k), (shape.k, shape.n // world)
    return (m, shape.k // world), (shape.k // world, shape.n)


def integer_inputs(rank: int, a_shape, b_shape, dtype: torch.dtype, device: torch.device):
    """Rank `rank`'s a and b, equal wherever they are built: one nonzero per row of a, 1 or 2, and b
    in [-8, 8]. Every product is then an integer of size at most 16, and a sum over up to 16 ranks
    at most 256, all exact in bf16 (and fp16, fp32)."""
    gen = torch.Generator(device).manual_seed(SEED + rank)
    cols = torch.randint(a_shape[1], (a_shape[0], 1), generator=gen, device=device)
    values = torch.randint(1, 3, (a_shape[0], 1), generator=gen, device=device).to(dtype)
    a = torch.zeros(a_shape, dtype=dtype, device=device).scatter_(1, cols, values)
    b = torch.randint(-8, 9, b_shape, generator=gen, device=device).to(dtype)
    return a, b


def run_one(name: str, bench: Bench, shape: Shape, m: int, dtype: torch.dtype, warmup: int, iters: int) -> Row:
    dev, rank, world = runtime.device(), runtime.rank(), runtime.world_size()
    a_shape, b_shape = shard_shapes(bench, shape, m, world)
    every = [integer_inputs(r, a_shape, b_shape, dtype, dev) for r in range(world)]
    a, b = every[rank]
    expected = bench.reference([x for x, _ in every], [y for _, y in every], rank, world)
    has_fused = fused_runs(name, a, b)
    fused_op = (lambda x, y: bench.op(x, y, path="fused")) if runtime.backend() == "nvshmem" else bench.op
    outputs = [bench.op(a, b)] + ([fused_op(a, b)] if has_fused else [])
    correct = harness.all_ranks(all(torch.equal(out.double(), expected) for out in outputs))
    del every, expected  # the other ranks' inputs and the float64 product: memory the timing can use
    a.normal_()
    b.normal_()

    def timed(fn: Callable[[], object]) -> float:
        return harness.max_over_ranks(harness.time_us(fn, dev, warmup, iters))

    column = bench.parallel == "column"
    lhs = bench.ours(a) if column else a  # the matmul's own left operand
    moved = a if column else a @ b  # what the collective moves
    matmul = timed(lambda: lhs @ b)
    comm = timed(lambda: bench.ours(moved))
    unfused = timed(lambda: bench.unfused(bench.ours, a, b))
    baseline = timed(lambda: bench.unfused(bench.theirs, a, b))
    fused = timed(lambda: fused_op(a, b)) if has_fused else float("nan")
    k, n = b.shape
    return Row(name, shape.name, m, k, n, str(dtype).removeprefix("torch."), path_of(name, a, b), matmul, comm,
               unfused, baseline, fused, unfused / fused, (matmul + comm - fused) / min(matmul, comm),
               2 * m * k * n / fused / 1e6, correct)


def run(name: str, shapes, ms, dtype: torch.dtype, warmup: int, iters: int) -> list[Row]:
    """Rows of one op for every shape and M, on the backend symcomm is initialised with."""
    bench, world = BENCHES[name], runtime.world_size()
    if bench.splits_m:
        ms = list(dict.fromkeys(-(-m // world) * world for m in ms))  # rounded up to a multiple of the world
    rows = []
    with harness.progress(name, len(shapes) * len(ms), enabled=runtime.rank() == 0) as progress:
        for shape in shapes:
            for m in ms:
                rows.append(run_one(name, bench, shape, m, dtype, warmup, iters))
                progress.advance()
    return rows


def baseline_transport(device: torch.device) -> str:
    """What the torch backend's collectives run over for tensors on `device` (as ops._wire moves them)."""
    if device.type != "cuda":
        return "gloo"
    return "gloo through host copies (ranks share one GPU)" if runtime.shared_gpu() else "NCCL"


def table(rows: list[Row]) -> str:
    return harness.format_table(rows, [
        ("shape", lambda r: r.shape, ""), ("M", lambda r: r.m, "d"), ("K", lambda r: r.k, "d"),
        ("N", lambda r: r.n, "d"), ("path", lambda r: r.path, ""), ("matmul us", lambda r: r.matmul_us, ".1f"),
        ("comm us", lambda r: r.comm_us, ".1f"), ("unfused us", lambda r: r.unfused_us, ".1f"),
        ("base us", lambda r: r.baseline_us, ".1f"), ("fused us", lambda r: r.fused_us, ".1f"),
        ("speedup", lambda r: r.speedup, ".2f"), ("overlap", lambda r: r.overlap, ".2f"),
        ("TFLOP/s", lambda r: r.tflops, ".3g"), ("check", lambda r: harness.check(r.correct), ""),
    ])


def write(out_dir: Path, stem: str, rows: list[Row], header: dict) -> list[Path]:
    png = out_dir / f"{stem}.png"
    paths = harness.write_rows(out_dir, stem, rows, header)
    _plot(png, stem, rows, header)
    return [*paths, png]


def series(rows: list[Row], header: dict) -> dict[str, list[tuple[str, list, list]]]:
    """What the plot draws per shape, (label, M, times): columns of the table."""
    out = {}
    for shape in dict.fromkeys(r.shape for r in rows):
        mine = [r for r in rows if r.shape == shape]
        out[shape] = [(label, [r.m for r in mine], [getattr(r, field) for r in mine])
                      for field, label in (("fused_us", "fused (the op)"), ("unfused_us", "matmul + our collective"),
                                           ("baseline_us", f"baseline ({header['baseline']})"),
                                           ("matmul_us", "matmul alone"))]
    return out


def _plot(path: Path, stem: str, rows: list[Row], header: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = series(rows, header)
    fig, axes = plt.subplots(1, len(drawn), figsize=(4 * len(drawn) + 1, 4.5), squeeze=False, sharey=True)
    for ax, (shape, lines) in zip(axes[0], drawn.items()):
        mine = [r for r in rows if r.shape == shape]
        for (label, ms, times), style in zip(lines, ("o-", "s--", "^:", "x-")):
            ax.plot(ms, times, style, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M")
        ax.set_title(f"{shape}: K={mine[0].k}, N={mine[0].n} per rank", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("time (us, median, max over ranks)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{stem}: {header.get('gpu', header['device'])}, {header['world_size']} ranks, {header['dtype']}, "
                 f"{header['backend']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> None:
    """The benchmark of args.op (one op, or "gemm": the three) on the backend symcomm was initialised
    with; rank 0 prints a table per op and writes <args.out>/<op>-w<N>.json, .csv and .png."""
    dev = runtime.device()
    gpu = dev.type == "cuda"
    # The fused kernels take 16-bit operands (also on the emulated device, whose tensors are on the CPU).
    args.dtype = args.dtype or ("bfloat16" if gpu or runtime.backend() == "nvshmem" else "float32")
    shapes, ms = (GPU_SHAPES, GPU_MS) if gpu else (CPU_SHAPES, CPU_MS)
    header = {**harness.environment(), **harness.ceilings(dev), "dtype": args.dtype,
              "baseline": f"matmul + torch.distributed over {baseline_transport(dev)}"}
    if not gpu:
        header["shapes"] = f"Llama-3 layers with K and N / {CPU_SCALE}"
    for name in BENCHES if args.op == "gemm" else [args.op]:
        rows = run(name, shapes[BENCHES[name].parallel], ms, getattr(torch, args.dtype), args.warmup, args.iters)
        if runtime.rank() != 0:
            continue
        paths = write(Path(args.out), f"{name}-w{runtime.world_size()}", rows, header)
        print(f"\n# {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in header.items()))
        print("# M, K, N: the matmul on each rank; speedup = unfused / fused; overlap = (matmul + comm - fused) / "
              "min(matmul, comm); times: median over iterations, max over ranks")
        if header["backend"] == "torch":
            print("# note: on the torch backend our collectives and the op run the baseline's code plus dispatch; "
                  "unfused, baseline and fused differ by that overhead and noise only")
        print(table(rows))
        if header["backend"] == "nvshmem":
            cut = fused_min_m(rows)
            print(f"# fused beats unfused from M={cut} on, in every shape" if cut is not None else
                  "# fused does not beat unfused at the largest M of every shape")
        print(f"# wrote {', '.join(str(p) for p in paths)}")
