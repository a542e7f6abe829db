"""A Llama at TP=1 (dense) and TP=N on CPU: SmolLM2-135M-Instruct where its package is installed
(also run by Hugging Face transformers, the reference), else a small model of random weights.

    python -m symcomm.demo --tp 2                 # single driver: spawns ranks 0..N-1 and drives them
    torchrun --nproc-per-node 2 -m symcomm.demo   # one process per rank

Prefills a prompt and decodes greedily through the KV cache with each, then prints the text, tokens
per second, the largest logit difference and the PCC against the reference, and whether the greedy
tokens equal the reference's. Exits with status 1 if TP=N's logits or tokens do not match it.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable

import torch

import symcomm
from symcomm.demo import smollm2
from symcomm.demo.llama import DemoRank
from symcomm.demo.rpc import RpcRunner

DTYPES = {"float32": torch.float32, "float64": torch.float64}
MIN_PCC = 0.9999
# The process group's timeout: the other ranks wait in a broadcast while rank 0 reads the model.
TIMEOUT_S = 600.0
PLAN_TEXT = {"full": "attention by heads, MLPs, embedding and LM head split",
             "ffn_only": "MLPs split, attention and vocabulary replicated"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m symcomm.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("auto", "smollm2", "random"), default="auto",
                        help="auto (default): smollm2 where it is installed, else random")
    parser.add_argument("--tp", type=int, default=2, help="ranks to spawn without torchrun (default 2)")
    parser.add_argument("--plan", choices=("auto", "full", "ffn_only"), default="auto",
                        help="auto (default): full where the heads split over the ranks, else ffn_only")
    parser.add_argument("--prompt", default="What is the capital of France?", help="the user message (smollm2)")
    parser.add_argument("--batch", type=int, default=2, help="prompts of random tokens (random)")
    parser.add_argument("--seq", type=int, default=16, help="prompt tokens (random)")
    parser.add_argument("--steps", type=int, default=32, help="most tokens to generate")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tp < 1:
        parser.error(f"--tp must be >= 1, got {args.tp}")
    if args.model == "smollm2" and not smollm2.available():
        parser.error(f"--model smollm2 needs the model's package and transformers: {smollm2.INSTALL}")
    if args.model == "auto":
        args.model = "smollm2" if smollm2.available() else "random"
    return args


def run(call: Callable, args: argparse.Namespace, tp: int, launcher: str, show: bool) -> int:
    """The demo; call(method, *args) runs DemoRank.method on every rank and returns rank 0's result."""
    config, plan, why, ids = call("describe")
    real = args.model == "smollm2"
    runs = {"Hugging Face": "hf", "TP=1 (dense)": "dense", f"TP={tp}": "parallel"}
    if not real:
        del runs["Hugging Face"]
    results = {name: call("generate", which, args.steps, args.repeats) for name, which in runs.items()}
    if not show:
        return 0
    reference = "Hugging Face" if real else "TP=1 (dense)"
    c, batch, seq = config, *ids.shape
    what = smollm2.NAME if real else "Llama-style model of random weights"
    print(f"symcomm demo: {what} (vocab {c.vocab_size}, hidden {c.hidden_size}, {c.num_layers} layers, "
          f"{c.num_heads} heads, {c.num_kv_heads} kv heads), {args.dtype}")
    print(f"  {tp} ranks via {launcher}; torch backend on CPU (gloo)")
    print(f"  plan {plan}: " + (PLAN_TEXT[plan] + (f" ({why})" if why else "")))
    print(f"  prefill: batch {batch} x {seq} tokens; greedy decode through the KV cache, up to {args.steps} tokens")
    if real:
        print(f"  prompt: {args.prompt!r} (a user message in the chat template: {seq} tokens)")
        for name, r in results.items():
            print(f"  {name + ':':14}{call('text', r.tokens)!r}")
    print(f"  {'':14}{'prefill tok/s':>15}{'decode tok/s':>15}")
    for name, r in results.items():
        decoded = batch * (r.tokens.shape[1] - 1)
        decode = f"{decoded / r.decode_s:15.0f}" if decoded and r.decode_s > 0 else f"{'-':>15}"
        print(f"  {name:14}{batch * seq / r.prefill_s:15.0f}{decode}")
    ref, ok = results[reference], True
    for name, r in results.items():
        if name == reference:
            continue
        diff, pcc = call("compare", runs[name], runs[reference])
        same = torch.equal(r.tokens, ref.tokens)
        print(f"  {name} vs {reference}: logits max abs diff {diff:.3g}, PCC {pcc:.8f}; greedy tokens equal: {same}")
        if name == f"TP={tp}":
            ok = pcc >= MIN_PCC and same
    if tp > 1:
        print(f"  (tokens/s: {tp} ranks share this machine's {os.cpu_count()} cores and talk through gloo; "
              "they say nothing about the GPU kernels)")
    if not real:
        print(f"  (a pretrained model instead: {smollm2.INSTALL})")
    return 0 if ok else 1


def main() -> int:
    args = parse_args()
    # SIGTERM as an exception, so that cleanup (workers, shared memory) runs as it does for Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    rank_args = (args.model, args.plan, args.prompt, args.batch, args.seq, args.seed, DTYPES[args.dtype])
    if "WORLD_SIZE" in os.environ:
        symcomm.init(backend="torch")
        try:
            demo = DemoRank(*rank_args)
            return run(lambda method, *a: getattr(demo, method)(*a), args, symcomm.world_size(), "torchrun",
                       symcomm.rank() == 0)
        finally:
            symcomm.finalize()
    with RpcRunner(args.tp, DemoRank, *rank_args, timeout_s=TIMEOUT_S) as runner:
        return run(lambda method, *a: runner.call(method, *a)[0], args, args.tp,
                   "a single driver (spawned workers, shared-memory RPC)", True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("symcomm demo: interrupted", file=sys.stderr)
        sys.exit(130)
