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

// The GPU's timer and ordering instructions; under SYMCOMM_EMU (the CPU emulation, csrc/emu/) their
// host equivalents, and every flag load is a point where the emulated threads of a block switch.
#ifdef SYMCOMM_EMU
__device__ __forceinline__ std::uint64_t global_timer_ns() { return emu::now_ns(); }
__device__ __forceinline__ std::uint64_t load_acquire_sys(const std::uint64_t* p) {
  emu::schedule(p);
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
__device__ __forceinline__ void store_release_sys(std::uint64_t* p, std::uint64_t v) {
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
}
__device__ __forceinline__ void store_racy(std::int64_t* p, std::int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELAXED); }
__device__ __forceinline__ std::int64_t load_racy(const std::int64_t* p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }
#else
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

// A deliberate race: a word that a peer may rewrite, with the same value, while we read it (the
// barrier payload, see block_barrier). Volatile so that each access happens exactly once.
__device__ __forceinline__ void store_racy(std::int64_t* p, std::int64_t v) { *reinterpret_cast<volatile std::int64_t*>(p) = v; }
__device__ __forceinline__ std::int64_t load_racy(const std::int64_t* p) {
  return *reinterpret_cast<const volatile std::int64_t*>(p);
}
#endif

// A value an earlier kernel on this stream wrote (the fused GEMM's call tag): no ordering needed,
// only a fresh read.
__device__ __forceinline__ std::uint64_t load_tag(const std::uint64_t* epoch) {
  return *reinterpret_cast<const volatile std::uint64_t*>(epoch);
}

}  // namespace symcomm
