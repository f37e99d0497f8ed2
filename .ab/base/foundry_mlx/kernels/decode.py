"""The decode step's kernels for one GPU backend, as `ops.py` calls them.

Kernel objects are built once per (variant, backend) and reused; MLX compiles each template
specialisation (dtype, bits, group, shape) the first time it runs and caches it.
"""

from __future__ import annotations

import mlx.core as mx

from ..layers import Linear, RoPE
from . import qgemv, qgemv_launch, sdpa
from .source import scalar


class KernelSet:
    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._kernels: dict[qgemv.Variant, object] = {}
        self._attention = None

    def _run(self, variant: qgemv.Variant, launch: qgemv_launch.Launch) -> mx.array:
        kernel = self._kernels.get(variant)
        if kernel is None:
            kernel = self._kernels[variant] = qgemv.kernel_source(variant, self.backend).build(self.backend)
        return kernel(**launch.arguments())[0]

    def linear(
        self,
        x: mx.array,
        layer: Linear,
        residual: mx.array | None = None,
        norm_weight: mx.array | None = None,
        eps: float | None = None,
        swiglu: bool = False,
    ) -> mx.array:
        """One token through a quantized linear layer with optional norm / bias / SwiGLU / residual."""
        variant = qgemv.Variant(
            norm=norm_weight is not None, bias="bias" in layer, residual=residual is not None, swiglu=swiglu
        )
        launch = qgemv_launch.launch(variant, x, layer.quantized, norm_weight=norm_weight, eps=eps,
                                     bias=layer.bias if variant.bias else None, residual=residual,
                                     backend=self.backend)
        return self._run(variant, launch).reshape(1, 1, -1)

    def norm_qkv_rope(
        self, x: mx.array, norm_weight: mx.array, eps: float, qkv: Linear, rope: RoPE, offset: int,
        n_heads: int, n_kv_heads: int,
    ) -> mx.array:
        """RMSNorm + fused QKV projection + biases + RoPE on the Q and K rows, one kernel: (1, 1, N)."""
        variant = qgemv.Variant(norm=True, bias="bias" in qkv, rope=True)
        launch = qgemv_launch.launch(
            variant, x, qkv.quantized, norm_weight=norm_weight, eps=eps,
            bias=qkv.bias if variant.bias else None, inv_freq=rope.inverse_frequencies, position=offset,
            rope_rows=(n_heads + n_kv_heads) * rope.dims, head_dim=rope.dims, backend=self.backend,
        )
        return self._run(variant, launch).reshape(1, 1, -1)

    @staticmethod
    def supports_attention(head_dim: int) -> bool:
        return sdpa.supported(head_dim)

    def decode_attention(
        self, q: mx.array, keys: mx.array, values: mx.array, valid: int | mx.array, scale: float
    ) -> mx.array:
        """One query token against the first `valid` positions of the cache buffers: (1, 1, H*D)."""
        if self._attention is None:
            self._attention = sdpa.SOURCE.build(self.backend)
        valid = valid if isinstance(valid, mx.array) else scalar(valid, mx.int32)
        out = self._attention(**sdpa.launch_arguments(q, keys, values, valid, scale))[0]
        return out.reshape(1, 1, -1)
