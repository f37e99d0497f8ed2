"""One way to run a kernel's Metal rendition on the CPU harness from the arguments its launch
helper builds (the same keyword arguments the MLX kernel object takes on a GPU)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from foundry_mlx.kernels.metal_sim import bfloat16_array, bfloat16_to_float32, run_metal_kernel
from foundry_mlx.kernels.source import KernelSource


def to_numpy(array: mx.array):
    if array.dtype == mx.bfloat16:
        return bfloat16_array(np.array(array.astype(mx.float32)))
    return np.array(array)


def as_float32(output: np.ndarray) -> np.ndarray:
    """A harness output as float32 (its bfloat16 comes back as uint16 bit patterns)."""
    return bfloat16_to_float32(output) if output.dtype == np.uint16 else output.astype(np.float32)


def run_source(source: KernelSource, arguments: dict, **options) -> list[np.ndarray]:
    """`source` as MLX is given it for Metal (`launch_text`), run with `arguments` (inputs, template, grid, threadgroup,
    output shapes and dtypes); `options` go to `run_metal_kernel` (groups, schedule, …)."""
    header, body = source.launch_text("metal")
    return run_metal_kernel(
        source.name, source.input_names, source.output_names, body, header,
        [to_numpy(a) for a in arguments["inputs"]], arguments["output_shapes"], arguments["output_dtypes"],
        arguments["grid"], arguments["threadgroup"], template=arguments["template"], **options,
    )


def sampled_rows(template: list, rows: int, groups) -> np.ndarray:
    """The GEMV output rows that the threadgroups `groups` write (a huge grid run in part)."""
    constants = dict(template)
    per_group = constants["WARPS_N"] * constants["ROWS"]
    return np.concatenate([np.arange(g * per_group, min((g + 1) * per_group, rows)) for g in groups])
