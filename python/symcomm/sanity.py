"""Bring-up checks of the NVSHMEM install: the smallest use of each mechanism the kernels rely on.

Run by tests/test_nvshmem.py and the GPU run; each function is collective over all ranks and needs
the nvshmem backend.
"""

from __future__ import annotations

import torch

from symcomm import runtime, streams


def _ext():
    if runtime.backend() != "nvshmem":
        raise RuntimeError(f"symcomm.sanity needs the nvshmem backend, but the active backend is {runtime.backend()!r}")
    return runtime.load_extension()


def _launch(kernel, *args) -> None:
    stream = streams.current()
    kernel(*args, stream.cuda_stream)
    streams.launched(stream)


def _check_symmetric(name: str, t: torch.Tensor) -> None:
    if not runtime.is_symmetric(t):
        raise ValueError(f"{name} must be a symmetric tensor (made by symcomm.empty)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_flag(name: str, t: torch.Tensor) -> None:
    # NVSHMEM signals are uint64 on the device; int64 holds the same bits for the values used here
    # and has full torch op coverage.
    _check_symmetric(name, t)
    if t.dtype != torch.int64 or t.numel() != 1:
        raise ValueError(f"{name} must be a one-element int64 symmetric tensor, got {t.dtype} with {t.numel()} elements")


def ring_put_signal(src: torch.Tensor, dst: torch.Tensor, signal: torch.Tensor, epoch: int) -> None:
    """Puts src into dst on the right neighbour ((rank + 1) % world) and signals it with `epoch`;
    returns (on the stream) once the left neighbour's data has landed in this rank's dst."""
    ext = _ext()
    _check_symmetric("dst", dst)
    _check_flag("signal", signal)
    if src.device != dst.device or src.nbytes != dst.nbytes or not src.is_contiguous():
        raise ValueError(f"src must be contiguous, on {dst.device}, and {dst.nbytes} bytes like dst")
    _launch(ext.ring_put_signal, dst.data_ptr(), src.data_ptr(), dst.nbytes, signal.data_ptr(), epoch)


def peer_load(symmetric: torch.Tensor, pe: int) -> torch.Tensor | None:
    """PE `pe`'s copy of a symmetric tensor read through its peer pointer (nvshmem_ptr), or None when
    that PE is not reachable by loads and stores."""
    ext = _ext()
    _check_symmetric("symmetric", symmetric)
    if not 0 <= pe < runtime.world_size():
        raise ValueError(f"pe must be in [0, {runtime.world_size()}), got {pe}")
    out = torch.empty_like(symmetric)
    found = torch.zeros(1, dtype=torch.int32, device=symmetric.device)
    _launch(ext.peer_load, out.data_ptr(), symmetric.data_ptr(), symmetric.nbytes, pe, found.data_ptr())
    return out if found.item() else None


def barrier_all() -> None:
    """A device-side nvshmem_barrier_all on the current stream."""
    _launch(_ext().barrier_all)


def wait_flag(flag: torch.Tensor, target: int) -> None:
    """Waits on the device until flag >= target; past the timeout the kernel reports this PE and traps."""
    ext = _ext()
    _check_flag("flag", flag)
    _launch(ext.wait_flag, flag.data_ptr(), target)
