#pragma once
// NVSHMEM's delivery order over the emulated PEs: puts, gets and signal operations land later (in one
// process, after a random delay of up to 2 ms), in an order that the chaos seed picks among those
// NVSHMEM allows, and no better (docs/emulation.md,
// "Delivery order"). The NVSHMEM calls of csrc/emu/runtime.cpp issue them; the scheduling points of
// the emulated threads, a worker, the issuer's quiet and the end of the device make them land.
#include <cstddef>
#include <cstdint>

namespace symcomm::emu::rma {

// Starts the network of a device of npes PEs. staged: landed put data is visible to the target's
// threads only after its consistency step (all PEs in this process; across processes it is not
// modelled).
void start(int npes, bool staged, std::uint64_t seed);
// Lands everything in flight, makes it visible, and stops the worker.
void stop();

// Issued by PE `from`. A put copies `bytes` from src (read when it lands, or now if `now`: a blocking
// put's source may be reused once it returns) to dst in PE `to`'s heap; it returns its group, which a
// signal can be put after. A get copies from PE `from_pe`'s src to the issuer's dst.
std::uint64_t put(int from, int to, char* dst, const char* src, std::size_t bytes, bool now);
void get(int from, int from_pe, char* dst, const char* src, std::size_t bytes);
// Sets (or adds to) *sig in PE `to`'s heap; after a group (0: none), it lands once all of that group has.
void signal(int from, int to, std::uint64_t* sig, std::uint64_t value, bool add, std::uint64_t after);

// nvshmem_fence: what `pe` issued so far lands, target by target, before what it issues next.
void fence(int pe);
// nvshmem_quiet: everything `pe` issued lands now.
void quiet(int pe);
// NVSHMEM's consistency step at the target (its waits, barriers, a kernel boundary): the put data that
// has landed at `pe` becomes visible to its threads.
void make_visible(int pe);
// A scheduling point: an operation in flight whose delay has passed lands (across processes: every one).
void progress();

// What landed since start, for tests: operations, bytes of put and get data, and how many operations
// landed before one that was issued earlier by the same PE (their order was not kept).
struct Stats {
  std::uint64_t landed = 0, bytes = 0, overtakes = 0;
};
Stats stats();

}  // namespace symcomm::emu::rma
