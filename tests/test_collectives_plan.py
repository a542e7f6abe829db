"""The host side of the nvshmem collectives (python/symcomm/collectives.py), on CPU.

The CUDA kernels are replaced by a stand-in with their documented semantics (collectives.h) that
moves, over gloo, exactly the rows each rank would read through peer pointers. What runs for real is
everything the host decides: staging or in place, chunking, rows and pitches, output layout, the
algorithm. The stand-in also checks the two rules the kernels depend on: every rank launches the
same sequence of kernels (same sizes, same vector width), and a 16-byte claim holds for every
address and size it covers.
"""

import pytest
import torch
import torch.distributed as dist

import symcomm
from harness import assert_close, every_rank, read, sum_ref, write
from symcomm import collectives, runtime

pytestmark = pytest.mark.dist

DTYPES = {0: torch.float32, 1: torch.float16, 2: torch.bfloat16, 3: torch.float64}


class Kernels:
    """Stand-in for symcomm._C's collective entry points."""

    max_peers = 8

    def __init__(self):
        self.launches = []

    @staticmethod
    def workspace_data_offset():
        return 256

    def _rows_for_me(self, src, src_pitch, row, length):
        """Every peer's row `row` (as this rank asks for it), like the kernels' peer-pointer reads."""
        world = dist.get_world_size()
        wanted = [None] * world
        dist.all_gather_object(wanted, row)
        send = [read(src + r * src_pitch, length) for r in wanted]
        recv = [torch.empty(length, dtype=torch.uint8) for _ in range(world)]
        dist.all_to_all(recv, send)
        return recv

    def _launch(self, kind, workspace, src, src_pitch, row, length, dst, dst_pitch, result_offset, dtype, vec16, _):
        plan = (kind, length, dst_pitch if kind == "gather" else 0, result_offset, dtype, vec16)
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, plan)
        assert all(p == plan for p in everyone), f"ranks launched different kernels: {everyone}"
        if vec16:
            assert all(v % 16 == 0 for v in (src, dst, workspace, src_pitch, dst_pitch, result_offset)), plan
        self.launches.append(kind)
        rows = self._rows_for_me(src, src_pitch, row, length)
        if kind == "gather":
            for q, data in enumerate(rows):
                write(dst + q * dst_pitch, data)
        else:
            t = DTYPES[dtype]
            total = sum(r.view(t).double() for r in rows)
            write(dst, total.to(t).view(torch.uint8))

    def reduce(self, *args):
        self._launch("reduce", *args)

    def gather(self, *args):
        self._launch("gather", *args)

    def two_shot_all_reduce(self, *args):
        self._launch("two_shot", *args)


@pytest.fixture
def kernels(world, monkeypatch):
    """collectives.py running against the stand-in, with a small workspace so that messages chunk."""
    fake = Kernels()
    workspace = symcomm.empty((256 + 1024,), torch.uint8)
    monkeypatch.setattr(runtime, "load_extension", lambda: fake)
    monkeypatch.setattr(runtime, "workspace", lambda: workspace)
    yield fake
    symcomm.free(workspace)


def make(world, gen, sym, shape, dtype, symmetric):
    xs = every_rank(gen, world.world_size, shape, dtype, "cpu")
    x = xs[world.rank]
    return xs, sym(shape, dtype).copy_(x) if symmetric else x


SIZES = [(1,), (7,), (33, 5), (300,), (1000,)]


@pytest.mark.parametrize("symmetric", [False, True], ids=["staged", "in-place"])
@pytest.mark.parametrize("algorithm", ["one_shot", "two_shot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", SIZES)
def test_all_reduce(world, gen, kernels, sym, shape, dtype, algorithm, symmetric):
    xs, x = make(world, gen, sym, shape, dtype, symmetric)
    out = collectives.all_reduce(x, algorithm)
    assert_close(out, *sum_ref(xs), dtype=dtype)
    if world.world_size > 1:
        assert set(kernels.launches) == {"reduce" if algorithm == "one_shot" else "two_shot"}
        if x.numel() * x.element_size() > 1024:
            assert len(kernels.launches) > 1, "a message larger than the staging area must be chunked"


@pytest.mark.parametrize("symmetric", [False, True], ids=["staged", "in-place"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float8_e4m3fn, torch.int64])
@pytest.mark.parametrize("shape, dim", [((1,), 0), ((300,), 0), ((3, 37), 1), ((1, 4, 70), 1), ((5, 2, 3), 2)])
def test_all_gather(world, gen, kernels, sym, shape, dim, dtype, symmetric):
    xs, x = make(world, gen, sym, shape, dtype, symmetric)
    out = collectives.all_gather(x, dim)
    assert torch.equal(out.view(torch.uint8), torch.cat(xs, dim).view(torch.uint8))


@pytest.mark.parametrize("symmetric", [False, True], ids=["staged", "in-place"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, dim", [((1,), 0), ((97,), 0), ((3, 40), 1), ((1, 8, 5), 1), ((2, 3), 0)])
def test_reduce_scatter(world, gen, kernels, sym, shape, dim, dtype, symmetric):
    shape = list(shape)
    shape[dim] *= world.world_size
    xs, x = make(world, gen, sym, shape, dtype, symmetric)
    ref, scale = (t.chunk(world.world_size, dim)[world.rank] for t in sum_ref(xs))
    assert_close(collectives.reduce_scatter(x, dim), ref, scale, dtype=dtype)


@pytest.mark.parametrize("symmetric", [False, True], ids=["staged", "in-place"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.uint8])
@pytest.mark.parametrize("rows, tail", [(1, ()), (3, (5,)), (70, (3,))])
def test_all_to_all(world, gen, kernels, sym, rows, tail, dtype, symmetric):
    xs, x = make(world, gen, sym, (rows * world.world_size, *tail), dtype, symmetric)
    expected = torch.cat([t.chunk(world.world_size, 0)[world.rank] for t in xs])
    assert torch.equal(collectives.all_to_all(x).view(torch.uint8), expected.view(torch.uint8))


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
