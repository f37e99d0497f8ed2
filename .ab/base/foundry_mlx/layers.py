"""Weight-holding layers shared by every model family.

They hold data and say nothing about how the math runs: `ops.py` decides (kernels or reference).
A `Linear` holds either a dense matrix or an affine-quantized one (`quant.QuantizedWeight`).
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from . import quant


class Linear(nn.Module):
    """y = x Wᵀ (+ bias), W of shape (out_features, in_features), dense or affine-quantized."""

    def __init__(self, weight: mx.array | quant.QuantizedWeight, bias: mx.array | None = None) -> None:
        super().__init__()
        if isinstance(weight, quant.QuantizedWeight):
            self.weight, self.scales, self.biases = weight.weight, weight.scales, weight.biases
            self.bits, self.group_size = weight.bits, weight.group_size
        else:
            self.weight = weight
            self.bits = self.group_size = None
        if bias is not None:
            self.bias = bias

    @classmethod
    def fused(cls, weights: list[Any], biases: list[mx.array | None] | None = None) -> Linear:
        """Several projections of the same input as one matrix (rows stacked in order)."""
        bias = None
        if biases is not None and any(b is not None for b in biases):
            bias = mx.concatenate([b if b is not None else mx.zeros(_rows(w)) for w, b in zip(weights, biases)])
        return cls(quant.concatenate_rows(weights), bias)

    @property
    def quantized(self) -> quant.QuantizedWeight | None:
        if self.bits is None:
            return None
        return quant.QuantizedWeight(self.weight, self.scales, self.biases, self.bits, self.group_size)

    @property
    def stored(self) -> quant.QuantizedWeight | mx.array:
        """The matrix as it is held: the quantized form, or the dense array (what `convert` writes)."""
        return self.quantized if self.bits is not None else self.weight

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1] * 32 // self.bits if self.bits else self.weight.shape[1]

    def matmul(self, x: mx.array) -> mx.array:
        """x Wᵀ through MLX's own paths (the reference; `ops` may route around it)."""
        if self.bits is None:
            return x @ self.weight.T
        return mx.quantized_matmul(
            x, self.weight, self.scales, self.biases, transpose=True, group_size=self.group_size, bits=self.bits
        )


def _rows(weight: Any) -> int:
    return weight.shape[0]


class Embedding(nn.Module):
    """Token embedding table, dense or affine-quantized (rows gathered, then dequantized)."""

    def __init__(self, weight: mx.array | quant.QuantizedWeight) -> None:
        super().__init__()
        self.table = Linear(weight)

    def __call__(self, ids: mx.array) -> mx.array:
        table = self.table
        if table.bits is None:
            return table.weight[ids]
        return mx.dequantize(
            table.weight[ids], table.scales[ids], table.biases[ids], group_size=table.group_size, bits=table.bits
        )

    def as_linear(self) -> Linear:
        """The same table used as the output projection (tied embeddings)."""
        return self.table


class RoPE(nn.Module):
    """Rotary position embedding, half-split ("NeoX") pairs, with the model's frequency scaling.

    The wavelengths are precomputed once (`freqs`, as `mx.fast.rope` takes them), so plain,
    linear-scaled and Llama-3 factor-scaled RoPE run through the same call and the same kernels.
    """

    def __init__(self, head_dim: int, base: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.dims = head_dim
        exponents = mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim
        freqs = mx.power(mx.array(base, dtype=mx.float32), exponents)
        kind = (scaling or {}).get("rope_type")
        if kind == "linear":
            freqs = freqs * scaling["factor"]
        elif kind == "freq_factors":
            freqs = freqs * mx.array(scaling["factors"], dtype=mx.float32)
        elif kind is not None:
            raise ValueError(f"unsupported rope scaling {kind!r}")
        self._freqs = freqs
        self._inverse_frequencies = 1.0 / freqs
        # Evaluated now: private attributes are not parameters, so a lazy one would be recomputed
        # inside every compiled decode step that captures it (24 extra graph nodes at 0.5B).
        mx.eval(self._freqs, self._inverse_frequencies)

    @property
    def inverse_frequencies(self) -> mx.array:
        """Angle per position for each pair (what a kernel multiplies the position by)."""
        return self._inverse_frequencies

    def __call__(self, x: mx.array, offset: int | mx.array = 0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)


def attention_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
