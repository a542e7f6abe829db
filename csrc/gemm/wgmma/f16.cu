#include "gemm/wgmma/gemm_core.cuh"

namespace symcomm {
template <>
void run_gemm<GemmDType::kFloat16>(const GemmCall& c, const GemmHooks& hooks) {
  run_typed<cutlass::half_t>(c, hooks);
}
}  // namespace symcomm
