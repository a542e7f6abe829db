"""The nvshmem MoE kernels on the GPU: a round trip at any world size, CUDA-graph replay, the overflow
trap, and the remote path's limits.

(The contract tests in test_moe.py also run here, on the nvshmem backend.)
"""

import os
import re
import textwrap

import pytest
import torch

from harness import run_alone
from symcomm import moe, runtime

pytestmark = pytest.mark.gpu
ops = torch.ops.symcomm


def routed(world, gen, tokens, experts, k, hidden):
    """Every rank's tokens and distinct top-k ids, the same lists on every rank."""
    xs, ids = [], []
    for _ in range(world.world_size):
        xs.append(torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).to(world.device))
        ids.append(torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]).to(world.device))
    return xs, ids


def expected_combine(x, ids, weights, rank_scale):
    """y when every expert e multiplies its rows by rank_scale[e]."""
    scale = rank_scale[ids].unsqueeze(-1)  # [T, k, 1]
    return (weights.unsqueeze(-1) * scale * x.float().unsqueeze(1)).sum(1)


def expected_hierarchy(world) -> tuple[int, int] | None:
    """The (nodes, ranks per node) MoE goes hierarchical on: on the remote path, nodes of
    SYMCOMM_PES_PER_NODE ranks each, several per node (emulated, or pretend on a GPU); on a GPU without
    it, whatever the hosts say."""
    per_node, w = int(os.environ.get("SYMCOMM_PES_PER_NODE", "0")), world.world_size
    if not per_node and not runtime.emulated():
        return runtime.node_layout() if runtime.transport() == "rma" and runtime.node_reachable() else None
    nodes = runtime.transport() == "rma" and 1 < per_node < w and w % per_node == 0
    return (w // per_node, per_node) if nodes else None


@pytest.mark.dist
def test_round_trip_at_any_world_size_with_uneven_tokens(world, gen, sym, monkeypatch):
    """Dispatch, experts that scale their rows, combine, twice back to back, with some ranks sending
    no tokens: at any world size (the contract suite test_moe.py sizes itself for 1, 2 and 4 ranks),
    so also on 3 emulated nodes of one PE, where everything moves by puts and gets, and on nodes of
    several PEs, where each call takes the hierarchical path."""
    layout = expected_hierarchy(world)
    assert moe.hierarchy() == layout
    taken = []

    def spy(*args, run=moe._hierarchical):
        tail, kept = run(*args)
        taken.append(tail[0])
        return tail, kept
    monkeypatch.setattr(moe, "_hierarchical", spy)
    experts, k, hidden = 2 * world.world_size, 2, 64
    local = experts // world.world_size
    counts = [(5, 0, 9, 2)[r % 4] for r in range(world.world_size)]
    capacity = sum(counts) * k
    expert_x = sym((local, capacity, hidden), torch.bfloat16)
    expert_y = sym(tuple(expert_x.shape), torch.bfloat16)
    expert_counts = sym((local,), torch.int32)
    scale = torch.arange(1, experts + 1, dtype=torch.float32)
    for _ in range(2):
        xs = [torch.randn(t, hidden, generator=gen).to(torch.bfloat16) for t in counts]
        ids = [torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(t)]) if t else
               torch.empty(0, k, dtype=torch.int64) for t in counts]
        weights = [torch.rand(t, k, generator=gen) for t in counts]
        expert_x.fill_(float("nan"))
        routing = ops.moe_dispatch(xs[world.rank].to(world.device), ids[world.rank].to(world.device), experts, expert_x,
                                   expert_counts)
        mine = scale[world.rank * local:(world.rank + 1) * local].to(world.device).view(local, 1, 1)
        expert_y.copy_((expert_x.float() * mine).to(torch.bfloat16))
        y = ops.moe_combine(expert_y, weights[world.rank].to(world.device), routing)
        pairs = torch.bincount(torch.cat([i.flatten() for i in ids]), minlength=experts)
        assert expert_counts.tolist() == pairs[world.rank * local:(world.rank + 1) * local].tolist()
        ref = expected_combine(xs[world.rank], ids[world.rank], weights[world.rank], scale)
        atol = 2e-2 * float(ref.abs().amax()) if ref.numel() else 0.0
        torch.testing.assert_close(y.float().cpu(), ref, rtol=2e-2, atol=atol)
    assert taken == [layout[1] if layout else 0] * 4  # per_node: the kernels' hierarchical argument


@pytest.mark.dist
@pytest.mark.real_gpu("CUDA graphs")
def test_cuda_graph_replay_with_tokens_mutated_inside_the_graph(world, gen, sym):
    experts, k, hidden, tokens = 4 * world.world_size, 2, 256, 16
    local = experts // world.world_size
    expert_x = sym((local, tokens * world.world_size, hidden), torch.bfloat16)
    expert_y = sym(tuple(expert_x.shape), torch.bfloat16)
    counts = sym((local,), torch.int32)
    scale = torch.arange(1, experts + 1, device=world.device, dtype=torch.float32)
    my_scale = scale[world.rank * local:(world.rank + 1) * local].view(local, 1, 1)
    x = torch.empty(tokens, hidden, dtype=torch.bfloat16, device=world.device)
    ids = torch.empty(tokens, k, dtype=torch.int64, device=world.device)
    weights = torch.empty(tokens, k, dtype=torch.float32, device=world.device)

    def step():
        routing = ops.moe_dispatch(x, ids, experts, expert_x, counts)
        expert_y.copy_((expert_x.float() * my_scale).to(torch.bfloat16))
        y = ops.moe_combine(expert_y, weights, routing)
        x.mul_(-1)  # home rows are overwritten right away: dispatch must have finished reading them
        return y

    xs, idss = routed(world, gen, tokens, experts, k, hidden)
    x.copy_(xs[world.rank])
    ids.copy_(idss[world.rank])
    weights.copy_(torch.rand(tokens, k, generator=gen))
    stream = torch.cuda.Stream(world.device)
    stream.wait_stream(torch.cuda.current_stream(world.device))
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream(world.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    for _ in range(4):
        xs, idss = routed(world, gen, tokens, experts, k, hidden)
        w = torch.rand(tokens, k, generator=gen).to(world.device)
        x.copy_(xs[world.rank])
        ids.copy_(idss[world.rank])
        weights.copy_(w)
        graph.replay()
        torch.cuda.synchronize(world.device)
        ref = expected_combine(xs[world.rank], idss[world.rank], w, scale)
        torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()))
        pairs = sum(torch.bincount(i.flatten(), minlength=experts) for i in idss)
        mine = pairs[world.rank * local:(world.rank + 1) * local]
        assert counts.tolist() == mine.tolist(), "expert_counts after replay: pairs per local expert, from every rank"


OVERFLOW = textwrap.dedent(
    """
    import torch, symcomm
    symcomm.init(backend="nvshmem")
    device = symcomm.device()
    x = torch.randn(8, 64, dtype=torch.bfloat16, device=device)
    ids = torch.zeros(8, 1, dtype=torch.int64, device=device)   # 8 pairs to expert 0...
    expert_x = symcomm.empty((2, 4, 64), torch.bfloat16)         # ...which has room for 4
    counts = symcomm.empty((2,), torch.int32)
    torch.ops.symcomm.moe_dispatch(x, ids, 2, expert_x, counts)
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # on the emulated device the launch itself waits
    """
)


@pytest.mark.skipif(not (torch.cuda.is_available() or runtime.emulated()), reason="needs a GPU or the emulated device")
def test_overflow_stops_the_kernel_with_a_message(tmp_path):
    out = run_alone(tmp_path, OVERFLOW)
    assert out.returncode != 0
    # Any of the overflowing pairs (slots 4 to 7) may be the one that reports before the trap.
    assert re.search(r"moe_dispatch overflows expert 0: slot [4-7] >= capacity 4", out.stdout + out.stderr), \
        out.stderr[-3000:]


@pytest.mark.dist
@pytest.mark.parametrize("op", ["moe_dispatch", "moe_combine"])
def test_remote_path_refuses_more_rows_than_its_data_area_holds(world, sym, op, monkeypatch):
    """The remote path stages a private x (dispatch) and fetches every token's k rows (combine) in the
    workspace's data area, the hierarchical one its records and partial sums: more than it holds is a
    ValueError naming SYMCOMM_WORKSPACE_BYTES, on every rank, before any kernel (here on any transport:
    the check is the host's)."""
    monkeypatch.setattr(runtime, "transport", lambda: "rma")
    data_bytes = runtime.workspace().numel() - runtime.load_extension().workspace_data_offset()
    hidden, k = 256, 2
    if layout := moe.hierarchy():
        tokens = runtime.load_extension().moe_slots(data_bytes, layout[0], k, hidden * 2, op == "moe_combine") + 1
        refusal = rf"{op}: on the hierarchical remote path the workspace's data area \({data_bytes} bytes\) holds "
    else:
        rows = data_bytes // (hidden * 2) + 1  # one row more than fits
        tokens = rows if op == "moe_dispatch" else -(-rows // k)
        refusal = rf"{op}: on the remote path .* must fit the workspace's data area "
    assert moe.max_tokens(k, hidden * 2) < tokens  # what the benchmark leaves out, never a refused batch
    expert_buf = sym((1, 8, hidden), torch.bfloat16)
    ids = torch.full((tokens, k), world.rank, dtype=torch.int64, device=world.device)
    with pytest.raises(ValueError, match=refusal + ".*SYMCOMM_WORKSPACE_BYTES"):
        if op == "moe_dispatch":
            x = torch.randn(tokens, hidden, device=world.device).to(torch.bfloat16)
            ops.moe_dispatch(x, ids, world.world_size, expert_buf, torch.empty(1, dtype=torch.int32, device=world.device))
        else:
            weights = torch.rand(tokens, k, device=world.device)
            ops.moe_combine(expert_buf, weights, ids * 8)


@pytest.mark.dist
def test_debug_mode_checks_that_remote_path_buffers_agree(world, gen, sym, monkeypatch):
    """On the remote path a rank's rows land at its own offset of expert_x on the owner (and combine
    fetches from its own offset of expert_y), so a buffer at another place on some rank would be
    written or read wrongly: SYMCOMM_DEBUG=1 refuses it, on every rank, naming the buffer. The other
    paths learn each rank's buffer, and take it."""
    if world.world_size == 1:
        pytest.skip("a world of one cannot disagree with itself")
    monkeypatch.setenv("SYMCOMM_DEBUG", "1")
    experts, k, hidden, tokens = 2 * world.world_size, 2, 64, 5
    local, capacity = experts // world.world_size, tokens * k * world.world_size
    # Two halves of one allocation; odd ranks take the second, so the ranks' buffers are apart.
    halves_x = sym((2, local, capacity, hidden), torch.bfloat16)
    halves_y = sym((2, local, capacity, hidden), torch.bfloat16)
    expert_x, expert_y = halves_x[world.rank % 2], halves_y[world.rank % 2]
    expert_counts = sym((local,), torch.int32)
    xs, ids = routed(world, gen, tokens, experts, k, hidden)
    weights = torch.rand(tokens, k, generator=gen).to(world.device)
    if runtime.transport() == "rma":
        with pytest.raises(ValueError, match=r"moe_dispatch: ranks called with different arguments.*expert_x at "
                                             r"workspace \+ \d+ bytes"):
            ops.moe_dispatch(xs[world.rank], ids[world.rank], experts, expert_x, expert_counts)
        routing = (ids[world.rank] * capacity).to(torch.int64)  # slots of expert_y, so only its place differs
        with pytest.raises(ValueError, match=r"moe_combine: ranks called with different arguments.*expert_y at "
                                             r"workspace \+ \d+ bytes"):
            ops.moe_combine(expert_y, weights, routing)
        return
    routing = ops.moe_dispatch(xs[world.rank], ids[world.rank], experts, expert_x, expert_counts)
    expert_y.copy_(expert_x)
    y = ops.moe_combine(expert_y, weights, routing)
    ref = expected_combine(xs[world.rank].cpu(), ids[world.rank].cpu(), weights.cpu(), torch.ones(experts))
    torch.testing.assert_close(y.float().cpu(), ref, rtol=2e-2, atol=2e-2 * float(ref.abs().amax()))
