#pragma once
// Our extension links its own copy of NVSHMEM's device library, so it carries its own device
// state, which the host library (already started by nvshmem4py) must be told about.
#include <cstdint>

namespace symcomm {

// Registers this module's NVSHMEM device state with the running host library and sets the
// timeout of device-side waits. Call after nvshmem.core.init, once per process.
void init_device_state(double wait_timeout_s);
// Unregisters it; call before nvshmem.core.finalize.
void finalize_device_state();
bool device_state_ready();
// The deadline of device-side waits, for kernels that take it as an argument.
std::uint64_t wait_timeout_ns();
// nvshmemx_init_status(): 3 = limited MPG (several PEs per GPU without MPS), 4 = full MPG.
int init_status();
int my_pe();
int n_pes();
// The grid-size cap of the communication kernels, the same on every PE (the blocks of every PE must
// be able to run at once, since their barriers wait for each other); set at init.
void set_max_blocks(int n);
int max_blocks();

}  // namespace symcomm
