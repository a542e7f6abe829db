#pragma once
// The emulated device's own controls, beyond what CUDA and NVSHMEM offer: bound into the emulated
// extension as symcomm's `_emu.emu` (csrc/emu/bindings.cpp).
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>

namespace symcomm::emu {

enum class GemmOrder : int { kRaster = 0, kShuffled = 1, kReversed = 2 };

struct Settings {
  // Cap on threads per block (0: as launched); kernels size loops by blockDim. Below 32 it splits
  // warps: only for kernels with no warp-wide work (warp-wide calls fail).
  int threads = 0;
  std::uint64_t chaos_seed = 0;  // seeds the chaos switches and the shuffled tile order
  double chaos_rate = 0;         // probability that a data load switches threads (0: never)
  GemmOrder gemm_order = GemmOrder::kShuffled;  // the order in which the emulated GEMM computes tiles
  // PEs per emulated node, nodes in PE order (0: one node). As NVSHMEM without a path between two
  // GPUs, nvshmem_ptr is null for a PE on another node: only puts and signals reach it.
  int pes_per_node = 0;
};

// A stream position: done once `stream` has finished its first `count` tasks.
struct Event {
  std::uintptr_t stream;
  std::uint64_t count;
};

// PEs 0..npes-1 in this process, each with a zeroed symmetric heap of heap_bytes and a default stream
// (handle 0).
void start(int npes, std::size_t heap_bytes);
// PE `pe` of `npes` in this process, the others in other processes that make the same call with the
// same job name (docs/emulation.md, "One PE per process"). Its heap is the shared memory segment
// /symcomm-emu-<job>-<pe>; each PE maps every other's (waiting up to timeout_s for it), all meet, and
// the names are removed. Only this PE has streams, and it is the current PE of every thread.
void start_process(int pe, int npes, std::size_t heap_bytes, const std::string& job, double timeout_s);
// Lets this process's streams finish, then unmaps the heaps.
void stop();
void configure(const Settings& s);
const Settings& settings();
// The PE whose calls this host thread makes from now on; after start_process, only the local PE.
void set_pe(int pe);
// The PE this process hosts after start_process; -1 after start, or when not started.
int local_pe();
// Where PE pe's heap is mapped in this process.
std::uintptr_t heap(int pe);
std::size_t heap_bytes();
std::uintptr_t stream_create();
Event event_record(std::uintptr_t stream);
void stream_wait_event(std::uintptr_t stream, Event e);
// cudaMemcpyAsync: the copy runs on the stream, in order with its kernels.
void memcpy_async(std::uintptr_t dst, std::uintptr_t src, std::size_t bytes, std::uintptr_t stream);

}  // namespace symcomm::emu
