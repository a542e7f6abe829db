#pragma once
// Vector types, loads and the memory-ordering primitives shared by the kernels (inline asm only:
// the GEMM kernel must contain no calls, or ptxas serializes its wgmma).
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

__device__ __forceinline__ std::uint64_t global_timer_ns() {
  std::uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// System-scope acquire: the flag is written by another PE (another process, possibly over
// NVLink), and the data it guards must be visible once we see the flag.
__device__ __forceinline__ std::uint64_t load_acquire_sys(const std::uint64_t* p) {
  std::uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_release_sys(std::uint64_t* p, std::uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// A value an earlier kernel on this stream wrote (the fused GEMM's call tag): no ordering needed,
// only a fresh read.
__device__ __forceinline__ std::uint64_t load_tag(const std::uint64_t* epoch) {
  return *reinterpret_cast<const volatile std::uint64_t*>(epoch);
}

}  // namespace symcomm
