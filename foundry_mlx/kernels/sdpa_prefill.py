"""Causal attention of a short prompt, one launch that writes (B, L, heads·D).

Why: a 128-token prefill of the 0.5B model is bound by MLX's host time per graph node, and MLX's
fused attention (cuDNN on CUDA) costs 25.6 µs of host time per launch on the H200 against 4.7 µs
for a small custom kernel (benchmarks/results/h200-node-costs-d4df28f.txt); its output (B, heads,
L, D) then takes a transpose and a reshape (a copy) to become the rows o_proj reads. This kernel
writes those rows itself: three nodes a layer become one.

Algorithm: one SIMD-group per query row (b, head, i); lane l holds dimensions l, l + 32, … of
the row (D/32 each), so a key's score is D/32 multiply-adds and one SIMD sum. Keys 0 … S − L + i
(causal, aligned to the end of the keys as MLX's "causal" mask is; S > L when a cache precedes
the prompt) are walked in order, four a step (their SIMD sums overlap instead of waiting on each
other), with an online softmax (running max, sum and weighted values) in fp32; the row is divided by the sum and rounded to T once. Grouped-query heads: query head h reads
KV head h / (heads / kv_heads). The work grows as L², so it is for short prompts only (`MAX_LENGTH`):
longer ones keep MLX's flash attention.

That SIMD-group-per-row body is written in both backends' vocabulary (kernels/source.py) and is
what Metal runs; on the H200 it cost more GPU time than it saved host time
(benchmarks/results/h200-prefill-ab-attention-simt-6eb4c44.txt), so CUDA runs kernels/sdpa_prefill_mma.py instead:
the same attention, its products on the tensor cores. `run` picks by backend.

On by default on CUDA, where the tensor-core rendition measured faster than MLX's attention at
every length it serves (H200, compiled prefill alone, alternating runs: 0.5B pp128 4.49 / 4.36 ms
against 4.88 / 4.90, pp256 5.56 / 5.55 against 5.79 / 6.56; 7B pp128 15.15 / 15.10 against
15.44 / 15.33, pp256 equal; benchmarks/results/h200-prefill-ab-attention-04f9370.txt). Off on
Metal until measured there. FOUNDRY_PREFILL_ATTENTION=0 / 1 overrides either way.
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..errors import FoundryError
from . import sdpa_prefill_mma
from .qgemv_launch import Launch
from .source import KernelSource, float_literal, literal_tag

SWITCH = "FOUNDRY_PREFILL_ATTENTION"
MAX_LENGTH = 256  # query rows up to which a prompt may take this kernel (its work is L²)
WARPS = 4  # query rows (one per SIMD-group) a threadgroup computes
HEAD_DIMS = (64, 128)

_BODY = """
  constexpr int PER = D / 32;                              // dimensions per lane
  constexpr int KEYS = 4;
  const int B = q_shape[0], L = q_shape[2], S = k_shape[2];
  const long row = (long)group_id * WARPS + (long)warp;    // (b, head, i), i fastest
  if (row < (long)B * HEADS * L) {
    const int i = (int)(row % L);
    const int head = (int)(row / L % HEADS);
    const int b = (int)(row / L / HEADS);
    const int kv_head = head / (HEADS / KV_HEADS);
    const long q_at = row * D + lane;
    float qs[PER], acc[PER];
    UNROLL for (int e = 0; e < PER; ++e) {
      qs[e] = static_cast<float>(q[q_at + 32 * e]) * SCALE;
      acc[e] = 0.0f;
    }
    float running_max = NEG_INFINITY, running_sum = 0.0f;
    const long kv_at = ((long)b * KV_HEADS + kv_head) * S * D + lane;
    const int last = S - L + i;                            // causal: the keys up to this query's position
    for (int j0 = 0; j0 <= last; j0 += KEYS) {             // KEYS keys a step: their sums overlap
      float score[KEYS];
      UNROLL for (int u = 0; u < KEYS; ++u) {
        const long at = kv_at + (long)min(j0 + u, last) * D;
        score[u] = 0.0f;
        UNROLL for (int e = 0; e < PER; ++e) score[u] += qs[e] * static_cast<float>(k[at + 32 * e]);
      }
      float step_max = NEG_INFINITY;
      UNROLL for (int u = 0; u < KEYS; ++u) {
        score[u] = j0 + u <= last ? SIMD_SUM(score[u]) : NEG_INFINITY;
        step_max = score[u] > step_max ? score[u] : step_max;
      }
      const float next_max = step_max > running_max ? step_max : running_max;
      const float rescale = PRECISE_EXP(running_max - next_max);
      running_sum *= rescale;
      UNROLL for (int e = 0; e < PER; ++e) acc[e] *= rescale;
      UNROLL for (int u = 0; u < KEYS; ++u) {
        const float weight = PRECISE_EXP(score[u] - next_max);   // 0 past the last key
        const long at = kv_at + (long)min(j0 + u, last) * D;
        running_sum += weight;
        UNROLL for (int e = 0; e < PER; ++e) acc[e] += weight * static_cast<float>(v[at + 32 * e]);
      }
      running_max = next_max;
    }
    const long out_at = (((long)b * L + i) * HEADS + head) * D + lane;
    UNROLL for (int e = 0; e < PER; ++e) out[out_at + 32 * e] = static_cast<T>(acc[e] / running_sum);
  }
"""

def kernel_source(scale: float) -> KernelSource:
    """The kernel for one softmax scale (a literal in the source; template: T, D, HEADS, KV_HEADS,
    WARPS; inputs q (B, heads, L, D), k and v (B, kv_heads, S, D), contiguous; output (B, L, heads·D))."""
    body = _BODY.replace("SCALE", float_literal(scale))
    return KernelSource("foundry_prefill_attention_s" + literal_tag(scale), ("q", "k", "v"), ("out",), body,
                        sdpa_prefill_mma.UNROLL_HEADER)


def launch(q: mx.array, k: mx.array, v: mx.array) -> Launch:
    sdpa_prefill_mma.check_shapes(q, k, v)
    batch, heads, length, head_dim = q.shape
    kv_heads = k.shape[1]
    rows = batch * heads * length
    groups = -(-rows // WARPS)
    template = [("T", q.dtype), ("D", head_dim), ("HEADS", heads), ("KV_HEADS", kv_heads), ("WARPS", WARPS)]
    return Launch([q, k, v], template, (groups * WARPS * 32, 1, 1), (WARPS * 32, 1, 1),
                  (batch, length, heads * head_dim), q.dtype)


def enabled(backend: str | None) -> bool:
    """On a GPU backend: CUDA by default, Metal with FOUNDRY_PREFILL_ATTENTION=1 (not yet measured
    there); FOUNDRY_PREFILL_ATTENTION=0 keeps MLX's attention everywhere."""
    value = os.environ.get(SWITCH, "").strip()
    if value not in ("", "0", "1"):
        raise FoundryError(f"{SWITCH}={value!r} is not 0 or 1; unset it for the default (ours on CUDA, MLX's on Metal).")
    return backend is not None and (value == "1" or (value == "" and backend == "cuda"))


def applies(q: mx.array, mask) -> bool:
    """A prompt this kernel serves: causal (MLX's "causal" string mask), 2 to MAX_LENGTH queries,
    a head size of 64 or 128."""
    return isinstance(mask, str) and mask == "causal" and 1 < q.shape[2] <= MAX_LENGTH and q.shape[3] in HEAD_DIMS


_kernels: dict[tuple[str, float], object] = {}


def run(backend: str, q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """Causal attention of q over k, v: (B, L, heads·D), as `ops.attention` returns it: on the tensor
    cores on CUDA (sdpa_prefill_mma.py), one SIMD-group per query row elsewhere."""
    tensor_cores = backend == "cuda"
    kernel = _kernels.get((backend, scale))
    if kernel is None:
        source = sdpa_prefill_mma.kernel_source(scale) if tensor_cores else kernel_source(scale)
        kernel = _kernels[(backend, scale)] = source.build(backend)
    launched = sdpa_prefill_mma.launch(q, k, v) if tensor_cores else launch(q, k, v)
    return kernel(**launched.arguments())[0]


def reference(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """The twin in MLX ops: MLX's attention with the causal mask, then the rows o_proj reads."""
    batch, _, length, _ = q.shape
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask="causal")
    return out.transpose(0, 2, 1, 3).reshape(batch, length, -1)
