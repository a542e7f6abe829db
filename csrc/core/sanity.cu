// Bring-up kernels: the smallest uses of each NVSHMEM mechanism the real kernels rely on (signalled
// puts, peer pointers, device barriers, timed waits), so a broken install fails here first and
// plainly.
#include "core/sanity.h"

#include <nvshmem.h>
#include <nvshmemx.h>

#include "core/launch.cuh"
#include "core/wait.cuh"

namespace symcomm {
namespace {

struct RingPutArgs {
  void* dst;                // symmetric: receives the left neighbour's src
  const void* src;          // any device memory
  std::size_t bytes;
  std::uint64_t* signal;    // symmetric: set to `epoch` on the right neighbour when its data landed
  std::uint64_t epoch;
};

__global__ void ring_put_signal_kernel(RingPutArgs a) {
  const int me = nvshmem_my_pe();
  const int n = nvshmem_n_pes();
  const int right = (me + 1) % n;
  const int left = (me + n - 1) % n;
  // The signal is delivered after the data, so a receiver that sees `epoch` sees the whole message; the
  // fence keeps the previous call's signal from landing after this one's and taking the flag back (no
  // later signal would release the receiver).
  fence_block();
  nvshmemx_putmem_signal_block(a.dst, a.src, a.bytes, a.signal, a.epoch, NVSHMEM_SIGNAL_SET, right);
  if (threadIdx.x == 0) wait_signal(a.signal, a.epoch, "ring put signal", left);
}

struct PeerLoadArgs {
  void* out;
  const void* symmetric;
  std::size_t bytes;
  int pe;
  int* found;  // 1 if the peer is reachable by load/store, else 0 and nothing is copied
};

__global__ void peer_load_kernel(PeerLoadArgs a) {
  auto* peer = static_cast<const unsigned char*>(nvshmem_ptr(a.symmetric, a.pe));
  if (blockIdx.x == 0 && threadIdx.x == 0) *a.found = peer != nullptr;
  if (peer == nullptr) return;
  auto* out = static_cast<unsigned char*>(a.out);
  for (std::size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < a.bytes; i += gridDim.x * blockDim.x)
    out[i] = peer[i];
}

struct BarrierArgs {
  int unused;
};

__global__ void barrier_all_kernel(BarrierArgs) { nvshmem_barrier_all(); }

struct WaitArgs {
  const std::uint64_t* flag;
  std::uint64_t target;
};

__global__ void wait_kernel(WaitArgs a) { wait_geq(a.flag, a.target, "sanity wait", -1); }

}  // namespace

void load_sanity_kernels() {
  load_kernel(ring_put_signal_kernel);
  load_kernel(peer_load_kernel);
  load_kernel(barrier_all_kernel);
  load_kernel(wait_kernel);
}

void ring_put_signal(std::uintptr_t dst, std::uintptr_t src, std::size_t bytes, std::uintptr_t signal,
                     std::uint64_t epoch, std::uintptr_t stream) {
  SYMCOMM_CHECK(epoch > 0, "epoch must be positive (signals start at 0)");
  launch(ring_put_signal_kernel, 1, 256, 0, stream,
         RingPutArgs{reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), bytes,
                     reinterpret_cast<std::uint64_t*>(signal), epoch});
}

void peer_load(std::uintptr_t out, std::uintptr_t symmetric, std::size_t bytes, int pe, std::uintptr_t found,
               std::uintptr_t stream) {
  SYMCOMM_CHECK(pe >= 0 && pe < nvshmem_n_pes(), "pe " + std::to_string(pe) + " is out of range");
  launch(peer_load_kernel, 32, 256, 0, stream,
         PeerLoadArgs{reinterpret_cast<void*>(out), reinterpret_cast<const void*>(symmetric), bytes, pe,
                      reinterpret_cast<int*>(found)});
}

void barrier_all(std::uintptr_t stream) { launch(barrier_all_kernel, 1, 1, 0, stream, BarrierArgs{}); }

void wait_flag(std::uintptr_t flag, std::uint64_t target, std::uintptr_t stream) {
  launch(wait_kernel, 1, 1, 0, stream, WaitArgs{reinterpret_cast<const std::uint64_t*>(flag), target});
}

}  // namespace symcomm
