#pragma once
// Collectives over the symmetric heap. reduce, gather and two_shot_all_reduce read peers through peer
// pointers (every PE load/store reachable: one NVLink domain, or several PEs on one GPU); push_reduce
// and push_gather, the remote path, move data only by NVSHMEM puts with signal, so they reach any PE
// NVSHMEM reaches (another node through its network transport). Each call handles one chunk: the
// Python side stages inputs that are not symmetric, splits large messages, and picks the path and
// the algorithm.
//
// A PE's input is a set of rows (one row per destination PE for reduce-scatter and all-to-all, a
// single row otherwise). Sizes are in bytes; pointers, streams and the workspace are integers.
#include <cstdint>
#include <vector>

#include "core/limits.h"
#include "core/team.h"

namespace symcomm {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

struct CollectiveCall {
  std::uintptr_t workspace;     // this PE's symmetric workspace
  std::uintptr_t src;           // this PE's input (symmetric: in place, or staged in the workspace)
  std::int64_t src_pitch;       // bytes between this PE's input rows
  int row;                      // the row of every peer's input that this PE consumes
  std::int64_t len;             // bytes per row
  std::uintptr_t dst;           // this PE's output
  std::int64_t dst_pitch;       // gather: bytes between the rows that come from consecutive PEs
  std::int64_t result_offset;   // two-shot: byte offset in the workspace of the per-PE result area;
                                // push: of the inbox (one 16-byte-aligned slot of len bytes per sender)
  DType dtype;                  // reductions only
  bool vec16;                   // reductions: every address and pitch is a multiple of 16 bytes
  std::uintptr_t stream;
  Team team = {};               // push kernels only; the others run among every PE
};

// dst[i] = sum over PEs q of q's input row `row` (one-shot all-reduce: row 0; reduce-scatter: row = me).
// Accumulates half types in float32.
void reduce(const CollectiveCall& c);
// dst row q (at dst + q * dst_pitch) = PE q's input row `row` (all-gather: row 0; all-to-all: row = me),
// in the widest units that each peer's row and ours allow.
void gather(const CollectiveCall& c);
// All-reduce of a single row in two passes: each PE reduces its 1/n share into its result area, then
// every PE reads all shares. Moves 2(n-1)/n of the data per PE instead of (n-1).
void two_shot_all_reduce(const CollectiveCall& c);

// reduce and gather over the remote path, among the PEs of c.team: team member q's row for this PE
// (row `my team index` when src_pitch > 0, else its one row) reaches this PE's inbox slot q by a put,
// and is summed or copied (to dst row q) from there.
void push_reduce(const CollectiveCall& c);
void push_gather(const CollectiveCall& c);

// Loads every kernel above (at init: see load_kernel in core/launch.cuh).
void load_collective_kernels();

// Where the data area starts in the workspace (bytes); everything before it is barrier state.
std::int64_t workspace_data_offset();
// For each PE, whether its copy of the workspace is reachable by load/store from this PE.
std::vector<bool> reachable_peers(std::uintptr_t workspace);

}  // namespace symcomm
