"""The vocabulary split across ranks: embedding rows, and a cross-entropy over sharded logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from symcomm import runtime
from symcomm.nn import comm
from symcomm.nn.sharding import check_divisible, load_shards, split

ops = torch.ops.symcomm


def _vocab_range(per_rank: int) -> tuple[int, int]:
    start = runtime.rank() * per_rank
    return start, start + per_rank


class VocabParallelEmbedding(nn.Module):
    """nn.Embedding with rows split by vocabulary: rank r owns ids [r * V / N, (r + 1) * V / N).
    Each rank looks up the ids it owns (zeros elsewhere) and the ranks sum their results; with
    sequence_parallel=True, ids are sequence-first [S, ...] and the sum is reduce-scattered so that
    rank r gets its block of S / N positions."""

    def __init__(self, num_embeddings: int, embedding_dim: int, sequence_parallel: bool = False, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        world = runtime.world_size()
        check_divisible("VocabParallelEmbedding", "num_embeddings", num_embeddings, world)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(num_embeddings // world, embedding_dim, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight)

    @classmethod
    def from_dense(cls, embedding: nn.Embedding, sequence_parallel: bool = False) -> VocabParallelEmbedding:
        """This rank's shard of a full nn.Embedding."""
        module = cls(embedding.num_embeddings, embedding.embedding_dim, sequence_parallel, device="meta",
                     dtype=embedding.weight.dtype)
        shard = split(embedding.weight.detach(), 0, runtime.rank(), runtime.world_size())
        return load_shards(module, {"weight": shard})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        start, stop = _vocab_range(self.weight.shape[0])
        outside = (ids < start) | (ids >= stop)
        out = F.embedding((ids - start).masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        return comm.reduce_scatter_to_sp(out) if self.sequence_parallel else comm.reduce_from_tp(out)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, local_rows={self.weight.shape[0]}, "
                f"sequence_parallel={self.sequence_parallel}")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        start, stop = _vocab_range(logits.shape[-1])
        # The global max over every rank's shard, for a softmax that cannot overflow.
        local_max = logits.max(-1, keepdim=True).values
        shifted = logits - ops.all_gather(local_max.contiguous(), -1).max(-1, keepdim=True).values
        exp = shifted.exp()
        inside = (targets >= start) & (targets < stop)
        local_targets = (targets - start).masked_fill(~inside, 0)
        target_logit = shifted.gather(-1, local_targets.unsqueeze(-1)).squeeze(-1).masked_fill(~inside, 0)
        # Both sums in one reduction: the softmax denominators and the targets' logits (one rank owns each).
        sum_exp, target_logit = ops.all_reduce(torch.stack((exp.sum(-1), target_logit)))
        softmax = exp / sum_exp.unsqueeze(-1)
        ctx.save_for_backward(softmax, local_targets, inside)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, g):
        softmax, local_targets, inside = ctx.saved_tensors
        # d loss / d logits = softmax - one_hot(target), the one-hot living on the target's rank.
        grad = softmax.scatter_add(-1, local_targets.unsqueeze(-1), -inside.unsqueeze(-1).to(softmax.dtype))
        return grad * g.unsqueeze(-1), None


def vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy of vocab-sharded logits [..., V / N] (this rank's vocab range) against
    targets [...] (full vocabulary ids), without gathering the logits; equal on every rank."""
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"vocab_parallel_cross_entropy: targets shape {tuple(targets.shape)} must equal logits' "
                         f"leading shape {tuple(logits.shape[:-1])}")
    return _VocabParallelCrossEntropy.apply(logits, targets)
