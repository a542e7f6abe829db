#pragma once
// Fused GEMM + communication. One call is two kernels that run at the same time on two streams:
//
//   gemm()       a persistent CUTLASS warp-specialized GEMM (Hopper wgmma) on all but `comm_blocks`
//                SMs. Its epilogue can tag each finished output tile in the workspace (tile_ready),
//                and its producer warp can wait, before loading a band of A rows, until that band
//                has arrived (band_ready).
//   gemm_comm()  the communication on the remaining SMs: it reduces tiles as soon as every PE has
//                tagged them, or fetches the bands of A the GEMM waits for.
//
// gemm_begin() first advances this PE's call counter; both kernels tag and expect that value, and
// counters only grow, so back-to-back calls and CUDA-graph replays never mistake an old tag for a
// new one. The comm kernel ends with a barrier of its blocks across PEs, after which nobody reads
// this call's buffers any more. The Python side (python/symcomm/gemm.py) orders the streams.
//
// Pointers, streams and the workspace are integers; sizes and pitches are in elements.
#include <cstdint>

#include "core/limits.h"
#include "gemm/tiles.h"

namespace symcomm {

enum class GemmDType : int { kFloat16 = 1, kBFloat16 = 2 };  // the collectives' dtype codes

struct GemmCall {
  std::uintptr_t workspace;  // this PE's symmetric workspace (flags and call counter)
  int m, n, k, batches;      // D[l] (m x n) = A[l] (m x k) @ B (k x n) for l < batches
  std::uintptr_t a;
  std::int64_t lda, a_batch;  // A is row-major: lda >= k
  std::uintptr_t b;
  std::int64_t ldb;
  bool b_k_major;             // B stored as [n, k] row-major (a transposed weight), else [k, n] row-major
  std::uintptr_t d;
  std::int64_t ldd, d_batch;
  std::uintptr_t bias;        // [n], added to every row of D (0: none)
  GemmDType dtype;            // of A, B, D and bias; accumulation is float32
  bool tag_tiles;             // tag tile t of D in tile_ready once it is written
  bool wait_bands;            // wait for band_ready before loading each band of A rows
  bool raster_along_m;        // tile order: M fastest (owners interleave) or N fastest (bands in order)
  int sms;                    // SMs for the persistent grid (the rest are left to the comm kernel)
  std::uintptr_t stream;
};

enum class GemmComm : int { kAllReduce = 0, kReduceScatter = 1, kAllGather = 2 };

struct GemmCommCall {
  std::uintptr_t workspace;
  GemmComm mode;
  // all-reduce, reduce-scatter: the GEMM's output is [m, n], tagged tile by tile.
  // all-gather: every PE contributes [m, k] rows (`k` columns); band (l, i) = rows [i*kTileM, ...) of PE l.
  int m, n, k;
  std::int64_t partial_offset;  // workspace bytes: the GEMM's [m, n] partial, or the gathered [npes, m, k] A
  std::int64_t result_offset;   // workspace bytes: all-reduce's reduced tiles, read by peers
  std::uintptr_t src;           // all-gather: this PE's rows
  std::int64_t src_pitch;
  std::uintptr_t dst;           // all-reduce: [m, n]; reduce-scatter: this PE's [m / npes, n]
  std::int64_t dst_pitch;
  GemmDType dtype;
  int blocks;                   // the same on every PE: block b meets block b of every PE at the end
  std::uintptr_t stream;
};

void gemm_begin(std::uintptr_t workspace, std::uintptr_t stream);
void gemm(const GemmCall& c);
void gemm_comm(const GemmCommCall& c);
// Loads every kernel above, the GEMM core's too if `core` (at init: see load_kernel in core/launch.cuh).
void load_gemm_kernels(bool core);

}  // namespace symcomm
