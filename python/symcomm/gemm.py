"""The nvshmem backend's GEMM ops: the host side of csrc/gemm.

Each op has two paths, and every rank takes the same one (the choice depends on sizes only):

- unfused: torch.matmul (cuBLAS), then our collective. It wins at small M, where the GEMM is too short
  to hide anything behind and a second kernel only adds latency.
- fused: the CUTLASS GEMM on most of the SMs and the comm kernel on the rest, running at the same time
  on two streams (gemm_begin, fork, the two kernels, join):
    gemm_all_reduce      the GEMM writes its partial tiles into the workspace and tags each one; the
                         tile's owner (tile % world) sums it over the ranks as soon as all have tagged
                         it, and the others copy the sum from the owner (a two-shot all-reduce by tile);
    gemm_reduce_scatter  the same partial tiles; each rank sums those that hold its rows;
    all_gather_gemm      the comm kernel copies every rank's rows of `a` band by band into a gathered A
                         in the workspace, and the GEMM waits for each band just before it loads it.

'auto' takes the fused path from the M cut-point in tuning.json on, when the sizes allow it;
'fused' insists, and raises with the reason when they do not. SYMCOMM_GEMM_PATH overrides 'auto'.
Neither takes the fused path on a GPU other than sm_90 (the GEMM core is sm_90a code), nor while a
CUDA graph is being captured: there the fork and join become two sibling nodes with no order between
them, and a graph that runs one after the other never finishes the one that waits for the other.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from symcomm import collectives, runtime, streams

PATHS = ("auto", "fused", "unfused")
PATH_ENV = "SYMCOMM_GEMM_PATH"
DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2}
MODES = {"gemm_all_reduce": 0, "gemm_reduce_scatter": 1, "all_gather_gemm": 2}
_TUNING = collectives._TUNING
# The kernels' fixed sizes (csrc/gemm/gemm.h, csrc/core/limits.h), known here without a GPU build.
TILE_M, TILE_N, MAX_TILES = 128, 256, 8192
_ALIGN = 256  # workspace areas start on 256-byte boundaries


def _up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _tiles(m: int, n: int) -> int:
    return -(-m // TILE_M) * -(-n // TILE_N)


@dataclass(frozen=True)
class Plan:
    """A fused call in pieces of `rows` rows (of a; for all_gather_gemm, of every rank's a), each one
    GEMM and one comm kernel. In the workspace's data area: the piece's partial sums (or gathered A)
    at 0, and all-reduce's reduced tiles at `result` (bytes)."""

    rows: int
    result: int = 0


@functools.lru_cache(maxsize=1024)  # asked twice per call (choose, then fused), with the same sizes every layer
def fused_plan(op: str, m: int, n: int, k: int, dtype: torch.dtype, world: int, data_bytes: int) -> Plan | str:
    """The fused path's plan for this call, or why it cannot run (the same answer on every rank)."""
    if dtype not in DTYPE_CODES:
        return f"dtype {str(dtype).removeprefix('torch.')} (the fused kernels take float16 and bfloat16)"
    if k % 8 or n % 8:
        return f"K={k} and N={n} must be multiples of 8 (16-byte rows for the tensor-memory loads)"
    if world == 1:
        return Plan(m)  # the GEMM alone, straight into the output
    isz = torch.empty((), dtype=dtype).element_size()
    if op == "gemm_all_reduce":
        # Per piece: the partial and the reduced tiles, [rows, n] each.
        fit = (data_bytes - _ALIGN) // (2 * n * isz)
        rows = min(m, fit // TILE_M * TILE_M, MAX_TILES // _tiles(1, n) * TILE_M)
        if rows < min(m, TILE_M):
            return f"the workspace holds {fit} rows of the [M, N={n}] partial sums; init(workspace_bytes=...) larger"
        return Plan(rows, _up(rows * n * isz, _ALIGN))
    if op == "gemm_reduce_scatter":
        # Every rank's rows come out of one GEMM, so the whole [M, N] partial must fit at once.
        need = m * n * isz
        if need > data_bytes or _tiles(m, n) > MAX_TILES:
            return (f"the [M={m}, N={n}] partial ({need / 2**20:.1f} MiB, {_tiles(m, n)} tiles) exceeds the workspace "
                    f"({data_bytes / 2**20:.1f} MiB, {MAX_TILES} tiles); init(workspace_bytes=...) larger")
        return Plan(m)
    # all_gather_gemm: the gathered [world, rows, k] A.
    fit = data_bytes // (world * k * isz)
    rows = m if fit >= m else fit // TILE_M * TILE_M
    rows = min(rows, MAX_TILES // world * TILE_M)
    if rows < min(m, TILE_M):
        return f"the workspace holds {fit} rows of every rank's [M, K={k}] input; init(workspace_bytes=...) larger"
    return Plan(rows)


def fused_min_m(world: int) -> int | None:
    """From how many rows (of the GEMM each rank runs) 'auto' fuses on this GPU; None: never."""
    return collectives.tuned("gemm_fused_min_m").get(str(world))


def choose(op: str, m: int, n: int, k: int, dtype: torch.dtype, world: int, data_bytes: int,
           path: str = "auto", reachable: bool = True, max_peers: int = 8, capability: tuple[int, int] | None = None,
           capturing: bool = False) -> tuple[str, str]:
    """('fused' | 'unfused', why) for torch.ops.symcomm.<op> on this rank's a [m, k] and b [k, n] on the
    nvshmem backend, given the workspace's data area, whether load/store reaches every rank, how many
    ranks the fused comm kernel can read, the GPU's compute capability (None: the emulated device) and
    whether a CUDA graph is being captured (the same on every rank, as the sizes are: every rank decides
    the same)."""
    if path == "auto":
        path = os.environ.get(PATH_ENV, "auto")
        if path not in PATHS:
            raise ValueError(f"{PATH_ENV}={path!r}; expected one of {PATHS}")
    if capturing:
        plan = ("a CUDA graph is being captured: the GEMM and the comm kernel, one of which waits for the other, "
                "would be graph nodes with no order between them, and a graph may run them one after the other")
    elif capability not in (None, runtime.GEMM_CORE_CAPABILITY):
        plan = (f"this GPU has compute capability {capability[0]}.{capability[1]}; the fused GEMM's core is "
                "sm_90a code only")
    # Tensor parallelism stays within a node: the fused comm kernel reads its peers by load/store.
    elif not reachable:
        plan = "some ranks are out of load/store reach (other nodes): the fused kernels run within one NVLink domain"
    elif world > max_peers:
        plan = f"{world} ranks: the fused kernels read at most {max_peers} peers by load/store"
    else:
        plan = fused_plan(op, m, n, k, dtype, world, data_bytes)
    if path == "fused":
        if isinstance(plan, str):
            raise ValueError(f"{op}: path='fused' cannot run here: {plan}")
        return "fused", "requested"
    if path == "unfused":
        return "unfused", "requested"
    if isinstance(plan, str):
        return "unfused", plan
    rows = m * world if op == "all_gather_gemm" else m
    cut = fused_min_m(world)
    if cut is None or rows < cut:
        return "unfused", f"M={rows} is below the fused cut-point ({cut}) for {world} ranks"
    return "fused", f"M={rows} is at or above the fused cut-point ({cut}) for {world} ranks"


def path_for(op: str, a: torch.Tensor, b: torch.Tensor, path: str = "auto") -> str:
    """The path torch.ops.symcomm.<op>(a, b, path=path) takes on the nvshmem backend."""
    ext = runtime.load_extension()
    data_bytes = runtime.workspace().numel() - ext.workspace_data_offset()
    # The emulated device has no CUDA graphs (and a CPU-only torch cannot be asked).
    capturing = not runtime.emulated() and torch.cuda.is_current_stream_capturing()
    return choose(op, a.shape[0], b.shape[1], a.shape[1], a.dtype, runtime.world_size(), data_bytes, path,
                  runtime.all_reachable(), ext.max_peers, runtime.capability(), capturing)[0]


# ---------------------------------------------------------------------------------------------
# The fused path


@dataclass(frozen=True)
class _Operand:
    tensor: torch.Tensor  # held until the kernels are queued (it may be a copy)
    ld: int  # elements between the rows of its stored layout
    k_major: bool = False

    @property
    def ptr(self) -> int:
        return self.tensor.data_ptr()


def _aligned_copy(t: torch.Tensor) -> torch.Tensor:
    # The caching allocator's blocks are 512-byte aligned, so a fresh contiguous copy is aligned.
    return t.clone(memory_format=torch.contiguous_format)


def _rows_operand(a: torch.Tensor) -> _Operand:
    """a as the GEMM reads it: row-major with 16-byte aligned rows, in place when it already is."""
    if a.stride(1) == 1 and a.stride(0) % 8 == 0 and a.stride(0) >= a.shape[1] and a.data_ptr() % 16 == 0:
        return _Operand(a, a.stride(0))
    return _Operand(_aligned_copy(a), a.shape[1])


def _weight(b: torch.Tensor) -> _Operand:
    """b as the GEMM reads it: [K, N] row-major, or [N, K] row-major (a transposed weight, as the
    layers pass it), in place when its strides allow."""
    k, n = b.shape
    if b.data_ptr() % 16 == 0:
        if b.stride(1) == 1 and b.stride(0) % 8 == 0 and b.stride(0) >= n:
            return _Operand(b, b.stride(0))
        if b.stride(0) == 1 and b.stride(1) % 8 == 0 and b.stride(1) >= k:
            return _Operand(b, b.stride(1), k_major=True)
    return _Operand(_aligned_copy(b), n)


def _overlapped(ctx, comm, gemm, gemm_waits: bool) -> None:
    """Runs comm(stream) on a side stream alongside gemm(stream) on the current one, after gemm_begin
    and before anything queued later (fork and join; never captured in a CUDA graph: see choose).

    gemm_waits: whether the GEMM waits for the comm kernel (all_gather_gemm's bands) rather than the
    comm kernel for the GEMM (the tiles of the other two).

    Both kernels fit at once: the GEMM's persistent grid is sized to our SMs less the comm kernel's
    blocks, and init loaded every kernel (under lazy loading, a first launch could wait for the kernel
    already spinning). Still, the kernel that the other waits for is queued first, so that it is
    resident first should the SMs run short (another process's kernels, a smaller MPS share than we
    think): the comm kernel for all_gather_gemm, whose GEMM waits for its bands; otherwise the GEMM,
    which waits for nothing, so it finishes and frees its SMs even if the comm kernel gets none first.
    """
    main, side = ctx.stream, streams.side()
    ctx.ext.gemm_begin(ctx.workspace, main.cuda_stream)
    side.wait_stream(main)
    if gemm_waits:
        comm(side.cuda_stream)
        gemm(main.cuda_stream)
    else:
        gemm(main.cuda_stream)
        comm(side.cuda_stream)
    main.wait_stream(side)
    streams.launched(main)


def _comm_blocks() -> int:
    """SMs given to the comm kernel (the GEMM gets the rest), the same on every rank."""
    share = _TUNING["gemm_comm_sm_share"]
    return max(2, min(runtime.load_extension().max_blocks, round(runtime.sm_count() * share)))


def _gemm_sms(world: int) -> int:
    """SMs the fused ops' persistent GEMM runs on: this rank's, less the comm kernel's where there is one."""
    return max(1, runtime.sm_count() - (_comm_blocks() if world > 1 else 0))


def fused(op: str, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    ctx = collectives._context()
    world, rank = ctx.world, ctx.rank
    m, k = a.shape
    n = b.shape[1]
    plan = fused_plan(op, m, n, k, a.dtype, world, ctx.data_bytes)
    assert isinstance(plan, Plan), plan  # choose() raised, or chose the unfused path
    isz, code = a.element_size(), DTYPE_CODES[a.dtype]
    lhs, rhs = _rows_operand(a), _weight(b)
    out = torch.empty((m * world if op == "all_gather_gemm" else m // world if op == "gemm_reduce_scatter" else m, n),
                      dtype=a.dtype, device=a.device)
    if bias is not None and (not bias.is_contiguous() or bias.data_ptr() % 16):
        bias = _aligned_copy(bias)
    blocks, sms = _comm_blocks(), _gemm_sms(world)
    data = ctx.data - ctx.workspace  # the data area's offset in the workspace

    def gemm(stream, rows, a_ptr, lda, d_ptr, batches=1, a_batch=0, d_batch=0, bias_ptr=0, tag=False, wait=False,
             along_m=True):
        ctx.ext.gemm(ctx.workspace, rows, n, k, batches, a_ptr, lda, a_batch, rhs.ptr, rhs.ld, rhs.k_major, d_ptr, n,
                     d_batch, bias_ptr, code, tag, wait, along_m, sms, stream)

    def comm(stream, rows, dst=0, result=0, src=0, src_pitch=0):
        ctx.ext.gemm_comm(ctx.workspace, MODES[op], rows, 0 if op == "all_gather_gemm" else n,
                          k if op == "all_gather_gemm" else 0, data, result, src, src_pitch, dst, n, code, blocks,
                          stream)

    bias_ptr = bias.data_ptr() if bias is not None else 0
    if world == 1:
        gemm(ctx.stream.cuda_stream, m, lhs.ptr, lhs.ld, out.data_ptr(), bias_ptr=bias_ptr)
        streams.launched(ctx.stream)
    elif op == "gemm_all_reduce":
        for r0 in range(0, m, plan.rows):
            rows = min(plan.rows, m - r0)
            a_ptr, d_ptr = lhs.ptr + r0 * lhs.ld * isz, out.data_ptr() + r0 * n * isz
            _overlapped(ctx, lambda s: comm(s, rows, dst=d_ptr, result=data + plan.result),
                        # The bias goes into one rank's partial sums, so that the total holds it once.
                        lambda s: gemm(s, rows, a_ptr, lhs.ld, ctx.data, bias_ptr=bias_ptr if rank == 0 else 0,
                                       tag=True), gemm_waits=False)
    elif op == "gemm_reduce_scatter":
        _overlapped(ctx, lambda s: comm(s, m, dst=out.data_ptr()),
                    lambda s: gemm(s, m, lhs.ptr, lhs.ld, ctx.data, tag=True), gemm_waits=False)
    else:
        # Piece by piece: rows [r0, r0 + rows) of every rank's a. The gathered A is [world, rows, k], and
        # batch l of the GEMM writes rank l's rows of the output.
        for r0 in range(0, m, plan.rows):
            rows = min(plan.rows, m - r0)
            a_ptr, d_ptr = lhs.ptr + r0 * lhs.ld * isz, out.data_ptr() + r0 * n * isz
            _overlapped(ctx, lambda s: comm(s, rows, src=a_ptr, src_pitch=lhs.ld),
                        lambda s: gemm(s, rows, ctx.data, k, d_ptr, batches=world, a_batch=rows * k, d_batch=m * n,
                                       wait=True, along_m=False), gemm_waits=True)
    return out
