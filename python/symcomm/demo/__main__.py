"""A small Llama-style model with fixed-seed random weights, at TP=1 (dense) and TP=N, on CPU.

    torchrun --nproc-per-node 2 -m symcomm.demo   # one process per rank
    python -m symcomm.demo --tp 2                 # single driver: spawns ranks 0..N-1 and drives them

Runs a forward pass and a few greedy decode steps with both and prints the largest logit
difference, the Pearson correlation of the logits, and tokens per second. Exits with status 1 if
the TP=N logits do not match TP=1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

import torch

import symcomm
from symcomm.demo.llama import DemoRank, pearson
from symcomm.demo.rpc import RpcRunner
from symcomm.nn import LlamaConfig

CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2)
DTYPES = {"float32": torch.float32, "float64": torch.float64}
MIN_PCC = 0.9999


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m symcomm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=2, help="ranks to spawn without torchrun (default 2)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16, help="prompt tokens")
    parser.add_argument("--steps", type=int, default=8, help="greedy decode steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tp < 1:
        parser.error(f"--tp must be >= 1, got {args.tp}")
    return args


def run(call: Callable, args: argparse.Namespace, tp: int, launcher: str, show: bool) -> int:
    """The demo; call(method, *args) runs DemoRank.method on every rank and returns rank 0's result."""
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, CONFIG.vocab_size, (args.batch, args.seq), generator=gen)
    results = {
        (parallel, kind): call(*request)
        for parallel in (False, True)
        for kind, request in (("forward", ("forward", ids, parallel, args.repeats)),
                              ("generate", ("generate", ids, args.steps, parallel)))
    }
    if not show:
        return 0
    (ref_logits, ref_s), (logits, tp_s) = results[False, "forward"], results[True, "forward"]
    (ref_tokens, ref_gen_s), (tokens, tp_gen_s) = results[False, "generate"], results[True, "generate"]
    pcc = pearson(logits, ref_logits)
    c = CONFIG
    print(f"symcomm demo: Llama-style model, random weights (vocab {c.vocab_size}, hidden {c.hidden_size}, "
          f"{c.num_layers} layers, {c.num_heads} heads, {c.num_kv_heads} kv heads), {args.dtype}")
    print(f"  {tp} ranks via {launcher}; torch backend on CPU (gloo)")
    print(f"  forward: batch {args.batch} x {args.seq} tokens; greedy decode: {args.steps} steps (no KV cache)")
    print(f"  {'':14}{'forward tok/s':>15}{'decode tok/s':>15}")
    for name, fwd_s, gen_s in (("TP=1 (dense)", ref_s, ref_gen_s), (f"TP={tp}", tp_s, tp_gen_s)):
        print(f"  {name:14}{args.batch * args.seq / fwd_s:15.0f}{args.batch * args.steps / gen_s:15.0f}")
    print(f"  logits TP={tp} vs TP=1: max abs diff {(logits - ref_logits).abs().max().item():.3g}, PCC {pcc:.8f}")
    print(f"  greedy tokens equal: {torch.equal(tokens, ref_tokens)}")
    if tp > 1:
        print("  (tokens/s: on CPU through gloo, communication latency dominates a model this small)")
    return 0 if pcc >= MIN_PCC else 1


def main() -> int:
    args = parse_args()
    # SIGTERM as an exception, so that cleanup (workers, shared memory) runs as it does for Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    dtype = DTYPES[args.dtype]
    if "WORLD_SIZE" in os.environ:
        symcomm.init(backend="torch")
        try:
            demo = DemoRank(CONFIG, args.seed, dtype)
            return run(lambda method, *a: getattr(demo, method)(*a), args, symcomm.world_size(), "torchrun",
                       symcomm.rank() == 0)
        finally:
            symcomm.finalize()
    with RpcRunner(args.tp, DemoRank, CONFIG, args.seed, dtype) as runner:
        return run(lambda method, *a: runner.call(method, *a)[0], args, args.tp,
                   "a single driver (spawned workers, shared-memory RPC)", True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("symcomm demo: interrupted", file=sys.stderr)
        sys.exit(130)
