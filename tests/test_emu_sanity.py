"""The NVSHMEM bring-up kernels (csrc/core/sanity.cu) on the emulated device: signalled puts around a
ring, peer loads, the device barrier, and a wait that times out."""

from __future__ import annotations

import numpy as np
import pytest

import emu_harness as H

pytestmark = pytest.mark.emu


@pytest.mark.parametrize("npes", [1, 2, 3, 4])
def test_ring_put_signal(npes):
    """One call, then calls back to back with no host synchronisation between them: a call's signal
    must not land after the next call's, which would take the flag back."""
    nbytes = 1000
    rng = np.random.default_rng(npes)
    with H.world(npes) as w:
        dst, signal = w.alloc(nbytes), w.alloc(8)
        data = [rng.integers(0, 256, size=nbytes, dtype=np.uint8) for _ in range(npes)]
        for epochs in ([1], range(2, 12)):
            for epoch in epochs:
                for pe in range(npes):
                    src, host = w.private(nbytes)
                    host[:] = data[pe] ^ epoch
                    w.on_pe(pe)
                    w.ext.ring_put_signal(w.base(pe) + dst, src, nbytes, w.base(pe) + signal, epoch, 0)
            w.check()
            for pe in range(npes):
                np.testing.assert_array_equal(w.view(pe, dst, np.uint8, nbytes), data[(pe - 1) % npes] ^ epoch)
                assert w.view(pe, signal, np.uint64, 1)[0] == epoch


def test_peer_load_and_barrier():
    npes, count = 3, 777
    with H.world(npes) as w:
        sym = w.alloc(count)
        for pe in range(npes):
            w.view(pe, sym, np.uint8, count)[:] = (np.arange(count) * (pe + 3)) % 251
        outs = []
        for pe in range(npes):
            out, raw = w.private(count)
            found, flag = w.private(4)
            flag.view(np.int32)[0] = -1
            w.on_pe(pe)
            w.ext.peer_load(out, w.base(pe) + sym, count, (pe + 1) % npes, found, 0)
            w.ext.barrier_all(0)
            outs.append((raw, flag))
        w.check()
        for pe, (raw, flag) in enumerate(outs):
            assert flag.view(np.int32)[0] == 1
            np.testing.assert_array_equal(raw, (np.arange(count) * ((pe + 1) % npes + 3)) % 251)


def test_wait_times_out():
    with H.world(2, timeout_s=0.5) as w:
        flag = w.alloc(8)
        w.on_pe(1)
        w.ext.wait_flag(w.base(1) + flag, 1, 0)
        errors = w.synchronize()
        assert list(errors) == [1]
        assert "PE 1 timed out after 0.5 s waiting for sanity wait from PE -1 (flag 0, expected >= 1)" in errors[1]


def test_kernels_launch_only_once_loaded():
    # On a GPU the first launch of a kernel loads it, and may wait for the kernels already running
    # (some of which may wait for it): the emulation refuses such a launch, and load_kernels loads all.
    with H.world(2, load_kernels=False) as w:
        flag = w.alloc(8)
        w.on_pe(0)
        with pytest.raises(RuntimeError, match="emulated PE 0 launched a kernel before load_kernels"):
            w.ext.wait_flag(w.base(0) + flag, 0, 0)
        w.ext.load_kernels()
        w.ext.wait_flag(w.base(0) + flag, 0, 0)
        w.on_pe(1)
        with pytest.raises(RuntimeError, match="emulated PE 1 launched a kernel before load_kernels"):
            w.ext.wait_flag(w.base(1) + flag, 0, 0)
        w.check()
