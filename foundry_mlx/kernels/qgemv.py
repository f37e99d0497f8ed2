"""Quantized GEMV on MLX's affine layout, with fused prologue and epilogues.

One token's decode step is a chain of matrix-vector products whose cost at 0.5B parameters is
set by kernel launches, not bytes. So one kernel family does each projection *and* what sits
around it, removing separate norm, bias, activation, RoPE and residual kernels:

| variant        | computes                                             | used for            |
|----------------|------------------------------------------------------|---------------------|
| plain          | y = W x                                              |                     |
| + residual     | y = W x + r                                          | o_proj, down_proj   |
| norm           | y = W rmsnorm(x)                                     | final norm + lm_head|
| norm + swiglu  | y = silu(W_gate n) * (W_up n), n = rmsnorm(x)        | gate/up of the MLP  |
| norm+bias+rope | [q; k; v] = W n + b, then RoPE on the q and k rows    | fused QKV           |

Algorithm: a threadgroup of WARPS SIMD-groups; each SIMD-group owns ROWS output *units* (a unit
is one row, or the pair of rows an epilogue combines: gate/up, or the two halves a RoPE rotation
mixes). Each lane takes 32-value blocks of the row (lane, lane+32, …), loads the block's x (and
normalises it: every threadgroup first reduces sum(x²) itself, cheaper than a launch), and for
each of its rows unpacks the `BITS`-bit integers from the little-endian bit stream and
accumulates `scale·(q·x) + bias·Σx` per block (the affine identity, so the weights are never
dequantized). A SIMD-sum reduces the lanes; lane 0 applies the epilogue. Accumulation is in
float32 whatever T is; values are rounded to T where the reference path rounds them (after the
norm, after the matmul), so the kernels and `reference` agree to T's precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..quant import QuantizedWeight
from .source import KernelSource

WARPS = 4


@dataclass(frozen=True)
class Variant:
    norm: bool = False
    bias: bool = False
    residual: bool = False
    swiglu: bool = False
    rope: bool = False

    @property
    def name(self) -> str:
        flags = [f for f in ("norm", "bias", "residual", "swiglu", "rope") if getattr(self, f)]
        return "foundry_qgemv" + "".join(f"_{f}" for f in flags)

    @property
    def rows_per_unit(self) -> int:
        return 2 if self.swiglu or self.rope else 1

    def input_names(self) -> tuple[str, ...]:
        names = ["x", "w", "scales", "biases"]
        names += ["norm_weight", "eps"] if self.norm else []
        names += ["bias"] if self.bias else []
        names += ["residual"] if self.residual else []
        names += ["inv_freq", "position"] if self.rope else []
        return tuple(names)


def _row_expression(variant: Variant) -> str:
    """Row of `which` (0 or 1) in unit `unit`."""
    if variant.swiglu:
        return "(which == 0 ? unit : UNITS + unit)"  # [gate; up] stacked: gate row u, up row UNITS+u
    if variant.rope:
        return "((unit / HALF) * 2 * HALF + (unit % HALF) + which * HALF)"
    return "unit"


def _epilogue(variant: Variant) -> str:
    if variant.swiglu:
        return """
      const float gate = static_cast<float>(static_cast<T>(acc[u * 2 + 0]));
      const float up = static_cast<float>(static_cast<T>(acc[u * 2 + 1]));
      const float silu = gate / (1.0f + PRECISE_EXP(-gate));
      y[unit] = static_cast<T>(silu * up);"""
    if variant.rope:
        bias = "" if not variant.bias else """
      a = static_cast<float>(static_cast<T>(a) + bias[row_a]);
      b = static_cast<float>(static_cast<T>(b) + bias[row_b]);"""
        return f"""
      const int d = unit % HALF;
      const int row_a = (unit / HALF) * 2 * HALF + d;
      const int row_b = row_a + HALF;
      float a = acc[u * 2 + 0];
      float b = acc[u * 2 + 1];{bias}
      a = static_cast<float>(static_cast<T>(a));
      b = static_cast<float>(static_cast<T>(b));
      if (row_a < ROPE_ROWS) {{
        const float angle = static_cast<float>(SCALAR(position)) * inv_freq[d];
        const float c = PRECISE_COS(angle);
        const float s = PRECISE_SIN(angle);
        const float rotated_a = a * c - b * s;
        b = b * c + a * s;
        a = rotated_a;
      }}
      y[row_a] = static_cast<T>(a);
      y[row_b] = static_cast<T>(b);"""
    lines = ["      float value = acc[u];"]
    if variant.bias:
        lines.append("      value = static_cast<float>(static_cast<T>(value) + bias[unit]);")
    if variant.residual:
        lines.append("      value = static_cast<float>(residual[unit]) + static_cast<float>(static_cast<T>(value));")
    lines.append("      y[unit] = static_cast<T>(value);")
    return "\n" + "\n".join(lines)


def body(variant: Variant) -> str:
    rows_per_unit = variant.rows_per_unit
    norm_prologue = ""
    normalize = ""
    if variant.norm:
        norm_prologue = """
  // RMSNorm: every threadgroup reduces sum(x^2) itself (K reads from cache beat a second launch).
  float squares = 0.0f;
  for (UINT k = thread_id; k < (UINT)K; k += WARPS * 32) {
    const float v = static_cast<float>(x[k]);
    squares += v * v;
  }
  squares = SIMD_SUM(squares);
  if (lane == 0) partial[warp] = squares;
  BARRIER();
  float total = 0.0f;
  for (int i = 0; i < WARPS; ++i) total += partial[i];
  const float inv_rms = PRECISE_RSQRT(total / K + SCALAR(eps));
"""
        normalize = """
      v = static_cast<float>(static_cast<T>(v * inv_rms * static_cast<float>(norm_weight[block * 32 + i])));"""
    return f"""
  constexpr int BLOCKS = K / 32;
  constexpr int WORDS_PER_ROW = K * BITS / 32;
  constexpr int GROUPS_PER_ROW = K / GROUP;
  constexpr unsigned int MASK = (BITS == 32) ? 0xffffffffu : ((1u << BITS) - 1u);
  constexpr int RPU = {rows_per_unit};
  SHARED float partial[WARPS];
{norm_prologue}
  const int first_unit = (int)(group_id * (WARPS * ROWS) + warp * ROWS);
  if (first_unit >= UNITS) return;  // uniform over the SIMD-group; no barrier follows

  float acc[ROWS * RPU];
  for (int r = 0; r < ROWS * RPU; ++r) acc[r] = 0.0f;

  for (int block = (int)lane; block < BLOCKS; block += 32) {{
    float xs[32];
    float x_sum = 0.0f;
    for (int i = 0; i < 32; ++i) {{
      float v = static_cast<float>(x[block * 32 + i]);{normalize}
      xs[i] = v;
      x_sum += v;
    }}
    for (int r = 0; r < ROWS * RPU; ++r) {{
      const int unit = first_unit + r / RPU;
      const int which = r % RPU;
      if (unit >= UNITS) break;
      const int row = {_row_expression(variant)};
      unsigned int words[BITS + 1];
      for (int j = 0; j < BITS; ++j) words[j] = w[(long)row * WORDS_PER_ROW + block * BITS + j];
      words[BITS] = 0u;
      float dot = 0.0f;
      for (int i = 0; i < 32; ++i) {{
        const int bit = i * BITS;
        const int shift = bit & 31;
        unsigned int q = words[bit >> 5] >> shift;
        if (shift + BITS > 32) q |= words[(bit >> 5) + 1] << (32 - shift);
        dot += static_cast<float>(q & MASK) * xs[i];
      }}
      const long g = (long)row * GROUPS_PER_ROW + (block * 32) / GROUP;
      acc[r] += static_cast<float>(scales[g]) * dot + static_cast<float>(biases[g]) * x_sum;
    }}
  }}
  for (int r = 0; r < ROWS * RPU; ++r) acc[r] = SIMD_SUM(acc[r]);
  if (lane == 0) {{
    for (int u = 0; u < ROWS; ++u) {{
      const int unit = first_unit + u;
      if (unit >= UNITS) break;{_epilogue(variant)}
    }}
  }}
"""


def kernel_source(variant: Variant) -> KernelSource:
    return KernelSource(variant.name, variant.input_names(), ("y",), body(variant))


def rows_per_warp(units: int) -> int:
    """Units per SIMD-group: more where there are many rows (amortises loading x per block),
    one where there are few (enough threadgroups to fill every multiprocessor)."""
    if units >= 16384:
        return 4
    if units >= 2048:
        return 2
    return 1


@dataclass(frozen=True)
class Launch:
    """Everything an MLX custom-kernel call needs besides the kernel object."""

    inputs: list
    template: list
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shape: tuple[int, ...]
    output_dtype: mx.Dtype


def launch(
    variant: Variant,
    x: mx.array,
    weight: QuantizedWeight,
    norm_weight: mx.array | None = None,
    eps: float | None = None,
    bias: mx.array | None = None,
    residual: mx.array | None = None,
    inv_freq: mx.array | None = None,
    position: int | None = None,
    rope_rows: int = 0,
    head_dim: int = 0,
    rows: int | None = None,
) -> Launch:
    """Arguments for one call on a single token `x` (any shape with K elements)."""
    n_rows, k = weight.shape
    if k % 32 or k % weight.group_size or x.size != k:
        raise ValueError(f"GEMV needs K a multiple of 32 and of the group; got K={k}, x of {x.size}")
    dtype = x.dtype
    inputs = [x.reshape(-1), weight.weight, weight.scales, weight.biases]
    if variant.norm:
        inputs += [norm_weight, mx.array(eps, dtype=mx.float32)]
    if variant.bias:
        inputs.append(bias)
    if variant.residual:
        inputs.append(residual.reshape(-1))
    half = head_dim // 2
    if variant.rope:
        inputs += [inv_freq.astype(mx.float32), mx.array(position, dtype=mx.int32)]
    units = n_rows // variant.rows_per_unit
    rows = rows or rows_per_warp(units)
    groups = -(-units // (WARPS * rows))
    template = [
        ("T", dtype), ("BITS", weight.bits), ("GROUP", weight.group_size), ("K", k), ("UNITS", units),
        ("ROWS", rows), ("WARPS", WARPS), ("HALF", max(half, 1)), ("ROPE_ROWS", rope_rows),
    ]
    out = (units,) if variant.swiglu else (n_rows,)
    return Launch(inputs, template, (groups * WARPS * 32, 1, 1), (WARPS * 32, 1, 1), out, dtype)


def reference(
    variant: Variant,
    x: mx.array,
    weight: QuantizedWeight,
    norm_weight: mx.array | None = None,
    eps: float | None = None,
    bias: mx.array | None = None,
    residual: mx.array | None = None,
    inv_freq: mx.array | None = None,
    position: int | None = None,
    rope_rows: int = 0,
    head_dim: int = 0,
    rows: int | None = None,
) -> mx.array:
    """The same computation in plain `mlx` ops (MLX's own rms_norm, quantized_matmul, rope)."""
    h = x.reshape(1, -1)
    if variant.norm:
        h = mx.fast.rms_norm(h, norm_weight, eps)
    y = mx.quantized_matmul(h, weight.weight, weight.scales, weight.biases, transpose=True,
                            group_size=weight.group_size, bits=weight.bits)
    if variant.bias:
        y = y + bias
    if variant.swiglu:
        gate, up = mx.split(y, 2, axis=-1)
        y = (gate * mx.sigmoid(gate)) * up
    if variant.rope:
        rotated = y[:, :rope_rows].reshape(1, -1, 1, head_dim)
        rotated = mx.fast.rope(rotated, head_dim, traditional=False, base=None, scale=1.0, offset=position,
                               freqs=1.0 / inv_freq)
        y = mx.concatenate([rotated.reshape(1, -1), y[:, rope_rows:]], axis=-1)
    if variant.residual:
        y = residual.reshape(1, -1) + y
    return y.reshape(-1)
