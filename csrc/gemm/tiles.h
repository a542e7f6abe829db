#pragma once
// How the fused GEMM numbers its output tiles and its bands of A rows. The GEMM core's hooks, the
// comm kernel and the emulated GEMM (csrc/emu/) all use these, so that a tag one writes is the tag
// another waits for.
#include <cuda_runtime.h>

namespace symcomm {

// The GEMM's output tile; a band is the kTileM rows of A that one row of tiles reads.
constexpr int kTileM = 128;
constexpr int kTileN = 256;

__host__ __device__ constexpr int tiles_along(int extent, int tile) { return (extent + tile - 1) / tile; }

// Tile (mt, nt) of batch l, M fastest.
__host__ __device__ constexpr int tile_index(int mt, int nt, int l, int tiles_m, int tiles_n) {
  return (l * tiles_n + nt) * tiles_m + mt;
}

// Band mt (rows [mt * kTileM, ...)) of batch l.
__host__ __device__ constexpr int band_index(int mt, int l, int tiles_m) { return l * tiles_m + mt; }

// Rows [r0, r1) and columns [c0, c1) of tile t of an m x n output with one batch: the inverse of
// tile_index.
struct Rect {
  int r0, r1, c0, c1;
};

__host__ __device__ constexpr Rect tile_rect(int t, int m, int n) {
  const int tiles_m = tiles_along(m, kTileM);
  const int mt = t % tiles_m, nt = t / tiles_m;
  return {mt * kTileM, (mt + 1) * kTileM < m ? (mt + 1) * kTileM : m, nt * kTileN,
          (nt + 1) * kTileN < n ? (nt + 1) * kTileN : n};
}

}  // namespace symcomm
