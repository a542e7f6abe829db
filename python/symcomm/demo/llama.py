"""The demo's work on each rank: one Llama (SmolLM2 or random weights) as Hugging Face runs it, as
the dense reference (TP=1) and tensor-parallel over every rank, each prefilling a prompt and then
decoding greedily through its KV cache."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import symcomm
from symcomm.demo import smollm2
from symcomm.nn import DenseLlama, LlamaConfig, ParallelLlama, choose_plan, random_state_dict

RANDOM_CONFIG = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2)


@dataclass
class Generation:
    tokens: torch.Tensor  # greedy [B, n], through the first end-of-sequence token (or `steps` of them)
    prefill_s: float  # one prefill (mean of the timed repeats)
    decode_s: float  # the n - 1 decode steps after it


class DemoRank:
    """One rank's part of the demo. Every rank calls the same methods in the same order; Hugging
    Face's model and the dense reference run on rank 0 only (the other ranks return None for them).

    model "smollm2": rank 0 reads the model and tokenizes the prompt, and sends the weights and the
    prompt to the others (one read of the file, not one per rank). model "random": every rank draws
    the same weights and prompt from the seed.
    """

    def __init__(self, model: str, plan: str, prompt: str, batch: int, seq: int, seed: int,
                 dtype: torch.dtype) -> None:
        self.hf = self.tokenizer = None
        if model == "random":
            gen = torch.Generator().manual_seed(seed)
            self.config, state = RANDOM_CONFIG, random_state_dict(RANDOM_CONFIG, gen, dtype)
            self.ids, self.eos = torch.randint(0, RANDOM_CONFIG.vocab_size, (batch, seq), generator=gen), None
        else:
            box = [None]
            if symcomm.rank() == 0:
                self.hf, self.tokenizer = smollm2.load(dtype)
                box = [(LlamaConfig.from_hf(self.hf.config), self.hf.state_dict(),
                        smollm2.chat_prompt(self.tokenizer, prompt), self.hf.config.eos_token_id)]
            dist.broadcast_object_list(box, src=0)
            self.config, state, self.ids, self.eos = box[0]
        # "auto": the plan the head counts allow, and why it is not "full" when it is not.
        self.plan, self.why = choose_plan(self.config, symcomm.world_size()) if plan == "auto" else (plan, "")
        self.models = {"parallel": ParallelLlama.from_state_dict(self.config, state, self.plan).eval()}
        if symcomm.rank() == 0:
            self.models["dense"] = DenseLlama(self.config, dtype=dtype).eval()
            self.models["dense"].load_state_dict(state)
            if self.hf is not None:
                self.models["hf"] = self.hf
        self.logits = {}  # of the prompt, by model, on the ranks that ran it: kept here, not sent back

    def describe(self) -> tuple[LlamaConfig, str, str, torch.Tensor]:
        """The config, the plan and why it is not "full", and the prompt ids."""
        return self.config, self.plan, self.why, self.ids

    def text(self, tokens: torch.Tensor) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(tokens[0])

    @torch.inference_mode()
    def generate(self, which: str, steps: int, repeats: int) -> Generation | None:
        """Prefill the prompt (timed over `repeats`) and decode up to `steps` greedy tokens with
        `which` of "hf", "dense" and "parallel"."""
        model = self.models.get(which)
        if model is None:
            return None
        if which == "hf":
            return self._generate_hf(steps, repeats)
        ids = self.ids
        batch, seq = ids.shape
        cache = model.new_cache(batch, seq + steps)
        start = time.perf_counter()
        for _ in range(repeats):
            logits = model(ids, cache=cache)
        prefill_s = (time.perf_counter() - start) / repeats
        # Every rank has the same gathered logits, so every rank picks the same token.
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        start = time.perf_counter()
        while len(tokens) < steps and not self._ended(tokens[-1]):
            position = torch.tensor([seq + len(tokens) - 1])
            tokens.append(model(tokens[-1], position, cache=cache)[:, -1].argmax(-1, keepdim=True))
        self.logits[which] = logits.float()
        return Generation(torch.cat(tokens, 1), prefill_s, time.perf_counter() - start)

    def _ended(self, token: torch.Tensor) -> bool:
        return self.eos is not None and bool((token == self.eos).all())

    def _generate_hf(self, steps: int, repeats: int) -> Generation:
        ids, hf = self.ids, self.models["hf"]
        start = time.perf_counter()
        for _ in range(repeats):
            logits = hf(ids).logits
        prefill_s = (time.perf_counter() - start) / repeats
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, do_sample=False,
                          pad_token_id=self.eos)
        # generate's time less one prefill: its decode steps.
        total_s = time.perf_counter() - start
        self.logits["hf"] = logits.float()
        return Generation(out[:, ids.shape[1]:], prefill_s, max(total_s - prefill_s, 0.0))

    def compare(self, which: str, reference: str) -> tuple[float, float] | None:
        """The largest absolute difference and the PCC of the prompt's logits against the reference's."""
        if reference not in self.logits:
            return None
        a, b = self.logits[which], self.logits[reference]
        return (a - b).abs().max().item(), pearson(a, b)


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))
