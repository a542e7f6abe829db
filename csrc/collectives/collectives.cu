#include "collectives/collectives.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>
#include <string>
#include <type_traits>
#include <vector>

#include "core/launch.cuh"
#include "core/memory.cuh"
#include "core/workspace.cuh"

namespace symcomm {
namespace {

constexpr int kThreads = 512;
// The push kernels' reduction holds up to kMaxPeers rows' vectors and their pointers per thread: at 512
// threads' 128 registers it spills on sm_100a.
constexpr int kPushThreads = 256;

// Everything a collective kernel needs; sizes here are in elements of the kernel's type.
struct Args {
  Workspace ws;
  int npes;
  Payload mine;  // this PE's input for this call, told to every peer at the first barrier
  int row;
  std::int64_t len;
  char* dst;
  std::int64_t dst_pitch;  // bytes
  std::int64_t result_offset;
  Team team;  // push kernels: the PEs they run among (size resolved: never 0)
};

template <typename T>
using Acc = std::conditional_t<std::is_same_v<T, double>, double, float>;

// This block's share [lo, hi) of [0, len). Boundaries fall on multiples of `align` elements so that
// vector accesses stay aligned, and every PE computes the same split, so block b of one PE reads
// exactly what block b of another PE produced.
__device__ __forceinline__ void block_range(std::int64_t len, int align, std::int64_t& lo, std::int64_t& hi) {
  const std::int64_t units = len / align;
  lo = units * blockIdx.x / gridDim.x * align;
  hi = blockIdx.x + 1 == gridDim.x ? len : units * (blockIdx.x + 1) / gridDim.x * align;
}

__device__ __forceinline__ const char* peer_input(const Args& a, const Payload& p, int q) {
  return static_cast<const char*>(nvshmem_ptr(a.ws.base + p.offset, q)) + a.row * p.pitch;
}

// dst[i] = sum_q src[q][i] for i in [lo, hi): N-wide vectors, then a scalar tail.
// Inlined so that src[] is indexed by constants only and stays in registers.
template <typename T, int N>
__device__ __forceinline__ void sum_range(const T* const* src, int npes, T* dst, std::int64_t lo, std::int64_t hi) {
  const std::int64_t vec_hi = lo + (hi - lo) / N * N;
  for (std::int64_t i = lo + threadIdx.x * N; i < vec_hi; i += blockDim.x * N) {
    Vec<T, N> in[kMaxPeers];
    // All loads first, so the peers' latencies overlap.
#pragma unroll
    for (int q = 0; q < kMaxPeers; ++q)
      if (q < npes) in[q] = load_cg(reinterpret_cast<const Vec<T, N>*>(src[q] + i));
    Acc<T> acc[N] = {};
#pragma unroll
    for (int q = 0; q < kMaxPeers; ++q)
      if (q < npes) {
#pragma unroll
        for (int k = 0; k < N; ++k) acc[k] += static_cast<Acc<T>>(in[q].v[k]);
      }
    Vec<T, N> out;
#pragma unroll
    for (int k = 0; k < N; ++k) out.v[k] = static_cast<T>(acc[k]);
    *reinterpret_cast<Vec<T, N>*>(dst + i) = out;
  }
  for (std::int64_t i = vec_hi + threadIdx.x; i < hi; i += blockDim.x) {
    Acc<T> acc = 0;
#pragma unroll
    for (int q = 0; q < kMaxPeers; ++q)
      if (q < npes) acc += static_cast<Acc<T>>(load_cg(src[q] + i));
    dst[i] = static_cast<T>(acc);
  }
}

template <typename T, int N>
__device__ __forceinline__ void copy_range(const T* src, T* dst, std::int64_t lo, std::int64_t hi) {
  const std::int64_t vec_hi = lo + (hi - lo) / N * N;
  for (std::int64_t i = lo + threadIdx.x * N; i < vec_hi; i += blockDim.x * N)
    *reinterpret_cast<Vec<T, N>*>(dst + i) = load_cg(reinterpret_cast<const Vec<T, N>*>(src + i));
  for (std::int64_t i = vec_hi + threadIdx.x; i < hi; i += blockDim.x) dst[i] = load_cg(src + i);
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads) reduce_kernel(Args a) {
  __shared__ Payload peers[kMaxPeers];
  Session s = Session::open(a.ws, a.npes, a.mine, peers);
  const T* src[kMaxPeers];
#pragma unroll
  for (int q = 0; q < kMaxPeers; ++q)
    src[q] = q < a.npes ? reinterpret_cast<const T*>(peer_input(a, peers[q], q)) : nullptr;
  std::int64_t lo, hi;
  block_range(a.len, N, lo, hi);
  sum_range<T, N>(src, a.npes, reinterpret_cast<T*>(a.dst), lo, hi);
  s.close();
}

// dst[lo, hi) = src[lo, hi) (bytes, lo a multiple of 16) in units of U, and the bytes left over.
template <typename U>
__device__ __forceinline__ void copy_units(const char* src, char* dst, std::int64_t lo, std::int64_t hi) {
  constexpr int B = sizeof(U);
  const std::int64_t mid = lo + (hi - lo) / B * B;
  copy_range<U, 1>(reinterpret_cast<const U*>(src + lo), reinterpret_cast<U*>(dst + lo), 0, (mid - lo) / B);
  copy_range<unsigned char, 1>(reinterpret_cast<const unsigned char*>(src), reinterpret_cast<unsigned char*>(dst), mid,
                               hi);
}

// In the widest unit that both rows' alignments allow.
__device__ __forceinline__ void copy_bytes(const char* src, char* dst, std::int64_t lo, std::int64_t hi) {
  const std::uintptr_t align = reinterpret_cast<std::uintptr_t>(src) | reinterpret_cast<std::uintptr_t>(dst);
  if (align % 16 == 0)
    copy_units<uint4>(src, dst, lo, hi);
  else if (align % 8 == 0)
    copy_units<unsigned long long>(src, dst, lo, hi);
  else if (align % 4 == 0)
    copy_units<unsigned int>(src, dst, lo, hi);
  else if (align % 2 == 0)
    copy_units<unsigned short>(src, dst, lo, hi);
  else
    copy_units<unsigned char>(src, dst, lo, hi);
}

__global__ void __launch_bounds__(kThreads) gather_kernel(Args a) {
  __shared__ Payload peers[kMaxPeers];
  Session s = Session::open(a.ws, a.npes, a.mine, peers);
  std::int64_t lo, hi;
  block_range(a.len, 16, lo, hi);
  // Copies are typeless, and each peer's rows have an alignment of their own (in place or staged, and
  // its own pitch), so the unit is chosen per peer: a unit from our addresses alone would misalign
  // the loads from a peer whose rows are placed differently.
  for (int q = 0; q < a.npes; ++q) copy_bytes(peer_input(a, peers[q], q), a.dst + q * a.dst_pitch, lo, hi);
  s.close();
}

template <typename T, int N>
__global__ void __launch_bounds__(kThreads) two_shot_kernel(Args a) {
  __shared__ Payload peers[kMaxPeers];
  Session s = Session::open(a.ws, a.npes, a.mine, peers);
  // PE q owns [part(q), part(q + 1)), on multiples of N elements; the same split on every PE.
  auto part = [&](int q) { return q >= a.npes ? a.len : a.len / N * q / a.npes * N; };
  const int me = nvshmem_my_pe();
  const std::int64_t mine = part(me);
  T* result = reinterpret_cast<T*>(a.ws.base + a.result_offset);

  const T* src[kMaxPeers];
#pragma unroll
  for (int q = 0; q < kMaxPeers; ++q)
    src[q] = q < a.npes ? reinterpret_cast<const T*>(peer_input(a, peers[q], q)) + mine : nullptr;
  std::int64_t lo, hi;
  block_range(part(me + 1) - mine, N, lo, hi);
  sum_range<T, N>(src, a.npes, result, lo, hi);

  s.meet(peers);  // every share is reduced
  T* dst = reinterpret_cast<T*>(a.dst);
  for (int q = 0; q < a.npes; ++q) {
    const std::int64_t begin = part(q);
    block_range(part(q + 1) - begin, N, lo, hi);
    copy_range<T, N>(static_cast<const T*>(nvshmem_ptr(result, q)), dst + begin, lo, hi);
  }
  s.close();
}

// The remote path, for peers that load/store may not reach: no peer pointer anywhere. Among the PEs
// of a.team (every PE, or one node's, or one rank of every node's), block b of each puts its share
// [lo, hi) of the row meant for team member q (row q of a per-destination input, pitch > 0; else its
// one row) into q's inbox, slot `my team index`, with a signal on q's flag (b, me); once every
// member's signal is in, it reduces (Reduce) or copies the same share of its own inbox's slots into
// dst. The closing barrier keeps a member's next call out of the inbox until then. T is the element
// type when reducing, bytes (16-byte units) when copying.
template <typename T, int N, bool Reduce>
__global__ void __launch_bounds__(kPushThreads) push_kernel(Args a) {
  const Team t = a.team;
  Session s = Session::resume(a.ws, t, a.mine, /*rma=*/true);
  const int me = nvshmem_my_pe(), my_index = t.index(me);
  const std::int64_t slot_bytes = (a.len * static_cast<std::int64_t>(sizeof(T)) + 15) / 16 * 16;
  char* inbox = a.ws.base + a.result_offset;
  const char* src = a.ws.base + a.mine.offset;
  std::int64_t lo, hi;
  block_range(a.len, Reduce ? N : 16, lo, hi);
  const std::int64_t from = lo * sizeof(T), bytes = (hi - lo) * sizeof(T);
  const std::uint64_t seq = ++s.seq;
  std::uint64_t* flag = &a.ws.slot(blockIdx.x, me)->flag;
  // No fence before these signals: our previous closing signal on the same flag may land after this one
  // and take the flag back, but a member still waiting for this one is then released by our closing
  // signal, which waits for nothing of theirs and is fenced after all of our data.
  for (int q = 0; q < t.size; ++q) {
    const int pe = t.pe(q);
    if (bytes > 0)
      nvshmemx_putmem_signal_block(inbox + my_index * slot_bytes + from, src + q * a.mine.pitch + from, bytes, flag,
                                   seq, NVSHMEM_SIGNAL_SET, pe);
    else if (threadIdx.x == 0)
      nvshmemx_signal_op(flag, seq, NVSHMEM_SIGNAL_SET, pe);
  }
  for (int member = threadIdx.x; member < t.size; member += blockDim.x) {
    const int pe = t.pe(member);
    wait_signal(&a.ws.slot(blockIdx.x, pe)->flag, seq, "a put", pe);
  }
  __syncthreads();
  if constexpr (Reduce) {
    // At most kMaxPeers rows per pass, so that their pointers stay in registers; after the first
    // pass the partial sum in dst is one of them (each thread rereads only what it wrote).
    T* dst = reinterpret_cast<T*>(a.dst);
    for (int done = 0; done < t.size;) {
      const int carried = done > 0, take = min(kMaxPeers - carried, t.size - done);
      const T* rows[kMaxPeers];
#pragma unroll
      for (int q = 0; q < kMaxPeers; ++q)
        rows[q] = q < carried ? dst
                  : q < carried + take ? reinterpret_cast<const T*>(inbox + (done + q - carried) * slot_bytes)
                                       : nullptr;
      sum_range<T, N>(rows, carried + take, dst, lo, hi);
      done += take;
    }
  } else {
    for (int q = 0; q < t.size; ++q) copy_bytes(inbox + q * slot_bytes, a.dst + q * a.dst_pitch, lo, hi);
  }
  s.close();
}

template <typename F>
void with_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32: return f(float{});
    case DType::kFloat16: return f(__half{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kFloat64: return f(double{});
  }
  SYMCOMM_CHECK(false, "unsupported dtype code " + std::to_string(static_cast<int>(dtype)));
}

// push: a remote-path kernel (any team of up to kMaxPes); else one that reads every PE directly.
Args make_args(const CollectiveCall& c, std::int64_t itemsize, bool push = false) {
  const int npes = nvshmem_n_pes(), most = push ? kMaxPes : kMaxPeers;
  SYMCOMM_CHECK(npes <= most, "at most " + std::to_string(most) + " PEs are supported" +
                                  (push ? "" : " where load/store reaches them (more take the remote path)") +
                                  ", got " + std::to_string(npes));
  SYMCOMM_CHECK(c.workspace != 0 && c.src != 0 && (c.dst != 0 || c.len == 0), "null pointer");
  SYMCOMM_CHECK(c.row >= 0 && c.row < npes, "row " + std::to_string(c.row) + " is out of range");
  SYMCOMM_CHECK(c.len >= 0 && c.len % itemsize == 0, "len must be a whole number of elements");
  if (c.vec16) {
    // The row length may be anything: vectors stop short of the end and a scalar tail finishes.
    const bool aligned = (c.src | c.dst | c.workspace) % 16 == 0 && c.src_pitch % 16 == 0 &&
                         c.dst_pitch % 16 == 0 && c.result_offset % 16 == 0;
    SYMCOMM_CHECK(aligned, "vec16 was requested for addresses or pitches that are not 16-byte multiples");
  }
  const Team team{c.team.first, c.team.stride, c.team.size == 0 ? npes : c.team.size};
  const int me = nvshmem_my_pe();
  SYMCOMM_CHECK(team.first >= 0 && team.stride >= 1 && team.size >= 1 && team.pe(team.size - 1) < npes &&
                    me >= team.first && (me - team.first) % team.stride == 0 && team.index(me) < team.size,
                "team (first " + std::to_string(team.first) + ", stride " + std::to_string(team.stride) + ", size " +
                    std::to_string(team.size) + ") is not a set of PEs that holds PE " + std::to_string(me));
  auto* ws = reinterpret_cast<char*>(c.workspace);
  return Args{Workspace{ws}, npes, Payload{static_cast<std::int64_t>(c.src - c.workspace), c.src_pitch}, c.row,
              c.len / itemsize, reinterpret_cast<char*>(c.dst), c.dst_pitch, c.result_offset, team};
}

// The N-wide kernel when the call allows 16-byte vectors, the scalar one otherwise.
void launch_typed(const CollectiveCall& c, std::int64_t itemsize, void (*vec)(Args), void (*scalar)(Args),
                  bool push = false) {
  const int threads = push ? kPushThreads : kThreads;
  launch(c.vec16 ? vec : scalar, grid_for(c.len, threads), threads, 0, c.stream, make_args(c, itemsize, push));
}

}  // namespace

void reduce(const CollectiveCall& c) {
  with_dtype(c.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_typed(c, sizeof(T), reduce_kernel<T, 16 / sizeof(T)>, reduce_kernel<T, 1>);
  });
}

void two_shot_all_reduce(const CollectiveCall& c) {
  SYMCOMM_CHECK(c.row == 0, "two-shot all-reduce reads row 0");
  with_dtype(c.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_typed(c, sizeof(T), two_shot_kernel<T, 16 / sizeof(T)>, two_shot_kernel<T, 1>);
  });
}

void gather(const CollectiveCall& c) {
  launch(gather_kernel, grid_for(c.len, kThreads), kThreads, 0, c.stream, make_args(c, 1));
}

void push_reduce(const CollectiveCall& c) {
  with_dtype(c.dtype, [&](auto tag) {
    using T = decltype(tag);
    launch_typed(c, sizeof(T), push_kernel<T, 16 / sizeof(T), true>, push_kernel<T, 1, true>, /*push=*/true);
  });
}

void push_gather(const CollectiveCall& c) {
  launch(push_kernel<unsigned char, 1, false>, grid_for(c.len, kPushThreads), kPushThreads, 0, c.stream,
         make_args(c, 1, /*push=*/true));
}

void load_collective_kernels() {
  for (DType dtype : {DType::kFloat32, DType::kFloat16, DType::kBFloat16, DType::kFloat64})
    with_dtype(dtype, [](auto tag) {
      using T = decltype(tag);
      load_kernel(reduce_kernel<T, 16 / sizeof(T)>);
      load_kernel(reduce_kernel<T, 1>);
      load_kernel(two_shot_kernel<T, 16 / sizeof(T)>);
      load_kernel(two_shot_kernel<T, 1>);
      load_kernel(push_kernel<T, 16 / sizeof(T), true>);
      load_kernel(push_kernel<T, 1, true>);
    });
  load_kernel(gather_kernel);
  load_kernel(push_kernel<unsigned char, 1, false>);
}

std::int64_t workspace_data_offset() { return static_cast<std::int64_t>(kDataOffset); }

std::vector<bool> reachable_peers(std::uintptr_t workspace) {
  std::vector<bool> out;
  for (int q = 0; q < nvshmem_n_pes(); ++q) out.push_back(nvshmem_ptr(reinterpret_cast<void*>(workspace), q) != nullptr);
  return out;
}

}  // namespace symcomm
