"""python -m symcomm.bench tp-layer: one Llama decoder layer's forward step at TP=N against TP=1.

TP=N is ParallelDecoderLayer over every rank of the run (attention split by heads, the MLP by
columns then rows), without and with sequence parallelism; TP=1 is the dense DecoderLayer, timed on
every rank at once with no communication. Each backend (nvshmem where every rank can run it, then
torch) gets its own init and finalize. Weights and inputs come from fixed seeds, equal on all ranks.

Shapes: decode, 8 tokens, and prefill, 512 tokens, each one sequence. Sequence parallelism splits
the sequence, which a batch of 8 one-token sequences could not give it; the layer keeps no KV
cache, so a decode step costs its GEMMs at 8 rows and its reductions, which this shape has too.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

import symcomm
from symcomm import runtime
from symcomm.bench import harness
from symcomm.nn import DecoderLayer, LlamaConfig, ParallelDecoderLayer, random_state_dict, shard_state_dict
from symcomm.nn.sharding import load_shards

# A Llama-3-8B layer on a GPU; on a CPU a small layer of similar proportions, so a run takes seconds.
GPU_CONFIG = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_layers=1, num_heads=32, num_kv_heads=8,
                         rope_theta=500000.0)
CPU_CONFIG = LlamaConfig(hidden_size=256, intermediate_size=688, num_layers=1, num_heads=4, num_kv_heads=2,
                         rope_theta=500000.0)


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int  # one sequence of this many tokens


SHAPES = (Shape("decode", 8), Shape("prefill", 512))

# Largest |TP output - dense output| accepted, relative to the largest |dense output|: the two sum
# the same products in different orders (per-rank partial sums, then a reduction), so they differ
# by rounding only.
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
SEED = 0


@dataclass
class Row:
    shape: str
    tokens: int
    backend: str
    tp: int
    sequence_parallel: bool
    time_us: float  # median over iterations, max over ranks
    tp1_us: float  # the dense layer alone on each rank, same statistic
    speedup: float  # tp1_us / time_us
    tokens_per_s: float
    max_abs_diff: float  # TP output against the dense output, max over ranks
    correct: bool


def layer_weights(config: LlamaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The first decoder layer of random_state_dict, with the layer's own parameter names."""
    prefix = "model.layers.0."
    full = random_state_dict(config, torch.Generator().manual_seed(SEED), dtype)
    return {k.removeprefix(prefix): v for k, v in full.items() if k.startswith(prefix)}


@torch.inference_mode()
def run(config: LlamaConfig, weights: dict[str, torch.Tensor], shapes, warmup: int, iters: int) -> list[Row]:
    """Rows of every shape at TP=N, without and with sequence parallelism, on the backend symcomm is
    initialised with (N = its world size)."""
    dev, rank, world = runtime.device(), runtime.rank(), runtime.world_size()
    for shape in shapes:
        if shape.tokens % world:
            raise ValueError(f"tp-layer: shape {shape.name!r} has {shape.tokens} tokens, not divisible by the "
                             f"tensor-parallel size {world} (sequence parallelism splits them)")
    dtype = next(iter(weights.values())).dtype
    dense = DecoderLayer(config, device=dev, dtype=dtype)
    dense.load_state_dict(weights)
    shards = shard_state_dict(dense.state_dict(), "full", rank, world, num_heads=config.num_heads,
                              num_kv_heads=config.num_kv_heads)
    # Both layers hold the same shard tensors: sequence parallelism changes the communication only.
    layers = {sp: load_shards(ParallelDecoderLayer(config, "full", sp, device="meta", dtype=dtype), shards)
              for sp in (False, True)}

    rows = []
    with harness.progress(f"tp-layer ({runtime.backend()})", 2 * len(shapes), enabled=rank == 0) as progress:
        for shape in shapes:
            gen = torch.Generator().manual_seed(SEED)
            x = torch.randn(1, shape.tokens, config.hidden_size, generator=gen).to(dev, dtype)
            ref = dense(x)
            tp1 = harness.max_over_ranks(harness.time_us(partial(dense, x), dev, warmup, iters, together=False))
            bound = TOLERANCE[dtype] * float(ref.abs().max())
            for sp, layer in layers.items():
                # Sequence parallel: sequence-first [S / N, B, hidden], this rank's block of the tokens.
                local = (lambda t: t.transpose(0, 1).chunk(world)[rank].contiguous()) if sp else (lambda t: t)
                x_local = local(x)
                diff = float((layer(x_local).float() - local(ref).float()).abs().max())
                correct = harness.all_ranks(diff <= bound)
                t = harness.max_over_ranks(harness.time_us(partial(layer, x_local), dev, warmup, iters))
                rows.append(Row(shape.name, shape.tokens, runtime.backend(), world, sp, t, tp1, tp1 / t,
                                shape.tokens / t * 1e6, harness.max_over_ranks(diff), correct))
                progress.advance()
    return rows


def backends(requested: str, gpu: bool) -> list[str]:
    if requested != "auto":
        return [requested]
    # "auto" is nvshmem where every rank can run it (init logs why not); then the torch baseline.
    return ["auto", "torch"] if gpu else ["torch"]


def table(rows: list[Row]) -> str:
    return harness.format_table(rows, [
        ("shape", lambda r: r.shape, ""), ("tokens", lambda r: r.tokens, "d"), ("backend", lambda r: r.backend, ""),
        ("TP", lambda r: r.tp, "d"), ("SP", lambda r: "on" if r.sequence_parallel else "off", ""),
        ("time (us)", lambda r: r.time_us, ".1f"), ("TP=1 (us)", lambda r: r.tp1_us, ".1f"),
        ("speedup", lambda r: r.speedup, ".2f"), ("tokens/s", lambda r: r.tokens_per_s, ".0f"),
        ("max diff", lambda r: r.max_abs_diff, ".2g"), ("check", lambda r: harness.check(r.correct), ""),
    ])


def main(args) -> None:
    """The whole benchmark: every backend in turn, then the table and files on rank 0."""
    gpu = torch.cuda.is_available()
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    config = GPU_CONFIG if gpu else CPU_CONFIG
    weights = layer_weights(config, getattr(torch, args.dtype))
    rows: list[Row] = []
    header: dict[str, object] = {}
    done: list[str] = []
    for requested in backends(args.backend, gpu):
        backend = symcomm.init(backend=requested)
        try:
            if backend in done:  # "auto" fell back to torch, which has had its turn
                continue
            done.append(backend)
            rank, world = runtime.rank(), runtime.world_size()
            header = header or {**harness.environment(), "threads": torch.get_num_threads(), "dtype": args.dtype,
                                "layer": f"hidden {config.hidden_size}, {config.num_heads} heads, "
                                         f"{config.num_kv_heads} kv heads, intermediate {config.intermediate_size}"}
            rows += run(config, weights, SHAPES, args.warmup, args.iters)
        finally:
            symcomm.finalize()
    if rank != 0:
        return
    header["backend"] = ", ".join(done)
    paths = harness.write_rows(args.out, f"tp-layer-w{world}", rows, header)
    print("\n# tp-layer: " + ", ".join(f"{k}={v}" for k, v in header.items()))
    print("# TP=1: the dense layer on each rank alone, no communication; speedup = TP=1 time / TP time; "
          "forward only, median over iterations, max over ranks")
    print(table(rows))
    print(f"# wrote {', '.join(str(p) for p in paths)}")
