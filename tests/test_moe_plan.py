"""The host side of the nvshmem MoE dispatch and combine (python/symcomm/moe.py), on CPU.

The kernels are replaced by a stand-in with their documented semantics (docs/moe.md, csrc/moe/moe.h)
that works from the very addresses and sizes it is given: moe_dispatch reads the rows, flat ids,
positions and counts, exchanges the counts and rows over gloo, and writes every pair's row into its
slot on the owner, the owner's counts and the home rank's routing; moe_combine pulls the rows routing
names and sums them, weighted, in float32. What runs for real is everything moe.py decides: the flat
ids, the counts and positions, the copies of inputs, the sizes, the argument order and the grid.
The stand-in also checks what the kernels rely on: every rank launches with the same sizes and
grid, the grid follows the capacity (not this rank's T), 16-byte alignment, and counts and positions
that belong to the ids; the tests check that every byte range it touched lies inside its tensor.
"""

from contextlib import contextmanager

import pytest
import torch
import torch.distributed as dist

from harness import Memory, assert_close, read, write
from symcomm import moe, ops, runtime, streams

E, H = 8, 16  # 8 experts divide every world size we run; rows of 16 half-precision elements are 32 bytes
ITEMSIZE = {0: 4, 1: 2, 2: 2}  # the dtype codes the kernels take (collectives.DTYPE_CODES)
NAN = float("nan")


@contextmanager
def together(plan=None):
    """Runs the block's checks here, then fails on every rank if they failed on any, or if the ranks'
    plans differ: a rank that failed alone would go on to other collectives than its peers', and the
    run would hang or abort instead of reporting the failure."""
    problem = None
    try:
        yield
    except Exception as e:
        problem = f"{type(e).__name__}: {e}"
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, (plan, problem))
    failed = "; ".join(f"rank {r}: {p}" for r, (_, p) in enumerate(everyone) if p)
    assert not failed, failed
    assert all(p == plan for p, _ in everyone), f"ranks launched different kernels: {[p for p, _ in everyone]}"


def exchange(chunks: list[torch.Tensor], sizes: list[int]) -> torch.Tensor:
    """Sends chunks[q] to rank q; returns what arrives, in rank order, sizes[q] rows from rank q."""
    out = chunks[0].new_empty((sum(sizes), *chunks[0].shape[1:]))
    dist.all_to_all_single(out, torch.cat(chunks), sizes, [len(c) for c in chunks])
    return out


def check_launch(kind, workspace, buffers, tokens, top_k, num_experts, capacity, hidden, dtype, grid_bytes,
                 rows_per_token) -> int:
    """Asserts what csrc/moe/moe.cu's make_args checks, and the grid moe.h asks for; returns the row bytes."""
    world = dist.get_world_size()
    assert world <= 8 and num_experts % world == 0 and world <= num_experts <= 1024, \
        f"{kind}: num_experts={num_experts} must be a multiple of the {world} ranks (at most 8), and at most 1024"
    assert 1 <= top_k <= 16 and tokens >= 0 and capacity >= 1 and hidden >= 1, \
        f"{kind}: bad sizes tokens={tokens} top_k={top_k} capacity={capacity} hidden={hidden}"
    row_bytes = hidden * ITEMSIZE[dtype]
    assert row_bytes % 16 == 0 and all(a % 16 == 0 for a in (workspace, *buffers)), \
        f"{kind}: rows of {row_bytes} bytes on buffers at {[hex(a) for a in buffers]}: not 16-byte aligned"
    # The grid is sized from the most tokens a rank may send (capacity / N), which every rank knows,
    # not from its own T: every block meets its peers' block of the same index, so grids must agree.
    expected = capacity // world * rows_per_token * row_bytes
    assert grid_bytes == expected, \
        f"{kind}: grid_bytes={grid_bytes}, expected capacity // world * {rows_per_token} * row_bytes = {expected}"
    return row_bytes


class Kernels:
    """Stand-in for symcomm._C's moe_dispatch and moe_combine, with csrc/bindings.cpp's signatures."""

    def __init__(self):
        self.touched = []  # (name, address, nbytes) of every read and write, for assert_touched_inside

    def _read(self, name, address, count, dtype):
        nbytes = count * dtype.itemsize
        assert address or not nbytes, f"{name}: {nbytes} bytes at a null pointer"
        self.touched.append((name, address, nbytes))
        return read(address, nbytes).view(dtype)

    def _write(self, name, address, data):
        self.touched.append((name, address, data.numel() * data.element_size()))
        write(address, data)

    def moe_dispatch(self, workspace, x, topk_ids, positions, counts, expert_x, expert_counts, routing, tokens, top_k,
                     num_experts, capacity, hidden, dtype, grid_bytes, stream, rma, *hierarchy):
        assert hierarchy == (0, 0, 0, 0), "the stand-in is one node: the flat path's arguments"
        pairs = tokens * top_k
        with together(("moe_dispatch", top_k, num_experts, capacity, hidden, dtype, grid_bytes, rma)):
            row_bytes = check_launch("moe_dispatch", workspace, (x, expert_x), tokens, top_k, num_experts, capacity,
                                     hidden, dtype, grid_bytes, top_k)
            ids = self._read("topk_ids", topk_ids, pairs, torch.int64)
            assert ((ids >= 0) & (ids < num_experts)).all(), f"topk_ids, read as contiguous int64 [T*k]: {ids.tolist()}"
            mine = self._read("counts", counts, num_experts, torch.int32)
            position = self._read("positions", positions, pairs, torch.int32)
            earlier_same = (ids[:, None] == ids[None, :]).tril(-1)
            assert torch.equal(mine, torch.bincount(ids, minlength=num_experts).int()) and \
                torch.equal(position, earlier_same.sum(1).int()), \
                f"counts {mine.tolist()} and positions {position.tolist()} do not belong to the ids {ids.tolist()}"
        world, me = dist.get_world_size(), dist.get_rank()
        local = num_experts // world
        everyone = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        sent = torch.stack(everyone).long()  # [source rank, expert], the same on every rank
        assert int(sent.sum(0).max()) <= capacity, f"moe_dispatch overflows capacity {capacity}: {sent.sum(0)}"
        self._write("expert_counts", expert_counts, sent[:, me * local:(me + 1) * local].sum(0).int())
        # Lower ranks' pairs to an expert come first, then ours in token order.
        slot = position.long() + sent[:me].sum(0)[ids]
        self._write("routing", routing, ids * capacity + slot)
        rows = self._read("x", x, tokens * row_bytes, torch.uint8).view(tokens, row_bytes)
        to = [(ids // local == q).nonzero().flatten() for q in range(world)]
        arriving = sent[:, me * local:(me + 1) * local].sum(1).tolist()
        got_rows = exchange([rows[p // top_k] for p in to], arriving)
        got_at = exchange([ids[p] % local * capacity + slot[p] for p in to], arriving)
        for at, row in zip(got_at.tolist(), got_rows):
            self._write("expert_x", expert_x + at * row_bytes, row)

    def moe_combine(self, workspace, expert_y, routing, weights, y, tokens, top_k, num_experts, capacity, hidden,
                    dtype, grid_bytes, stream, rma, *hierarchy):
        assert hierarchy == (0, 0, 0, 0), "the stand-in is one node: the flat path's arguments"
        world = dist.get_world_size()
        per_owner = num_experts // world * capacity
        with together(("moe_combine", top_k, num_experts, capacity, hidden, dtype, grid_bytes, rma)):
            row_bytes = check_launch("moe_combine", workspace, (expert_y, y), tokens, top_k, num_experts, capacity,
                                     hidden, dtype, grid_bytes, 1)
            assert dtype in (1, 2), f"moe_combine takes float16 or bfloat16 (codes 1, 2), got code {dtype}"
            code = self._read("routing", routing, tokens * top_k, torch.int64)
            weight = self._read("weights", weights, tokens * top_k, torch.float32)
            owner = code // per_owner
            assert ((code >= 0) & (owner < world)).all(), \
                f"routing {code.tolist()} names no slot of {world} ranks x {per_owner}"
            # The kernel may read any slot of an owner's expert_y.
            table = self._read("expert_y", expert_y, per_owner * row_bytes, torch.uint8).view(per_owner, row_bytes)
        ask = [(owner == q).nonzero().flatten() for q in range(world)]
        asks = torch.tensor([len(p) for p in ask])
        asked_counts = torch.empty_like(asks)
        dist.all_to_all_single(asked_counts, asks)
        asked = exchange([code[p] - q * per_owner for q, p in enumerate(ask)], asked_counts.tolist())
        replies = exchange([table[rows] for rows in asked.split(asked_counts.tolist())], asks.tolist())
        pair_rows = torch.empty(tokens * top_k, row_bytes, dtype=torch.uint8)
        pair_rows[torch.cat(ask)] = replies
        t = {1: torch.float16, 2: torch.bfloat16}[dtype]
        values = pair_rows.view(t).float().view(tokens, top_k, hidden)
        weight = weight.view(tokens, top_k, 1)
        acc = torch.zeros(tokens, hidden)
        for j in range(top_k):
            acc += weight[:, j] * values[:, j]
        self._write("y", y, acc.to(t).view(torch.uint8))


@pytest.fixture
def kernels(world, sym, monkeypatch):
    """moe.py running against the stand-in."""
    if world.backend != "torch":
        pytest.skip("the stand-in reads and writes tensors at their addresses: CPU tensors, the torch backend only")
    fake = Kernels()
    workspace = sym((256,), torch.uint8)
    monkeypatch.setattr(runtime, "load_extension", lambda: fake)
    monkeypatch.setattr(runtime, "workspace", lambda: workspace)
    monkeypatch.setattr(streams, "current", lambda: streams.EmulatedStream(0))  # any stream: nothing is queued
    # New tensors (routing, y) start poisoned, so that an element the kernel should have written shows.
    monkeypatch.setattr(moe, "torch", Memory(workspace, workspace.numel()).recording())
    return fake


def assert_touched_inside(kernels, **tensors) -> None:
    """Every byte range the stand-in touched under one of these names lies inside that tensor."""
    for name, address, nbytes in kernels.touched:
        if name in tensors and nbytes:
            t = tensors[name]
            start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
            assert start <= address and address + nbytes <= end, \
                f"{name}: touched [{address:#x}, +{nbytes}), outside its tensor [{start:#x}, +{end - start})"
    kernels.touched.clear()


TOKENS = [5, 0, 2, 7]  # on rank r: they differ across ranks, and rank 1 has none


def wider(t: torch.Tensor) -> torch.Tensor:
    """t as every other column of a tensor twice as wide."""
    out = torch.full((t.shape[0], 2 * t.shape[1]), -1, dtype=t.dtype)[:, ::2]
    return out.copy_(t)


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """t, contiguous, one element past a 16-byte boundary."""
    return torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape).copy_(t)


# How the inputs reach moe.py: (x, topk_ids, topk_weights) as made, as strided views, or x misaligned with int32 ids.
LAYOUTS = {
    "contiguous": lambda x, ids, w: (x, ids, w),
    "strided": lambda x, ids, w: (wider(x), wider(ids), wider(w)),
    "misaligned": lambda x, ids, w: (misaligned(x), ids.int(), w),
}


@pytest.mark.dist
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k, duplicates", [(1, False), (2, False), (2, True), (4, False), (4, True)],
                         ids=["k1", "k2", "k2-duplicates", "k4", "k4-duplicates"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_dispatch_and_combine_match_the_torch_backend(world, gen, kernels, sym, dtype, k, duplicates, layout):
    n, local = world.world_size, E // world.world_size
    capacity = 2 * n * max(TOKENS)  # a duplicate takes two slots of one expert
    # Every rank draws every rank's inputs, so that the generators stay alike.
    inputs = []
    for t in TOKENS[:n]:
        ids = torch.rand(t, E, generator=gen).argsort(1)[:, :k].contiguous()
        if duplicates:
            ids[:, 1] = ids[:, 0]
        inputs.append((torch.randn(t, H, generator=gen).to(dtype), ids, torch.rand(t, k, generator=gen)))
    x, ids, weights = LAYOUTS[layout](*inputs[world.rank])
    # moe.py reads these in place (the other layouts it copies first: their contents are checked instead).
    in_place = dict(x=x, topk_ids=ids, weights=weights) if layout == "contiguous" else {}

    expert_x = sym((local, capacity, H), dtype).fill_(NAN)
    counts = sym((local,), torch.int32).fill_(-1)
    routing = moe.dispatch(x, ids, E, expert_x, counts)
    ref_x, ref_counts = torch.full_like(expert_x, NAN), torch.full_like(counts, -1)
    ref_routing = ops.torch_moe_dispatch(x, ids, E, ref_x, ref_counts)
    with together():
        assert counts.tolist() == ref_counts.tolist()
        assert torch.equal(routing, ref_routing), f"routing {routing.tolist()} != {ref_routing.tolist()}"
        # Bit for bit, the unfilled (NaN) slots included: nothing but the filled slots may be written.
        assert torch.equal(expert_x.view(torch.int16), ref_x.view(torch.int16)), "expert_x differs from the torch one's"
        assert_touched_inside(kernels, expert_x=expert_x, expert_counts=counts, routing=routing, **in_place)

    # Each expert scales its rows by its global index + 1; the unfilled rows stay NaN, and must not be read.
    scale = torch.arange(world.rank * local + 1, (world.rank + 1) * local + 1).view(local, 1, 1)
    expert_y = sym(tuple(expert_x.shape), dtype).copy_(expert_x.float() * scale)
    y = moe.combine(expert_y, weights, routing)
    ref_y = ops.torch_moe_combine(expert_y, weights, ref_routing)
    # The float32 sums may add the k terms in another order: a rounding of sum_j |w_j * row_j| apart at most.
    terms = ops.torch_moe_combine(expert_y.abs(), weights.abs(), ref_routing)
    with together():
        assert_close(y, ref_y, terms, dtype=dtype)
        assert_touched_inside(kernels, expert_y=expert_y, routing=routing, y=y, **in_place)


@pytest.mark.parametrize("pairs, experts", [(0, 4), (1, 4), (37, 5), (500, 64)])
def test_pair_positions_count_and_order_pairs_per_expert(pairs, experts):
    g = torch.Generator().manual_seed(pairs * 7 + experts)
    ids = torch.randint(0, experts, (pairs,), generator=g)
    counts, positions = moe.pair_positions(ids, experts)
    seen = [0] * experts
    for i, e in enumerate(ids.tolist()):
        assert positions[i] == seen[e], f"pair {i} to expert {e}"
        seen[e] += 1
    assert counts.tolist() == seen and counts.dtype == positions.dtype == torch.int32
