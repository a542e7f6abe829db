"""The nvshmem backend's MoE dispatch and combine: the host side of csrc/moe (contract: docs/moe.md).

The host computes, with torch ops on the GPU (no host sync), this rank's pairs per expert and each
pair's position among its own pairs to that expert; the kernels exchange the counts, place every row
at its slot on the owner, and later pull the expert outputs back: by loads and stores, or on the
remote path (runtime.transport() == "rma") by NVSHMEM puts and gets from symmetric buffers, x staged
in the workspace's data area unless it is symmetric, and combine's rows fetched there. Where the ranks
sit on several nodes of several ranks each, the remote path is hierarchical: a token crosses the
network once per node holding one of its experts, and load/store moves it inside the node.
"""

from __future__ import annotations

import torch

from symcomm import runtime, streams
from symcomm.collectives import DTYPE_CODES


def _context(op: str, expert_buf: torch.Tensor, name: str):
    if not runtime.is_symmetric(expert_buf):
        raise ValueError(f"{op}: {name} must be a symmetric tensor (symcomm.empty) on the nvshmem backend, "
                         "since peers read or write it directly")
    row_bytes = expert_buf.shape[2] * expert_buf.element_size()
    if row_bytes % 16:
        raise ValueError(f"{op}: a row of {name} ({expert_buf.shape[2]} x {expert_buf.element_size()} bytes) must "
                         "be a multiple of 16 bytes on the nvshmem backend")
    return runtime.load_extension(), runtime.workspace(), streams.current(), runtime.transport() == "rma"


def remote_offsets(**buffers: torch.Tensor) -> tuple[str, ...]:
    """Where each buffer sits on the symmetric heap (from the workspace) on the remote path, where a
    rank's rows land at its own offset of the buffer on the owner, so every rank's must agree
    (SYMCOMM_DEBUG=1 compares them); () on the other paths, where each rank learns the others'."""
    if runtime.backend() != "nvshmem" or runtime.transport() != "rma":
        return ()
    base = runtime.workspace().data_ptr()
    return tuple(f"{name} at workspace + {t.data_ptr() - base} bytes" for name, t in buffers.items())


def remote_room() -> int:
    """Bytes of the workspace's data area: the most the remote path stages (dispatch's x) or fetches
    (combine's tokens x top_k rows) per call."""
    return runtime.workspace().numel() - runtime.load_extension().workspace_data_offset()


def max_tokens(top_k: int, row_bytes: int) -> int | None:
    """The most tokens per rank that dispatch and combine both take on this rank's path, from the
    workspace's data area; None on the peer-pointer path, which keeps nothing there."""
    if runtime.transport() != "rma":
        return None
    room = remote_room()
    if layout := hierarchy():
        ext = runtime.load_extension()
        return min(ext.moe_slots(room, layout[0], top_k, row_bytes, combine) for combine in (False, True))
    return room // (top_k * row_bytes)  # combine's fetched rows (dispatch stages fewer)


def _data_area(op: str, ws: torch.Tensor, nbytes: int, what: str) -> torch.Tensor:
    """The first `nbytes` of the workspace's data area, its last remote_room() bytes (symmetric: puts and
    gets over a network need symmetric local buffers), where the remote path keeps `what`."""
    if nbytes > (room := remote_room()):
        raise ValueError(f"{op}: on the remote path {what} ({nbytes} bytes) must fit the workspace's data area "
                         f"({room} bytes): raise SYMCOMM_WORKSPACE_BYTES")
    start = ws.numel() - room
    return ws[start:start + nbytes]


def hierarchy() -> tuple[int, int] | None:
    """(nodes, ranks per node) where MoE takes the hierarchical remote path: the remote path, ranks on
    several nodes of several ranks each (runtime.node_layout()), load/store reaching inside each node."""
    layout = runtime.node_layout()
    return layout if runtime.transport() == "rma" and layout and runtime.node_reachable() else None


def node_positions(pair_nodes: torch.Tensor, nodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the node of each (token, expert) pair ([T, k]): each token's index among the tokens with an
    expert on node n, -1 where none is (int32 [T, nodes]), and their number per node (int32 [nodes])."""
    touched = torch.zeros((pair_nodes.shape[0], nodes), dtype=torch.int32, device=pair_nodes.device)
    touched.scatter_(1, pair_nodes, 1)
    return torch.where(touched.bool(), touched.cumsum(0) - 1, -1).int(), touched.sum(0, dtype=torch.int32)


def _hierarchical(op: str, ext, owners: torch.Tensor, row_bytes: int, layout) -> tuple:
    """The kernels' trailing arguments (per_node, node_pos, node_tokens, data_bytes) for pairs owned by
    `owners` ([T, k]): zeros on the flat paths; on the hierarchical one, once this rank's records are
    known to fit the data area. The tensors behind the pointers are returned too: keep them until the
    launch."""
    if layout is None:
        return (0, 0, 0, 0), ()
    room = remote_room()
    (tokens, top_k), (nodes, per_node) = owners.shape, layout
    if tokens > (held := ext.moe_slots(room, nodes, top_k, row_bytes, op == "moe_combine")):
        raise ValueError(f"{op}: on the hierarchical remote path the workspace's data area ({room} bytes) holds "
                         f"{held} tokens per rank at this size, got {tokens}: raise SYMCOMM_WORKSPACE_BYTES")
    pos, counts = node_positions(owners // per_node, nodes)
    return (per_node, pos.data_ptr(), counts.data_ptr(), room), (pos, counts)


def _grid_bytes(capacity: int, row_bytes: int, rows_per_token: int) -> int:
    # From the per-rank share of the capacity, not from this rank's T: every rank gets the same grid.
    return capacity // runtime.world_size() * rows_per_token * row_bytes


def pair_positions(ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For flat expert ids (pairs in token order): the pairs per expert (int32 [E]) and each pair's
    index among the pairs to its expert (int32), with device ops only."""
    counts = torch.zeros(num_experts, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(0, ids, torch.ones_like(ids, dtype=torch.int32))
    # A stable sort by expert keeps token order within each expert.
    order = torch.argsort(ids, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    positions = torch.empty_like(ids, dtype=torch.int32)
    positions[order] = (torch.arange(ids.numel(), device=ids.device) - starts[ids[order]]).int()
    return counts, positions


def dispatch(x, topk_ids, num_experts, expert_x, expert_counts):
    ext, ws, stream, rma = _context("moe_dispatch", expert_x, "expert_x")
    tokens, top_k = topk_ids.shape
    # The kernel reads the ids as contiguous int64 [T * k]: reshape alone may return a strided view.
    ids = topk_ids.long().contiguous().view(-1)
    counts, positions = pair_positions(ids, num_experts)
    routing = torch.empty((tokens, top_k), dtype=torch.int64, device=x.device)
    x = x.contiguous()
    capacity, hidden = expert_x.shape[1], expert_x.shape[2]
    layout = hierarchy()
    tail, keep = _hierarchical("moe_dispatch", ext, ids.view(tokens, top_k) // (num_experts // runtime.world_size()),
                               hidden * x.element_size(), layout)
    if rma and layout is None and not runtime.is_symmetric(x):  # the puts' source
        x = _data_area("moe_dispatch", ws, x.numel() * x.element_size(), "x").view(x.dtype).view(x.shape).copy_(x)
    elif x.data_ptr() % 16:  # the kernel moves rows with 16-byte loads
        x = x.clone()
    ext.moe_dispatch(ws.data_ptr(), x.data_ptr(), ids.data_ptr(), positions.data_ptr(), counts.data_ptr(),
                     expert_x.data_ptr(), expert_counts.data_ptr(), routing.data_ptr(), tokens, top_k, num_experts,
                     capacity, hidden,
                     DTYPE_CODES[x.dtype], _grid_bytes(capacity, hidden * x.element_size(), top_k), stream.cuda_stream,
                     rma, *tail)
    streams.launched(stream)
    return routing


def combine(expert_y, topk_weights, routing):
    if expert_y.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"moe_combine: the nvshmem backend combines float16 or bfloat16 expert_y, got {expert_y.dtype}")
    ext, ws, stream, rma = _context("moe_combine", expert_y, "expert_y")
    tokens, top_k = routing.shape
    local, capacity, hidden = expert_y.shape
    layout = hierarchy()
    tail, keep = _hierarchical("moe_combine", ext, routing // (local * capacity), hidden * expert_y.element_size(),
                               layout)
    if rma and layout is None:  # where the kernel fetches the k rows of every token
        _data_area("moe_combine", ws, tokens * top_k * hidden * expert_y.element_size(), "tokens x top_k rows")
    y = torch.empty((tokens, hidden), dtype=expert_y.dtype, device=expert_y.device)
    routing, weights = routing.contiguous(), topk_weights.contiguous()
    ext.moe_combine(ws.data_ptr(), expert_y.data_ptr(), routing.data_ptr(), weights.data_ptr(), y.data_ptr(), tokens,
                    top_k, local * runtime.world_size(), capacity, hidden, DTYPE_CODES[expert_y.dtype],
                    _grid_bytes(capacity, hidden * expert_y.element_size(), 1), stream.cuda_stream, rma, *tail)
    streams.launched(stream)
    return y
