"""RMSNorm, replicated on every tensor-parallel rank."""

from __future__ import annotations

import torch
from torch import nn

from symcomm.nn import comm


class RMSNorm(nn.Module):
    """x / rms(x) * weight over the last dim (Llama). With sequence_parallel=True each rank sees only
    its tokens, so the weight's gradient is summed over ranks to stay equal on all of them."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, sequence_parallel: bool = False, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Low-precision inputs are normalised in float32, as Llama does.
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        weight = comm.copy_to_tp(self.weight) if self.sequence_parallel else self.weight
        return weight * h.to(x.dtype)
