"""torch.ops.symcomm.*: every op's schema, argument checks, fake impl and backend impls.

Each op is one `Op` row below. Its `out_shape` function validates the arguments (raising
TypeError/ValueError that name the argument) and returns the output shape; the fake impl, used by
torch.compile, and the real impl both call it, so a bad call fails the same way traced or eager,
and always before any communication.

The real impl is registered for CPU and CUDA. It runs the `nvshmem` kernel when the backend is
nvshmem and the op has one, and the `torch` (torch.distributed) impl otherwise.

With SYMCOMM_DEBUG=1, ranks also compare their calls before communicating: if any rank's arguments
are invalid, or the ranks' shapes, dtypes or arguments differ, every rank raises the same error
(instead of the others waiting for the process-group timeout).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from symcomm import collectives, gemm, moe, runtime

log = logging.getLogger("symcomm")

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
REDUCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
MOVE_DTYPES = REDUCE_DTYPES + FLOAT8 + (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
GEMM_DTYPES = REDUCE_DTYPES
TOKEN_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ID_DTYPES = (torch.int32, torch.int64)

lib = torch.library.Library("symcomm", "DEF")


def _signature(*args) -> tuple:
    return tuple((tuple(a.shape), str(a.dtype)) if isinstance(a, torch.Tensor) else repr(a) for a in args)


@dataclass(frozen=True)
class Op:
    schema: str
    out_shape: Callable[..., tuple[int, ...]]
    torch_impl: Callable[..., torch.Tensor]
    nvshmem_impl: Callable[..., torch.Tensor] | None = None
    # The output's dtype when it is not the first argument's.
    out_dtype: torch.dtype | None = None
    # How many outputs of that shape and dtype the op returns (as a tuple when more than one).
    outputs: int = 1
    # What must be equal on every rank (checked with SYMCOMM_DEBUG=1); by default every argument.
    signature: Callable[..., tuple] = _signature
    # Checks of tensor values (not just shapes): run where the values are on the host anyway (CPU
    # tensors) and in debug mode, since on a GPU they would cost a device sync per call.
    value_check: Callable[..., None] | None = None

    @property
    def name(self) -> str:
        return self.schema.split("(", 1)[0]


# ---------------------------------------------------------------------------------------------
# Argument checks


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def check_tensor(op: str, name: str, t, dtypes, ndim: int | None = None) -> None:
    state = runtime._get()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    # The torch backend also serves CPU tensors through gloo; nvshmem kernels need this rank's GPU.
    if t.device != state.device and not (state.backend == "torch" and t.device.type == "cpu"):
        raise ValueError(f"{op}: {name} must be on {state.device} (the {state.backend} backend's device), got {t.device}")
    if t.dtype not in dtypes:
        raise TypeError(f"{op}: {name} has dtype {t.dtype}; expected one of {_dtype_names(dtypes)}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_dim(op: str, x: torch.Tensor, dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{op}: dim must be an int, got {dim!r}")
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension, got a scalar")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{op}: dim {dim} is out of range for x of shape {tuple(x.shape)}")
    return dim % x.dim()


def check_divisible(op: str, what: str, size: int) -> None:
    world = runtime.world_size()
    if size % world:
        raise ValueError(f"{op}: {what}={size} is not divisible by the world size {world}")


def check_matmul(op: str, a, b) -> None:
    check_tensor(op, "a", a, GEMM_DTYPES, ndim=2)
    check_tensor(op, "b", b, GEMM_DTYPES, ndim=2)
    if b.dtype != a.dtype or b.device != a.device:
        raise TypeError(f"{op}: b must match a's dtype and device ({a.dtype}, {a.device}), got ({b.dtype}, {b.device})")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"{op}: a.shape[1]={a.shape[1]} must equal b.shape[0]={b.shape[0]} (a is [M, K], b is [K, N])")


def all_reduce_shape(x, algorithm="auto") -> tuple[int, ...]:
    check_tensor("all_reduce", "x", x, REDUCE_DTYPES)
    if algorithm not in collectives.ALGORITHMS:
        raise ValueError(f"all_reduce: algorithm must be one of {collectives.ALGORITHMS}, got {algorithm!r}")
    return tuple(x.shape)


def all_reduce_rms_norm_shape(x, residual, weight, eps) -> tuple[int, ...]:
    op = "all_reduce_rms_norm"
    check_tensor(op, "x", x, REDUCE_DTYPES)
    if x.dim() == 0:
        raise ValueError(f"{op}: x must have at least one dimension (normalised over the last), got a scalar")
    if residual is not None:
        check_tensor(op, "residual", residual, (x.dtype,))
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    check_tensor(op, "weight", weight, (x.dtype,), ndim=1)
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: weight has {weight.shape[0]} elements, expected x.shape[-1]={x.shape[-1]}")
    if not (isinstance(eps, float) and 0 < eps < float("inf")):
        raise ValueError(f"{op}: eps must be a positive finite float, got {eps!r}")
    return tuple(x.shape)


def all_gather_shape(x, dim=0) -> tuple[int, ...]:
    check_tensor("all_gather", "x", x, MOVE_DTYPES)
    d = check_dim("all_gather", x, dim)
    shape = list(x.shape)
    shape[d] *= runtime.world_size()
    return tuple(shape)


def reduce_scatter_shape(x, dim=0) -> tuple[int, ...]:
    check_tensor("reduce_scatter", "x", x, REDUCE_DTYPES)
    d = check_dim("reduce_scatter", x, dim)
    check_divisible("reduce_scatter", f"x.shape[{d}]", x.shape[d])
    shape = list(x.shape)
    shape[d] //= runtime.world_size()
    return tuple(shape)


def all_to_all_shape(x) -> tuple[int, ...]:
    check_tensor("all_to_all", "x", x, MOVE_DTYPES)
    if x.dim() == 0:
        raise ValueError("all_to_all: x must have at least one dimension, got a scalar")
    check_divisible("all_to_all", "x.shape[0]", x.shape[0])
    return tuple(x.shape)


def check_path(op: str, path) -> None:
    if path not in gemm.PATHS:
        raise ValueError(f"{op}: path must be one of {gemm.PATHS}, got {path!r}")


def gemm_all_reduce_shape(a, b, bias=None, path="auto") -> tuple[int, ...]:
    check_matmul("gemm_all_reduce", a, b)
    check_path("gemm_all_reduce", path)
    if bias is not None:
        check_tensor("gemm_all_reduce", "bias", bias, (a.dtype,), ndim=1)
        if bias.shape[0] != b.shape[1]:
            raise ValueError(f"gemm_all_reduce: bias has {bias.shape[0]} elements, expected N={b.shape[1]}")
    return (a.shape[0], b.shape[1])


def gemm_reduce_scatter_shape(a, b, path="auto") -> tuple[int, ...]:
    check_matmul("gemm_reduce_scatter", a, b)
    check_path("gemm_reduce_scatter", path)
    check_divisible("gemm_reduce_scatter", "a.shape[0] (M)", a.shape[0])
    return (a.shape[0] // runtime.world_size(), b.shape[1])


def all_gather_gemm_shape(a, b, path="auto") -> tuple[int, ...]:
    check_matmul("all_gather_gemm", a, b)
    check_path("all_gather_gemm", path)
    return (a.shape[0] * runtime.world_size(), b.shape[1])


def _check_count(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")


def moe_dispatch_shape(x, topk_ids, num_experts, expert_x, expert_counts) -> tuple[int, ...]:
    op = "moe_dispatch"
    check_tensor(op, "x", x, TOKEN_DTYPES, ndim=2)
    check_tensor(op, "topk_ids", topk_ids, ID_DTYPES, ndim=2)
    if topk_ids.shape[0] != x.shape[0] or topk_ids.shape[1] < 1:
        raise ValueError(f"{op}: topk_ids must be [T={x.shape[0]}, k >= 1] (one row per token of x), "
                         f"got {tuple(topk_ids.shape)}")
    _check_count(op, "num_experts", num_experts)
    check_divisible(op, "num_experts", num_experts)
    local = num_experts // runtime.world_size()
    check_tensor(op, "expert_x", expert_x, (x.dtype,), ndim=3)
    if expert_x.shape[0] != local or expert_x.shape[2] != x.shape[1] or expert_x.shape[1] < 1:
        raise ValueError(f"{op}: expert_x must be [E_local={local}, capacity >= 1, H={x.shape[1]}], "
                         f"got {tuple(expert_x.shape)}")
    if not expert_x.is_contiguous():
        raise ValueError(f"{op}: expert_x must be contiguous")
    check_tensor(op, "expert_counts", expert_counts, (torch.int32,), ndim=1)
    if expert_counts.shape[0] != local:
        raise ValueError(f"{op}: expert_counts must have E_local={local} elements, got {expert_counts.shape[0]}")
    return tuple(topk_ids.shape)


def moe_dispatch_values(x, topk_ids, num_experts, expert_x, expert_counts) -> None:
    bad = (topk_ids < 0) | (topk_ids >= num_experts)
    if bad.any():
        t, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"moe_dispatch: topk_ids[{t}, {j}]={int(topk_ids[t, j])} is outside [0, {num_experts})")


def moe_dispatch_signature(x, topk_ids, num_experts, expert_x, expert_counts) -> tuple:
    # Ranks may have different numbers of tokens; everything else must agree.
    return (x.shape[1], str(x.dtype), topk_ids.shape[1], num_experts, tuple(expert_x.shape), str(expert_x.dtype),
            *moe.remote_offsets(expert_x=expert_x))


def moe_combine_shape(expert_y, topk_weights, routing) -> tuple[int, ...]:
    op = "moe_combine"
    check_tensor(op, "expert_y", expert_y, TOKEN_DTYPES, ndim=3)
    if not expert_y.is_contiguous():
        raise ValueError(f"{op}: expert_y must be contiguous")
    check_tensor(op, "topk_weights", topk_weights, (torch.float32,), ndim=2)
    check_tensor(op, "routing", routing, (torch.int64,), ndim=2)
    if routing.shape != topk_weights.shape:
        raise ValueError(f"{op}: routing {tuple(routing.shape)} and topk_weights {tuple(topk_weights.shape)} must "
                         "have the same [T, k] shape")
    return (routing.shape[0], expert_y.shape[2])


def moe_combine_values(expert_y, topk_weights, routing) -> None:
    slots = expert_y.shape[0] * expert_y.shape[1] * runtime.world_size()
    bad = (routing < 0) | (routing >= slots)
    if bad.any():
        t, j = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"moe_combine: routing[{t}, {j}]={int(routing[t, j])} is not a slot from moe_dispatch "
                         f"with this expert_y (expected [0, {slots}))")


def moe_combine_signature(expert_y, topk_weights, routing) -> tuple:
    return tuple(expert_y.shape), str(expert_y.dtype), topk_weights.shape[1], *moe.remote_offsets(expert_y=expert_y)


# ---------------------------------------------------------------------------------------------
# The torch backend: torch.distributed (gloo for CPU tensors, NCCL for CUDA tensors when each rank
# owns its GPU; gloo through host copies when ranks share one GPU).


# torch 2.13 renamed the flat collectives (the old names warn); torch 2.11 has only the old names.
_all_gather_flat = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)


def _wire(x: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy of x that the process group can move (float8 as raw bytes)."""
    if x.is_cuda and runtime.shared_gpu():
        y = x.to("cpu", memory_format=torch.contiguous_format)
    else:
        y = x.clone(memory_format=torch.contiguous_format)
    return y.view(torch.uint8) if y.dtype in FLOAT8 else y


def _unwire(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y.view(like.dtype).to(like.device)


def _empty_wire(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def torch_all_reduce(x: torch.Tensor, algorithm: str = "auto") -> torch.Tensor:
    y = _wire(x)
    dist.all_reduce(y)
    return _unwire(y, x)


def add_rms_norm(s: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    """(rms_norm(h) * weight, h) for h = s + residual (or s): over the last dimension, the variance in
    float32 at least, as Hugging Face's LlamaRMSNorm computes it."""
    h = s if residual is None else s + residual
    wide = h.to(torch.promote_types(h.dtype, torch.float32))
    normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(h.dtype), h


def torch_all_reduce_rms_norm(x, residual, weight, eps):
    return add_rms_norm(torch_all_reduce(x), residual, weight, eps)


def nvshmem_all_reduce_rms_norm(x, residual, weight, eps):
    return add_rms_norm(collectives.all_reduce(x), residual, weight, eps)


def torch_all_gather(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    d = dim % x.dim()
    y = _wire(x)
    world = runtime.world_size()
    gathered = _empty_wire((world * y.shape[0], *y.shape[1:]), y)
    _all_gather_flat(gathered, y)
    # [world, ..., n_d, ...] -> [..., world * n_d, ...]: rank r's block lands at offset r * n_d.
    out = gathered.unflatten(0, (world, y.shape[0])).movedim(0, d).reshape(all_gather_shape(x, dim))
    return _unwire(out, x)


def torch_reduce_scatter(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    d = dim % x.dim()
    world = runtime.world_size()
    # Rank r receives the sum of every rank's r-th chunk along dim.
    chunks = x.unflatten(d, (world, x.shape[d] // world)).movedim(d, 0)
    y = _wire(chunks)
    out = _empty_wire(y.shape[1:], y)
    _reduce_scatter_flat(out, y.flatten(0, 1))
    return _unwire(out, x)


def torch_all_to_all(x: torch.Tensor) -> torch.Tensor:
    y = _wire(x)
    out = torch.empty_like(y)
    dist.all_to_all_single(out, y)
    return _unwire(out, x)


def _exchange(t: torch.Tensor, send_counts: torch.Tensor, recv_counts: torch.Tensor | None = None):
    """all_to_all of t's rows, send_counts[r] of them to rank r (already grouped by rank). Without
    recv_counts, first learns them; returns (rows received, grouped by source rank, recv_counts)."""
    if recv_counts is None:
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
    y = _wire(t)
    out = torch.empty((int(recv_counts.sum()), *y.shape[1:]), dtype=y.dtype, device=y.device)
    dist.all_to_all_single(out, y, recv_counts.tolist(), send_counts.tolist())
    return _unwire(out, t), recv_counts


def torch_moe_dispatch(x, topk_ids, num_experts, expert_x, expert_counts):
    rank, world = runtime.rank(), runtime.world_size()
    local, capacity = expert_x.shape[0], expert_x.shape[1]
    flat = topk_ids.reshape(-1).long().cpu()
    # Sending in (expert, token) order groups the rows by owner rank, and the owner's stable sort by
    # expert then yields (expert, source rank, token): the documented slot order.
    order = torch.argsort(flat, stable=True)
    experts = flat[order]
    send_counts = torch.bincount(experts // local, minlength=world)
    rows, recv_counts = _exchange(x[(order // topk_ids.shape[1]).to(x.device)], send_counts)
    got, _ = _exchange(experts, send_counts, recv_counts)
    by_expert = torch.argsort(got, stable=True)
    mine = got[by_expert] - rank * local
    counts = torch.bincount(mine, minlength=local)
    worst = int(counts.max()) if counts.numel() else 0
    overflow = runtime.problems_on_ranks(
        None if worst <= capacity else f"expert {rank * local + int(counts.argmax())} received {worst} (token, expert) "
        f"pairs, more than capacity={capacity} (expert_x.shape[1])")
    if overflow:
        raise ValueError(f"moe_dispatch: {overflow}")
    slots = torch.arange(mine.numel()) - (torch.cumsum(counts, 0) - counts)[mine]
    expert_x[mine.to(expert_x.device), slots.to(expert_x.device)] = rows[by_expert.to(rows.device)]
    expert_counts.copy_(counts)
    # Each slot goes back to the rank that sent the pair, in the order it sent them.
    arrival_slots = torch.empty_like(slots)
    arrival_slots[by_expert] = slots
    back, _ = _exchange(arrival_slots, recv_counts, send_counts)
    routing = torch.empty_like(flat)
    routing[order] = experts * capacity + back
    return routing.view(topk_ids.shape).to(topk_ids.device)


def torch_moe_combine(expert_y, topk_weights, routing):
    rank, world = runtime.rank(), runtime.world_size()
    local, capacity, hidden = expert_y.shape
    flat = routing.reshape(-1).cpu()
    order = torch.argsort(flat // (local * capacity), stable=True)
    send_counts = torch.bincount(flat[order] // (local * capacity), minlength=world)
    wanted, recv_counts = _exchange(flat[order], send_counts)
    rows = expert_y.reshape(-1, hidden)[(wanted - rank * local * capacity).to(expert_y.device)]
    replies, _ = _exchange(rows, recv_counts, send_counts)
    per_pair = torch.empty((flat.numel(), hidden), dtype=torch.float32, device=expert_y.device)
    per_pair[order.to(expert_y.device)] = replies.float()
    y = (per_pair.view(*routing.shape, hidden) * topk_weights.unsqueeze(-1)).sum(1)
    return y.to(expert_y.dtype)


def _gemm_ops(all_reduce, reduce_scatter, all_gather):
    """The GEMM ops as a matmul and then a collective: the torch backend (where `path` has no choice
    to make), and the nvshmem backend's unfused path."""

    def gemm_all_reduce(a, b, bias=None, path="auto"):
        out = all_reduce(a @ b)
        return out if bias is None else out + bias

    def gemm_reduce_scatter(a, b, path="auto"):
        return reduce_scatter(a @ b, 0)

    def all_gather_gemm(a, b, path="auto"):
        return all_gather(a, 0) @ b

    return gemm_all_reduce, gemm_reduce_scatter, all_gather_gemm


def _fused_or(name: str, unfused):
    """The nvshmem impl: the fused kernels or `unfused`, as gemm.choose decides (the same on every rank)."""
    # The dispatcher passes the arguments the caller gave, without the schema's defaults: fill them in.
    defaults = unfused.__defaults__

    def impl(a, b, *args):
        *bias, path = args + defaults[len(args):]
        if gemm.path_for(name, a, b, path) == "fused":
            return gemm.fused(name, a, b, *bias)
        return unfused(a, b, *args)

    return impl


torch_gemm_all_reduce, torch_gemm_reduce_scatter, torch_all_gather_gemm = _gemm_ops(
    torch_all_reduce, torch_reduce_scatter, torch_all_gather)
nvshmem_gemm_all_reduce, nvshmem_gemm_reduce_scatter, nvshmem_all_gather_gemm = (
    _fused_or(name, unfused) for name, unfused in zip(
        ("gemm_all_reduce", "gemm_reduce_scatter", "all_gather_gemm"),
        _gemm_ops(collectives.all_reduce, collectives.reduce_scatter, collectives.all_gather)))


# ---------------------------------------------------------------------------------------------
# Registration

OPS = (
    Op("all_reduce(Tensor x, str algorithm='auto') -> Tensor", all_reduce_shape, torch_all_reduce,
       collectives.all_reduce),
    Op("all_reduce_rms_norm(Tensor x, Tensor? residual, Tensor weight, float eps) -> (Tensor, Tensor)",
       all_reduce_rms_norm_shape, torch_all_reduce_rms_norm, nvshmem_all_reduce_rms_norm, outputs=2),
    Op("all_gather(Tensor x, int dim=0) -> Tensor", all_gather_shape, torch_all_gather, collectives.all_gather),
    Op("reduce_scatter(Tensor x, int dim=0) -> Tensor", reduce_scatter_shape, torch_reduce_scatter,
       collectives.reduce_scatter),
    Op("all_to_all(Tensor x) -> Tensor", all_to_all_shape, torch_all_to_all, collectives.all_to_all),
    Op("gemm_all_reduce(Tensor a, Tensor b, Tensor? bias=None, str path='auto') -> Tensor", gemm_all_reduce_shape,
       torch_gemm_all_reduce, nvshmem_gemm_all_reduce),
    Op("gemm_reduce_scatter(Tensor a, Tensor b, str path='auto') -> Tensor", gemm_reduce_scatter_shape,
       torch_gemm_reduce_scatter, nvshmem_gemm_reduce_scatter),
    Op("all_gather_gemm(Tensor a, Tensor b, str path='auto') -> Tensor", all_gather_gemm_shape,
       torch_all_gather_gemm, nvshmem_all_gather_gemm),
    Op("moe_dispatch(Tensor x, Tensor topk_ids, int num_experts, Tensor(a!) expert_x, Tensor(b!) expert_counts) "
       "-> Tensor", moe_dispatch_shape, torch_moe_dispatch, moe.dispatch, out_dtype=torch.int64,
       signature=moe_dispatch_signature, value_check=moe_dispatch_values),
    Op("moe_combine(Tensor expert_y, Tensor topk_weights, Tensor routing) -> Tensor", moe_combine_shape,
       torch_moe_combine, moe.combine, signature=moe_combine_signature, value_check=moe_combine_values),
)


def debug_enabled() -> bool:
    return os.environ.get("SYMCOMM_DEBUG", "0") not in ("", "0")


def _agree_on_call(op: Op, args, error: Exception | None) -> None:
    """Debug mode: every rank raises if any rank's call is invalid or differs from rank 0's."""
    name, world = op.name, runtime.world_size()
    mine = (None if error is None else f"{type(error).__name__}: {error}", op.signature(*args))
    everyone: list = [None] * world
    dist.all_gather_object(everyone, mine)
    bad = [f"rank {r}: {err}" for r, (err, _) in enumerate(everyone) if err is not None]
    if bad:
        raise (type(error) if error is not None else ValueError)(f"{name}: invalid call on some ranks; " + "; ".join(bad))
    if any(sig != everyone[0][1] for _, sig in everyone):
        calls = "; ".join(f"rank {r}: {sig}" for r, (_, sig) in enumerate(everyone))
        raise ValueError(f"{name}: ranks called with different arguments (shapes, dtypes, values): {calls}")


_fallback_logged: set[str] = set()


def _pick_impl(op: Op, args) -> Callable[..., torch.Tensor]:
    if runtime.backend() == "nvshmem":
        if op.nvshmem_impl is not None:
            return op.nvshmem_impl
        if op.name not in _fallback_logged and runtime.rank() == 0:
            log.info("symcomm: %s has no nvshmem kernel yet; running it on the torch backend", op.name)
        _fallback_logged.add(op.name)
    return op.torch_impl


def _register(op: Op) -> None:
    lib.define(op.schema)

    def fake(*args):
        outs = tuple(args[0].new_empty(op.out_shape(*args), dtype=op.out_dtype or args[0].dtype)
                     for _ in range(op.outputs))
        return outs if op.outputs > 1 else outs[0]

    def real(*args):
        error = None
        debug = debug_enabled()
        try:
            op.out_shape(*args)
            if op.value_check and (debug or not args[0].is_cuda):
                op.value_check(*args)
        except (TypeError, ValueError) as e:
            error = e
        if debug:
            _agree_on_call(op, args, error)
        if error is not None:
            raise error
        return _pick_impl(op, args)(*args)

    torch.library.register_fake(f"symcomm::{op.name}", fake, lib=lib)
    lib.impl(op.name, real, "CPU")
    lib.impl(op.name, real, "CUDA")


for _op in OPS:
    _register(_op)
