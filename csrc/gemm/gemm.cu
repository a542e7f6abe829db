#include "gemm/gemm.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <nvshmem.h>

#include <algorithm>
#include <string>

#include "core/launch.cuh"
#include "core/memory.cuh"
#include "core/workspace.cuh"
#include "gemm/wgmma/wgmma.h"

namespace symcomm {
namespace {

constexpr int kCommThreads = 512;
constexpr int kVec = 8;  // 16-byte vectors of 16-bit elements; the host checks every size and pitch

struct CommArgs {
  Workspace ws;
  int npes;
  int me;
  GemmComm mode;
  int m, n, k;
  std::int64_t partial_offset;
  std::int64_t result_offset;
  const char* src;
  std::int64_t src_pitch;
  char* dst;
  std::int64_t dst_pitch;
};

template <typename T>
__device__ T* on_pe(T* local, int pe) {
  return static_cast<T*>(nvshmem_ptr(local, pe));
}

// Waits until every PE's copy of `flag` carries this call's tag (one thread per PE), after which the
// whole block may read what those PEs published under it.
__device__ void wait_all_pes(const std::uint64_t* flag, int npes, std::uint64_t tag, const char* what) {
  if (static_cast<int>(threadIdx.x) < npes) wait_geq(on_pe(flag, threadIdx.x), tag, what, threadIdx.x);
  __syncthreads();
}

__device__ void wait_pe(const std::uint64_t* flag, int pe, std::uint64_t tag, const char* what) {
  if (threadIdx.x == 0) wait_geq(on_pe(flag, pe), tag, what, pe);
  __syncthreads();
}

// Everything the block wrote becomes visible system-wide before the tag.
__device__ void publish(std::uint64_t* flag, std::uint64_t tag) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    store_release_sys(flag, tag);
  }
}

// out[row - out_row0][col] (and copy[row][col], if given) = sum over PEs of src[q][row][col], for
// rows [r0, r1) and the rect's columns; src rows are n elements apart. Sums in float32.
template <typename T>
__device__ void reduce_rect(const T* const* src, int npes, int n, int r0, int r1, const Rect& r, T* out,
                            std::int64_t out_pitch, int out_row0, T* copy) {
  using V = Vec<T, kVec>;
  const int width = (r.c1 - r.c0) / kVec;
  for (int i = threadIdx.x; i < (r1 - r0) * width; i += blockDim.x) {
    const int row = r0 + i / width, col = r.c0 + i % width * kVec;
    const std::int64_t at = static_cast<std::int64_t>(row) * n + col;
    V in[kMaxPeers];
#pragma unroll
    for (int q = 0; q < kMaxPeers; ++q)
      if (q < npes) in[q] = load_cg(reinterpret_cast<const V*>(src[q] + at));
    float acc[kVec] = {};
#pragma unroll
    for (int q = 0; q < kMaxPeers; ++q)
      if (q < npes) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) acc[e] += static_cast<float>(in[q].v[e]);
      }
    V sum;
#pragma unroll
    for (int e = 0; e < kVec; ++e) sum.v[e] = static_cast<T>(acc[e]);
    *reinterpret_cast<V*>(out + (row - out_row0) * out_pitch + col) = sum;
    if (copy != nullptr) *reinterpret_cast<V*>(copy + at) = sum;
  }
}

// dst[row][c] = src[row][c] for rows [r0, r1) and columns [c0, c1) (16-byte units).
template <typename T>
__device__ void copy_rect(const T* src, std::int64_t src_pitch, T* dst, std::int64_t dst_pitch, int r0, int r1,
                          int c0, int c1) {
  using V = Vec<T, kVec>;
  const int width = (c1 - c0) / kVec;
  for (int i = threadIdx.x; i < (r1 - r0) * width; i += blockDim.x) {
    const int row = r0 + i / width, col = c0 + i % width * kVec;
    *reinterpret_cast<V*>(dst + row * dst_pitch + col) =
        load_cg(reinterpret_cast<const V*>(src + row * src_pitch + col));
  }
}

// Two-shot by tile ownership: PE t % npes reduces tile t as soon as every PE has written it, and the
// other PEs copy the reduced tile from their owner. Reducers only ever wait for GEMMs and copiers
// only for reducers, so no two blocks can wait on each other; half of the blocks do each.
template <typename T>
__device__ void all_reduce_tiles(const CommArgs& a, std::uint64_t tag) {
  const T* partial[kMaxPeers];
  for (int q = 0; q < a.npes; ++q) partial[q] = on_pe(reinterpret_cast<const T*>(a.ws.base + a.partial_offset), q);
  T* result = reinterpret_cast<T*>(a.ws.base + a.result_offset);
  T* out = reinterpret_cast<T*>(a.dst);
  const int tiles = tiles_along(a.m, kTileM) * tiles_along(a.n, kTileN);
  const int reducers = gridDim.x / 2;
  if (static_cast<int>(blockIdx.x) < reducers) {
    for (int t = a.me + blockIdx.x * a.npes; t < tiles; t += reducers * a.npes) {
      wait_all_pes(a.ws.tile_ready() + t, a.npes, tag, "a GEMM tile");
      const Rect r = tile_rect(t, a.m, a.n);
      reduce_rect(partial, a.npes, a.n, r.r0, r.r1, r, out, a.dst_pitch, 0, result);
      publish(a.ws.tile_reduced() + t, tag);
    }
    return;
  }
  const int copier = blockIdx.x - reducers, copiers = gridDim.x - reducers;
  for (int t = 0, j = 0; t < tiles; ++t) {
    const int owner = t % a.npes;
    if (owner == a.me || j++ % copiers != copier) continue;
    wait_pe(a.ws.tile_reduced() + t, owner, tag, "a reduced tile");
    const Rect r = tile_rect(t, a.m, a.n);
    copy_rect(on_pe(result, owner), a.n, out, a.dst_pitch, r.r0, r.r1, r.c0, r.c1);
  }
}

// Each PE reduces the tiles that hold its rows, in the order the GEMMs produce them; a tile that
// straddles two PEs' rows is reduced by both, each for its own rows.
template <typename T>
__device__ void reduce_scatter_tiles(const CommArgs& a, std::uint64_t tag) {
  const T* partial[kMaxPeers];
  for (int q = 0; q < a.npes; ++q) partial[q] = on_pe(reinterpret_cast<const T*>(a.ws.base + a.partial_offset), q);
  const int rows = a.m / a.npes, lo = a.me * rows, hi = lo + rows;
  const int tiles_m = tiles_along(a.m, kTileM), tiles_n = tiles_along(a.n, kTileN);
  const int first = lo / kTileM, span = (hi - 1) / kTileM - first + 1;
  for (int j = blockIdx.x; j < span * tiles_n; j += gridDim.x) {
    const int t = tile_index(first + j % span, j / span, 0, tiles_m, tiles_n);
    wait_all_pes(a.ws.tile_ready() + t, a.npes, tag, "a GEMM tile");
    const Rect r = tile_rect(t, a.m, a.n);
    reduce_rect(partial, a.npes, a.n, max(r.r0, lo), min(r.r1, hi), r, reinterpret_cast<T*>(a.dst), a.dst_pitch, lo,
                static_cast<T*>(nullptr));
  }
}

// Fills this PE's gathered A ([npes][m][k]) band by band (kTileM rows of one PE), tagging each band
// for the GEMM: first our own rows (which peers then fetch), then the peers' in the order the GEMM
// consumes them. Copying our own bands never waits, so every PE's fetches eventually succeed.
template <typename T>
__device__ void all_gather_bands(const CommArgs& a, std::uint64_t tag) {
  T* gathered = reinterpret_cast<T*>(a.ws.base + a.partial_offset);
  const std::int64_t block_elems = static_cast<std::int64_t>(a.m) * a.k;
  const int tiles_m = tiles_along(a.m, kTileM);
  for (int i = blockIdx.x; i < tiles_m; i += gridDim.x) {
    copy_rect(reinterpret_cast<const T*>(a.src), a.src_pitch, gathered + a.me * block_elems, a.k, i * kTileM,
              min(a.m, (i + 1) * kTileM), 0, a.k);
    publish(a.ws.band_ready() + band_index(i, a.me, tiles_m), tag);
  }
  for (int l = 0, j = 0; l < a.npes; ++l) {
    if (l == a.me) continue;
    T* mine = gathered + l * block_elems;
    for (int i = 0; i < tiles_m; ++i) {
      if (j++ % gridDim.x != blockIdx.x) continue;
      std::uint64_t* band = a.ws.band_ready() + band_index(i, l, tiles_m);
      wait_pe(band, l, tag, "a band of A rows");
      copy_rect(on_pe(mine, l), a.k, mine, a.k, i * kTileM, min(a.m, (i + 1) * kTileM), 0, a.k);
      publish(band, tag);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kCommThreads) gemm_comm_kernel(CommArgs a) {
  Session session = Session::resume(a.ws, Team{0, 1, a.npes}, Payload{0, 0});
  __shared__ std::uint64_t shared_tag;
  if (threadIdx.x == 0) shared_tag = load_tag(a.ws.gemm_epoch());
  __syncthreads();
  const std::uint64_t tag = shared_tag;
  switch (a.mode) {
    case GemmComm::kAllReduce: all_reduce_tiles<T>(a, tag); break;
    case GemmComm::kReduceScatter: reduce_scatter_tiles<T>(a, tag); break;
    case GemmComm::kAllGather: all_gather_bands<T>(a, tag); break;
  }
  // Until every PE is here, a peer may still read our partial, result or gathered rows.
  session.close();
}

__global__ void gemm_begin_kernel(Workspace ws) { ++*ws.gemm_epoch(); }

int tiles(int m, int n) { return tiles_along(m, kTileM) * tiles_along(n, kTileN); }

void check_tiles(int count, const char* what) {
  SYMCOMM_CHECK(count <= kMaxGemmTiles, std::string(what) + ": " + std::to_string(count) + " exceed the limit of " +
                                            std::to_string(kMaxGemmTiles) + " per call");
}

}  // namespace

void load_gemm_kernels(bool core) {
  load_kernel(gemm_begin_kernel);
  load_kernel(gemm_comm_kernel<__nv_bfloat16>);
  load_kernel(gemm_comm_kernel<__half>);
  if (core) {
    load_gemm_core<GemmDType::kBFloat16>();
    load_gemm_core<GemmDType::kFloat16>();
  }
}

void gemm_begin(std::uintptr_t workspace, std::uintptr_t stream) {
  SYMCOMM_CHECK(workspace != 0, "null workspace");
  launch(gemm_begin_kernel, 1, 1, 0, stream, Workspace{reinterpret_cast<char*>(workspace)});
}

void gemm(const GemmCall& c) {
  SYMCOMM_CHECK(c.m >= 1 && c.n >= 1 && c.k >= 1 && c.batches >= 1, "GEMM sizes must be positive");
  SYMCOMM_CHECK(c.sms >= 1, "the GEMM needs at least one SM");
  // The GEMM core loads A and B through TMA descriptors and stores D in 16-byte vectors. What a
  // descriptor needs (a 16-byte aligned address, byte strides that are 16-byte multiples below 2^40)
  // CUTLASS only asserts, and NDEBUG removes its asserts (its can_implement checks the stride types,
  // not their values): a descriptor the driver refused would go unreported. Both dtypes are 16-bit,
  // so 16 bytes are 8 elements.
  SYMCOMM_CHECK(c.lda >= c.k && c.ldb >= (c.b_k_major ? c.k : c.n) && c.ldd >= c.n && c.a_batch >= 0 &&
                    c.d_batch >= 0,
                "the GEMM's leading dimensions must hold a row and its batch strides must not be negative");
  SYMCOMM_CHECK((c.a | c.b | c.d | c.bias) % 16 == 0 && (c.lda | c.ldb | c.ldd | c.a_batch | c.d_batch) % 8 == 0,
                "the GEMM needs 16-byte aligned A, B, D and bias, and leading dimensions and batch strides that "
                "are multiples of 8 elements (16 bytes)");
  constexpr std::int64_t kMaxStride = (std::int64_t{1} << 40) / 2;
  SYMCOMM_CHECK(c.lda < kMaxStride && c.ldb < kMaxStride && c.a_batch < kMaxStride,
                "the GEMM's strides of A and B must be below 2^40 bytes (a TMA descriptor's limit)");
  if (c.tag_tiles) check_tiles(tiles(c.m, c.n) * c.batches, "output tiles");
  if (c.wait_bands) check_tiles(tiles_along(c.m, kTileM) * c.batches, "bands of A rows");
  const Workspace ws{reinterpret_cast<char*>(c.workspace)};
  const GemmHooks hooks{c.tag_tiles ? ws.tile_ready() : nullptr, c.wait_bands ? ws.band_ready() : nullptr,
                        ws.gemm_epoch(), wait_timeout_ns()};
  switch (c.dtype) {
    case GemmDType::kBFloat16: return run_gemm<GemmDType::kBFloat16>(c, hooks);
    case GemmDType::kFloat16: return run_gemm<GemmDType::kFloat16>(c, hooks);
  }
  SYMCOMM_CHECK(false, "the fused GEMM supports float16 and bfloat16 only");
}

void gemm_comm(const GemmCommCall& c) {
  const int npes = nvshmem_n_pes();
  SYMCOMM_CHECK(npes <= kMaxPeers, "at most " + std::to_string(kMaxPeers) + " PEs are supported");
  SYMCOMM_CHECK(c.blocks >= 2 && c.blocks <= kMaxBlocks,
                "the comm kernel needs 2 to " + std::to_string(kMaxBlocks) + " blocks, got " + std::to_string(c.blocks));
  SYMCOMM_CHECK(c.workspace % 16 == 0 && c.partial_offset % 16 == 0 && c.result_offset % 16 == 0 &&
                    (c.src | c.dst) % 16 == 0 && (c.n | c.k | c.src_pitch | c.dst_pitch) % kVec == 0,
                "the comm kernel moves 16-byte vectors: addresses, n, k and pitches must be multiples of 16 bytes");
  if (c.mode == GemmComm::kAllGather)
    check_tiles(tiles_along(c.m, kTileM) * npes, "bands of A rows");
  else
    check_tiles(tiles(c.m, c.n), "output tiles");
  SYMCOMM_CHECK(c.mode != GemmComm::kReduceScatter || c.m % npes == 0, "reduce-scatter: m must divide by the PEs");
  const CommArgs args{Workspace{reinterpret_cast<char*>(c.workspace)},
                      npes,
                      nvshmem_my_pe(),
                      c.mode,
                      c.m,
                      c.n,
                      c.k,
                      c.partial_offset,
                      c.result_offset,
                      reinterpret_cast<const char*>(c.src),
                      c.src_pitch,
                      reinterpret_cast<char*>(c.dst),
                      c.dst_pitch};
  switch (c.dtype) {
    case GemmDType::kBFloat16: return launch(gemm_comm_kernel<__nv_bfloat16>, c.blocks, kCommThreads, 0, c.stream, args);
    case GemmDType::kFloat16: return launch(gemm_comm_kernel<__half>, c.blocks, kCommThreads, 0, c.stream, args);
  }
  SYMCOMM_CHECK(false, "the fused GEMM supports float16 and bfloat16 only");
}

}  // namespace symcomm
