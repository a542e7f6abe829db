"""MoE dispatch and combine (the contract in docs/moe.md) and ExpertParallelMoE.

Every rank builds every rank's tokens and expert choices from `gen`, with token counts that differ
across ranks, and computes the expected slots, counts and outputs itself, pair by pair.
"""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness import LAYER_TOLERANCE, assert_close
from symcomm import runtime
from symcomm.nn import ExpertParallelMoE, dense_moe

pytestmark = pytest.mark.dist

ops = torch.ops.symcomm
F64 = torch.float64
E, K, H = 16, 3, 16  # 16 experts divide every world size we run; rows of 16 bf16 are 32 bytes
# Per rank; capacity = 2 * world * MAX_TOKENS holds any routing, the duplicates pattern's (two rows of a
# token to one expert) included.
MAX_TOKENS = 8
TOKEN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Tokens on rank r.
TOKENS = {
    "r+3": lambda r: r + 3,
    "0 or 1": lambda r: r % 2,
    "1": lambda r: 1,
    "0": lambda r: 0,
}


def distinct(gen, tokens, experts, k):
    """k different experts per token, drawn from [0, experts)."""
    return torch.rand(tokens, experts, generator=gen).argsort(1)[:, :k]


# Expert choices [T, K] of one rank's T tokens.
PATTERNS = {
    "random": lambda gen, t: distinct(gen, t, E, K),
    # Every token of every rank picks the last expert (on the last rank) first.
    "hot": lambda gen, t: torch.cat([torch.full((t, 1), E - 1), distinct(gen, t, E - 1, K - 1)], 1),
    # Only experts 0..K: every other expert, and at world > 1 every rank but 0, receives nothing.
    "idle": lambda gen, t: distinct(gen, t, K + 1, K),
    # The first expert twice: two rows, two slots, and combine adds both.
    "duplicates": lambda gen, t: distinct(gen, t, E, K)[:, [0, 0, 1]],
}


@pytest.fixture
def dtype(world):
    # The nvshmem backend combines 16-bit rows only (symcomm/moe.py); float32 is exact on the torch one.
    return torch.float32 if world.backend == "torch" else torch.bfloat16


def token_counts(world, name):
    return [TOKENS[name](r) for r in range(world.world_size)]


def every_rank_tokens(gen, counts, pattern, dtype):
    """Every rank's (x, topk_ids), with counts[r] tokens on rank r. Row t of rank r starts with (r, t),
    so a misplaced row names itself."""
    xs, ids = [], []
    for r, t in enumerate(counts):
        x = torch.randn(t, H, generator=gen)
        x[:, 0], x[:, 1] = r, torch.arange(t)
        xs.append(x.to(dtype))
        ids.append(PATTERNS[pattern](gen, t))
    return xs, ids


def expected_dispatch(ids, capacity):
    """Per global expert, the (source rank, token, j) of its slots in order; and every rank's routing."""
    arrivals = [[] for _ in range(E)]
    for src, rank_ids in enumerate(ids):
        for t, row in enumerate(rank_ids.tolist()):
            for j, e in enumerate(row):
                arrivals[e].append((src, t, j))
    routing = [torch.empty(rank_ids.shape, dtype=torch.int64) for rank_ids in ids]
    for e, pairs in enumerate(arrivals):
        for slot, (src, t, j) in enumerate(pairs):
            routing[src][t, j] = e * capacity + slot
    return arrivals, routing


def buffers(world, sym, dtype, capacity=None):
    """(expert_x, expert_counts) poisoned: NaN rows and -1 counts expose anything left unwritten."""
    local = E // world.world_size
    expert_x = sym((local, capacity or 2 * world.world_size * MAX_TOKENS, H), dtype).fill_(float("nan"))
    return expert_x, sym((local,), torch.int32).fill_(-1)


def agree(check):
    """Runs check() and fails on every rank if it failed on any: a rank that stopped at a failed assert
    would leave the others waiting in their next collective."""
    try:
        check()
        error = None
    except AssertionError as e:
        error = str(e) or "assertion failed"
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e is not None]
    assert not failed, "\n".join(failed)


def dispatch_and_check(world, xs, ids, expert_x, expert_counts, id_dtype=torch.int64):
    """Runs moe_dispatch on this rank's tokens and checks every slot, count and routing entry."""
    me, local, capacity = world.rank, expert_x.shape[0], expert_x.shape[1]
    routing = ops.moe_dispatch(xs[me].to(world.device), ids[me].to(id_dtype).to(world.device), E, expert_x,
                               expert_counts)
    arrivals, routing_ref = expected_dispatch(ids, capacity)

    def check():
        assert routing.dtype == torch.int64 and torch.equal(routing.cpu(), routing_ref[me])
        for e in range(local):
            pairs, name = arrivals[me * local + e], f"expert {me * local + e}"
            assert int(expert_counts[e]) == len(pairs), name
            got = expert_x[e, :len(pairs)].cpu()
            assert [(int(r[0]), int(r[1])) for r in got] == [(src, t) for src, t, _ in pairs], name
            assert torch.equal(got, torch.stack([xs[src][t] for src, t, _ in pairs]) if pairs else got[:0])

    agree(check)
    return routing


def combine_and_check(world, xs, expert_x, routing, gen):
    """Turns expert_x in place into the experts' output f(x) = 2 x - 1 and checks moe_combine of it against
    sum_j w[t, j] * f(x[t]). The rows past the counts are still NaN, so reading one shows."""
    expert_y = expert_x.mul_(2).sub_(1)
    weights = [torch.rand(x.shape[0], K, generator=gen) + 0.5 for x in xs]
    y = ops.moe_combine(expert_y, weights[world.rank].to(world.device), routing)
    f = 2 * xs[world.rank].double() - 1
    w = weights[world.rank].double().sum(1, keepdim=True)
    # Roundings: f itself, then per pair a product and a sum, then y's dtype.
    agree(lambda: assert_close(y, w * f, (2 * K + 2) * w * f.abs()))


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_dispatch_and_combine(world, gen, sym, dtype, pattern, tokens):
    xs, ids = every_rank_tokens(gen, token_counts(world, tokens), pattern, dtype)
    expert_x, expert_counts = buffers(world, sym, dtype)
    routing = dispatch_and_check(world, xs, ids, expert_x, expert_counts)
    combine_and_check(world, xs, expert_x, routing, gen)


@pytest.mark.parametrize("id_dtype", (torch.int32, torch.int64))
@pytest.mark.parametrize("token_dtype", TOKEN_DTYPES)
def test_dispatch_dtypes(world, gen, sym, token_dtype, id_dtype):
    xs, ids = every_rank_tokens(gen, token_counts(world, "r+3"), "random", token_dtype)
    dispatch_and_check(world, xs, ids, *buffers(world, sym, token_dtype), id_dtype)


@pytest.mark.parametrize("tokens", ("r+3", "0 or 1"))
@pytest.mark.parametrize("token_dtype", TOKEN_DTYPES)
def test_combine_alone(world, gen, sym, token_dtype, tokens):
    if world.backend == "nvshmem" and token_dtype == torch.float32:
        pytest.skip("the nvshmem backend combines 16-bit rows only")
    n, local, capacity = world.world_size, E // world.world_size, world.world_size * MAX_TOKENS
    ys = torch.randn(n, local, capacity, H, generator=gen).to(token_dtype)  # every rank's expert_y
    counts = token_counts(world, tokens)
    # Distinct random slots anywhere in the E x capacity slot space, as dispatch would give.
    slots = torch.randperm(E * capacity, generator=gen)[:sum(counts) * K].split([c * K for c in counts])
    routing = slots[world.rank].view(-1, K)
    weights = torch.randn(routing.shape, generator=gen)
    expert_y = sym((local, capacity, H), token_dtype)
    expert_y.copy_(ys[world.rank])
    y = ops.moe_combine(expert_y, weights.to(world.device), routing.to(world.device))
    picked = ys.double().reshape(E * capacity, H)[routing]  # [T, K, H]
    w = weights.double().unsqueeze(-1)
    # Roundings: per pair a product and a sum, then y's dtype.
    assert_close(y, (w * picked).sum(1), (2 * K + 1) * (w.abs() * picked.abs()).sum(1), dtype=token_dtype)
    assert torch.equal(expert_y.cpu(), ys[world.rank]), "moe_combine changed expert_y"


def test_pairs_dispatched_as_one_expert_tokens_keep_their_slots(world, gen, sym, dtype):
    """ExpertParallelMoE's backward relies on this: the T * k pairs sent as T * k tokens with one expert
    each land in the slots of the forward dispatch."""
    xs, ids = every_rank_tokens(gen, token_counts(world, "r+3"), "duplicates", dtype)
    expert_x, expert_counts = buffers(world, sym, dtype)
    x, my_ids = xs[world.rank].to(world.device), ids[world.rank].to(world.device)
    routing = ops.moe_dispatch(x, my_ids, E, expert_x, expert_counts)
    before, counts = expert_x.clone(), expert_counts.clone()
    pairs = ops.moe_dispatch(x.repeat_interleave(K, 0), my_ids.reshape(-1, 1), E, expert_x, expert_counts)
    assert torch.equal(pairs, routing.reshape(-1, 1)) and torch.equal(expert_counts, counts)
    valid = (torch.arange(expert_x.shape[1], device=world.device) < counts.unsqueeze(1)).unsqueeze(-1)
    assert torch.equal(expert_x.where(valid, 0), before.where(valid, 0))


def test_overflow_raises_on_every_rank(world, sym, dtype):
    if world.backend != "torch":
        pytest.skip("the nvshmem kernel reports an overflow from the device and traps: it cannot raise")
    expert_x, expert_counts = buffers(world, sym, dtype, capacity=world.world_size)
    # Two tokens per rank to expert 0: 2 * world rows for a capacity of world.
    x = torch.randn(2, H).to(dtype).to(world.device)
    ids = torch.tensor([[0], [0]], device=world.device)
    with pytest.raises(ValueError, match=rf"moe_dispatch: rank 0: expert 0 received {2 * world.world_size} "
                                         rf"\(token, expert\) pairs, more than capacity={world.world_size}"):
        ops.moe_dispatch(x, ids, E, expert_x, expert_counts)


def test_repeated_calls_never_mix_data(world, gen, sym, dtype):
    expert_x, expert_counts = buffers(world, sym, dtype)
    for _ in range(20):
        counts = torch.randint(0, MAX_TOKENS + 1, (world.world_size,), generator=gen).tolist()
        pattern = list(PATTERNS)[int(torch.randint(len(PATTERNS), (1,), generator=gen))]
        xs, ids = every_rank_tokens(gen, counts, pattern, dtype)
        routing = dispatch_and_check(world, xs, ids, expert_x, expert_counts)
        combine_and_check(world, xs, expert_x, routing, gen)


def test_opcheck(world, gen, sym):
    if world.backend != "torch":
        pytest.skip("opcheck calls the op on copies of its arguments, and copies are not symmetric tensors")
    xs, ids = every_rank_tokens(gen, token_counts(world, "r+3"), "random", torch.float32)
    expert_x, expert_counts = buffers(world, sym, torch.float32)
    args = (xs[world.rank], ids[world.rank], E, expert_x, expert_counts)
    torch.library.opcheck(ops.moe_dispatch.default, args)
    routing = ops.moe_dispatch(*args)
    expert_y = torch.randn(expert_x.shape, generator=gen)
    torch.library.opcheck(ops.moe_combine.default, (expert_y, torch.rand(routing.shape, generator=gen), routing))


# (call, error, message): call(a) with `a` holding valid arguments of both ops.
BAD_CALLS = [
    (lambda a: ops.moe_dispatch(a.x, a.ids + E, E, a.expert_x, a.counts), ValueError,
     rf"moe_dispatch: topk_ids\[0, 0\]=\d+ is outside \[0, {E}\)"),
    (lambda a: ops.moe_dispatch(a.x, a.ids - E, E, a.expert_x, a.counts), ValueError,
     r"moe_dispatch: topk_ids\[0, 0\]=-\d+ is outside"),
    (lambda a: ops.moe_dispatch(a.x, a.ids.float(), E, a.expert_x, a.counts), TypeError,
     r"moe_dispatch: topk_ids has dtype torch.float32; expected one of int32, int64"),
    (lambda a: ops.moe_dispatch(a.x, a.ids[:, 0], E, a.expert_x, a.counts), ValueError,
     r"moe_dispatch: topk_ids must be 2-D"),
    (lambda a: ops.moe_dispatch(a.x, a.ids[1:], E, a.expert_x, a.counts), ValueError,
     r"moe_dispatch: topk_ids must be \[T=3, k >= 1\]"),
    (lambda a: ops.moe_dispatch(a.x.double(), a.ids, E, a.expert_x, a.counts), TypeError,
     r"moe_dispatch: x has dtype torch.float64"),
    (lambda a: ops.moe_dispatch(a.x, a.ids, 0, a.expert_x, a.counts), ValueError,
     r"moe_dispatch: num_experts must be a positive int, got 0"),
    (lambda a: ops.moe_dispatch(a.x, a.ids, E, a.expert_x[..., 1:], a.counts), ValueError,
     r"moe_dispatch: expert_x must be \[E_local=\d+, capacity >= 1, H=16\]"),
    (lambda a: ops.moe_dispatch(a.x, a.ids, E, a.expert_x.half(), a.counts), TypeError,
     r"moe_dispatch: expert_x has dtype torch.float16"),
    (lambda a: ops.moe_dispatch(a.x, a.ids, E, a.expert_x, a.counts.long()), TypeError,
     r"moe_dispatch: expert_counts has dtype torch.int64"),
    (lambda a: ops.moe_combine(a.expert_x, a.weights.double(), a.routing), TypeError,
     r"moe_combine: topk_weights has dtype torch.float64; expected one of float32"),
    (lambda a: ops.moe_combine(a.expert_x, a.weights.bfloat16(), a.routing), TypeError,
     r"moe_combine: topk_weights has dtype torch.bfloat16"),
    (lambda a: ops.moe_combine(a.expert_x, a.weights[:, 1:], a.routing), ValueError,
     r"moe_combine: routing \(3, 3\) and topk_weights \(3, 2\) must have the same \[T, k\] shape"),
    (lambda a: ops.moe_combine(a.expert_x, a.weights, a.routing.int()), TypeError,
     r"moe_combine: routing has dtype torch.int32"),
    (lambda a: ops.moe_combine(a.expert_x, a.weights, a.routing + E * a.expert_x.shape[1]), ValueError,
     r"moe_combine: routing\[0, 0\]=\d+ is not a slot from moe_dispatch"),
]


@pytest.mark.parametrize("call, error, match", BAD_CALLS)
def test_bad_input_raises_on_every_rank(world, gen, sym, dtype, monkeypatch, call, error, match):
    if world.device.type == "cuda":
        monkeypatch.setenv("SYMCOMM_DEBUG", "1")  # value checks of GPU tensors run in debug mode only
    expert_x, counts = buffers(world, sym, dtype)
    ids = distinct(gen, 3, E, K)
    # Valid routing for the combine calls (a dispatch before any bad call).
    x = torch.randn(3, H, generator=gen).to(dtype).to(world.device)
    routing = ops.moe_dispatch(x, ids.to(world.device), E, expert_x, counts)
    a = SimpleNamespace(x=x, ids=ids.to(world.device), expert_x=expert_x, counts=counts, routing=routing,
                        weights=torch.rand(3, K, generator=gen).to(world.device))
    with pytest.raises(error, match=match):
        call(a)


def test_experts_not_divisible_by_the_world(world, sym, dtype):
    # At world 1 every count divides, and the same calls must work.
    experts = world.world_size + 1
    local = max(1, experts // world.world_size)
    expert_x, counts = sym((local, world.world_size, H), dtype), sym((local,), torch.int32)
    x, ids = torch.randn(1, H).to(dtype).to(world.device), torch.zeros(1, 1, dtype=torch.int64, device=world.device)
    if world.world_size == 1:
        ops.moe_dispatch(x, ids, experts, expert_x, counts)
        ExpertParallelMoE(H, 8, experts, 1, True, 1, dtype=dtype, device=world.device)
        return
    with pytest.raises(ValueError, match=rf"moe_dispatch: num_experts={experts} is not divisible by the world size"):
        ops.moe_dispatch(x, ids, experts, expert_x, counts)
    with pytest.raises(ValueError, match=rf"num_experts={experts} is not divisible by the expert-parallel size"):
        ExpertParallelMoE(H, 8, experts, 1, True, 1, dtype=dtype, device=world.device)


# ---------------------------------------------------------------------------------------------
# ExpertParallelMoE against dense_moe in float64

FFN = 24


def full_weights(gen, dtype):
    """router [E, H], gate and up [E, F, H], down [E, H, F] in float64, holding values of `dtype`."""
    shapes = [(E, H), (E, FFN, H), (E, FFN, H), (E, H, FFN)]
    fan_in = [H, H, H, FFN]
    return [(torch.randn(s, generator=gen, dtype=F64) / f**0.5).to(dtype).double() for s, f in zip(shapes, fan_in)]


def unambiguous_tokens(gen, count, router_weight, dtype):
    """Tokens whose K-th and (K+1)-th router logits are at least 1e-3 apart, so that the layer's
    float32 router picks the same experts as the float64 reference."""
    x = torch.randn(count, H, generator=gen, dtype=F64).to(dtype).double()
    while True:
        top = (x @ router_weight.t()).topk(K + 1, -1).values
        near = top[:, K - 1] - top[:, K] < 1e-3
        if not near.any():
            return x
        x[near] = torch.randn(int(near.sum()), H, generator=gen, dtype=F64).to(dtype).double()


def router_grad_terms(x, full, grads, renormalize):
    """The size of the terms the router's gradient (float64 [E, H]) adds up: over tokens t, |x_t| times
    |J_t|^T applied to <|g_t|, |expert_e(x_t)|> for each of its experts e, where J_t is the Jacobian of
    t's top-k weights in its logits. With few tokens and a peaked softmax the gradient is a small
    difference of such terms, so the rounding of the expert outputs bounds its error relative to them,
    not to itself."""
    router, w_gate, w_up, w_down = full
    terms = torch.zeros_like(router)
    for t in range(x.shape[0]):
        logits = x[t] @ router.t()
        ids = torch.softmax(logits, -1).topk(K).indices

        def top_weights(z):
            w = torch.softmax(z, -1)[ids]
            return w / w.sum() if renormalize else w

        jacobian = torch.autograd.functional.jacobian(top_weights, logits)  # [K, E]
        outs = torch.stack([(F.silu(w_gate[e] @ x[t]) * (w_up[e] @ x[t])) @ w_down[e].t() for e in ids.tolist()])
        terms += torch.outer(jacobian.abs().t() @ (outs.abs() @ grads[t].abs()), x[t].abs())
    return terms


@pytest.mark.parametrize("tokens", ("r+3", "0 or 1"))
@pytest.mark.parametrize("renormalize", (True, False))
def test_layer_matches_dense_forward_and_backward(world, gen, dtype, renormalize, tokens):
    me, n = world.rank, world.world_size
    full = full_weights(gen, dtype)
    counts = token_counts(world, tokens)
    xs = [unambiguous_tokens(gen, c, full[0], dtype) for c in counts]
    grads = [torch.randn(c, H, generator=gen, dtype=F64).to(dtype).double() for c in counts]

    ref_weights = [w.clone().requires_grad_() for w in full]
    ref_x = torch.cat(xs).requires_grad_()
    ref_y = dense_moe(ref_x, *ref_weights, K, renormalize)
    ref_y.backward(torch.cat(grads))

    layer = ExpertParallelMoE.from_dense(*(w.to(dtype).to(world.device) for w in full), K, renormalize, MAX_TOKENS)
    # Stale rows past the counts must reach neither the output nor any gradient.
    layer.exchange.expert_x.fill_(float("nan"))
    layer.exchange.expert_y.fill_(float("nan"))
    allocations = len(runtime._get().symmetric)
    x = xs[me].to(dtype).to(world.device).requires_grad_()
    y = layer(x)
    y.backward(grads[me].to(dtype).to(world.device))
    with torch.no_grad():
        # The inference path (no copies) computes the same thing as the autograd one.
        torch.testing.assert_close(layer(x.detach()), y.detach(), rtol=0, atol=0)
    assert len(runtime._get().symmetric) == allocations, "forward or backward allocated a symmetric tensor"

    # The router's gradient on each rank is its own tokens' share, summed here in float64 so that the
    # check adds no rounding of its own.
    router_grad = layer.router_weight.grad.cpu().double()
    dist.all_reduce(router_grad)

    mine = slice(sum(counts[:me]), sum(counts[:me + 1]))
    assert_close(y.detach(), ref_y[mine].detach())
    assert_close(x.grad, ref_x.grad[mine])
    err = float((router_grad - ref_weights[0].grad).norm())
    terms = float(router_grad_terms(ref_x.detach(), full, torch.cat(grads), renormalize).norm())
    tol = LAYER_TOLERANCE[dtype]
    assert err <= tol * terms, f"router gradient: error {err:.3g} > {tol:.1g} x the size of its terms ({terms:.3g})"
    local = E // n
    for w, ref in zip((layer.w_gate, layer.w_up, layer.w_down), ref_weights[1:]):
        assert_close(w.grad, ref.grad[me * local:(me + 1) * local])


@pytest.mark.parametrize("shape", [(2, 3), (1, 2, 2), (0, 4)], ids=["batch-seq", "4-d", "empty"])
def test_layer_takes_leading_dimensions(world, gen, dtype, shape):
    """As Hugging Face MoE blocks: x [..., H] -> [..., H], the same as on the flat tokens."""
    full = full_weights(gen, dtype)
    layer = ExpertParallelMoE.from_dense(*(w.to(dtype).to(world.device) for w in full), K, True, MAX_TOKENS)
    flat = unambiguous_tokens(gen, math.prod(shape), full[0], dtype).to(dtype).to(world.device)
    x = flat.view(*shape, H).requires_grad_()
    y = layer(x)
    assert y.shape == x.shape
    with torch.no_grad():
        torch.testing.assert_close(y.detach().reshape(-1, H), layer(flat), rtol=0, atol=0)
    y.backward(torch.ones_like(y))
    assert x.grad.shape == x.shape and not x.grad.isnan().any()


def test_layer_bad_input(world, gen, dtype):
    weights = [w.to(dtype).to(world.device) for w in full_weights(gen, dtype)]
    layer = ExpertParallelMoE.from_dense(*weights, K, True, MAX_TOKENS)
    with pytest.raises(ValueError, match=rf"x has {MAX_TOKENS + 1} tokens, more than max_tokens_per_rank={MAX_TOKENS}"):
        layer(torch.randn(MAX_TOKENS + 1, H).to(dtype).to(world.device))
    with pytest.raises(ValueError, match=r"x must be \[\.\.\., hidden_size=16\], got \(2, 8\)"):
        layer(torch.randn(2, 8).to(dtype).to(world.device))
    with pytest.raises(TypeError, match=rf"x has dtype torch.float64; the layer's buffers hold {dtype}"):
        layer(torch.randn(2, H, dtype=F64).to(world.device))
    with pytest.raises(ValueError, match=r"w_down must be \(16, 16, 24\) \(E and H from router_weight, F from"):
        ExpertParallelMoE.from_dense(*weights[:3], weights[3].transpose(1, 2), K, True, MAX_TOKENS)
    with pytest.raises(ValueError, match=rf"top_k={E + 1} is more than num_experts={E}"):
        ExpertParallelMoE(H, FFN, E, E + 1, True, MAX_TOKENS)
    with pytest.raises(ValueError, match=r"max_tokens_per_rank must be a positive int, got 0"):
        ExpertParallelMoE(H, FFN, E, K, True, 0)
