"""symcomm: GPU communication kernels over the NVSHMEM symmetric heap, as PyTorch operators.

    import symcomm, torch
    symcomm.init()                       # under torchrun; "auto" picks nvshmem or torch
    y = torch.ops.symcomm.all_reduce(x)  # sum over ranks
    symcomm.finalize()
"""

from symcomm import ops  # noqa: F401  (registers torch.ops.symcomm.*)
from symcomm.runtime import (
    NotInitializedError,
    backend,
    device,
    empty,
    finalize,
    free,
    init,
    is_initialized,
    is_symmetric,
    rank,
    world_size,
)

__all__ = [
    "NotInitializedError",
    "backend",
    "device",
    "empty",
    "finalize",
    "free",
    "init",
    "is_initialized",
    "is_symmetric",
    "rank",
    "world_size",
]
