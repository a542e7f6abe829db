#pragma once
// Device-side waits on flags that peers set. Every wait has a deadline: a peer that never arrives
// (a crashed rank, ranks that disagree on the call sequence) must produce a message naming the
// waiting PE and what it waited for, not a silent hang of the whole job.
#include <cstdint>
#include <cstdio>

#include <nvshmem.h>

#include "core/memory.cuh"

namespace symcomm {

// Set from the host at init (SYMCOMM_TIMEOUT_S); lives in core/device_state.cu.
extern __device__ std::uint64_t g_wait_timeout_ns;

// Spins until *flag >= target; on timeout prints who waited for what and traps, which surfaces on
// the host as a CUDA error at the next synchronisation.
__device__ inline void wait_geq(const std::uint64_t* flag, std::uint64_t target, const char* what, int peer) {
  const std::uint64_t start = global_timer_ns();
  std::uint64_t seen;
  while ((seen = load_acquire_sys(flag)) < target) {
    if (global_timer_ns() - start > g_wait_timeout_ns) {
      printf("symcomm: PE %d timed out after %.1f s waiting for %s from PE %d (flag %llu, expected >= %llu)\n",
             nvshmem_my_pe(), g_wait_timeout_ns * 1e-9, what, peer, (unsigned long long)seen,
             (unsigned long long)target);
      __trap();
    }
  }
}

// Block-wide: what this PE issued so far lands before what it issues next to the same PE. NVSHMEM lands
// a PE's operations to one peer in any order unless a fence separates them, and the remote path sets one
// flag with successive values (a put's signal, then barriers' signals): a later value landing first would
// announce data still on its way, and the earlier one landing after it would take the flag back.
__device__ inline void fence_block() {
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_fence();
  __syncthreads();
}

// wait_geq on a flag that NVSHMEM's signal operations set (the remote path), then NVSHMEM's own wait on
// it, which returns at once: its consistency step, which proxy-based transports need before the SMs
// read what the signal announced (the NIC's writes may not be visible to them yet).
__device__ inline void wait_signal(std::uint64_t* flag, std::uint64_t target, const char* what, int peer) {
  wait_geq(flag, target, what, peer);
  nvshmem_signal_wait_until(flag, NVSHMEM_CMP_GE, target);
}

}  // namespace symcomm
