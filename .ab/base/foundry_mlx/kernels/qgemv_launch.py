"""The quantized GEMV's launch: its geometry (rows per SIMD-group, how K is split over a
threadgroup), the template constants it implies, and the arguments of one MLX call. The kernel
source these fill in is kernels/qgemv.py; the batched form's launch is kernels/qgemv_batch.py."""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx

from ..quant import QuantizedWeight
from . import gpu_backend
from .qgemv import MAX_STAGED_BYTES, Variant, chunk
from .source import scalar

WARPS = 8  # SIMD-groups per threadgroup
# Enough SIMD-groups in flight to cover memory latency on a large GPU: K is split over a
# threadgroup's SIMD-groups until a launch has this many. A setting to measure
# (FOUNDRY_GEMV_TARGET_WARPS): on the H200 the 7B o_proj (3,584 × 3,584, K split 4 ways over 1,792
# threadgroups) ran at 0.71× MLX's quantized_matmul + add (h200-kernels-e2a593b.md).
TARGET_WARPS = int(os.environ.get("FOUNDRY_GEMV_TARGET_WARPS", "8192"))
# Rows per SIMD-group of every GEMV, when set (FOUNDRY_GEMV_ROWS, a setting to measure).
ROWS = int(os.environ.get("FOUNDRY_GEMV_ROWS", "0"))
# The standalone kernels' rows per SIMD-group on CUDA (the five-kernel step, how the 7B decodes):
# two rows reuse each loaded slice of x (at one row the 7B's down_proj read 4 bytes of x per byte
# of weights) and keep twice the weight loads in flight. With FOUNDRY_GEMV_UNROLL's 2 (qgemv.py)
# the 7B 4-bit decode went from 369 to 401-403 tok/s at depth 0 and 321 to 345 at depth 2048 on the
# H200 (h200-qwen2.5-7b-4bit-GEMV_ROWS-2_GEMV_UNROLL-2-59b32d8.md; 4 rows: 389, unroll 4: 371-384).
# Metal keeps the one-row rule until measured on an Apple GPU; the layer kernel's phases (0.5B)
# keep it too (shape_constants' default).
STANDALONE_ROWS = {"cuda": 2}


def geometry(units: int, k: int, bits: int, rows: int = 0) -> tuple[int, int, int]:
    """(rows per SIMD-group, SIMD-groups along N, SIMD-groups along K) for one launch.

    Many units: two per SIMD-group (x is loaded once for both). Few units with a long K (the down
    projection: 896 rows of 4864): split K over the threadgroup's SIMD-groups, so that enough of
    them run at once to hide memory latency; they add their partial sums through shared memory.
    """
    rows = ROWS or rows or (2 if units >= 16384 else 1)
    steps = -(-k // (32 * chunk(bits)))
    split = 1
    while split < WARPS and split * 2 <= steps and -(-units // rows) * split < TARGET_WARPS:
        split *= 2
    return rows, WARPS // split, split


@dataclass(frozen=True)
class Launch:
    """Everything an MLX custom-kernel call needs besides the kernel object."""

    inputs: list
    template: list
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shape: tuple[int, ...]
    output_dtype: mx.Dtype
    more_outputs: tuple = ()  # (shape, dtype) of each output after the first (workspaces)

    def arguments(self) -> dict:
        """The keyword arguments of the kernel object's call."""
        return dict(inputs=self.inputs, template=self.template, grid=self.grid, threadgroup=self.threadgroup,
                    output_shapes=[self.output_shape, *(shape for shape, _ in self.more_outputs)],
                    output_dtypes=[self.output_dtype, *(dtype for _, dtype in self.more_outputs)])


def shape_constants(units: int, k: int, bits: int, group_size: int, rows: int = 0) -> tuple[dict[str, int], int]:
    """The shape's template constants and the threadgroups that cover its units: one place for the
    geometry → template mapping (the per-kernel launch and the layer kernel's phases both use it).
    `rows` per SIMD-group overrides geometry's rule (0 keeps it)."""
    rows, warps_n, warps_k = geometry(units, k, bits, rows)
    constants = dict(BITS=bits, GROUP=group_size, K=k, UNITS=units, ROWS=rows, WARPS_N=warps_n, WARPS_K=warps_k,
                     CHUNK=chunk(bits))
    return constants, -(-units // (warps_n * rows))


def launch(
    variant: Variant,
    x: mx.array,
    weight: QuantizedWeight,
    norm_weight: mx.array | None = None,
    eps: float | None = None,
    bias: mx.array | None = None,
    residual: mx.array | None = None,
    inv_freq: mx.array | None = None,
    position: int | mx.array | None = None,
    rope_rows: int = 0,
    head_dim: int = 0,
    state: mx.array | None = None,
    k_cache: mx.array | None = None,
    v_cache: mx.array | None = None,
    backend: str | None = None,
) -> Launch:
    """Arguments for one call on a single token `x` (any shape with K elements). The fused RoPE
    variant takes `state` (position at [0]) and the layer's cache buffers (1, kv_heads, S, D).
    `backend` ("cuda", "metal") picks the rows per SIMD-group (STANDALONE_ROWS); None: the GPU
    backend this MLX has."""
    n_rows, k = weight.shape
    if k % 32 or k % weight.group_size or x.size != k:
        raise ValueError(f"GEMV needs K a multiple of 32 and of the group; got K={k}, x of {x.size}")
    dtype = x.dtype
    inputs = [x if x.ndim == 1 else x.reshape(-1), weight.weight, weight.scales, weight.biases]
    if variant.norm:
        inputs += [norm_weight] if variant.fused else [norm_weight, scalar(eps, mx.float32)]
    if variant.bias:
        inputs.append(bias)
    if variant.residual:
        inputs.append(residual if residual.ndim == 1 else residual.reshape(-1))
    half = head_dim // 2
    cache_template = []
    if variant.rope:
        inv_freq = inv_freq if inv_freq.dtype == mx.float32 else inv_freq.astype(mx.float32)
        if variant.fused:
            kv_heads = k_cache.shape[1]
            inputs += [inv_freq, state, k_cache, v_cache]
            cache_template = [("Q_ROWS", rope_rows - kv_heads * head_dim), ("KV_ROWS", kv_heads * head_dim),
                              ("HEAD_DIM", head_dim)]
        else:
            index = position if isinstance(position, mx.array) else scalar(position, mx.int32)
            inputs += [inv_freq, index]
    units = n_rows // variant.rows_per_unit
    if variant.norm and k * dtype.size > MAX_STAGED_BYTES:
        raise ValueError(f"K={k} is too wide to stage in shared memory; use the reference path")
    rows = STANDALONE_ROWS.get(backend if backend is not None else gpu_backend(), 0)
    constants, groups = shape_constants(units, k, weight.bits, weight.group_size, rows)
    template = [("T", dtype), *constants.items(), ("HALF", max(half, 1)), ("ROPE_ROWS", rope_rows)] + cache_template
    out = (units,) if variant.swiglu else (n_rows,)
    threads = WARPS * 32
    return Launch(inputs, template, (groups * threads, 1, 1), (threads, 1, 1), out, dtype)

