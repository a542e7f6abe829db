// The emulated device's controls, as the `emu` submodule of the emulated extension.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>

#include "core/check.h"
#include "emu/rma.h"
#include "emu/runtime.h"

namespace py = pybind11;

namespace symcomm::emu {

void bind(py::module_& parent) {
  py::module_ m = parent.def_submodule("emu", "the CPU emulation of the device (csrc/emu/)");
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("start", &start, py::arg("npes"), py::arg("heap_bytes"), release());
  m.def("start_process", &start_process, py::arg("pe"), py::arg("npes"), py::arg("heap_bytes"), py::arg("job"),
        py::arg("timeout_s"), release(),
        "this process hosts PE pe of npes, the others are processes started with the same job name");
  m.def("stop", &stop, release());
  m.def(
      "configure",
      [](int threads, std::uint64_t chaos_seed, double chaos_rate, int gemm_order, int pes_per_node) {
        configure(Settings{threads, chaos_seed, chaos_rate, static_cast<GemmOrder>(gemm_order), pes_per_node});
      },
      py::arg("threads") = 0, py::arg("chaos_seed") = 0, py::arg("chaos_rate") = 0.0, py::arg("gemm_order") = 1,
      py::arg("pes_per_node") = 0,
      "gemm_order: 0 raster, 1 shuffled per PE, 2 last tile first; pes_per_node: 0 one node, else nodes of that "
      "many PEs, which load/store cannot reach across");
  m.def(
      "rma_stats",
      [] {
        const rma::Stats s = rma::stats();
        return py::dict(py::arg("landed") = s.landed, py::arg("bytes") = s.bytes, py::arg("overtakes") = s.overtakes);
      },
      "puts, gets and signals landed since start: operations, data bytes, and how many landed before an "
      "operation their PE issued earlier");
  m.def("set_pe", &set_pe, py::arg("pe"));
  m.def("local_pe", &local_pe, "the PE this process hosts after start_process, else -1");
  m.def("heap", &heap, py::arg("pe"));
  m.def("heap_bytes", &heap_bytes);
  m.def("stream_create", &stream_create);
  m.def(
      "event_record", [](std::uintptr_t stream) { const Event e = event_record(stream); return py::make_tuple(e.stream, e.count); },
      py::arg("stream"));
  m.def(
      "stream_wait_event",
      [](std::uintptr_t stream, std::uintptr_t other, std::uint64_t count) { stream_wait_event(stream, Event{other, count}); },
      py::arg("stream"), py::arg("event_stream"), py::arg("event_count"));
  m.def("memcpy_async", &memcpy_async, py::arg("dst"), py::arg("src"), py::arg("bytes"), py::arg("stream") = 0);
  m.def(
      "synchronize", [] { SYMCOMM_CUDA_CHECK(cudaDeviceSynchronize()); }, release(),
      "waits for every stream of the current PE; raises the PE's error, if any");
  m.def(
      "stream_synchronize",
      [](std::uintptr_t stream) { SYMCOMM_CUDA_CHECK(cudaStreamSynchronize(reinterpret_cast<cudaStream_t>(stream))); },
      py::arg("stream"), release(), "waits for one stream of the current PE; raises the PE's error, if any");
}

}  // namespace symcomm::emu
