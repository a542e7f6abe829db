#include "moe/moe.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <nvshmem.h>

#include <string>

#include "core/launch.cuh"
#include "core/memory.cuh"
#include "core/workspace.cuh"

namespace symcomm {
namespace {

constexpr int kThreads = 512;

// What every MoE kernel gets; the per-row work is one warp per (token, expert) pair or token.
struct MoeArgs {
  Workspace ws;
  int npes;
  Payload mine;  // this PE's expert buffer, told to every peer at the first barrier
  const char* x;
  const std::int64_t* topk_ids;
  const int* positions;
  const int* counts;
  int* expert_counts;
  std::int64_t* routing;
  const float* weights;
  char* y;
  int tokens, top_k, num_experts, local, capacity;
  std::int64_t row_bytes;
  // The remote path: rows move by NVSHMEM puts and gets, which need symmetric local buffers (x is,
  // and combine gathers its rows in the workspace's data area), and land at expert_buf's offset on
  // the owner, the same on every PE since symmetric allocations are collective.
  bool rma;
};

// A peer's expert buffer row `row` (= local expert * capacity + slot), as this PE sees it.
__device__ __forceinline__ char* expert_row(const MoeArgs& a, const Payload& buf, int owner, std::int64_t row) {
  return static_cast<char*>(nvshmem_ptr(a.ws.base + buf.offset, owner)) + row * a.row_bytes;
}

// The session of every MoE kernel: among every PE, through signals on the remote path.
__device__ Session moe_session(const MoeArgs& a) { return Session::resume(a.ws, Team{0, 1, a.npes}, a.mine, a.rma); }

// One block: meet every PE (so nobody still uses the buffers this dispatch overwrites), learn where
// each PE's expert_x is (by load/store; the remote path puts at our own offset), tell every PE how
// many pairs we send to each expert, and once all counts are in, total this PE's own experts.
__global__ void __launch_bounds__(kThreads) moe_counts_kernel(MoeArgs a) {
  __shared__ Payload peers[kMaxPeers];
  Session s = moe_session(a);
  s.meet(peers);
  const int me = nvshmem_my_pe();
  if (a.rma) {
    // Our own row of counts is the symmetric source the puts need.
    int* mine = a.ws.moe_counts(me);
    for (int e = threadIdx.x; e < a.num_experts; e += blockDim.x) mine[e] = a.counts[e];
    __syncthreads();
    for (int q = 0; q < a.npes; ++q)
      if (q != me) nvshmemx_putmem_block(mine, mine, a.num_experts * sizeof(int), q);
    s.quiet();
  } else {
    if (threadIdx.x < a.npes) a.ws.moe_peers()[threadIdx.x] = peers[threadIdx.x];
    for (int q = 0; q < a.npes; ++q) {
      int* remote = static_cast<int*>(nvshmem_ptr(a.ws.moe_counts(me), q));
      for (int e = threadIdx.x; e < a.num_experts; e += blockDim.x) remote[e] = a.counts[e];
    }
  }
  s.meet(peers);
  for (int el = threadIdx.x; el < a.local; el += blockDim.x) {
    int total = 0;
    for (int src = 0; src < a.npes; ++src) total += load_cg(a.ws.moe_counts(src) + me * a.local + el);
    a.expert_counts[el] = total;
  }
  s.save();
}

// Every block: move this PE's pairs into their slots on the owners, then meet (so an owner's kernel
// ends only once every row bound for it has landed). Runs right after moe_counts_kernel on the same
// stream, which already met everyone, so it starts without a barrier.
__global__ void __launch_bounds__(kThreads) moe_dispatch_kernel(MoeArgs a) {
  Session s = moe_session(a);
  const int me = nvshmem_my_pe();
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int pairs = a.tokens * a.top_k;
  for (int p = blockIdx.x * warps + threadIdx.x / 32; p < pairs; p += gridDim.x * warps) {
    const int e = static_cast<int>(a.topk_ids[p]);
    const int owner = e / a.local;
    // Lower PEs' pairs to e come first, then ours in token order.
    int slot = a.positions[p];
    for (int src = 0; src < me; ++src) slot += load_cg(a.ws.moe_counts(src) + e);
    if (slot >= a.capacity) {
      if (lane == 0)
        printf("symcomm: PE %d: moe_dispatch overflows expert %d: slot %d >= capacity %d (expert_x.shape[1])\n",
               me, e, slot, a.capacity);
      __trap();
    }
    if (lane == 0) a.routing[p] = static_cast<std::int64_t>(e) * a.capacity + slot;
    const std::int64_t row = static_cast<std::int64_t>(e % a.local) * a.capacity + slot;
    const char* src = a.x + static_cast<std::int64_t>(p / a.top_k) * a.row_bytes;
    if (a.rma) {
      nvshmemx_putmem_nbi_warp(a.ws.base + a.mine.offset + row * a.row_bytes, src, a.row_bytes, owner);
      continue;
    }
    char* dst = expert_row(a, a.ws.moe_peers()[owner], owner, row);
    for (std::int64_t b = lane * 16; b < a.row_bytes; b += 32 * 16)
      *reinterpret_cast<uint4*>(dst + b) = *reinterpret_cast<const uint4*>(src + b);
  }
  s.quiet();  // the rows are in before the closing barrier says so
  s.close();
}

// Every block: meet (the owners' expert_y is complete), then each warp sums one token's k rows, read
// from their owners (on the remote path, fetched into the data area first), weighted, in float32;
// meet again so no owner reuses expert_y too early.
template <typename T>
__global__ void __launch_bounds__(kThreads) moe_combine_kernel(MoeArgs a) {
  constexpr int N = 16 / sizeof(T);
  __shared__ Payload peers[kMaxPeers];
  Session s = moe_session(a);
  s.meet(peers);
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const std::int64_t vecs = a.row_bytes / 16;
  const std::int64_t per_owner = static_cast<std::int64_t>(a.local) * a.capacity;
  char* fetched = a.ws.base + kDataOffset;  // pair p's row at p * row_bytes
  if (a.rma) {
    for (int t = blockIdx.x * warps + threadIdx.x / 32; t < a.tokens; t += gridDim.x * warps) {
      for (int j = 0; j < a.top_k; ++j) {
        const std::int64_t code = a.routing[t * a.top_k + j];
        const int owner = static_cast<int>(code / per_owner);
        nvshmemx_getmem_nbi_warp(fetched + (t * a.top_k + j) * a.row_bytes,
                                 a.ws.base + a.mine.offset + (code - owner * per_owner) * a.row_bytes, a.row_bytes,
                                 owner);
      }
    }
    s.quiet();
  }
  for (int t = blockIdx.x * warps + threadIdx.x / 32; t < a.tokens; t += gridDim.x * warps) {
    const Vec<T, N>* rows[kMaxTopK];
    float w[kMaxTopK];
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) {
      if (j < a.top_k) {
        const std::int64_t p = t * a.top_k + j, code = a.routing[p];
        const int owner = static_cast<int>(code / per_owner);
        rows[j] = reinterpret_cast<const Vec<T, N>*>(a.rma ? fetched + p * a.row_bytes
                                                           : expert_row(a, peers[owner], owner, code - owner * per_owner));
        w[j] = a.weights[t * a.top_k + j];
      }
    }
    auto* out = reinterpret_cast<Vec<T, N>*>(a.y + t * a.row_bytes);
    for (std::int64_t v = lane; v < vecs; v += 32) {
      float acc[N] = {};
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j) {
        if (j < a.top_k) {
          const Vec<T, N> r = load_cg(rows[j] + v);
#pragma unroll
          for (int n = 0; n < N; ++n) acc[n] += w[j] * static_cast<float>(r.v[n]);
        }
      }
      Vec<T, N> o;
#pragma unroll
      for (int n = 0; n < N; ++n) o.v[n] = static_cast<T>(acc[n]);
      out[v] = o;
    }
  }
  s.close();
}

MoeArgs make_args(const MoeCall& c) {
  const int npes = nvshmem_n_pes();
  const int most = c.rma ? kMaxPes : kMaxPeers;
  SYMCOMM_CHECK(npes <= most, "at most " + std::to_string(most) + " PEs are supported" +
                                  (c.rma ? "" : " where load/store reaches them (more take the remote path)"));
  SYMCOMM_CHECK(c.num_experts >= npes && c.num_experts % npes == 0 && c.num_experts <= kMaxExperts,
                "num_experts must be a multiple of the PE count and at most " + std::to_string(kMaxExperts));
  SYMCOMM_CHECK(c.top_k >= 1 && c.top_k <= kMaxTopK, "top_k must be in [1, " + std::to_string(kMaxTopK) + "]");
  SYMCOMM_CHECK(c.tokens >= 0 && c.capacity >= 1 && c.hidden >= 1, "bad sizes");
  const std::int64_t row_bytes = static_cast<std::int64_t>(c.hidden) * (c.dtype == 0 ? 4 : 2);
  SYMCOMM_CHECK(row_bytes % 16 == 0 && (c.x | c.expert_buf | c.y | c.workspace) % 16 == 0,
                "rows must be 16-byte multiples on 16-byte aligned buffers");
  auto* ws = reinterpret_cast<char*>(c.workspace);
  return MoeArgs{Workspace{ws},
                 npes,
                 Payload{static_cast<std::int64_t>(c.expert_buf - c.workspace), 0},
                 reinterpret_cast<const char*>(c.x),
                 reinterpret_cast<const std::int64_t*>(c.topk_ids),
                 reinterpret_cast<const int*>(c.positions),
                 reinterpret_cast<const int*>(c.counts),
                 reinterpret_cast<int*>(c.expert_counts),
                 reinterpret_cast<std::int64_t*>(c.routing),
                 reinterpret_cast<const float*>(c.weights),
                 reinterpret_cast<char*>(c.y),
                 c.tokens,
                 c.top_k,
                 c.num_experts,
                 c.num_experts / npes,
                 c.capacity,
                 row_bytes,
                 c.rma};
}

}  // namespace

void load_moe_kernels() {
  load_kernel(moe_counts_kernel);
  load_kernel(moe_dispatch_kernel);
  load_kernel(moe_combine_kernel<__half>);
  load_kernel(moe_combine_kernel<__nv_bfloat16>);
}

void moe_dispatch(const MoeCall& c) {
  const MoeArgs a = make_args(c);
  launch(moe_counts_kernel, 1, kThreads, 0, c.stream, a);
  launch(moe_dispatch_kernel, grid_for(c.grid_bytes, kThreads), kThreads, 0, c.stream, a);
}

void moe_combine(const MoeCall& c) {
  const MoeArgs a = make_args(c);
  const int grid = grid_for(c.grid_bytes, kThreads);
  if (c.dtype == 1)
    launch(moe_combine_kernel<__half>, grid, kThreads, 0, c.stream, a);
  else if (c.dtype == 2)
    launch(moe_combine_kernel<__nv_bfloat16>, grid, kThreads, 0, c.stream, a);
  else
    SYMCOMM_CHECK(false, "moe_combine on the nvshmem backend takes float16 or bfloat16, got dtype code " +
                             std::to_string(c.dtype));
}

}  // namespace symcomm
