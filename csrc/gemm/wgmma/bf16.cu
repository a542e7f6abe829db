#include "gemm/wgmma/gemm_core.cuh"

namespace symcomm {
template <>
void run_gemm<GemmDType::kBFloat16>(const GemmCall& c, const GemmHooks& hooks) {
  run_typed<cutlass::bfloat16_t>(c, hooks);
}

template <>
void load_gemm_core<GemmDType::kBFloat16>() {
  load_typed<cutlass::bfloat16_t>();
}

template <>
int gemm_core_shared_bytes<GemmDType::kBFloat16>(bool b_k_major) {
  return shared_bytes_typed<cutlass::bfloat16_t>(b_k_major);
}
}  // namespace symcomm
