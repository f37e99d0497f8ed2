"""Decode attention: one query token against the KV cache, grouped-query heads, one kernel.

Why our own: MLX's fused attention kernels (cuDNN and `sdpa_vector` on CUDA) take no array
mask, and a compiled decode step must attend over the whole fixed-size cache buffer with the
unwritten positions excluded; with a mask MLX falls back to separate matmul/softmax kernels
(measured: the compiled reference step got slower, 2.8 → 3.6 ms per token on the H100). This
kernel takes the buffer and the number of valid positions as an array, so the step keeps fixed
shapes and attention stays one launch.

Algorithm: one threadgroup per query head (its KV head is head / (heads / kv_heads)), with 4 to
32 SIMD-groups as the buffer is longer. Lanes form sub-groups of D/8 lanes, each lane holding 8
of the head's D dimensions, so a SIMD-group scores 32·8/D positions at once (4 for D = 64);
SIMD-groups stride over the positions. Every sub-group keeps an online softmax (running max,
sum and weighted values); sub-groups merge by shuffles, SIMD-groups through shared memory, and
D threads write the result. (Measured on the H100, 7B shape at depth 2048: a fixed 8 SIMD-groups
per head left the GPU mostly idle, 0.91x mlx-lm's decode.) Loops run the same number of times on every lane (a
position past the end only masks its score), so the shuffles are never divergent.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .source import KernelSource, float_literal, literal_tag, rewritten, scalar

DIMS_PER_LANE = 8


def warps_for(buffer_length: int) -> int:
    """SIMD-groups per head: more for long caches (a head's positions are split among them), so
    that even 14 or 28 heads keep the GPU busy at a depth of thousands of positions."""
    warps = 4
    while warps < 32 and warps * 64 < buffer_length:
        warps *= 2
    return warps

BODY = """
  constexpr int LANES = D / 8;              // lanes per position
  constexpr int PER_WARP = 32 / LANES;      // positions a SIMD-group scores at once
  constexpr int PARTS = WARPS;              // partial softmaxes merged at the end (one per SIMD-group)
  constexpr int AHEAD = 4;                  // steps of positions whose loads are in flight at once
  SHARED float part_max[PARTS];
  SHARED float part_sum[PARTS];
  SHARED float part_acc[PARTS * D];

  const int head = (int)group_id;
  const int kv_head = head / (HEADS / KV_HEADS);
  const int sub = (int)lane / LANES;
  const int piece = (int)lane % LANES;
  const int length = SCALAR(valid);
  const float scale = SCALAR(softmax_scale);

  float qs[8];
  for (int i = 0; i < 8; ++i) qs[i] = static_cast<float>(q[head * D + piece * 8 + i]) * scale;
  float running_max = NEG_INFINITY;
  float running_sum = 0.0f;
  float acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = 0.0f;

  const long head_base = (long)kv_head * S * D;
  // AHEAD steps' keys and values are loaded before any is used: one memory latency per AHEAD
  // steps, not per step (a step's score waits on its loads, and the next step's loads were issued
  // only after it). Out-of-range positions read position 0 and are masked.
  for (int first = (int)warp * PER_WARP; first < length; first += WARPS * PER_WARP * AHEAD) {
    T key_rows[AHEAD][8];
    T value_rows[AHEAD][8];
#pragma unroll
    for (int step = 0; step < AHEAD; ++step) {
      const int position = first + step * WARPS * PER_WARP + sub;
      const long at = head_base + (long)(position < length ? position : 0) * D + piece * 8;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        key_rows[step][i] = keys[at + i];
        value_rows[step][i] = values[at + i];
      }
    }
#pragma unroll
    for (int step = 0; step < AHEAD; ++step) {
      const int position = first + step * WARPS * PER_WARP + sub;
      const bool valid_position = position < length;
      float score = 0.0f;
      for (int i = 0; i < 8; ++i) score += qs[i] * static_cast<float>(key_rows[step][i]);
      for (int offset = LANES / 2; offset > 0; offset >>= 1) score += SIMD_SHUFFLE_XOR(score, offset);
      if (valid_position) {
        const float new_max = max(running_max, score);
        const float correction = PRECISE_EXP(running_max - new_max);
        const float weight = PRECISE_EXP(score - new_max);
        running_sum = running_sum * correction + weight;
        for (int i = 0; i < 8; ++i) acc[i] = acc[i] * correction + weight * static_cast<float>(value_rows[step][i]);
        running_max = new_max;
      }
    }
  }
  // Merge the SIMD-group's sub-groups (lanes with the same `piece`) by butterfly shuffles.
  for (int offset = LANES; offset < 32; offset <<= 1) {
    const float other_max = SIMD_SHUFFLE_XOR(running_max, offset);
    const float other_sum = SIMD_SHUFFLE_XOR(running_sum, offset);
    float other_acc[8];
    for (int i = 0; i < 8; ++i) other_acc[i] = SIMD_SHUFFLE_XOR(acc[i], offset);
    const float merged = max(running_max, other_max);
    if (merged != NEG_INFINITY) {  // both empty: nothing to merge (and exp(-inf + inf) is NaN)
      const float mine = running_sum > 0.0f ? PRECISE_EXP(running_max - merged) : 0.0f;
      const float theirs = other_sum > 0.0f ? PRECISE_EXP(other_max - merged) : 0.0f;
      running_sum = running_sum * mine + other_sum * theirs;
      for (int i = 0; i < 8; ++i) acc[i] = acc[i] * mine + other_acc[i] * theirs;
      running_max = merged;
    }
  }
  const int part = (int)warp;
  if (sub == 0) {
    if (piece == 0) {
      part_max[part] = running_max;
      part_sum[part] = running_sum;
    }
    for (int i = 0; i < 8; ++i) part_acc[part * D + piece * 8 + i] = acc[i];
  }
  BARRIER();
  if ((int)thread_id < D) {
    float overall = NEG_INFINITY;
    for (int p = 0; p < PARTS; ++p) overall = max(overall, part_max[p]);
    float total = 0.0f;
    float value = 0.0f;
    for (int p = 0; p < PARTS; ++p) {
      if (part_sum[p] == 0.0f) continue;  // a part that saw no position
      const float w = PRECISE_EXP(part_max[p] - overall);
      total += part_sum[p] * w;
      value += part_acc[p * D + (int)thread_id] * w;
    }
    out[head * D + (int)thread_id] = static_cast<T>(value / total);
  }
"""


# The cache capacity S (the buffers' third axis) is read from the keys' shape at run time, not baked
# in: a source per capacity meant an NVRTC compile of every attention kernel each time a sequence
# crossed a 256-position step (seconds of stall mid-reply, and per batch layout in the server).
RUNTIME_S = "  const int S = keys_shape[2];\n"

SOURCE = KernelSource("foundry_decode_attention", ("q", "keys", "values", "valid", "softmax_scale"), ("out",),
                      RUNTIME_S + BODY)


def from_state(body: str, scale: float) -> str:
    """`body` in the fused step's form: the valid length is the step's position + 1, read from its
    device-resident `state`, and the scale is baked in (no 0-d inputs: MLX keeps those in managed
    memory)."""
    return body.replace("SCALAR(valid)", "(state[0] + 1)").replace("SCALAR(softmax_scale)", float_literal(scale))


def fused_source(scale: float) -> KernelSource:
    """The fused decode step's form: the query is the head of the fused QKV kernel's output (Q rows
    come first), the valid length is the step's position + 1 read from its device-resident `state`,
    and the scale is baked into the source (no 0-d inputs: MLX keeps those in managed memory)."""
    body = RUNTIME_S + from_state(BODY, scale)
    return KernelSource("foundry_decode_attention_fused_s" + literal_tag(scale), ("q", "keys", "values", "state"),
                        ("out",), body)


# The batched form: threadgroup g is (row g / HEADS, head g % HEADS); row b's query is in row b of
# the QKV output, its keys in slot b of the (B, kv_heads, S, D) buffers, its length in its state.
_BATCH_ROWS = (
    ("const int head = (int)group_id;", "const int row = (int)group_id / HEADS;\n  const int head = (int)group_id % HEADS;"),
    ("q[head * D + piece * 8 + i]", "q[(long)row * QKV_COLS + head * D + piece * 8 + i]"),
    ("const long head_base = (long)kv_head * S * D;", "const long head_base = ((long)row * KV_HEADS + kv_head) * S * D;"),
    ("out[head * D + (int)thread_id]", "out[((long)row * HEADS + head) * D + (int)thread_id]"),
    ("(state[0] + 1)", "(state[row * STATE_STRIDE] + 1)"),
)


def batched_source(scale: float) -> KernelSource:
    """`fused_source` for B rows: every (row, query head) a threadgroup, each row at its own
    position (state[b, 0]); a parked row of a batch (position 0) reads one position."""
    fused = fused_source(scale)
    return KernelSource(fused.name.replace("_fused_", "_batch_"), fused.input_names, fused.output_names,
                        rewritten(fused.body, _BATCH_ROWS))


def batched_launch_arguments(qkv: mx.array, keys: mx.array, values: mx.array, state: mx.array, heads: int) -> dict:
    """Keyword arguments for `batched_source`'s kernel: qkv (B, QKV width), the (B, kv_heads, S, D)
    buffers, state (B, 8); the output is (B, heads * D)."""
    batch = qkv.shape[0]
    arguments = _launch([qkv, keys, values, state], qkv.dtype, heads * batch, keys)
    arguments["template"] = [*arguments["template"], ("QKV_COLS", qkv.shape[1]), ("STATE_STRIDE", state.shape[1])]
    for index, (name, _) in enumerate(arguments["template"]):
        if name == "HEADS":
            arguments["template"][index] = ("HEADS", heads)
    arguments["output_shapes"] = [(batch, heads * keys.shape[3])]
    return arguments


def fused_launch_arguments(qkv: mx.array, keys: mx.array, values: mx.array, state: mx.array, heads: int) -> dict:
    """Keyword arguments for `fused_source`'s kernel: attention of `heads` query heads over the
    first state[0] + 1 positions of the (1, kv_heads, S, D) buffers."""
    return _launch([qkv, keys, values, state], qkv.dtype, heads, keys)


def _launch(inputs: list, dtype: mx.Dtype, heads: int, keys: mx.array) -> dict:
    """The call's keyword arguments for `heads` query heads over `keys`' (1, kv_heads, S, D) buffer."""
    _, kv_heads, length, head_dim = keys.shape
    if head_dim % DIMS_PER_LANE or 32 % (head_dim // DIMS_PER_LANE) or heads % kv_heads:
        raise ValueError(f"decode attention needs head_dim in (8, 16, 32, 64, 128, 256); got {head_dim}")
    warps = warps_for(length)
    return dict(
        inputs=inputs,
        template=[("T", dtype), ("D", head_dim), ("HEADS", heads), ("KV_HEADS", kv_heads), ("WARPS", warps)],
        grid=(heads * warps * 32, 1, 1),
        threadgroup=(warps * 32, 1, 1),
        output_shapes=[(heads * head_dim,)],
        output_dtypes=[dtype],
    )


def launch_arguments(q: mx.array, keys: mx.array, values: mx.array, valid: mx.array, scale: float) -> dict:
    """Keyword arguments for the MLX kernel call. `keys`/`values`: (1, kv_heads, S, D) buffers;
    `valid`: 0-d int32, how many positions (from 0) hold keys; `q`: n_heads * D values."""
    heads = q.size // keys.shape[3]
    return _launch([q.reshape(-1), keys, values, valid, scalar(scale, mx.float32)], q.dtype, heads, keys)


def supported(head_dim: int) -> bool:
    return head_dim % DIMS_PER_LANE == 0 and 32 % (head_dim // DIMS_PER_LANE) == 0 and head_dim <= 256


def reference(q: mx.array, keys: mx.array, values: mx.array, valid: int, scale: float) -> mx.array:
    """The same attention in MLX ops: the first `valid` positions of the buffers."""
    _, kv_heads, _, head_dim = keys.shape
    queries = q.reshape(1, -1, 1, head_dim)
    out = mx.fast.scaled_dot_product_attention(
        queries, keys[:, :, :valid, :], values[:, :, :valid, :], scale=scale, mask=None
    )
    return out.reshape(-1)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
