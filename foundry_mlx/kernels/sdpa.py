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
import os

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


def split_body() -> str:
    """BODY split over positions (the layer kernel's attention phase, kernels/fused_layer.py):
    virtual threadgroup g takes head g / SPLITS over the (g % SPLITS)-th share of the positions
    and writes its partial softmax (max, sum, unnormalised weighted values: D + 2 floats) to
    `parts`; `MERGE_BODY` combines a head's shares. Without the split, a 14-head model keeps 14
    threadgroups busy at any depth (the layer kernel measured 391 tok/s at depth 2048 that way)."""
    return rewritten(BODY, (
        ("  const int head = (int)group_id;\n",
         "  const int head = (int)group_id / SPLITS;\n  const int split = (int)group_id % SPLITS;\n"),
        ("  const int length = SCALAR(valid);\n", """  const int length = SCALAR(valid);
  // Whole SIMD-group rows per share, so every lane of a SIMD-group runs its loop equally often.
  const int share = ((length + SPLITS - 1) / SPLITS + PER_WARP - 1) / PER_WARP * PER_WARP;
  const int begin = split * share;
  const int end = min(length, begin + share);
"""),
        ("for (int first = (int)warp * PER_WARP; first < length;", "for (int first = begin + (int)warp * PER_WARP; first < end;"),
        ("(position < length ? position : 0)", "(position < end ? position : 0)"),
        ("const bool valid_position = position < length;", "const bool valid_position = position < end;"),
        ("    out[head * D + (int)thread_id] = static_cast<T>(value / total);\n", """    float* part = parts + (long)group_id * (D + 2);
    part[2 + (int)thread_id] = value;
    if (thread_id == 0) {
      part[0] = overall;
      part[1] = total;
    }
"""),
    ), once=True)


# Combine a head's SPLITS partial softmaxes (split_body) into its output: virtual threadgroup = head.
MERGE_BODY = """
  if ((int)thread_id < D) {
    const int head = (int)group_id;
    float overall = NEG_INFINITY;
    for (int s = 0; s < SPLITS; ++s) {
      const float* part = parts + (long)(head * SPLITS + s) * (D + 2);
      if (part[1] > 0.0f) overall = max(overall, part[0]);
    }
    float total = 0.0f;
    float value = 0.0f;
    for (int s = 0; s < SPLITS; ++s) {
      const float* part = parts + (long)(head * SPLITS + s) * (D + 2);
      if (part[1] == 0.0f) continue;  // a share that saw no position
      const float w = PRECISE_EXP(part[0] - overall);
      total += part[1] * w;
      value += part[2 + (int)thread_id] * w;
    }
    out[head * D + (int)thread_id] = static_cast<T>(value / total);
  }
"""


# CUDA: the share of a head that finishes last merges the head's shares in the same launch (the
# "last block" pattern of CUDA's threadFenceReduction sample), so a split attention needs no merge
# pass: no second kernel (a graph node, ~4 µs of MLX host time) in the five-kernel step, and no
# grid barrier plus merge phase in the layer kernel. Each share fences its part, then one thread
# counts the share in for its head with `atomicInc`, which wraps the counter back to 0 at the
# SPLITS-th arrival, so every launch leaves the counters as it found them. The counters
# (`shares_done`, one per head) sit after the parts in the same scratch buffer, zeroed when it is
# made: a large buffer lives in device memory (a tiny MLX buffer would be in managed memory, where
# an atomic costs hundreds of µs), and two launches with their own scratch never share a counter
# (MLX's CUDA graph runs kernels without a data dependency side by side).
# The merge reads the other shares' parts from L2 (`__ldcg`, past this SM's L1) MERGE_BATCH shares
# at a time, all loads of a batch issued before any is used, and merges them online (running max,
# rescaled sums). The first version read them with volatile loads in MERGE_BODY's two passes, one
# share after another: ~2 × SPLITS dependent L2 round trips, and the layer kernel's attention phase
# took 5.3 µs at a single position on the H200 (h200-layer-timing-fa7d717.txt).
MAX_HEADS = 256
MERGE_BATCH = 16
_LAST_SHARE_MERGES = """
  SHARED unsigned int merge_here;
  __threadfence();
  BARRIER();
  if (thread_id == 0) {
    const unsigned int last = (unsigned int)(SPLITS - 1);
    merge_here = atomicInc(shares_done + head, last) == last;
  }
  BARRIER();
  if (merge_here && (int)thread_id < D) {
    __threadfence();
    float overall = NEG_INFINITY;
    float total = 0.0f;
    float value = 0.0f;
    for (int first = 0; first < SPLITS; first += MERGE_BATCH) {
      float share_max[MERGE_BATCH], share_sum[MERGE_BATCH], share_value[MERGE_BATCH];
#pragma unroll
      for (int j = 0; j < MERGE_BATCH; ++j) {
        const float* part = parts + (long)(head * SPLITS + min(first + j, SPLITS - 1)) * (D + 2);
        share_max[j] = __ldcg(part);
        share_sum[j] = first + j < SPLITS ? __ldcg(part + 1) : 0.0f;
        share_value[j] = __ldcg(part + 2 + (int)thread_id);
      }
#pragma unroll
      for (int j = 0; j < MERGE_BATCH; ++j) {
        if (share_sum[j] == 0.0f) continue;  // a share that saw no position (or past the last)
        const float merged = max(overall, share_max[j]);
        const float mine = PRECISE_EXP(overall - merged);
        const float theirs = PRECISE_EXP(share_max[j] - merged);
        total = total * mine + share_sum[j] * theirs;
        value = value * mine + share_value[j] * theirs;
        overall = merged;
      }
    }
    out[head * D + (int)thread_id] = static_cast<T>(value / total);
  }
""".replace("MERGE_BATCH", str(MERGE_BATCH))


def merged_split_body() -> str:
    """split_body with the merge done by each head's last share (CUDA: device atomics, fences)."""
    return split_body() + _LAST_SHARE_MERGES


MAX_SPLITS = 32
# Blocks the split attention aims for: about two per SM of an H100/H200 (132 SMs). A setting to
# measure (FOUNDRY_ATTENTION_BLOCKS): more blocks put more positions' loads in flight at once.
TARGET_BLOCKS = int(os.environ.get("FOUNDRY_ATTENTION_BLOCKS", "256"))


def splits_for(heads: int, capacity: int) -> int:
    """Shares per head for the split attention: enough blocks to fill the GPU, none smaller than
    64 positions of the buffer (a share's fixed cost is a block's launch and one merge read)."""
    return max(1, min(MAX_SPLITS, TARGET_BLOCKS // heads, capacity // 64))


def split_warps(dims: int) -> int:
    """SIMD-groups per share: four, or enough that D threads write the merged head."""
    return max(4, dims // 32)


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


def split_source(scale: float) -> KernelSource:
    """The fused step's attention on CUDA: block g takes head g / SPLITS over a share of the
    positions, and each head's last share merges (SPLITS = the launch's blocks per head, so one
    compile serves every split count). `parts` is a float32 scratch buffer of heads × MAX_SPLITS ×
    (D + 2), written in place. Why (H200, 7B shape at depth 2048): one block per head left 28 of
    132 SMs busy. Measured (bae500d, `h200-qwen2.5-7b-4bit-split-attention.md`): decode at depth
    2048 went from 268 to 280 tok/s only, still ~30 µs per layer more than at depth 0 for 4 MB of
    keys and values: a share's loop waited on each step's loads. 1,024 target blocks instead of
    256 gave 295 (fa7d717); loading four steps ahead (BODY's AHEAD) gave 320 (b5815c0)."""
    counters = "  unsigned int* shares_done = reinterpret_cast<unsigned int*>(MUTABLE(float, parts) + COUNTERS_AT);\n"
    body = (RUNTIME_S + "  const int SPLITS = (int)gridDim.x / HEADS;\n"
            f"  constexpr long COUNTERS_AT = (long)HEADS * {MAX_SPLITS} * (D + 2);\n" + counters
            + from_state(merged_split_body(), scale))
    body = rewritten(body, (("    float* part = parts + (long)group_id", "    float* part = MUTABLE(float, parts) + (long)group_id"),), once=True)
    return KernelSource("foundry_decode_attention_split_s" + literal_tag(scale), ("q", "keys", "values", "state", "parts"),
                        ("out",), body)


def split_launch_arguments(qkv: mx.array, keys: mx.array, values: mx.array, state: mx.array, parts: mx.array,
                           heads: int) -> dict:
    """Keyword arguments for `split_source`'s kernel: `splits_for` shares per head."""
    _, kv_heads, capacity, dims = keys.shape
    if heads > MAX_HEADS:
        raise ValueError(f"the split attention kernel takes at most {MAX_HEADS} heads; got {heads}")
    splits, warps = splits_for(heads, capacity), split_warps(dims)
    return dict(
        inputs=[qkv, keys, values, state, parts],
        template=[("T", qkv.dtype), ("D", dims), ("HEADS", heads), ("KV_HEADS", kv_heads), ("WARPS", warps)],
        grid=(heads * splits * warps * 32, 1, 1),
        threadgroup=(warps * 32, 1, 1),
        output_shapes=[(heads * dims,)],
        output_dtypes=[qkv.dtype],
    )


def counters_at(heads: int, splits: int, dims: int) -> int:
    """Where a split attention's share counters start in its float32 scratch: after the heads ×
    splits partial results of D + 2 floats (`split_source` computes the same with MAX_SPLITS)."""
    return heads * splits * (dims + 2)


def parts_size(heads: int, dims: int, splits: int = MAX_SPLITS) -> int:
    """Floats of a split attention's scratch: the partial results for `splits` shares per head
    (`split_source` takes every split count up to MAX_SPLITS), then one counter per head."""
    return counters_at(heads, splits, dims) + heads


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
