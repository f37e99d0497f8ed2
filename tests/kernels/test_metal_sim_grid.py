"""The Metal kernel simulator with every threadgroup at once (`groups_at_once`): what a kernel
whose threadgroups wait for one another (a grid-wide barrier on a device atomic, as the layer
kernel's phases do) needs to complete, and what a wrong barrier does there."""

from __future__ import annotations

import numpy as np
import pytest

from foundry_mlx.kernels.metal_sim import MetalRuntimeError, run_metal_kernel

pytestmark = pytest.mark.filterwarnings("ignore::foundry_mlx.kernels.metal_sim.MetalCompileWarning")

GROUPS, THREADS = 6, 32

# A generation-free barrier: each arrival adds one; barrier n completes at (n + 1) * groups.
HEADER = """
inline void grid_sync(device atomic_uint* counter, uint groups, uint tid, uint extra) {
  threadgroup_barrier(mem_flags::mem_device);
  if (tid == 0) {
    const uint arrived = atomic_fetch_add_explicit(counter, 1u, memory_order_relaxed);
    const uint target = (arrived / groups + 1u) * groups + extra;
    uint spins = 0;
    // SPIN_LIMIT 0: no bound (the hang the harness must report)
    while (atomic_load_explicit(counter, memory_order_relaxed) < target && (SPIN_LIMIT == 0u || ++spins < SPIN_LIMIT)) {}
  }
  threadgroup_barrier(mem_flags::mem_device);
}
"""

# Each group writes its row, waits for all, then reads the next group's row.
SOURCE = """
  const uint g = threadgroup_position_in_grid.x;
  const uint groups = threadgroups_per_grid.x;
  const uint t = thread_position_in_threadgroup.x;
  device atomic_uint* counter = (device atomic_uint*)(sync);
  mine[g * THREADS + t] = float(g * 100 + t);
  grid_sync(counter, groups, t, EXTRA);
  theirs[g * THREADS + t] = mine[((g + 1) % groups) * THREADS + t];
"""


def _run(extra: int, spin_limit: str, **options):
    header = HEADER.replace("SPIN_LIMIT", spin_limit)
    return run_metal_kernel(
        "grid_barrier", ["sync"], ["mine", "theirs"], SOURCE.replace("EXTRA", str(extra)), header,
        [np.zeros(4, np.uint32)], [(GROUPS * THREADS,), (GROUPS * THREADS,)], [np.float32, np.float32],
        (GROUPS * THREADS, 1, 1), (THREADS, 1, 1), template=[("THREADS", THREADS)], **options)


def test_groups_at_once_let_a_grid_barrier_complete():
    mine, theirs = _run(0, "0u", groups_at_once=True)
    expected = (np.arange(GROUPS)[:, None] * 100 + np.arange(THREADS)[None, :]).astype(np.float32)
    np.testing.assert_array_equal(mine.reshape(GROUPS, THREADS), expected)
    np.testing.assert_array_equal(theirs.reshape(GROUPS, THREADS), np.roll(expected, -1, axis=0))


def test_one_group_at_a_time_a_bounded_barrier_reads_what_was_not_written():
    """The default runs threadgroups one after another: the first group's barrier gives up and it
    reads the next group's row before that group ran (poison), as on a GPU with too few resident
    threadgroups. Why the layer kernel's Metal rendition is tested with groups_at_once."""
    _, theirs = _run(0, "(1u << 12)")
    assert np.isnan(theirs.reshape(GROUPS, THREADS)[0]).all()


def test_a_barrier_that_never_completes_is_reported_not_hung():
    with pytest.raises(MetalRuntimeError, match="did not finish"):
        _run(1, "0u", groups_at_once=True, timeout_s=5)
