"""Differentiable communication for tensor parallelism: each function's backward is the adjoint of
its forward. The torch.ops.symcomm ops carry no autograd of their own.

Tensor-parallel (TP) regions shard features (the last dim); sequence-parallel (SP) regions shard
tokens (dim 0). Every rank of the world is one tensor-parallel rank.
"""

from __future__ import annotations

import torch

from symcomm import runtime

ops = torch.ops.symcomm


def own_slice(x: torch.Tensor, dim: int) -> torch.Tensor:
    """This rank's contiguous 1/world_size of x along dim."""
    world = runtime.world_size()
    if x.shape[dim] % world:
        raise ValueError(f"x.shape[{dim}]={x.shape[dim]} is not divisible by the tensor-parallel size {world}")
    size = x.shape[dim] // world
    return x.narrow(dim, runtime.rank() * size, size).contiguous()


def _function(name: str, forward, backward) -> type[torch.autograd.Function]:
    """An autograd Function along `dim`: forward(x, dim) and its adjoint backward(g, dim)."""

    def fwd(ctx, x, dim):
        ctx.dim = dim
        return forward(x, dim)

    def bwd(ctx, g):
        return backward(g.contiguous(), ctx.dim), None

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(fwd), "backward": staticmethod(bwd)})


def _identity(x, dim):
    return x.view_as(x)


def _all_reduce(x, dim):
    return ops.all_reduce(x)


def _all_gather(x, dim):
    return ops.all_gather(x.contiguous(), dim)


def _reduce_scatter(x, dim):
    return ops.reduce_scatter(x.contiguous(), dim)


# A replicated input feeding rank-local partial results gets the sum of their gradients.
_CopyToTP = _function("_CopyToTP", _identity, _all_reduce)
_ReduceFromTP = _function("_ReduceFromTP", _all_reduce, _identity)
_Gather = _function("_Gather", _all_gather, own_slice)
_Scatter = _function("_Scatter", own_slice, _all_gather)
_ReduceScatter = _function("_ReduceScatter", _reduce_scatter, _all_gather)
# Every rank's output is used downstream, so every rank contributes to each rank's input gradient.
_GatherSum = _function("_GatherSum", _all_gather, _reduce_scatter)


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, all_reduce backward: enters a TP region with a replicated input."""
    return _CopyToTP.apply(x, 0)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """all_reduce forward, identity backward: leaves a TP region whose ranks hold partial sums."""
    return _ReduceFromTP.apply(x, 0)


def gather_from_tp(x: torch.Tensor) -> torch.Tensor:
    """all_gather along the last dim forward, this rank's slice backward."""
    return _Gather.apply(x, -1)


def scatter_to_tp(x: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the last dim forward, all_gather backward."""
    return _Scatter.apply(x, -1)


def gather_from_sp(x: torch.Tensor) -> torch.Tensor:
    """all_gather along dim 0 (tokens) forward, reduce_scatter backward."""
    return _GatherSum.apply(x, 0)


def reduce_scatter_to_sp(x: torch.Tensor) -> torch.Tensor:
    """reduce_scatter along dim 0 (tokens) forward, all_gather backward."""
    return _ReduceScatter.apply(x, 0)


def scatter_to_sp(x: torch.Tensor) -> torch.Tensor:
    """This rank's tokens (slice of dim 0) forward, all_gather backward."""
    return _Scatter.apply(x, 0)
