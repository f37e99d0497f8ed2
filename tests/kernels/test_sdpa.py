"""Decode attention kernel (kernels/sdpa.py): its Metal source on the CPU harness, and on a GPU,
against MLX's own scaled_dot_product_attention over the valid prefix of the cache."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import kernels
from foundry_mlx.kernels import sdpa, sdpa_split

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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gpu_split_attention_with_last_share_merge_matches_mlx(dtype):
    """sdpa_split.split_source (CUDA): a head's positions in shares, the last share to finish merging.
    Every case runs three times in one evaluation, with split counts changing from launch to
    launch: each launch must leave the per-head counters at zero for the next."""
    from foundry_mlx.kernels import sample

    if kernels.gpu_backend() != "cuda":
        pytest.skip("the split attention kernel is CUDA's (device atomics in a module global)")
    outs, expected = [], []
    for heads, kv_heads, head_dim, length, valid in CASES * 3:
        q, keys, values = (a.astype(getattr(mx, dtype)) for a in inputs(heads, kv_heads, head_dim, length, seed=valid))
        qkv = mx.concatenate([q, mx.zeros(2 * kv_heads * head_dim, dtype=q.dtype)])
        parts = mx.zeros(sdpa_split.parts_size(heads, head_dim), dtype=mx.float32)
        state = sample.make_state(valid - 1, 0, 0, 0, 0)
        scale = sdpa.default_scale(head_dim)
        kernel = sdpa_split.split_source(scale).build("cuda")
        outs.append(kernel(**sdpa_split.split_launch_arguments(qkv, keys, values, state, parts, heads))[0])
        expected.append(sdpa.reference(q.astype(mx.float32), keys.astype(mx.float32), values.astype(mx.float32),
                                       valid, scale))
    mx.eval(outs, expected)
    tolerance = 1e-4 if dtype == "float32" else 4e-3
    for out, reference in zip(outs, expected):
        np.testing.assert_allclose(np.array(out.astype(mx.float32)), np.array(reference), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("heads, capacity", [(14, 256), (14, 4096), (28, 2304), (64, 8192), (2, 64)])
def test_split_counts_fill_the_gpu_without_tiny_shares(heads, capacity):
    splits = sdpa_split.splits_for(heads, capacity)
    assert 1 <= splits <= sdpa_split.MAX_SPLITS
    assert heads * splits <= max(sdpa_split.TARGET_BLOCKS, heads)
    assert splits == 1 or capacity // splits >= 64


def test_split_source_merges_in_the_last_share_and_wraps_its_counter():
    source = sdpa_split.split_source(0.125)
    assert source.body.count("atomicInc(shares_done + head, last)") == 1
    assert "MUTABLE(float, parts) + COUNTERS_AT" in source.body  # counters after the parts, in the scratch
    assert sdpa_split.parts_size(28, 128) == 28 * sdpa_split.MAX_SPLITS * 130 + 28
    assert "__ldcg(part + 1)" in source.body  # other shares' parts read from L2, past L1
    assert "SPLITS = (int)gridDim.x / HEADS" in source.body  # one compile for every split count
