"""How full (unsharded) weights are split across tensor-parallel ranks.

The layers' from_dense() and shard_state_dict() both split through these helpers, so that a layer
built from a dense module and a model loaded from a full state dict hold the same shards.
"""

from __future__ import annotations

import torch
from torch import nn

from symcomm import runtime

PLANS = ("full", "ffn_only")


def check_divisible(owner: str, what: str, size: int, world_size: int) -> None:
    if size % world_size:
        raise ValueError(f"{owner}: {what}={size} is not divisible by the tensor-parallel size {world_size}")


def split(t: torch.Tensor, dim: int, rank: int, world_size: int) -> torch.Tensor:
    """Rank `rank`'s contiguous 1/world_size of t along dim (a copy, so the shard owns its memory)."""
    size = t.shape[dim] // world_size
    return t.narrow(dim, rank * size, size).clone()


def load_shards(module: nn.Module, shards: dict[str, torch.Tensor | None]) -> nn.Module:
    """Makes the shards module's parameters (module may live on the meta device); None entries are
    absent parameters, such as a missing bias."""
    module.load_state_dict({k: v for k, v in shards.items() if v is not None}, assign=True)
    return module


def shard_modules(prefix: str, modules: dict[str, nn.Module], plan: str, **heads) -> dict[str, torch.Tensor]:
    """This rank's shards of the parameters of dense Llama sub-modules, split the way
    shard_state_dict splits them under `prefix` (e.g. "mlp" with {"gate_proj": linear, ...})."""
    full = {f"{prefix}.{name}.{p}": t.detach() for name, m in modules.items() for p, t in m.named_parameters()}
    shards = shard_state_dict(full, plan, runtime.rank(), runtime.world_size(), **heads)
    return {k.removeprefix(prefix + "."): v for k, v in shards.items()}


def kv_heads_of_rank(num_heads: int, num_kv_heads: int, rank: int, world_size: int) -> range:
    """The kv heads that rank's query heads read (grouped-query attention, query heads split evenly).

    With fewer kv heads than ranks, a kv head is replicated on every rank whose query heads use it.
    """
    check_divisible("ParallelAttention", "num_heads", num_heads, world_size)
    if num_heads % num_kv_heads:
        raise ValueError(f"ParallelAttention: num_heads={num_heads} is not divisible by num_kv_heads={num_kv_heads}")
    if num_kv_heads % world_size and world_size % num_kv_heads:
        raise ValueError(f"ParallelAttention: num_kv_heads={num_kv_heads} must divide or be divisible by the "
                         f"tensor-parallel size {world_size}")
    q_per_rank = num_heads // world_size
    group = num_heads // num_kv_heads
    first, last = rank * q_per_rank // group, ((rank + 1) * q_per_rank - 1) // group
    return range(first, last + 1)


def split_heads(t: torch.Tensor, heads: range, num_heads: int) -> torch.Tensor:
    """Rows (dim 0) of the given heads out of a [num_heads * head_dim, ...] projection weight or bias."""
    head_dim = t.shape[0] // num_heads
    return t[heads.start * head_dim:heads.stop * head_dim].clone()


# Parameter names of a Llama layout (Hugging Face naming), matched on the name's end, and how each is
# split. "column": output rows split; "row": input columns split; "q" / "kv": rows split by attention
# heads. Anything else is replicated: norms, and the biases of row-parallel layers (added once, after
# the reduction).
_ATTENTION = {
    "self_attn.q_proj.weight": "q", "self_attn.q_proj.bias": "q",
    "self_attn.k_proj.weight": "kv", "self_attn.k_proj.bias": "kv",
    "self_attn.v_proj.weight": "kv", "self_attn.v_proj.bias": "kv",
    "self_attn.o_proj.weight": "row",
}
_MLP = {
    "mlp.gate_proj.weight": "column", "mlp.gate_proj.bias": "column",
    "mlp.up_proj.weight": "column", "mlp.up_proj.bias": "column",
    "mlp.down_proj.weight": "row",
}
_VOCAB = {"embed_tokens.weight": "column", "lm_head.weight": "column", "lm_head.bias": "column"}
_RULES = {"full": {**_ATTENTION, **_MLP, **_VOCAB}, "ffn_only": _MLP}


def _rule(name: str, plan: str) -> str | None:
    for suffix, rule in _RULES[plan].items():
        if name == suffix or name.endswith("." + suffix):
            return rule
    return None


def shard_state_dict(state_dict: dict[str, torch.Tensor], plan: str, rank: int, world_size: int, *,
                     num_heads: int | None = None, num_kv_heads: int | None = None) -> dict[str, torch.Tensor]:
    """Rank `rank`'s shards of a full Llama-layout state dict (Hugging Face parameter names).

    plan: "full" (attention by heads, MLP, embedding and LM head by vocab) or "ffn_only" (only the
    MLP; attention and vocabulary replicated). The "full" plan splits attention by heads, so it needs
    num_heads and num_kv_heads. Replicated parameters (norms, row-parallel biases) are copied whole.
    """
    if plan not in PLANS:
        raise ValueError(f"shard_state_dict: plan must be one of {PLANS}, got {plan!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"shard_state_dict: rank={rank} is out of range for world_size={world_size}")
    if plan == "full" and (num_heads is None or num_kv_heads is None):
        raise ValueError("shard_state_dict: plan 'full' splits attention by heads; pass num_heads and num_kv_heads")
    out = {}
    for name, t in state_dict.items():
        rule = _rule(name, plan)
        if rule in ("column", "row"):
            dim = 0 if rule == "column" else 1
            check_divisible("shard_state_dict", f"{name}.shape[{dim}]", t.shape[dim], world_size)
            out[name] = split(t, dim, rank, world_size)
        elif rule == "q":
            # Whole heads per rank: the row split is a head split when the heads divide evenly.
            check_divisible("shard_state_dict", "num_heads", num_heads, world_size)
            out[name] = split(t, 0, rank, world_size)
        elif rule == "kv":
            out[name] = split_heads(t, kv_heads_of_rank(num_heads, num_kv_heads, rank, world_size), num_kv_heads)
        else:
            out[name] = t.clone()
    return out
