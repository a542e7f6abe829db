"""Llama's SwiGLU MLP, down(silu(gate(x)) * up(x)): dense and tensor-parallel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from symcomm.nn.linear import ColumnParallelLinear, RowParallelLinear
from symcomm.nn.sharding import load_shards, shard_modules


class _SwiGLU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MLP(_SwiGLU):
    """Dense SwiGLU MLP (the single-process reference)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        kw = dict(bias=bias, device=device, dtype=dtype)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **kw)


class ParallelMLP(_SwiGLU):
    """SwiGLU MLP with gate and up column-parallel and down row-parallel: the intermediate
    activation stays sharded and a forward pass does exactly one reduction (an all-reduce, or a
    reduce-scatter with sequence_parallel=True, where x is sequence-first [S / N, ...])."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, sequence_parallel: bool = False,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(bias=bias, sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, **kw)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, **kw)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, **kw)

    @classmethod
    def from_dense(cls, *, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear,
                   sequence_parallel: bool = False) -> ParallelMLP:
        """This rank's shard of a dense MLP given by its three projections."""
        module = cls(gate_proj.in_features, gate_proj.out_features, gate_proj.bias is not None, sequence_parallel,
                     device="meta", dtype=gate_proj.weight.dtype)
        dense = {"gate_proj": gate_proj, "up_proj": up_proj, "down_proj": down_proj}
        return load_shards(module, shard_modules("mlp", dense, "ffn_only"))
