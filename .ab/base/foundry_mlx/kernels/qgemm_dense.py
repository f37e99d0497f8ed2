"""The dense route for large-M prefill: dequantize the weight once, then MLX's dense matmul.

At large M a quantized GEMM is bound by arithmetic, and the best of them (ours in
kernels/qgemm.py, MLX's `quantized_matmul`) reach ~160-200 TFLOP/s on an H200, where the dense
fp16 GEMM MLX calls on CUDA (cuBLAS) reaches ~600. Dequantizing the whole matrix costs one pass
over it (a 7B gate_up, 37888x3584: ~270 MB of fp16 written, ~70 µs), which M=2048 rows amortize:
~1 ms in all against 3.4 ms for `quantized_matmul`. llama.cpp does the same for large batches
(dequantize to fp16, then cuBLAS). The dense weight is transient: built per call and dropped,
so memory holds the quantized model plus one dense matrix at a time, never a dense model.

Whether prefill takes this route is decided per shape by kernels/qgemm_table.py, like the kernel.
"""

from __future__ import annotations

import mlx.core as mx

from ..quant import QuantizedWeight


def supported(x: mx.array, weight: QuantizedWeight) -> bool:
    """Floating-point x whose last axis is the weight's K (MLX dequantizes any bits and group)."""
    return mx.issubdtype(x.dtype, mx.floating) and x.shape[-1] == weight.shape[1]


def run(x: mx.array, weight: QuantizedWeight, bias: mx.array | None = None,
        residual: mx.array | None = None) -> mx.array:
    """x @ dequant(W)ᵀ (+ bias) (+ residual) as (..., N), x's leading axes kept: the semantics of
    kernels/qgemm.py's `reference`, with the weight dequantized to x's dtype (the precision the
    GEMM runs in; fp32 scales would otherwise make it an fp32 GEMM). `residual` has the output's size."""
    dense = mx.dequantize(weight.weight, weight.scales, weight.biases, group_size=weight.group_size,
                          bits=weight.bits, dtype=x.dtype)
    y = x @ dense.T
    if bias is not None:
        y = y + bias
    if residual is not None:
        y = (residual if residual.shape == y.shape else residual.reshape(y.shape)) + y
    return y
