#include "core/device_state.h"

#include <nvshmem.h>
#include <nvshmemx.h>

#include <cstdint>

#include "core/check.h"
#include "core/limits.h"

namespace symcomm {

__device__ std::uint64_t g_wait_timeout_ns = 30ull * 1000 * 1000 * 1000;

namespace {
bool g_ready = false;
int g_max_blocks = 32;
std::uint64_t g_host_timeout_ns = 30ull * 1000 * 1000 * 1000;
}  // namespace

void set_max_blocks(int n) {
  SYMCOMM_CHECK(n >= 1 && n <= kMaxBlocks, "max blocks must be in [1, " + std::to_string(kMaxBlocks) + "]");
  g_max_blocks = n;
}

int max_blocks() { return g_max_blocks; }

void init_device_state(double wait_timeout_s) {
  SYMCOMM_CHECK(!g_ready, "NVSHMEM device state is already registered");
  SYMCOMM_CHECK(nvshmemx_init_status() >= NVSHMEM_STATUS_IS_INITIALIZED,
                "the NVSHMEM host library is not initialised (call nvshmem.core.init first)");
  SYMCOMM_CHECK(wait_timeout_s > 0, "wait timeout must be positive");
  // nvshmem_init() would do this too, but it calls exit(-1) on failure; we want an exception.
  int provided = 0;
  const nvshmemi_version_t ours = {NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                   NVSHMEM_VENDOR_PATCH_VERSION};
  const int status = nvshmemi_init_thread(NVSHMEM_THREAD_SERIALIZED, &provided, 0, nullptr, ours);
  SYMCOMM_CHECK(status == 0, "registering the NVSHMEM device state failed with status " +
                                 std::to_string(status) +
                                 " (is the host library older than the device library we were built with, " +
                                 std::to_string(NVSHMEM_VENDOR_MAJOR_VERSION) + "." +
                                 std::to_string(NVSHMEM_VENDOR_MINOR_VERSION) + "?)");
  const std::uint64_t ns = static_cast<std::uint64_t>(wait_timeout_s * 1e9);
  SYMCOMM_CUDA_CHECK(cudaMemcpyToSymbol(g_wait_timeout_ns, &ns, sizeof(ns)));
  g_host_timeout_ns = ns;
  g_ready = true;
}

void finalize_device_state() {
  if (!g_ready) return;
  nvshmemi_finalize();
  g_ready = false;
}

bool device_state_ready() { return g_ready; }

std::uint64_t wait_timeout_ns() { return g_host_timeout_ns; }

int init_status() { return nvshmemx_init_status(); }

int my_pe() { return nvshmem_my_pe(); }

int n_pes() { return nvshmem_n_pes(); }

}  // namespace symcomm
