"""A small Llama-style causal language model: the dense single-process reference and its
tensor-parallel counterpart. Both use Hugging Face Llama parameter names (model.embed_tokens.weight,
model.layers.0.self_attn.q_proj.weight, ..., model.norm.weight, lm_head.weight), so one full state
dict loads into either."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from symcomm import runtime
from symcomm.nn import comm
from symcomm.nn.attention import Attention, KVCache, ParallelAttention
from symcomm.nn.embedding import VocabParallelEmbedding
from symcomm.nn.linear import ColumnParallelLinear
from symcomm.nn.mlp import MLP, ParallelMLP
from symcomm.nn.norm import RMSNorm
from symcomm.nn.sharding import PLANS, check_divisible, kv_heads_of_rank, load_shards, shard_state_dict


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    # Attention biases (see Attention): Qwen2 has qkv_bias only; Llama's attention_bias sets both.
    qkv_bias: bool = False
    o_proj_bias: bool = False

    @classmethod
    def from_hf(cls, config) -> LlamaConfig:
        """The config of a Hugging Face Llama-architecture model (transformers' LlamaConfig, or any
        object with its attributes); raises ValueError for what these modules do not compute."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        # transformers 5 keeps rope settings in rope_parameters; 4.x had rope_theta and rope_scaling.
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        unsupported = {
            "hidden_act": (getattr(config, "hidden_act", "silu"), "silu"),
            "head_dim": (head_dim, config.hidden_size // config.num_attention_heads),
            "rope type": (rope.get("rope_type", rope.get("type", "default")), "default"),
            "mlp_bias": (getattr(config, "mlp_bias", False), False),
        }
        for what, (got, supported) in unsupported.items():
            if got != supported:
                raise ValueError(f"LlamaConfig.from_hf: {what}={got!r} is not supported (only {supported!r})")
        bias = getattr(config, "attention_bias", False)
        return cls(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                   num_heads=config.num_attention_heads,
                   num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                   rope_theta=rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)),
                   rms_norm_eps=config.rms_norm_eps, qkv_bias=bias, o_proj_bias=bias)


def _attention_args(c: LlamaConfig) -> dict:
    return dict(rope_theta=c.rope_theta, qkv_bias=c.qkv_bias, o_proj_bias=c.o_proj_bias)


class _DecoderLayer(nn.Module):
    """Pre-norm residual block: h + attn(norm(h)), then h + mlp(norm(h))."""

    def forward(self, h: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), positions, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderLayer(_DecoderLayer):
    """Dense Llama decoder layer on [B, S, hidden]."""

    def __init__(self, config: LlamaConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        c, kw = config, dict(device=device, dtype=dtype)
        self.self_attn = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, **_attention_args(c), **kw)
        self.mlp = MLP(c.hidden_size, c.intermediate_size, **kw)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **kw)


class ParallelDecoderLayer(_DecoderLayer):
    """Tensor-parallel Llama decoder layer: a reduction after attention and one after the MLP.

    plan "full" splits attention by heads and the MLP; "ffn_only" replicates attention. With
    sequence_parallel=True (plan "full" only) the residual stream is sequence-first and split along
    the sequence, [S / N, B, hidden], and the norms run on each rank's tokens only.
    """

    def __init__(self, config: LlamaConfig, plan: str = "full", sequence_parallel: bool = False, *,
                 device=None, dtype=None) -> None:
        super().__init__()
        _check_plan(plan, sequence_parallel)
        c, kw = config, dict(device=device, dtype=dtype)
        sp = dict(sequence_parallel=sequence_parallel, **kw)
        if plan == "full":
            attention = ParallelAttention(c.hidden_size, c.num_heads, c.num_kv_heads, **_attention_args(c), **sp)
        else:
            attention = Attention(c.hidden_size, c.num_heads, c.num_kv_heads, **_attention_args(c), **kw)
        self.self_attn = attention
        self.mlp = ParallelMLP(c.hidden_size, c.intermediate_size, **sp)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **sp)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, **sp)


def _check_plan(plan: str, sequence_parallel: bool) -> None:
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {PLANS}, got {plan!r}")
    if sequence_parallel and plan != "full":
        raise ValueError(f"sequence_parallel needs plan 'full' (activations split by tokens between "
                         f"sharded blocks), got plan {plan!r}")


class _CausalLM(nn.Module):
    """Embedding, decoder layers, final norm, LM head; `model.` prefixes the body like Hugging Face."""

    sequence_parallel = False

    def __init__(self, config: LlamaConfig, embed_tokens: nn.Module, layers: list[nn.Module], norm: nn.Module,
                 lm_head: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens, self.model.layers, self.model.norm = embed_tokens, nn.ModuleList(layers), norm
        self.lm_head = lm_head

    def new_cache(self, batch: int, capacity: int) -> list[KVCache]:
        """An empty KV cache, one per layer, for `batch` sequences of up to `capacity` tokens; pass it
        to forward with each step's positions (prefill: 0..S-1, then one token at a time)."""
        return [layer.self_attn.new_cache(batch, capacity) for layer in self.model.layers]

    def _logits(self, ids: torch.Tensor, positions: torch.Tensor | None,
                cache: list[KVCache] | None) -> torch.Tensor:
        seq_first = self.sequence_parallel
        if cache is not None and len(cache) != len(self.model.layers):
            raise ValueError(f"{type(self).__name__}: cache has {len(cache)} layers, the model "
                             f"{len(self.model.layers)} (make it with new_cache)")
        h = self.model.embed_tokens(ids.t() if seq_first else ids)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, positions, None if cache is None else cache[i])
        logits = self.lm_head(self.model.norm(h))
        return logits.transpose(0, 1) if seq_first else logits


class DenseLlama(_CausalLM):
    """The dense, single-process Llama reference: forward(ids [B, S]) -> logits [B, S, vocab]; with a
    cache (new_cache), decoding as ParallelLlama does."""

    def __init__(self, config: LlamaConfig, *, device=None, dtype=None) -> None:
        c, kw = config, dict(device=device, dtype=dtype)
        super().__init__(c, nn.Embedding(c.vocab_size, c.hidden_size, **kw),
                         [DecoderLayer(c, **kw) for _ in range(c.num_layers)],
                         RMSNorm(c.hidden_size, c.rms_norm_eps, **kw),
                         nn.Linear(c.hidden_size, c.vocab_size, bias=False, **kw))

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: list[KVCache] | None = None) -> torch.Tensor:
        return self._logits(ids, positions, cache)


class ParallelLlama(_CausalLM):
    """The tensor-parallel Llama over every rank of symcomm's world.

    plan "full" splits attention, MLP, embedding and LM head (by vocabulary); "ffn_only" splits
    only the MLPs. sequence_parallel=True (plan "full") splits the activations between blocks along
    the sequence, which must then be divisible by the world size. Build it with from_state_dict.
    """

    def __init__(self, config: LlamaConfig, plan: str = "full", sequence_parallel: bool = False, *,
                 device=None, dtype=None) -> None:
        _check_plan(plan, sequence_parallel)
        c, kw = config, dict(device=device, dtype=dtype)
        sp = dict(sequence_parallel=sequence_parallel, **kw)
        if plan == "full":
            embed = VocabParallelEmbedding(c.vocab_size, c.hidden_size, **sp)
            lm_head = ColumnParallelLinear(c.hidden_size, c.vocab_size, bias=False, **sp)
        else:
            embed = nn.Embedding(c.vocab_size, c.hidden_size, **kw)
            lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, **kw)
        super().__init__(c, embed, [ParallelDecoderLayer(c, plan, **sp) for _ in range(c.num_layers)],
                         RMSNorm(c.hidden_size, c.rms_norm_eps, **sp), lm_head)
        self.plan, self.sequence_parallel = plan, sequence_parallel

    @classmethod
    def from_state_dict(cls, config: LlamaConfig, state_dict: dict[str, torch.Tensor], plan: str = "full",
                        sequence_parallel: bool = False) -> ParallelLlama:
        """This rank's shard of the model with the given full (unsharded) state dict."""
        dtype = state_dict["lm_head.weight"].dtype
        module = cls(config, plan, sequence_parallel, device="meta", dtype=dtype)
        shards = shard_state_dict(state_dict, plan, runtime.rank(), runtime.world_size(),
                                  num_heads=config.num_heads, num_kv_heads=config.num_kv_heads)
        return load_shards(module, shards)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor | None = None, gather_logits: bool = True,
                cache: list[KVCache] | None = None) -> torch.Tensor:
        """Logits [B, S, vocab] of ids [B, S], equal on every rank; with gather_logits=False and plan
        "full", this rank's vocabulary shard [B, S, vocab / N] (for vocab_parallel_cross_entropy).

        With a cache (new_cache: each rank holds the keys and values of its own kv heads), ids are the
        new tokens at positions [S] (default 0..S-1, a prefill), e.g. one token per decode step."""
        world = runtime.world_size()
        if self.sequence_parallel and ids.shape[-1] % world:
            raise ValueError(f"ParallelLlama: sequence_parallel needs the sequence length {ids.shape[-1]} to be "
                             f"divisible by the tensor-parallel size {world}")
        logits = self._logits(ids, positions, cache)
        return comm.gather_from_tp(logits) if self.plan == "full" and gather_logits else logits


def choose_plan(config: LlamaConfig, world_size: int) -> tuple[str, str]:
    """The plan that splits the most of config over world_size ranks, and why not "full" if it is
    not: "full" where the heads, the vocabulary and the MLP split, else "ffn_only" (attention and
    vocabulary replicated) where the MLP does; ValueError if neither."""
    try:
        kv_heads_of_rank(config.num_heads, config.num_kv_heads, 0, world_size)
        check_divisible("ParallelLlama", "vocab_size", config.vocab_size, world_size)
    except ValueError as e:
        why = str(e)
    else:
        why = ""
    check_divisible("ParallelLlama", "intermediate_size", config.intermediate_size, world_size)
    return ("ffn_only", why) if why else ("full", "")


def random_state_dict(config: LlamaConfig, generator: torch.Generator,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A full Llama state dict of random weights, scaled so that activations stay O(1)."""
    out = {}
    for name, p in DenseLlama(config, device="meta").state_dict().items():
        if name.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
        elif name.endswith("embed_tokens.weight"):
            t = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(p.shape, generator=generator, dtype=torch.float64)
        else:
            t = torch.randn(p.shape, generator=generator, dtype=torch.float64) / p.shape[1] ** 0.5
        out[name] = t.to(dtype)
    return out
