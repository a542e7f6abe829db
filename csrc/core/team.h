#pragma once
// A set of PEs that a remote-path call runs among: first, first + stride, ... (size of them), as a
// hierarchical collective's steps use the PEs of one node or one rank of every node.
namespace symcomm {

struct Team {
  int first = 0;
  int stride = 1;
  int size = 0;  // in a CollectiveCall, 0 is every PE

  // constexpr, so that kernels call it too (the build passes --expt-relaxed-constexpr).
  constexpr int pe(int index) const { return first + index * stride; }
  constexpr int index(int pe) const { return (pe - first) / stride; }
};

}  // namespace symcomm
