"""Run ``mx.fast.metal_kernel`` kernels on the CPU, without a Mac.

The exact source MLX 0.32 would compile (:func:`metal_signature`, a port of
``write_signature``) is compiled as C++20 with clang against a small
Metal-Shading-Language shim (``msl_shim.h``) and executed by a SIMT runtime:
one OS thread per GPU thread of a threadgroup, real threadgroup barriers,
SIMD-groups of 32 lanes whose ``simd_*`` functions exchange values between the
lanes' threads, threadgroup memory shared by the group and poisoned afresh for
each threadgroup, outputs poisoned unless ``init_value`` is given.

What it catches: wrong indexing, missing writes (poison in the output),
threadgroup-memory races between SIMD-groups (run ``schedule="forward"`` and
``"reverse"``: one thread at a time, switching only at barriers and SIMD-group
functions, so a missing barrier reads poison deterministically), divergent
barriers and deadlocks (reported, not hung), writes past the end of a buffer,
misspelt builtins (MetalCompileError). 8x8 simdgroup_matrix is supported with
the per-lane fragment layout MLX's steel kernels assume.

What it cannot tell you: GPU speed; lockstep behaviour inside a SIMD-group
(lanes run as independent threads, so code that relies on implicit lockstep
without simdgroup_barrier may pass here); exact float results: half
arithmetic is computed in float and rounded on store (storage-only __fp16),
and libm's exp/log differ from Metal's in the last bits, so compare with a
tolerance. Divergent SIMD-group functions (lanes of one SIMD-group calling
simd_* from different places) are reported as errors rather than executed;
lanes that already returned are treated as inactive, as on the GPU. A kernel
that loops forever hangs the launch; one that dereferences a wild pointer
crashes the process (reads just past a buffer see 0xFF redzone bytes instead).

bfloat16 crosses the numpy boundary as uint16 bit patterns tagged
:class:`BFloat16Array` (see :func:`bfloat16_array`,
:func:`bfloat16_to_float32`); ml_dtypes bfloat16 arrays are accepted as
inputs. Needs a C++20 clang: ``clang++`` on the PATH, else the ``ziglang``
package's ``zig c++`` (in the test extra), or whatever ``FOUNDRY_CXX`` names;
see :mod:`foundry_mlx.kernels.metal_sim.build`.
"""

from foundry_mlx.kernels.metal_sim.build import MetalCompileError, MetalCompileWarning
from foundry_mlx.kernels.metal_sim.dtypes import (
    BFloat16Array,
    bfloat16_array,
    bfloat16_to_float32,
)
from foundry_mlx.kernels.metal_sim.runner import MetalRuntimeError, run_metal_kernel
from foundry_mlx.kernels.metal_sim.signature import metal_signature

__all__ = [
    "BFloat16Array",
    "MetalCompileError",
    "MetalCompileWarning",
    "MetalRuntimeError",
    "bfloat16_array",
    "bfloat16_to_float32",
    "metal_signature",
    "run_metal_kernel",
]
