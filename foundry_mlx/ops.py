"""The seam between the models and the math: the hot operations of a transformer layer.

Models call only these functions. Each has a reference implementation in plain `mlx` ops
(MLX's own fused paths: `fast.rms_norm`, `quantized_matmul`, `fast.rope`,
`fast.scaled_dot_product_attention`); that is the CPU path and the oracle for the kernels. When a
custom-kernel backend is active (`kernels.backend()`), single-token decode steps are routed to
its kernels instead. Prefill's quantized products stay on MLX's `quantized_matmul` except for
the shapes where kernels/qgemm_table.py records that another route measured faster: our
quantized GEMM (kernels/qgemm.py) or, at large M, dequantize-then-dense-matmul
(kernels/qgemm_dense.py).
"""

from __future__ import annotations

import mlx.core as mx

from . import kernels
from .kernels import qgemm, qgemm_dense, qkv_heads, sdpa_prefill
from .layers import Linear, RoPE


def _decode_kernels(batch: int, length: int):
    """The active kernel set for one token of one sequence (B=1, L=1) with custom kernels on, else None."""
    return kernels.active() if batch == 1 and length == 1 else None


def linear(x: mx.array, layer: Linear, residual: mx.array | None = None) -> mx.array:
    """x Wᵀ + bias (+ residual)."""
    custom = _decode_kernels(x.shape[0], x.shape[1])
    if custom is not None and layer.bits is not None:
        return custom.linear(x, layer, residual=residual)
    backend, route = _gemm_route(x, layer)
    if route != "mlx":
        bias = layer.bias if "bias" in layer else None
        if route == "kernel":
            return qgemm.run(backend, x, layer.quantized, bias=bias, residual=residual)
        return qgemm_dense.run(x, layer.quantized, bias=bias, residual=residual)  # (..., N) as the kernel's
    y = layer.matmul(x)
    if "bias" in layer:
        y = y + layer.bias
    return y if residual is None else residual + y


def _kernel_backend() -> str | None:
    """The active GPU kernel backend ('metal' or 'cuda'), or None on the reference path."""
    kernel_set = kernels.active()
    return None if kernel_set is None else kernel_set.backend


def _gemm_route(x: mx.array, layer: Linear) -> tuple[str | None, str]:
    """(GPU kernel backend or None, route) of a quantized product of several rows (a prefill's):
    "kernel" (kernels/qgemm.py), "dense" (kernels/qgemm_dense.py) or "mlx" (`quantized_matmul`)."""
    backend = _kernel_backend()
    if layer.bits is None or x.ndim < 2 or x.size == x.shape[-1]:
        return backend, "mlx"
    return backend, qgemm.route(backend, x, layer.quantized)


def _split_on_kernel(backend: str | None, route: str, x: mx.array, layer: Linear) -> bool:
    """Whether this product runs on our GEMM split along K: then the launch that sums its partials
    can also do the step after the product (the SwiGLU activation, the QKV heads)."""
    return route == "kernel" and qgemm.splits(backend, x, layer.quantized) > 1


def norm_linear(x: mx.array, norm_weight: mx.array, eps: float, layer: Linear) -> mx.array:
    """rms_norm(x) Wᵀ: the final norm and the LM head."""
    custom = _decode_kernels(x.shape[0], x.shape[1])
    if custom is not None and layer.bits is not None:
        return custom.linear(x, layer, norm_weight=norm_weight, eps=eps)
    return linear(mx.fast.rms_norm(x, norm_weight, eps), layer)


def norm_qkv_rope(
    x: mx.array,
    norm_weight: mx.array,
    eps: float,
    qkv: Linear,
    rope: RoPE,
    offset: int | mx.array,
    n_heads: int,
    n_kv_heads: int,
) -> tuple[mx.array, mx.array, mx.array]:
    """RMSNorm, the fused Q/K/V projection (+ biases), and RoPE on Q and K.

    Returns queries (B, n_heads, L, D), keys and values (B, n_kv_heads, L, D).
    """
    batch, length, _ = x.shape
    head_dim = rope.dims
    custom = _decode_kernels(x.shape[0], x.shape[1])
    if custom is not None and qkv.bits is not None:
        fused = custom.norm_qkv_rope(x, norm_weight, eps, qkv, rope, offset, n_heads, n_kv_heads)
        q, k, v = mx.split(fused, [n_heads * head_dim, (n_heads + n_kv_heads) * head_dim], axis=-1)
        return (
            q.reshape(batch, n_heads, 1, head_dim),
            k.reshape(batch, n_kv_heads, 1, head_dim),
            v.reshape(batch, n_kv_heads, 1, head_dim),
        )
    h = mx.fast.rms_norm(x, norm_weight, eps)
    backend, route = _gemm_route(h, qkv)
    if isinstance(offset, int) and length > 1 and qkv_heads.enabled(backend):
        # One launch for the heads-first layout and RoPE: a prefill's time on a small model is host
        # time per graph node (engine/prefill.py), and the MLX ops below are five nodes. Where the
        # product is split along K, that launch also sums the partials (the reduce launch's work).
        bias = qkv.bias if "bias" in qkv else None
        if _split_on_kernel(backend, route, h, qkv):
            partials = qgemm.split_partials(backend, h, qkv.quantized)
            return qkv_heads.run_summed(backend, partials, bias, h.dtype, batch, rope.inverse_frequencies, offset,
                                        n_heads, n_kv_heads)
        return qkv_heads.run(backend, linear(h, qkv), rope.inverse_frequencies, offset, n_heads, n_kv_heads)
    fused = linear(h, qkv)
    # Heads first once for Q, K and V together, RoPE once over Q's and K's heads: 5 graph nodes where
    # splitting first took 9 (a split, three reshapes, three transposes, two RoPEs).
    return qkv_heads.reference(fused, rope, offset, n_heads, n_kv_heads)


def norm_swiglu(x: mx.array, norm_weight: mx.array, eps: float, gate_up: Linear) -> mx.array:
    """silu(gate) * up of rms_norm(x), with gate and up as one fused matrix [gate; up]."""
    custom = _decode_kernels(x.shape[0], x.shape[1])
    if custom is not None and gate_up.bits is not None:
        return custom.linear(x, gate_up, norm_weight=norm_weight, eps=eps, swiglu=True)
    h = mx.fast.rms_norm(x, norm_weight, eps)
    backend, route = _gemm_route(h, gate_up)
    if "bias" not in gate_up and _split_on_kernel(backend, route, h, gate_up):
        # Split-K's sum applies the activation: one graph node where the split and MLX's fused
        # element-wise chain below are two (a short prefill's time is host time per node).
        return qgemm.run(backend, h, gate_up.quantized, swiglu=True)
    gate, up = mx.split(linear(h, gate_up), 2, axis=-1)
    return mx.sigmoid(gate) * gate * up  # silu(gate) * up; MLX fuses the element-wise chain on GPU


def attention(
    q: mx.array, k: mx.array, v: mx.array, scale: float, mask: str | mx.array | None, cache=None
) -> mx.array:
    """Scaled dot-product attention with grouped-query heads; returns (B, L, n_heads * D).

    `k`, `v` are what the cache returned (a view of its valid part, or its whole buffer with a
    `mask` inside a compiled step); the decode kernel reads `cache`'s buffers and valid length.
    """
    custom = _decode_kernels(q.shape[0], q.shape[2])
    if custom is not None and cache is not None and custom.supports_attention(q.shape[-1]):
        return custom.decode_attention(q, cache.keys, cache.values, cache.valid_length(), scale)
    backend = _kernel_backend()
    if sdpa_prefill.enabled(backend) and sdpa_prefill.applies(q, mask):
        return sdpa_prefill.run(backend, q, k, v, scale)  # one node for the three below (kernels/sdpa_prefill.py)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    batch, _, length, _ = q.shape
    return out.transpose(0, 2, 1, 3).reshape(batch, length, -1)
