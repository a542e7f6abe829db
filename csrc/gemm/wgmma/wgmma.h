#pragma once
// The GEMM core of the fused ops: CUTLASS's Hopper warp-specialized GEMM with two hooks. It is
// compiled without relocatable device code (with it, ptxas ignores setmaxnreg, which costs the
// warp-specialized kernel its register split), so it knows nothing of NVSHMEM or the workspace:
// its hooks are plain pointers.
#include <cstdint>

#include "gemm/gemm.h"

namespace symcomm {

struct GemmHooks {
  std::uint64_t* tile_tags;         // tag tile t here once it is stored (null: no tags)
  const std::uint64_t* band_tags;   // wait here before loading a band of A rows (null: no waits)
  const std::uint64_t* epoch;       // the current call's tag
  std::uint64_t timeout_ns;         // how long to wait for a band before trapping
};

// Defined for kFloat16 and kBFloat16, one translation unit each so that they compile in parallel.
template <GemmDType D>
void run_gemm(const GemmCall& c, const GemmHooks& hooks);
// Loads the kernels that run_gemm<D> launches.
template <GemmDType D>
void load_gemm_core();
// The dynamic shared memory run_gemm<D> launches its kernel with (B stored [n, k] or [k, n]).
template <GemmDType D>
int gemm_core_shared_bytes(bool b_k_major);

}  // namespace symcomm
