"""The short-prompt causal attention kernel (kernels/sdpa_prefill.py; on CUDA its tensor-core
rendition, kernels/sdpa_prefill_mma.py) on a real GPU backend against MLX's attention (cuDNN on
CUDA) at the real head layouts of Qwen2.5 0.5B (14 heads over 2, D 64) and 7B (28 over 4, D 128),
with lengths that are not a multiple of the 16-row tile, a batch of two and cached keys first. Marked `gpu` (tests/conftest.py). Tolerance: one rounding of T plus fp32
summation order (both accumulate in fp32)."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import kernels
from foundry_mlx.kernels import sdpa_prefill

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("batch, heads, kv_heads, dim, length, keys, dtype", [
    (1, 14, 2, 64, 128, 128, mx.float16), (1, 28, 4, 128, 128, 128, mx.float16), (1, 14, 2, 64, 16, 16, mx.bfloat16),
    (1, 28, 4, 128, 256, 256, mx.bfloat16), (1, 14, 2, 64, 100, 300, mx.float16),  # 200 cached positions first
    (2, 14, 2, 64, 37, 37, mx.float16), (1, 28, 4, 128, 2, 9, mx.bfloat16), (2, 28, 4, 128, 77, 77, mx.float16),
])
def test_attention_matches_mlx(batch, heads, kv_heads, dim, length, keys, dtype):
    rng = np.random.default_rng(length + keys)

    def make(*shape):
        return mx.array(rng.normal(size=shape).astype(np.float32)).astype(dtype)

    q, k, v = make(batch, heads, length, dim), make(batch, kv_heads, keys, dim), make(batch, kv_heads, keys, dim)
    scale = 1.0 / math.sqrt(dim)
    ours = np.array(sdpa_prefill.run(kernels.gpu_backend(), q, k, v, scale).astype(mx.float32))
    expected = np.array(sdpa_prefill.reference(q, k, v, scale).astype(mx.float32))
    tolerance = 2.0 ** (-9 if dtype == mx.float16 else -6)
    np.testing.assert_allclose(ours, expected, rtol=tolerance, atol=tolerance)


def test_prefill_logits_through_the_prompt_kernels_match_mlx(monkeypatch):
    """A random model of Qwen2.5-0.5B's shape: prefill logits of 100 tokens with the QKV heads kernel
    and this attention kernel on, against MLX's ops for both (products on MLX either way), within 2%
    of the logits' scale (the bound of test_qgemm_gpu.py's route test); each kernel is counted, so a
    route that silently falls back fails."""
    from foundry_mlx.kernels import qkv_heads
    from foundry_mlx.random_model import make_random_model

    model, _ = make_random_model("qwen2.5-0.5b", "4bit", mx.float16, seed=4)
    prompt = mx.array([[(37 * i + 11) % 151000 for i in range(100)]])
    calls = []
    for module in (qkv_heads, sdpa_prefill):
        original = module.run
        monkeypatch.setattr(module, "run", lambda *args, _run=original, **kw: calls.append(1) or _run(*args, **kw))
    monkeypatch.setenv("FOUNDRY_QGEMM", "0")
    logits = {}
    for value in ("0", "1"):
        monkeypatch.setenv(qkv_heads.SWITCH, value)
        monkeypatch.setenv(sdpa_prefill.SWITCH, value)
        logits[value] = np.array(model(prompt)[0].astype(mx.float32))
    assert len(calls) == 2 * model.config.num_hidden_layers
    reference, ours = logits["0"], logits["1"]
    assert np.isfinite(ours).all()
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error < 0.02, f"logits differ by {error:.3g} of their scale"


def test_a_second_turn_over_the_cache_matches_mlx(monkeypatch):
    """A later turn's prompt attends over the cache's keys as well (S > L, and the cache's arrays are
    views of a larger buffer, so MLX hands the kernel contiguous copies): the logits of a 40-token
    turn after a 70-token one, with this kernel on and off (MLX's attention), within 2% of their scale."""
    from foundry_mlx.random_model import make_random_model

    model, _ = make_random_model("qwen2.5-0.5b", "4bit", mx.float16, seed=5)
    first = mx.array([[(31 * i + 7) % 151000 for i in range(70)]])
    second = mx.array([[(17 * i + 3) % 151000 for i in range(40)]])
    calls = []
    original = sdpa_prefill.run
    monkeypatch.setattr(sdpa_prefill, "run", lambda *args, **kw: calls.append(1) or original(*args, **kw))
    logits = {}
    for value in ("0", "1"):
        monkeypatch.setenv(sdpa_prefill.SWITCH, value)
        cache = model.make_cache()
        mx.eval(model(first, cache=cache))
        assert cache[0].capacity > cache[0].offset  # the second turn reads views of a larger buffer
        logits[value] = np.array(model(second, cache=cache)[0].astype(mx.float32))
    assert len(calls) == 2 * model.config.num_hidden_layers  # both turns, every layer, with the switch on
    reference, ours = logits["0"], logits["1"]
    assert np.isfinite(ours).all()
    error = np.abs(ours - reference).max() / np.abs(reference).max()
    assert error < 0.02, f"logits differ by {error:.3g} of their scale"
