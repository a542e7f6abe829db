#pragma once
// Sizes of the fixed arrays in the symmetric workspace (core/workspace.cuh), also checked on the host.
namespace symcomm {

constexpr int kMaxPeers = 8;    // PEs a kernel can talk to
constexpr int kMaxBlocks = 64;  // blocks per collective kernel

}  // namespace symcomm
