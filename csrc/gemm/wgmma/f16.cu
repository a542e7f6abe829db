#include "gemm/wgmma/gemm_core.cuh"

namespace symcomm {
template <>
void run_gemm<GemmDType::kFloat16>(const GemmCall& c, const GemmHooks& hooks) {
  run_typed<cutlass::half_t>(c, hooks);
}

template <>
void load_gemm_core<GemmDType::kFloat16>() {
  load_typed<cutlass::half_t>();
}

template <>
int gemm_core_shared_bytes<GemmDType::kFloat16>(bool b_k_major) {
  return shared_bytes_typed<cutlass::half_t>(b_k_major);
}
}  // namespace symcomm
