"""Shared test fixtures. Tests marked `dist` run once per rank under torchrun (tests/run.py runs them
at world 1, 2 and 4); run with plain pytest they run as a world of one."""

import os
import random
import zlib

import pytest
import torch
import torch.distributed as dist

import symcomm
from harness import RankInfo
from symcomm import runtime


def pytest_configure(config):
    config.addinivalue_line("markers", "dist: runs on every rank under torchrun (world 1, 2, 4)")
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU and the nvshmem backend")
    config.addinivalue_line("markers", "real_gpu(why): needs a real GPU, not the emulated device (CUDA graphs, "
                            "timings, MPS): skipped there, with the reason")
    rank = os.environ.get("RANK")
    if rank is not None and config.option.xmlpath:
        config.option.xmlpath = config.option.xmlpath.replace("{rank}", rank)


def pytest_collection_modifyitems(config, items):
    # tests/run.py selects GPU tests only where they can run (and then forces the nvshmem backend,
    # so a broken install fails loudly); this only keeps a plain `pytest` on a CPU machine usable.
    if runtime.emulated():
        # The nvshmem backend on the emulated device (SYMCOMM_EMU_MODULE): the GPU suites run, but not
        # what only a real GPU has.
        for item in items:
            for mark in item.iter_markers("real_gpu"):
                item.add_marker(pytest.mark.skip(reason=f"needs a real GPU, not the emulated device: {mark.args[0]}"))
    elif os.environ.get("SYMCOMM_TEST_BACKEND", "auto") != "nvshmem" and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU and the nvshmem backend")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def world():
    """symcomm initialised once per process, on SYMCOMM_TEST_BACKEND (default auto)."""
    symcomm.init(backend=os.environ.get("SYMCOMM_TEST_BACKEND", "auto"))
    # One seed per session, the same on every rank, so each rank can rebuild every rank's inputs.
    box = [int(os.environ.get("SYMCOMM_TEST_SEED", random.randrange(2**31)))]
    dist.broadcast_object_list(box, src=0)
    info = RankInfo(symcomm.rank(), symcomm.world_size(), symcomm.device(), symcomm.backend(), box[0])
    if info.rank == 0:
        print(f"\nsymcomm tests: backend={info.backend} world={info.world_size} device={info.device} "
              f"SYMCOMM_TEST_SEED={info.seed}")
    yield info
    symcomm.finalize()


@pytest.fixture(autouse=True)
def poisoned_allocations(request):
    """In every test that uses `world`: a fresh torch.empty is filled with NaN (floats) or the largest
    value (integers), on the GPU as on the CPU, so that an output element an op never writes shows.
    This is PyTorch's fill_uninitialized_memory, which acts only with deterministic algorithms on
    (warn_only: ops without a deterministic kernel still run). Not in CUDA-graph tests (`real_gpu`):
    deterministic mode picks other kernels for some ops (sort-based scatters), not all of them capturable."""
    if "world" not in request.fixturenames or request.node.get_closest_marker("real_gpu"):
        yield
        return
    device = request.getfixturevalue("world").device
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    assert torch.empty(4, device=device).isnan().all(), "fresh tensors are not poisoned"
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.utils.deterministic.fill_uninitialized_memory = before[2]


@pytest.fixture
def sym(world):
    """symcomm.empty for one test, freed (collectively) when it ends, also when it fails: every rank
    frees what it allocated, so the ranks' symmetric heaps stay alike for the tests that follow."""
    made = []

    def empty(shape, dtype):
        made.append(symcomm.empty(shape, dtype))
        return made[-1]

    yield empty
    for t in made:
        symcomm.free(t)


@pytest.fixture
def gen(world, request):
    """A generator seeded from the session seed and the test id: fresh per test, equal on all ranks."""
    g = torch.Generator()
    g.manual_seed(world.seed ^ zlib.crc32(request.node.nodeid.encode()))
    return g
