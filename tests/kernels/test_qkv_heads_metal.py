"""The QKV heads + RoPE kernel's Metal rendition (kernels/qkv_heads.py), run on the CPU by the SIMT
harness, against its twin in MLX ops (`reshape`, `transpose`, `split`, `mx.fast.rope`); and the
route ops.norm_qkv_rope takes to it."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import ops
from foundry_mlx.kernels import qkv_heads
from foundry_mlx.layers import Linear, RoPE

from .metal_runs import as_float32, run_source


def _case(batch, length, heads, kv_heads, dim, dtype, scaling=None, seed=0):
    rng = np.random.default_rng(seed)
    y = mx.array(rng.normal(size=(batch, length, (heads + 2 * kv_heads) * dim)).astype(np.float32)).astype(dtype)
    return y, RoPE(dim, 10000.0, scaling)


def _run(y, rope, offset, heads, kv_heads):
    launch = qkv_heads.launch(y, rope.inverse_frequencies, offset, heads, kv_heads)
    return [as_float32(out) for out in run_source(qkv_heads.kernel_source(), launch.arguments())]


@pytest.mark.parametrize("batch, length, heads, kv_heads, dim, dtype, offset, scaling", [
    (1, 7, 4, 2, 8, mx.float16, 0, None),                                     # GQA, a partial threadgroup
    (2, 5, 3, 1, 16, mx.float16, 37, None),                                   # batch, a later chunk
    (1, 6, 2, 2, 8, mx.bfloat16, 3, {"rope_type": "linear", "factor": 2.0}),  # bfloat16, scaled RoPE
])
def test_metal_heads_match_the_mlx_ops(batch, length, heads, kv_heads, dim, dtype, offset, scaling):
    """q, k, v equal the reference's: V bit for bit (a copy), Q and K within one rounding of T (the
    rotation in fp32 as mx.fast.rope's; cos/sin and fused multiply-adds may differ in the last bit)."""
    y, rope = _case(batch, length, heads, kv_heads, dim, dtype, scaling)
    ours = _run(y, rope, offset, heads, kv_heads)
    expected = [np.array(a.astype(mx.float32)) for a in qkv_heads.reference(y, rope, offset, heads, kv_heads)]
    assert [o.shape for o in ours] == [(batch, heads, length, dim)] + [(batch, kv_heads, length, dim)] * 2
    np.testing.assert_array_equal(ours[2], expected[2])
    tolerance = 2.0 ** (-10 if dtype == mx.float16 else -7)  # one unit in the last place, relative
    for got, want in zip(ours[:2], expected[:2]):
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)
    unrotated = np.array(y.astype(mx.float32)).reshape(batch, length, -1, dim).transpose(0, 2, 1, 3)
    assert np.abs(ours[1] - unrotated[:, heads:heads + kv_heads]).max() > 0.1, "K was not rotated"


def test_metal_heads_at_a_wrong_offset_fail_the_comparison():
    """The comparison is not vacuous: the positions really enter the angle."""
    y, rope = _case(1, 4, 2, 1, 8, mx.float16)
    ours = _run(y, rope, 5, 2, 1)
    expected = np.array(qkv_heads.reference(y, rope, 0, 2, 1)[0].astype(mx.float32))
    with pytest.raises(AssertionError):
        np.testing.assert_allclose(ours[0], expected, rtol=1e-3, atol=1e-3)


def test_launch_refuses_a_width_that_is_not_whole_heads():
    y = mx.zeros((1, 4, 5 * 8 + 2), dtype=mx.float16)
    with pytest.raises(ValueError, match="not 5 heads"):
        qkv_heads.launch(y, RoPE(8, 10000.0).inverse_frequencies, 0, 3, 1)


@pytest.mark.parametrize("value, backend, on", [
    ("", "cuda", True), ("", "metal", False), ("1", "metal", True), ("0", "cuda", False), ("1", None, False),
])
def test_switch(monkeypatch, value, backend, on):
    monkeypatch.setenv(qkv_heads.SWITCH, value)
    assert qkv_heads.enabled(backend) is on


def test_switch_refuses_other_values(monkeypatch):
    monkeypatch.setenv(qkv_heads.SWITCH, "yes")
    with pytest.raises(Exception, match="FOUNDRY_QKV_HEADS"):
        qkv_heads.enabled("cuda")


class _FakeKernelSet:
    backend = "metal"


@pytest.mark.parametrize("length, offset, routed", [(6, 0, True), (6, 4, True), (1, 0, False),
                                                     (6, mx.array(0), False)])
def test_norm_qkv_rope_routes_prompts_to_the_kernel(monkeypatch, length, offset, routed):
    """With the kernel on, prompts (L > 1 at an integer offset) take one launch; a single token or an
    array offset (a compiled decode step) keeps the MLX ops. Either way the values are the reference's."""
    calls = []

    def fake_run(backend, y, inverse_frequencies, at, heads, kv_heads):
        calls.append((backend, at))
        return qkv_heads.reference(y, rope, at, heads, kv_heads)

    monkeypatch.setenv(qkv_heads.SWITCH, "1")
    monkeypatch.setattr(ops.kernels, "active", lambda: _FakeKernelSet())
    monkeypatch.setattr(ops, "_decode_kernels", lambda batch, length: None)
    monkeypatch.setattr(qkv_heads, "run", fake_run)
    rng = np.random.default_rng(1)
    heads, kv_heads, dim, hidden = 2, 1, 8, 16
    x = mx.array(rng.normal(size=(1, length, hidden)).astype(np.float32))
    qkv = Linear(mx.array(rng.normal(size=((heads + 2 * kv_heads) * dim, hidden)).astype(np.float32)))
    rope = RoPE(dim, 10000.0)
    norm = mx.ones((hidden,))
    q, k, v = ops.norm_qkv_rope(x, norm, 1e-6, qkv, rope, offset, heads, kv_heads)
    assert calls == ([("metal", offset)] if routed else [])
    fused = ops.linear(mx.fast.rms_norm(x, norm, 1e-6), qkv)
    for got, want in zip((q, k, v), qkv_heads.reference(fused, rope, offset, heads, kv_heads)):
        np.testing.assert_array_equal(np.array(got), np.array(want))


@pytest.mark.parametrize("bias", [False, True])
def test_summed_variant_equals_the_reduce_launch_then_the_heads(bias):
    """From split-K's partials (3 slabs) the summed variant gives, bit for bit, what the reduce
    launch (kernels/qgemm_source.py) followed by the heads kernel gives: the same sums, roundings
    and bias, in one launch."""
    from foundry_mlx.kernels import qgemm, qgemm_source

    heads, kv_heads, dim, batch, length = 3, 1, 8, 2, 5
    width = (heads + 2 * kv_heads) * dim
    rng = np.random.default_rng(7)
    partials = mx.array(rng.normal(size=(3, batch * length, width)).astype(np.float32))
    b = mx.array(rng.normal(size=width).astype(np.float16)) if bias else None
    rope = RoPE(dim, 10000.0)
    launch = qkv_heads.summed_launch(partials, b, mx.float16, batch, rope.inverse_frequencies, 4, heads, kv_heads)
    ours = run_source(qkv_heads.kernel_source(summed=True, bias=bias), launch.arguments())
    reduce = qgemm.reduce_launch(partials, (batch, length, width), mx.float16, b)
    (y,) = run_source(qgemm_source.reduce_source(bias=bias), reduce.arguments())
    two_launches = run_source(qkv_heads.kernel_source(),
                              qkv_heads.launch(mx.array(y), rope.inverse_frequencies, 4, heads, kv_heads).arguments())
    for got, want in zip(ours, two_launches):
        np.testing.assert_array_equal(got, want)


def test_norm_qkv_rope_sums_split_partials_in_the_heads_launch(monkeypatch):
    """Where the QKV product takes our GEMM split along K, `ops.norm_qkv_rope` launches the split
    GEMM and then the summed heads kernel (here on the simulator), never the reduce launch; the
    values are the reference path's (partials made from the reference product)."""
    from foundry_mlx.kernels import qgemm

    heads, kv_heads, dim, hidden, length = 2, 1, 8, 16, 6
    rng = np.random.default_rng(2)
    x = mx.array(rng.normal(size=(1, length, hidden)).astype(np.float32)).astype(mx.float16)
    qkv = Linear(mx.array(rng.normal(size=((heads + 2 * kv_heads) * dim, hidden)).astype(np.float32) * 0.3
                          ).astype(mx.float16), bias=mx.array(rng.normal(size=(heads + 2 * kv_heads) * dim)
                                                             ).astype(mx.float16))
    rope, norm = RoPE(dim, 10000.0), mx.ones((hidden,), dtype=mx.float16)
    calls = []

    def split_partials(backend, h, weight):
        calls.append("split")
        y = np.array(h.astype(mx.float32) @ qkv.weight.astype(mx.float32).T).reshape(length, -1)
        return mx.array(np.stack([y * 0.5, y * 0.5]))

    def run_summed(backend, partials, bias, dtype, batch, inverse_frequencies, offset, n_heads, n_kv_heads):
        calls.append("summed")
        launch = qkv_heads.summed_launch(partials, bias, dtype, batch, inverse_frequencies, offset, n_heads,
                                         n_kv_heads)
        return [mx.array(a) for a in run_source(qkv_heads.kernel_source(True, bias is not None), launch.arguments())]

    monkeypatch.setenv(qkv_heads.SWITCH, "1")
    monkeypatch.setattr(ops.kernels, "active", lambda: _FakeKernelSet())
    monkeypatch.setattr(ops, "_decode_kernels", lambda batch, length: None)
    monkeypatch.setattr(ops, "_gemm_route", lambda h, layer: ("metal", "kernel"))
    monkeypatch.setattr(qgemm, "splits", lambda *args: 2)
    monkeypatch.setattr(qgemm, "split_partials", split_partials)
    monkeypatch.setattr(qkv_heads, "run_summed", run_summed)
    q, k, v = ops.norm_qkv_rope(x, norm, 1e-6, qkv, rope, 0, heads, kv_heads)
    assert calls == ["split", "summed"]
    fused = (mx.fast.rms_norm(x, norm, 1e-6).astype(mx.float32) @ qkv.weight.astype(mx.float32).T).astype(
        mx.float16) + qkv.bias
    for got, want in zip((q, k, v), qkv_heads.reference(fused, rope, 0, heads, kv_heads)):
        np.testing.assert_allclose(np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32)),
                                   rtol=2**-9, atol=2**-9)
