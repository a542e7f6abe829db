"""The nvshmem backend's collectives: the host side of csrc/collectives.

Every op here has the same shape: view the input as rows (one per destination rank for
reduce-scatter and all-to-all, one row otherwise), then, chunk by chunk, give the kernel a symmetric
source and let it read every peer's rows through peer pointers:

- a symmetric input (made by symcomm.empty, 16-byte aligned) is read in place: zero copies;
- any other input is first copied into this rank's staging area in the workspace;
- a message larger than the staging area is split into chunks, each one kernel launch.

The chunk plan depends only on sizes, never on whether a rank staged, so every rank launches the same
kernels in the same order (the kernels' barriers count on that).

On the remote path (runtime.transport() == "rma": some peer on another node, or SYMCOMM_TRANSPORT=rma)
nobody reads a peer: every rank puts the rows meant for each peer into that peer's inbox, a second
area of the workspace after the staging area, and reduces or copies from its own inbox (push_reduce,
push_gather). All-reduce is then one-shot (each rank receives every input). Where the ranks sit on
several nodes of several ranks each, every collective is hierarchical, in steps among the ranks of a
node and among one rank of every node (a rail): all-reduce inside the node, across, inside again;
all-gather across, then inside; reduce-scatter and all-to-all inside, then across.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from symcomm import runtime, streams

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
ALGORITHMS = ("auto", "one_shot", "two_shot")
ALGORITHM_ENV = "SYMCOMM_ALL_REDUCE_ALGORITHM"
_TUNING = json.loads((Path(__file__).with_name("tuning.json")).read_text())


@dataclass(frozen=True)
class _Context:
    ext: object
    workspace: int  # address of this rank's workspace
    data: int  # address of its data area
    data_bytes: int
    rank: int
    world: int
    stream: object  # symcomm.streams.current()
    rma: bool  # the remote path


def _context() -> _Context:
    ext = runtime.load_extension()
    ws = runtime.workspace()
    offset = ext.workspace_data_offset()
    return _Context(ext, ws.data_ptr(), ws.data_ptr() + offset, ws.numel() - offset, runtime.rank(),
                    runtime.world_size(), streams.current(), runtime.transport() == "rma")


def _round_down(n: int, multiple: int) -> int:
    return n // multiple * multiple


def _source(ctx: _Context, rows: torch.Tensor, lo: int, hi: int, staging: int | None = None) -> tuple[int, int]:
    """(address, row pitch in bytes) of columns [lo, hi) of every row of `rows` ([R, C], contiguous),
    in place when it is symmetric and aligned, else after copying them into the staging area (at
    `staging`, an address in the data area; default its start)."""
    itemsize, n_rows, width = rows.element_size(), rows.shape[0], hi - lo
    # One row has no pitch; giving it none keeps the 16-byte check about the sizes that matter.
    multi = n_rows > 1
    if runtime.is_symmetric(rows) and rows.data_ptr() % 16 == 0:
        return rows.data_ptr() + lo * itemsize, rows.shape[1] * itemsize * multi
    staging = ctx.data if staging is None else staging
    start = staging - ctx.workspace
    staged = runtime.workspace()[start:start + n_rows * width * itemsize].view(rows.dtype).view(n_rows, width)
    staged.copy_(rows[:, lo:hi])
    return staging, width * itemsize * multi


def _chunks(columns: int, itemsize: int, capacity_bytes: int):
    """Splits [0, columns) into ranges that fit `capacity_bytes` per row, on 16-byte boundaries."""
    step = max(_round_down(capacity_bytes, 16) // itemsize, 16 // itemsize)
    for lo in range(0, columns, step):
        yield lo, min(columns, lo + step)


def _vec16(*pitches: int) -> bool:
    # Addresses are always 16-byte aligned (fresh outputs, the workspace, aligned in-place inputs, chunks
    # on 16-byte boundaries), so the pitches decide (a row's length need not: the kernels finish it with
    # a scalar tail); they are the same on every rank, and so is the choice.
    return all(n % 16 == 0 for n in pitches)


def _launch(fn, ctx: _Context, src: tuple[int, int], row: int, length: int, dst: int, dst_pitch: int,
            dtype: torch.dtype, vec16: bool, result_offset: int = 0, team: tuple[int, ...] = ()) -> None:
    """One kernel call; the push kernels also take their team (first, stride, size)."""
    fn(ctx.workspace, src[0], src[1], row, length, dst, dst_pitch, result_offset, DTYPE_CODES.get(dtype, 0), vec16,
       ctx.stream.cuda_stream, *team)
    streams.launched(ctx.stream)


# The remote path's thirds of the data area: flat calls among every rank, and a hierarchical
# all-reduce's steps inside a node and across the nodes. A step's peers are not the peers of the step
# before (a rank on another node may run ahead into the next step), so no two kinds of step share an
# inbox: each kind's closing barrier guards only its own.
FLAT, NODE, RAIL = range(3)
EVERY_RANK = (0, 1, 0)  # a team: (first, stride, size); size 0 is every rank


def _push(kernel: str, ctx: _Context, rows: torch.Tensor, out: torch.Tensor, dst_pitch: int, region: int = FLAT,
          team: tuple[int, int, int] = EVERY_RANK) -> None:
    """The remote path of every collective, among `team`: rows ([1 or team size, C]) staged at the front
    of `region` of the data area, the inbox (a slot of one chunk per member) after them, chunks of
    columns that fit both."""
    isz, c, n_rows = rows.element_size(), rows.shape[1], rows.shape[0]
    members = team[2] or ctx.world
    third = _round_down(ctx.data_bytes // 3, 256)
    base = ctx.data + region * third
    chunk = _round_down(third // (n_rows + members) - 16, 16)
    inbox = base - ctx.workspace + n_rows * chunk
    fn = getattr(ctx.ext, kernel)
    for lo, hi in _chunks(c, isz, chunk):
        # The kernels' block split follows vec16, so it must not depend on where a rank's input is:
        # sizes decide, as for the exchanges.
        vec16 = _vec16((hi - lo) * isz, c * isz) if n_rows > 1 else _vec16(dst_pitch)
        _launch(fn, ctx, _source(ctx, rows, lo, hi, base), 0, (hi - lo) * isz, out.data_ptr() + lo * isz, dst_pitch,
                rows.dtype, vec16, inbox, team)


def _teams(ctx: _Context, nodes: int, per_node: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """This rank's node (the ranks of its node) and rail (the rank of its place on every node) teams."""
    return (ctx.rank // per_node * per_node, 1, per_node), (ctx.rank % per_node, per_node, nodes)


def _hierarchical_all_reduce(ctx: _Context, rows: torch.Tensor, nodes: int, per_node: int):
    """Reduce-scatter inside the node, all-reduce of this rank's 1/per_node across the nodes (one rank
    of each: its rail), all-gather inside the node: off-node bytes cross the network once per node."""
    n, isz = rows.shape[1], rows.element_size()
    c = -(-n // per_node)
    padded = rows if n == c * per_node else torch.cat((rows, rows.new_zeros(1, c * per_node - n)), 1)
    node_team, rail_team = _teams(ctx, nodes, per_node)
    part, summed = rows.new_empty(c), rows.new_empty(c)
    gathered = rows.new_empty(per_node, c)
    _push("push_reduce", ctx, padded.view(per_node, c), part, 0, NODE, node_team)
    _push("push_reduce", ctx, part.view(1, c), summed, 0, RAIL, rail_team)
    _push("push_gather", ctx, summed.view(1, c), gathered, c * isz, NODE, node_team)
    return gathered.view(-1)[:n]


def _hierarchical_all_gather(ctx: _Context, rows: torch.Tensor, out: torch.Tensor, nodes: int, per_node: int):
    """Across the nodes first (the rail), then inside the node: each block crosses the network once
    per node. out: [world, ...], filled in rank order."""
    n, isz = rows.shape[1], rows.element_size()
    node_team, rail_team = _teams(ctx, nodes, per_node)
    by_node = rows.new_empty(nodes, n)
    _push("push_gather", ctx, rows, by_node, n * isz, RAIL, rail_team)
    gathered = rows.new_empty(per_node, nodes * n)
    _push("push_gather", ctx, by_node.view(1, -1), gathered, nodes * n * isz, NODE, node_team)
    out.view(nodes, per_node, n).copy_(gathered.view(per_node, nodes, n).transpose(0, 1))


def _hierarchical_exchange(kernel: str, ctx: _Context, rows: torch.Tensor, out: torch.Tensor, nodes: int,
                           per_node: int) -> None:
    """Reduce-scatter ("reduce") or all-to-all ("gather") of rows ([world, C] by destination) inside the
    node, then across it (the rail): rows for another node cross the network once, from the rank of
    their destination's place on this node."""
    c, isz = rows.shape[1], rows.element_size()
    node_team, rail_team = _teams(ctx, nodes, per_node)
    # Row l: the rows for the ranks of place l, node by node.
    by_place = rows.view(nodes, per_node, c).transpose(0, 1).reshape(per_node, nodes * c)
    if kernel == "reduce":
        part = rows.new_empty(nodes * c)
        _push("push_reduce", ctx, by_place, part, 0, NODE, node_team)
        _push("push_reduce", ctx, part.view(nodes, c), out, 0, RAIL, rail_team)
        return
    # From each rank of this node, its rows for this rank's place on every node; then each node's
    # share goes across the rail, arriving in source rank order.
    from_node = rows.new_empty(per_node, nodes * c)
    _push("push_gather", ctx, by_place, from_node, nodes * c * isz, NODE, node_team)
    by_node = from_node.view(per_node, nodes, c).transpose(0, 1).reshape(nodes, per_node * c)
    _push("push_gather", ctx, by_node, out, per_node * c * isz, RAIL, rail_team)


def _rows(x: torch.Tensor, n_rows: int) -> torch.Tensor:
    return x.contiguous().view(n_rows, -1)


def tuned(key: str) -> dict:
    """tuning.json's table `key` for this rank's GPU (by name), or its 'default'."""
    table = _TUNING[key]
    device = runtime.device()
    return table.get(torch.cuda.get_device_name(device) if device.type == "cuda" else "", table["default"])


def choose_all_reduce(nbytes: int, world: int, algorithm: str = "auto") -> str:
    """one_shot (latency: each rank reads all inputs) below the cut-point for this GPU and world size,
    two_shot (bandwidth: reduce-scatter then all-gather) above it."""
    if algorithm == "auto":
        algorithm = os.environ.get(ALGORITHM_ENV, "auto")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"{ALGORITHM_ENV}={algorithm!r}; expected one of {ALGORITHMS}")
    if algorithm != "auto":
        return algorithm
    return "one_shot" if nbytes <= tuned("all_reduce_one_shot_max_bytes")[str(world)] else "two_shot"


def all_reduce(x: torch.Tensor, algorithm: str = "auto") -> torch.Tensor:
    ctx = _context()
    if ctx.world == 1:
        return x.clone(memory_format=torch.contiguous_format)
    rows = _rows(x, 1)
    if ctx.rma and (layout := runtime.node_layout()):
        return _hierarchical_all_reduce(ctx, rows, *layout).view(x.shape)
    out = torch.empty_like(rows)
    isz, n = x.element_size(), rows.shape[1]
    if ctx.rma:
        _push("push_reduce", ctx, rows, out, 0)
    elif choose_all_reduce(n * isz, ctx.world, algorithm) == "one_shot":
        for lo, hi in _chunks(n, isz, ctx.data_bytes):
            _launch(ctx.ext.reduce, ctx, _source(ctx, rows, lo, hi), 0, (hi - lo) * isz,
                    out.data_ptr() + lo * isz, 0, x.dtype, _vec16())
    else:
        # The staging area is followed by the result area: each rank's 1/world share (+ alignment).
        capacity = _round_down((ctx.data_bytes - 32) * ctx.world // (ctx.world + 1), 16 * ctx.world)
        result_offset = ctx.data - ctx.workspace + capacity
        for lo, hi in _chunks(n, isz, capacity):
            _launch(ctx.ext.two_shot_all_reduce, ctx, _source(ctx, rows, lo, hi), 0, (hi - lo) * isz,
                    out.data_ptr() + lo * isz, 0, x.dtype, _vec16(), result_offset)
    return out.view(x.shape)


def _leading_dims_one(x: torch.Tensor, dim: int) -> bool:
    return math.prod(x.shape[:dim]) == 1


def all_gather(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    ctx = _context()
    d = dim % x.dim()
    if ctx.world == 1:
        return x.clone(memory_format=torch.contiguous_format)
    rows = _rows(x, 1)
    isz, n = x.element_size(), rows.shape[1]
    # Rank q's block lands at out[q]: already the result when dim is the outermost non-trivial
    # dimension; otherwise one more copy moves the rank dimension into place.
    out = torch.empty((ctx.world, *x.shape), dtype=x.dtype, device=x.device)
    if ctx.rma and (layout := runtime.node_layout()):
        _hierarchical_all_gather(ctx, rows, out, *layout)
    elif ctx.rma:
        _push("push_gather", ctx, rows, out, n * isz)
    else:
        for lo, hi in _chunks(n, isz, ctx.data_bytes):
            _launch(ctx.ext.gather, ctx, _source(ctx, rows, lo, hi), 0, (hi - lo) * isz, out.data_ptr() + lo * isz,
                    n * isz, x.dtype, _vec16(n * isz))
    if _leading_dims_one(x, d):
        return out.view(*x.shape[:d], ctx.world * x.shape[d], *x.shape[d + 1:])
    return out.movedim(0, d).reshape(*x.shape[:d], ctx.world * x.shape[d], *x.shape[d + 1:])


def _by_destination(x: torch.Tensor, dim: int, world: int) -> torch.Tensor:
    """x as [world, C]: row r is the part of x that rank r receives (its chunk along dim)."""
    if _leading_dims_one(x, dim):
        return _rows(x, world)
    return x.unflatten(dim, (world, -1)).movedim(dim, 0).contiguous().view(world, -1)


def _exchange(kernel: str, x: torch.Tensor, rows: torch.Tensor, out: torch.Tensor, dst_pitch_rows: bool) -> None:
    """Runs the extension's `kernel` over rows ([world, C]) in chunks of columns; this rank consumes row
    `rank` of every peer."""
    ctx = _context()
    isz, c = x.element_size(), rows.shape[1]
    fn, dst_pitch = getattr(ctx.ext, kernel), c * isz if dst_pitch_rows else 0
    if ctx.rma:
        if layout := runtime.node_layout():
            _hierarchical_exchange(kernel, ctx, rows, out, *layout)
        else:
            _push(f"push_{kernel}", ctx, rows, out, dst_pitch)
        return
    for lo, hi in _chunks(c, isz, ctx.data_bytes // ctx.world):
        _launch(fn, ctx, _source(ctx, rows, lo, hi), ctx.rank, (hi - lo) * isz, out.data_ptr() + lo * isz,
                dst_pitch, x.dtype, _vec16((hi - lo) * isz, c * isz))


def reduce_scatter(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    world = runtime.world_size()
    d = dim % x.dim()
    if world == 1:
        return x.clone(memory_format=torch.contiguous_format)
    rows = _by_destination(x, d, world)
    out = torch.empty(rows.shape[1], dtype=x.dtype, device=x.device)
    _exchange("reduce", x, rows, out, dst_pitch_rows=False)
    return out.view(*x.shape[:d], x.shape[d] // world, *x.shape[d + 1:])


def all_to_all(x: torch.Tensor) -> torch.Tensor:
    world = runtime.world_size()
    if world == 1:
        return x.clone(memory_format=torch.contiguous_format)
    rows = _rows(x, world)
    out = torch.empty_like(rows)
    _exchange("gather", x, rows, out, dst_pitch_rows=True)
    return out.view(x.shape)
