"""The demo's work on each rank: a small random-weight Llama, dense (TP=1) and tensor-parallel."""

from __future__ import annotations

import time

import torch

import symcomm
from symcomm.nn import DenseLlama, LlamaConfig, ParallelLlama, random_state_dict


class DemoRank:
    """One rank's part of the demo. Every rank calls the same methods in the same order; the
    dense reference runs on rank 0 only (the other ranks return None for it)."""

    def __init__(self, config: LlamaConfig, seed: int, dtype: torch.dtype) -> None:
        # Every rank draws the same full weights and keeps its shard.
        state = random_state_dict(config, torch.Generator().manual_seed(seed), dtype)
        self.parallel = ParallelLlama.from_state_dict(config, state).eval()
        self.dense = None
        if symcomm.rank() == 0:
            self.dense = DenseLlama(config, dtype=dtype).eval()
            self.dense.load_state_dict(state)

    def _model(self, parallel: bool):
        return self.parallel if parallel else self.dense

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, parallel: bool, repeats: int) -> tuple[torch.Tensor, float] | None:
        """Logits of ids and the seconds per forward pass (mean of `repeats`)."""
        model = self._model(parallel)
        if model is None:
            return None
        logits = model(ids)
        start = time.perf_counter()
        for _ in range(repeats):
            model(ids)
        return logits, (time.perf_counter() - start) / repeats

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, steps: int, parallel: bool) -> tuple[torch.Tensor, float] | None:
        """Greedy decoding of `steps` tokens after ids (the whole sequence recomputed each step, no
        KV cache) and its seconds."""
        model = self._model(parallel)
        if model is None:
            return None
        start = time.perf_counter()
        for _ in range(steps):
            # Every rank has the same gathered logits, so every rank picks the same token.
            ids = torch.cat((ids, model(ids)[:, -1].argmax(-1, keepdim=True)), 1)
        return ids[:, -steps:], time.perf_counter() - start


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))
