"""The op contract on the active backend, against float64 references built from every rank's inputs."""

import pytest
import torch

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


def test_non_contiguous_inputs_are_copied(world, gen):
    xs, x = inputs(world, gen, (6, 4 * world.world_size), torch.float32)
    assert_close(ops.all_reduce(x.t()), *(t.t() for t in sum_ref(xs)), dtype=torch.float32)
    exact(ops.all_gather(x.t(), 1), torch.cat([t.t() for t in xs], 1))


def op_cases(world, gen):
    x = torch.randn(2 * world.world_size, 3, generator=gen).to(world.device)
    a = torch.randn(2 * world.world_size, 4, generator=gen).to(world.device)
    b = torch.randn(4, 5, generator=gen).to(world.device)
    bias = torch.randn(5, generator=gen).to(world.device)
    return [
        (ops.all_reduce, (x,)),
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
    torch._dynamo.reset()
    for op, args in op_cases(world, gen):
        compiled = torch.compile(lambda *a, op=op: op(*a) * 2, backend="aot_eager", fullgraph=True)
        eager = op(*args) * 2
        torch.testing.assert_close(compiled(*args), eager)


BAD_CALLS = [
    (lambda x: ops.all_reduce(x.int()), TypeError, r"all_reduce: x has dtype torch.int32; expected one of"),
    (lambda x: ops.all_reduce(x.to("meta")), ValueError, r"all_reduce: x must be on .* got meta"),
    (lambda x: ops.all_reduce(x.tolist()), RuntimeError, r"Expected a value of type 'Tensor' for argument 'x'"),
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


def test_debug_mode_one_bad_rank_raises_everywhere(world, gen, monkeypatch):
    monkeypatch.setenv("SYMCOMM_DEBUG", "1")
    x = torch.randn(4, generator=gen).to(world.device)
    bad_rank = world.world_size - 1
    arg = x.int() if world.rank == bad_rank else x
    with pytest.raises(TypeError if world.rank == bad_rank else ValueError, match=rf"rank {bad_rank}: TypeError"):
        ops.all_reduce(arg)


def test_debug_mode_mismatched_shapes_raise_everywhere(world, gen, monkeypatch):
    if world.world_size == 1:
        pytest.skip("a world of one cannot disagree with itself")
    monkeypatch.setenv("SYMCOMM_DEBUG", "1")
    x = torch.randn(4 + world.rank, generator=gen).to(world.device)
    with pytest.raises(ValueError, match="ranks called with different arguments"):
        ops.all_reduce(x)
