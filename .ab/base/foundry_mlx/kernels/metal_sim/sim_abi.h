// Interface between a compiled Metal kernel (kernel translation unit, built
// from msl_shim.h + the MLX-generated source) and the SIMT runtime
// (sim_runtime.h). Kept free of standard-library headers so that the kernel
// translation unit sees only Metal Shading Language names.
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace metal_sim {

typedef unsigned int abi_uint3 __attribute__((ext_vector_type(3)));

// Apple GPUs run SIMD-groups of 32 threads.
constexpr unsigned kSimdWidth = 32;
// Bytes reserved per lane for exchanging one value in a SIMD-group function.
constexpr unsigned kSlotBytes = 64;
// Threadgroup memory available to one threadgroup on Apple GPUs.
constexpr size_t kThreadgroupMemoryLimit = 32768;

// Every attribute MLX can add to a kernel signature (metal_kernel.cpp), as
// Metal computes it for one thread.
struct Attributes {
  unsigned dispatch_quadgroups_per_threadgroup;
  unsigned dispatch_simdgroups_per_threadgroup;
  abi_uint3 dispatch_threads_per_threadgroup;
  abi_uint3 grid_origin;
  abi_uint3 grid_size;
  unsigned quadgroup_index_in_threadgroup;
  unsigned quadgroups_per_threadgroup;
  unsigned simdgroup_index_in_threadgroup;
  unsigned simdgroups_per_threadgroup;
  unsigned thread_execution_width;
  unsigned thread_index_in_quadgroup;
  unsigned thread_index_in_simdgroup;
  unsigned thread_index_in_threadgroup;
  abi_uint3 thread_position_in_grid;
  abi_uint3 thread_position_in_threadgroup;
  abi_uint3 threadgroup_position_in_grid;
  abi_uint3 threadgroups_per_grid;
  abi_uint3 threads_per_grid;
  unsigned threads_per_simdgroup;
  abi_uint3 threads_per_threadgroup;
};

// Result of a SIMD-group exchange: the 32 lane slots (kSlotBytes each) of
// this operation, which lanes took part, and the caller's lane.
struct SimdExchange {
  const unsigned char* slots;
  uint32_t active_mask;
  unsigned lane;
};

void runtime_threadgroup_barrier(unsigned line, unsigned column);
void runtime_simdgroup_barrier(unsigned line, unsigned column);
SimdExchange runtime_simd_exchange(
    const void* value,
    unsigned size,
    unsigned line,
    unsigned column);
unsigned runtime_simd_lane();
unsigned char* runtime_threadgroup_memory();
size_t register_threadgroup_slot(size_t size, size_t alignment);

} // namespace metal_sim

// Defined by the generated driver: calls the kernel for one thread.
extern "C" void metal_sim_kernel_entry(
    void* const* buffers,
    const metal_sim::Attributes* attributes);
