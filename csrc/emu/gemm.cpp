// The emulated GEMM core: a CPU stand-in for CUTLASS's kernel (csrc/gemm/wgmma/) with the same hooks.
// Its blocks take the tiles in an order chosen by the emulation's settings (shuffled per PE, or last
// tile first), wait for each band of A rows and tag each finished tile with the numbering of
// gemm/tiles.h, so the comm kernel meets the same protocol it meets on the GPU.
#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <vector>

#include <nvshmem.h>

#include "core/launch.cuh"
#include "core/memory.cuh"
#include "emu/runtime.h"
#include "gemm/tiles.h"
#include "gemm/wgmma/wgmma.h"

namespace symcomm {
namespace {

constexpr int kThreads = 128;
constexpr int kBlocks = 4;  // a few persistent blocks, so that tiles wait their turn

struct StandinArgs {
  GemmCall c;
  GemmHooks hooks;
  const int* order;  // tile numbers in the order the blocks take them
};

template <typename T>
__global__ void standin_gemm_kernel(StandinArgs a) {
  const GemmCall& c = a.c;
  const int tiles_m = tiles_along(c.m, kTileM), tiles_n = tiles_along(c.n, kTileN);
  const int total = tiles_m * tiles_n * c.batches;
  const T* A = reinterpret_cast<const T*>(c.a);
  const T* B = reinterpret_cast<const T*>(c.b);
  const T* bias = reinterpret_cast<const T*>(c.bias);
  T* D = reinterpret_cast<T*>(c.d);
  for (int i = blockIdx.x; i < total; i += gridDim.x) {
    const int t = a.order[i];
    const int mt = t % tiles_m, nt = t / tiles_m % tiles_n, l = t / (tiles_m * tiles_n);
    const std::uint64_t tag = load_tag(a.hooks.epoch);
    if (a.hooks.band_tags != nullptr && threadIdx.x == 0) {
      const std::uint64_t* band = a.hooks.band_tags + band_index(mt, l, tiles_m);
      const std::uint64_t start = global_timer_ns();
      while (load_acquire_sys(band) < tag)
        if (global_timer_ns() - start > a.hooks.timeout_ns) __trap();
    }
    __syncthreads();
    const int r0 = mt * kTileM, r1 = min(c.m, r0 + kTileM), c0 = nt * kTileN, c1 = min(c.n, c0 + kTileN);
    for (int e = threadIdx.x; e < (r1 - r0) * (c1 - c0); e += blockDim.x) {
      const int row = r0 + e / (c1 - c0), col = c0 + e % (c1 - c0);
      float acc = 0;
      for (int k = 0; k < c.k; ++k) {
        const T b = c.b_k_major ? B[col * c.ldb + k] : B[static_cast<std::int64_t>(k) * c.ldb + col];
        acc += static_cast<float>(load_cg(A + l * c.a_batch + row * c.lda + k)) * static_cast<float>(b);
      }
      if (bias != nullptr) acc += static_cast<float>(bias[col]);
      D[l * c.d_batch + row * c.ldd + col] = static_cast<T>(acc);
    }
    if (a.hooks.tile_tags != nullptr) {
      __syncthreads();
      if (threadIdx.x == 0) {
        __threadfence_system();
        store_release_sys(a.hooks.tile_tags + tile_index(mt, nt, l, tiles_m, tiles_n), tag);
      }
    }
  }
}

template <typename T>
void run_standin(const GemmCall& c, const GemmHooks& hooks) {
  const int total = tiles_along(c.m, kTileM) * tiles_along(c.n, kTileN) * c.batches;
  // Owned by the launch's closure, so it lives as long as the queued kernel.
  auto order = std::make_shared<std::vector<int>>(total);
  std::iota(order->begin(), order->end(), 0);
  const emu::Settings& s = emu::settings();
  if (s.gemm_order == emu::GemmOrder::kReversed) std::reverse(order->begin(), order->end());
  if (s.gemm_order == emu::GemmOrder::kShuffled) {
    std::mt19937_64 rng(s.chaos_seed * 1000003 + static_cast<std::uint64_t>(nvshmem_my_pe()) * 7919 + total);
    std::shuffle(order->begin(), order->end(), rng);
  }
  const StandinArgs args{c, hooks, order->data()};
  emu::launch(reinterpret_cast<const void*>(&standin_gemm_kernel<T>), std::min({c.sms, total, kBlocks}), kThreads,
              c.stream, [args, order] { standin_gemm_kernel<T>(args); });
  SYMCOMM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

template <>
void run_gemm<GemmDType::kBFloat16>(const GemmCall& c, const GemmHooks& hooks) {
  run_standin<__nv_bfloat16>(c, hooks);
}

template <>
void run_gemm<GemmDType::kFloat16>(const GemmCall& c, const GemmHooks& hooks) {
  run_standin<__half>(c, hooks);
}

template <>
void load_gemm_core<GemmDType::kBFloat16>() {
  load_kernel(standin_gemm_kernel<__nv_bfloat16>);
}

template <>
void load_gemm_core<GemmDType::kFloat16>() {
  load_kernel(standin_gemm_kernel<__half>);
}

}  // namespace symcomm
