"""The QKV heads + RoPE kernel (kernels/qkv_heads.py) on a real GPU backend against its twin in MLX
ops, at the real head layouts of Qwen2.5 0.5B (14 + 2 + 2 heads of 64) and 7B (28 + 4 + 4 of 128).

Marked `gpu` (tests/conftest.py). Tolerance: V bit for bit; Q and K within one rounding of T (the
rotation is fp32 in both; cos/sin and fused multiply-adds may differ in the last bit), and most
elements bit for bit.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import kernels
from foundry_mlx.kernels import qkv_heads
from foundry_mlx.layers import RoPE

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("heads, kv_heads, dim, length, offset, dtype", [
    (14, 2, 64, 128, 0, mx.float16), (14, 2, 64, 37, 2048, mx.float16), (28, 4, 128, 512, 0, mx.float16),
    (28, 4, 128, 100, 7, mx.bfloat16), (14, 2, 64, 16, 0, mx.bfloat16),
])
def test_heads_match_the_mlx_ops(heads, kv_heads, dim, length, offset, dtype):
    backend = kernels.gpu_backend()
    rng = np.random.default_rng(length)
    y = mx.array(rng.normal(size=(1, length, (heads + 2 * kv_heads) * dim)).astype(np.float32)).astype(dtype)
    rope = RoPE(dim, 1000000.0)
    ours = [np.array(a.astype(mx.float32)) for a in qkv_heads.run(backend, y, rope.inverse_frequencies, offset,
                                                                  heads, kv_heads)]
    expected = [np.array(a.astype(mx.float32)) for a in qkv_heads.reference(y, rope, offset, heads, kv_heads)]
    np.testing.assert_array_equal(ours[2], expected[2])
    tolerance = 2.0 ** (-10 if dtype == mx.float16 else -7)
    for got, want in zip(ours[:2], expected[:2]):
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
        same = np.mean(got == want)
        assert same > 0.9, f"only {same:.1%} of the elements equal mx.fast.rope's"


@pytest.mark.parametrize("bias", [False, True])
def test_summed_heads_equal_the_reduce_launch_then_the_heads(bias):
    """The 0.5B's QKV product at 128 rows split along K: the summed heads kernel gives the bits of
    the reduce launch followed by the heads kernel (qgemm.run, then qkv_heads.run)."""
    from foundry_mlx.kernels import qgemm

    from .qgemm_cases import Case, make_inputs

    backend = kernels.gpu_backend()
    if backend != "cuda":
        pytest.skip("split-K is CUDA's")
    inputs = make_inputs(Case(128, 896 + 2 * 128, 896, bias=bias))
    x, weight = inputs["x"].reshape(1, 128, 896), inputs["weight"]
    layer_bias = inputs["bias"] if bias else None
    rope = RoPE(64, 1000000.0)
    partials = qgemm.split_partials(backend, x, weight, split=4)
    ours = qkv_heads.run_summed(backend, partials, layer_bias, x.dtype, 1, rope.inverse_frequencies, 0, 14, 2)
    product = qgemm.run(backend, x, weight, bias=layer_bias, split=4)
    expected = qkv_heads.run(backend, product, rope.inverse_frequencies, 0, 14, 2)
    for got, want in zip(ours, expected):
        np.testing.assert_array_equal(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)))
