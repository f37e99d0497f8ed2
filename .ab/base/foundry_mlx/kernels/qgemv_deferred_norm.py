"""The norm GEMVs with the RMSNorm deferred to the epilogue (FOUNDRY_GEMV_DEFERRED_NORM=1, an
experiment for CUDA's standalone kernels: the 7B's fused QKV and gate/up).

qgemv.body's norm variants start with a prologue every threadgroup runs before its first weight
load: sum(x²) over all of K, a barrier, x·inv_rms·w staged to shared memory, a second barrier.
On the H200 the 7B's fused QKV (576 threadgroups, each normalising 3,584 values for 16 rows) ran
at 0.57 TB/s against gate/up's 1.8 (h200-ncu-decode-7b-4bit-53d0409.txt). Here the weights stream
from the first instruction: each lane multiplies its slice of x by the norm weight as it loads it,
adds x² into one more accumulator slot, and the split-K reduction that already sums the dot
products sums that slot too; the epilogue scales the dot products by inv_rms, which factors out of
the affine identity (Σ (s·q + b)·x·w·inv_rms = inv_rms · Σ (s·q + b)·x·w).

One difference from the reference path: x·w is not rounded to T before the products (the staged
form rounds x_norm to T as mx.fast.rms_norm's output is), so results differ from the twin by T's
rounding of the normalised input, as float32 accumulation differs anyway. Derived from qgemv.body
by `rewritten`, so a change to the body fails loudly here instead of leaving this form stale.
"""

from __future__ import annotations

import os

from . import qgemv
from .source import float_literal, rewritten


def enabled() -> bool:
    return os.environ.get("FOUNDRY_GEMV_DEFERRED_NORM") == "1"


def body(variant: qgemv.Variant, eps: float | None = None, unroll: int = 1) -> str:
    """qgemv.body(variant, eps, unroll) with the norm prologue replaced by the deferred norm."""
    if not variant.norm:
        raise ValueError("the deferred norm applies to the norm variants only")
    stage, x_source = qgemv.norm_stage(variant, eps)
    eps_text = "SCALAR(eps)" if not variant.fused else float_literal(eps)
    return rewritten(qgemv.body(variant, eps, unroll), [
        ("SHARED float k_partial[WARPS_K * WARPS_N * SLOTS];", "SHARED float k_partial[WARPS_K * WARPS_N * (SLOTS + 1)];"),
        (stage, ""),
        ("float acc[SLOTS];\n  for (int r = 0; r < SLOTS; ++r) acc[r] = 0.0f;",
         "float acc[SLOTS + 1];  // the last slot: this SIMD-group's share of sum(x^2)\n"
         "  for (int r = 0; r < SLOTS + 1; ++r) acc[r] = 0.0f;"),
        (f"LOAD_FLOATS(T, E, {x_source} + base, xs);\n      float x_sum = 0.0f;\n"
         "      for (int i = 0; i < E; ++i) x_sum += xs[i];",
         "LOAD_FLOATS(T, E, x + base, xs);\n      float ws[E];\n      LOAD_FLOATS(T, E, norm_weight + base, ws);\n"
         "      float x_sum = 0.0f;\n"
         "      for (int i = 0; i < E; ++i) {\n        acc[SLOTS] += xs[i] * xs[i];\n        xs[i] *= ws[i];\n"
         "        x_sum += xs[i];\n      }"),
        ("for (int r = 0; r < SLOTS; ++r) acc[r] = SIMD_SUM(acc[r]);",
         "for (int r = 0; r < SLOTS + 1; ++r) acc[r] = SIMD_SUM(acc[r]);"),
        ("for (int r = 0; r < SLOTS; ++r) k_partial[(warp_k * WARPS_N + warp_n) * SLOTS + r] = acc[r];",
         "for (int r = 0; r < SLOTS + 1; ++r) k_partial[(warp_k * WARPS_N + warp_n) * (SLOTS + 1) + r] = acc[r];"),
        ("for (int r = 0; r < SLOTS; ++r) {\n      float sum = 0.0f;\n"
         "      for (int part = 0; part < WARPS_K; ++part) sum += k_partial[(part * WARPS_N + warp_n) * SLOTS + r];",
         "for (int r = 0; r < SLOTS + 1; ++r) {\n      float sum = 0.0f;\n"
         "      for (int part = 0; part < WARPS_K; ++part) sum += k_partial[(part * WARPS_N + warp_n) * (SLOTS + 1) + r];"),
        ("if (warp_k == 0 && lane == 0) {",
         "if (warp_k == 0 && lane == 0) {\n    const float inv_rms = PRECISE_RSQRT(acc[SLOTS] / K + " + eps_text + ");\n"
         "    for (int r = 0; r < SLOTS; ++r) acc[r] *= inv_rms;"),
    ], once=True)
