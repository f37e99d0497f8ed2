"""Decode attention split over positions (CUDA): each head's positions in shares over many
blocks, each share's partial softmax in a float32 scratch buffer, and the head's last share to
finish merging them in the same launch. The five-kernel step's attention on CUDA (`split_source`)
and the layer kernel's attention phase (kernels/fused_layer.py, `merged_split_body`) are this;
`BODY`, the one-threadgroup-per-head kernel it splits, is kernels/sdpa.py's.
"""

from __future__ import annotations

import os

import mlx.core as mx

from .sdpa import BODY, RUNTIME_S, from_state
from .source import KernelSource, literal_tag, rewritten


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
