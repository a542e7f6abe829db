#pragma once
// Sizes of the fixed arrays in the symmetric workspace (core/workspace.cuh), also checked on the host.
namespace symcomm {

constexpr int kMaxPeers = 8;    // PEs a kernel can talk to
constexpr int kMaxBlocks = 64;  // blocks per collective kernel
constexpr int kMaxExperts = 1024;  // MoE experts a dispatch can route to
constexpr int kMaxTopK = 16;       // MoE experts per token
constexpr int kMaxGemmTiles = 8192;  // output tiles (and bands of A rows) of one fused GEMM call

}  // namespace symcomm
