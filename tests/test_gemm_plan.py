"""The host side of the fused GEMM ops (python/symcomm/gemm.py), on CPU.

The kernels are replaced by a stand-in with their documented semantics (csrc/gemm/gemm.h): gemm()
computes D[l] = A[l] @ B (+ bias) in float64 from the very addresses, leading dimensions and batch
strides it is given, and gemm_comm() does its exchange over gloo. What runs for real is everything the
host decides: the path, the pieces and their offsets in a small workspace, the operand layouts (b
as given or transposed, a copied when its rows are not aligned), the output layout, and which rank
adds the bias. The stand-in also checks what the kernels rely on: every rank launches the same
kernels with the same sizes, 16-byte alignment, the tile limits, and a tag per call.
"""

import pytest
import torch
import torch.distributed as dist

import symcomm
from harness import assert_close, every_rank, gemm_ref, read, write
from symcomm import gemm, runtime

pytestmark = pytest.mark.dist

DTYPES = {1: torch.float16, 2: torch.bfloat16}
WORKSPACE_DATA = 40 << 10  # small, so that products come in pieces


def view(address: int, dtype: torch.dtype, shape, strides) -> tuple[torch.Tensor, torch.Tensor]:
    """(the bytes under a strided [shape] of `dtype` at `address`, the strided view into them)."""
    isz = torch.empty((), dtype=dtype).element_size()
    raw = read(address, (sum((s - 1) * st for s, st in zip(shape, strides)) + 1) * isz)
    return raw, raw.view(dtype).as_strided(shape, strides)


def same_on_every_rank(what) -> None:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, what)
    assert all(w == what for w in everyone), f"ranks launched different kernels: {everyone}"


class Kernels:
    """Stand-in for symcomm._C's fused GEMM entry points."""

    max_blocks = 64
    max_peers = 8

    def __init__(self):
        self.launches = []
        self.epoch = 0
        self.tagged_epoch = 0
        self.bias_added = False
        # The comm kernel runs alongside the GEMM; here it runs when the tags would let it: after the
        # GEMM that tags tiles (at once if that GEMM came first), before the GEMM that waits for bands.
        self.pending_comm = None

    def _run_pending(self):
        if self.pending_comm is not None:
            self.pending_comm()
            self.pending_comm = None

    @staticmethod
    def workspace_data_offset():
        return 256

    def gemm_begin(self, workspace, stream):
        self.epoch += 1

    def gemm(self, workspace, m, n, k, batches, a, lda, a_batch, b, ldb, b_k_major, d, ldd, d_batch, bias, dtype,
             tag_tiles, wait_bands, raster_along_m, sms, stream):
        same_on_every_rank(("gemm", m, n, k, batches, tag_tiles, wait_bands, raster_along_m, sms))
        assert a % 16 == 0 and b % 16 == 0 and d % 16 == 0 and lda % 8 == 0 and ldb % 8 == 0 and ldd % 8 == 0
        assert lda >= k and ldb >= (k if b_k_major else n) and ldd >= n and sms >= 1
        assert not tag_tiles or batches * -(-m // gemm.TILE_M) * -(-n // gemm.TILE_N) <= gemm.MAX_TILES
        if tag_tiles or wait_bands:
            assert self.tagged_epoch < self.epoch, "a fused call without its own gemm_begin"
            self.tagged_epoch = self.epoch
        t = DTYPES[dtype]
        self.launches.append("gemm")
        if wait_bands:
            self._run_pending()
        _, av = view(a, t, (batches, m, k), (a_batch, lda, 1))
        _, bv = view(b, t, (k, n), (1, ldb) if b_k_major else (ldb, 1))
        raw, dv = view(d, t, (batches, m, n), (d_batch, ldd, 1))
        out = av.double() @ bv.double()
        if bias:
            self.bias_added = True
            out += view(bias, t, (n,), (1,))[1].double()
        dv.copy_(out.to(t))
        write(d, raw)
        if tag_tiles:
            self._run_pending()

    def gemm_comm(self, workspace, mode, m, n, k, partial_offset, result_offset, src, src_pitch, dst, dst_pitch,
                  dtype, blocks, stream):
        same_on_every_rank(("comm", mode, m, n, k, partial_offset, result_offset, blocks))
        assert 2 <= blocks <= self.max_blocks and partial_offset % 16 == 0 and result_offset % 16 == 0
        assert (src | dst) % 16 == 0 and (n | k | src_pitch | dst_pitch) % 8 == 0
        assert self.pending_comm is None, "a comm kernel whose GEMM never came"
        self.launches.append(("all_reduce", "reduce_scatter", "all_gather")[mode])
        self.pending_comm = lambda: self._exchange(workspace, mode, m, n, k, partial_offset, src, src_pitch, dst,
                                                   dst_pitch, DTYPES[dtype])
        if mode != 2 and self.tagged_epoch == self.epoch:
            self._run_pending()

    @staticmethod
    def _exchange(workspace, mode, m, n, k, partial_offset, src, src_pitch, dst, dst_pitch, t):
        world, rank = dist.get_world_size(), dist.get_rank()
        if mode == 2:
            # Every rank's [m, k] rows land in the gathered [world, m, k] A, before the GEMM reads it.
            mine = view(src, t, (m, k), (src_pitch, 1))[1].contiguous()
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            raw, gathered = view(workspace + partial_offset, t, (world, m, k), (m * k, k, 1))
            gathered.copy_(torch.stack(every))
            write(workspace + partial_offset, raw)
            return
        assert mode != 1 or m % world == 0
        total = view(workspace + partial_offset, t, (m, n), (n, 1))[1].double()
        dist.all_reduce(total)
        if mode == 1:
            total = total.chunk(world)[rank]
        raw, out = view(dst, t, tuple(total.shape), (dst_pitch, 1))
        out.copy_(total.to(t))
        write(dst, raw)


class Stream:
    """torch.cuda.Stream on CPU: one stream, on which the stand-ins run as _overlapped queues them."""

    device = torch.device("cpu")
    cuda_stream = 0

    def __init__(self, device=None):
        pass

    def wait_stream(self, other):
        pass


@pytest.fixture
def kernels(world, monkeypatch):
    fake = Kernels()
    workspace = symcomm.empty((256 + WORKSPACE_DATA,), torch.uint8)
    monkeypatch.setattr(runtime, "load_extension", lambda: fake)
    monkeypatch.setattr(runtime, "workspace", lambda: workspace)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(gemm, "_side_streams", {})
    yield fake
    symcomm.free(workspace)
    assert fake.pending_comm is None, "a comm kernel whose GEMM never came"


def operands(world, gen, m, k, n, dtype, b_layout, a_layout):
    """Every rank's a [m, k] and b [k, n] (b stored as given, or as the transpose of an [n, k] weight;
    a contiguous, or a column slice of a wider tensor)."""
    a_all = every_rank(gen, world.world_size, (m, k + (8 if a_layout == "sliced" else 0)), dtype, "cpu")
    a_all = [a[:, :k] for a in a_all]
    if b_layout == "transposed":
        b_all = [w.t() for w in every_rank(gen, world.world_size, (n, k), dtype, "cpu")]
    else:
        b_all = every_rank(gen, world.world_size, (k, n), dtype, "cpu")
    return a_all, b_all


LAYOUTS = [("kn", "contiguous"), ("transposed", "contiguous"), ("kn", "sliced")]


@pytest.mark.parametrize("b_layout, a_layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 7, 300])
def test_gemm_all_reduce(world, gen, kernels, m, bias, b_layout, a_layout):
    k, n, dtype = 24, 48, torch.bfloat16
    a_all, b_all = operands(world, gen, m, k, n, dtype, b_layout, a_layout)
    c = torch.randn(n, generator=gen).to(dtype) if bias else None
    ref, scale = gemm_ref(a_all, b_all)
    if bias:
        ref, scale = ref + c.double(), scale + c.double().abs()
    out = gemm.fused("gemm_all_reduce", a_all[world.rank], b_all[world.rank], c)
    assert_close(out, ref, scale, dtype=dtype)
    if world.world_size > 1:
        pieces = -(-m // gemm.fused_plan("gemm_all_reduce", m, n, k, dtype, world.world_size, WORKSPACE_DATA).rows)
        # The kernel that the other waits for is queued first: here the GEMM (the comm kernel waits for its tiles).
        assert kernels.launches == ["gemm", "all_reduce"] * pieces
        assert m < 300 or pieces > 1, "a product larger than the workspace must come in pieces"
    if bias:
        assert kernels.bias_added == (world.rank == 0), "exactly one rank adds the bias"


@pytest.mark.parametrize("b_layout, a_layout", LAYOUTS)
@pytest.mark.parametrize("m_per_rank", [1, 7, 70])
def test_gemm_reduce_scatter(world, gen, kernels, m_per_rank, b_layout, a_layout):
    m, k, n, dtype = m_per_rank * world.world_size, 16, 24, torch.float16
    a_all, b_all = operands(world, gen, m, k, n, dtype, b_layout, a_layout)
    ref, scale = (t.chunk(world.world_size)[world.rank] for t in gemm_ref(a_all, b_all))
    assert_close(gemm.fused("gemm_reduce_scatter", a_all[world.rank], b_all[world.rank]), ref, scale, dtype=dtype)
    if world.world_size > 1:
        assert kernels.launches == ["gemm", "reduce_scatter"]


@pytest.mark.parametrize("b_layout, a_layout", LAYOUTS)
@pytest.mark.parametrize("m", [1, 7, 200])
def test_all_gather_gemm(world, gen, kernels, m, b_layout, a_layout):
    k, n, dtype = 32, 16, torch.bfloat16
    a_all, b_all = operands(world, gen, m, k, n, dtype, b_layout, a_layout)
    b = b_all[world.rank]
    ref, scale = gemm_ref([torch.cat(a_all)], [b])
    assert_close(gemm.fused("all_gather_gemm", a_all[world.rank], b), ref, scale, dtype=dtype)
    if world.world_size > 1:
        rows = gemm.fused_plan("all_gather_gemm", m, n, k, dtype, world.world_size, WORKSPACE_DATA).rows
        # The GEMM waits for the comm kernel's bands, so the comm kernel is queued first.
        assert kernels.launches == ["all_gather", "gemm"] * -(-m // rows)


@pytest.mark.parametrize("op", list(gemm.MODES))
def test_pieces_fit_the_workspace_and_are_as_large_as_it_allows(op, gen):
    isz = 2
    for _ in range(200):
        world = int(torch.randint(1, 9, (1,), generator=gen))
        m, n, k = (int(torch.randint(1, 5000, (1,), generator=gen)) for _ in range(3))
        n, k = n // 8 * 8 + 8, k // 8 * 8 + 8
        data = int(torch.randint(1 << 10, 64 << 20, (1,), generator=gen))
        plan = gemm.fused_plan(op, m, n, k, torch.bfloat16, world, data)
        if world == 1:
            assert plan == gemm.Plan(m)
            continue
        if isinstance(plan, str):
            assert "workspace" in plan
            continue
        rows = plan.rows
        assert 1 <= rows <= m and (rows == m or rows % gemm.TILE_M == 0)
        if op == "gemm_all_reduce":
            assert plan.result >= rows * n * isz and plan.result + rows * n * isz <= data
            assert -(-rows // gemm.TILE_M) * -(-n // gemm.TILE_N) <= gemm.MAX_TILES
            bigger = rows + gemm.TILE_M
            assert rows == m or 2 * bigger * n * isz > data - 256 or \
                -(-bigger // gemm.TILE_M) * -(-n // gemm.TILE_N) > gemm.MAX_TILES
        elif op == "gemm_reduce_scatter":
            assert rows == m and m * n * isz <= data
        else:
            assert world * rows * k * isz <= data and world * -(-rows // gemm.TILE_M) <= gemm.MAX_TILES
            assert rows == m or world * (rows + gemm.TILE_M) * k * isz > data or \
                world * -(-(rows + gemm.TILE_M) // gemm.TILE_M) > gemm.MAX_TILES


def test_the_path_follows_the_cut_point_the_sizes_and_the_request(world, monkeypatch):
    cut = gemm._TUNING["gemm_fused_min_m"]["default"]["4"]
    big = 64 << 20
    assert gemm.choose("gemm_all_reduce", cut, 4096, 1024, torch.bfloat16, 4, big)[0] == "fused"
    assert gemm.choose("gemm_all_reduce", cut - 1, 4096, 1024, torch.bfloat16, 4, big)[0] == "unfused"
    # all_gather_gemm counts the gathered rows: every rank's a together.
    assert gemm.choose("all_gather_gemm", cut // 4, 4096, 1024, torch.bfloat16, 4, big)[0] == "fused"
    assert gemm.choose("gemm_all_reduce", 1 << 20, 4096, 1024, torch.bfloat16, 1, big)[0] == "unfused"
    assert gemm.choose("gemm_all_reduce", 1, 4096, 1024, torch.bfloat16, 4, big, "fused")[0] == "fused"
    assert gemm.choose("gemm_all_reduce", 1 << 20, 4096, 1024, torch.bfloat16, 4, big, "unfused")[0] == "unfused"
    path, why = gemm.choose("gemm_all_reduce", 1 << 20, 4096, 1024, torch.float32, 4, big)
    assert path == "unfused" and "float32" in why
    with pytest.raises(ValueError, match=r"gemm_all_reduce: path='fused' cannot run here: dtype float32"):
        gemm.choose("gemm_all_reduce", 8, 4096, 1024, torch.float32, 4, big, "fused")
    with pytest.raises(ValueError, match=r"K=1001 and N=4096 must be multiples of 8"):
        gemm.choose("gemm_reduce_scatter", 8, 4096, 1001, torch.float16, 4, big, "fused")
    with pytest.raises(ValueError, match=r"partial .* exceeds the workspace"):
        gemm.choose("gemm_reduce_scatter", 1 << 16, 4096, 1024, torch.float16, 4, big, "fused")
    monkeypatch.setenv(gemm.PATH_ENV, "fused")
    assert gemm.choose("gemm_all_reduce", 1, 4096, 1024, torch.bfloat16, 4, big)[0] == "fused"
    monkeypatch.setenv(gemm.PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="SYMCOMM_GEMM_PATH='fastest'"):
        gemm.choose("gemm_all_reduce", 1, 4096, 1024, torch.bfloat16, 4, big)


@pytest.mark.parametrize("op, extra", [("gemm_all_reduce", (None,)), ("gemm_reduce_scatter", ()),
                                       ("all_gather_gemm", ())])
def test_the_nvshmem_impl_sees_the_path_however_the_call_spells_it(world, monkeypatch, op, extra):
    from symcomm import ops

    asked = []
    monkeypatch.setattr(gemm, "path_for", lambda name, a, b, path: asked.append((name, path)) or "fused")
    monkeypatch.setattr(gemm, "fused", lambda name, a, b, *bias: ("fused", bias))
    impl = getattr(ops, f"nvshmem_{op}")
    a = torch.ones(4, 8)
    assert impl(a, a.t()) == ("fused", extra)
    assert impl(a, a.t(), *extra, "unfused") == ("fused", extra)
    assert asked == [(op, "auto"), (op, "unfused")]
