"""Llama self-attention: grouped-query heads, rotary position embeddings, causal mask; dense and
tensor-parallel by heads."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from symcomm import runtime
from symcomm.nn.linear import ColumnParallelLinear, RowParallelLinear
from symcomm.nn.sharding import kv_heads_of_rank, load_shards, shard_modules


def apply_rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding, rotate-half convention, of x [B, S, heads, D] at positions [S] or [B, S]."""
    dim = x.shape[-1]
    # Angles in float64 so that low-precision runs lose nothing before the final cast.
    inv_freq = theta ** -(torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    angles = torch.cat((angles, angles), -1).unsqueeze(-2)
    first, second = x.chunk(2, -1)
    return x * angles.cos().to(x.dtype) + torch.cat((-second, first), -1) * angles.sin().to(x.dtype)


class KVCache:
    """The rotated keys and values of one attention module's kv heads (on a tensor-parallel rank, the
    kv heads that rank computes) for positions [0, capacity): k and v are [B, capacity, kv_heads, D].

    A forward pass with a cache writes its tokens' keys and values at their positions and attends to
    every cached position up to each query's own, so a prompt is prefilled once and then one token is
    decoded per step. Shapes stay fixed from step to step and positions are a tensor, so that a decode
    step can be captured in a CUDA graph and replayed with new positions. Positions past a query's are
    masked, so a cache can be reused for a new sequence without clearing it.
    """

    def __init__(self, batch: int, capacity: int, kv_heads: int, head_dim: int, *, device=None, dtype=None) -> None:
        # Zeros, not empty: a masked entry still enters the attention product with weight 0, and 0 * NaN
        # would poison it.
        self.k = torch.zeros(batch, capacity, kv_heads, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Stores k, v [B, S, kv_heads, D] at positions [S]; returns every cached key and value, and
        the mask [S, capacity] of the positions each query may attend to."""
        if positions.dim() != 1:
            raise ValueError(f"KVCache: positions must be 1-D [S] (the same for every sequence of the batch), got "
                             f"shape {tuple(positions.shape)}")
        if k.shape[0] != self.k.shape[0] or k.shape[2:] != self.k.shape[2:]:
            raise ValueError(f"KVCache: keys of shape {tuple(k.shape)} do not fit a cache of shape "
                             f"{tuple(self.k.shape)} ([batch, capacity, kv_heads, head_dim])")
        # Value checks need the values on the host: for CPU tensors only, as for every value check.
        if positions.device.type == "cpu" and positions.numel():
            if int(positions.min()) < 0 or int(positions.max()) >= self.capacity:
                raise ValueError(f"KVCache: positions must lie in [0, {self.capacity}) (the cache's capacity), got "
                                 f"{positions.tolist()}")
        self.k.index_copy_(1, positions, k.to(self.k.dtype))
        self.v.index_copy_(1, positions, v.to(self.v.dtype))
        mask = torch.arange(self.capacity, device=positions.device) <= positions[:, None]
        return self.k, self.v, mask


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                     theta: float, cache: KVCache | None = None) -> torch.Tensor:
    """Causal softmax attention of q [B, S, Hq, D] over k, v [B, S, Hkv, D], or with a cache over
    every cached position up to each query's; returns [B, S, Hq * D]."""
    q, k = apply_rotary(q, positions, theta), apply_rotary(k, positions, theta)
    mask = None
    if cache is not None:
        k, v, mask = cache.update(k, v, positions)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    return out.transpose(1, 2).flatten(2)


class _SelfAttention(nn.Module):
    """The computation shared by the dense and the parallel module, over this module's heads."""

    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    sequence_first: bool

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.sequence_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        seq = q.shape[1]
        if positions is None:
            positions = torch.arange(seq, device=x.device)
        out = causal_attention(q.unflatten(-1, (self.heads, self.head_dim)),
                               k.unflatten(-1, (self.kv_heads, self.head_dim)),
                               v.unflatten(-1, (self.kv_heads, self.head_dim)), positions, self.rope_theta, cache)
        return self.o_proj(out.transpose(0, 1) if self.sequence_first else out)

    def new_cache(self, batch: int, capacity: int) -> KVCache:
        """An empty cache of this module's kv heads for `batch` sequences of up to `capacity` tokens."""
        w = self.k_proj.weight
        return KVCache(batch, capacity, self.kv_heads, self.head_dim, device=w.device, dtype=w.dtype)


class Attention(_SelfAttention):
    """Dense Llama attention on x [B, S, hidden] (the single-process reference).

    qkv_bias and o_proj_bias are separate because checkpoints differ: Qwen2 has biases on q, k and v
    only, Llama's attention_bias puts them on all four projections.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
                 rope_theta: float = 10000.0, qkv_bias: bool = False, o_proj_bias: bool = False, *, device=None,
                 dtype=None) -> None:
        super().__init__()
        self.heads, self.kv_heads = num_heads, num_kv_heads
        self.head_dim = head_dim or hidden_size // num_heads
        self.rope_theta, self.sequence_first = rope_theta, False
        kw = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(hidden_size, num_heads * self.head_dim, bias=qkv_bias, **kw)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias, **kw)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim, bias=qkv_bias, **kw)
        self.o_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=o_proj_bias, **kw)


class ParallelAttention(_SelfAttention):
    """Llama attention split by heads: rank r computes query heads [r * H / N, (r + 1) * H / N) and
    the kv heads they read (replicated when num_kv_heads < N); q, k, v are column-parallel and
    o_proj row-parallel, so a forward pass does one reduction.

    x is [B, S, hidden], or with sequence_parallel=True, sequence-first [S / N, B, hidden] holding
    this rank's block of the sequence (and so is the output). positions ([S] or [B, S], default
    0..S-1) are the rotary positions. qkv_bias and o_proj_bias are as in Attention; the k and v
    biases are split (and replicated) with their kv heads, the o_proj bias is replicated.

    A replicated kv head's weight and bias gradients on each rank cover that rank's query heads
    only: for training, sum them over the ranks sharing the head, as for any replicated parameter.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int | None = None,
                 rope_theta: float = 10000.0, qkv_bias: bool = False, o_proj_bias: bool = False,
                 sequence_parallel: bool = False, *, device=None, dtype=None) -> None:
        super().__init__()
        world = runtime.world_size()
        kv = kv_heads_of_rank(num_heads, num_kv_heads, runtime.rank(), world)
        self.heads, self.kv_heads = num_heads // world, len(kv)
        self.head_dim = head_dim or hidden_size // num_heads
        self.rope_theta, self.sequence_first = rope_theta, sequence_parallel
        kw = dict(sequence_parallel=sequence_parallel, device=device, dtype=dtype)
        self.q_proj = ColumnParallelLinear(hidden_size, num_heads * self.head_dim, qkv_bias, **kw)
        # out_features counts the replicas of kv heads, so that each rank's shard is its kv heads.
        self.k_proj = ColumnParallelLinear(hidden_size, world * self.kv_heads * self.head_dim, qkv_bias, **kw)
        self.v_proj = ColumnParallelLinear(hidden_size, world * self.kv_heads * self.head_dim, qkv_bias, **kw)
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden_size, o_proj_bias, **kw)

    @classmethod
    def from_dense(cls, *, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear,
                   num_heads: int, num_kv_heads: int, rope_theta: float = 10000.0,
                   sequence_parallel: bool = False) -> ParallelAttention:
        """This rank's shard of a dense attention given by its four projections."""
        if q_proj.out_features % num_heads:
            raise ValueError(f"ParallelAttention: q_proj.out_features={q_proj.out_features} is not divisible by "
                             f"num_heads={num_heads}")
        module = cls(q_proj.in_features, num_heads, num_kv_heads, q_proj.out_features // num_heads, rope_theta,
                     qkv_bias=q_proj.bias is not None, o_proj_bias=o_proj.bias is not None,
                     sequence_parallel=sequence_parallel, device="meta", dtype=q_proj.weight.dtype)
        dense = {"q_proj": q_proj, "k_proj": k_proj, "v_proj": v_proj, "o_proj": o_proj}
        return load_shards(module, shard_modules("self_attn", dense, "full", num_heads=num_heads,
                                                 num_kv_heads=num_kv_heads))
