#pragma once
// One launcher for every kernel: each kernel takes a single argument struct by value, so adding a
// field never changes a launch site, and every launch is checked the same way.
#include <cstdint>

#include "core/check.h"
#include "core/device_state.h"

namespace symcomm {

// Enough blocks to keep about 32 KB in flight per block, up to the cap. Depends only on `bytes`, so
// callers that pass a size every PE shares get the same grid on every PE.
inline int grid_for(std::int64_t bytes, int threads) {
  const std::int64_t per_block = static_cast<std::int64_t>(threads) * 16 * 4;
  const std::int64_t want = (bytes + per_block - 1) / per_block;
  return static_cast<int>(want < 1 ? 1 : want > max_blocks() ? max_blocks() : want);
}

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, size_t smem_bytes, std::uintptr_t stream,
            const Args& args) {
  if (smem_bytes > 48 * 1024) {
    SYMCOMM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem_bytes)));
  }
#ifdef SYMCOMM_EMU
  emu::launch(reinterpret_cast<const void*>(kernel), grid, block, stream, [kernel, args] { kernel(args); });
#else
  kernel<<<grid, block, smem_bytes, as_stream(stream)>>>(args);
#endif
  SYMCOMM_CUDA_CHECK(cudaGetLastError());
}

// Loads a kernel now instead of at its first launch. Under lazy loading (CUDA_MODULE_LOADING=LAZY, the
// default) a first launch may wait for the kernels already running on the device, and ours wait for
// each other: the fused GEMM's comm kernel spins on tiles of a GEMM queued beside it. So every kernel is
// loaded at init (load_kernels in bindings.cpp).
template <typename Args>
void load_kernel(void (*kernel)(Args)) {
  cudaFuncAttributes attributes;
  SYMCOMM_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
}

}  // namespace symcomm
