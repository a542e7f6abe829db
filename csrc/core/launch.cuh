#pragma once
// One launcher for every kernel: each kernel takes a single argument struct by value, so adding a
// field never changes a launch site, and every launch is checked the same way.
#include <cstdint>

#include "core/check.h"

namespace symcomm {

inline cudaStream_t as_stream(std::uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <typename Args>
void launch(void (*kernel)(Args), dim3 grid, dim3 block, size_t smem_bytes, std::uintptr_t stream,
            const Args& args) {
  if (smem_bytes > 48 * 1024) {
    SYMCOMM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                            static_cast<int>(smem_bytes)));
  }
  kernel<<<grid, block, smem_bytes, as_stream(stream)>>>(args);
  SYMCOMM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace symcomm
