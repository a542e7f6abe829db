#pragma once
// The emulated device's own controls, beyond what CUDA and NVSHMEM offer: bound into the emulated
// extension as symcomm's `_emu.emu` (csrc/emu/bindings.cpp).
#include <cstddef>
#include <cstdint>
#include <functional>

namespace symcomm::emu {

enum class GemmOrder : int { kRaster = 0, kShuffled = 1, kReversed = 2 };

struct Settings {
  int threads = 0;               // cap on threads per block (0: as launched); kernels size loops by blockDim
  std::uint64_t chaos_seed = 0;  // seeds the chaos switches and the shuffled tile order
  double chaos_rate = 0;         // probability that a data load switches threads (0: never)
  GemmOrder gemm_order = GemmOrder::kShuffled;  // the order in which the emulated GEMM computes tiles
};

// A stream position: done once `stream` has finished its first `count` tasks.
struct Event {
  std::uintptr_t stream;
  std::uint64_t count;
};

// PEs 0..npes-1, each with a zeroed symmetric heap of heap_bytes and a default stream (handle 0).
void start(int npes, std::size_t heap_bytes);
// Lets every stream finish, then frees the heaps.
void stop();
void configure(const Settings& s);
const Settings& settings();
// The PE whose calls this host thread makes from now on.
void set_pe(int pe);
std::uintptr_t heap(int pe);
std::size_t heap_bytes();
std::uintptr_t stream_create();
Event event_record(std::uintptr_t stream);
void stream_wait_event(std::uintptr_t stream, Event e);
// cudaMemcpyAsync: the copy runs on the stream, in order with its kernels.
void memcpy_async(std::uintptr_t dst, std::uintptr_t src, std::size_t bytes, std::uintptr_t stream);

}  // namespace symcomm::emu
