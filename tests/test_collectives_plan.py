"""The host side of the nvshmem collectives (python/symcomm/collectives.py), on CPU.

The CUDA kernels are replaced by a stand-in with their documented semantics (collectives.h) that
moves, over gloo, exactly the bytes each rank would read through peer pointers: every peer's source
rows, and for the two-shot all-reduce each rank's reduced share through its result area in the
workspace. What runs for real is everything the host decides: staging or in place, chunking, rows
and pitches, output layout, the algorithm. The stand-in also checks the rules the kernels depend on:
every rank launches the same sequence of kernels (same sizes, same vector width), a 16-byte claim
holds for every address and size it covers, every range a launch touches lies inside the memory it
must (sources symmetric, staging and results in the workspace's data area, destinations in the
op's own output) and the areas of one launch do not overlap.
"""

import pytest
import torch
import torch.distributed as dist

import symcomm
from harness import Memory, assert_close, every_rank, read, sum_ref, write
from symcomm import collectives, runtime, streams

pytestmark = pytest.mark.dist

DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64}
DATA_BYTES = 1024  # the workspace's data area: small, so that messages chunk


def everyone(what) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, what)
    return out


class Kernels:
    """Stand-in for symcomm._C's collective entry points."""

    max_peers = 8

    def __init__(self, memory: Memory):
        self.memory = memory
        self.launches = []

    @staticmethod
    def workspace_data_offset():
        return 256

    @staticmethod
    def _fetch(src, src_pitch, row, lo, hi):
        """Bytes [lo, hi) of row `row` of every peer's source (as this rank asks for them), like the
        kernels' peer-pointer reads: the same (row, lo, hi) may differ per rank."""
        sent = everyone([read(src + r * src_pitch + a, b - a) for r, a, b in everyone((row, lo, hi))])
        return [peer[dist.get_rank()] for peer in sent]

    def _launch(self, kind, workspace, src, src_pitch, row, length, dst, dst_pitch, result_offset, dtype, vec16, _):
        plan = (kind, length, dst_pitch if kind == "gather" else 0, result_offset, dtype, vec16)
        assert all(p == plan for p in everyone(plan)), f"ranks launched different kernels: {everyone(plan)}"
        if vec16:
            assert all(v % 16 == 0 for v in (src, dst, workspace, src_pitch, dst_pitch, result_offset)), plan
        self.launches.append(kind)
        world, me, m = dist.get_world_size(), dist.get_rank(), self.memory
        # Peers read the rows they consume from this rank's source in place: it must be symmetric.
        rows = [m.area(f"source row {r}", src + r * src_pitch, length, "symmetric") for r in sorted(set(everyone(row)))]
        outs = [m.area(f"destination row {q}", dst + q * dst_pitch, length, "output")
                for q in range(world if kind == "gather" else 1)]
        areas = {"source": (rows[0][0], rows[-1][1]), "destination": (outs[0][0], outs[-1][1])}
        if kind == "two_shot":
            isz = DTYPES[dtype].itemsize
            n, unit = length // isz, 16 // isz if vec16 else 1
            bounds = [n // unit * q // world * unit for q in range(world)] + [n]
            shares = [(bounds[q] * isz, bounds[q + 1] * isz) for q in range(world)]
            result = workspace + result_offset
            areas["result"] = m.area("two-shot result area", result, max(b - a for a, b in shares), "data")
        m.disjoint(**areas)
        if kind == "gather":
            for q, data in enumerate(self._fetch(src, src_pitch, row, 0, length)):
                write(dst + q * dst_pitch, data)
        elif kind == "reduce":
            write(dst, self._sum(self._fetch(src, src_pitch, row, 0, length), DTYPES[dtype]))
        else:
            # Each rank reduces its share into its result area; then every rank reads each share there.
            lo, hi = shares[me]
            write(result, self._sum(self._fetch(src, src_pitch, 0, lo, hi), DTYPES[dtype]))
            reduced = everyone(read(result, hi - lo))
            for (lo, _), share in zip(shares, reduced):
                write(dst + lo, share)

    @staticmethod
    def _sum(parts, t):
        return sum(p.view(t).double() for p in parts).to(t).view(torch.uint8)

    def reduce(self, *args):
        self._launch("reduce", *args)

    def gather(self, *args):
        self._launch("gather", *args)

    def two_shot_all_reduce(self, *args):
        self._launch("two_shot", *args)


@pytest.fixture
def kernels(world, monkeypatch):
    """collectives.py running against the stand-in, with a small workspace so that messages chunk."""
    if world.backend != "torch":
        pytest.skip("the stand-in reads and writes the workspace from the host: torch backend (CPU memory) only")
    workspace = symcomm.empty((256 + DATA_BYTES,), torch.uint8)
    memory = Memory(workspace, 256)
    fake = Kernels(memory)
    monkeypatch.setattr(runtime, "load_extension", lambda: fake)
    monkeypatch.setattr(runtime, "workspace", lambda: workspace)
    monkeypatch.setattr(streams, "current", lambda: streams.EmulatedStream(0))  # any stream: nothing is queued
    monkeypatch.setattr(collectives, "torch", memory.recording())
    yield fake
    symcomm.free(workspace)


PLACES = ["staged", "in-place", "misaligned"]


def make(world, gen, sym, shape, dtype, place):
    """Every rank's input, and this rank's: a plain tensor, a symmetric one, or a symmetric one that
    starts one element into its allocation (not 16-byte aligned: it must be staged)."""
    xs = every_rank(gen, world.world_size, shape, dtype, "cpu")
    x = xs[world.rank]
    if place == "staged":
        return xs, x
    n = x.numel()
    start = 1 if place == "misaligned" else 0
    return xs, sym((n + start,), dtype)[start:].view(shape).copy_(x)


SIZES = [(1,), (7,), (33, 5), (300,), (1000,)]


def assert_chunked(kernels, row_bytes, capacity):
    """A row larger than the staging area per row must have come in several launches."""
    if dist.get_world_size() > 1 and row_bytes > capacity:
        assert len(kernels.launches) > 1, f"a {row_bytes}-byte row with {capacity} bytes of staging was not chunked"


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("algorithm", ["one_shot", "two_shot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SIZES)
def test_all_reduce(world, gen, kernels, sym, shape, dtype, algorithm, place):
    xs, x = make(world, gen, sym, shape, dtype, place)
    out = collectives.all_reduce(x, algorithm)
    assert_close(out, *sum_ref(xs), dtype=dtype)
    if world.world_size > 1:
        assert set(kernels.launches) == {"reduce" if algorithm == "one_shot" else "two_shot"}
        assert_chunked(kernels, x.numel() * x.element_size(), DATA_BYTES)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.int64])
# The last two are larger than the staging area and not a multiple of 16 bytes.
@pytest.mark.parametrize("shape, dim", [((1,), 0), ((300,), 0), ((3, 37), 1), ((1, 4, 70), 1), ((5, 2, 3), 2),
                                        ((3, 347), 1), ((701,), 0)])
def test_all_gather(world, gen, kernels, sym, shape, dim, dtype, place):
    xs, x = make(world, gen, sym, shape, dtype, place)
    out = collectives.all_gather(x, dim)
    assert torch.equal(out.view(torch.uint8), torch.cat(xs, dim).view(torch.uint8))
    assert_chunked(kernels, x.numel() * x.element_size(), DATA_BYTES)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, dim", [((1,), 0), ((97,), 0), ((3, 40), 1), ((1, 8, 5), 1), ((2, 3), 0),
                                        ((601,), 0), ((3, 150), 1)])
def test_reduce_scatter(world, gen, kernels, sym, shape, dim, dtype, place):
    shape = list(shape)
    shape[dim] *= world.world_size
    xs, x = make(world, gen, sym, shape, dtype, place)
    ref, scale = (t.chunk(world.world_size, dim)[world.rank] for t in sum_ref(xs))
    assert_close(collectives.reduce_scatter(x, dim), ref, scale, dtype=dtype)
    assert_chunked(kernels, x.numel() * x.element_size() // world.world_size, DATA_BYTES // world.world_size)


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("rows, tail", [(1, ()), (3, (5,)), (70, (3,)), (201, (7,))])
def test_all_to_all(world, gen, kernels, sym, rows, tail, dtype, place):
    xs, x = make(world, gen, sym, (rows * world.world_size, *tail), dtype, place)
    expected = torch.cat([t.chunk(world.world_size, 0)[world.rank] for t in xs])
    assert torch.equal(collectives.all_to_all(x).view(torch.uint8), expected.view(torch.uint8))
    assert_chunked(kernels, x.numel() * x.element_size() // world.world_size, DATA_BYTES // world.world_size)


def test_auto_picks_by_size_and_the_env_overrides(world, monkeypatch):
    cut = collectives._TUNING["all_reduce_one_shot_max_bytes"]["default"]["4"]
    assert collectives.choose_all_reduce(cut, 4) == "one_shot"
    assert collectives.choose_all_reduce(cut + 1, 4) == "two_shot"
    assert collectives.choose_all_reduce(1, 4, "two_shot") == "two_shot"
    monkeypatch.setenv(collectives.ALGORITHM_ENV, "two_shot")
    assert collectives.choose_all_reduce(1, 4) == "two_shot"
    monkeypatch.setenv(collectives.ALGORITHM_ENV, "fast")
    with pytest.raises(ValueError, match="SYMCOMM_ALL_REDUCE_ALGORITHM='fast'"):
        collectives.choose_all_reduce(1, 4)
