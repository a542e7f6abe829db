"""The NVSHMEM sanity suite: bring-up on the nvshmem backend, one mechanism per test.

Runs on the GPU (tests/run.py --gpu only), at 1, 2 and 4 PEs; several PEs may share one GPU.
"""

import os
import textwrap

import pytest
import torch

import symcomm
from harness import run_alone
from symcomm import runtime, sanity

pytestmark = pytest.mark.gpu


def random_symmetric(world, gen, sym, shape, dtype=torch.float32):
    """A symmetric tensor holding this rank's slice of random data, and every rank's data."""
    data = [torch.randn(shape, generator=gen).to(dtype) for _ in range(world.world_size)]
    return sym(shape, dtype).copy_(data[world.rank]), data


@pytest.mark.dist
def test_mpg_status_and_symmetric_heap(world, sym):
    # NVSHMEM's init status: 2 initialised (one PE per GPU), 3 limited MPG, 4 full MPG.
    status, pes = runtime.mpg_status(), runtime._get().pes_per_gpu
    print(f"rank {world.rank}: NVSHMEM init status {status} ({ {3: 'limited MPG', 4: 'full MPG'}.get(status, 'one PE per GPU') }), "
          f"{pes} PE(s) on this GPU")
    if pes == 1:
        assert status == 2, f"one PE on its GPU, but NVSHMEM init status {status}"
    else:
        assert status in (3, 4), f"{pes} PEs share the GPU, but NVSHMEM is not in an MPG mode (init status {status})"
        share = os.environ.get(runtime.MPS_PERCENTAGE)
        if share is not None and float(share) * pes <= 100:
            # MPS shares that add up to the GPU are what full MPG mode needs.
            assert status == 4, f"{pes} PEs under MPS at {share}% each, but NVSHMEM init status {status}, not 4 (full MPG)"
    t = sym((1000,), torch.float32)
    assert t.device == world.device and symcomm.is_symmetric(t)


@pytest.mark.dist
@pytest.mark.parametrize("nbytes", [4, 4100, 1 << 20])
def test_ring_put_with_signal(world, gen, sym, nbytes):
    n = nbytes // 4
    dst = sym((n,), torch.float32)
    dst.fill_(float("nan"))
    signal = sym((1,), torch.int64)
    signal.zero_()
    sanity.barrier_all()  # every rank's signal is zero before anyone puts
    left = (world.rank - 1) % world.world_size
    for epoch in (1, 2, 3):
        data = [torch.randn(n, generator=gen) for _ in range(world.world_size)]
        src = data[world.rank].to(world.device)
        sanity.ring_put_signal(src, dst, signal, epoch)
        torch.testing.assert_close(dst.cpu(), data[left], rtol=0, atol=0)
        # Nobody may overwrite a neighbour's dst before that neighbour has read it.
        sanity.barrier_all()


@pytest.mark.dist
def test_peer_pointer_load_reads_every_peer(world, gen, sym):
    t, data = random_symmetric(world, gen, sym, (3, 1001))
    sanity.barrier_all()
    for pe in range(world.world_size):
        got = sanity.peer_load(t, pe)
        assert got is not None, f"PE {pe} is not reachable through nvshmem_ptr from PE {world.rank}"
        torch.testing.assert_close(got.cpu(), data[pe], rtol=0, atol=0)
    sanity.barrier_all()


@pytest.mark.dist
def test_sanity_rejects_non_symmetric_tensors(world):
    plain = torch.zeros(1, dtype=torch.int64, device=world.device)
    with pytest.raises(ValueError, match="flag must be a symmetric tensor"):
        sanity.wait_flag(plain, 1)
    with pytest.raises(ValueError, match="pe must be in"):
        sanity.peer_load(symcomm.runtime.workspace(), world.world_size)


TIMEOUT_SCRIPT = textwrap.dedent(
    """
    import torch, symcomm
    from symcomm import sanity
    symcomm.init(backend="nvshmem", timeout_s=1.0)
    flag = symcomm.empty((1,), torch.int64)
    flag.zero_()
    sanity.wait_flag(flag, 1)   # nobody ever sets it
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # on the emulated device the launch itself waits
    """
)


@pytest.mark.skipif(not (torch.cuda.is_available() or runtime.emulated()), reason="needs a GPU or the emulated device")
def test_device_wait_times_out_naming_the_rank(tmp_path):
    out = run_alone(tmp_path, TIMEOUT_SCRIPT)
    assert out.returncode != 0
    assert "symcomm: PE 0 timed out after 1.0 s waiting for sanity wait" in out.stdout + out.stderr, out.stderr[-3000:]
