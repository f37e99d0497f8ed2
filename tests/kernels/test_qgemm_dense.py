"""The dense prefill route (kernels/qgemm_dense.py) against MLX's quantized_matmul and the float32 oracle, on the CPU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx.kernels import qgemm_dense
from foundry_mlx.quant import QuantizedWeight

from .qgemm_cases import Case, compare, make_inputs, oracle

CASES = [
    Case(20, 72, 128, group=32, bias=True, residual=True),
    Case(7, 200, 256, bits=5, group=64, bias=True),
    Case(33, 96, 384, bits=8, group=128, residual=True),
    Case(16, 64, 192, bits=6, group=64, dtype="bfloat16", bias=True, residual=True),
    Case(9, 40, 64, bits=4, group=32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dense_route_equals_mlx_quantized_matmul_in_float32(case):
    """Against an implementation it shares no code with: MLX's quantized_matmul on the same packed
    weights (float32, so the CPU's half-precision accumulation is not what is compared), plus the
    bias and residual as ops.linear adds them. (qgemm.reference *is* the dense route.)"""
    inputs = make_inputs(case, seed=3)
    ours = qgemm_dense.run(**inputs)
    assert ours.dtype == getattr(mx, case.dtype) and ours.shape == (case.m, case.n)
    weight = inputs["weight"]
    x = inputs["x"].astype(mx.float32)
    up = QuantizedWeight(weight.weight, weight.scales.astype(mx.float32), weight.biases.astype(mx.float32),
                         weight.bits, weight.group_size)
    wide = qgemm_dense.run(x, up, **{k: v.astype(mx.float32) for k, v in inputs.items() if k in ("bias", "residual")})
    theirs = mx.quantized_matmul(x, weight.weight, up.scales, up.biases, transpose=True,
                                 group_size=weight.group_size, bits=weight.bits)
    if "bias" in inputs:
        theirs = theirs + inputs["bias"].astype(mx.float32)
    if "residual" in inputs:
        theirs = inputs["residual"].astype(mx.float32) + theirs
    np.testing.assert_allclose(np.array(wide), np.array(theirs), rtol=1e-4, atol=1e-4 * float(mx.abs(theirs).max()))
    compare(case, np.array(ours.astype(mx.float32)), np.array(theirs))


@pytest.mark.parametrize("case", [c for c in CASES if c.dtype == "float16"], ids=lambda c: c.id)
def test_dense_route_within_the_kernels_tolerance_of_the_float32_oracle(case):
    """The bound the kernel meets (tests/kernels/qgemm_cases.py); CPU float16 matmul accumulates
    in half, so K stays small here."""
    inputs = make_inputs(case, seed=5)
    compare(case, np.array(qgemm_dense.run(**inputs).astype(mx.float32)), oracle(inputs))


def test_dense_route_dequantizes_to_x_dtype_and_keeps_leading_axes():
    """float32 scales (as `up` makes them) must not turn a float16 product into a float32 one; x
    (B, L, K) and a residual (B, L, N) give (B, L, N), as qgemm.run returns them."""
    case = Case(12, 48, 128, group=64, bias=True, residual=True)
    inputs = make_inputs(case, seed=7)
    weight = inputs["weight"]
    wide = QuantizedWeight(weight.weight, weight.scales.astype(mx.float32), weight.biases.astype(mx.float32),
                           weight.bits, weight.group_size)
    x, residual = inputs["x"].reshape(2, 6, 128), inputs["residual"].reshape(2, 6, 48)
    ours = qgemm_dense.run(x, wide, bias=inputs["bias"], residual=residual)
    assert ours.dtype == mx.float16 and ours.shape == (2, 6, 48)
    compare(case, np.array(ours.reshape(12, 48).astype(mx.float32)), oracle(inputs))  # float32 dequantization rounds apart


def test_dense_route_handles_floating_x_of_the_weights_k_only():
    inputs = make_inputs(Case(4, 32, 64, group=32))
    assert qgemm_dense.supported(inputs["x"], inputs["weight"])
    assert qgemm_dense.supported(inputs["x"].astype(mx.float32), inputs["weight"])
    assert not qgemm_dense.supported(inputs["x"].astype(mx.int32), inputs["weight"])
    assert not qgemm_dense.supported(inputs["x"][:, :32], inputs["weight"])
