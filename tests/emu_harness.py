"""Helpers for the emulated-kernel suites (tests/test_emu_*.py, marker `emu`): the real kernels and
their C++ host entry points, built for the CPU by csrc/emu/build.py, with several PEs in this process (or
one PE per process: world(pe=..., job=...)).

Only numpy is imported here, so that these suites also run under ThreadSanitizer (SYMCOMM_EMU_VARIANT=tsan,
in the interpreter linked with libtsan: tests/run.py does both).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANT = os.environ.get("SYMCOMM_EMU_VARIANT", "plain")
TSAN = VARIANT == "tsan"
# Device waits time out this fast, so a test of a missing peer takes seconds.
TIMEOUT_S = 3.0 if not TSAN else 20.0

# The most PEs a job may have (csrc/core/limits.h: 16 nodes of 8), written out rather than read from the
# module, so that a smaller limit, or flags and counts that stop short of it, fail the suites.
MOST_PES = 128
# Why the suites under ThreadSanitizer leave out the runs at MOST_PES (the plain build runs them).
MOST_PES_UNDER_TSAN = f"{MOST_PES} PEs under ThreadSanitizer outlast the device waits on 2 cores"

DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2, "float64": 3}
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def builder(csrc: Path | None = None):
    """csrc/emu/build.py of `csrc` (default: SYMCOMM_EMU_CSRC, a mutant's copy, else this checkout's)."""
    csrc = csrc or Path(os.environ.get("SYMCOMM_EMU_CSRC", ROOT / "csrc"))
    spec = importlib.util.spec_from_file_location("symcomm_emu_build", csrc / "emu" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_EXT = None


def ext():
    """The emulated extension, built from this checkout's csrc/ (cached until a source changes)."""
    global _EXT
    if _EXT is None:
        _EXT = builder().load(VARIANT)
    return _EXT


# ---- values: every dtype as numpy arrays (bfloat16 as its uint16 bits) ----

def storage(dtype: str):
    return {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float64": np.float64}[dtype]


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values as the dtype's storage (bfloat16: round to nearest even)."""
    if dtype != "bfloat16":
        return values.astype(storage(dtype))
    bits = values.astype(np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def decode(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype != "bfloat16":
        return raw.astype(np.float64)
    return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def exact_values(rng: np.random.Generator, shape, scale: float = 0.25, span: int = 16) -> np.ndarray:
    """Random multiples of `scale` in [-span, span] * scale, none zero: sums of a few are exact in every
    dtype, so results compare for equality."""
    v = rng.integers(1, span + 1, size=shape) * rng.choice([-1, 1], size=shape)
    return v.astype(np.float64) * scale


def poison(raw: np.ndarray, dtype: str) -> None:
    """NaN in every element (0xFF bytes for raw byte buffers)."""
    if raw.dtype == np.uint8:
        raw[...] = 0xFF
    elif dtype == "bfloat16":
        raw[...] = 0x7FC1
    else:
        raw[...] = np.nan


def at(addr: int, dtype, count: int) -> np.ndarray:
    """`count` elements of numpy `dtype` at an address (a view, no copy)."""
    buf = (ctypes.c_char * (count * np.dtype(dtype).itemsize)).from_address(addr)
    return np.frombuffer(buf, dtype=dtype, count=count)


# ---- a world of emulated PEs ----

@dataclass
class World:
    """`npes` emulated PEs, each with a symmetric heap whose front is the kernels' workspace."""

    npes: int
    heap_bytes: int
    workspace_bytes: int
    _next: int = 0
    _private: list = field(default_factory=list)

    @property
    def ext(self):
        return ext()

    def base(self, pe: int) -> int:
        return self.ext.emu.heap(pe)

    def data_offset(self) -> int:
        return self.ext.workspace_data_offset()

    def alloc(self, nbytes: int, align: int = 256) -> int:
        """A symmetric allocation after the workspace: its byte offset, the same on every PE."""
        start = (self.workspace_bytes + self._next + align - 1) // align * align
        end = start + nbytes
        if end > self.heap_bytes:
            raise MemoryError(f"emulated heap of {self.heap_bytes} bytes is full")
        self._next = end - self.workspace_bytes
        return start

    def view(self, pe: int, offset: int, dtype, count: int) -> np.ndarray:
        """PE `pe`'s heap bytes [offset, ...) as `count` elements of numpy `dtype`."""
        return at(self.base(pe) + offset, dtype, count)

    def private(self, nbytes: int, align: int = 64, misalign: int = 0) -> tuple[int, np.ndarray]:
        """Memory off the heap (a PE's ordinary device memory): (address, bytes), kept alive with the world."""
        raw = np.zeros(nbytes + align + misalign, dtype=np.uint8)
        start = (-raw.ctypes.data) % align + misalign
        self._private.append(raw)
        return raw.ctypes.data + start, raw[start:start + nbytes]

    def on_pe(self, pe: int) -> None:
        self.ext.emu.set_pe(pe)

    def local_pes(self) -> list[int]:
        """The PEs this process hosts: all of them, or one after emu.start_process."""
        pe = self.ext.emu.local_pe()
        return list(range(self.npes)) if pe < 0 else [pe]

    def synchronize(self) -> dict[int, str]:
        """Waits for the streams of every PE of this process; {pe: error} for the PEs that failed."""
        errors = {}
        for pe in self.local_pes():
            self.on_pe(pe)
            try:
                self.ext.emu.synchronize()
            except RuntimeError as e:
                errors[pe] = str(e)
        return errors

    def check(self) -> None:
        errors = self.synchronize()
        assert not errors, "\n".join(f"PE {pe}: {msg}" for pe, msg in errors.items())


@contextlib.contextmanager
def world(npes: int, *, blocks: int = 4, heap_bytes: int = 8 << 20, workspace_bytes: int = 4 << 20,
          threads: int = 0, chaos_seed: int = 0, chaos_rate: float = 0.0, gemm_order: int = 1,
          timeout_s: float = TIMEOUT_S, load_kernels: bool = True, pe: int | None = None, job: str = "",
          start_timeout_s: float = 60.0, pes_per_node: int = 0):
    """Starts the emulated device in the order runtime.init uses on a GPU: device state, every kernel
    loaded on every PE (the emulation refuses to launch one that is not), the workspace's barrier state
    zeroed, the block cap; stops it afterwards, also after a failure.

    With `pe`, this process hosts PE `pe` only, and the others are processes that call this with the
    same `job` (emu.start_process, which waits up to start_timeout_s for them). With pes_per_node, the
    PEs sit on nodes of that many, and load/store does not reach across them."""
    e = ext()
    if TSAN and threads == 0:
        threads = 32  # ThreadSanitizer's per-thread cost: fewer threads per block (loops use blockDim)
    e.emu.configure(threads=threads, chaos_seed=chaos_seed, chaos_rate=chaos_rate, gemm_order=gemm_order,
                    pes_per_node=pes_per_node)
    if pe is None:
        e.emu.start(npes, heap_bytes)
    else:
        e.emu.start_process(pe, npes, heap_bytes, job, start_timeout_s)
    try:
        e.init_device_state(timeout_s)
        try:
            w = World(npes, heap_bytes, workspace_bytes)
            if load_kernels:
                for q in w.local_pes():
                    e.emu.set_pe(q)
                    e.load_kernels()
            for q in w.local_pes():
                w.view(q, 0, np.uint8, e.workspace_data_offset())[:] = 0
            if pe is not None:
                # As runtime.init's dist.barrier(): no peer signals this PE before it has zeroed its flags.
                e.barrier_all(0)
                w.check()
            e.set_max_blocks(blocks)
            yield w
        finally:
            e.finalize_device_state()
    finally:
        e.emu.stop()
