"""Decode attention kernel (kernels/sdpa.py): its Metal source on the CPU harness, and on a GPU,
against MLX's own scaled_dot_product_attention over the valid prefix of the cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import kernels
from foundry_mlx.kernels import sdpa

from .metal_runs import run_source

# (heads, kv_heads, head_dim, buffer length, valid positions): Qwen2.5-0.5B (14/2, 64), 7B (28/4, 128),
# a buffer far longer than its valid part, a single valid position, MHA without grouping.
CASES = [(14, 2, 64, 256, 37), (28, 4, 128, 512, 300), (14, 2, 64, 2304, 2049), (28, 4, 128, 2304, 1500), (4, 4, 64, 256, 1), (8, 2, 32, 64, 64)]


def inputs(heads, kv_heads, head_dim, length, seed=0):
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal(heads * head_dim).astype(np.float32))
    keys = mx.array(rng.standard_normal((1, kv_heads, length, head_dim)).astype(np.float32))
    values = mx.array(rng.standard_normal((1, kv_heads, length, head_dim)).astype(np.float32))
    return q, keys, values


@pytest.mark.parametrize("case", CASES, ids=str)
def test_metal_decode_attention_matches_mlx(case):
    heads, kv_heads, head_dim, length, valid = case
    q, keys, values = inputs(heads, kv_heads, head_dim, length)
    scale = sdpa.default_scale(head_dim)
    arguments = sdpa.launch_arguments(q, keys, values, mx.array(valid, dtype=mx.int32), scale)
    (out,) = run_source(sdpa.SOURCE, arguments)
    expected = np.array(sdpa.reference(q, keys, values, valid, scale))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_positions_past_the_valid_length_are_ignored():
    """Garbage (even inf) beyond `valid` must not reach the output."""
    q, keys, values = inputs(4, 2, 64, 256)
    poisoned_keys = mx.concatenate([keys[:, :, :10], mx.full((1, 2, 246, 64), mx.inf)], axis=2)
    arguments = sdpa.launch_arguments(q, poisoned_keys, values, mx.array(10, dtype=mx.int32), 0.125)
    (out,) = run_source(sdpa.SOURCE, arguments)
    np.testing.assert_allclose(out, np.array(sdpa.reference(q, keys, values, 10, 0.125)), rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gpu_decode_attention_matches_mlx(case, dtype):
    heads, kv_heads, head_dim, length, valid = case
    q, keys, values = (a.astype(getattr(mx, dtype)) for a in inputs(heads, kv_heads, head_dim, length))
    scale = sdpa.default_scale(head_dim)
    kernel = sdpa.SOURCE.build(kernels.gpu_backend())
    (out,) = kernel(**sdpa.launch_arguments(q, keys, values, mx.array(valid, dtype=mx.int32), scale))
    expected = sdpa.reference(q.astype(mx.float32), keys.astype(mx.float32), values.astype(mx.float32), valid, scale)
    tolerance = 1e-4 if dtype == "float32" else 4e-3
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(expected), rtol=tolerance, atol=tolerance)
