"""The emulated device with one PE per process (emu.start_process): the real kernels between processes
that share nothing but their heaps' segments, the segments' names (none left behind, a killed run's
replaced), a PE that never starts, and a kernel waiting for a PE that never launches it."""

from __future__ import annotations

import glob
import itertools
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback

import numpy as np
import pytest

import emu_harness as H

pytestmark = pytest.mark.emu

HEAP = 8 << 20
# The longest a group of PE processes may take: one that hangs is killed then. Their start timeout is
# shorter, so that a PE that waits for another says so itself.
GROUP_TIMEOUT_S = 180.0 if H.TSAN else 60.0
START_TIMEOUT_S = GROUP_TIMEOUT_S / 3
SPAWN = mp.get_context("spawn")
_jobs = itertools.count()


def new_job() -> str:
    """A job name no other test of this run, nor another run at the same time, uses."""
    return f"test{os.getpid()}-{next(_jobs)}"


def segments(job: str) -> list[str]:
    return sorted(glob.glob(f"/dev/shm/symcomm-emu-{job}-*"))


def _child(fn, pe: int, args: tuple, go, results) -> None:
    try:
        H.ext()
        go.wait(GROUP_TIMEOUT_S)  # the PEs start together, so that short start timeouts mean what they say
        results.put((pe, True, fn(pe, *args)))
    except BaseException:
        results.put((pe, False, traceback.format_exc()))


def spawn(target, *args) -> mp.Process:
    """target(*args) in a new process. The module is built here first, so that the processes only load
    it instead of all building it at once."""
    H.ext()
    p = SPAWN.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def run_pes(fn, pes, *args) -> dict:
    """fn(pe, *args) in a process of its own for each PE of `pes`: {pe: what it returned}. A PE that
    raises, crashes or hangs fails the test."""
    go, results = SPAWN.Barrier(len(pes)), SPAWN.Queue()
    procs = [spawn(_child, fn, pe, args, go, results) for pe in pes]
    deadline = time.monotonic() + GROUP_TIMEOUT_S
    out = {}
    try:
        while len(out) < len(procs):
            if time.monotonic() > deadline:
                for p in procs:
                    p.kill()  # what they reported before is still read
            try:
                pe, ok, value = results.get(timeout=0.1)
                out[pe] = (ok, value)
            except queue.Empty:
                if all(p.exitcode is not None for p in procs):
                    break
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    problems = [f"PE {pe}:\n{value}" for pe, (ok, value) in sorted(out.items()) if not ok]
    problems += [f"PE {pe} reported nothing (exit code {p.exitcode}; -9: killed after {GROUP_TIMEOUT_S} s)"
                 for pe, p in zip(pes, procs) if pe not in out]
    assert not problems, "\n".join(problems)
    return {pe: value for pe, (_, value) in out.items()}


# ---- the kernels between processes ----

NBYTES = 1000
WIDTH = (3 * 512 * 16 * 4 + 7 * 16) // 4 + 3  # floats: several blocks and a scalar tail


def pe_data(seed: int, pe: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PE pe's bytes and its two all-reduce inputs, which every PE regenerates from the shared seed."""
    rng = np.random.default_rng([seed, pe])
    return (rng.integers(0, 256, NBYTES, dtype=np.uint8), rng.standard_normal(WIDTH).astype(np.float32),
            rng.standard_normal(WIDTH).astype(np.float32))


def _kernels(pe: int, npes: int, job: str, seed: int) -> None:
    data = [pe_data(seed, q) for q in range(npes)]
    left, right = (pe - 1) % npes, (pe + 1) % npes
    with H.world(npes, pe=pe, job=job, start_timeout_s=START_TIMEOUT_S) as w:
        e = w.ext
        assert (e.emu.local_pe(), e.my_pe(), e.n_pes()) == (pe, pe, npes)
        if npes > 1:
            with pytest.raises(RuntimeError, match=f"hosts emulated PE {pe} only"):
                e.emu.set_pe(right)

        dst, sig = w.alloc(NBYTES), w.alloc(8)
        src, host = w.private(NBYTES)
        host[:] = data[pe][0]
        e.ring_put_signal(w.base(pe) + dst, src, NBYTES, w.base(pe) + sig, 1, 0)
        w.check()
        np.testing.assert_array_equal(w.view(pe, dst, np.uint8, NBYTES), data[left][0])
        assert w.view(pe, sig, np.uint64, 1)[0] == 1

        sym = w.alloc(NBYTES)
        w.view(pe, sym, np.uint8, NBYTES)[:] = data[pe][0]
        out, raw = w.private(NBYTES)
        found, flag = w.private(4)
        flag.view(np.int32)[0] = -1
        e.barrier_all(0)  # every PE has filled its buffer
        e.peer_load(out, w.base(pe) + sym, NBYTES, right, found, 0)
        w.check()
        assert flag.view(np.int32)[0] == 1
        np.testing.assert_array_equal(raw, data[right][0])
        np.testing.assert_array_equal(w.view(right, sym, np.uint8, NBYTES), data[right][0])

        two_shot_result = w.data_offset() + (1 << 20)
        for kernel, which, result_offset in (("reduce", 1, 0), ("two_shot_all_reduce", 2, two_shot_result)):
            x = w.alloc(WIDTH * 4)
            w.view(pe, x, np.float32, WIDTH)[:] = data[pe][which]
            dst_addr, dst_raw = w.private(WIDTH * 4)
            getattr(e, kernel)(w.base(pe), w.base(pe) + x, 0, 0, WIDTH * 4, dst_addr, 0, result_offset,
                               H.DTYPE_CODES["float32"], True, 0)
            w.check()
            expected = sum(d[which].astype(np.float64) for d in data)
            np.testing.assert_allclose(dst_raw.view(np.float32), expected, rtol=1e-5, atol=1e-5, err_msg=kernel)


@pytest.mark.parametrize("npes", [2, 3])
def test_kernels_across_processes(npes):
    """A signalled ring put, peer loads, the device barrier, and one-shot and two-shot all-reduces,
    each PE in a process of its own; no segment name is left afterwards."""
    job = new_job()
    run_pes(_kernels, range(npes), npes, job, 100 + npes)
    assert segments(job) == []


# ---- the segments' lifecycle ----

def test_start_process_in_this_process():
    emu = H.ext().emu
    with H.world(2):
        assert emu.local_pe() == -1
    with pytest.raises(RuntimeError, match=r"job name 'a/b' must be 1 to 64 characters of \[A-Za-z0-9_.-\]"):
        emu.start_process(0, 1, HEAP, "a/b", 1.0)
    job = new_job()
    emu.start_process(0, 1, HEAP, job, 1.0)
    try:
        assert emu.local_pe() == 0 and emu.heap(0) != 0
        assert segments(job) == []  # removed once every PE (here: one) has mapped it
    finally:
        emu.stop()
    assert emu.local_pe() == -1


def _start_alone(job: str) -> None:
    H.ext().emu.start_process(0, 2, HEAP, job, GROUP_TIMEOUT_S)


def killed_run(job: str, while_alive=lambda pid: None) -> None:
    """A PE 0 of `job` that waits for a PE 1 that never comes, SIGKILLed once its segment is there
    (after while_alive(its pid)): the segment stays behind."""
    alone = spawn(_start_alone, job)
    try:
        deadline = time.monotonic() + GROUP_TIMEOUT_S
        while not segments(job) and alone.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert segments(job) == [f"/dev/shm/symcomm-emu-{job}-0"]
        time.sleep(0.2)  # its creator records its pid right after sizing it
        while_alive(alone.pid)
        os.kill(alone.pid, signal.SIGKILL)
    finally:
        alone.join(10)
        if alone.is_alive():
            alone.kill()
            alone.join()
    assert alone.exitcode == -signal.SIGKILL
    assert segments(job) == [f"/dev/shm/symcomm-emu-{job}-0"]


def test_killed_run_leftover_is_replaced():
    """A live PE's segment may not be taken; killed, it leaves the segment behind, and the next run of
    the job replaces it."""
    job = new_job()

    def taken(pid):
        with pytest.raises(RuntimeError, match=f"belongs to process {pid}, which is alive"):
            H.ext().emu.start_process(0, 2, HEAP, job, 1.0)

    killed_run(job, taken)
    run_pes(_kernels, range(2), 2, job, 7)
    assert segments(job) == []


def test_killed_run_leftover_is_removed_by_the_next_start_of_any_job():
    """Runs name their jobs afresh (symcomm.init does), so the next start of another job removes it."""
    job = new_job()
    killed_run(job)
    run_pes(_kernels, range(2), 2, new_job(), 7)
    assert segments(job) == []


def _start_fails(pe: int, npes: int, job: str, timeout_s: float):
    emu = H.ext().emu
    t0 = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        emu.start_process(pe, npes, HEAP, job, timeout_s)
    return str(e.value), time.monotonic() - t0, emu.local_pe()


def test_pe_that_never_starts():
    """PE 2 of 3 never starts: PEs 0 and 1 give up after their timeout naming it, leaving nothing."""
    job, timeout_s = new_job(), 1.5
    for pe, (msg, seconds, local) in run_pes(_start_fails, [0, 1], 3, job, timeout_s).items():
        assert f"emulated PE {pe} of job '{job}': PE 2 did not start within 1.5 s" in msg
        assert timeout_s <= seconds < timeout_s + 2.0
        assert local == -1
    assert segments(job) == []


def _skips_a_call(pe: int, npes: int, job: str) -> str:
    width = 256
    with H.world(npes, pe=pe, job=job, timeout_s=1.0, start_timeout_s=START_TIMEOUT_S) as w:
        if pe == npes - 1:
            return ""
        sym = w.alloc(width * 4)
        w.view(pe, sym, np.float32, width)[:] = 1.0
        dst, _ = w.private(width * 4)
        w.ext.reduce(w.base(pe), w.base(pe) + sym, 0, 0, width * 4, dst, 0, 0, H.DTYPE_CODES["float32"], True, 0)
        return w.synchronize().get(pe, "")


def test_kernel_waiting_for_a_pe_that_never_launches():
    """The last PE skips an all-reduce: the others' kernels time out naming it, as in one process."""
    npes = 3
    errors = run_pes(_skips_a_call, range(npes), npes, new_job())
    for pe in range(npes - 1):
        assert "unspecified launch failure" in errors[pe]
        assert f"PE {pe} timed out after 1.0 s waiting for a block barrier from PE {npes - 1}" in errors[pe]
