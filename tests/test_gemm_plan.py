"""The host side of the fused GEMM ops (python/symcomm/gemm.py), on CPU.

The kernels are replaced by a stand-in with their documented semantics (csrc/gemm/gemm.h): gemm()
computes D[l] = A[l] @ B (+ bias) in float64 from the very addresses, leading dimensions and batch
strides it is given, and gemm_comm() does its exchange over gloo, through the workspace areas it is
given (all-reduce: every tile's owner reduces it into its result area, and the others copy it from
there). What runs for real is everything the host decides: the path, the pieces and their offsets in
a small workspace, the operand layouts (b as given or transposed, a copied when its rows are not
aligned), the output layout, which rank adds the bias, the SM split, and the streams: gemm_begin, the
fork to the side stream, the two kernels and the join run through a model of CUDA streams, in which a
kernel runs only after what its stream has queued before it, and the comm kernel and its GEMM wait
for each other's tags as on the GPU. The stand-in checks what the kernels rely on: every rank
launches the same kernels with the same sizes, 16-byte alignment, the tile limits, one gemm_begin per
call ahead of both kernels, every range inside the memory it must be in (partials and results in the
workspace's data area and apart, outputs in the op's own output), and nothing left unjoined.
"""

from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import symcomm
from harness import Memory, assert_gemm_close, every_rank, read, write
from symcomm import gemm, runtime, streams

pytestmark = pytest.mark.dist

DTYPES = {1: torch.float16, 2: torch.bfloat16}
WORKSPACE_DATA = 40 << 10  # small, so that products come in pieces
SMS = 132  # an H100 / H200 SXM


def view(address: int, dtype: torch.dtype, shape, strides) -> tuple[torch.Tensor, torch.Tensor]:
    """(the bytes under a strided [shape] of `dtype` at `address`, the strided view into them)."""
    isz = torch.empty((), dtype=dtype).element_size()
    raw = read(address, (sum((s - 1) * st for s, st in zip(shape, strides)) + 1) * isz)
    return raw, raw.view(dtype).as_strided(shape, strides)


def span(address: int, dtype: torch.dtype, shape, strides) -> int:
    """Bytes from `address` to the end of a strided [shape] of `dtype` (0 when it is empty)."""
    if 0 in shape:
        return 0
    return (sum((s - 1) * st for s, st in zip(shape, strides)) + 1) * torch.empty((), dtype=dtype).element_size()


def same_on_every_rank(what) -> None:
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, what)
    assert all(w == what for w in everyone), f"ranks launched different kernels: {everyone}"


class Task:
    """Work queued on a stream: it runs after `after` (its stream's previous task, and the tails of
    the streams it was made to wait for)."""

    def __init__(self, name, run, after):
        self.name, self.run, self.after = name, run, [t for t in after if t is not None]
        self.state = "queued"

    def follows(self, other) -> bool:
        return any(t is other or t.follows(other) for t in self.after)


class Streams:
    """CUDA streams, as far as the fused path uses them: queues with cross-stream waits. Nothing runs
    at launch; `finish(task)` runs it and everything it must follow, in order."""

    def __init__(self):
        self.tails = {}
        self.tasks = []

    def stream(self):
        streams = self

        class Stream:
            """torch.cuda.Stream, on the model."""

            device = torch.device("cpu")

            def __init__(self, device=None):
                self.cuda_stream = len(streams.tails)
                streams.tails[self.cuda_stream] = None

            def wait_stream(self, other):
                streams.submit(self.cuda_stream, "wait", lambda: None, streams.tails[other.cuda_stream])

        return Stream

    def submit(self, stream, name, run, extra=None):
        task = Task(name, run, [self.tails[stream], extra])
        self.tails[stream] = task
        self.tasks.append(task)
        return task

    def finish(self, task):
        if task.state == "done":
            return
        assert task.state == "queued", f"{task.name} waits for something that waits for it: a deadlock"
        task.state = "running"
        for before in task.after:
            self.finish(before)
        task.run()
        task.state = "done"

    def synchronize(self, stream):
        """What the caller may read once the op returned: all that `stream` has queued. Work never joined
        into it would still be running on the GPU."""
        if self.tails[stream] is not None:
            self.finish(self.tails[stream])
        left = [t.name for t in self.tasks if t.state != "done"]
        assert not left, f"{left} never joined the caller's stream: the output could be read before they finish"


class Kernels:
    """Stand-in for symcomm._C's fused GEMM entry points."""

    max_blocks = 64
    max_peers = 8

    def __init__(self, memory: Memory, streams: Streams):
        self.memory, self.streams = memory, streams
        self.launches = []
        self.bias_added = False
        self.call = None  # this call's tasks: its gemm_begin, GEMM and comm kernel

    @staticmethod
    def workspace_data_offset():
        return 256

    def gemm_begin(self, workspace, stream):
        self.call = {"begin": self.streams.submit(stream, "gemm_begin", lambda: None)}

    def _kernel(self, kind, stream, run, where):
        """Queues one of a fused call's two kernels; `where` is the workspace area it shares with the
        other one (the partial sums or the gathered A), which both must agree on."""
        call = self.call
        assert call is not None and kind not in call, f"a {kind} kernel without its own gemm_begin"
        other = call.get("where")
        assert other is None or other == where, f"the GEMM and the comm kernel disagree on the shared area: " \
            f"{other} and {where}"
        call["where"] = where

        def checked():
            assert call[kind].follows(call["begin"]), f"the {kind} kernel may run before its call's gemm_begin"
            run(call)

        call[kind] = self.streams.submit(stream, kind, checked)

    def gemm(self, workspace, m, n, k, batches, a, lda, a_batch, b, ldb, b_k_major, d, ldd, d_batch, bias, dtype,
             tag_tiles, wait_bands, raster_along_m, sms, stream):
        same_on_every_rank(("gemm", m, n, k, batches, tag_tiles, wait_bands, raster_along_m, sms))
        assert a % 16 == 0 and b % 16 == 0 and d % 16 == 0 and lda % 8 == 0 and ldb % 8 == 0 and ldd % 8 == 0
        assert lda >= k and ldb >= (k if b_k_major else n) and ldd >= n and sms >= 1
        assert sms + (self.blocks if dist.get_world_size() > 1 else 0) <= runtime.sm_count(), "SMs oversubscribed"
        self.sms = sms
        assert not tag_tiles or batches * -(-m // gemm.TILE_M) * -(-n // gemm.TILE_N) <= gemm.MAX_TILES
        t, mem = DTYPES[dtype], self.memory
        shapes = {"A": ((batches, m, k), (a_batch, lda, 1)), "B": ((k, n), (1, ldb) if b_k_major else (ldb, 1)),
                  "D": ((batches, m, n), (d_batch, ldd, 1))}
        # all_gather_gemm's A is the gathered A in the workspace; a tagged D is the partial sums there.
        mem.area("A", a, span(a, t, *shapes["A"]), "data" if wait_bands else "operand")
        mem.area("B", b, span(b, t, *shapes["B"]), "operand")
        mem.area("D", d, span(d, t, *shapes["D"]), "data" if tag_tiles else "output")
        mem.area("bias", bias, span(bias, t, (n,), (1,)) if bias else 0, "operand")
        self.launches.append("gemm")

        def run(call):
            if wait_bands:
                self.streams.finish(call["comm"])  # the GEMM loads each band of A once the comm kernel has it
            _, av = view(a, t, *shapes["A"])
            _, bv = view(b, t, *shapes["B"])
            raw, dv = view(d, t, *shapes["D"])
            out = av.double() @ bv.double()
            if bias:
                self.bias_added = True
                out += view(bias, t, (n,), (1,))[1].double()
            dv.copy_(out.to(t))
            write(d, raw)

        if wait_bands:
            self._kernel("gemm", stream, run, ("gathered A", a, lda, a_batch, batches * m))
        elif tag_tiles:
            self._kernel("gemm", stream, run, ("partial sums", d, ldd, batches * m))
        else:
            self.streams.submit(stream, "gemm", lambda: run(None))

    @property
    def blocks(self):
        return gemm._comm_blocks()  # asked of the host, since the GEMM is queued before the comm kernel

    def gemm_comm(self, workspace, mode, m, n, k, partial_offset, result_offset, src, src_pitch, dst, dst_pitch,
                  dtype, blocks, stream):
        same_on_every_rank(("comm", mode, m, n, k, partial_offset, result_offset, blocks))
        world, t, mem = dist.get_world_size(), DTYPES[dtype], self.memory
        assert 2 <= blocks <= self.max_blocks and partial_offset % 16 == 0 and result_offset % 16 == 0
        assert (src | dst) % 16 == 0 and (n | k | src_pitch | dst_pitch) % 8 == 0
        assert mode != 1 or m % world == 0
        partial = workspace + partial_offset
        if mode == 2:
            gathered = mem.area("gathered A", partial, span(partial, t, (world, m, k), (m * k, k, 1)), "data")
            mem.area("source rows", src, span(src, t, (m, k), (src_pitch, 1)), "operand")
            areas = {"gathered A": gathered}
        else:
            rows = m if mode == 0 else m // world
            areas = {"partial sums": mem.area("partial sums", partial, span(partial, t, (m, n), (n, 1)), "data"),
                     "destination": mem.area("destination", dst, span(dst, t, (rows, n), (dst_pitch, 1)), "output")}
            if mode == 0:
                result = workspace + result_offset
                areas["reduced tiles"] = mem.area("reduced tiles", result, span(result, t, (m, n), (n, 1)), "data")
        mem.disjoint(**areas)
        self.launches.append(("all_reduce", "reduce_scatter", "all_gather")[mode])

        def run(call):
            if mode != 2:
                self.streams.finish(call["gemm"])  # the comm kernel reduces tiles once every GEMM has tagged them
            self._exchange(workspace, mode, m, n, k, partial, result_offset, src, src_pitch, dst, dst_pitch, t)

        self._kernel("comm", stream, run, ("gathered A", partial, k, m * k, world * m) if mode == 2
                     else ("partial sums", partial, n, m))

    @staticmethod
    def _exchange(workspace, mode, m, n, k, partial, result_offset, src, src_pitch, dst, dst_pitch, t):
        world, rank = dist.get_world_size(), dist.get_rank()
        if mode == 2:
            # Every rank's [m, k] rows land in the gathered [world, m, k] A, before the GEMM reads it.
            mine = view(src, t, (m, k), (src_pitch, 1))[1].contiguous()
            every = [torch.empty_like(mine) for _ in range(world)]
            dist.all_gather(every, mine)
            raw, gathered = view(partial, t, (world, m, k), (m * k, k, 1))
            gathered.copy_(torch.stack(every))
            write(partial, raw)
            return
        total = view(partial, t, (m, n), (n, 1))[1].double()
        dist.all_reduce(total)
        if mode == 1:
            raw, out = view(dst, t, (m // world, n), (dst_pitch, 1))
            out.copy_(total.chunk(world)[rank].to(t))
            write(dst, raw)
            return
        # Tile t's owner (t % world) reduces it into its result area and its output; the other ranks copy
        # it from the owner's result area.
        result = workspace + result_offset
        owned_raw, owned = view(result, t, (m, n), (n, 1))
        tiles_m, tiles_n = -(-m // gemm.TILE_M), -(-n // gemm.TILE_N)
        tiles = [(i * gemm.TILE_M, j * gemm.TILE_N) for j in range(tiles_n) for i in range(tiles_m)]
        for index, (r0, c0) in enumerate(tiles):
            if index % world == rank:
                owned[r0:r0 + gemm.TILE_M, c0:c0 + gemm.TILE_N] = total[r0:r0 + gemm.TILE_M, c0:c0 + gemm.TILE_N]
        write(result, owned_raw)
        everyone = [None] * world
        dist.all_gather_object(everyone, read(result, m * n * owned.element_size()))
        raw, out = view(dst, t, (m, n), (dst_pitch, 1))
        for index, (r0, c0) in enumerate(tiles):
            reduced = everyone[index % world].view(t).view(m, n)
            out[r0:r0 + gemm.TILE_M, c0:c0 + gemm.TILE_N] = reduced[r0:r0 + gemm.TILE_M, c0:c0 + gemm.TILE_N]
        write(dst, raw)


@pytest.fixture
def kernels(world, monkeypatch):
    if world.backend != "torch":
        pytest.skip("the stand-in reads and writes the workspace from the host: torch backend (CPU memory) only")
    workspace = symcomm.empty((256 + WORKSPACE_DATA,), torch.uint8)
    memory, model = Memory(workspace, 256), Streams()
    fake = Kernels(memory, model)
    Stream = model.stream()
    caller, side = Stream(), Stream()
    monkeypatch.setattr(runtime, "load_extension", lambda: fake)
    monkeypatch.setattr(runtime, "workspace", lambda: workspace)
    monkeypatch.setattr(runtime, "sm_count", lambda: SMS)
    monkeypatch.setattr(streams, "current", lambda: caller)
    monkeypatch.setattr(streams, "side", lambda: side)
    monkeypatch.setattr(gemm, "torch", memory.recording())
    copy = gemm._aligned_copy
    monkeypatch.setattr(gemm, "_aligned_copy", lambda t: memory.operands.append(copy(t)) or memory.operands[-1])
    fused = gemm.fused

    def fused_then_read(op, a, b, bias=None):
        memory.operands += [a, b] + ([bias] if bias is not None else [])
        out = fused(op, a, b, bias)
        model.synchronize(caller.cuda_stream)
        return out

    monkeypatch.setattr(gemm, "fused", fused_then_read)
    yield fake
    symcomm.free(workspace)


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
FUSED_DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("b_layout, a_layout", LAYOUTS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("m", [1, 7, 300])
def test_gemm_all_reduce(world, gen, kernels, m, bias, b_layout, a_layout, dtype):
    k, n = 24, 48
    a_all, b_all = operands(world, gen, m, k, n, dtype, b_layout, a_layout)
    c = torch.randn(n, generator=gen).to(dtype) if bias else None
    out = gemm.fused("gemm_all_reduce", a_all[world.rank], b_all[world.rank], c)
    assert_gemm_close(out, a_all, b_all, c)
    if world.world_size > 1:
        pieces = -(-m // gemm.fused_plan("gemm_all_reduce", m, n, k, dtype, world.world_size, WORKSPACE_DATA).rows)
        # The kernel that the other waits for is queued first: here the GEMM (the comm kernel waits for its tiles).
        assert kernels.launches == ["gemm", "all_reduce"] * pieces
        assert m < 300 or pieces > 1, "a product larger than the workspace must come in pieces"
    if bias:
        assert kernels.bias_added == (world.rank == 0), "exactly one rank adds the bias"


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("b_layout, a_layout", LAYOUTS)
@pytest.mark.parametrize("m_per_rank", [1, 7, 70])
def test_gemm_reduce_scatter(world, gen, kernels, m_per_rank, b_layout, a_layout, dtype):
    m, k, n = m_per_rank * world.world_size, 16, 24
    a_all, b_all = operands(world, gen, m, k, n, dtype, b_layout, a_layout)
    out = gemm.fused("gemm_reduce_scatter", a_all[world.rank], b_all[world.rank])
    assert_gemm_close(out, a_all, b_all, rows=slice(world.rank * m_per_rank, (world.rank + 1) * m_per_rank))
    if world.world_size > 1:
        assert kernels.launches == ["gemm", "reduce_scatter"]


@pytest.mark.parametrize("dtype", FUSED_DTYPES)
@pytest.mark.parametrize("b_layout, a_layout", LAYOUTS)
@pytest.mark.parametrize("m", [1, 7, 200, 700])
def test_all_gather_gemm(world, gen, kernels, m, b_layout, a_layout, dtype):
    k, n = 32, 16
    a_all, b_all = operands(world, gen, m, k, n, dtype, b_layout, a_layout)
    b = b_all[world.rank]
    assert_gemm_close(gemm.fused("all_gather_gemm", a_all[world.rank], b), a_all, [b], gathered=True)
    if world.world_size > 1:
        rows = gemm.fused_plan("all_gather_gemm", m, n, k, dtype, world.world_size, WORKSPACE_DATA).rows
        # The GEMM waits for the comm kernel's bands, so the comm kernel is queued first.
        assert kernels.launches == ["all_gather", "gemm"] * -(-m // rows)
        assert m < 700 or rows < m, "a gathered A larger than the workspace must come in pieces"


@pytest.mark.parametrize("sms", [132, 114, 78, 66, 33, 16, 8])
@pytest.mark.parametrize("op", list(gemm.MODES))
def test_the_gemm_and_the_comm_kernel_share_the_sms(world, gen, kernels, monkeypatch, op, sms):
    """Real SM counts (a whole H100/H200, a PCIe H100, MPS shares): the comm kernel's blocks and the
    GEMM's persistent grid together fill the SMs and never exceed them (the stand-in checks that)."""
    monkeypatch.setattr(runtime, "sm_count", lambda: sms)
    m = 8 * world.world_size
    a_all, b_all = operands(world, gen, m, 16, 16, torch.bfloat16, "kn", "contiguous")
    gemm.fused(op, a_all[world.rank], b_all[world.rank])
    blocks = gemm._comm_blocks()
    assert 2 <= blocks <= kernels.max_blocks and blocks == max(2, round(sms * gemm._TUNING["gemm_comm_sm_share"]))
    assert kernels.sms == (sms - blocks if world.world_size > 1 else sms), "the GEMM must get every SM left"


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
    # More ranks than the fused comm kernel reads by load/store: unfused (over the remote path), saying why.
    path, why = gemm.choose("gemm_all_reduce", 1 << 20, 4096, 1024, torch.bfloat16, 16, big, max_peers=8)
    assert (path, why) == ("unfused", "16 ranks: the fused kernels read at most 8 peers by load/store")
    with pytest.raises(ValueError, match=r"path='fused' cannot run here: 16 ranks: the fused kernels read at most 8"):
        gemm.choose("gemm_all_reduce", 1 << 20, 4096, 1024, torch.bfloat16, 16, big, "fused", max_peers=8)
    monkeypatch.setenv(gemm.PATH_ENV, "fused")
    assert gemm.choose("gemm_all_reduce", 1, 4096, 1024, torch.bfloat16, 4, big)[0] == "fused"
    monkeypatch.setenv(gemm.PATH_ENV, "fastest")
    with pytest.raises(ValueError, match="SYMCOMM_GEMM_PATH='fastest'"):
        gemm.choose("gemm_all_reduce", 1, 4096, 1024, torch.bfloat16, 4, big)


def test_the_fused_path_runs_on_sm_90_only(world):
    big = 64 << 20
    for capability in (None, (9, 0)):  # None: the emulated device, which runs the fused kernels too
        assert gemm.choose("gemm_all_reduce", 1 << 20, 4096, 1024, torch.bfloat16, 4, big,
                           capability=capability)[0] == "fused"
    for capability in ((10, 0), (9, 1), (8, 0)):
        path, why = gemm.choose("gemm_all_reduce", 1 << 20, 4096, 1024, torch.bfloat16, 4, big, capability=capability)
        assert path == "unfused" and why.startswith(f"this GPU has compute capability {capability[0]}.{capability[1]}")
        with pytest.raises(ValueError, match=rf"path='fused' cannot run here: this GPU has compute capability "
                                             rf"{capability[0]}\.{capability[1]}; the fused GEMM's core is sm_90a"):
            gemm.choose("gemm_all_reduce", 1 << 20, 4096, 1024, torch.bfloat16, 4, big, "fused", capability=capability)


@pytest.fixture
def nvshmem_host(monkeypatch):
    """What path_for asks of the runtime, as on a 4-rank nvshmem backend on an H100 (SM 9.0), with a
    stream capture that the test switches on (CPU torch cannot capture, nor be asked)."""
    ext = SimpleNamespace(workspace_data_offset=lambda: 256, max_peers=8)
    monkeypatch.setattr(runtime, "load_extension", lambda: ext)
    monkeypatch.setattr(runtime, "workspace", lambda: torch.empty(256 + (64 << 20), dtype=torch.uint8))
    monkeypatch.setattr(runtime, "world_size", lambda: 4)
    monkeypatch.setattr(runtime, "all_reachable", lambda: True)
    monkeypatch.setattr(runtime, "capability", lambda: (9, 0))
    monkeypatch.setattr(runtime, "emulated", lambda: False)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    return capturing


@pytest.mark.parametrize("op", list(gemm.MODES))
def test_a_cuda_graph_capture_takes_the_unfused_path(nvshmem_host, op):
    """Captured, the fused call's GEMM and comm kernel become sibling graph nodes that a replay may run
    one after the other: the one that waits for the other would then wait until its device-side timeout."""
    a, b = torch.empty(2048, 1024, dtype=torch.bfloat16), torch.empty(1024, 4096, dtype=torch.bfloat16)
    assert gemm.path_for(op, a, b) == "fused"
    nvshmem_host[0] = True
    assert gemm.path_for(op, a, b) == "unfused"
    assert gemm.path_for(op, a, b, "unfused") == "unfused"
    with pytest.raises(ValueError, match=rf"{op}: path='fused' cannot run here: a CUDA graph is being captured: the "
                                         "GEMM and the comm kernel"):
        gemm.path_for(op, a, b, "fused")


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
