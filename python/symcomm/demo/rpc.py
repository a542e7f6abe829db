"""Single-driver mode: one Python process drives an N-rank symcomm world without torchrun.

The driver spawns ranks 0..N-1, and every worker starts torch.distributed (gloo, rendezvous at
127.0.0.1 on a port the driver picked) and symcomm on the torch backend, then builds its own copy of
a target object. The driver itself is no rank: whatever torch.distributed or symcomm state it has
of its own (the user's own init, or torchrun's environment) neither disturbs the runner's world nor
is touched by it. runner.call(method, ...) pickles the method name and arguments into a
shared-memory request buffer, wakes each worker through its own event, and collects every worker's
pickled result (or exception and traceback) from that worker's reply buffer, signalled by a second
event. Nobody spins: all waits block on events, with a timeout only to notice a dead worker.

    with RpcRunner(2, MyTarget, arg) as runner:
        results = runner.call("step", x)   # [rank 0's result, rank 1's result]
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pickle
import secrets
import signal
import socket
import struct
import traceback
from multiprocessing.shared_memory import SharedMemory
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

import symcomm

_HEADER = struct.Struct("Q")  # payload length, then the pickled payload
_POLL_S = 0.5  # how often a blocked wait checks that its peer is still alive
_SHUTDOWN = None  # the method name that stops a worker
# torchrun's variables, which symcomm.init reads: a worker inherits the driver's, which describe the
# driver's world (it may run under torchrun), not the runner's.
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


class RemoteError(RuntimeError):
    """A call raised on one or more ranks; the message holds each one's traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(shm: SharedMemory, payload: bytes) -> None:
    if _HEADER.size + len(payload) > shm.size:
        raise ValueError(f"RpcRunner: a {len(payload)}-byte message does not fit the {shm.size}-byte shared-memory "
                         f"buffer; pass a larger buffer_bytes")
    _HEADER.pack_into(shm.buf, 0, len(payload))
    shm.buf[_HEADER.size:_HEADER.size + len(payload)] = payload


def _read(shm: SharedMemory) -> bytes:
    (size,) = _HEADER.unpack_from(shm.buf, 0)
    return bytes(shm.buf[_HEADER.size:_HEADER.size + size])


def _attempt(rank: int, fn: Callable, *args, **kwargs) -> tuple:
    """("ok", fn(*args, **kwargs)) or ("error", text naming the rank and exception, with its traceback)."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as e:
        return "error", f"rank {rank}: {type(e).__name__}: {e}\n{traceback.format_exc()}"


def _start_rank(rank: int, world_size: int, port: int, timeout_s: float, factory: Callable, args: tuple,
                kwargs: dict) -> Any:
    # As torchrun does: N processes on this machine share its cores.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    for name in _LAUNCHER_ENV:
        os.environ.pop(name, None)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    symcomm.init(backend="torch", timeout_s=timeout_s)
    return factory(*args, **kwargs)


def _stop_rank() -> None:
    symcomm.finalize()
    if dist.is_initialized():
        dist.destroy_process_group()


def _call(target: Any, method: str, args: tuple, kwargs: dict) -> Any:
    return getattr(target, method)(*args, **kwargs)


def _answer(rank: int, reply: SharedMemory, done, outcome: tuple) -> None:
    try:
        _write(reply, pickle.dumps(outcome))
    except Exception as e:  # an unpicklable or oversized result still gets an answer
        _write(reply, pickle.dumps(("error", f"rank {rank}: {type(e).__name__} while returning the result: {e}")))
    done.set()


def _worker(rank: int, world_size: int, port: int, timeout_s: float, factory: Callable, args: tuple, kwargs: dict,
            request_name: str, reply_name: str, wake, done) -> None:
    # Ctrl-C reaches the whole process group; the driver alone decides how the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    request, reply = SharedMemory(name=request_name), SharedMemory(name=reply_name)
    try:
        outcome = _attempt(rank, _start_rank, rank, world_size, port, timeout_s, factory, args, kwargs)
        target = outcome[1] if outcome[0] == "ok" else None
        # The target stays here (it need not even pickle); the driver only learns that the start worked.
        _answer(rank, reply, done, outcome if outcome[0] == "error" else ("ok", None))
        while True:
            while not wake.wait(_POLL_S):
                if not parent.is_alive():
                    return
            wake.clear()
            method, call_args, call_kwargs = pickle.loads(_read(request))
            if method is _SHUTDOWN:
                return
            _answer(rank, reply, done, _attempt(rank, _call, target, method, call_args, call_kwargs))
    finally:
        _stop_rank()
        request.close()
        reply.close()


class RpcRunner:
    """Runs factory(*args, **kwargs) on each of world_size ranks, one spawned worker each, and calls
    its methods on every rank at once.

    buffer_bytes bounds one pickled request or result; timeout_s is the process group's timeout.
    Use as a context manager, or call close(): it stops the workers (terminating them if a call was
    interrupted) and unlinks the shared memory.
    """

    def __init__(self, world_size: int, factory: Callable, *args, buffer_bytes: int = 16 << 20,
                 timeout_s: float = 60.0, **kwargs) -> None:
        if world_size < 1:
            raise ValueError(f"RpcRunner: world_size must be >= 1, got {world_size}")
        ctx = multiprocessing.get_context("spawn")
        self.world_size = world_size
        self._segments: list[SharedMemory] = []
        self._workers: list = []
        self._in_call = False
        self._closed = False
        try:
            port = free_port()
            self._request = self._segment(buffer_bytes)
            self._replies = [self._segment(buffer_bytes) for _ in range(world_size)]
            self._wake = [ctx.Event() for _ in range(world_size)]
            self._done = [ctx.Event() for _ in range(world_size)]
            for rank in range(world_size):
                worker = ctx.Process(target=_worker, name=f"symcomm-rank{rank}", daemon=True,
                                     args=(rank, world_size, port, timeout_s, factory, args, kwargs, self._request.name,
                                           self._replies[rank].name, self._wake[rank], self._done[rank]))
                worker.start()
                self._workers.append(worker)
            self._in_call = True
            self._gather("start")
        except BaseException:
            self.close()
            raise

    def _segment(self, size: int) -> SharedMemory:
        # CPython creates segments with mode 0600: readable by this user only.
        shm = SharedMemory(name=f"symcomm_{os.getpid()}_{secrets.token_hex(6)}", create=True, size=size)
        self._segments.append(shm)
        return shm

    @property
    def segment_names(self) -> list[str]:
        return [shm.name for shm in self._segments]

    def call(self, method: str, *args, **kwargs) -> list:
        """target.method(*args, **kwargs) on every rank; returns the results in rank order. Raises
        RemoteError, with every failing rank's traceback, if any rank raised."""
        if self._closed:
            raise RuntimeError("RpcRunner: call after close()")
        if not isinstance(method, str):
            raise TypeError(f"RpcRunner.call: method must be a str, got {method!r}")
        _write(self._request, pickle.dumps((method, args, kwargs)))
        self._in_call = True
        for wake in self._wake:
            wake.set()
        return self._gather(method)

    def _gather(self, method: str) -> list:
        outcomes = []
        for rank, worker in enumerate(self._workers):
            done, reply = self._done[rank], self._replies[rank]
            while not done.wait(_POLL_S):
                if not worker.is_alive() and not done.is_set():
                    raise RemoteError(f"rank {rank} exited with code {worker.exitcode} during {method!r}")
            done.clear()
            outcomes.append(pickle.loads(_read(reply)))
        self._in_call = False
        errors = [text for status, text in outcomes if status == "error"]
        if errors:
            raise RemoteError(f"{method!r} failed on {len(errors)} of {self.world_size} ranks:\n" + "\n".join(errors))
        return [value for _, value in outcomes]

    def close(self, join_timeout_s: float = 10.0) -> None:
        """Stops the workers and frees everything; safe to call more than once and after errors."""
        if self._closed:
            return
        self._closed = True
        try:
            # Idle workers stop cleanly; busy ones (an interrupted call) may be stuck in a collective.
            if self._workers and not self._in_call:
                _write(self._request, pickle.dumps((_SHUTDOWN, (), {})))
                for wake in self._wake:
                    wake.set()
                for worker in self._workers:
                    worker.join(join_timeout_s)
            for worker in self._workers:
                if worker.is_alive():
                    worker.terminate()
                    worker.join(join_timeout_s)
                if worker.is_alive():
                    worker.kill()
                    worker.join()
        finally:
            for shm in self._segments:
                shm.close()
                shm.unlink()
            # The events' named semaphores are unlinked when the events are collected.
            self._wake = self._done = []

    def __enter__(self) -> RpcRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
