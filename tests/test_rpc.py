"""The single-driver RPC runner (symcomm.demo.rpc): single-process tests that spawn their own ranks.

The driver (this process) may have a symcomm world of its own, e.g. the session's `world` when other
test files ran first: the runner must work either way and leave it alone."""

import gc
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import symcomm
from symcomm.demo.rpc import RemoteError, RpcRunner

SHM = Path("/dev/shm")


class Probe:
    """The runner's target in these tests (importable by the spawned workers)."""

    def __init__(self, scale):
        self.scale = scale

    def info(self, extra=0):
        return symcomm.rank(), symcomm.world_size(), os.getpid(), self.scale + extra

    def all_reduce(self, x):
        return torch.ops.symcomm.all_reduce(x * (symcomm.rank() + 1))

    def fail_on(self, rank):
        if symcomm.rank() == rank:
            raise ValueError(f"boom on rank {rank}")
        return symcomm.rank()

    def exit_on(self, rank):
        if symcomm.rank() == rank:
            os._exit(3)

    def big(self, nbytes):
        return b"x" * nbytes if symcomm.rank() > 0 else b""

    def sleep(self, seconds):
        time.sleep(seconds)


def shm_names():
    return set(os.listdir(SHM)) if SHM.is_dir() else set()


def gone(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def driver_state():
    """What the runner must not change in the driver: its symcomm and torch.distributed worlds, and
    its threads (the workers share the cores, not the driver)."""
    return symcomm.is_initialized(), dist.group.WORLD, torch.get_num_threads()


@pytest.fixture
def no_leaks():
    """Fails the test if it leaves shared-memory segments behind or changes the driver's state."""
    before, state = shm_names(), driver_state()
    yield
    # Exceptions kept by pytest.raises hold frames in reference cycles, and frames can hold the
    # runner's events, whose named semaphores live in /dev/shm until the events are collected.
    gc.collect()
    assert shm_names() - before == set()
    assert driver_state() == state


def test_calls_results_and_clean_shutdown(no_leaks):
    with RpcRunner(3, Probe, 10, buffer_bytes=1 << 16) as runner:
        infos = runner.call("info", extra=1)
        assert [(r, w, s) for r, w, _, s in infos] == [(0, 3, 11), (1, 3, 11), (2, 3, 11)]
        pids = [pid for _, _, pid, _ in infos]
        assert os.getpid() not in pids and len(set(pids)) == 3
        x = torch.randn(5, dtype=torch.float64)
        for out in runner.call("all_reduce", x):
            torch.testing.assert_close(out, 6 * x)
        names = runner.segment_names
        assert len(names) == 4  # the request and one reply per rank
        if SHM.is_dir():
            assert all(stat.S_IMODE(os.stat(SHM / n).st_mode) == 0o600 for n in names)
        with pytest.raises(ValueError, match="does not fit the 65536-byte shared-memory buffer"):
            runner.call("info", b"x" * (1 << 16))
        with pytest.raises(RemoteError, match="while returning the result"):
            runner.call("big", 1 << 16)
        assert runner.call("fail_on", -1) == [0, 1, 2]
        workers = runner._workers
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert all(gone(pid) for pid in pids)
    assert not any((SHM / n).exists() for n in names)


def test_worker_exception_carries_traceback(no_leaks):
    with RpcRunner(2, Probe, 0) as runner:
        with pytest.raises(RemoteError) as error:
            runner.call("fail_on", 1)
        message = str(error.value)
        assert "rank 1: ValueError: boom on rank 1" in message
        assert "Traceback (most recent call last)" in message and "in fail_on" in message
        assert "rank 0:" not in message
        # The runner survives a failed call.
        assert [r for r, *_ in runner.call("info")] == [0, 1]
        with pytest.raises(RemoteError, match="rank 1 exited with code 3 during 'exit_on'"):
            runner.call("exit_on", 1)


def test_start_failure_is_reported(no_leaks):
    with pytest.raises(RemoteError, match=r"'start' failed on 2 of 2 ranks:\nrank 0: TypeError"):
        RpcRunner(2, Probe)  # Probe needs a scale


def test_driver_with_its_own_world(world, monkeypatch, no_leaks):
    # A user's driver that runs symcomm itself, started as torchrun starts one: the workers must not
    # take the driver's environment for theirs, and the driver's world must outlive the runner.
    for name, value in {"RANK": world.rank, "WORLD_SIZE": world.world_size, "LOCAL_RANK": world.rank,
                        "LOCAL_WORLD_SIZE": world.world_size}.items():
        monkeypatch.setenv(name, str(value))
    with RpcRunner(2, Probe, 0) as runner:
        assert [(r, w) for r, w, *_ in runner.call("info")] == [(0, 2), (1, 2)]
    torch.testing.assert_close(torch.ops.symcomm.all_reduce(torch.ones(4)), torch.full((4,), float(world.world_size)))


DRIVER = textwrap.dedent("""
    import sys
    from test_rpc import Probe
    from symcomm.demo.rpc import RpcRunner
    with RpcRunner(2, Probe, 0) as runner:
        pids = [pid for _, _, pid, _ in runner.call("info")]
        print(*pids, flush=True)
        print(*runner.segment_names, flush=True)
        runner.call("sleep", 60)
""")


def test_ctrl_c_stops_everything(no_leaks):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], cwd=Path(__file__).parent, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        pids, names = driver.stdout.readline().split(), driver.stdout.readline().split()
        driver.send_signal(signal.SIGINT)
        _, err = driver.communicate(timeout=30)
    finally:
        driver.kill()
    assert driver.returncode != 0 and "KeyboardInterrupt" in err
    assert pids and all(gone(int(pid)) for pid in pids)
    assert names and not any((SHM / n).exists() for n in names)
