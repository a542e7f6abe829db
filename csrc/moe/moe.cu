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
  // The hierarchical remote path (per_node > 0; see Hierarchy): node_pos[t, n] is token t's index
  // among this PE's tokens for node n (-1: none of its experts is there), node_tokens[n] their number.
  int per_node;
  const int* node_pos;
  const int* node_tokens;
  std::int64_t data_bytes;  // the workspace's data area, where the hierarchical records go
};

// A peer's expert buffer row `row` (= local expert * capacity + slot), as this PE sees it.
__device__ __forceinline__ char* expert_row(const MoeArgs& a, const Payload& buf, int owner, std::int64_t row) {
  return static_cast<char*>(nvshmem_ptr(a.ws.base + buf.offset, owner)) + row * a.row_bytes;
}

// The session of every MoE kernel: among every PE, through signals on the remote path.
__device__ Session moe_session(const MoeArgs& a) { return Session::resume(a.ws, Team{0, 1, a.npes}, a.mine, a.rma); }

// The slot of pair p on its expert's owner (lower PEs' pairs to e come first, then ours in token
// order), checked against the capacity (the thread that `says` prints why it traps): routing[p].
__device__ std::int64_t pair_code(const MoeArgs& a, int p, bool says) {
  const int me = nvshmem_my_pe();
  const int e = static_cast<int>(a.topk_ids[p]);
  int slot = a.positions[p];
  for (int src = 0; src < me; ++src) slot += load_cg(a.ws.moe_counts(src) + e);
  if (slot >= a.capacity) {
    if (says)
      printf("symcomm: PE %d: moe_dispatch overflows expert %d: slot %d >= capacity %d (expert_x.shape[1])\n", me, e,
             slot, a.capacity);
    __trap();
  }
  return static_cast<std::int64_t>(e) * a.capacity + slot;
}

__device__ void copy_row(char* dst, const char* src, std::int64_t bytes, int lane) {
  for (std::int64_t b = lane * 16; b < bytes; b += 32 * 16)
    *reinterpret_cast<uint4*>(dst + b) = load_cg(reinterpret_cast<const uint4*>(src + b));
}

// The hierarchical remote path, for ranks on several nodes of per_node each (in rank order) where
// load/store reaches every rank of one's own node. A token crosses the network once per node that
// holds one of its experts: as a record put into the inbox of our rail peer there (the PE of our
// place on that node), which stores the row into its node's expert slots. Combine sends the codes and
// weights the same way; the rail peer sums its node's rows in float32 and puts the partial sum back,
// and the home PE adds the partials of the nodes. In the data area, region 0 stages our records and
// region 1 + n is the inbox from node n's rail peer, `slots` records each; combine's partial sums
// follow, two regions per node: those we compute for its rail peer, then those it computes for us.
struct Hierarchy {
  int nodes, per_node, node, place, slots;
  char* data;
  std::int64_t record_bytes, partial_bytes;

  __device__ Hierarchy(const MoeArgs& a, bool combine)
      : nodes(a.npes / a.per_node),
        per_node(a.per_node),
        node(nvshmem_my_pe() / a.per_node),
        place(nvshmem_my_pe() % a.per_node),
        data(a.ws.base + kDataOffset),
        record_bytes(moe_record_bytes(a.top_k, a.row_bytes, combine)),
        partial_bytes(combine ? moe_partial_bytes(a.row_bytes) : 0) {
    slots = static_cast<int>(moe_slots(a.data_bytes, nodes, a.top_k, a.row_bytes, combine));
  }
  __device__ int rail_pe(int n) const { return n * per_node + place; }
  __device__ Team rail() const { return Team{place, per_node, nodes}; }
  __device__ char* record(int region, int pos) const {
    return data + (static_cast<std::int64_t>(region) * slots + pos) * record_bytes;
  }
  __device__ float* partial(int region, int pos) const {
    return reinterpret_cast<float*>(data + (nodes + 1) * slots * record_bytes +
                                    (static_cast<std::int64_t>(region) * slots + pos) * partial_bytes);
  }
  // How many records node n's rail peer sent us (its counts arrived before this kernel).
  __device__ int inbox_count(const MoeArgs& a, int n) const { return load_cg(a.ws.moe_nodes(rail_pe(n)) + node); }
  // Block-wide: our tokens for every node, to each node's rail peer (from our own row: puts need a
  // symmetric source).
  __device__ void send_node_tokens(const MoeArgs& a) const {
    int* mine = a.ws.moe_nodes(nvshmem_my_pe());
    for (int n = threadIdx.x; n < nodes; n += blockDim.x) mine[n] = a.node_tokens[n];
    __syncthreads();
    for (int n = 0; n < nodes; ++n)
      if (rail_pe(n) != nvshmem_my_pe()) nvshmemx_putmem_block(mine, mine, nodes * sizeof(int), rail_pe(n));
  }
  // Warp-wide: puts `record` to every node token t has experts on, at its place in our inbox there.
  __device__ void send(const MoeArgs& a, int t, const char* record) const {
    __syncwarp();
    __threadfence();
    for (int n = 0; n < nodes; ++n) {
      const int pos = a.node_pos[static_cast<std::int64_t>(t) * nodes + n];
      if (pos >= 0) nvshmemx_putmem_nbi_warp(this->record(1 + node, pos), record, record_bytes, rail_pe(n));
    }
  }
};

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
    if (a.per_node) Hierarchy(a, false).send_node_tokens(a);
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
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int pairs = a.tokens * a.top_k;
  for (int p = blockIdx.x * warps + threadIdx.x / 32; p < pairs; p += gridDim.x * warps) {
    const std::int64_t code = pair_code(a, p, lane == 0);
    if (lane == 0) a.routing[p] = code;
    const int owner = static_cast<int>(a.topk_ids[p]) / a.local;
    const std::int64_t row = code - static_cast<std::int64_t>(owner) * a.local * a.capacity;
    const char* src = a.x + static_cast<std::int64_t>(p / a.top_k) * a.row_bytes;
    if (a.rma)
      nvshmemx_putmem_nbi_warp(a.ws.base + a.mine.offset + row * a.row_bytes, src, a.row_bytes, owner);
    else
      copy_row(expert_row(a, a.ws.moe_peers()[owner], owner, row), src, a.row_bytes, lane);
  }
  s.quiet();  // the rows are in before the closing barrier says so
  s.close();
}

// Hierarchical dispatch, step 1 (every block): stage each token's record (its k routing codes, then
// its row) and put it to the rail peer of every node it has experts on; meet the rail, so that once
// this kernel ends on a PE every record for it has landed (the next kernel needs them all).
__global__ void __launch_bounds__(kThreads) moe_send_rows_kernel(MoeArgs a) {
  Session s = moe_session(a);
  const Hierarchy h(a, false);
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const std::int64_t meta = moe_meta_bytes(a.top_k, false);
  for (int t = blockIdx.x * warps + threadIdx.x / 32; t < a.tokens; t += gridDim.x * warps) {
    char* record = h.record(0, t);
    for (int j = lane; j < a.top_k; j += 32) {
      const int p = t * a.top_k + j;
      a.routing[p] = reinterpret_cast<std::int64_t*>(record)[j] = pair_code(a, p, true);
    }
    copy_row(record + meta, a.x + static_cast<std::int64_t>(t) * a.row_bytes, a.row_bytes, lane);
    h.send(a, t, record);
  }
  s.quiet();
  s.team = h.rail();
  s.close();
}

// Hierarchical dispatch, step 2 (every block): store every record of our inbox into the slots of its
// experts on this node, by load/store; then meet every PE, so an owner's kernel ends only once every
// row bound for it has landed (and no inbox is reused before it has been read).
__global__ void __launch_bounds__(kThreads) moe_fan_out_kernel(MoeArgs a) {
  Session s = moe_session(a);
  const Hierarchy h(a, false);
  const int lane = threadIdx.x % 32, warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int warps = gridDim.x * (blockDim.x / 32);
  const std::int64_t meta = moe_meta_bytes(a.top_k, false);
  const std::int64_t per_owner = static_cast<std::int64_t>(a.local) * a.capacity;
  for (int n = 0; n < h.nodes; ++n) {
    for (int pos = warp, count = h.inbox_count(a, n); pos < count; pos += warps) {
      const char* record = h.record(1 + n, pos);
      for (int j = 0; j < a.top_k; ++j) {
        const std::int64_t code = load_cg(reinterpret_cast<const std::int64_t*>(record) + j);
        const int owner = static_cast<int>(code / per_owner);
        if (owner / h.per_node == h.node)
          copy_row(expert_row(a, a.mine, owner, code - owner * per_owner), record + meta, a.row_bytes, lane);
      }
    }
  }
  s.close();
}

// Warp-wide: for each of the lanes' vectors v of a row, the float32 sum over the first m rows of
// w[j] * rows[j][v] (a null row is left out), handed to store(v, sums). Inlined, and rows[] and w[]
// indexed by constants only, so that they stay in registers.
template <typename T, int N, typename Store>
__device__ __forceinline__ void weighted_sum(const Vec<T, N>* const* rows, const float* w, int m, std::int64_t vecs,
                                             int lane, Store store) {
  for (std::int64_t v = lane; v < vecs; v += 32) {
    float acc[N] = {};
#pragma unroll
    for (int j = 0; j < kMaxTopK; ++j) {
      if (j < m && rows[j] != nullptr) {
        const Vec<T, N> r = load_cg(rows[j] + v);
#pragma unroll
        for (int n = 0; n < N; ++n) acc[n] += w[j] * static_cast<float>(r.v[n]);
      }
    }
    store(v, acc);
  }
}

template <typename T, int N>
__device__ Vec<T, N> rounded(const float* acc) {
  Vec<T, N> o;
#pragma unroll
  for (int n = 0; n < N; ++n) o.v[n] = static_cast<T>(acc[n]);
  return o;
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
    weighted_sum(rows, w, a.top_k, vecs, lane, [&](std::int64_t v, const float* acc) { out[v] = rounded<T, N>(acc); });
  }
  s.close();
}

// Hierarchical combine, step 1 (every block): meet every PE (the owners' expert_y is complete), then
// put each token's record (its k routing codes, then its k weights) to the rail peer of every node it
// has experts on, and our tokens per node to each; meet the rail, so that every record for a PE has
// landed once this kernel ends there.
__global__ void __launch_bounds__(kThreads) moe_send_codes_kernel(MoeArgs a) {
  __shared__ Payload peers[kMaxPeers];
  Session s = moe_session(a);
  s.meet(peers);
  const Hierarchy h(a, true);
  if (blockIdx.x == 0) h.send_node_tokens(a);
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int t = blockIdx.x * warps + threadIdx.x / 32; t < a.tokens; t += gridDim.x * warps) {
    char* record = h.record(0, t);
    for (int j = lane; j < a.top_k; j += 32) {
      reinterpret_cast<std::int64_t*>(record)[j] = a.routing[t * a.top_k + j];
      reinterpret_cast<float*>(record + 8 * a.top_k)[j] = a.weights[t * a.top_k + j];
    }
    h.send(a, t, record);
  }
  s.quiet();
  s.team = h.rail();
  s.close();
}

// Hierarchical combine, step 2 (every block): for every record of our inbox, sum the rows of its
// experts on this node (read by load/store), weighted, in float32, and put the sum back to the record's
// home PE; meet the rail, so that every partial sum for a PE has landed once this kernel ends there.
template <typename T>
__global__ void __launch_bounds__(kThreads) moe_node_sum_kernel(MoeArgs a) {
  constexpr int N = 16 / sizeof(T);
  Session s = moe_session(a);
  const Hierarchy h(a, true);
  s.team = h.rail();
  const int lane = threadIdx.x % 32, warp = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int warps = gridDim.x * (blockDim.x / 32);
  const std::int64_t per_owner = static_cast<std::int64_t>(a.local) * a.capacity;
  for (int n = 0; n < h.nodes; ++n) {
    for (int pos = warp, count = h.inbox_count(a, n); pos < count; pos += warps) {
      const char* record = h.record(1 + n, pos);
      // Expert j's row where it is on this node, else null.
      const Vec<T, N>* rows[kMaxTopK];
      float w[kMaxTopK];
#pragma unroll
      for (int j = 0; j < kMaxTopK; ++j) {
        rows[j] = nullptr;
        w[j] = 0;
        if (j < a.top_k) {
          const std::int64_t code = load_cg(reinterpret_cast<const std::int64_t*>(record) + j);
          const int owner = static_cast<int>(code / per_owner);
          if (owner / h.per_node == h.node) {
            rows[j] = reinterpret_cast<const Vec<T, N>*>(expert_row(a, a.mine, owner, code - owner * per_owner));
            w[j] = load_cg(reinterpret_cast<const float*>(record + 8 * a.top_k) + j);
          }
        }
      }
      float* sum = h.partial(2 * n, pos);
      weighted_sum(rows, w, a.top_k, a.row_bytes / 16, lane, [&](std::int64_t v, const float* acc) {
#pragma unroll
        for (int i = 0; i < N; ++i) sum[v * N + i] = acc[i];
      });
      __syncwarp();
      __threadfence();
      nvshmemx_putmem_nbi_warp(h.partial(2 * h.node + 1, pos), sum, h.partial_bytes, h.rail_pe(n));
    }
  }
  s.quiet();
  s.close();
}

// Hierarchical combine, step 3 (every block): y[t] is the sum of the partial sums of the nodes token t
// has experts on, rounded once; meet every PE, so no owner reuses expert_y (nor any PE its inbox) early.
template <typename T>
__global__ void __launch_bounds__(kThreads) moe_add_partials_kernel(MoeArgs a) {
  constexpr int N = 16 / sizeof(T);
  Session s = moe_session(a);
  const Hierarchy h(a, true);
  const int lane = threadIdx.x % 32, warps = blockDim.x / 32;
  for (int t = blockIdx.x * warps + threadIdx.x / 32; t < a.tokens; t += gridDim.x * warps) {
    auto* out = reinterpret_cast<Vec<T, N>*>(a.y + t * a.row_bytes);
    for (std::int64_t v = lane; v < a.row_bytes / 16; v += 32) {
      float acc[N] = {};
      for (int n = 0; n < h.nodes; ++n) {
        const int pos = a.node_pos[static_cast<std::int64_t>(t) * h.nodes + n];
        if (pos < 0) continue;
        const auto* sum = reinterpret_cast<const Vec<float, 4>*>(h.partial(2 * n + 1, pos) + v * N);
#pragma unroll
        for (int i = 0; i < N / 4; ++i) {
          const Vec<float, 4> q = load_cg(sum + i);
#pragma unroll
          for (int k = 0; k < 4; ++k) acc[4 * i + k] += q.v[k];
        }
      }
      out[v] = rounded<T, N>(acc);
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
  if (c.per_node) {
    SYMCOMM_CHECK(c.rma && npes % c.per_node == 0, "the hierarchical path takes the remote path and whole nodes");
    SYMCOMM_CHECK(c.tokens <= moe_slots(c.data_bytes, npes / c.per_node, c.top_k, row_bytes, c.weights != 0),
                  "the hierarchical path's records do not fit the workspace's data area: raise SYMCOMM_WORKSPACE_BYTES");
  }
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
                 c.rma,
                 c.per_node,
                 reinterpret_cast<const int*>(c.node_pos),
                 reinterpret_cast<const int*>(c.node_tokens),
                 c.data_bytes};
}

template <typename T>
void combine_as(const MoeArgs& a, int grid, std::uintptr_t stream) {
  if (!a.per_node) return launch(moe_combine_kernel<T>, grid, kThreads, 0, stream, a);
  launch(moe_send_codes_kernel, grid, kThreads, 0, stream, a);
  launch(moe_node_sum_kernel<T>, grid, kThreads, 0, stream, a);
  launch(moe_add_partials_kernel<T>, grid, kThreads, 0, stream, a);
}

template <typename T>
void load_combine_kernels() {
  load_kernel(moe_combine_kernel<T>);
  load_kernel(moe_node_sum_kernel<T>);
  load_kernel(moe_add_partials_kernel<T>);
}

}  // namespace

void load_moe_kernels() {
  load_kernel(moe_counts_kernel);
  load_kernel(moe_dispatch_kernel);
  load_kernel(moe_send_rows_kernel);
  load_kernel(moe_fan_out_kernel);
  load_kernel(moe_send_codes_kernel);
  load_combine_kernels<__half>();
  load_combine_kernels<__nv_bfloat16>();
}

void moe_dispatch(const MoeCall& c) {
  const MoeArgs a = make_args(c);
  const int grid = grid_for(c.grid_bytes, kThreads);
  launch(moe_counts_kernel, 1, kThreads, 0, c.stream, a);
  if (!a.per_node) return launch(moe_dispatch_kernel, grid, kThreads, 0, c.stream, a);
  launch(moe_send_rows_kernel, grid, kThreads, 0, c.stream, a);
  launch(moe_fan_out_kernel, grid, kThreads, 0, c.stream, a);
}

void moe_combine(const MoeCall& c) {
  const MoeArgs a = make_args(c);
  const int grid = grid_for(c.grid_bytes, kThreads);
  if (c.dtype == 1)
    combine_as<__half>(a, grid, c.stream);
  else if (c.dtype == 2)
    combine_as<__nv_bfloat16>(a, grid, c.stream);
  else
    SYMCOMM_CHECK(false, "moe_combine on the nvshmem backend takes float16 or bfloat16, got dtype code " +
                             std::to_string(c.dtype));
}

}  // namespace symcomm
