"""Column- and row-parallel linear layers (Megatron style) over torch.ops.symcomm.

With sequence_parallel=True the layers' token-side activations are sharded along dim 0 (rank r
holds the r-th block of tokens): the column-parallel layer gathers them inside its GEMM
(all_gather_gemm) and the row-parallel layer scatters its output inside its GEMM
(gemm_reduce_scatter), so no rank ever holds the full activation outside a GEMM.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from symcomm import runtime
from symcomm.nn import comm
from symcomm.nn.sharding import check_divisible, load_shards, split

ops = torch.ops.symcomm


def _flat(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous [tokens, features] matrix, the GEMM ops' layout."""
    return x.reshape(-1, x.shape[-1]).contiguous()


def _unflat(y: torch.Tensor, x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """y [tokens, out] back to x's leading shape; sequence parallel changes the size of dim 0."""
    lead = (-1, *x.shape[1:-1]) if sequence_parallel else x.shape[:-1]
    return y.view(*lead, y.shape[-1])


def _check_tokens(owner: str, x: torch.Tensor, multiple: int) -> None:
    if x.dim() < 2 or x.shape[0] % multiple:
        raise ValueError(f"{owner}: sequence_parallel needs x of at least 2 dims with x.shape[0] divisible by "
                         f"{multiple}, got shape {tuple(x.shape)}")


class _AllGatherLinear(torch.autograd.Function):
    """y = all_gather(x rows) @ w.t() + b, with x of shape [M, in] and y of shape [world * M, out]."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        y = ops.all_gather_gemm(x, weight.t())
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.contiguous()
        # Every rank's output rows came from every rank's x: reduce the input gradient back.
        grad_x = ops.gemm_reduce_scatter(g, weight)
        # Gathering x again here, rather than keeping the gathered copy from forward, saves memory.
        grad_w = g.t() @ ops.all_gather(x, 0)
        grad_b = g.sum(0) if ctx.has_bias else None
        return grad_x, grad_w, grad_b


class _RowLinear(torch.autograd.Function):
    """y = sum over ranks of x @ w.t() (+ b once): all-reduced, or reduce-scattered along rows when
    sequence parallel. x is [M, in / world]; y is [M, out], or [M / world, out]."""

    @staticmethod
    def forward(ctx, x, weight, bias, sequence_parallel):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.sequence_parallel = sequence_parallel
        if not sequence_parallel:
            return ops.gemm_all_reduce(x, weight.t(), bias)
        y = ops.gemm_reduce_scatter(x, weight.t())
        return y if bias is None else y + bias

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.contiguous()
        # Each rank's x fed every output row: it needs the gradient of all of them.
        if ctx.sequence_parallel:
            g = ops.all_gather(g, 0)
        grad_b = g.sum(0) if ctx.has_bias else None
        return g @ weight, g.t() @ x, grad_b, None


class _ParallelLinear(nn.Module):
    """Shared by both layouts: a local weight of shape local_shape and an optional bias."""

    def __init__(self, in_features: int, out_features: int, local_shape: tuple[int, int], bias_size: int | None,
                 sequence_parallel: bool, device, dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(local_shape, device=device, dtype=dtype))
        self.bias = None if bias_size is None else nn.Parameter(torch.empty(bias_size, device=device, dtype=dtype))
        if self.weight.device.type != "meta":
            self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's distribution over the full layer's fan-in, drawn per shard.
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            # Zero, not random: the row-parallel bias is replicated and must be equal on every rank.
            nn.init.zeros_(self.bias)

    @classmethod
    def _shard_of(cls, linear: nn.Linear, weight_dim: int, split_bias: bool, *flags):
        """This rank's shard of a full nn.Linear: the weight split along weight_dim, the bias split
        (column-parallel) or replicated (row-parallel); flags go to the constructor."""
        rank, world = runtime.rank(), runtime.world_size()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, *flags, device="meta",
                     dtype=linear.weight.dtype)
        bias = None if linear.bias is None else linear.bias.detach()
        if bias is not None:
            bias = split(bias, 0, rank, world) if split_bias else bias.clone()
        return load_shards(module, {"weight": split(linear.weight.detach(), weight_dim, rank, world), "bias": bias})

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"local_weight={tuple(self.weight.shape)}, sequence_parallel={self.sequence_parallel}")


class ColumnParallelLinear(_ParallelLinear):
    """y = x @ W.t() + b with W split along out_features: rank r owns output features
    [r * out / N, (r + 1) * out / N). The output is this rank's features, or all of them when
    gather_output=True. With sequence_parallel=True, x holds this rank's block of dim 0 and the
    output holds every rank's (world_size * x.shape[0] along dim 0)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False, *, device=None, dtype=None) -> None:
        world = runtime.world_size()
        check_divisible("ColumnParallelLinear", "out_features", out_features, world)
        local = out_features // world
        super().__init__(in_features, out_features, (local, in_features), local if bias else None,
                         sequence_parallel, device, dtype)
        self.gather_output = gather_output

    @classmethod
    def from_dense(cls, linear: nn.Linear, gather_output: bool = False,
                   sequence_parallel: bool = False) -> ColumnParallelLinear:
        """This rank's shard of a full nn.Linear."""
        return cls._shard_of(linear, 0, True, gather_output, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            _check_tokens("ColumnParallelLinear", x, 1)
            y = _unflat(_AllGatherLinear.apply(_flat(x), self.weight, self.bias), x, True)
        else:
            y = F.linear(comm.copy_to_tp(x), self.weight, self.bias)
        return comm.gather_from_tp(y) if self.gather_output else y


class RowParallelLinear(_ParallelLinear):
    """y = x @ W.t() + b with W split along in_features: rank r owns input features
    [r * in / N, (r + 1) * in / N) and the partial products are summed over ranks (the bias,
    replicated, is added once). x is this rank's input features when input_is_parallel=True, else
    the full input. With sequence_parallel=True the output holds this rank's block of dim 0."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 sequence_parallel: bool = False, *, device=None, dtype=None) -> None:
        world = runtime.world_size()
        check_divisible("RowParallelLinear", "in_features", in_features, world)
        local_shape = (out_features, in_features // world)
        super().__init__(in_features, out_features, local_shape, out_features if bias else None, sequence_parallel,
                         device, dtype)
        self.input_is_parallel = input_is_parallel

    @classmethod
    def from_dense(cls, linear: nn.Linear, input_is_parallel: bool = True,
                   sequence_parallel: bool = False) -> RowParallelLinear:
        """This rank's shard of a full nn.Linear."""
        return cls._shard_of(linear, 1, False, input_is_parallel, sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = comm.scatter_to_tp(x)
        if self.sequence_parallel:
            # Each rank keeps x.shape[0] / N of the output's dim 0.
            _check_tokens("RowParallelLinear", x, runtime.world_size())
        y = _RowLinear.apply(_flat(x), self.weight, self.bias, self.sequence_parallel)
        return _unflat(y, x, self.sequence_parallel)
