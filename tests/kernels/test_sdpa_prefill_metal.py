"""The short-prompt causal attention kernel's Metal rendition (kernels/sdpa_prefill.py), run on the
CPU by the SIMT harness, against its twin (MLX's attention with the causal mask, then the rows
o_proj reads); and the route `ops.attention` takes to it."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import ops
from foundry_mlx.kernels import sdpa_prefill

from .metal_runs import as_float32, run_source


def _inputs(batch, heads, kv_heads, length, keys, dim, dtype, seed=0):
    rng = np.random.default_rng(seed)

    def make(*shape):
        return mx.array(rng.normal(size=shape).astype(np.float32)).astype(dtype)

    return make(batch, heads, length, dim), make(batch, kv_heads, keys, dim), make(batch, kv_heads, keys, dim)


def _run(q, k, v, scale):
    (out,) = run_source(sdpa_prefill.kernel_source(scale), sdpa_prefill.launch(q, k, v).arguments())
    return as_float32(out)


@pytest.mark.parametrize("batch, heads, kv_heads, length, keys, dim, dtype", [
    (1, 4, 2, 7, 7, 64, mx.float16),      # GQA, a partial threadgroup (28 rows, 4 a group)
    (2, 2, 1, 5, 9, 64, mx.float16),      # a batch; 4 cached positions before the prompt
    (1, 2, 2, 6, 6, 128, mx.bfloat16),    # D = 128, bfloat16
])
def test_metal_attention_matches_mlx(batch, heads, kv_heads, length, keys, dim, dtype):
    """Within one rounding of T (plus fp32 summation order) of MLX's causal attention, laid out
    (B, L, heads·D)."""
    q, k, v = _inputs(batch, heads, kv_heads, length, keys, dim, dtype)
    scale = 1.0 / math.sqrt(dim)
    ours = _run(q, k, v, scale)
    expected = np.array(sdpa_prefill.reference(q, k, v, scale).astype(mx.float32))
    assert ours.shape == expected.shape == (batch, length, heads * dim)
    tolerance = 2.0 ** (-9 if dtype == mx.float16 else -6)
    np.testing.assert_allclose(ours, expected, rtol=tolerance, atol=tolerance)


def test_metal_attention_is_causal():
    """The comparison is not vacuous: attention over every key (no mask) is not what the kernel gives,
    and the first query sees only the first key (its row is that key's value)."""
    q, k, v = _inputs(1, 2, 1, 4, 4, 64, mx.float16, seed=3)
    ours = _run(q, k, v, 0.125)
    full = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.125).transpose(0, 2, 1, 3).reshape(1, 4, -1)
    assert np.abs(ours - np.array(full.astype(mx.float32))).max() > 1e-2
    np.testing.assert_array_equal(ours[0, 0, :64], np.array(v[0, 0, 0].astype(mx.float32)))


def test_launch_refuses_mismatched_shapes():
    q, k, v = _inputs(1, 3, 2, 4, 4, 64, mx.float16)
    with pytest.raises(ValueError, match="do not match"):
        sdpa_prefill.launch(q, k, v)  # 3 heads over 2 KV heads
    q, k, v = _inputs(1, 2, 1, 6, 4, 64, mx.float16)
    with pytest.raises(ValueError, match="at least as many keys"):
        sdpa_prefill.launch(q, k, v)


@pytest.mark.parametrize("length, dim, mask, served", [
    (128, 64, "causal", True), (256, 128, "causal", True), (257, 64, "causal", False), (1, 64, "causal", False),
    (128, 96, "causal", False), (128, 64, None, False),
])
def test_applies_to_short_causal_prompts(length, dim, mask, served):
    assert sdpa_prefill.applies(mx.zeros((1, 2, length, dim)), mask) is served


@pytest.mark.parametrize("value, backend, on", [("", "cuda", True), ("", "metal", False), ("1", "cuda", True),
                                                ("1", "metal", True), ("1", None, False), ("", None, False),
                                                ("0", "cuda", False)])
def test_switch(monkeypatch, value, backend, on):
    monkeypatch.setenv(sdpa_prefill.SWITCH, value)
    assert sdpa_prefill.enabled(backend) is on


def test_switch_refuses_other_values(monkeypatch):
    monkeypatch.setenv(sdpa_prefill.SWITCH, "on")
    with pytest.raises(Exception, match=sdpa_prefill.SWITCH):
        sdpa_prefill.enabled("cuda")


class _FakeKernelSet:
    backend = "metal"


def test_ops_attention_takes_the_kernel_when_on(monkeypatch):
    """With the switch on and a GPU backend, `ops.attention` of a prompt calls the kernel (here its
    Metal source on the simulator) and gives MLX's values; off, it never does."""
    calls = []

    def simulated(backend, q, k, v, scale):
        calls.append(backend)
        return mx.array(_run(q, k, v, scale)).astype(q.dtype)

    monkeypatch.setattr(ops.kernels, "active", lambda: _FakeKernelSet())
    monkeypatch.setattr(sdpa_prefill, "run", simulated)
    q, k, v = _inputs(1, 4, 2, 6, 6, 64, mx.float16, seed=5)
    monkeypatch.setenv(sdpa_prefill.SWITCH, "0")
    expected = ops.attention(q, k, v, 0.125, "causal")
    assert calls == []
    monkeypatch.setenv(sdpa_prefill.SWITCH, "1")
    ours = ops.attention(q, k, v, 0.125, "causal")
    assert calls == ["metal"] and ours.shape == (1, 6, 256)
    np.testing.assert_allclose(np.array(ours.astype(mx.float32)), np.array(expected.astype(mx.float32)),
                               rtol=2**-9, atol=2**-9)


def test_each_backend_runs_its_rendition(monkeypatch):
    """CUDA builds the tensor-core kernel (kernels/sdpa_prefill_mma.py: a 32-thread block per 16
    query rows of each batch row and head), Metal the SIMD-group-per-row one; the CUDA rendition's
    values are checked on the GPU (tests/kernels/test_sdpa_prefill_gpu.py)."""
    from foundry_mlx.kernels import source as kernel_source_module

    built, launched = [], []

    def build(source, backend, shared_memory=0):
        built.append((backend, source.name))

        def kernel(**arguments):
            launched.append((backend, arguments["grid"], arguments["threadgroup"]))
            return [mx.zeros(arguments["output_shapes"][0], arguments["output_dtypes"][0])]
        return kernel

    monkeypatch.setattr(kernel_source_module.KernelSource, "build", build)
    monkeypatch.setattr(sdpa_prefill, "_kernels", {})
    q, k, v = _inputs(2, 4, 2, 37, 40, 64, mx.float16)
    for backend in ("cuda", "metal"):
        assert sdpa_prefill.run(backend, q, k, v, 0.125).shape == (2, 37, 256)
    assert [b for b, _ in built] == ["cuda", "metal"]
    assert "mma" in built[0][1] and "mma" not in built[1][1]
    assert launched[0] == ("cuda", (2 * 4 * 3 * 32, 1, 1), (32, 1, 1))  # 37 rows: three 16-row tiles


def test_tensor_core_launch_refuses_mismatched_shapes():
    from foundry_mlx.kernels import sdpa_prefill_mma

    with pytest.raises(ValueError, match="do not match"):
        sdpa_prefill_mma.launch(*_inputs(1, 3, 2, 4, 4, 64, mx.float16))
    with pytest.raises(ValueError, match="at least as many keys"):
        sdpa_prefill_mma.launch(*_inputs(1, 2, 1, 6, 4, 64, mx.float16))
