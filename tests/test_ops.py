"""The op contract on the active backend, against float64 references built from every rank's inputs."""

import pytest
import torch
import torch.distributed as dist

import symcomm
from harness import assert_close, every_rank, gemm_ref, sum_ref

pytestmark = pytest.mark.dist

ops = torch.ops.symcomm
REDUCE = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MOVE_ONLY = (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.int32, torch.int64)
SHAPES = [(1,), (7,), (13, 3), (4, 9, 5), (2, 0, 3)]


def inputs(world, gen, shape, dtype):
    xs = every_rank(gen, world.world_size, shape, dtype, world.device)
    return xs, xs[world.rank]


def exact(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if out.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        # float8 has no equality kernel on CPU; the bytes must match exactly anyway.
        out, ref = out.view(torch.uint8), ref.view(torch.uint8)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", REDUCE)
@pytest.mark.parametrize("shape", SHAPES)
def test_all_reduce(world, gen, shape, dtype):
    xs, x = inputs(world, gen, shape, dtype)
    keep = x.clone()
    out = ops.all_reduce(x)
    assert out.dtype == dtype
    assert_close(out, *sum_ref(xs), dtype=dtype)
    assert torch.equal(x, keep), "all_reduce changed its input"


def rms_norm_check(xs, residual, weight, eps, dtype):
    """Checks all_reduce_rms_norm's (normed, h): h against the float64 sum of every rank's x (plus the
    residual, one more rounding), and normed against the float64 norm of the h it returned, within the
    norm's roundings (the variance over the last dimension in float32 at least, two roundings to dtype)."""
    ref_h, scale_h = sum_ref(xs)
    if residual is not None:
        ref_h = ref_h + residual.double()
        scale_h = scale_h + ref_h.abs()

    def check(out):
        normed, h = out
        assert normed.dtype == h.dtype == dtype
        assert_close(h, ref_h, scale_h, dtype=dtype)
        wide = h.double()
        ref = weight.double() * wide / (wide.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        acc = torch.promote_types(dtype, torch.float32)
        roundings = 2 + (h.shape[-1] + 4) * torch.finfo(acc).eps / torch.finfo(dtype).eps
        assert_close(normed, ref, roundings * ref.abs(), dtype=dtype)

    return check


@pytest.mark.parametrize("dtype", REDUCE)
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no-residual"])
@pytest.mark.parametrize("shape", [(1, 7), (3, 64), (2, 3, 16)])
def test_all_reduce_rms_norm(world, gen, shape, with_residual, dtype):
    xs, x = inputs(world, gen, shape, dtype)
    residual = every_rank(gen, 1, shape, dtype, world.device)[0] if with_residual else None
    weight = every_rank(gen, 1, shape[-1:], dtype, world.device)[0]
    keep = x.clone()
    rms_norm_check(xs, residual, weight, 1e-6, dtype)(ops.all_reduce_rms_norm(x, residual, weight, 1e-6))
    assert torch.equal(x, keep), "all_reduce_rms_norm changed its input"


@pytest.mark.parametrize("dtype", REDUCE + MOVE_ONLY)
@pytest.mark.parametrize("shape, dim", [((5,), 0), ((3, 4), 1), ((3, 4), -2), ((2, 3, 5), 1), ((2, 3, 5), 2)])
def test_all_gather(world, gen, shape, dim, dtype):
    xs, x = inputs(world, gen, shape, dtype)
    exact(ops.all_gather(x, dim), torch.cat(xs, dim))


@pytest.mark.parametrize("dtype", REDUCE)
@pytest.mark.parametrize("dim, shape", [(0, (1, 3)), (1, (3, 2, 5)), (-1, (2, 3, 1)), (2, (3, 1, 3))])
def test_reduce_scatter(world, gen, dim, shape, dtype):
    shape = list(shape)
    shape[dim] *= world.world_size  # divisible at every world size
    xs, x = inputs(world, gen, shape, dtype)
    ref, scale = (t.chunk(world.world_size, dim)[world.rank] for t in sum_ref(xs))
    assert_close(ops.reduce_scatter(x, dim), ref, scale, dtype=dtype)


@pytest.mark.parametrize("dtype", REDUCE + MOVE_ONLY)
@pytest.mark.parametrize("rows, tail", [(1, ()), (3, (5,)), (2, (3, 7))])
def test_all_to_all(world, gen, rows, tail, dtype):
    xs, x = inputs(world, gen, (rows * world.world_size, *tail), dtype)
    # Rank r receives chunk r of every rank, in rank order.
    exact(ops.all_to_all(x), torch.cat([t.chunk(world.world_size, 0)[world.rank] for t in xs]))


@pytest.mark.parametrize("dtype", REDUCE)
@pytest.mark.parametrize("m, k, n, bias", [(1, 8, 16, False), (7, 16, 8, True), (33, 24, 40, True)])
def test_gemm_all_reduce(world, gen, m, k, n, bias, dtype):
    a_all, a = inputs(world, gen, (m, k), dtype)
    b_all, b = inputs(world, gen, (k, n), dtype)
    c = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).to(world.device) if bias else None
    ref, scale = gemm_ref(a_all, b_all)
    if bias:
        ref, scale = ref + c.double(), scale + c.double().abs()
    assert_close(ops.gemm_all_reduce(a, b, c), ref, scale, dtype=dtype)


@pytest.mark.parametrize("dtype", REDUCE)
@pytest.mark.parametrize("m_per_rank, k, n", [(1, 8, 16), (5, 16, 8)])
def test_gemm_reduce_scatter(world, gen, m_per_rank, k, n, dtype):
    a_all, a = inputs(world, gen, (m_per_rank * world.world_size, k), dtype)
    b_all, b = inputs(world, gen, (k, n), dtype)
    ref, scale = (t.chunk(world.world_size, 0)[world.rank] for t in gemm_ref(a_all, b_all))
    assert_close(ops.gemm_reduce_scatter(a, b), ref, scale, dtype=dtype)


@pytest.mark.parametrize("dtype", REDUCE)
@pytest.mark.parametrize("m, k, n", [(1, 8, 16), (6, 16, 8)])
def test_all_gather_gemm(world, gen, m, k, n, dtype):
    a_all, a = inputs(world, gen, (m, k), dtype)
    b_all, b = inputs(world, gen, (k, n), dtype)
    assert_close(ops.all_gather_gemm(a, b), *gemm_ref([torch.cat(a_all)], [b]), dtype=dtype)


def test_back_to_back_calls_never_see_stale_data(world, gen):
    for _ in range(50):
        n = int(torch.randint(1, 300, (1,), generator=gen))
        xs, x = inputs(world, gen, (n,), torch.float32)
        assert_close(ops.all_reduce(x), *sum_ref(xs), dtype=torch.float32)
        exact(ops.all_gather(x, 0), torch.cat(xs))


# One call of each op: case(world, gen, sym, size) -> (every rank's arguments, check of this rank's
# result against a reference from every rank's arguments). `size` is part of what every op's ranks
# must agree on (the columns of the output; top-k for the MoE ops) and shapes no symmetric buffer, so
# that ranks may pass different sizes without allocating different symmetric buffers.
F32 = torch.float32
MOE_EXPERTS, MOE_HIDDEN, MOE_MAX_TOKENS = 8, 16, 4  # rows of 16 bf16 are the 32 bytes the kernels need


def all_reduce_case(world, gen, sym, size):
    xs = every_rank(gen, world.world_size, (4, size), F32, world.device)
    return [(x,) for x in xs], lambda out: assert_close(out, *sum_ref(xs), dtype=F32)


def all_reduce_rms_norm_case(world, gen, sym, size):
    xs = every_rank(gen, world.world_size, (4, size), F32, world.device)
    residual = every_rank(gen, 1, (4, size), F32, world.device)[0]
    weight = every_rank(gen, 1, (size,), F32, world.device)[0]
    return [(x, residual, weight, 1e-6) for x in xs], rms_norm_check(xs, residual, weight, 1e-6, F32)


def all_gather_case(world, gen, sym, size):
    xs = every_rank(gen, world.world_size, (4, size), F32, world.device)
    return [(x, 1) for x in xs], lambda out: exact(out, torch.cat(xs, 1))


def reduce_scatter_case(world, gen, sym, size):
    xs = every_rank(gen, world.world_size, (2 * world.world_size, size), F32, world.device)
    ref, scale = (t.chunk(world.world_size)[world.rank] for t in sum_ref(xs))
    return [(x, 0) for x in xs], lambda out: assert_close(out, ref, scale, dtype=F32)


def all_to_all_case(world, gen, sym, size):
    xs = every_rank(gen, world.world_size, (2 * world.world_size, size), F32, world.device)
    ref = torch.cat([t.chunk(world.world_size)[world.rank] for t in xs])
    return [(x,) for x in xs], lambda out: exact(out, ref)


def gemm_all_reduce_case(world, gen, sym, size):
    a_all = every_rank(gen, world.world_size, (4, 6), F32, world.device)
    b_all = every_rank(gen, world.world_size, (6, size), F32, world.device)
    bias = every_rank(gen, 1, (size,), F32, world.device)[0]
    ref, scale = gemm_ref(a_all, b_all)
    ref, scale = ref + bias.double(), scale + bias.double().abs()
    return [(a, b, bias) for a, b in zip(a_all, b_all)], lambda out: assert_close(out, ref, scale, dtype=F32)


def gemm_reduce_scatter_case(world, gen, sym, size):
    a_all = every_rank(gen, world.world_size, (2 * world.world_size, 6), F32, world.device)
    b_all = every_rank(gen, world.world_size, (6, size), F32, world.device)
    ref, scale = (t.chunk(world.world_size)[world.rank] for t in gemm_ref(a_all, b_all))
    return list(zip(a_all, b_all)), lambda out: assert_close(out, ref, scale, dtype=F32)


def all_gather_gemm_case(world, gen, sym, size):
    a_all = every_rank(gen, world.world_size, (4, 6), F32, world.device)
    b_all = every_rank(gen, world.world_size, (6, size), F32, world.device)
    ref, scale = gemm_ref([torch.cat(a_all)], [b_all[world.rank]])
    return list(zip(a_all, b_all)), lambda out: assert_close(out, ref, scale, dtype=F32)


def moe_dtype(world):
    # The nvshmem backend combines 16-bit rows only (symcomm/moe.py); float32 is exact on the torch one.
    return F32 if world.backend == "torch" else torch.bfloat16


def moe_buffer(world, sym, dtype):
    """[E_local, capacity, H], NaN so that a row left unwritten shows. With distinct experts per token an
    expert receives one row per token at most: capacity = world * MOE_MAX_TOKENS never overflows."""
    shape = (MOE_EXPERTS // world.world_size, world.world_size * MOE_MAX_TOKENS, MOE_HIDDEN)
    return sym(shape, dtype).fill_(float("nan"))


def moe_dispatch_case(world, gen, sym, size, tokens=None):
    """tokens[r]: rank r's token count (default 3 on every rank); size: top-k."""
    dtype, tokens = moe_dtype(world), tokens or [3] * world.world_size
    xs = [torch.randn(t, MOE_HIDDEN, generator=gen).to(dtype).to(world.device) for t in tokens]
    ids = [torch.rand(t, MOE_EXPERTS, generator=gen).argsort(1)[:, :size].to(world.device) for t in tokens]
    expert_x = moe_buffer(world, sym, dtype)
    local, capacity = expert_x.shape[:2]
    expert_counts = sym((local,), torch.int32).fill_(-1)
    # docs/moe.md: an expert's slots are filled in (source rank, token, j) order.
    rows, routing = [[] for _ in range(MOE_EXPERTS)], []
    for x, rank_ids in zip(xs, ids):
        routing.append(torch.empty(rank_ids.shape, dtype=torch.int64))
        for t, row in enumerate(rank_ids.tolist()):
            for j, e in enumerate(row):
                routing[-1][t, j] = e * capacity + len(rows[e])
                rows[e].append(x[t])
    mine = rows[world.rank * local:(world.rank + 1) * local]

    def check(out):
        assert torch.equal(out.cpu(), routing[world.rank])
        assert expert_counts.tolist() == [len(r) for r in mine]
        for e, r in enumerate(mine):
            assert torch.equal(expert_x[e, :len(r)], torch.stack(r) if r else expert_x[e, :0])

    return [(x, i, MOE_EXPERTS, expert_x, expert_counts) for x, i in zip(xs, ids)], check


def moe_combine_case(world, gen, sym, size, tokens=None):
    """tokens[r]: rank r's token count (default 3 on every rank); size: top-k."""
    dtype, tokens = moe_dtype(world), tokens or [3] * world.world_size
    expert_y = moe_buffer(world, sym, dtype)
    ys = every_rank(gen, world.world_size, expert_y.shape, dtype, world.device)
    expert_y.copy_(ys[world.rank])
    slots = torch.cat(ys).double().flatten(0, 1)  # [E * capacity, H], in global slot order
    routing = [torch.randint(0, slots.shape[0], (t, size), generator=gen) for t in tokens]
    weights = [torch.rand(t, size, generator=gen) for t in tokens]
    picked, w = slots[routing[world.rank]], weights[world.rank].double().unsqueeze(-1)
    # Roundings: per pair a product and a sum, then y's dtype.
    ref, scale = (w * picked).sum(1), (2 * size + 1) * (w * picked.abs()).sum(1)
    args = [(expert_y, weight.to(world.device), route.to(world.device)) for weight, route in zip(weights, routing)]
    return args, lambda out: assert_close(out, ref, scale, dtype=dtype)


CASES = {case.__name__.removesuffix("_case"): case for case in (
    all_reduce_case, all_reduce_rms_norm_case, all_gather_case, reduce_scatter_case, all_to_all_case, gemm_all_reduce_case,
    gemm_reduce_scatter_case, all_gather_gemm_case, moe_dispatch_case, moe_combine_case)}
MOE_OPS = ("moe_dispatch", "moe_combine")


def strided(t):
    """t's values in a non-contiguous tensor: every other element of a buffer whose gaps are poison (NaN,
    or -1 for integers), so that reading the storage as if it were contiguous gives wrong values."""
    buffer = torch.empty((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype, device=t.device)
    view = buffer.fill_(float("nan") if t.is_floating_point() else -1)[..., ::2].copy_(t)
    assert not view.is_contiguous()
    return view


def on_every_rank(text):
    """text from every rank."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, text)
    return everyone


def test_every_op_has_a_case():
    assert set(CASES) == {op.name for op in symcomm.ops.OPS}


@pytest.mark.parametrize("name", CASES)
def test_non_contiguous_inputs_are_copied(world, gen, sym, name):
    args, check = CASES[name](world, gen, sym, 3)
    # All tensors but the MoE ops' caller-owned buffers (made by symcomm.empty), which must be contiguous.
    mine = [strided(a) if isinstance(a, torch.Tensor) and not symcomm.is_symmetric(a) else a for a in args[world.rank]]
    check(getattr(ops, name)(*mine))


@pytest.mark.parametrize("name, at, buffer", [("moe_dispatch", 3, "expert_x"), ("moe_combine", 0, "expert_y")])
def test_non_contiguous_moe_buffers_raise(world, gen, sym, name, at, buffer):
    args = list(CASES[name](world, gen, sym, 3)[0][world.rank])
    args[at] = strided(args[at])
    with pytest.raises(ValueError, match=f"{name}: {buffer} must be contiguous"):
        getattr(ops, name)(*args)


def op_cases(world, gen):
    x = torch.randn(2 * world.world_size, 3, generator=gen).to(world.device)
    a = torch.randn(2 * world.world_size, 4, generator=gen).to(world.device)
    b = torch.randn(4, 5, generator=gen).to(world.device)
    bias = torch.randn(5, generator=gen).to(world.device)
    return [
        (ops.all_reduce, (x,)),
        (ops.all_reduce_rms_norm, (x, a[:, :3], bias[:3], 1e-6)),
        (ops.all_reduce_rms_norm, (x, None, bias[:3], 1e-6)),
        (ops.all_gather, (x, 1)),
        (ops.reduce_scatter, (x, 0)),
        (ops.all_to_all, (x,)),
        (ops.gemm_all_reduce, (a, b, bias)),
        (ops.gemm_reduce_scatter, (a, b)),
        (ops.all_gather_gemm, (a, b)),
    ]


def test_opcheck(world, gen):
    for op, args in op_cases(world, gen):
        torch.library.opcheck(op.default, args)


def test_torch_compile_matches_eager(world, gen):
    for op, args in op_cases(world, gen):
        torch._dynamo.reset()  # the lambda below is one code object: compiled afresh for each op
        twice = lambda *a, op=op: torch.stack(op(*a)) * 2 if op is ops.all_reduce_rms_norm else op(*a) * 2
        compiled = torch.compile(twice, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(*args), twice(*args))


BAD_CALLS = [
    (lambda x: ops.all_reduce(x.int()), TypeError, r"all_reduce: x has dtype torch.int32; expected one of"),
    (lambda x: ops.all_reduce(x.to("meta")), ValueError, r"all_reduce: x must be on .* got meta"),
    (lambda x: ops.all_reduce(x.tolist()), RuntimeError, r"Expected a value of type 'Tensor' for argument 'x'"),
    (lambda x: ops.all_reduce_rms_norm(x, None, x[0, :3], 1e-6), ValueError,
     r"all_reduce_rms_norm: weight has 3 elements, expected x.shape\[-1\]=5"),
    (lambda x: ops.all_reduce_rms_norm(x, None, x, 1e-6), ValueError, r"all_reduce_rms_norm: weight must be 1-D"),
    (lambda x: ops.all_reduce_rms_norm(x, x[:2], x[0], 1e-6), ValueError,
     r"all_reduce_rms_norm: residual must have x's shape \(3, 5\), got \(2, 5\)"),
    (lambda x: ops.all_reduce_rms_norm(x, x.double(), x[0], 1e-6), TypeError,
     r"all_reduce_rms_norm: residual has dtype torch.float64; expected one of float32"),
    (lambda x: ops.all_reduce_rms_norm(x, None, x[0], 0.0), ValueError,
     r"all_reduce_rms_norm: eps must be a positive finite float, got 0.0"),
    (lambda x: ops.all_gather(x, 2), ValueError, r"all_gather: dim 2 is out of range for x of shape"),
    (lambda x: ops.all_gather(x[0, 0], 0), ValueError, r"all_gather: x must have at least one dimension"),
    (lambda x: ops.reduce_scatter(x.to(torch.float8_e4m3fn), 0), TypeError, r"reduce_scatter: x has dtype"),
    (lambda x: ops.gemm_all_reduce(x, x), ValueError, r"a.shape\[1\]=5 must equal b.shape\[0\]=3"),
    (lambda x: ops.gemm_all_reduce(x, x.t().double()), TypeError, r"b must match a's dtype"),
    (lambda x: ops.gemm_all_reduce(x, x.t(), x[0]), ValueError, r"bias has 5 elements, expected N=3"),
    (lambda x: ops.gemm_all_reduce(x[0], x), ValueError, r"gemm_all_reduce: a must be 2-D"),
    (lambda x: ops.gemm_all_reduce(x, x.t(), path="fastest"), ValueError,
     r"gemm_all_reduce: path must be one of \('auto', 'fused', 'unfused'\), got 'fastest'"),
    (lambda x: ops.all_gather_gemm(x, x.t(), path="Fused"), ValueError, r"all_gather_gemm: path must be one of"),
]


@pytest.mark.parametrize("call, error, match", BAD_CALLS)
def test_bad_input_raises_on_every_rank(world, gen, call, error, match):
    x = torch.randn(3, 5, generator=gen).to(world.device)
    with pytest.raises(error, match=match):
        call(x)


def test_sizes_not_divisible_by_world(world, gen):
    if world.world_size == 1:
        pytest.skip("every size is divisible by a world of one")
    x = torch.randn(world.world_size + 1, 3, generator=gen).to(world.device)
    with pytest.raises(ValueError, match=rf"x.shape\[0\]={world.world_size + 1} is not divisible by the world size"):
        ops.reduce_scatter(x, 0)
    with pytest.raises(ValueError, match=r"all_to_all: x.shape\[0\]=.* is not divisible"):
        ops.all_to_all(x)
    with pytest.raises(ValueError, match=r"gemm_reduce_scatter: a.shape\[0\] \(M\)=.* is not divisible"):
        ops.gemm_reduce_scatter(x, x.t())


@pytest.mark.parametrize("name", CASES)
def test_debug_mode_one_bad_rank_raises_everywhere(world, gen, sym, monkeypatch, name):
    monkeypatch.setenv("SYMCOMM_DEBUG", "1")
    args = list(CASES[name](world, gen, sym, 3)[0][world.rank])
    bad_rank = world.world_size - 1
    if world.rank == bad_rank:
        args[0] = args[0].to(torch.complex64)  # a dtype that no op takes
    # The bad rank raises its own error's type, the others ValueError; the message is the same everywhere.
    with pytest.raises(TypeError if world.rank == bad_rank else ValueError,
                       match=rf"{name}: invalid call on some ranks; rank {bad_rank}: TypeError") as error:
        getattr(ops, name)(*args)
    assert on_every_rank(str(error.value)) == [str(error.value)] * world.world_size


@pytest.mark.parametrize("name", CASES)
def test_debug_mode_mismatched_shapes_raise_everywhere(world, gen, sym, monkeypatch, name):
    if world.world_size == 1:
        pytest.skip("a world of one cannot disagree with itself")
    monkeypatch.setenv("SYMCOMM_DEBUG", "1")
    args = CASES[name](world, gen, sym, 2 + world.rank)[0][world.rank]
    with pytest.raises(ValueError, match=rf"{name}: ranks called with different arguments") as error:
        getattr(ops, name)(*args)
    assert on_every_rank(str(error.value)) == [str(error.value)] * world.world_size


@pytest.mark.parametrize("name", MOE_OPS)
def test_debug_mode_allows_moe_token_counts_to_differ(world, gen, sym, monkeypatch, name):
    if world.world_size == 1:
        pytest.skip("a world of one cannot disagree with itself")
    monkeypatch.setenv("SYMCOMM_DEBUG", "1")
    # docs/moe.md: each rank routes its own T tokens, and T may differ across ranks (and be 0).
    args, check = CASES[name](world, gen, sym, 2, tokens=list(range(world.world_size)))
    check(getattr(ops, name)(*args[world.rank]))
