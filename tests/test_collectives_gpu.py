"""The nvshmem collective kernels on the GPU: large and chunked messages, both all-reduce algorithms,
zero-copy symmetric inputs, long runs of back-to-back calls, CUDA-graph replay, and the transport
each topology gets. Outputs come from
poisoned allocations (conftest.py), and sums are checked element by element against float64.

(The op contract tests in test_ops.py also run here, on the nvshmem backend.)
"""

import os

import pytest
import torch

import symcomm
from harness import assert_close, assert_gemm_close, on_gpu, seed_of, sum_ref
from symcomm import collectives, runtime

pytestmark = [pytest.mark.dist, pytest.mark.gpu]
ops = torch.ops.symcomm


def symmetric_copy(sym, x: torch.Tensor) -> torch.Tensor:
    return sym(tuple(x.shape), x.dtype).copy_(x)


@pytest.mark.parametrize("algorithm", ["one_shot", "two_shot", "auto"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("numel", [1, 3, 1021, 65536 + 7, 4 << 20])
@pytest.mark.parametrize("symmetric", [False, True], ids=["staged", "in-place"])
def test_all_reduce_algorithms(world, gen, sym, numel, dtype, algorithm, symmetric):
    xs = on_gpu(world, seed_of(gen), (numel,), dtype)
    x = symmetric_copy(sym, xs[world.rank]) if symmetric else xs[world.rank]
    keep = x.clone()
    out = ops.all_reduce(x, algorithm)
    assert_close(out, *sum_ref(xs), dtype=dtype)
    assert torch.equal(x, keep), "all_reduce changed its input"


@pytest.mark.parametrize("op", ["all_reduce", "all_gather", "reduce_scatter", "all_to_all"])
def test_messages_larger_than_the_workspace_are_chunked(world, gen, op):
    # bf16 of twice the workspace's size per rank: more than it can stage at once.
    n = runtime.workspace().numel() // world.world_size * world.world_size
    xs = on_gpu(world, seed_of(gen), (n,), torch.bfloat16)
    out = getattr(ops, op)(xs[world.rank])
    if op == "all_reduce":
        assert_close(out, *sum_ref(xs), dtype=torch.bfloat16)
    elif op == "reduce_scatter":
        ref, scale = (t.chunk(world.world_size)[world.rank] for t in sum_ref(xs))
        assert_close(out, ref, scale, dtype=torch.bfloat16)
    elif op == "all_gather":
        assert torch.equal(out, torch.cat(xs))
    else:
        assert torch.equal(out, torch.cat([t.chunk(world.world_size)[world.rank] for t in xs]))


def test_a_thousand_back_to_back_calls_never_read_stale_data(world, gen):
    for i in range(1000):
        numel = int(torch.randint(1, 20000, (1,), generator=gen)) * world.world_size
        xs = on_gpu(world, seed_of(gen), (numel,), torch.float32)
        kind = i % 4
        if kind == 0:
            assert_close(ops.all_reduce(xs[world.rank]), *sum_ref(xs), dtype=torch.float32)
        elif kind == 1:
            assert torch.equal(ops.all_gather(xs[world.rank], 0), torch.cat(xs))
        elif kind == 2:
            ref, scale = (t.chunk(world.world_size)[world.rank] for t in sum_ref(xs))
            assert_close(ops.reduce_scatter(xs[world.rank], 0), ref, scale, dtype=torch.float32)
        else:
            expected = torch.cat([t.chunk(world.world_size)[world.rank] for t in xs])
            assert torch.equal(ops.all_to_all(xs[world.rank]), expected)


@pytest.mark.real_gpu("CUDA graphs")
@pytest.mark.parametrize("symmetric", [False, True], ids=["staged", "in-place"])
def test_cuda_graph_replay_with_the_input_mutated_inside_the_graph(world, gen, sym, symmetric):
    n = 4096 * world.world_size + 5
    static = sym((n,), torch.bfloat16) if symmetric else torch.empty(n, dtype=torch.bfloat16, device=world.device)
    static.copy_(on_gpu(world, seed_of(gen), (n,), torch.bfloat16)[world.rank])
    stream = torch.cuda.Stream(world.device)
    stream.wait_stream(torch.cuda.current_stream(world.device))
    with torch.cuda.stream(stream):
        ops.all_reduce(static)  # warm up outside the capture (first-use allocations)
        ops.all_gather(static, 0)
    torch.cuda.current_stream(world.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        reduced = ops.all_reduce(static)
        gathered = ops.all_gather(static, 0)
        # Peers read `static` in place; overwriting it right away catches a kernel that returns
        # before every peer has finished reading.
        static.mul_(-3)
    for _ in range(5):
        xs = on_gpu(world, seed_of(gen), (n,), torch.bfloat16)
        static.copy_(xs[world.rank])
        graph.replay()
        torch.cuda.synchronize(world.device)
        assert_close(reduced, *sum_ref(xs), dtype=torch.bfloat16)
        assert torch.equal(gathered, torch.cat(xs))
        assert torch.equal(static, xs[world.rank] * -3)


def test_symmetric_inputs_of_every_dtype_gather_exactly(world, gen, sym):
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8, torch.int32, torch.int64, torch.float64):
        xs = on_gpu(world, seed_of(gen), (3, 1001), dtype)
        x = symmetric_copy(sym, xs[world.rank])
        out = ops.all_gather(x, 1)
        assert torch.equal(out.view(torch.uint8), torch.cat(xs, 1).view(torch.uint8)), dtype


def test_topology_picks_the_transport_and_keeps_tensor_and_expert_parallel_kernels_within_a_node(world, gen, sym,
                                                                                                 monkeypatch):
    """Where some rank is out of load/store reach (another node; on the emulated device,
    SYMCOMM_PES_PER_NODE), the collectives take the remote path, hierarchically where nodes hold
    several ranks each (on a GPU, nodes of SYMCOMM_PES_PER_NODE with the remote path forced); the fused
    GEMM path refuses with the reason while 'auto' computes unfused, on every rank (MoE's remote path:
    test_moe_gpu.py in the same runs)."""
    per_node = int(os.environ.get("SYMCOMM_PES_PER_NODE", "0"))
    split = runtime.emulated() and 0 < per_node < world.world_size
    assert runtime.all_reachable() == (not split)
    forced = os.environ.get("SYMCOMM_TRANSPORT", "auto") == "rma"
    # More ranks than the load/store kernels read take the remote path too.
    many = world.world_size > runtime.load_extension().max_peers
    assert symcomm.transport() == ("rma" if split or forced or many else "p2p")
    hierarchical = []
    for name in ("_hierarchical_all_reduce", "_hierarchical_all_gather", "_hierarchical_exchange"):
        def spy(*args, run=getattr(collectives, name), name=name):
            hierarchical.append((name, *args[-2:]))
            return run(*args)
        monkeypatch.setattr(collectives, name, spy)
    w = world.world_size
    xs = on_gpu(world, seed_of(gen), (3 * w, 1001), torch.float32)
    assert_close(ops.all_reduce(xs[world.rank]), *sum_ref(xs), dtype=torch.float32)
    assert torch.equal(ops.all_gather(xs[world.rank], 1), torch.cat(xs, 1))
    assert_close(ops.reduce_scatter(xs[world.rank]), *sum_ref([x.chunk(w)[world.rank] for x in xs]),
                 dtype=torch.float32)
    assert torch.equal(ops.all_to_all(xs[world.rank]), torch.cat([x.chunk(w)[world.rank] for x in xs]))
    steps = ["_hierarchical_all_reduce", "_hierarchical_all_gather", "_hierarchical_exchange", "_hierarchical_exchange"]
    nodes = symcomm.transport() == "rma" and 1 < per_node < w and w % per_node == 0
    assert hierarchical == ([(name, w // per_node, per_node) for name in steps] if nodes else [])
    a, b = (on_gpu(world, seed_of(gen), shape, torch.bfloat16) for shape in ((64, 32), (32, 48)))
    assert_gemm_close(ops.gemm_all_reduce(a[world.rank], b[world.rank]), a, b)
    if not (split or many):
        return
    why = "some ranks are out of load/store reach" if split else f"{world.world_size} ranks: the fused kernels read"
    with pytest.raises(ValueError, match=f"path='fused' cannot run here: {why}"):
        ops.gemm_all_reduce(a[world.rank], b[world.rank], path="fused")
