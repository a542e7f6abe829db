#pragma once
// Pointers and streams cross the binding as integers so that this library never links libtorch.
#include <cstddef>
#include <cstdint>

namespace symcomm {

// Each PE puts `bytes` of src into dst on its right neighbour, signals it, and waits for the
// left neighbour's signal to reach `epoch`.
void ring_put_signal(std::uintptr_t dst, std::uintptr_t src, std::size_t bytes, std::uintptr_t signal,
                     std::uint64_t epoch, std::uintptr_t stream);
// Copies `bytes` of PE `pe`'s copy of a symmetric buffer through its peer pointer; *found = 0 (and
// nothing copied) when the peer is not load/store reachable.
void peer_load(std::uintptr_t out, std::uintptr_t symmetric, std::size_t bytes, int pe, std::uintptr_t found,
               std::uintptr_t stream);
void barrier_all(std::uintptr_t stream);
// Waits on the device until *flag >= target, under the device wait timeout.
void wait_flag(std::uintptr_t flag, std::uint64_t target, std::uintptr_t stream);
// Loads every kernel above (at init: see load_kernel in core/launch.cuh).
void load_sanity_kernels();

}  // namespace symcomm
