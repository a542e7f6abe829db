"""The tensor-parallel Llama against the dense reference, and shard_state_dict.

The model tests run on every rank (dist); the shard_state_dict tests are pure and run once, for
every rank of worlds 1, 2 and 4.
"""

import re

import pytest
import torch
import torch.nn.functional as F

import symcomm
from symcomm import nn as snn

F64 = torch.float64
# num_kv_heads=2 < 4 ranks: at world 4 each kv head is replicated on two ranks.
CONFIG = snn.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, rope_theta=1000.0)


def close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def dense_model(state_dict):
    model = snn.DenseLlama(CONFIG, dtype=F64)
    model.load_state_dict(state_dict)
    return model


@pytest.mark.dist
@pytest.mark.parametrize("plan,sequence_parallel", [("full", False), ("full", True), ("ffn_only", False)],
                         ids=["full", "full-sp", "ffn_only"])
def test_model_matches_dense(world, gen, plan, sequence_parallel):
    state = snn.random_state_dict(CONFIG, gen, F64)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=gen)
    grad = torch.randn(2, 8, CONFIG.vocab_size, generator=gen, dtype=F64)
    dense = dense_model(state)
    ref = dense(ids)
    ref.backward(grad)

    model = snn.ParallelLlama.from_state_dict(CONFIG, state, plan=plan, sequence_parallel=sequence_parallel)
    logits = model(ids)
    logits.backward(grad)
    close(logits, ref)
    # Every parameter's gradient is its shard of the dense one.
    dense_grads = {name: p.grad for name, p in dense.named_parameters()}
    expected = symcomm.shard_state_dict(dense_grads, plan, world.rank, world.world_size,
                                        num_heads=CONFIG.num_heads, num_kv_heads=CONFIG.num_kv_heads)
    for name, p in model.named_parameters():
        # Replicated kv heads hold part of their gradient on each rank (see test_parallel_attention).
        if plan == "full" and world.world_size > CONFIG.num_kv_heads and re.search(r"[kv]_proj", name):
            continue
        close(p.grad, expected[name])


@pytest.mark.dist
def test_sharded_logits_loss(world, gen):
    """The vocab-parallel loss over sharded logits equals the dense model's cross-entropy."""
    state = snn.random_state_dict(CONFIG, gen, F64)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=gen)
    ref = F.cross_entropy(dense_model(state)(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    model = snn.ParallelLlama.from_state_dict(CONFIG, state)
    logits = model(ids, gather_logits=False)
    assert logits.shape[-1] == CONFIG.vocab_size // world.world_size
    close(snn.vocab_parallel_cross_entropy(logits[:, :-1], ids[:, 1:]).mean(), ref)


@pytest.mark.dist
def test_model_positions_and_bad_sequence(world, gen):
    state = snn.random_state_dict(CONFIG, gen, F64)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 8), generator=gen)
    positions = torch.arange(8) + 5
    model = snn.ParallelLlama.from_state_dict(CONFIG, state, sequence_parallel=True)
    close(model(ids, positions), dense_model(state)(ids, positions))
    if world.world_size > 1:
        bad = f"sequence length 9 to be divisible by the tensor-parallel size {world.world_size}"
        with pytest.raises(ValueError, match=bad):
            model(ids[:, :1].repeat(1, 9))
    with pytest.raises(ValueError, match="sequence_parallel needs plan 'full'"):
        snn.ParallelLlama(CONFIG, plan="ffn_only", sequence_parallel=True)


# ---------------------------------------------------------------------------------------------
# shard_state_dict (pure; no communication)

# The dim along which the test expects each module's weight split ("kv": the rows of the kv heads
# that the rank's query heads read); anything else is replicated.
MLP_SPLITS = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}
FULL_SPLITS = {**MLP_SPLITS, "embed_tokens": 0, "lm_head": 0, "q_proj": 0, "k_proj": "kv", "v_proj": "kv", "o_proj": 1}


def expected_split(name, plan):
    splits = FULL_SPLITS if plan == "full" else MLP_SPLITS
    return next((how for module, how in splits.items() if f"{module}." in name), None)


def kv_rows(rank, world):
    """Weight rows of the kv heads read by rank's query heads."""
    group, head_dim = CONFIG.num_heads // CONFIG.num_kv_heads, CONFIG.hidden_size // CONFIG.num_heads
    q_heads = range(rank * CONFIG.num_heads // world, (rank + 1) * CONFIG.num_heads // world)
    heads = sorted({h // group for h in q_heads})
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("plan", ["full", "ffn_only"])
def test_shard_state_dict_round_trip(plan, world_size):
    state = snn.random_state_dict(CONFIG, torch.Generator().manual_seed(world_size), F64)
    shards = [symcomm.shard_state_dict(state, plan, r, world_size, num_heads=CONFIG.num_heads,
                                       num_kv_heads=CONFIG.num_kv_heads) for r in range(world_size)]
    for name, full in state.items():
        parts = [s[name] for s in shards]
        how = expected_split(name, plan)
        if how is None:
            for part in parts:
                assert torch.equal(part, full), name
        elif how == "kv":
            rebuilt = torch.full_like(full, float("nan"))
            for r, part in enumerate(parts):
                rows = kv_rows(r, world_size)
                rebuilt[rows] = part
                assert torch.equal(part, full[rows]), name
            assert torch.equal(rebuilt, full), name
        else:
            assert all(p.shape[how] == full.shape[how] // world_size for p in parts), name
            assert torch.equal(torch.cat(parts, how), full), name
    assert set(shards[0]) == set(state)


def test_shard_state_dict_errors():
    state = snn.random_state_dict(CONFIG, torch.Generator().manual_seed(0), F64)
    with pytest.raises(ValueError, match="plan must be one of"):
        symcomm.shard_state_dict(state, "attention", 0, 2)
    with pytest.raises(ValueError, match="pass num_heads and num_kv_heads"):
        symcomm.shard_state_dict(state, "full", 0, 2)
    with pytest.raises(ValueError, match="rank=2 is out of range for world_size=2"):
        symcomm.shard_state_dict(state, "ffn_only", 2, 2)
    with pytest.raises(ValueError, match=re.escape("model.layers.0.mlp.gate_proj.weight.shape[0]=64 is not divisible "
                                                   "by the tensor-parallel size 3")):
        symcomm.shard_state_dict(state, "ffn_only", 0, 3)
