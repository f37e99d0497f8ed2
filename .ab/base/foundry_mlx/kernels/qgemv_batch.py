"""Quantized GEMV for B token rows at once: each weight row is read once and dotted with B inputs.

Why: a batched decode step of B sequences is bound by reading the weights (and, through MLX, by
host time per graph node), not by arithmetic, so B rows should cost one weight read and one
launch, not B (llama.cpp's mmvq does the same for up to 8 columns). This is the fused variants of
kernels/qgemv.py (norm, bias, RoPE + KV-cache write, residual, SwiGLU) with a row count `BATCH`
as a template constant: x is (B, K), the output (B, N), the step's `state` (B, 8) gives every row
its own position, and the QKV variant writes row b's K and V into slot b of the (B, kv_heads, S, D)
cache buffers.

Algorithm: qgemv's geometry and unit ownership, unchanged. Per 32-value block a lane loads and
unpacks its words once, then for each row b loads that row's x and accumulates
`scale·(q·x_b) + bias·Σx_b`; acc holds SLOTS × BATCH sums. With an RMSNorm, the B rows are
normalised once per threadgroup and staged in shared memory where B·K values fit (`STAGE`, as the
single-row kernel stages its one row); beyond that they are normalised on the fly per weight row
(twice the arithmetic of the dot product itself: at B = 8 that made the step ~2.5x the B = 1
step's device time, measured on the H200 at 1eb91fa). The arithmetic per row is the single-row
kernel's, in the same order, so a row's result does not depend on its neighbours. The single-row
sources (qgemv.body) are left as they are: B = 1 keeps its kernels and its speed.
"""

from __future__ import annotations

import mlx.core as mx

from ..quant import QuantizedWeight
from . import qgemv, qgemv_launch
from .source import KernelSource, float_literal, literal_tag

STATE_STRIDE = 8  # int32s per row of the step's state (kernels/sample.py)
# The B normalised rows staged in shared memory: at most this many bytes, leaving room under
# Metal's 32 KB of threadgroup memory for the kernel's other arrays (0.5B, B = 8, float16: 14 KB).
STAGED_BYTES = 24 << 10

# The single-row epilogue's indices, and the batched kernel's: row b of acc, y, residual, state
# and of the KV cache. Every pattern must be found (checked), so a change in qgemv's epilogue
# that these do not cover fails loudly instead of writing row 0 for every b.
_ROW_INDICES = (
    ("acc[u * 2 + 0]", "acc[(u * 2 + 0) * BATCH + item]"),
    ("acc[u * 2 + 1]", "acc[(u * 2 + 1) * BATCH + item]"),
    ("acc[u]", "acc[u * BATCH + item]"),
    ("y[unit]", "y[(long)item * Y_COLS + unit]"),
    ("y[row_a]", "y[(long)item * Y_COLS + row_a]"),
    ("y[row_b]", "y[(long)item * Y_COLS + row_b]"),
    ("residual[unit]", "residual[(long)item * Y_COLS + unit]"),
    ("state[0]", "state[item * STATE_STRIDE]"),
    ("(long)(r / HEAD_DIM) * S", "(long)(item * (KV_ROWS / HEAD_DIM) + r / HEAD_DIM) * S"),
)


def _batched_epilogue(variant: qgemv.Variant, picked: bool = False) -> str:
    """qgemv's epilogue for row `item`: with `picked`, the sums come from `mine` (this lane's item,
    chosen from acc by `_PICK`), else from acc directly."""
    text = qgemv._epilogue(variant)
    used = 0
    for old, new in _ROW_INDICES:
        if picked and old.startswith("acc["):
            new = old.replace("acc[", "mine[")
        used += old in text
        text = text.replace(old, new)
    if used == 0 or "acc[u" in text.replace("acc[u * BATCH", "").replace("acc[(u", ""):
        raise AssertionError(f"qgemv's epilogue for {variant.name} has indices the batched form does not know")
    return text


# Lane `item` takes row item's SLOTS sums out of acc (every lane holds all of them after SIMD_SUM)
# by a chain of selects, so that acc keeps compile-time indices (registers, not local memory).
_PICK = """
    float mine[SLOTS];
#pragma unroll
    for (int r = 0; r < SLOTS; ++r) {
      float v = acc[r * BATCH];
#pragma unroll
      for (int i = 1; i < BATCH; ++i) v = ((int)lane == i) ? acc[r * BATCH + i] : v;
      mine[r] = v;
    }"""


def body(variant: qgemv.Variant, eps: float | None = None) -> str:
    if not variant.fused:
        raise ValueError("the batched GEMV is the fused decode step's form (state, baked eps)")
    rows_per_unit = variant.rows_per_unit
    norm_stage, norm_load, norm_apply = "", "", ""
    x_load = """
          LOAD_FLOATS(T, E, x + (long)item * K + base, xs);"""
    if variant.norm:
        norm_stage = f"""
  // RMSNorm of every row: B sums of squares per threadgroup, in the single-row kernel's order.
  SHARED float inv_rms[BATCH];
  for (int item = 0; item < BATCH; ++item) {{
    float squares = 0.0f;
    for (int k = (int)thread_id; k < K; k += THREADS) {{
      const float v = static_cast<float>(x[(long)item * K + k]);
      squares += v * v;
    }}
    squares = SIMD_SUM(squares);
    if (lane == 0) norm_partial[warp * BATCH + item] = squares;
  }}
  BARRIER();
  if ((int)thread_id < BATCH) {{
    float total = 0.0f;
    for (int i = 0; i < WARPS_N * WARPS_K; ++i) total += norm_partial[i * BATCH + (int)thread_id];
    inv_rms[thread_id] = PRECISE_RSQRT(total / K + {float_literal(eps)});
  }}
  BARRIER();
  // Where B rows of K fit (STAGE), the normalised rows are staged once per threadgroup, as the
  // single-row kernel stages its one: normalising in the weight loop redid it for every weight row.
  SHARED T x_norm[STAGE ? BATCH * K : 1];
  if (STAGE) {{
    for (int item = 0; item < BATCH; ++item) {{
      for (int k = (int)thread_id; k < K; k += THREADS) {{
        x_norm[item * K + k] = static_cast<T>(static_cast<float>(x[(long)item * K + k]) * inv_rms[item]
                                              * static_cast<float>(norm_weight[k]));
      }}
    }}
    BARRIER();
  }}
"""
        norm_load = """
      float norm_weights[E];
      if (!STAGE) LOAD_FLOATS(T, E, norm_weight + base, norm_weights);"""
        norm_apply = """
            if (!STAGE) {
              for (int i = 0; i < E; ++i) {
                xs[i] = static_cast<float>(static_cast<T>(xs[i] * inv_rms[item] * norm_weights[i]));
              }
            }"""
        x_load = f"""
          if (STAGE) {{
            LOAD_FLOATS(T, E, x_norm + item * K + base, xs);
          }} else {{
            LOAD_FLOATS(T, E, x + (long)item * K + base, xs);{norm_apply}
          }}"""
    return f"""{qgemv.constants(rows_per_unit, " * BATCH")}
{norm_stage}
  const int warp_n = (int)warp % WARPS_N;
  const int warp_k = (int)warp / WARPS_N;
  const int first_unit = ((int)group_id * WARPS_N + warp_n) * ROWS;

  float acc[SLOTS * BATCH];
  for (int r = 0; r < SLOTS * BATCH; ++r) acc[r] = 0.0f;
  if (first_unit < UNITS) {{
    for (int base = (warp_k * 32 + (int)lane) * E; base < K; base += WARPS_K * STEP) {{{norm_load}
#pragma unroll
      for (int r = 0; r < SLOTS; ++r) {{
        const int unit = first_unit + r / RPU;
        const int which = r % RPU;
        if (unit >= UNITS) break;
        const int row = {qgemv.row_expression(variant)};
        unsigned int words[W + 1];
        LOAD_WORDS(W, w + (long)row * WORDS_PER_ROW + base * BITS_ / 32, words);
        words[W] = 0u;
        float qs[E];
        for (int i = 0; i < E; ++i) {{
          const int bit = i * BITS_;
          const int shift = bit & 31;
          unsigned int q = words[bit >> 5] >> shift;
          if (shift + BITS_ > 32) q |= words[(bit >> 5) + 1] << (32 - shift);
          qs[i] = static_cast<float>(q & MASK);
        }}
        const long g = (long)row * GROUPS_PER_ROW + base / GROUP;
        const float scale = static_cast<float>(scales[g]);
        const float offset = static_cast<float>(biases[g]);
#pragma unroll
        for (int item = 0; item < BATCH; ++item) {{
          float xs[E];{x_load}
          float x_sum = 0.0f;
          for (int i = 0; i < E; ++i) x_sum += xs[i];
          float dot = 0.0f;
          for (int i = 0; i < E; ++i) dot += qs[i] * xs[i];
          acc[r * BATCH + item] += scale * dot + offset * x_sum;
        }}
      }}
    }}
  }}
  for (int r = 0; r < SLOTS * BATCH; ++r) acc[r] = SIMD_SUM(acc[r]);
  if (WARPS_K > 1) {{
    if (lane == 0) {{
      for (int r = 0; r < SLOTS * BATCH; ++r) k_partial[(warp_k * WARPS_N + warp_n) * SLOTS * BATCH + r] = acc[r];
    }}
    BARRIER();
    for (int r = 0; r < SLOTS * BATCH; ++r) {{
      float sum = 0.0f;
      for (int part = 0; part < WARPS_K; ++part) sum += k_partial[(part * WARPS_N + warp_n) * SLOTS * BATCH + r];
      acc[r] = sum;
    }}
  }}
  // The epilogue (bias, RoPE and the KV write, SwiGLU, residual) of row b runs on lane b, all B
  // rows at once; one lane running all B of them in turn was a serial tail as long as the dot
  // products themselves at B = 8. Past 32 rows (a lane each), lane 0 runs them in turn.
  if (BATCH <= 32) {{
    if (warp_k == 0 && (int)lane < BATCH) {{{_PICK}
      const int item = (int)lane;
      for (int u = 0; u < ROWS; ++u) {{
        const int unit = first_unit + u;
        if (unit >= UNITS) break;{_batched_epilogue(variant, picked=True)}
      }}
    }}
  }} else if (warp_k == 0 && lane == 0) {{
    for (int u = 0; u < ROWS; ++u) {{
      const int unit = first_unit + u;
      if (unit >= UNITS) break;
#pragma unroll
      for (int item = 0; item < BATCH; ++item) {{{_batched_epilogue(variant)}
      }}
    }}
  }}
"""


def kernel_source(variant: qgemv.Variant, backend: str, eps: float | None = None) -> KernelSource:
    """The batched kernel of `variant` for `backend` (its own name: a distinct source)."""
    name = variant.name + "_batch"
    if variant.norm:
        name += "_eps" + literal_tag(eps)
    return KernelSource(name, variant.input_names(), ("y",), qgemv.runtime_capacity(variant) + body(variant, eps),
                        qgemv._HEADER[backend])


def launch(
    variant: qgemv.Variant,
    x: mx.array,
    weight: QuantizedWeight,
    norm_weight: mx.array | None = None,
    bias: mx.array | None = None,
    residual: mx.array | None = None,
    inv_freq: mx.array | None = None,
    rope_rows: int = 0,
    head_dim: int = 0,
    state: mx.array | None = None,
    k_cache: mx.array | None = None,
    v_cache: mx.array | None = None,
) -> qgemv_launch.Launch:
    """Arguments for one call on B rows: x (B, K); residual (B, N); state (B, 8); the caches
    (B, kv_heads, S, D). The output is (B, N), or (B, N / 2) for SwiGLU."""
    n_rows, k = weight.shape
    batch = x.shape[0]
    if x.ndim != 2 or x.shape[1] != k or k % 32 or k % weight.group_size:
        raise ValueError(f"batched GEMV needs x of (B, {k}) with K a multiple of 32 and of the group; got {x.shape}")
    inputs = [x, weight.weight, weight.scales, weight.biases]
    inputs += [norm_weight] if variant.norm else []
    inputs += [bias] if variant.bias else []
    inputs += [residual] if variant.residual else []
    cache_template = []
    if variant.rope:
        kv_heads = k_cache.shape[1]
        inv_freq = inv_freq if inv_freq.dtype == mx.float32 else inv_freq.astype(mx.float32)
        inputs += [inv_freq, state, k_cache, v_cache]
        cache_template = [("Q_ROWS", rope_rows - kv_heads * head_dim), ("KV_ROWS", kv_heads * head_dim),
                          ("HEAD_DIM", head_dim)]
    units = n_rows // variant.rows_per_unit
    columns = units if variant.swiglu else n_rows
    constants, groups = qgemv_launch.shape_constants(units, k, weight.bits, weight.group_size)
    if batch > 1 and constants["ROWS"] > 1:
        # One row per SIMD-group: x is reloaded per row anyway, and two rows' B sums each would hold
        # 2·B accumulators per lane (the LM head at B = 8: 196 registers, against 80 with one row).
        constants["ROWS"] = 1
        groups = -(-units // constants["WARPS_N"])
    template = [("T", x.dtype), *constants.items(), ("HALF", max(head_dim // 2, 1)), ("ROPE_ROWS", rope_rows),
                ("BATCH", batch), ("Y_COLS", columns), ("STATE_STRIDE", STATE_STRIDE)] + cache_template
    if variant.norm:  # stage the B normalised rows in shared memory where they fit
        template.append(("STAGE", batch * k * x.dtype.size <= STAGED_BYTES))
    threads = qgemv_launch.WARPS * 32
    return qgemv_launch.Launch(inputs, template, (groups * threads, 1, 1), (threads, 1, 1), (batch, columns), x.dtype)
