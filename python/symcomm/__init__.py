"""symcomm: GPU communication kernels over the NVSHMEM symmetric heap, as PyTorch operators.

    import symcomm, torch
    symcomm.init()                       # under torchrun; "auto" picks nvshmem or torch
    y = torch.ops.symcomm.all_reduce(x)  # sum over ranks
    symcomm.finalize()
"""

from symcomm import nn, ops  # noqa: F401  (ops registers torch.ops.symcomm.*)
from symcomm.nn.sharding import shard_state_dict
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
    transport,
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
    "nn",
    "rank",
    "shard_state_dict",
    "transport",
    "world_size",
]
