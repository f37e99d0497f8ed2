"""The layer kernel's Metal rendition (experimental, opt-in: FOUNDRY_LAYER_KERNEL=1 on Apple
silicon). kernels/fused_layer.py writes one source for CUDA; this file is what makes the same
text Metal: the header maps the CUDA-only names it uses onto Metal, and the prologue gives the
grid barrier its counters.

- Metal has no `__device__` globals: the barrier's two counters (arrivals, generation) sit after
  the attention's parts in the layer's float32 scratch buffer, zeroed when it is made. The
  barrier is the count-and-generation form (a wrapping 32-bit count would break a monotonic
  one). Every spin is bounded: a barrier that cannot complete leaves wrong values, not a hung GPU.
- `atomicInc` (a head's last share merging) becomes a fetch-add whose last arrival stores 0.
- The L2 prefetches are no-ops; `__ldcg` is a plain load.
- Memory ordering across threadgroups: Metal offers relaxed device atomics and threadgroup-scope
  barriers; this rendition has been run only by the CPU SIMT harness with every threadgroup at
  once (tests/kernels/test_fused_layer_metal.py), where memory is coherent. Whether a real Apple
  GPU keeps the launch's threadgroups resident and its writes visible across them at these
  barriers is what a Mac user checks with `foundry-mlx bench` and FOUNDRY_LAYER_KERNEL=1 (the
  CPU harness, far slower than a GPU, lifts the spin bound: FOUNDRY_SPIN_LIMIT 0); the
  grid is FOUNDRY_LAYER_BLOCKS threadgroups (default 16 on Metal), which must not exceed what
  the GPU keeps resident.
"""

from __future__ import annotations

SYNC_SLOTS = 2  # float32 slots after the attention's parts: arrivals, generation

HEADER = """
#ifndef FOUNDRY_SPIN_LIMIT
#define FOUNDRY_SPIN_LIMIT (1u << 26)
#endif
#define blockIdx foundry_grid_group
#define gridDim foundry_grid_groups
#define __threadfence() ((void)0)
#define __ldcg(p) (*(p))
#define atomicInc(p, last) foundry_atomic_inc(p, last)
#define SHARE_COUNTERS(p) ((device atomic_uint*)(p))
#define foundry_prefetch_l2(base, bytes) ((void)(base))
#define foundry_grid_sync() foundry_grid_sync_metal(foundry_sync, foundry_grid_groups.x, thread_id)
inline uint foundry_atomic_inc(device atomic_uint* counter, uint last) {
  const uint previous = atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed);
  if (previous == last) atomic_store_explicit(counter, 0u, memory_order_relaxed);
  return previous;
}
inline void foundry_grid_sync_metal(device atomic_uint* sync, uint groups, uint tid) {
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
  if (tid == 0) {
    const uint generation = atomic_load_explicit(sync + 1, memory_order_relaxed);
    if (atomic_fetch_add_explicit(sync, 1u, memory_order_relaxed) == groups - 1u) {
      atomic_store_explicit(sync, 0u, memory_order_relaxed);
      atomic_fetch_add_explicit(sync + 1, 1u, memory_order_relaxed);
    } else {
      uint spins = 0;
      while (atomic_load_explicit(sync + 1, memory_order_relaxed) == generation &&
           (FOUNDRY_SPIN_LIMIT == 0u || ++spins < FOUNDRY_SPIN_LIMIT)) {}
    }
  }
  threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup);
}
"""


def prologue(sync_at: int) -> str:
    """The body's first lines: the grid's attributes (named in the body, so MLX passes them) and
    the barrier's counters at float offset `sync_at` of `attn_parts`."""
    return f"""  const uint3 foundry_grid_group = threadgroup_position_in_grid;
  const uint3 foundry_grid_groups = threadgroups_per_grid;
  device atomic_uint* foundry_sync = (device atomic_uint*)(MUTABLE(float, attn_parts) + {sync_at});
"""
