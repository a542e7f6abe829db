"""The tensor-parallel Llama against the dense reference, decode through the KV cache, shards that
own their memory, and shard_state_dict.

The model tests run on every rank (dist); the shard_state_dict tests are pure and run once, for
every rank of worlds 1, 2 and 4.
"""

import dataclasses
import re

import pytest
import torch
import torch.nn.functional as F

import symcomm
from symcomm import nn as snn
from symcomm.nn.sharding import kv_heads_of_rank

F64 = torch.float64
# num_kv_heads=2 < 4 ranks: at world 4 each kv head is replicated on two ranks.
CONFIG = snn.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, rope_theta=1000.0)
QWEN2_CONFIG = dataclasses.replace(CONFIG, qkv_bias=True)  # Qwen2's attention: no bias on o_proj
BIAS_CONFIG = dataclasses.replace(CONFIG, qkv_bias=True, o_proj_bias=True)


def close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def dense_model(state_dict, config=CONFIG):
    model = snn.DenseLlama(config, dtype=F64)
    model.load_state_dict(state_dict)
    return model


@pytest.mark.dist
@pytest.mark.parametrize("plan,sequence_parallel", [("full", False), ("full", True), ("ffn_only", False)],
                         ids=["full", "full-sp", "ffn_only"])
@pytest.mark.parametrize("config", [CONFIG, QWEN2_CONFIG], ids=["nobias", "qkv_bias"])
def test_model_matches_dense(world, gen, config, plan, sequence_parallel):
    state = snn.random_state_dict(config, gen, F64)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=gen)
    grad = torch.randn(2, 8, config.vocab_size, generator=gen, dtype=F64)
    dense = dense_model(state, config)
    ref = dense(ids)
    ref.backward(grad)

    model = snn.ParallelLlama.from_state_dict(config, state, plan=plan, sequence_parallel=sequence_parallel)
    logits = model(ids)
    logits.backward(grad)
    close(logits, ref)
    # Every parameter's gradient is its shard of the dense one.
    dense_grads = {name: p.grad for name, p in dense.named_parameters()}
    expected = symcomm.shard_state_dict(dense_grads, plan, world.rank, world.world_size,
                                        num_heads=config.num_heads, num_kv_heads=config.num_kv_heads)
    for name, p in model.named_parameters():
        # Replicated kv heads hold part of their gradient on each rank (see test_parallel_attention).
        if plan == "full" and world.world_size > config.num_kv_heads and re.search(r"[kv]_proj", name):
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


def cached_decode(model, ids, prefill, cache):
    """Logits of ids [B, T]: a prefill of its first `prefill` tokens into cache, then one token per step."""
    out = [model(ids[:, :prefill], cache=cache)]
    for t in range(prefill, ids.shape[1]):
        out.append(model(ids[:, t:t + 1], torch.tensor([t], device=ids.device), cache=cache))
    return torch.cat(out, 1)


@pytest.mark.dist
@pytest.mark.parametrize("plan", ["dense", "full", "ffn_only"])
def test_cached_decode_matches_forward(world, gen, plan):
    """Prefill then one token per step through the KV cache gives the uncached forward's logits, also
    with a cache holding a longer, different sequence from before (its stale positions are masked)."""
    state = snn.random_state_dict(BIAS_CONFIG, gen, F64)
    if plan == "dense":
        model = dense_model(state, BIAS_CONFIG)
    else:
        model = snn.ParallelLlama.from_state_dict(BIAS_CONFIG, state, plan=plan)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 11), generator=gen)
    ref = dense_model(state, BIAS_CONFIG)(ids)
    cache = model.new_cache(2, 16)
    kv_heads = BIAS_CONFIG.num_kv_heads
    if plan == "full":
        kv_heads = len(kv_heads_of_rank(CONFIG.num_heads, kv_heads, world.rank, world.world_size))
    assert [c.k.shape for c in cache] == [(2, 16, kv_heads, CONFIG.hidden_size // CONFIG.num_heads)] * CONFIG.num_layers
    model(torch.randint(0, CONFIG.vocab_size, (2, 16), generator=gen), cache=cache)
    for prefill in (7, 1):
        close(cached_decode(model, ids, prefill, cache), ref)


@pytest.mark.dist
def test_cache_errors(world, gen):
    model = snn.ParallelLlama.from_state_dict(CONFIG, snn.random_state_dict(CONFIG, gen, F64))
    cache = model.new_cache(2, 8)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 1), generator=gen)
    with pytest.raises(ValueError, match=re.escape("positions must lie in [0, 8) (the cache's capacity), got [8]")):
        model(ids, torch.tensor([8]), cache=cache)
    with pytest.raises(ValueError, match=re.escape("positions must be 1-D [S]")):
        model(ids, torch.tensor([[3], [4]]), cache=cache)
    with pytest.raises(ValueError, match=re.escape("do not fit a cache of shape (2, 8")):
        model(ids[:1], torch.tensor([3]), cache=cache)
    with pytest.raises(ValueError, match="cache has 1 layers, the model 2"):
        model(ids, torch.tensor([3]), cache=cache[:1])


@pytest.mark.dist
@pytest.mark.gpu
@pytest.mark.real_gpu("CUDA graphs")
def test_cached_decode_step_in_a_cuda_graph(world, gen):
    """One decode step (the symcomm ops inside) captured once and replayed at later positions."""
    state = {k: v.float().to(world.device) for k, v in snn.random_state_dict(CONFIG, gen).items()}
    model = snn.ParallelLlama.from_state_dict(CONFIG, state)
    ids = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=gen).to(world.device)
    ref = model(ids)
    cache = model.new_cache(2, 16)
    model(ids[:, :8], cache=cache)
    token, position = ids[:, 8:9].clone(), torch.tensor([8], device=world.device)
    stream = torch.cuda.Stream(world.device)
    stream.wait_stream(torch.cuda.current_stream(world.device))
    with torch.cuda.stream(stream):
        model(token, position, cache=cache)  # warm up outside the capture
    torch.cuda.current_stream(world.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = model(token, position, cache=cache)
    for t in range(8, 12):
        token.copy_(ids[:, t:t + 1])
        position.fill_(t)
        graph.replay()
        torch.testing.assert_close(logits[:, 0], ref[:, t], rtol=1e-4, atol=1e-4)


def assert_copy(shard, full, name):
    """shard owns storage of its own size, so that it does not keep the full tensor alive."""
    storage = shard.untyped_storage()
    assert storage.data_ptr() != full.untyped_storage().data_ptr(), f"{name} is a view of the full tensor"
    assert storage.nbytes() == shard.numel() * shard.element_size(), f"{name}'s storage is not its own size"


@pytest.mark.dist
@pytest.mark.parametrize("source", ["from_dense", "from_state_dict"])
def test_shards_are_copies(world, gen, source):
    """Every kind of shard, from either loader: column, row, vocabulary, q and kv heads (replicated
    at world 4), split and replicated biases, norms."""
    state = snn.random_state_dict(BIAS_CONFIG, gen, F64)
    if source == "from_state_dict":
        full = state
        shards = list(snn.ParallelLlama.from_state_dict(BIAS_CONFIG, state).named_parameters())
    else:
        dense = dense_model(state, BIAS_CONFIG)
        full = dict(dense.named_parameters())
        attn, mlp = dense.model.layers[0].self_attn, dense.model.layers[0].mlp
        heads = dict(num_heads=BIAS_CONFIG.num_heads, num_kv_heads=BIAS_CONFIG.num_kv_heads)
        layers = [
            ("model.embed_tokens", snn.VocabParallelEmbedding.from_dense(dense.model.embed_tokens)),
            ("model.layers.0.self_attn", snn.ParallelAttention.from_dense(**dict(attn.named_children()), **heads)),
            ("model.layers.0.mlp", snn.ParallelMLP.from_dense(**dict(mlp.named_children()))),
            # The linear layers' own from_dense shards a bias too: split (column) or replicated (row).
            ("model.layers.0.self_attn.q_proj", snn.ColumnParallelLinear.from_dense(attn.q_proj)),
            ("model.layers.0.self_attn.o_proj", snn.RowParallelLinear.from_dense(attn.o_proj)),
        ]
        shards = [(f"{prefix}.{name}", p) for prefix, layer in layers for name, p in layer.named_parameters()]
    for name, shard in shards:
        assert_copy(shard, full[name], name)


# ---------------------------------------------------------------------------------------------
# shard_state_dict (pure; no communication)

# The dim along which the test expects each module's weight split ("kv": the rows of the kv heads
# that the rank's query heads read); anything else is replicated.
MLP_SPLITS = {"gate_proj": 0, "up_proj": 0, "down_proj": 1}
FULL_SPLITS = {**MLP_SPLITS, "embed_tokens": 0, "lm_head": 0, "q_proj": 0, "k_proj": "kv", "v_proj": "kv", "o_proj": 1}


def expected_split(name, plan):
    splits = FULL_SPLITS if plan == "full" else MLP_SPLITS
    how = next((how for module, how in splits.items() if f"{module}." in name), None)
    # A row-split layer's bias is replicated: added once, after the reduction.
    return None if how == 1 and name.endswith(".bias") else how


def kv_rows(rank, world):
    """Weight rows of the kv heads read by rank's query heads."""
    group, head_dim = CONFIG.num_heads // CONFIG.num_kv_heads, CONFIG.hidden_size // CONFIG.num_heads
    q_heads = range(rank * CONFIG.num_heads // world, (rank + 1) * CONFIG.num_heads // world)
    heads = sorted({h // group for h in q_heads})
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


@pytest.mark.parametrize("world_size", [1, 2, 4])
@pytest.mark.parametrize("plan", ["full", "ffn_only"])
@pytest.mark.parametrize("config", [CONFIG, QWEN2_CONFIG, BIAS_CONFIG], ids=["nobias", "qkv_bias", "bias"])
def test_shard_state_dict_round_trip(gen, config, plan, world_size):
    state = snn.random_state_dict(config, gen, F64)
    shards = [symcomm.shard_state_dict(state, plan, r, world_size, num_heads=config.num_heads,
                                       num_kv_heads=config.num_kv_heads) for r in range(world_size)]
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
