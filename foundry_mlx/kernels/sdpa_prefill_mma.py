"""Causal attention of a short prompt on the tensor cores (CUDA): the rendition kernels/sdpa_prefill.py
runs on CUDA.

Why a second algorithm: the SIMD-group-per-row kernel (sdpa_prefill.py, kept for Metal) needs one
SIMD sum per key per query row; on the H200 it cost more GPU time than it saved host time (0.5B
pp128 5.26 / 5.37 ms against 4.94 / 5.23 with MLX's attention; 7B pp256 26.9 against 24.2 ms,
benchmarks/results/h200-prefill-ab-attention-simt-6eb4c44.txt). Here the scores and the weighted sum are matrix
products on `mma.sync.m16n8k16` (kernels/qgemm_primitives.py's `foundry_mma`), FlashAttention-2's
scheme at a warp's scale:

* one warp per 16 query rows of one (batch, head); the longest rows (the tile nearest the end of
  the prompt, which sees the most keys) are launched first;
* Q's 16 × D tile stays in registers as A fragments (D/16 of them) for the whole key walk;
* keys in blocks of 16: S = Q·Kᵀ as two 16 × 8 products (a key row's pair of values is the B
  fragment's register, read straight from global memory), scaled into the log2 domain and masked
  causally (keys after a row's position, aligned to the end of the keys as MLX's "causal" is);
* online softmax per row in fp32 (each thread holds two rows, g and g + 8; a row's four threads
  agree on its maximum through two shuffles; the sums stay per thread until the end);
* P, rounded to T, is the next product's A fragment as the accumulators hold it (no shared
  memory), and P·V accumulates into D/8 fp32 fragments; V's B fragment pairs two keys' values of
  one dimension;
* the rows are divided by their sums, rounded to T once, and written as (B, L, heads·D), the rows
  o_proj reads.

No shared memory and no barriers: a block is one warp. K and V of a head (≤ 256 × 128 × 2 bytes)
stay in L1/L2 for the warps of that head.
"""

from __future__ import annotations

import math

import mlx.core as mx

from .qgemm_primitives import MMA_CUDA, PACK2_CUDA
from .qgemv_launch import Launch
from .source import KernelSource, float_literal, literal_tag

ROWS = 16  # query rows a warp computes (the MMA's M)

UNROLL_HEADER = '#ifndef UNROLL\n#define UNROLL _Pragma("unroll")\n#endif\n'  # both attention kernels' headers
_HEADER = UNROLL_HEADER + MMA_CUDA + PACK2_CUDA

_BODY = """
  constexpr int KK = D / 16;                               // k-steps of Q·Kᵀ
  constexpr int DN = D / 8;                                // 8-wide column blocks of P·V
  const int L = q_shape[2], S = k_shape[2];
  const int tiles = (L + 15) / 16;
  const int tile = tiles - 1 - (int)(group_id % tiles);    // the rows that see the most keys first
  const int head = (int)(group_id / tiles % HEADS);
  const int b = (int)(group_id / tiles / HEADS);
  const int kv_head = head / (HEADS / KV_HEADS);
  const int g = lane >> 2, t = lane & 3;                   // the MMA fragments' row group and column pair
  const int r0 = tile * 16;
  const T* q_a = q + (((long)b * HEADS + head) * L + min(r0 + g, L - 1)) * D + 2 * t;
  const T* q_b = q + (((long)b * HEADS + head) * L + min(r0 + g + 8, L - 1)) * D + 2 * t;
  unsigned qf[KK][4];
  UNROLL for (int kk = 0; kk < KK; ++kk) {
    qf[kk][0] = *reinterpret_cast<const unsigned*>(q_a + 16 * kk);
    qf[kk][1] = *reinterpret_cast<const unsigned*>(q_b + 16 * kk);
    qf[kk][2] = *reinterpret_cast<const unsigned*>(q_a + 16 * kk + 8);
    qf[kk][3] = *reinterpret_cast<const unsigned*>(q_b + 16 * kk + 8);
  }
  const long kv_at = ((long)b * KV_HEADS + kv_head) * S * D;
  const T* keys = k + kv_at;
  const unsigned short* values = reinterpret_cast<const unsigned short*>(v + kv_at);
  const int pos_a = S - L + r0 + g, pos_b = pos_a + 8;     // the last key rows g and g + 8 see
  const int last = min(S - L + r0 + 15, S - 1);            // the last key any row of the tile sees
  float o[DN][4];
  UNROLL for (int dn = 0; dn < DN; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
  float max_a = NEG_INFINITY, max_b = NEG_INFINITY, sum_a = 0.0f, sum_b = 0.0f;
  for (int j0 = 0; j0 <= last; j0 += 16) {
    float s[2][4];
    UNROLL for (int nb = 0; nb < 2; ++nb) {
      s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
      const T* key = keys + (long)min(j0 + 8 * nb + g, S - 1) * D + 2 * t;
      UNROLL for (int kk = 0; kk < KK; ++kk) {
        const unsigned kf[2] = {*reinterpret_cast<const unsigned*>(key + 16 * kk),
                                *reinterpret_cast<const unsigned*>(key + 16 * kk + 8)};
        foundry_mma<T>(s[nb], qf[kk], kf);
      }
    }
    float step_a = NEG_INFINITY, step_b = NEG_INFINITY;
    UNROLL for (int nb = 0; nb < 2; ++nb) {
      UNROLL for (int e = 0; e < 2; ++e) {
        const int key = j0 + 8 * nb + 2 * t + e;
        s[nb][e] = key <= pos_a ? s[nb][e] * SCALE_LOG2 : NEG_INFINITY;
        s[nb][2 + e] = key <= pos_b ? s[nb][2 + e] * SCALE_LOG2 : NEG_INFINITY;
        step_a = fmaxf(step_a, s[nb][e]);
        step_b = fmaxf(step_b, s[nb][2 + e]);
      }
    }
    step_a = fmaxf(step_a, __shfl_xor_sync(0xffffffffu, step_a, 1));
    step_a = fmaxf(step_a, __shfl_xor_sync(0xffffffffu, step_a, 2));
    step_b = fmaxf(step_b, __shfl_xor_sync(0xffffffffu, step_b, 1));
    step_b = fmaxf(step_b, __shfl_xor_sync(0xffffffffu, step_b, 2));
    const float next_a = fmaxf(max_a, step_a), next_b = fmaxf(max_b, step_b);
    const float rescale_a = exp2f(max_a - next_a), rescale_b = exp2f(max_b - next_b);  // 0 at the first block
    max_a = next_a;
    max_b = next_b;
    sum_a *= rescale_a;
    sum_b *= rescale_b;
    UNROLL for (int dn = 0; dn < DN; ++dn) {
      o[dn][0] *= rescale_a; o[dn][1] *= rescale_a;
      o[dn][2] *= rescale_b; o[dn][3] *= rescale_b;
    }
    UNROLL for (int nb = 0; nb < 2; ++nb) {
      UNROLL for (int e = 0; e < 2; ++e) {
        s[nb][e] = exp2f(s[nb][e] - next_a);               // 0 where masked
        s[nb][2 + e] = exp2f(s[nb][2 + e] - next_b);
        sum_a += s[nb][e];
        sum_b += s[nb][2 + e];
      }
    }
    // P as the A fragment of 16 rows × 16 keys: the accumulators' layout is the A layout's halves
    const unsigned pf[4] = {foundry_pack2<T>(s[0][0], s[0][1]), foundry_pack2<T>(s[0][2], s[0][3]),
                            foundry_pack2<T>(s[1][0], s[1][1]), foundry_pack2<T>(s[1][2], s[1][3])};
    const unsigned short* v0 = values + (long)min(j0 + 2 * t, S - 1) * D + g;  // keys 2t, 2t + 1, 2t + 8, 2t + 9
    const unsigned short* v1 = values + (long)min(j0 + 2 * t + 1, S - 1) * D + g;
    const unsigned short* v8 = values + (long)min(j0 + 2 * t + 8, S - 1) * D + g;
    const unsigned short* v9 = values + (long)min(j0 + 2 * t + 9, S - 1) * D + g;
    UNROLL for (int dn = 0; dn < DN; ++dn) {
      const unsigned vf[2] = {(unsigned)v0[8 * dn] | ((unsigned)v1[8 * dn] << 16),
                              (unsigned)v8[8 * dn] | ((unsigned)v9[8 * dn] << 16)};
      foundry_mma<T>(o[dn], pf, vf);
    }
  }
  sum_a += __shfl_xor_sync(0xffffffffu, sum_a, 1);
  sum_a += __shfl_xor_sync(0xffffffffu, sum_a, 2);
  sum_b += __shfl_xor_sync(0xffffffffu, sum_b, 1);
  sum_b += __shfl_xor_sync(0xffffffffu, sum_b, 2);
  const int row_a = r0 + g, row_b = r0 + g + 8;
  T* out_a = out + ((long)b * L + row_a) * (HEADS * D) + head * D + 2 * t;
  T* out_b = out + ((long)b * L + row_b) * (HEADS * D) + head * D + 2 * t;
  UNROLL for (int dn = 0; dn < DN; ++dn) {
    if (row_a < L) *reinterpret_cast<unsigned*>(out_a + 8 * dn) = foundry_pack2<T>(o[dn][0] / sum_a, o[dn][1] / sum_a);
    if (row_b < L) *reinterpret_cast<unsigned*>(out_b + 8 * dn) = foundry_pack2<T>(o[dn][2] / sum_b, o[dn][3] / sum_b);
  }
"""


def kernel_source(scale: float) -> KernelSource:
    """The kernel for one softmax scale (scale·log2 e, a literal; template: T, D, HEADS, KV_HEADS;
    inputs q (B, heads, L, D), k and v (B, kv_heads, S, D), contiguous; output (B, L, heads·D))."""
    body = _BODY.replace("SCALE_LOG2", float_literal(scale * math.log2(math.e)))
    return KernelSource("foundry_prefill_attention_mma_s" + literal_tag(scale), ("q", "k", "v"), ("out",), body,
                        _HEADER)


def check_shapes(q: mx.array, k: mx.array, v: mx.array) -> None:
    """Both renditions' inputs: q (B, heads, L, D) over k, v (B, kv_heads, S ≥ L, D), heads a multiple of kv_heads."""
    batch, heads, length, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim or heads % k.shape[1]:
        raise ValueError(f"attention of q {q.shape} over k {k.shape}, v {v.shape}: shapes do not match")
    if k.shape[2] < length:
        raise ValueError(f"{length} queries over {k.shape[2]} keys: causal attention needs at least as many keys")


def launch(q: mx.array, k: mx.array, v: mx.array) -> Launch:
    """One 32-thread block per 16 query rows of each (batch, head)."""
    check_shapes(q, k, v)
    batch, heads, length, head_dim = q.shape
    blocks = batch * heads * -(-length // ROWS)
    template = [("T", q.dtype), ("D", head_dim), ("HEADS", heads), ("KV_HEADS", k.shape[1])]
    return Launch([q, k, v], template, (blocks * 32, 1, 1), (32, 1, 1), (batch, length, heads * head_dim), q.dtype)
