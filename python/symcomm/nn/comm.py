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


class _CopyToTP(torch.autograd.Function):
    # A replicated input feeds rank-local partial results: its gradient is their sum.
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return ops.all_reduce(g.contiguous())


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return ops.all_reduce(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _Gather(torch.autograd.Function):
    """all_gather along dim forward; this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return ops.all_gather(x.contiguous(), dim)

    @staticmethod
    def backward(ctx, g):
        return own_slice(g, ctx.dim), None


class _Scatter(torch.autograd.Function):
    """This rank's slice along dim forward; all_gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return own_slice(x, dim)

    @staticmethod
    def backward(ctx, g):
        return ops.all_gather(g.contiguous(), ctx.dim), None


class _ReduceScatter(torch.autograd.Function):
    """reduce_scatter along dim forward; all_gather of the gradient backward."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return ops.reduce_scatter(x.contiguous(), dim)

    @staticmethod
    def backward(ctx, g):
        return ops.all_gather(g.contiguous(), ctx.dim), None


class _GatherSum(torch.autograd.Function):
    """all_gather along dim forward; reduce_scatter of the gradient backward (every rank's output
    is used downstream, so every rank contributes to each rank's input gradient)."""

    @staticmethod
    def forward(ctx, x, dim):
        ctx.dim = dim
        return ops.all_gather(x.contiguous(), dim)

    @staticmethod
    def backward(ctx, g):
        return ops.reduce_scatter(g.contiguous(), ctx.dim), None


def copy_to_tp(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, all_reduce backward: enters a TP region with a replicated input."""
    return _CopyToTP.apply(x)


def reduce_from_tp(x: torch.Tensor) -> torch.Tensor:
    """all_reduce forward, identity backward: leaves a TP region whose ranks hold partial sums."""
    return _ReduceFromTP.apply(x)


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
