"""The fused GEMM ops on the GPU: both paths forced and 'auto', element by element against a float64
reference (harness.assert_gemm_close, which also shows that zeros, a missing rank, a stale tile or a
missing row would fail), at Llama-3 tensor-parallel shard shapes and awkward M, in bfloat16 and
float16; long runs of back-to-back calls; CUDA-graph replay with the inputs mutated inside the graph;
torch.compile. Outputs come from poisoned allocations (conftest.py).

(The op contract tests in test_ops.py, opcheck included, also run here on the nvshmem backend.)
"""

import pytest
import torch

from harness import assert_close, assert_gemm_close, gemm_ref, on_gpu, seed_of
from symcomm import gemm, runtime, streams

pytestmark = [pytest.mark.dist, pytest.mark.gpu]
ops = torch.ops.symcomm

# The emulated device computes the GEMM on the CPU, one element at a time: there the same cases run
# at sizes it does in seconds (K a multiple of 8 per rank at 2 and 3 ranks).
EMULATED = runtime.emulated()
# (K, N) of the unsharded row-parallel layers: Llama-3 8B o_proj and down_proj, 70B o_proj.
ROW_LAYERS = [(384, 256), (768, 256)] if EMULATED else [(4096, 4096), (14336, 4096), (8192, 8192)]
MS = [1, 7, 200] if EMULATED else [1, 7, 128, 1000, 4096]
M_PER_RANK = [1, 7, 64] if EMULATED else [1, 7, 128, 1000]
# (K, N) of column-parallel layers: Llama-3 8B and 70B gate_proj.
COLUMN_LAYERS = [(384, 768)] if EMULATED else [(4096, 14336), (8192, 28672)]
# bfloat16 at every layer, float16 at the first.
DTYPE_LAYERS = [(torch.bfloat16, k, n) for k, n in ROW_LAYERS] + [(torch.float16, *ROW_LAYERS[0])]


def row_parallel(world, gen, m, k, n, dtype, transposed):
    """Every rank's a [m, K/W] and b [K/W, n] (b as a transposed [n, K/W] weight when asked)."""
    kl = k // world.world_size
    a_all = on_gpu(world, seed_of(gen), (m, kl), dtype)
    if transposed:
        b_all = [w.t() for w in on_gpu(world, seed_of(gen), (n, kl), dtype)]
    else:
        b_all = on_gpu(world, seed_of(gen), (kl, n), dtype)
    return a_all, b_all


@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "weight.t()"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batched_gemm_core_against_matmul(world, gen, dtype, transposed):
    # all_gather_gemm's batched GEMM alone, which a world of one never runs: D[l] = A[l] @ B with one B
    # for every batch, and batches of D apart by more than their rows, as all_gather_gemm's pieces are.
    batches, m, k, n, gap = 3, 300, 136, 264, 8
    a = on_gpu(world, seed_of(gen), (batches, m, k), dtype)[0]
    weight = on_gpu(world, seed_of(gen), (n, k) if transposed else (k, n), dtype)[0]
    b = weight.t() if transposed else weight
    d = torch.full((batches, m + gap, n), float("nan"), dtype=dtype, device=world.device)
    stream = streams.current()
    runtime.load_extension().gemm(
        runtime.workspace().data_ptr(), m, n, k, batches, a.data_ptr(), k, m * k, weight.data_ptr(), weight.shape[1],
        transposed, d.data_ptr(), n, (m + gap) * n, 0, gemm.DTYPE_CODES[dtype], False, False, False, runtime.sm_count(),
        stream.cuda_stream)
    streams.launched(stream)
    assert_close(d[:, :m], *gemm_ref([a], [b]), dtype=dtype)
    assert d[:, m:].isnan().all(), "the GEMM wrote between the batches"


@pytest.mark.parametrize("path", ["fused", "unfused", "auto"])
@pytest.mark.parametrize("transposed", [False, True], ids=["kn", "weight.t()"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype, k, n", DTYPE_LAYERS, ids=[f"{str(d)[6:]}-{k}-{n}" for d, k, n in DTYPE_LAYERS])
@pytest.mark.parametrize("m", MS)
def test_gemm_all_reduce(world, gen, m, dtype, k, n, bias, transposed, path):
    a_all, b_all = row_parallel(world, gen, m, k, n, dtype, transposed)
    c = on_gpu(world, seed_of(gen), (n,), dtype)[0] if bias else None
    assert_gemm_close(ops.gemm_all_reduce(a_all[world.rank], b_all[world.rank], c, path=path), a_all, b_all, c)


@pytest.mark.parametrize("path", ["fused", "unfused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k, n", ROW_LAYERS[:2])
@pytest.mark.parametrize("m_per_rank", M_PER_RANK)
def test_gemm_reduce_scatter(world, gen, m_per_rank, k, n, dtype, path):
    a_all, b_all = row_parallel(world, gen, m_per_rank * world.world_size, k, n, dtype, True)
    mine = slice(world.rank * m_per_rank, (world.rank + 1) * m_per_rank)
    assert_gemm_close(ops.gemm_reduce_scatter(a_all[world.rank], b_all[world.rank], path=path), a_all, b_all,
                      rows=mine)


@pytest.mark.parametrize("path", ["fused", "unfused"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k, n", COLUMN_LAYERS)
@pytest.mark.parametrize("m_per_rank", M_PER_RANK)
def test_all_gather_gemm(world, gen, m_per_rank, k, n, dtype, path):
    a_all = on_gpu(world, seed_of(gen), (m_per_rank, k), dtype)
    w = on_gpu(world, seed_of(gen), (n // world.world_size, k), dtype)[world.rank]
    assert_gemm_close(ops.all_gather_gemm(a_all[world.rank], w.t(), path=path), a_all, [w.t()], gathered=True)


def test_fused_refuses_float32_by_name(world):
    a = torch.randn(256, 64, device=world.device)
    with pytest.raises(ValueError, match=r"path='fused' cannot run here: dtype float32"):
        ops.gemm_all_reduce(a, a.t().contiguous(), path="fused")
    # 'auto' serves float32 through the unfused path.
    assert ops.gemm_all_reduce(a, a.t().contiguous()).dtype == torch.float32


def test_products_larger_than_the_workspace_come_in_pieces(world, gen):
    # bf16 partial sums of twice the workspace's size, and as much again for the reduced tiles.
    k, n = ROW_LAYERS[-1]
    m = 2 * runtime.workspace().numel() // (2 * n)
    a_all, b_all = row_parallel(world, gen, m, k, n, torch.bfloat16, True)
    assert_gemm_close(ops.gemm_all_reduce(a_all[world.rank], b_all[world.rank], path="fused"), a_all, b_all)


def test_back_to_back_calls_never_read_stale_tiles(world, gen):
    calls, largest, k, n = (30, 100, 128, 256) if EMULATED else (200, 3000, 1024, 1024)
    for i in range(calls):
        m = int(torch.randint(1, largest, (1,), generator=gen)) * world.world_size
        a_all, b_all = row_parallel(world, gen, m, k * world.world_size, n, torch.bfloat16, i % 2 == 0)
        a, b = a_all[world.rank], b_all[world.rank]
        if i % 3 == 0:
            assert_gemm_close(ops.gemm_all_reduce(a, b, path="fused"), a_all, b_all)
        elif i % 3 == 1:
            rows = m // world.world_size
            assert_gemm_close(ops.gemm_reduce_scatter(a, b, path="fused"), a_all, b_all,
                              rows=slice(world.rank * rows, (world.rank + 1) * rows))
        else:
            assert_gemm_close(ops.all_gather_gemm(a, b, path="fused"), a_all, [b], gathered=True)


@pytest.mark.real_gpu("CUDA graphs")
def test_cuda_graph_replay_with_the_inputs_mutated_inside_the_graph(world, gen):
    m, k, n = 2048, 4096, 4096
    a = torch.empty((m, k // world.world_size), dtype=torch.bfloat16, device=world.device)
    w = torch.empty((n, k // world.world_size), dtype=torch.bfloat16, device=world.device)
    stream = torch.cuda.Stream(world.device)
    stream.wait_stream(torch.cuda.current_stream(world.device))
    with torch.cuda.stream(stream):
        for path in ("fused", "unfused"):  # warm up outside the capture
            ops.gemm_all_reduce(a, w.t(), path=path)
            ops.gemm_reduce_scatter(a, w.t(), path=path)
            ops.all_gather_gemm(a, w.t(), path=path)
    torch.cuda.current_stream(world.device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        # Captured, the fused path's two kernels would be graph nodes with no order between them: the ops
        # take their unfused path, and refuse the fused one.
        with pytest.raises(ValueError, match="path='fused' cannot run here: a CUDA graph is being captured"):
            ops.gemm_all_reduce(a, w.t(), path="fused")
        reduced = ops.gemm_all_reduce(a, w.t())
        scattered = ops.gemm_reduce_scatter(a, w.t())
        gathered = ops.all_gather_gemm(a, w.t())
        # Overwriting the inputs at once catches a kernel that returns before its peers are done.
        a.mul_(-1)
    for _ in range(4):
        a_all, b_all = row_parallel(world, gen, m, k, n, torch.bfloat16, True)
        a.copy_(a_all[world.rank])
        w.copy_(b_all[world.rank].t())
        graph.replay()
        torch.cuda.synchronize(world.device)
        assert_gemm_close(reduced, a_all, b_all)
        rows = m // world.world_size
        assert_gemm_close(scattered, a_all, b_all, rows=slice(world.rank * rows, (world.rank + 1) * rows))
        assert_gemm_close(gathered, a_all, [b_all[world.rank]], gathered=True)
        assert torch.equal(a, -a_all[world.rank])


def test_torch_compile_gives_the_eager_result(world, gen):
    a_all, b_all = row_parallel(world, gen, *((128, 384, 256) if EMULATED else (1024, 4096, 4096)), torch.bfloat16, True)
    a, b = a_all[world.rank], b_all[world.rank]

    def layer(x):
        return torch.relu(ops.gemm_all_reduce(x, b, path="fused")) * 2

    eager = layer(a)
    assert torch.equal(torch.compile(layer, fullgraph=True)(a), eager)
    assert_close(eager, *(torch.relu(t) * 2 for t in gemm_ref(a_all, b_all)), dtype=torch.bfloat16)


def test_the_policy_takes_the_fused_path_from_the_cut_point_on(world):
    cut = gemm.fused_min_m(world.world_size)
    a = torch.empty(1, 512, dtype=torch.bfloat16, device=world.device)
    # N small enough that the fused path fits a small workspace too (the emulated runs use 1 MiB).
    b = torch.empty(512, 256, dtype=torch.bfloat16, device=world.device)
    assert gemm.path_for("gemm_all_reduce", a, b) == "unfused"
    if cut is not None:
        big = torch.empty(cut, 512, dtype=torch.bfloat16, device=world.device)
        assert gemm.path_for("gemm_all_reduce", big, b) == "fused"
