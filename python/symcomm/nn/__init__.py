"""Tensor-parallel layers over torch.ops.symcomm: every rank of symcomm's world is one
tensor-parallel rank, and each layer's from_dense() takes the full (unsharded) module."""

from symcomm.nn.attention import Attention, KVCache, ParallelAttention
from symcomm.nn.comm import (
    copy_to_tp,
    gather_from_sp,
    gather_from_tp,
    reduce_from_tp,
    reduce_scatter_to_sp,
    scatter_to_tp,
)
from symcomm.nn.embedding import VocabParallelEmbedding, vocab_parallel_cross_entropy
from symcomm.nn.linear import ColumnParallelLinear, RowParallelLinear
from symcomm.nn.mlp import MLP, ParallelMLP
from symcomm.nn.model import (
    DecoderLayer,
    DenseLlama,
    LlamaConfig,
    ParallelDecoderLayer,
    ParallelLlama,
    choose_plan,
    random_state_dict,
)
from symcomm.nn.moe import ExpertParallelMoE, dense_moe
from symcomm.nn.norm import RMSNorm
from symcomm.nn.sharding import shard_state_dict

__all__ = [
    "Attention",
    "ColumnParallelLinear",
    "DecoderLayer",
    "DenseLlama",
    "ExpertParallelMoE",
    "KVCache",
    "LlamaConfig",
    "MLP",
    "ParallelAttention",
    "ParallelDecoderLayer",
    "ParallelLlama",
    "ParallelMLP",
    "RMSNorm",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "choose_plan",
    "copy_to_tp",
    "dense_moe",
    "gather_from_sp",
    "gather_from_tp",
    "random_state_dict",
    "reduce_from_tp",
    "reduce_scatter_to_sp",
    "scatter_to_tp",
    "shard_state_dict",
    "vocab_parallel_cross_entropy",
]
