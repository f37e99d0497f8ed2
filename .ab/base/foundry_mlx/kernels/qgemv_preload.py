"""The quantized GEMV (kernels/qgemv.py) in two parts, for the layer kernel's phases
(kernels/fused_layer.py): `load` reads a SIMD-group's weights, scales, biases and its epilogue's
operands into registers and needs nothing an earlier phase computes; `compute` does the rest. The
layer kernel issues `load` before the grid barrier the phase waits on, so the loads' latency
overlaps the barrier instead of following it.

Why: the H200's timing marks at fa7d717 (benchmarks/results/h200-layer-timing-fa7d717.txt) put
the gate/up phase at 8.9 µs for ~5 MB: each SIMD-group waited on its 20 rows' loads one after
another, behind the barrier. With this form (e0eb2b6) it took 4.9 µs, and 0.5B 4-bit decode went
from 1,113 to 1,487 tok/s together with the barrier and merge changes of the same commit.
Every loop is unrolled over compile-time bounds so the arrays stay in registers; rows past UNITS
and lanes past K hold zeros. The arithmetic is qgemv.body's, checked by the Metal SIMT harness
(tests/kernels/test_qgemv_metal.py) on the same cases.
"""

from __future__ import annotations

import os

from .qgemv import (
    INDEXING,
    Variant,
    constants,
    dot,
    kernel_source,
    norm_stage,
    row_expression,
    runtime_capacity,
    tail,
)
from .source import KernelSource, rewritten

# The fused step's own GEMV launches (the five-kernel step: 7B) in this form too, where the weights
# fit in REGISTERS per thread: FOUNDRY_GEMV_PRELOAD=1, an experiment until measured on the H200
# against the loop form (a launch of many threadgroups already keeps many loads in flight).
ENABLED = os.environ.get("FOUNDRY_GEMV_PRELOAD", "") == "1"
REGISTERS = 128


def preload_registers(template: dict, rows_per_unit: int) -> int:
    """32-bit registers per thread the preloaded form holds a launch's weights in (`preloaded_body`),
    from the launch's template constants."""
    iters = -(-template["K"] // (template["WARPS_K"] * 32 * template["CHUNK"]))
    words = template["CHUNK"] * template["BITS"] // 32
    return iters * template["ROWS"] * rows_per_unit * (words + 2)


def preloaded_body(variant: Variant, eps: float | None = None) -> tuple[str, str]:
    """(load, compute) of `variant`'s GEMV; see the module's docstring."""
    stage, x_source = norm_stage(variant, eps)
    load = f"""{constants(variant.rows_per_unit)}{INDEXING}
  constexpr int ITERS = (K + WARPS_K * STEP - 1) / (WARPS_K * STEP);
  unsigned int pw[ITERS][SLOTS][W + 1];
  T ps[ITERS][SLOTS];
  T pb[ITERS][SLOTS];
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {{
    const int base = (warp_k * 32 + (int)lane) * E + it * WARPS_K * STEP;
#pragma unroll
    for (int r = 0; r < SLOTS; ++r) {{
      const int unit = first_unit + r / RPU;
      const int which = r % RPU;
      pw[it][r][W] = 0u;
      if (unit < UNITS && base < K) {{
        const int row = {row_expression(variant)};
        LOAD_WORDS(W, w + (long)row * WORDS_PER_ROW + base * BITS_ / 32, pw[it][r]);
        const long g = (long)row * GROUPS_PER_ROW + base / GROUP;
        ps[it][r] = scales[g];
        pb[it][r] = biases[g];
      }} else {{
#pragma unroll
        for (int i = 0; i < W; ++i) pw[it][r][i] = 0u;
        ps[it][r] = static_cast<T>(0.0f);
        pb[it][r] = static_cast<T>(0.0f);
      }}
    }}
  }}
"""
    compute = f"""{stage}
  float acc[SLOTS];
#pragma unroll
  for (int r = 0; r < SLOTS; ++r) acc[r] = 0.0f;
#pragma unroll
  for (int it = 0; it < ITERS; ++it) {{
    const int base = (warp_k * 32 + (int)lane) * E + it * WARPS_K * STEP;
    if (base < K) {{
      float xs[E];
      LOAD_FLOATS(T, E, {x_source} + base, xs);
      float x_sum = 0.0f;
      for (int i = 0; i < E; ++i) x_sum += xs[i];
#pragma unroll
      for (int r = 0; r < SLOTS; ++r) {{{dot("pw[it][r]")}
        acc[r] += static_cast<float>(ps[it][r]) * dot + static_cast<float>(pb[it][r]) * x_sum;
      }}
    }}
  }}{tail(variant, unrolled=True)}"""
    operands, reads = _epilogue_operands(variant)
    return load + operands, rewritten(compute, reads)


# What the epilogue reads besides the sums, per unit: loaded with the weights (before the barrier)
# instead of after the sums, a dependent round trip less. (name, type, expression for unit u, the
# epilogue's read it replaces).
_OPERANDS = {
    "bias": (("e_bias", "T", "bias[unit]"),),
    "rope_bias": (("e_bias_a", "T", "bias[row_a]"), ("e_bias_b", "T", "bias[row_b]")),
    "rope": (("e_freq", "float", "inv_freq[d]"),),
    "residual": (("e_residual", "T", "residual[unit]"),),
}


def _epilogue_operands(variant: Variant) -> tuple[str, tuple]:
    """The preloaded form's loads of the epilogue's operands, and the rewrites that read them."""
    flags = {"bias": variant.bias and not variant.rope, "rope_bias": variant.bias and variant.rope,
             "rope": variant.rope, "residual": variant.residual}
    chosen = [operand for flag, operands in _OPERANDS.items() if flags[flag] for operand in operands]
    if not chosen:
        return "", ()
    declared = "".join(f"\n  {kind} {name}[ROWS];" for name, kind, _ in chosen)
    loads = "".join(f"\n      {name}[u] = {read};" for name, _, read in chosen)
    rope = """
      const int d = unit % HALF;
      const int row_a = (unit / HALF) * 2 * HALF + d;
      const int row_b = row_a + HALF;""" if variant.rope else ""
    text = f"""{declared}
#pragma unroll
  for (int u = 0; u < ROWS; ++u) {{
    const int unit = min(first_unit + u, UNITS - 1);{rope}{loads}
  }}
"""
    return text, tuple((read, f"{name}[u]") for name, _, read in chosen)


def fits(template: dict, rows_per_unit: int, registers: int = REGISTERS) -> bool:
    """Whether a launch with these template constants holds its weights in `registers` per thread."""
    return preload_registers(template, rows_per_unit) <= registers


def standalone_source(variant: Variant, backend: str, eps: float | None = None) -> KernelSource:
    """qgemv.kernel_source's kernel in the preloaded form (load, then compute, in one launch)."""
    plain = kernel_source(variant, backend, eps)
    load, compute = preloaded_body(variant, eps)
    return KernelSource(plain.name + "_pre", plain.input_names, plain.output_names,
                        runtime_capacity(variant) + load + compute, plain.header)
