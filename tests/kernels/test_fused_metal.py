"""The fused decode step's kernels (sampling, embedding, fused attention) as Metal source on the CPU
SIMT harness, against their twins: the only check their Metal rendition gets without a Mac."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx.kernels import embed, sample, sdpa, sdpa_split

from .metal_runs import run_source

VOCAB = 3000
THREADS = 64  # the harness runs one OS thread per GPU thread: a small threadgroup, same algorithm


def _metal_draw(logits: np.ndarray, params, seed: int, counter: int, recent: list[int], schedule="concurrent"):
    ring = np.array((recent + [0] * 16)[:16], dtype=np.int32)
    arguments = sample.launch_arguments(mx.array(logits), sample.make_params(*params),
                                        sample.make_state(7, 0, counter, seed, len(recent)), mx.array(ring), "metal",
                                        threads=THREADS)
    next_state, token, _ = run_source(sample.kernel_source("metal"), arguments, schedule=schedule)
    return int(token[0]), next_state


@pytest.mark.parametrize("params", [
    (0.0, 0, 1.0, 0.0, 1.0), (0.0, 0, 1.0, 0.0, 1.4), (1.0, 0, 1.0, 0.0, 1.0), (0.7, 20, 1.0, 0.0, 1.0),
    (1.0, 0, 0.8, 0.0, 1.0), (0.8, 30, 0.9, 0.05, 1.2),
], ids=str)
def test_metal_sampling_kernel_matches_the_oracle(params):
    rng = np.random.default_rng(3)
    logits = (rng.standard_normal(VOCAB) * 2.5).astype(np.float32)
    recent = rng.integers(0, VOCAB, size=10).tolist()
    for counter in range(3):
        token, next_state = _metal_draw(logits, params, 77, counter, recent)
        assert token == sample.reference(mx.array(logits), *params, recent, 77, counter)
        greedy = params[0] <= 0
        assert next_state.tolist()[:5] == [8, token, counter + (0 if greedy else 1), 77, len(recent) + 1]


def test_metal_sampling_kernel_is_schedule_independent():
    """One thread at a time, switching only at barriers: a missing barrier would read poison."""
    logits = (np.random.default_rng(4).standard_normal(VOCAB) * 2).astype(np.float32)
    params = (0.9, 25, 0.9, 0.0, 1.1)
    draws = {_metal_draw(logits, params, 5, 2, [1, 2, 3], schedule=s)[0] for s in ("forward", "reverse")}
    assert draws == {sample.reference(mx.array(logits), *params, [1, 2, 3], 5, 2)}


def test_metal_embedding_kernel_dequantizes_the_state_token():
    rng = np.random.default_rng(5)
    table = mx.array(rng.standard_normal((50, 96)).astype(np.float32))
    weight, scales, biases = mx.quantize(table, group_size=32, bits=4)
    from foundry_mlx.quant import QuantizedWeight

    quantized = QuantizedWeight(weight, scales, biases, 4, 32)
    state = sample.make_state(3, 17, 0, 0, 0)
    (x,) = run_source(embed.kernel_source(), embed.launch_arguments(state, quantized, mx.float32))
    expected = np.array(mx.dequantize(weight[17:18], scales[17:18], biases[17:18], group_size=32, bits=4))[0]
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)


def test_metal_fused_attention_reads_the_query_from_qkv_and_the_length_from_state():
    heads, kv_heads, dims, length, position = 4, 2, 32, 64, 40
    rng = np.random.default_rng(6)
    qkv = mx.array(rng.standard_normal((heads + 2 * kv_heads) * dims).astype(np.float32))
    keys = mx.array(rng.standard_normal((1, kv_heads, length, dims)).astype(np.float32))
    values = mx.array(rng.standard_normal((1, kv_heads, length, dims)).astype(np.float32))
    state = sample.make_state(position, 0, 0, 0, 0)
    (out,) = run_source(sdpa.fused_source(0.17), sdpa.fused_launch_arguments(qkv, keys, values, state, heads))
    expected = np.array(sdpa.reference(qkv[: heads * dims], keys, values, position + 1, 0.17))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("position, splits", [(0, 3), (40, 3), (63, 4), (9, 16)])
def test_metal_split_attention_and_merge_equal_one_pass(position, splits):
    """The layer kernel's attention phase (kernels/fused_layer.py) as two Metal kernels: each head's
    positions in `splits` shares (sdpa_split.split_body, partial softmaxes), then sdpa_split.MERGE_BODY. Shares
    that see no position (short contexts, many splits) must drop out of the merge."""
    from foundry_mlx.kernels.source import KernelSource

    heads, kv_heads, dims, length, warps, scale = 4, 2, 32, 64, 2, 0.17
    rng = np.random.default_rng(position + splits)
    qkv = mx.array(rng.standard_normal((heads + 2 * kv_heads) * dims).astype(np.float32))
    keys = mx.array(rng.standard_normal((1, kv_heads, length, dims)).astype(np.float32))
    values = mx.array(rng.standard_normal((1, kv_heads, length, dims)).astype(np.float32))
    state = sample.make_state(position, 0, 0, 0, 0)
    body = sdpa.RUNTIME_S + sdpa.from_state(sdpa_split.split_body(), scale)
    split = KernelSource("split_attention", ("q", "keys", "values", "state"), ("parts",), body)
    part_size = heads * splits * (dims + 2)
    (parts,) = run_source(split, dict(
        inputs=[qkv, keys, values, state], grid=(heads * splits * warps * 32, 1, 1), threadgroup=(warps * 32, 1, 1),
        template=[("T", mx.float32), ("D", dims), ("HEADS", heads), ("KV_HEADS", kv_heads),
                  ("WARPS", warps), ("SPLITS", splits)],
        output_shapes=[(part_size,)], output_dtypes=[mx.float32]))
    merge = KernelSource("merge_attention", ("parts",), ("out",), sdpa_split.MERGE_BODY)
    (out,) = run_source(merge, dict(
        inputs=[mx.array(parts)], grid=(heads * 32, 1, 1), threadgroup=(32, 1, 1),
        template=[("T", mx.float32), ("D", dims), ("SPLITS", splits)],
        output_shapes=[(heads * dims,)], output_dtypes=[mx.float32]))
    expected = np.array(sdpa.reference(qkv[: heads * dims], keys, values, position + 1, scale))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    empty = [s for s in range(splits) if parts.reshape(heads, splits, dims + 2)[0, s, 1] == 0.0]
    def ceil_div(a: int, b: int) -> int:
        return -(-a // b)

    per_warp = 32 // (dims // 8)  # positions a SIMD-group scores at once: shares are whole multiples
    share = ceil_div(ceil_div(position + 1, splits), per_warp) * per_warp
    assert len(empty) == splits - min(splits, ceil_div(position + 1, share))  # exactly the shares past the end
