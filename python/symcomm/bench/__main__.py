"""symcomm benchmarks, nccl-tests style, each against its baseline measured in the same run.

    torchrun --nproc-per-node 2 -m symcomm.bench all-reduce --out bench/out
    torchrun --nproc-per-node 4 -m symcomm.bench all --symmetric
    python -m symcomm.bench                      # a world of one, every benchmark
    torchrun --nproc-per-node 2 -m symcomm.bench tp-layer   # a decoder layer at TP=2 vs TP=1 (tp_layer.py)
    torchrun --nproc-per-node 2 -m symcomm.bench moe        # MoE dispatch and combine (moe.py)
    torchrun --nproc-per-node 2 -m symcomm.bench gemm       # the GEMM + collective ops (gemm.py)

Per row: size (nccl-tests convention: all-gather counts its output, reduce-scatter its input),
element count, dtype, algorithm, path (p2p: load/store; rma: NVSHMEM puts), median time (max over ranks) eager and, on a GPU, replayed from a
CUDA graph, algbw = size / time, busbw = algbw x the op's bus factor, the baseline's eager time and
speedup = baseline / ours, the share of the measured device-to-device copy bandwidth that the bytes
this algorithm must move through HBM represent (GPU only), and a check of our output.
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

import symcomm
from symcomm import collectives, ops, runtime
from symcomm.bench import gemm, harness, tp_layer
from symcomm.bench import moe as moe_bench

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def ramp(count: int, dtype: torch.dtype, device: torch.device, rank: int) -> torch.Tensor:
    """Small integers plus the rank: every sum is exact in bf16 for the worlds we run, so each rank
    knows every rank's input, and the exact answer, without gathering anything."""
    return ((torch.arange(count, device=device) % 13 - 6) + rank).to(dtype)


def chunk(t: torch.Tensor, world: int, r: int) -> torch.Tensor:
    return t.chunk(world)[r]


@dataclass(frozen=True)
class Bench:
    ours: Callable[[torch.Tensor, str], torch.Tensor]
    baseline: Callable[[torch.Tensor], torch.Tensor]
    size_factor: Callable[[int], int]  # reported size = per-rank input bytes x this
    bus_factor: Callable[[int], float]
    expected: Callable[[torch.Tensor, int, int], torch.Tensor]  # (this rank's input, rank, world) -> output
    hbm_bytes: Callable[[int, int, str], float]  # (per-rank input bytes, world, algorithm) -> bytes per rank
    input_multiple: Callable[[int], int]  # element counts are multiples of this (divisible by the world)


def _others(x: torch.Tensor, rank: int, world: int) -> list[torch.Tensor]:
    return [x - rank + r for r in range(world)]


def _all_reduce_hbm(n: int, w: int, algorithm: str) -> float:
    # one-shot: read every rank's input, write the sum; two-shot: reduce a 1/w share (read n, write
    # n/w), then read every share and write the whole (read n, write n).
    return (w + 1) * n if algorithm == "one_shot" else 3 * n + n / w


BENCHES = {
    "all-reduce": Bench(
        lambda x, a: torch.ops.symcomm.all_reduce(x, a), ops.torch_all_reduce, lambda w: 1,
        lambda w: 2 * (w - 1) / w, lambda x, r, w: sum(t.double() for t in _others(x, r, w)), _all_reduce_hbm,
        lambda w: 1),
    "all-gather": Bench(
        lambda x, a: torch.ops.symcomm.all_gather(x, 0), lambda x: ops.torch_all_gather(x, 0), lambda w: w,
        lambda w: (w - 1) / w, lambda x, r, w: torch.cat(_others(x, r, w)).double(), lambda n, w, a: 2 * w * n,
        lambda w: 1),
    "reduce-scatter": Bench(
        lambda x, a: torch.ops.symcomm.reduce_scatter(x, 0), lambda x: ops.torch_reduce_scatter(x, 0), lambda w: 1,
        lambda w: (w - 1) / w, lambda x, r, w: chunk(sum(t.double() for t in _others(x, r, w)), w, r),
        lambda n, w, a: n + n / w, lambda w: w),
    "all-to-all": Bench(
        lambda x, a: torch.ops.symcomm.all_to_all(x), ops.torch_all_to_all, lambda w: 1, lambda w: (w - 1) / w,
        lambda x, r, w: torch.cat([chunk(t, w, r) for t in _others(x, r, w)]).double(), lambda n, w, a: 2 * n,
        lambda w: w),
}


def graph_us(fn: Callable[[], object], device: torch.device, args) -> float | None:
    """Time of one call replayed from a CUDA graph (launch gaps and host overhead gone)."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return harness.max_over_ranks(harness.time_us(graph.replay, device, args.warmup, args.iters))


def run(name: str, bench: Bench, args, header: dict) -> list[harness.Row]:
    dev, world, rank = runtime.device(), runtime.world_size(), runtime.rank()
    dtype = DTYPES[args.dtype]
    itemsize = dtype.itemsize
    algorithms = ["auto"]
    rma = runtime.transport() == "rma"  # the remote path has no algorithm to choose
    if name == "all-reduce" and args.algorithms and runtime.backend() == "nvshmem" and not rma:
        algorithms += ["one_shot", "two_shot"]
    sizes = harness.size_sweep(args.min_bytes, args.max_bytes, args.factor)
    # Ranks sharing one GPU share its memory bandwidth: count their traffic together.
    ranks_per_gpu = world if dev.type == "cuda" and runtime.shared_gpu() else 1
    rows = []
    progress = harness.progress(name, len(sizes) * len(algorithms), enabled=rank == 0)
    with progress:
        for nbytes in sizes:
            step = bench.input_multiple(world)
            count = max(step, nbytes // itemsize // step * step)
            x = ramp(count, dtype, dev, rank)
            if args.symmetric:
                x = harness.symmetric_copy(x)
            base = harness.max_over_ranks(harness.time_us(lambda: bench.baseline(x), dev, args.warmup, args.iters))
            for algorithm in algorithms:
                ours = lambda: bench.ours(x, algorithm)  # noqa: E731
                correct = harness.all_ranks(torch.equal(ours().double(), bench.expected(x, rank, world)))
                eager = harness.max_over_ranks(harness.time_us(ours, dev, args.warmup, args.iters))
                graph = graph_us(ours, dev, args)
                best = min(eager, graph or eager)
                size = count * itemsize * bench.size_factor(world)
                algbw = size / best / 1e3
                chosen = algorithm
                if name == "all-reduce" and runtime.backend() == "nvshmem" and world > 1:
                    # The remote path pushes every input to every rank, or goes hierarchically across nodes.
                    chosen = ("hierarchical" if runtime.node_layout() else "one_shot") if rma else \
                        collectives.choose_all_reduce(count * itemsize, world, algorithm)
                label = f"auto/{chosen}" if algorithm == "auto" and chosen != "auto" else chosen
                hbm = None
                if "d2d_copy_gbs" in header:
                    moved = bench.hbm_bytes(count * itemsize, world, chosen)
                    if not args.symmetric:
                        moved += 2 * count * itemsize  # staging copy
                    hbm = moved * ranks_per_gpu / best / 1e3 / header["d2d_copy_gbs"]
                rows.append(harness.Row(name, label, runtime.transport() or "torch.distributed", size, count,
                                        args.dtype, eager, graph, algbw,
                                        algbw * bench.bus_factor(world), base,
                                        size / base / 1e3 * bench.bus_factor(world), base / best, hbm, correct))
                progress.advance()
            if args.symmetric:
                symcomm.free(x)
    return rows


def measured_cut(rows: list[harness.Row]) -> int | None:
    """The largest size at which one-shot still beats two-shot (graph times where there are any)."""
    by = {(r.algorithm, r.bytes): r.graph_us or r.time_us for r in rows}
    wins = [b for (a, b), t in by.items() if a == "one_shot" and t <= by.get(("two_shot", b), float("inf"))]
    return max(wins) if wins else None


def run_collectives(args) -> None:
    """The collectives' benchmarks: table, JSON, CSV and plot per op on rank 0."""
    gpu = runtime.device().type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.min_bytes = args.min_bytes or 1 << 10
    args.max_bytes = args.max_bytes or (256 << 20 if gpu else 1 << 20)
    header = {**harness.environment(), **harness.ceilings(runtime.device()), "symmetric_inputs": args.symmetric,
              "op_overhead_us": harness.op_overhead_us(runtime.device())}
    baseline = f"torch.distributed {header['pg_backend']}"
    for name in BENCHES if args.op == "all" else [args.op]:
        rows = run(name, BENCHES[name], args, header)
        if runtime.rank() == 0:
            stem = f"{name}-w{runtime.world_size()}"
            paths = harness.write(args.out, stem, rows, header, baseline)
            print(f"\n# {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in header.items()))
            print(f"# baseline: {baseline} (the torch backend), eager, measured in the same run")
            if header["backend"] == "torch":
                print("# note: on the torch backend our op runs the baseline's code plus dispatch; "
                      "the speedup column measures op overhead and noise only")
            elif runtime.shared_gpu():
                print("# note: ranks share one GPU, so the baseline is gloo through host copies, not NCCL")
            print(harness.table(rows))
            if any(r.algorithm == "two_shot" for r in rows):
                print(f"# measured one-shot cut-point at world {runtime.world_size()}: {measured_cut(rows)} bytes "
                      f"(python/symcomm/tuning.json, key {header.get('gpu')!r})")
            print(f"# wrote {', '.join(str(p) for p in paths)}")


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m symcomm.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", nargs="?", default="all",
                        choices=[*BENCHES, "all", "tp-layer", "moe", *gemm.BENCHES, "gemm"],
                        help="a collective, all of them, tp-layer (a decoder layer's step), moe (dispatch/combine), "
                             "a GEMM op or gemm (the three)")
    parser.add_argument("--backend", default="auto", choices=runtime.BACKENDS)
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--min-bytes", type=harness.parse_bytes, default=None, help="default 1K")
    parser.add_argument("--max-bytes", type=harness.parse_bytes, default=None, help="default 256M on GPU, 1M on CPU")
    parser.add_argument("--factor", type=int, default=4, help="size step (default 4)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--symmetric", action="store_true", help="inputs on the symmetric heap (zero copy)")
    parser.add_argument("--algorithms", action="store_true",
                        help="all-reduce: also time one_shot and two_shot and print the measured cut-point")
    parser.add_argument("--transport", choices=runtime.TRANSPORTS, default=None,
                        help="nvshmem backend: rma takes the remote path (NVSHMEM puts) to every peer; default: "
                             "SYMCOMM_TRANSPORT, else auto (load/store wherever it reaches)")
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="where JSON, CSV and PNG go")
    args = parser.parse_args()
    if args.transport:
        os.environ[runtime.TRANSPORT_ENV] = args.transport  # read by init
    if args.factor < 2:
        parser.error("--factor must be at least 2")

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.op == "tp-layer":
        tp_layer.main(args)  # it times each backend in turn, so it runs init and finalize itself
        return
    symcomm.init(backend=args.backend)
    try:
        if args.op == "moe":
            moe_bench.main(args)
        elif args.op in (*gemm.BENCHES, "gemm"):
            gemm.main(args)
        else:
            run_collectives(args)
    finally:
        symcomm.finalize()


if __name__ == "__main__":
    main()
