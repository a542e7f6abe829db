#pragma once
// The symmetric workspace every kernel shares (allocated once at init, same offsets on every PE):
//
//   slots[kMaxBlocks][kMaxPes]     barrier flags, one per (block, sending PE), each with a payload
//   seq[kMaxBlocks]                how many barriers each block index has passed (this PE only)
//   moe_counts[kMaxPes][kMaxExperts]  MoE dispatch: each sender's pairs per expert
//   moe_peers[kMaxPeers]           MoE dispatch: where each PE's expert buffer is (this PE's copy)
//   moe_nodes[kMaxPes][kMaxPes]    hierarchical MoE: each sender's tokens for every node
//   gemm_epoch                     fused GEMM calls started on this PE (the tag of the current one)
//   tile_ready[kMaxGemmTiles]      fused GEMM: this PE's partial tile t is written (tagged)
//   tile_reduced[kMaxGemmTiles]    fused GEMM + all-reduce: tile t, owned here, is reduced (tagged)
//   band_ready[kMaxGemmTiles]      all-gather + GEMM: band b of A rows is in this PE's gathered A
//   data                           staging for inputs that are not symmetric, and two-shot results
//
// Synchronisation is per block: block b of every PE meets block b of every other PE, so a kernel
// needs no grid-wide co-residency, only the same grid size on every PE (same sizes, same call).
// Counters live in device memory and only ever grow, so back-to-back calls and CUDA-graph replays
// never mistake an old flag for a new one.
#include <cstdint>

#include <nvshmem.h>
#include <nvshmemx.h>

#include "core/limits.h"
#include "core/team.h"
#include "core/wait.cuh"

namespace symcomm {

// What a PE tells its peers about its input for this call: where it is (a byte offset from the
// workspace base: peers add it to their view of our workspace) and its row pitch in bytes. A PE
// reads its input in place when it is symmetric and stages it otherwise, so peers can differ.
struct Payload {
  std::int64_t offset;
  std::int64_t pitch;
};

struct Slot {
  std::uint64_t flag;
  std::uint64_t pad;
  Payload payload;
};

constexpr std::size_t kSlotsBytes = sizeof(Slot) * kMaxBlocks * kMaxPes;
constexpr std::size_t kSeqBytes = sizeof(std::uint64_t) * kMaxBlocks;
constexpr std::size_t kMoeCountsOffset = kSlotsBytes + kSeqBytes;
constexpr std::size_t kMoeCountsBytes = sizeof(int) * kMaxPes * kMaxExperts;
constexpr std::size_t kMoePeersOffset = kMoeCountsOffset + kMoeCountsBytes;
constexpr std::size_t kMoeNodesOffset = kMoePeersOffset + sizeof(Payload) * kMaxPeers;
constexpr std::size_t kGemmEpochOffset = kMoeNodesOffset + sizeof(int) * kMaxPes * kMaxPes;
constexpr std::size_t kGemmFlagsOffset = kGemmEpochOffset + sizeof(std::uint64_t);
constexpr std::size_t kGemmFlagsBytes = sizeof(std::uint64_t) * kMaxGemmTiles;
// Data starts on a 256-byte boundary so staged rows are aligned for 16-byte vectors.
constexpr std::size_t kDataOffset = (kGemmFlagsOffset + 3 * kGemmFlagsBytes + 255) / 256 * 256;

struct Workspace {
  char* base;  // this PE's workspace (symmetric)

  __device__ Slot* slot(int block, int sender) const {
    return reinterpret_cast<Slot*>(base) + block * kMaxPes + sender;
  }
  __device__ std::uint64_t* seq(int block) const {
    return reinterpret_cast<std::uint64_t*>(base + kSlotsBytes) + block;
  }
  __device__ int* moe_counts(int sender) const {
    return reinterpret_cast<int*>(base + kMoeCountsOffset) + sender * kMaxExperts;
  }
  __device__ Payload* moe_peers() const { return reinterpret_cast<Payload*>(base + kMoePeersOffset); }
  __device__ int* moe_nodes(int sender) const { return reinterpret_cast<int*>(base + kMoeNodesOffset) + sender * kMaxPes; }
  __host__ __device__ std::uint64_t* gemm_epoch() const { return reinterpret_cast<std::uint64_t*>(base + kGemmEpochOffset); }
  __host__ __device__ std::uint64_t* tile_ready() const { return gemm_flags(0); }
  __host__ __device__ std::uint64_t* tile_reduced() const { return gemm_flags(1); }
  __host__ __device__ std::uint64_t* band_ready() const { return gemm_flags(2); }
  __host__ __device__ std::uint64_t* gemm_flags(int which) const {
    return reinterpret_cast<std::uint64_t*>(base + kGemmFlagsOffset + which * kGemmFlagsBytes);
  }
};

// Block b of this PE meets block b of every PE. Before signalling, everything this block wrote is
// made visible system-wide; the payload (our input's offset for this call) travels with the flag,
// and on return peer_payload[q] holds PE q's. Call from every thread of the block.
//
// A peer can be at most one barrier ahead of us (it needs our next signal to pass the one after),
// so the payload we read may already be its next barrier's. Every barrier of one call therefore
// carries the same payload, and every call has at least two barriers.
//
// With rma (the remote path: peers that load/store may not reach) the flag is set by NVSHMEM's
// signal operation instead, through whatever transport reaches the peer, after a fence (fence_block)
// and waited for with NVSHMEM's consistency step (wait_signal); it carries no payload: the remote-path
// kernels push their data and never read a peer's input. The PEs that meet are a
// team (every PE, or with rma a node's or a rail's); flags stay per sending PE, and peer_payload[q]
// is indexed by PE.
__device__ inline void block_barrier(const Workspace& ws, const Team& team, std::uint64_t seq, Payload payload,
                                     Payload* peer_payload, bool rma) {
  const int me = nvshmem_my_pe();
  if (rma)
    fence_block();
  else
    __syncthreads();
  // A thread per member (in turns where the team outnumbers the block's threads).
  for (int member = threadIdx.x; member < team.size; member += blockDim.x) {
    const int q = team.pe(member);
    // Cumulative through the bar.sync above: orders every thread's earlier writes before the flag.
    __threadfence_system();
    if (rma) {
      nvshmemx_signal_op(&ws.slot(blockIdx.x, me)->flag, seq, NVSHMEM_SIGNAL_SET, q);
    } else {
      Slot* remote = static_cast<Slot*>(nvshmem_ptr(ws.slot(blockIdx.x, me), q));
      // A peer one barrier ahead may rewrite our slot's payload while we read it: with the same value
      // (see above), so the race is harmless and deliberate.
      store_racy(&remote->payload.offset, payload.offset);
      store_racy(&remote->payload.pitch, payload.pitch);
      store_release_sys(&remote->flag, seq);
    }
    Slot* mine = ws.slot(blockIdx.x, q);
    if (rma)
      wait_signal(&mine->flag, seq, "a block barrier", q);
    else
      wait_geq(&mine->flag, seq, "a block barrier", q);
    if (!rma) peer_payload[q] = Payload{load_racy(&mine->payload.offset), load_racy(&mine->payload.pitch)};
  }
  __syncthreads();
}

// A kernel's part in the barrier sequence of its block index: open() meets every peer (their inputs
// are ready, and we learn where they are), meet() again wherever the kernel needs it, close() a
// last time (nobody reads our input any more, so the caller may reuse it) and records how far this
// block index got. save() records without meeting, for a kernel whose last barrier was enough;
// resume() continues a sequence a previous kernel on the same stream left open.
struct Session {
  Workspace ws;
  Team team;  // the PEs that meet: every PE, or with rma a node's or a rail's
  Payload mine;
  std::uint64_t seq;
  bool rma;  // meet through NVSHMEM signals (see block_barrier)

  __device__ static Session open(Workspace ws, int npes, Payload mine, Payload* peers) {
    Session s = resume(ws, Team{0, 1, npes}, mine);
    s.meet(peers);
    return s;
  }
  // Picks up where the previous kernel of this block index left off, without meeting.
  __device__ static Session resume(Workspace ws, Team team, Payload mine, bool rma = false) {
    __shared__ std::uint64_t start;
    if (threadIdx.x == 0) start = *ws.seq(blockIdx.x);
    __syncthreads();
    return Session{ws, team, mine, start, rma};
  }
  __device__ void meet(Payload* peers) { block_barrier(ws, team, ++seq, mine, peers, rma); }
  // With rma: this block's puts and gets are complete before what follows (the next barrier says
  // they are in; the fetched data is read). One thread's quiet completes every operation this PE
  // issued, so the block first waits until all of its threads have issued theirs.
  __device__ void quiet() {
    if (!rma) return;
    __syncthreads();
    if (threadIdx.x == 0) nvshmem_quiet();
    __syncthreads();
  }
  __device__ void save() {
    if (threadIdx.x == 0) *ws.seq(blockIdx.x) = seq;
  }
  __device__ void close() {
    __shared__ Payload ignored[kMaxPeers];
    meet(ignored);
    save();
  }
};

}  // namespace symcomm
