"""Shapes and inputs shared by the GEMV kernel tests (Metal on CPU, and CUDA/Metal on a GPU).

The real shapes are Qwen2.5-0.5B's: fused QKV 896→1152 (Q5_0 Q/K promoted to 8-bit beside a Q8_0 V),
gate/up 896→2×4864 (Q5_0), down 4864→896 (Q4_K or Q6_K→8-bit), lm_head 896→151936 (Q8_0). The edge
cases cover N not a multiple of the tile, K of three blocks, groups of 64 and 128, bits 5 and 6.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from foundry_mlx.kernels import qgemv
from foundry_mlx.quant import QuantizedWeight


@dataclass(frozen=True)
class Case:
    name: str
    variant: qgemv.Variant
    k: int
    n: int  # rows of the weight matrix
    bits: int
    group: int = 32
    dtype: str = "float32"
    head_dim: int = 64
    rope_rows: int = 0
    position: int = 0
    sample_groups: tuple[int, ...] | None = None  # run only these threadgroups (huge grids)
    extra: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.name


QKV = qgemv.Variant(norm=True, bias=True, rope=True)
CASES = [
    Case("qkv_896x1152_b8", QKV, 896, 1152, 8, rope_rows=1024, position=37),
    Case("qkv_896x1152_b5_f16", QKV, 896, 1152, 5, dtype="float16", rope_rows=1024, position=4093),
    Case("gate_up_896x9728_b5", qgemv.Variant(norm=True, swiglu=True), 896, 2 * 4864, 5),
    Case("down_4864x896_b4_residual", qgemv.Variant(residual=True), 4864, 896, 4),
    Case("down_4864x896_b8_residual", qgemv.Variant(residual=True), 4864, 896, 8),
    Case("o_proj_896x896_b5_residual_bf16", qgemv.Variant(residual=True), 896, 896, 5, dtype="bfloat16"),
    Case("lm_head_896x151936_b8_norm", qgemv.Variant(norm=True), 896, 151936, 8, sample_groups=(0, 1, 4747, 9495)),
    Case("edge_96x37_b6", qgemv.Variant(), 96, 37, 6),
    Case("edge_256x100_b5_g128_bias", qgemv.Variant(bias=True), 256, 100, 5, group=128),
    Case("edge_384x130_b4_g64_norm", qgemv.Variant(norm=True), 384, 130, 4, group=64),
    Case("edge_512x1000_b6_g64_residual", qgemv.Variant(residual=True), 512, 1000, 6, group=64),
    Case("edge_rope_no_bias_b4", qgemv.Variant(norm=True, rope=True), 128, 6 * 32, 4, head_dim=32, rope_rows=128,
         position=100),
    Case("edge_swiglu_g128_b6_f16", qgemv.Variant(norm=True, swiglu=True), 256, 2 * 70, 6, group=128, dtype="float16"),
]


def make_inputs(case: Case, seed: int = 0) -> dict:
    """Random weights quantized by MLX itself, and the launch's keyword arguments."""
    rng = np.random.default_rng(seed)
    dtype = getattr(mx, case.dtype)
    dense = mx.array(rng.standard_normal((case.n, case.k)).astype(np.float32) / np.sqrt(case.k))
    w, scales, biases = mx.quantize(dense, group_size=case.group, bits=case.bits)
    weight = QuantizedWeight(w, scales.astype(dtype), biases.astype(dtype), case.bits, case.group)
    kwargs = {"x": mx.array(rng.standard_normal(case.k).astype(np.float32)).astype(dtype), "weight": weight}
    if case.variant.norm:
        kwargs["norm_weight"] = mx.array(rng.uniform(0.5, 1.5, case.k).astype(np.float32)).astype(dtype)
        kwargs["eps"] = 1e-6
    if case.variant.bias:
        kwargs["bias"] = mx.array(rng.standard_normal(case.n).astype(np.float32) * 0.5).astype(dtype)
    if case.variant.residual:
        kwargs["residual"] = mx.array(rng.standard_normal(case.n).astype(np.float32)).astype(dtype)
    if case.variant.rope:
        half = case.head_dim // 2
        freqs = 10000.0 ** (np.arange(0, case.head_dim, 2, dtype=np.float32) / case.head_dim)
        kwargs.update(inv_freq=mx.array(1.0 / freqs), position=case.position, rope_rows=case.rope_rows,
                      head_dim=case.head_dim)
        assert half * 2 == case.head_dim
    return kwargs


def reference_inputs(kwargs: dict) -> dict:
    """The same inputs in float32: the oracle computes in float32 from T-valued inputs, because
    MLX's own half-precision CPU matmul accumulates in half (measured 4.6% off in bfloat16)."""
    def up(value):
        if isinstance(value, mx.array) and value.dtype in (mx.float16, mx.bfloat16):
            return value.astype(mx.float32)
        if isinstance(value, QuantizedWeight):
            return QuantizedWeight(value.weight, up(value.scales), up(value.biases), value.bits, value.group_size)
        return value
    return {key: up(value) for key, value in kwargs.items()}


def tolerance(case: Case) -> float:
    """Max |kernel - reference| allowed, relative to max |reference|.

    float32: the two accumulate in float32 in different orders (~1e-6 measured). Half types: the
    kernel rounds to T where the model's reference path does (the normalised x, the matmul
    output, the bias sum), the float32 oracle does not; each rounding is half an ulp of T
    (2^-11 for float16, 2^-8 for bfloat16) of a value at most the output's size, and up to
    three of them add up: 4 ulps covers it.
    """
    return {"float32": 1e-4, "float16": 4 * 2**-10, "bfloat16": 4 * 2**-7}[case.dtype]


def compare(case: Case, ours: np.ndarray, reference: np.ndarray, rows: np.ndarray | None = None) -> float:
    ours, reference = ours.astype(np.float32), reference.astype(np.float32)
    if rows is not None:
        ours, reference = ours[rows], reference[rows]
    assert np.isfinite(ours).all(), "the kernel left outputs unwritten (poison) or produced non-finite values"
    error = float(np.abs(ours - reference).max() / np.abs(reference).max())
    assert error <= tolerance(case), f"{case.name}: relative error {error:.3g} > {tolerance(case):.3g}"
    return error
