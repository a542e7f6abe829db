// The Python face of the C++ core: raw device pointers, sizes and stream handles as integers.
// Argument validation happens in python/symcomm/ops.py before anything here is called.
#include <cuda_runtime_api.h>
#include <non_abi/nvshmem_version.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "collectives/collectives.h"
#include "core/device_state.h"
#include "core/sanity.h"
#include "gemm/gemm.h"
#include "gemm/wgmma/wgmma.h"
#include "moe/moe.h"

#ifndef SYMCOMM_CUDA_ARCHS
#define SYMCOMM_CUDA_ARCHS "unknown"
#endif
// The emulated build (csrc/emu/) is the module _emu, with the emulation's controls beside the kernels.
#ifdef SYMCOMM_EMU
#define SYMCOMM_MODULE _emu
namespace symcomm::emu {
void bind(pybind11::module_& m);
}
#else
#define SYMCOMM_MODULE _C
#endif

namespace py = pybind11;

namespace {

// One signature for the three collective entry points: plain integers keep the per-call cost low.
template <void (*Fn)(const symcomm::CollectiveCall&)>
void call(std::uintptr_t workspace, std::uintptr_t src, std::int64_t src_pitch, int row, std::int64_t len,
          std::uintptr_t dst, std::int64_t dst_pitch, std::int64_t result_offset, int dtype, bool vec16,
          std::uintptr_t stream) {
  Fn({workspace, src, src_pitch, row, len, dst, dst_pitch, result_offset, static_cast<symcomm::DType>(dtype),
      vec16, stream});
}

// The push kernels' entry points: the same, then the team they run among (team_size 0: every PE).
template <void (*Fn)(const symcomm::CollectiveCall&)>
void push_call(std::uintptr_t workspace, std::uintptr_t src, std::int64_t src_pitch, int row, std::int64_t len,
               std::uintptr_t dst, std::int64_t dst_pitch, std::int64_t result_offset, int dtype, bool vec16,
               std::uintptr_t stream, int team_first, int team_stride, int team_size) {
  Fn({workspace, src, src_pitch, row, len, dst, dst_pitch, result_offset, static_cast<symcomm::DType>(dtype),
      vec16, stream, {team_first, team_stride, team_size}});
}

}  // namespace

PYBIND11_MODULE(SYMCOMM_MODULE, m) {
  m.doc() = "symcomm CUDA/NVSHMEM kernels (pointer-level API; use symcomm.* instead)";

  m.def("init_device_state", &symcomm::init_device_state, py::arg("wait_timeout_s"));
  // At init: under lazy loading (CUDA's default) a kernel's first launch may wait for the kernels
  // already running, and ours wait for each other (core/launch.cuh, load_kernel). The fused GEMM's core
  // only where it has machine code (sm_90a).
  m.def(
      "load_kernels",
      [](bool gemm_core) {
        symcomm::load_collective_kernels();
        symcomm::load_moe_kernels();
        symcomm::load_gemm_kernels(gemm_core);
        symcomm::load_sanity_kernels();
      },
      py::arg("gemm_core") = true);
  m.def("finalize_device_state", &symcomm::finalize_device_state);
  m.def("device_state_ready", &symcomm::device_state_ready);
  m.def("init_status", &symcomm::init_status);
  m.def("my_pe", &symcomm::my_pe);
  m.def("n_pes", &symcomm::n_pes);

  m.def("ring_put_signal", &symcomm::ring_put_signal, py::arg("dst"), py::arg("src"), py::arg("bytes"),
        py::arg("signal"), py::arg("epoch"), py::arg("stream"));
  m.def("peer_load", &symcomm::peer_load, py::arg("out"), py::arg("symmetric"), py::arg("bytes"), py::arg("pe"),
        py::arg("found"), py::arg("stream"));
  m.def("barrier_all", &symcomm::barrier_all, py::arg("stream"));
  m.def("wait_flag", &symcomm::wait_flag, py::arg("flag"), py::arg("target"), py::arg("stream"));

  const char* collective_doc =
      "(workspace, src, src_pitch, row, len, dst, dst_pitch, result_offset, dtype, vec16, stream); sizes in bytes";
  m.def("reduce", &call<symcomm::reduce>, collective_doc);
  m.def("gather", &call<symcomm::gather>, collective_doc);
  m.def("two_shot_all_reduce", &call<symcomm::two_shot_all_reduce>, collective_doc);
  const char* push_doc = "(workspace, src, src_pitch, row, len, dst, dst_pitch, inbox_offset, dtype, vec16, stream, "
                         "team_first, team_stride, team_size); sizes in bytes, team_size 0 = every PE";
  m.def("push_reduce", &push_call<symcomm::push_reduce>, push_doc);
  m.def("push_gather", &push_call<symcomm::push_gather>, push_doc);
  m.def("set_max_blocks", &symcomm::set_max_blocks, py::arg("n"));
  m.attr("max_blocks") = symcomm::kMaxBlocks;
  m.attr("max_peers") = symcomm::kMaxPeers;
  m.attr("max_pes") = symcomm::kMaxPes;
  m.attr("max_experts") = symcomm::kMaxExperts;
  m.attr("max_top_k") = symcomm::kMaxTopK;
  m.def(
      "moe_dispatch",
      [](std::uintptr_t workspace, std::uintptr_t x, std::uintptr_t topk_ids, std::uintptr_t positions,
         std::uintptr_t counts, std::uintptr_t expert_x, std::uintptr_t expert_counts, std::uintptr_t routing,
         int tokens, int top_k, int num_experts, int capacity, int hidden, int dtype, std::int64_t grid_bytes,
         std::uintptr_t stream, bool rma, int per_node, std::uintptr_t node_pos, std::uintptr_t node_tokens,
         std::int64_t data_bytes) {
        symcomm::moe_dispatch({workspace, x, topk_ids, positions, counts, expert_x, expert_counts, routing, 0, 0,
                               tokens, top_k, num_experts, capacity, hidden, dtype, grid_bytes, stream, rma, per_node,
                               node_pos, node_tokens, data_bytes});
      },
      "(workspace, x, topk_ids, positions, counts, expert_x, expert_counts, routing, tokens, top_k, num_experts, "
      "capacity, hidden, dtype, grid_bytes, stream, rma, per_node, node_pos, node_tokens, data_bytes); with rma "
      "and no per_node x must be symmetric");
  m.def(
      "moe_combine",
      [](std::uintptr_t workspace, std::uintptr_t expert_y, std::uintptr_t routing, std::uintptr_t weights,
         std::uintptr_t y, int tokens, int top_k, int num_experts, int capacity, int hidden, int dtype,
         std::int64_t grid_bytes, std::uintptr_t stream, bool rma, int per_node, std::uintptr_t node_pos,
         std::uintptr_t node_tokens, std::int64_t data_bytes) {
        symcomm::moe_combine({workspace, 0, 0, 0, 0, expert_y, 0, routing, weights, y, tokens, top_k, num_experts,
                              capacity, hidden, dtype, grid_bytes, stream, rma, per_node, node_pos, node_tokens,
                              data_bytes});
      },
      "(workspace, expert_y, routing, weights, y, tokens, top_k, num_experts, capacity, hidden, dtype, grid_bytes, "
      "stream, rma, per_node, node_pos, node_tokens, data_bytes); with rma and no per_node the workspace's data "
      "area holds tokens x top_k rows");
  m.def(
      "moe_slots",
      [](std::int64_t data_bytes, int nodes, int top_k, std::int64_t row_bytes, bool combine) {
        return symcomm::moe_slots(data_bytes, nodes, top_k, row_bytes, combine);
      },
      "tokens per rank that the hierarchical path's records (and combine's partial sums) fit in a data area");
  m.def("workspace_data_offset", &symcomm::workspace_data_offset);
  m.def("reachable_peers", &symcomm::reachable_peers, py::arg("workspace"),
        "for each PE, whether load/store reaches its copy of the workspace (nvshmem_ptr is not null)");

  m.def("gemm_begin", &symcomm::gemm_begin, py::arg("workspace"), py::arg("stream"));
  m.def(
      "gemm",
      [](std::uintptr_t workspace, int m, int n, int k, int batches, std::uintptr_t a, std::int64_t lda,
         std::int64_t a_batch, std::uintptr_t b, std::int64_t ldb, bool b_k_major, std::uintptr_t d, std::int64_t ldd,
         std::int64_t d_batch, std::uintptr_t bias, int dtype, bool tag_tiles, bool wait_bands, bool raster_along_m,
         int sms, std::uintptr_t stream) {
        symcomm::gemm({workspace, m, n, k, batches, a, lda, a_batch, b, ldb, b_k_major, d, ldd, d_batch, bias,
                       static_cast<symcomm::GemmDType>(dtype), tag_tiles, wait_bands, raster_along_m, sms, stream});
      },
      "(workspace, m, n, k, batches, a, lda, a_batch, b, ldb, b_k_major, d, ldd, d_batch, bias, dtype, tag_tiles, "
      "wait_bands, raster_along_m, sms, stream); sizes in elements");
  m.def(
      "gemm_comm",
      [](std::uintptr_t workspace, int mode, int m, int n, int k, std::int64_t partial_offset,
         std::int64_t result_offset, std::uintptr_t src, std::int64_t src_pitch, std::uintptr_t dst,
         std::int64_t dst_pitch, int dtype, int blocks, std::uintptr_t stream) {
        symcomm::gemm_comm({workspace, static_cast<symcomm::GemmComm>(mode), m, n, k, partial_offset, result_offset,
                            src, src_pitch, dst, dst_pitch, static_cast<symcomm::GemmDType>(dtype), blocks, stream});
      },
      "(workspace, mode, m, n, k, partial_offset, result_offset, src, src_pitch, dst, dst_pitch, dtype, blocks, "
      "stream); mode 0 all-reduce, 1 reduce-scatter, 2 all-gather; offsets in bytes, pitches in elements");
  m.attr("gemm_tile_m") = symcomm::kTileM;
  m.attr("gemm_tile_n") = symcomm::kTileN;
  m.attr("max_gemm_tiles") = symcomm::kMaxGemmTiles;
#ifndef SYMCOMM_EMU
  // For the kernel resource table (tests/device_code.py): shared memory the cubin does not record.
  m.def(
      "gemm_core_shared_bytes",
      [](int dtype, bool b_k_major) {
        return static_cast<symcomm::GemmDType>(dtype) == symcomm::GemmDType::kFloat16
                   ? symcomm::gemm_core_shared_bytes<symcomm::GemmDType::kFloat16>(b_k_major)
                   : symcomm::gemm_core_shared_bytes<symcomm::GemmDType::kBFloat16>(b_k_major);
      },
      py::arg("dtype"), py::arg("b_k_major"),
      "the dynamic shared memory the fused GEMM's core is launched with (dtype 1 float16, 2 bfloat16)");
#endif

  m.attr("nvshmem_version") = py::make_tuple(NVSHMEM_VENDOR_MAJOR_VERSION, NVSHMEM_VENDOR_MINOR_VERSION,
                                               NVSHMEM_VENDOR_PATCH_VERSION);
  m.attr("cuda_version") = CUDART_VERSION;
  m.attr("cuda_archs") = SYMCOMM_CUDA_ARCHS;
#ifdef SYMCOMM_EMU
  symcomm::emu::bind(m);
#endif
}
