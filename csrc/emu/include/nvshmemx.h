#pragma once
#include <nvshmem.h>

int nvshmemx_init_status();
int nvshmemi_init_thread(int requested, int* provided, unsigned int bootstrap_flags, nvshmemx_init_attr_t* attr,
                         nvshmemi_version_t version);
void nvshmemi_finalize();
// Called by every thread of a block: puts the data, then sets the signal on `pe`, which lands after all of it.
void nvshmemx_putmem_signal_block(void* dest, const void* source, std::size_t bytes, std::uint64_t* sig_addr,
                                  std::uint64_t signal, int sig_op, int pe);
// Called by every thread of a block, or of a warp (same arguments): puts `bytes` to `dest` on `pe`, or gets
// them from `source` on `pe`. They land later (nvshmem.h); the caller's side must be on its own symmetric
// heap, as NVSHMEM's network transports need.
void nvshmemx_putmem_block(void* dest, const void* source, std::size_t bytes, int pe);
void nvshmemx_putmem_nbi_warp(void* dest, const void* source, std::size_t bytes, int pe);
void nvshmemx_getmem_nbi_warp(void* dest, const void* source, std::size_t bytes, int pe);
// Sets (or adds to) the signal word at sig_addr on `pe`; unordered with the caller's other operations to
// `pe` unless a fence separates them.
void nvshmemx_signal_op(std::uint64_t* sig_addr, std::uint64_t signal, int sig_op, int pe);
