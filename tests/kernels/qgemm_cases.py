"""Shapes, inputs and the comparison shared by the quantized GEMM tests (Metal on the CPU, CUDA on a GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from foundry_mlx.kernels import qgemm
from foundry_mlx.quant import QuantizedWeight


@dataclass(frozen=True)
class Case:
    m: int
    n: int  # rows of the weight matrix (output features)
    k: int
    bits: int = 4
    group: int = 64
    dtype: str = "float16"
    bias: bool = False
    residual: bool = False
    name: str = ""

    @property
    def id(self) -> str:
        flags = ("_bias" if self.bias else "") + ("_residual" if self.residual else "")
        return f"{self.name}M{self.m}_N{self.n}_K{self.k}_b{self.bits}_g{self.group}_{self.dtype}{flags}"


def make_inputs(case: Case, seed: int = 0) -> dict:
    """x, a weight quantized by MLX itself (scales in T, as models hold them), optional bias and residual."""
    dtype = getattr(mx, case.dtype)
    key_w, key_x, key_b, key_r = mx.random.split(mx.random.key(seed), 4)
    dense = mx.random.uniform(-1.0, 1.0, (case.n, case.k), key=key_w) * (3.0 / case.k) ** 0.5
    packed, scales, biases = mx.quantize(dense, group_size=case.group, bits=case.bits)
    weight = QuantizedWeight(packed, scales.astype(dtype), biases.astype(dtype), case.bits, case.group)
    inputs = dict(x=mx.random.normal((case.m, case.k), key=key_x).astype(dtype), weight=weight)
    if case.bias:
        inputs["bias"] = (0.5 * mx.random.normal((case.n,), key=key_b)).astype(dtype)
    if case.residual:
        inputs["residual"] = mx.random.normal((case.m, case.n), key=key_r).astype(dtype)
    mx.eval(inputs)
    return inputs


def oracle(inputs: dict) -> np.ndarray:
    """The reference twin computed in float32 from the T-valued inputs (MLX's half-precision CPU
    matmul accumulates in half, so it is no oracle there)."""
    def up(value):
        if isinstance(value, QuantizedWeight):
            return QuantizedWeight(value.weight, up(value.scales), up(value.biases), value.bits, value.group_size)
        return value.astype(mx.float32)
    return np.array(qgemm.reference(**{key: up(value) for key, value in inputs.items()}))


def tolerance(case: Case) -> float:
    """Max |kernel - oracle| allowed, relative to max |oracle|.

    The kernel rounds to T where the reference path does (each dequantized weight, the product,
    the bias sum, the residual sum) and the float32 oracle does not: each rounding is half an ulp
    of T (2^-11 for float16, 2^-8 for bfloat16) of a value at most the output's size, and the
    weights' roundings average out over K; 4 ulps covers it. Accumulation order (fp32 on both
    sides) adds ~1e-6.
    """
    return {"float16": 4 * 2**-10, "bfloat16": 4 * 2**-7}[case.dtype]


def compare(case: Case, ours: np.ndarray, reference: np.ndarray) -> float:
    ours, reference = ours.astype(np.float32), reference.astype(np.float32)
    assert ours.shape == reference.shape, f"{case.id}: shape {ours.shape} vs {reference.shape}"
    assert np.isfinite(ours).all(), f"{case.id}: outputs left unwritten (poison) or non-finite"
    error = float(np.abs(ours - reference).max() / np.abs(reference).max())
    assert error <= tolerance(case), f"{case.id}: relative error {error:.3g} > {tolerance(case):.3g}"
    return error
