"""The streams the nvshmem backend queues its kernels on: the one place that knows the two devices.

On a GPU they are torch's CUDA streams, and the host's own tensor ops are queued on them too, so a
launch returns at once. On the emulated device (docs/emulation.md) kernels run on the emulation's
stream workers while torch ops run on the host at once, so `launched` waits for the stream: every
host op after a launch then sees it done, as stream order would have it on a GPU. A stream that was
forked and not joined back is not waited for, as on a GPU.
"""

from __future__ import annotations

import torch

from symcomm import runtime


class EmulatedStream:
    """A stream of the emulated device, with the two things the host side asks of a torch.cuda.Stream."""

    device = torch.device("cpu")

    def __init__(self, handle: int):
        self.cuda_stream = handle

    def wait_stream(self, other: EmulatedStream) -> None:
        emu = runtime.load_extension().emu
        emu.stream_wait_event(self.cuda_stream, *emu.event_record(other.cuda_stream))


def current():
    """The stream the caller queues on (torch's current stream on a GPU; the default one emulated)."""
    if runtime.emulated():
        return EmulatedStream(0)
    return torch.cuda.current_stream(runtime.device())


def side():
    """The fused ops' second stream, made at first use and kept until finalize."""
    state = runtime._get()
    if state.side_stream is None:
        state.side_stream = EmulatedStream(runtime.load_extension().emu.stream_create()) if runtime.emulated() \
            else torch.cuda.Stream(state.device)
    return state.side_stream


def launched(stream) -> None:
    """After queuing kernels on `stream` (and joining any fork back into it)."""
    if runtime.emulated():
        runtime.load_extension().emu.stream_synchronize(stream.cuda_stream)
