#pragma once
// The CPU emulation of the CUDA device, force-included (-include) before every source of the emulated
// build. The kernels in csrc/ compile unchanged as host C++: a launch runs each block on an OS thread
// of its own (so every block of every PE is resident at once), the block's CUDA threads are fibers
// that switch at __syncthreads() and at every flag load, and __shared__ variables are per block
// because they are thread_local to the block's OS thread. See docs/emulation.md.
#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static thread_local

namespace symcomm::emu {

uint3 thread_index();
uint3 block_index();
dim3 block_dim();
dim3 grid_dim();
void sync_block();
void sync_warp();
[[noreturn]] void trap();
// A flag load in a wait loop: the running thread lets the others of its block run.
void schedule(const void* flag);
// A data load: in chaos mode, sometimes a switch too.
void chaos_point();
// Traps on a load the GPU would refuse ("misaligned address").
void check_aligned(const void* p, std::size_t align);
std::uint64_t now_ns();
void fence();
int device_printf(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
// Queues `body`, the kernel at `entry`, on `stream` of the current PE as a grid of blocks of fibers.
void launch(const void* entry, dim3 grid, dim3 block, std::uintptr_t stream, std::function<void()> body);

}  // namespace symcomm::emu

#define threadIdx (::symcomm::emu::thread_index())
#define blockIdx (::symcomm::emu::block_index())
#define blockDim (::symcomm::emu::block_dim())
#define gridDim (::symcomm::emu::grid_dim())
#define __syncthreads() ::symcomm::emu::sync_block()
#define __syncwarp(...) ::symcomm::emu::sync_warp()
#define __trap() ::symcomm::emu::trap()
#define __threadfence_system() ::symcomm::emu::fence()
#define __threadfence() ::symcomm::emu::fence()
// Device printf also records the message, so that a trap's error can repeat what the kernel said.
#define printf(...) ::symcomm::emu::device_printf(__VA_ARGS__)

// cuda_runtime.h offers these templates to nvcc only.
template <class T>
cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

template <class T>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* entry) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}

template <class T>
cudaError_t cudaMemcpyToSymbol(const T& symbol, const void* src, size_t count, size_t offset = 0,
                               cudaMemcpyKind kind = cudaMemcpyHostToDevice) {
  return ::cudaMemcpyToSymbol(static_cast<const void*>(&symbol), src, count, offset, kind);
}

template <typename T>
inline T __ldcg(const T* p) {
  ::symcomm::emu::check_aligned(p, alignof(T));
  ::symcomm::emu::chaos_point();
  return *p;
}

using std::max;
using std::min;
