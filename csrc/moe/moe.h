#pragma once
// MoE dispatch and combine over the symmetric heap (contract: docs/moe.md). Pointers, sizes and the
// stream are integers; python/symcomm/moe.py validates arguments and computes, with torch ops on the
// device, each rank's per-expert counts and each pair's position among its own pairs.
#include <cstdint>

#include "core/limits.h"

namespace symcomm {

struct MoeCall {
  std::uintptr_t workspace;
  std::uintptr_t x;             // [T, H] this rank's tokens
  std::uintptr_t topk_ids;      // [T, k] int64
  std::uintptr_t positions;     // [T, k] int32: the pair's index among this rank's pairs to its expert, in token order
  std::uintptr_t counts;        // [E] int32: this rank's pairs per expert
  std::uintptr_t expert_buf;    // symmetric [E_local, capacity, H]: expert_x (dispatch) or expert_y (combine)
  std::uintptr_t expert_counts; // [E_local] int32 (dispatch)
  std::uintptr_t routing;       // [T, k] int64: written by dispatch, read by combine
  std::uintptr_t weights;       // [T, k] float32 (combine)
  std::uintptr_t y;             // [T, H] (combine)
  int tokens, top_k, num_experts, capacity, hidden;
  int dtype;                    // 1 = float16, 2 = bfloat16 (combine accumulates in float32)
  std::int64_t grid_bytes;      // sizes the grid; the same on every PE (from max tokens, not T)
  std::uintptr_t stream;
  bool rma;                     // the remote path (runtime.transport() == "rma"): x symmetric, see moe.cu
  // The hierarchical remote path (ranks on nodes of per_node each; 0: flat), see Hierarchy in moe.cu:
  int per_node;
  std::uintptr_t node_pos;      // [T, nodes] int32: token t's index among this rank's tokens for node n, or -1
  std::uintptr_t node_tokens;   // [nodes] int32: this rank's tokens for each node
  std::int64_t data_bytes;      // the workspace's data area, where its records go
};

// The hierarchical path's data area per token (dispatch's record: the k routing codes, then the row;
// combine's: the codes and the k float32 weights, and two float32 partial sums per node), and the
// tokens per PE it holds: `slots` of each, (1 + nodes) regions of records and 2 x nodes of sums.
constexpr std::int64_t moe_meta_bytes(int top_k, bool combine) { return (top_k * (combine ? 12 : 8) + 15) / 16 * 16; }
constexpr std::int64_t moe_record_bytes(int top_k, std::int64_t row_bytes, bool combine) {
  return moe_meta_bytes(top_k, combine) + (combine ? 0 : row_bytes);
}
constexpr std::int64_t moe_partial_bytes(std::int64_t row_bytes) { return row_bytes * 2; }  // of 2-byte elements
constexpr std::int64_t moe_slots(std::int64_t data_bytes, int nodes, int top_k, std::int64_t row_bytes, bool combine) {
  return data_bytes / ((1 + nodes) * moe_record_bytes(top_k, row_bytes, combine) +
                       (combine ? 2 * nodes * moe_partial_bytes(row_bytes) : 0));
}

// Slots are assigned by (expert, source PE, token): PE s's pair to expert e lands at
// sum of lower PEs' counts for e + its position. Rows move with 16-byte stores into the owners'
// expert_x; routing[t, j] = e * capacity + slot; expert_counts = rows received per local expert.
void moe_dispatch(const MoeCall& c);
// y[t] = sum_j weights[t, j] * expert_y at routing[t, j], read from the owners, float32 accumulation.
void moe_combine(const MoeCall& c);
// Loads every kernel above (at init: see load_kernel in core/launch.cuh).
void load_moe_kernels();

}  // namespace symcomm
