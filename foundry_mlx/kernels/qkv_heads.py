"""A prefill's fused Q/K/V product into heads-first Q, K and V, RoPE applied to Q and K: one launch.

The reference path (ops.norm_qkv_rope) takes five graph nodes for this after the product: a
reshape to heads, a transpose, a split of Q/K from V, RoPE, and a split of Q from K. A 128-token
prefill of the 0.5B model is bound by MLX's host time per node, not by its GPU work (H200,
548ddfb: 3.9 ms of launches against 0.7 ms of waiting for the GPU after them,
benchmarks/results/h200-ttft-breakdown-0.5b-548ddfb.txt), so four nodes a layer are worth a kernel.

Each thread takes one rotation pair (d, d + D/2) of one head at one position: it reads the pair
from the product y (B, L, (H + 2·KV)·D), rotates it by the angle (offset + l) · inv_freq[d] as
`mx.fast.rope` does (half-split pairs, fp32 math, one rounding to T), and writes it to q (B, H, L,
D), k or v (B, KV, L, D), contiguous, V's pairs copied unrotated. The body is written once for
both backends (kernels/source.py's vocabulary).
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..errors import FoundryError
from .qgemv_launch import Launch
from .source import KernelSource, scalar

SWITCH = "FOUNDRY_QKV_HEADS"
THREADS = 256

_BODY = """
  constexpr int HALF = D / 2;
  constexpr int ALL = HEADS + 2 * KV_HEADS;
{shape}
  const long i = (long)group_id * THREADS + (long)thread_id;
  if (i < (long)B * L * ALL * HALF) {
    const int pair = (int)(i % HALF);
    const int head = (int)(i / HALF % ALL);
    const long token = i / HALF / ALL;                     // b * L + l
    const int l = (int)(token % L), b = (int)(token / L);
    const long at = token * (ALL * D) + head * D + pair;
{load}
    float r1 = x1, r2 = x2;
    if (head < HEADS + KV_HEADS) {
      const float theta = static_cast<float>(SCALAR(offset) + l) * inv_freq[pair];
      const float c = PRECISE_COS(theta), s = PRECISE_SIN(theta);
      r1 = x1 * c - x2 * s;
      r2 = x1 * s + x2 * c;
    }
#define FOUNDRY_STORE(out_, h_, heads_) do { \\
      const long to_ = (((long)b * (heads_) + (h_)) * L + l) * D + pair; \\
      out_[to_] = static_cast<T>(r1); \\
      out_[to_ + HALF] = static_cast<T>(r2); \\
    } while (0)
    if (head < HEADS) FOUNDRY_STORE(q, head, HEADS);
    else if (head < HEADS + KV_HEADS) FOUNDRY_STORE(k, head - HEADS, KV_HEADS);
    else FOUNDRY_STORE(v, head - HEADS - KV_HEADS, KV_HEADS);
#undef FOUNDRY_STORE
  }
"""


_FROM_PRODUCT = ("  const int B = y_shape[0], L = y_shape[1];",
                 "    const float x1 = static_cast<float>(y[at]), x2 = static_cast<float>(y[at + HALF]);")
# From split-K's fp32 partials (S, B·L, N) instead of the product: each value summed in K order,
# rounded to T, the bias added and rounded again, exactly as kernels/qgemm_source.py's reduce writes
# the product this kernel would otherwise read, so both routes give the same bits.
_FROM_PARTIALS = ("""  const int S = partials_shape[0], B = BATCH, L = partials_shape[1] / BATCH;
  const long SLAB = (long)partials_shape[1] * partials_shape[2];""", """    float x1 = 0.0f, x2 = 0.0f;
    for (int s = 0; s < S; ++s) { x1 += partials[s * SLAB + at]; x2 += partials[s * SLAB + at + HALF]; }
    x1 = static_cast<float>(static_cast<T>(x1));
    x2 = static_cast<float>(static_cast<T>(x2));""")
_ADD_BIAS = """
    x1 = static_cast<float>(static_cast<T>(x1 + static_cast<float>(bias[head * D + pair])));
    x2 = static_cast<float>(static_cast<T>(x2 + static_cast<float>(bias[head * D + pair + HALF])));"""


def kernel_source(summed: bool = False, bias: bool = False) -> KernelSource:
    """The kernel (template: T, THREADS, HEADS, KV_HEADS, D; inputs y (B, L, (H + 2·KV)·D), inv_freq
    (D/2,) fp32, offset (0-d int32); outputs q, k, v). `summed`: from split-K's partials (S, B·L, N)
    instead of y, with the layer's bias if `bias` (template BATCH too): the reduce launch's work."""
    shape, load = _FROM_PARTIALS if summed else _FROM_PRODUCT
    body = _BODY.replace("{shape}", shape).replace("{load}", load + (_ADD_BIAS if summed and bias else ""))
    if not summed:
        return KernelSource("foundry_qkv_heads", ("y", "inv_freq", "offset"), ("q", "k", "v"), body)
    inputs = ("partials",) + (("bias",) if bias else ()) + ("inv_freq", "offset")
    return KernelSource("foundry_qkv_heads_summed" + ("_bias" if bias else ""), inputs, ("q", "k", "v"), body)


def launch(y: mx.array, inverse_frequencies: mx.array, offset: int, n_heads: int, n_kv_heads: int) -> Launch:
    """Arguments for y (B, L, (n_heads + 2·n_kv_heads)·D) at positions offset, offset + 1, …"""
    batch, length, width = y.shape
    return _launch([y], y.dtype, batch, length, width, inverse_frequencies, offset, n_heads, n_kv_heads, [])


def summed_launch(partials: mx.array, bias: mx.array | None, dtype: mx.Dtype, batch: int,
                  inverse_frequencies: mx.array, offset: int, n_heads: int, n_kv_heads: int) -> Launch:
    """Arguments for split-K's fp32 partials (S, batch·L, width) of the product, rounded to `dtype`
    with the layer's `bias` as the reduce launch would, in place of y."""
    _, rows, width = partials.shape
    if rows % batch:
        raise ValueError(f"{rows} rows of partial sums are not {batch} sequences of one length")
    inputs = [partials] + ([bias] if bias is not None else [])
    return _launch(inputs, dtype, batch, rows // batch, width, inverse_frequencies, offset, n_heads, n_kv_heads,
                   [("BATCH", batch)])


def _launch(inputs: list, dtype: mx.Dtype, batch: int, length: int, width: int, inverse_frequencies: mx.array,
            offset: int, n_heads: int, n_kv_heads: int, extra: list) -> Launch:
    heads = n_heads + 2 * n_kv_heads
    head_dim = width // heads
    if head_dim * heads != width or head_dim % 2 or inverse_frequencies.size != head_dim // 2:
        raise ValueError(f"a QKV product of width {width} is not {heads} heads of one even size matching "
                         f"{inverse_frequencies.size} rotary frequencies")
    threads = -(-batch * length * heads * (head_dim // 2) // THREADS) * THREADS
    template = [("T", dtype), ("THREADS", THREADS), ("HEADS", n_heads), ("KV_HEADS", n_kv_heads),
                ("D", head_dim)] + extra
    kv_shape = (batch, n_kv_heads, length, head_dim)
    return Launch(inputs + [inverse_frequencies, scalar(offset, mx.int32)], template, (threads, 1, 1),
                  (THREADS, 1, 1), (batch, n_heads, length, head_dim), dtype, ((kv_shape, dtype), (kv_shape, dtype)))


def enabled(backend: str | None) -> bool:
    """FOUNDRY_QKV_HEADS=1/0, else on for CUDA (measured there) and off for Metal (whose rendition
    has run only in the CPU SIMT harness) and the CPU (no kernels)."""
    value = os.environ.get(SWITCH, "").strip()
    if value not in ("", "0", "1"):
        raise FoundryError(f"{SWITCH}={value!r} is not 0 or 1; unset it for the default (on for CUDA).")
    if backend is None:
        return False
    return value == "1" or (value == "" and backend == "cuda")


_kernels: dict[tuple, object] = {}


def _kernel(backend: str, summed: bool = False, bias: bool = False):
    kernel = _kernels.get((backend, summed, bias))
    if kernel is None:
        kernel = _kernels[(backend, summed, bias)] = kernel_source(summed, bias).build(backend)
    return kernel


def run(backend: str, y: mx.array, inverse_frequencies: mx.array, offset: int, n_heads: int,
        n_kv_heads: int) -> tuple[mx.array, mx.array, mx.array]:
    """q (B, H, L, D), k and v (B, KV, L, D) of the fused product y, RoPE on q and k."""
    q, k, v = _kernel(backend)(**launch(y, inverse_frequencies, offset, n_heads, n_kv_heads).arguments())
    return q, k, v


def run_summed(backend: str, partials: mx.array, bias: mx.array | None, dtype: mx.Dtype, batch: int,
               inverse_frequencies: mx.array, offset: int, n_heads: int,
               n_kv_heads: int) -> tuple[mx.array, mx.array, mx.array]:
    """`run` of the product that split-K's partials (S, batch·L, N) sum to (+ bias), in the same
    launch as the sum: one graph node where the reduce launch and `run` are two."""
    arguments = summed_launch(partials, bias, dtype, batch, inverse_frequencies, offset, n_heads,
                              n_kv_heads).arguments()
    q, k, v = _kernel(backend, True, bias is not None)(**arguments)
    return q, k, v


def reference(y: mx.array, rope, offset: int, n_heads: int, n_kv_heads: int) -> tuple[mx.array, mx.array, mx.array]:
    """The twin in MLX ops: what ops.norm_qkv_rope does without the kernel (5 graph nodes)."""
    batch, length, _ = y.shape
    heads = y.reshape(batch, length, n_heads + 2 * n_kv_heads, rope.dims).transpose(0, 2, 1, 3)
    qk, v = mx.split(heads, [n_heads + n_kv_heads], axis=1)
    q, k = mx.split(rope(qk, offset), [n_heads], axis=1)
    return q, k, v
