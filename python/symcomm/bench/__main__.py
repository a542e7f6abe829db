"""symcomm benchmarks, nccl-tests style, each against its baseline measured in the same run.

    torchrun --nproc-per-node 2 -m symcomm.bench all-reduce --out bench/out
    python -m symcomm.bench                      # a world of one, all benchmarks

Columns: size, element count, dtype, median time (max over ranks), algbw = bytes / time,
busbw = algbw x the op's bus factor (all-reduce 2(n-1)/n), the baseline's time, speedup =
baseline time / our time, and a correctness check of our output.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

import symcomm
from symcomm import ops, runtime
from symcomm.bench import harness

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Bench:
    """One collective: its input for a size, our op, the baseline, the bus factor, the exact answer."""

    make: Callable[[int, torch.dtype, torch.device, int], torch.Tensor]
    ours: Callable[[torch.Tensor], torch.Tensor]
    baseline: Callable[[torch.Tensor], torch.Tensor]
    bus_factor: Callable[[int], float]
    expected: Callable[[torch.Tensor, int, int], torch.Tensor]


def _ramp(count: int, dtype: torch.dtype, device: torch.device, rank: int) -> torch.Tensor:
    # Small integers plus the rank: every partial sum is exact in bf16 for the worlds we run, so
    # the answer is known without gathering every rank's input.
    base = torch.arange(count, device=device) % 13 - 6
    return (base + rank).to(dtype)


def _ramp_sum(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    base = x.double() - rank
    return base * world + world * (world - 1) / 2


BENCHES = {
    "all-reduce": Bench(_ramp, torch.ops.symcomm.all_reduce, ops.torch_all_reduce,
                        lambda n: 2 * (n - 1) / n, _ramp_sum),
}


def run(name: str, bench: Bench, args, header: dict) -> list[harness.Row]:
    dev, world, rank = runtime.device(), runtime.world_size(), runtime.rank()
    dtype = DTYPES[args.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = harness.size_sweep(args.min_bytes, args.max_bytes, args.factor)
    rows = []
    progress = None
    if rank == 0:
        from rich.progress import Progress

        progress = Progress(transient=True)
        progress.start()
        task = progress.add_task(name, total=len(sizes))
    try:
        for nbytes in sizes:
            count = max(1, nbytes // itemsize)
            x = bench.make(count, dtype, dev, rank)
            correct = bool(torch.equal(bench.ours(x).double(), bench.expected(x, rank, world)))
            ours = harness.max_over_ranks(harness.time_us(lambda: bench.ours(x), dev, args.warmup, args.iters))
            base = harness.max_over_ranks(harness.time_us(lambda: bench.baseline(x), dev, args.warmup, args.iters))
            ok = torch.tensor([int(correct)])
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            algbw = count * itemsize / ours / 1e3
            rows.append(harness.Row(name, count * itemsize, count, args.dtype, ours, algbw,
                                    algbw * bench.bus_factor(world), base, base / ours, bool(ok)))
            if progress:
                progress.advance(task)
    finally:
        if progress:
            progress.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m symcomm.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", nargs="?", default="all", choices=[*BENCHES, "all"])
    parser.add_argument("--backend", default="auto", choices=runtime.BACKENDS)
    parser.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--min-bytes", type=harness.parse_bytes, default=None, help="default 1K")
    parser.add_argument("--max-bytes", type=harness.parse_bytes, default=None, help="default 256M on GPU, 1M on CPU")
    parser.add_argument("--factor", type=int, default=4, help="size step (default 4)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/out"), help="where JSON, CSV and PNG go")
    args = parser.parse_args()
    if args.factor < 2:
        parser.error("--factor must be at least 2")

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    symcomm.init(backend=args.backend)
    try:
        gpu = runtime.device().type == "cuda"
        args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
        args.min_bytes = args.min_bytes or 1 << 10
        args.max_bytes = args.max_bytes or (256 << 20 if gpu else 1 << 20)
        header = {**harness.environment(), **harness.ceilings(runtime.device())}
        baseline = f"torch.distributed {header['pg_backend']}"
        for name in BENCHES if args.op == "all" else [args.op]:
            rows = run(name, BENCHES[name], args, header)
            if runtime.rank() == 0:
                stem = f"{name}-w{runtime.world_size()}"
                paths = harness.write(args.out, stem, rows, header, baseline)
                print(f"\n# {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                  for k, v in header.items()))
                print(f"# baseline: {baseline} (the torch backend), measured in the same run")
                if header["backend"] == "torch":
                    print("# note: on the torch backend our op runs the baseline's code plus dispatch; "
                          "the speedup column measures op overhead and noise only")
                print(harness.table(rows))
                print(f"# wrote {', '.join(str(p) for p in paths)}")
    finally:
        symcomm.finalize()


if __name__ == "__main__":
    main()
