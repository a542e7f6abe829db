#pragma once
// The part of NVSHMEM's API that symcomm uses, over the emulated PEs of csrc/emu/runtime.cpp: each
// PE has a symmetric heap of the same size, and nvshmem_ptr maps an address of the caller's heap to
// the same offset in the peer's.
#include <non_abi/nvshmem_version.h>

#include <cstddef>
#include <cstdint>

enum {
  NVSHMEM_STATUS_NOT_INITIALIZED = 0,
  NVSHMEM_STATUS_IS_BOOTSTRAPPED,
  NVSHMEM_STATUS_IS_INITIALIZED,
  NVSHMEM_STATUS_LIMITED_MPG,
  NVSHMEM_STATUS_FULL_MPG,
};
enum { NVSHMEM_THREAD_SINGLE = 0, NVSHMEM_THREAD_FUNNELED, NVSHMEM_THREAD_SERIALIZED, NVSHMEM_THREAD_MULTIPLE };
enum { NVSHMEM_SIGNAL_SET = 9, NVSHMEM_SIGNAL_ADD = 10 };
enum { NVSHMEM_CMP_EQ = 0, NVSHMEM_CMP_NE, NVSHMEM_CMP_GT, NVSHMEM_CMP_LE, NVSHMEM_CMP_LT, NVSHMEM_CMP_GE };

struct nvshmemi_version_t {
  int major, minor, patch;
};
struct nvshmemx_init_attr_t;

int nvshmem_my_pe();
int nvshmem_n_pes();
// Fails loudly (a trap in a kernel, an exception on the host) for an address outside the caller's
// heap or a PE out of range, where NVSHMEM would return null and the caller would crash later.
void* nvshmem_ptr(const void* ptr, int pe);
void nvshmem_barrier_all();
// Puts, gets and signals land later, in an order NVSHMEM allows (csrc/emu/rma.h): a fence keeps the order
// of what the caller issued to each PE, a quiet lands everything it issued.
void nvshmem_fence();
void nvshmem_quiet();
// Waits until *sig_addr >= cmp_value (NVSHMEM_CMP_GE only), then takes NVSHMEM's consistency step: the put
// data that landed here is visible to this PE's threads.
std::uint64_t nvshmem_signal_wait_until(std::uint64_t* sig_addr, int cmp, std::uint64_t cmp_value);
