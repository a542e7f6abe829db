#pragma once
// Vector types and loads shared by the communication kernels.
#include <cstdint>

namespace symcomm {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// The raw type of a given size, for loads that bypass L1: a peer's data must come from L2 or the
// peer, never from a line this SM cached before the peer wrote it.
template <int Bytes> struct Raw;
template <> struct Raw<1> { using type = unsigned char; };
template <> struct Raw<2> { using type = unsigned short; };
template <> struct Raw<4> { using type = unsigned int; };
template <> struct Raw<8> { using type = unsigned long long; };
template <> struct Raw<16> { using type = uint4; };

template <typename V>
__device__ __forceinline__ V load_cg(const V* p) {
  using R = typename Raw<sizeof(V)>::type;
  const R r = __ldcg(reinterpret_cast<const R*>(p));
  return *reinterpret_cast<const V*>(&r);
}

}  // namespace symcomm
