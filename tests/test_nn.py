"""symcomm.nn layers at TP = world size against dense float64 references, forward and backward.

Every rank builds the same full weights, inputs and output gradients from `gen`, runs the dense
computation itself, and checks its own shard of the parallel layer's outputs and gradients.
"""

import math
import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from harness import assert_close
from symcomm import nn as snn

pytestmark = pytest.mark.dist

F64 = torch.float64


def close(out, ref):
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def randn(gen, *shape):
    return torch.randn(shape, generator=gen, dtype=F64)


def block(t, dim, rank, world):
    """rank's contiguous block of t along dim."""
    return t.chunk(world, dim)[rank]


def dense_linear(gen, in_features, out_features, bias):
    linear = nn.Linear(in_features, out_features, bias=bias, dtype=F64)
    with torch.no_grad():
        for p in linear.parameters():
            p.copy_(randn(gen, *p.shape) / math.sqrt(in_features))
    return linear


def run(module, x, grad):
    """Output and input gradient of module(x) backpropagating grad."""
    x = x.detach().clone().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad


class CommCalls(TorchDispatchMode):
    """Records the torch.ops.symcomm ops called inside the block."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "symcomm":
            self.names.append(func._opname)
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------------
# Communication functions


def test_comm_functions(world, gen):
    r, n = world.rank, world.world_size
    xs = [randn(gen, 4 * n, 3 * n) for _ in range(n)]  # rank i's input
    gs = [randn(gen, 4 * n, 3 * n) for _ in range(n)]  # rank i's gradient of the output

    def check(fn, x, out_ref, grad, grad_ref):
        out, x_grad = run(fn, x, grad)
        close(out, out_ref)
        close(x_grad, grad_ref)

    # Replicated input, rank-local consumers: the gradient is the sum of theirs.
    check(snn.copy_to_tp, xs[0], xs[0], gs[r], sum(gs))
    check(snn.reduce_from_tp, xs[r], sum(xs), gs[0], gs[0])
    check(snn.gather_from_tp, xs[r], torch.cat(xs, -1), torch.cat(gs, -1), gs[r])
    check(snn.scatter_to_tp, xs[0], block(xs[0], -1, r, n), block(gs[r], -1, r, n),
          torch.cat([block(g, -1, i, n) for i, g in enumerate(gs)], -1))
    check(snn.gather_from_sp, xs[r], torch.cat(xs, 0), torch.cat(gs, 0) * (r + 1),
          sum(block(torch.cat(gs, 0) * (i + 1), 0, r, n) for i in range(n)))
    check(snn.reduce_scatter_to_sp, xs[r], block(sum(xs), 0, r, n), block(gs[0], 0, r, n), gs[0])


# ---------------------------------------------------------------------------------------------
# Linear layers


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("gather_output", [False, True], ids=["sharded", "gathered"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_column_parallel_linear(world, gen, bias, gather_output, sequence_parallel):
    r, n = world.rank, world.world_size
    dense = dense_linear(gen, 12, 8, bias)
    x = randn(gen, 4, 3, 12)  # sequence-first [S, B, in] when sequence parallel
    grad = randn(gen, 4, 3, 8)
    ref, ref_x_grad = run(dense, x, grad)

    layer = snn.ColumnParallelLinear.from_dense(dense, gather_output=gather_output, sequence_parallel=sequence_parallel)
    x_local = block(x, 0, r, n) if sequence_parallel else x
    grad_local = grad if gather_output else block(grad, -1, r, n)
    out, x_grad = run(layer, x_local, grad_local)

    close(out, ref if gather_output else block(ref, -1, r, n))
    close(x_grad, block(ref_x_grad, 0, r, n) if sequence_parallel else ref_x_grad)
    close(layer.weight.grad, block(dense.weight.grad, 0, r, n))
    if bias:
        close(layer.bias.grad, block(dense.bias.grad, 0, r, n))


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("input_is_parallel", [True, False], ids=["parallel_in", "full_in"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_row_parallel_linear(world, gen, bias, input_is_parallel, sequence_parallel):
    r, n = world.rank, world.world_size
    dense = dense_linear(gen, 12, 8, bias)
    x = randn(gen, 4, 3, 12)
    grad = randn(gen, 4, 3, 8)
    ref, ref_x_grad = run(dense, x, grad)

    layer = snn.RowParallelLinear.from_dense(dense, input_is_parallel=input_is_parallel,
                                             sequence_parallel=sequence_parallel)
    x_local = block(x, -1, r, n) if input_is_parallel else x
    grad_local = block(grad, 0, r, n) if sequence_parallel else grad
    out, x_grad = run(layer, x_local, grad_local)

    close(out, block(ref, 0, r, n) if sequence_parallel else ref)
    close(x_grad, block(ref_x_grad, -1, r, n) if input_is_parallel else ref_x_grad)
    close(layer.weight.grad, block(dense.weight.grad, 1, r, n))
    if bias:
        close(layer.bias.grad, dense.bias.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_low_precision(world, gen, dtype):
    """Other float dtypes run through the same ops; checked against float64 at their precision."""
    column, row = dense_linear(gen, 16, 8, True), dense_linear(gen, 8, 16, True)
    x = randn(gen, 2, 5, 16)
    ref = row(column(x)).detach()
    layers = snn.ColumnParallelLinear.from_dense(column.to(dtype)), snn.RowParallelLinear.from_dense(row.to(dtype))
    out = layers[1](layers[0](x.to(dtype)))
    assert out.dtype == dtype
    assert_close(out.detach(), ref)


# ---------------------------------------------------------------------------------------------
# MLP, attention, embedding, norm, cross-entropy


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
def test_parallel_mlp(world, gen, sequence_parallel):
    r, n = world.rank, world.world_size
    gate, up, down = dense_linear(gen, 8, 16, False), dense_linear(gen, 8, 16, False), dense_linear(gen, 16, 8, False)
    x, grad = randn(gen, 4, 3, 8), randn(gen, 4, 3, 8)
    ref, ref_x_grad = run(lambda t: down(F.silu(gate(t)) * up(t)), x, grad)

    mlp = snn.ParallelMLP.from_dense(gate_proj=gate, up_proj=up, down_proj=down, sequence_parallel=sequence_parallel)
    local = (lambda t: block(t, 0, r, n)) if sequence_parallel else (lambda t: t)
    with CommCalls() as calls:
        out = mlp(local(x).requires_grad_())
    # One reduction per MLP: the activations between the projections stay sharded.
    assert calls.names == (["all_gather_gemm"] * 2 + ["gemm_reduce_scatter"] if sequence_parallel
                           else ["gemm_all_reduce"])
    out, x_grad = run(mlp, local(x), local(grad))
    close(out, local(ref))
    close(x_grad, local(ref_x_grad))
    close(mlp.gate_proj.weight.grad, block(gate.weight.grad, 0, r, n))
    close(mlp.up_proj.weight.grad, block(up.weight.grad, 0, r, n))
    close(mlp.down_proj.weight.grad, block(down.weight.grad, 1, r, n))


def reference_attention(x, q_proj, k_proj, v_proj, o_proj, num_heads, num_kv_heads, theta, positions):
    """Causal GQA attention with rotary embeddings, written out: explicit scores and mask, and the
    rotation as complex multiplication of the pairs (x[i], x[i + D/2])."""
    b, s, _ = x.shape
    d = q_proj.out_features // num_heads
    q = q_proj(x).view(b, s, num_heads, d)
    k = k_proj(x).view(b, s, num_kv_heads, d)
    v = v_proj(x).view(b, s, num_kv_heads, d)
    freqs = theta ** (-2 * torch.arange(d // 2, dtype=F64) / d)
    rotation = torch.polar(torch.ones(s, d // 2, dtype=F64), positions.double()[:, None] * freqs)[:, None, :]

    def rotate(t):
        z = torch.complex(t[..., :d // 2], t[..., d // 2:]) * rotation
        return torch.cat((z.real, z.imag), -1)

    q, k = rotate(q), rotate(k)
    kv_of = torch.arange(num_heads) // (num_heads // num_kv_heads)
    scores = torch.einsum("bihd,bjhd->bhij", q, k[:, :, kv_of]) / math.sqrt(d)
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    out = torch.einsum("bhij,bjhd->bihd", probs, v[:, :, kv_of]).reshape(b, s, num_heads * d)
    return o_proj(out)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("qkv_bias,o_proj_bias", [(False, False), (True, False), (True, True)],
                         ids=["nobias", "qkv_bias", "bias"])
def test_parallel_attention(world, gen, qkv_bias, o_proj_bias, heads, sequence_parallel):
    r, n = world.rank, world.world_size
    num_heads, num_kv_heads = heads
    hidden, head_dim, theta = 16, 8, 500.0
    q_proj = dense_linear(gen, hidden, num_heads * head_dim, qkv_bias)
    k_proj, v_proj = (dense_linear(gen, hidden, num_kv_heads * head_dim, qkv_bias) for _ in range(2))
    o_proj = dense_linear(gen, num_heads * head_dim, hidden, o_proj_bias)
    b, s = 2, 8
    x, grad = randn(gen, b, s, hidden), randn(gen, b, s, hidden)
    positions = torch.arange(s) + 3  # not from 0: positions must reach the rotation

    projections = dict(q_proj=q_proj, k_proj=k_proj, v_proj=v_proj, o_proj=o_proj)
    ref, ref_x_grad = run(lambda t: reference_attention(t, **projections, num_heads=num_heads,
                                                        num_kv_heads=num_kv_heads, theta=theta, positions=positions),
                          x, grad)
    dense = snn.Attention(hidden, num_heads, num_kv_heads, head_dim, theta, qkv_bias, o_proj_bias, dtype=F64)
    dense.load_state_dict({f"{k}.{name}": p for k, m in projections.items() for name, p in m.named_parameters()})
    close(dense(x, positions), ref)

    attn = snn.ParallelAttention.from_dense(**projections, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                            rope_theta=theta, sequence_parallel=sequence_parallel)
    if sequence_parallel:  # sequence-first, this rank's block of the sequence
        local = lambda t: block(t.transpose(0, 1), 0, r, n)  # noqa: E731
    else:
        local = lambda t: t  # noqa: E731
    out, x_grad = run(lambda t: attn(t, positions), local(x), local(grad))
    close(out, local(ref))
    close(x_grad, local(ref_x_grad))
    close(attn.q_proj.weight.grad, block(q_proj.weight.grad, 0, r, n))
    close(attn.o_proj.weight.grad, block(o_proj.weight.grad, 1, r, n))
    if qkv_bias:
        close(attn.q_proj.bias.grad, block(q_proj.bias.grad, 0, r, n))
    if o_proj_bias:  # replicated, added once after the reduction
        close(attn.o_proj.bias.grad, o_proj.bias.grad)
    # A kv head shared by several ranks gets a part of its gradient on each: their sum is the dense one.
    group = num_heads // num_kv_heads
    kv_grads = [(p.grad, getattr(projections[proj], name).grad)
                for proj in ("k_proj", "v_proj") for name, p in getattr(attn, proj).named_parameters()]
    for mine, full in kv_grads:
        every = [torch.empty_like(mine) for _ in range(n)]
        dist.all_gather(every, mine)
        total = torch.zeros_like(full)
        for rank, g in enumerate(every):
            kv_heads = sorted({h // group for h in range(rank * num_heads // n, (rank + 1) * num_heads // n)})
            rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in kv_heads])
            total.index_add_(0, rows, g)
        close(total, full)


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
def test_vocab_parallel_embedding(world, gen, sequence_parallel):
    r, n = world.rank, world.world_size
    dense = nn.Embedding(32, 6, dtype=F64)
    with torch.no_grad():
        dense.weight.copy_(randn(gen, 32, 6))
    ids = torch.randint(0, 32, (8, 3), generator=gen)  # sequence-first [S, B]
    ids[0, 0], ids[-1, -1] = 0, 31  # both ends of the vocabulary
    grad = randn(gen, 8, 3, 6)
    ref = dense(ids)
    ref.backward(grad)

    emb = snn.VocabParallelEmbedding.from_dense(dense, sequence_parallel=sequence_parallel)
    local = (lambda t: block(t, 0, r, n)) if sequence_parallel else (lambda t: t)
    out = emb(ids)
    out.backward(local(grad))
    close(out, local(ref.detach()))
    close(emb.weight.grad, block(dense.weight.grad, 0, r, n))


def test_vocab_parallel_cross_entropy(world, gen):
    r, n = world.rank, world.world_size
    logits = randn(gen, 2, 5, 32) * 3
    targets = torch.randint(0, 32, (2, 5), generator=gen)
    grad = randn(gen, 2, 5)
    ref, ref_grad = run(lambda t: F.cross_entropy(t.flatten(0, 1), targets.flatten(), reduction="none").view(2, 5),
                        logits, grad)
    out, logits_grad = run(lambda t: snn.vocab_parallel_cross_entropy(t, targets), block(logits, -1, r, n), grad)
    close(out, ref)
    close(logits_grad, block(ref_grad, -1, r, n))


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp", "sp"])
def test_rmsnorm(world, gen, sequence_parallel):
    r, n = world.rank, world.world_size
    weight = 1 + randn(gen, 6)
    x, grad = randn(gen, 8, 3, 6), randn(gen, 8, 3, 6)
    w_ref = weight.clone().requires_grad_()
    ref, ref_x_grad = run(lambda t: t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w_ref, x, grad)

    norm = snn.RMSNorm(6, eps=1e-5, sequence_parallel=sequence_parallel, dtype=F64)
    with torch.no_grad():
        norm.weight.copy_(weight)
    local = (lambda t: block(t, 0, r, n)) if sequence_parallel else (lambda t: t)
    out, x_grad = run(norm, local(x), local(grad))
    close(out, local(ref))
    close(x_grad, local(ref_x_grad))
    # Replicated weight: its gradient covers every rank's tokens.
    close(norm.weight.grad, w_ref.grad)


# ---------------------------------------------------------------------------------------------
# Sizes that do not divide


def test_sizes_not_divisible(world):
    n = world.world_size
    if n == 1:
        pytest.skip("every size divides a tensor-parallel size of 1")
    odd = 2 * n + 1
    cases = [
        (lambda: snn.ColumnParallelLinear(8, odd), f"ColumnParallelLinear: out_features={odd} is not divisible"),
        (lambda: snn.ColumnParallelLinear.from_dense(nn.Linear(8, odd)),
         f"ColumnParallelLinear: out_features={odd} is not divisible"),
        (lambda: snn.RowParallelLinear(odd, 8), f"RowParallelLinear: in_features={odd} is not divisible"),
        (lambda: snn.RowParallelLinear.from_dense(nn.Linear(odd, 8)),
         f"RowParallelLinear: in_features={odd} is not divisible"),
        (lambda: snn.VocabParallelEmbedding(odd, 8), f"VocabParallelEmbedding: num_embeddings={odd} is not divisible"),
        (lambda: snn.ParallelAttention(8 * odd, odd, 1), f"ParallelAttention: num_heads={odd} is not divisible"),
        (lambda: snn.ParallelAttention(96, 12, 3),
         "ParallelAttention: num_kv_heads=3 must divide or be divisible"),
        (lambda: snn.ParallelMLP(8, odd), f"ColumnParallelLinear: out_features={odd} is not divisible"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=re.escape(f"{message} by the tensor-parallel size {n}")):
            make()
    with pytest.raises(ValueError, match=re.escape(f"x.shape[0] divisible by {n}, got shape ({odd}, {8 // n})")):
        snn.RowParallelLinear(8, 8, sequence_parallel=True)(torch.ones(odd, 8 // n))
