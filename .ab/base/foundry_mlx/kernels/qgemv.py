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
norm, after the matmul), so the kernels and `reference` agree to T's precision. How a shape is
laid out over threadgroups, and the arguments of a call: kernels/qgemv_launch.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx

from ..quant import QuantizedWeight
from .source import KernelSource, float_literal, literal_tag


@dataclass(frozen=True)
class Variant:
    norm: bool = False
    bias: bool = False
    residual: bool = False
    swiglu: bool = False
    rope: bool = False
    # The fused decode step's form (kernels/fused_step.py): eps is baked into the source instead of
    # a 0-d input (MLX keeps buffers of 8 bytes or less in managed memory, which the host touches
    # every step), the position is read from the step's device-resident `state`, and the RoPE
    # variant writes the new K and V rows straight into the KV cache buffers.
    fused: bool = False

    @property
    def name(self) -> str:
        flags = [f for f in ("norm", "bias", "residual", "swiglu", "rope", "fused") if getattr(self, f)]
        return "foundry_qgemv" + "".join(f"_{f}" for f in flags)

    @property
    def rows_per_unit(self) -> int:
        return 2 if self.swiglu or self.rope else 1

    def input_names(self) -> tuple[str, ...]:
        names = ["x", "w", "scales", "biases"]
        names += (["norm_weight"] if self.fused else ["norm_weight", "eps"]) if self.norm else []
        names += ["bias"] if self.bias else []
        names += ["residual"] if self.residual else []
        if self.rope:
            names += ["inv_freq", "state", "k_cache", "v_cache"] if self.fused else ["inv_freq", "position"]
        return tuple(names)


def row_expression(variant: Variant) -> str:
    """Row of `which` (0 or 1) in unit `unit`."""
    if variant.swiglu:
        return "(which == 0 ? unit : UNITS + unit)"  # [gate; up] stacked: gate row u, up row UNITS+u
    if variant.rope:
        return "((unit / HALF) * 2 * HALF + (unit % HALF) + which * HALF)"
    return "unit"


# The fused QKV kernel stores the new K and V rows at the step's position in the cache buffers
# (1, kv_heads, S, D) it was given as inputs: an in-place write MLX does not see. It is safe
# because nothing reads those positions before the attention kernel, which depends on this
# kernel's output, and it saves the two SliceUpdate nodes per layer a functional update costs.
_CACHE_WRITE = """
      if (row_a >= Q_ROWS) {
        const bool is_key = row_a < Q_ROWS + KV_ROWS;
        const int r = row_a - Q_ROWS - (is_key ? 0 : KV_ROWS);
        const long at = ((long)(r / HEAD_DIM) * S + state[0]) * HEAD_DIM + r % HEAD_DIM;
        MUTABLE(T, is_key ? k_cache : v_cache)[at] = static_cast<T>(a);
        MUTABLE(T, is_key ? k_cache : v_cache)[at + HALF] = static_cast<T>(b);
      }"""


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
        position = "state[0]" if variant.fused else "SCALAR(position)"
        cache_write = _CACHE_WRITE if variant.fused else ""
        return f"""
      const int d = unit % HALF;
      const int row_a = (unit / HALF) * 2 * HALF + d;
      const int row_b = row_a + HALF;
      float a = acc[u * 2 + 0];
      float b = acc[u * 2 + 1];{bias}
      a = static_cast<float>(static_cast<T>(a));
      b = static_cast<float>(static_cast<T>(b));
      if (row_a < ROPE_ROWS) {{
        const float angle = static_cast<float>({position}) * inv_freq[d];
        const float c = PRECISE_COS(angle);
        const float s = PRECISE_SIN(angle);
        const float rotated_a = a * c - b * s;
        b = b * c + a * s;
        a = rotated_a;
      }}
      y[row_a] = static_cast<T>(a);
      y[row_b] = static_cast<T>(b);{cache_write}"""
    lines = ["      float value = acc[u];"]
    if variant.bias:
        lines.append("      value = static_cast<float>(static_cast<T>(value) + bias[unit]);")
    if variant.residual:
        lines.append("      value = static_cast<float>(residual[unit]) + static_cast<float>(static_cast<T>(value));")
    lines.append("      y[unit] = static_cast<T>(value);")
    return "\n" + "\n".join(lines)


# A chunk's packed words with the widest aligned loads (16, 8 or 4 bytes); the prefill GEMM
# (kernels/qgemm_source.py) reads its weight tiles with the same helper.
LOAD_WORDS_CUDA = """
template <int W>
__device__ __forceinline__ void foundry_load_words(const uint32_t* source, unsigned int* target) {
  if constexpr (W % 4 == 0) {
#pragma unroll
    for (int i = 0; i < W / 4; ++i) {
      const uint4 v = reinterpret_cast<const uint4*>(source)[i];
      target[4 * i] = v.x; target[4 * i + 1] = v.y; target[4 * i + 2] = v.z; target[4 * i + 3] = v.w;
    }
  } else if constexpr (W % 2 == 0) {
#pragma unroll
    for (int i = 0; i < W / 2; ++i) {
      const uint2 v = reinterpret_cast<const uint2*>(source)[i];
      target[2 * i] = v.x; target[2 * i + 1] = v.y;
    }
  } else {
#pragma unroll
    for (int i = 0; i < W; ++i) target[i] = source[i];
  }
}
#define LOAD_WORDS(W, source, target) foundry_load_words<W>(source, target)
"""

_HEADER = {
    # Chunk loads: MLX arrays are 16-byte aligned and every chunk starts at a multiple of its own
    # size, so CUDA reads them with 16-byte vector loads; Metal's compiler merges the scalar loop.
    "cuda": """
template <typename T, int E>
__device__ __forceinline__ void foundry_load_floats(const T* source, float* target) {
  if constexpr ((E * sizeof(T)) % 16 == 0) {
    alignas(16) T staged[E];
#pragma unroll
    for (int i = 0; i < int(E * sizeof(T) / 16); ++i)
      reinterpret_cast<uint4*>(staged)[i] = reinterpret_cast<const uint4*>(source)[i];
#pragma unroll
    for (int i = 0; i < E; ++i) target[i] = static_cast<float>(staged[i]);
  } else {
#pragma unroll
    for (int i = 0; i < E; ++i) target[i] = static_cast<float>(source[i]);
  }
}
#define LOAD_FLOATS(T, E, source, target) foundry_load_floats<T, E>(source, target)
""" + LOAD_WORDS_CUDA,
    "metal": """
// One template for device and threadgroup sources: the pointer type (address space included)
// is deduced.
template <typename T, int E, typename Pointer>
inline void foundry_load_floats(Pointer source, thread float* target) {
  for (int i = 0; i < E; ++i) target[i] = static_cast<float>(source[i]);
}
template <int W>
inline void foundry_load_words(const device uint32_t* source, thread unsigned int* target) {
  for (int i = 0; i < W; ++i) target[i] = source[i];
}
#define LOAD_FLOATS(T, E, source, target) foundry_load_floats<T, E>(source, target)
#define LOAD_WORDS(W, source, target) foundry_load_words<W>(source, target)
""",
}


def chunk(bits: int) -> int:
    """Values per lane per step: 16, or 32 where 16 values would not fill whole 32-bit words.
    FOUNDRY_GEMV_WIDE=1 takes 32 for 4-bit too (16-byte weight loads; an experiment switch)."""
    if bits == 4 and os.environ.get("FOUNDRY_GEMV_WIDE") == "1":
        return 32
    return 16 if (16 * bits) % 32 == 0 else 32


def constants(rows_per_unit: int, per_row: str = "") -> str:
    """The kernel's derived constants and its reduction arrays; `per_row` (" * BATCH") sizes the
    arrays for the batched form (kernels/qgemv_batch.py), which shares this geometry."""
    return f"""
  constexpr int BITS_ = BITS;
  constexpr int E = CHUNK;                                // values per lane per step
  constexpr int W = E * BITS_ / 32;                      // packed words per chunk
  constexpr int STEP = 32 * E;                           // values per SIMD-group per step
  constexpr int WORDS_PER_ROW = K * BITS_ / 32;
  constexpr int GROUPS_PER_ROW = K / GROUP;
  constexpr unsigned int MASK = (1u << BITS_) - 1u;
  constexpr int RPU = {rows_per_unit};
  constexpr int SLOTS = ROWS * RPU;
  constexpr int THREADS = WARPS_N * WARPS_K * 32;
  SHARED float norm_partial[WARPS_N * WARPS_K{per_row}];
  SHARED float k_partial[WARPS_K * WARPS_N * SLOTS{per_row}];"""


def norm_stage(variant: Variant, eps: float | None) -> tuple[str, str]:
    """The RMSNorm prologue of a norm variant (empty otherwise) and the name x is read from."""
    if not variant.norm:
        return "", "x"
    stage = """
  // RMSNorm once per threadgroup: reduce sum(x^2), then stage T(x * inv_rms * w) in shared memory
  // (rounded to T, as mx.fast.rms_norm's output is), read by every SIMD-group below.
  SHARED T x_norm[K];
  float squares = 0.0f;
  for (int k = (int)thread_id; k < K; k += THREADS) {
    const float v = static_cast<float>(x[k]);
    squares += v * v;
  }
  squares = SIMD_SUM(squares);
  if (lane == 0) norm_partial[warp] = squares;
  BARRIER();
  float total = 0.0f;
  for (int i = 0; i < WARPS_N * WARPS_K; ++i) total += norm_partial[i];
  const float inv_rms = PRECISE_RSQRT(total / K + {eps});
  for (int k = (int)thread_id; k < K; k += THREADS) {
    x_norm[k] = static_cast<T>(static_cast<float>(x[k]) * inv_rms * static_cast<float>(norm_weight[k]));
  }
  BARRIER();
""".replace("{eps}", "SCALAR(eps)" if not variant.fused else float_literal(eps))
    return stage, "x_norm"


INDEXING = """
  // SIMD-group (warp_n, warp_k) owns ROWS units and every WARPS_K-th step along K.
  const int warp_n = (int)warp % WARPS_N;
  const int warp_k = (int)warp / WARPS_N;
  const int first_unit = ((int)group_id * WARPS_N + warp_n) * ROWS;
"""


def dot(words: str) -> str:
    """dot = Σ q_i · xs[i] over one chunk, q unpacked from `words` (W + 1 words, the last 0)."""
    return f"""
        float dot = 0.0f;
        for (int i = 0; i < E; ++i) {{
          const int bit = i * BITS_;
          const int shift = bit & 31;
          unsigned int q = {words}[bit >> 5] >> shift;
          if (shift + BITS_ > 32) q |= {words}[(bit >> 5) + 1] << (32 - shift);
          dot += static_cast<float>(q & MASK) * xs[i];
        }}"""


def tail(variant: Variant, unrolled: bool = False) -> str:
    """SIMD-sum the lanes, add split-K partial sums, and the epilogue (lane 0 of warp_k 0).
    `unrolled`: every loop unrolled, so acc stays in registers (no local-memory stack frame)."""
    unroll = "\n#pragma unroll" if unrolled else ""
    stop = "if (unit < UNITS) {" if unrolled else "if (unit >= UNITS) break;"
    close = "\n      }" if unrolled else ""
    return f"""{unroll}
  for (int r = 0; r < SLOTS; ++r) acc[r] = SIMD_SUM(acc[r]);
  if (WARPS_K > 1) {{
    // Split K: the SIMD-groups sharing these units add their partial sums through shared memory.
    if (lane == 0) {{{unroll}
      for (int r = 0; r < SLOTS; ++r) k_partial[(warp_k * WARPS_N + warp_n) * SLOTS + r] = acc[r];
    }}
    BARRIER();{unroll}
    for (int r = 0; r < SLOTS; ++r) {{
      float sum = 0.0f;
      for (int part = 0; part < WARPS_K; ++part) sum += k_partial[(part * WARPS_N + warp_n) * SLOTS + r];
      acc[r] = sum;
    }}
  }}
  if (warp_k == 0 && lane == 0) {{{unroll}
    for (int u = 0; u < ROWS; ++u) {{
      const int unit = first_unit + u;
      {stop}{_epilogue(variant)}{close}
    }}
  }}
"""


def body(variant: Variant, eps: float | None = None, unroll: int = 1) -> str:
    """`unroll` > 1 unrolls the walk along K that many steps, so a SIMD-group has that many steps'
    weight loads in flight instead of one (the standalone kernels' FOUNDRY_GEMV_UNROLL)."""
    stage, x_source = norm_stage(variant, eps)
    pragma = f"\n#pragma unroll {unroll}" if unroll > 1 else ""
    return f"""{constants(variant.rows_per_unit)}
{stage}{INDEXING}
  float acc[SLOTS];
  for (int r = 0; r < SLOTS; ++r) acc[r] = 0.0f;
  if (first_unit < UNITS) {{{pragma}
    for (int base = (warp_k * 32 + (int)lane) * E; base < K; base += WARPS_K * STEP) {{
      float xs[E];
      LOAD_FLOATS(T, E, {x_source} + base, xs);
      float x_sum = 0.0f;
      for (int i = 0; i < E; ++i) x_sum += xs[i];
      for (int r = 0; r < SLOTS; ++r) {{
        const int unit = first_unit + r / RPU;
        const int which = r % RPU;
        if (unit >= UNITS) break;
        const int row = {row_expression(variant)};
        unsigned int words[W + 1];
        LOAD_WORDS(W, w + (long)row * WORDS_PER_ROW + base * BITS_ / 32, words);
        words[W] = 0u;{dot("words")}
        const long g = (long)row * GROUPS_PER_ROW + base / GROUP;
        acc[r] += static_cast<float>(scales[g]) * dot + static_cast<float>(biases[g]) * x_sum;
      }}
    }}
  }}{tail(variant)}"""


def kernel_source(variant: Variant, backend: str, eps: float | None = None) -> KernelSource:
    """The kernel for `backend`; a fused variant with a norm bakes `eps` into its source and name."""
    name = variant.name
    if variant.fused and variant.norm:
        name += "_eps" + literal_tag(eps)
    from . import qgemv_deferred_norm

    make = qgemv_deferred_norm.body if variant.norm and qgemv_deferred_norm.enabled() else body
    return KernelSource(name, variant.input_names(), ("y",),
                        runtime_capacity(variant) + make(variant, eps, unroll=unroll_steps(backend)), _HEADER[backend])


def unroll_steps(backend: str) -> int:
    """Steps along K the standalone GEMVs unroll: 2 on CUDA, measured with two rows per SIMD-group
    (qgemv_launch.STANDALONE_ROWS; 4 steps measured slower), 1 on Metal (the compiler's choice,
    until measured there). FOUNDRY_GEMV_UNROLL overrides."""
    return max(1, int(os.environ.get("FOUNDRY_GEMV_UNROLL", "2" if backend == "cuda" else "1")))


def runtime_capacity(variant: Variant) -> str:
    """The fused QKV kernel's cache capacity S, read from the cache's shape at run time rather than
    baked into the source: one compile serves every capacity (a baked S compiled the kernel again
    at every 256-position step of a reply)."""
    return "  const int S = k_cache_shape[2];\n" if variant.rope and variant.fused else ""


MAX_STAGED_BYTES = 32768  # Metal's threadgroup memory; the normalised x is staged there


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
