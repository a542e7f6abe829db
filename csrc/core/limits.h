#pragma once
// Sizes of the fixed arrays in the symmetric workspace (core/workspace.cuh), also checked on the host.
namespace symcomm {

constexpr int kMaxPes = 128;    // PEs in a job (barrier flags and MoE counts per sending PE): 16 nodes of 8
constexpr int kMaxPeers = 8;    // PEs a load/store kernel reads directly, or a push kernel sums in one pass
constexpr int kMaxBlocks = 64;  // blocks per collective kernel
constexpr int kMaxExperts = 1024;  // MoE experts a dispatch can route to
constexpr int kMaxTopK = 16;       // MoE experts per token
constexpr int kMaxGemmTiles = 8192;  // output tiles (and bands of A rows) of one fused GEMM call

}  // namespace symcomm
