"""The compiled prefill (engine/prefill.py, FOUNDRY_PREFILL_COMPILE=1) against the eager forward pass."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import llama_quantized_spec, qwen2_quantized_spec, write_tiny_model

import foundry_mlx
from foundry_mlx import load
from foundry_mlx.engine import prefill as prefilling
from foundry_mlx.errors import FoundryError

LENGTHS = (1, 5, 16, 17, 127, 128, 130)


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def loaded(request, tmp_path_factory):
    spec = qwen2_quantized_spec() if request.param == "qwen2" else llama_quantized_spec()
    path = tmp_path_factory.mktemp("prefill") / f"{request.param}.gguf"
    write_tiny_model(path, spec)
    return load(str(path), progress=False)


@pytest.fixture
def switch_on(monkeypatch):
    monkeypatch.setenv(prefilling.SWITCH, "1")


def prompt(length: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed + length).integers(0, 200, size=length).tolist()


def eager(model, ids, cache):
    return model(mx.array([ids]), cache, last_only=True)[:, -1, :]


def reserved(cache, positions):
    for layer in cache:
        layer.reserve(positions)
    return cache


def assert_same_cache(got, expected, length):
    for ours, theirs in zip(got, expected, strict=True):
        assert ours.offset == theirs.offset == length
        assert ours.capacity == theirs.capacity
        for mine, reference in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            np.testing.assert_allclose(np.array(mine[..., :length, :]), np.array(reference[..., :length, :]),
                                       rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("length", LENGTHS)
def test_logits_and_cache_equal_eager(loaded, switch_on, length):
    """Padded to its bucket and compiled, a prefill gives the eager path's last logits, and leaves
    the cache at the same offset and capacity holding the same keys and values below it."""
    model, _ = loaded
    ids = prompt(length)
    compiled_cache, eager_cache = model.make_cache(), model.make_cache()
    traces = prefilling.compiled_prefill_for(model).traces
    got = prefilling.prefill(model, ids, compiled_cache)
    expected = eager(model, ids, eager_cache)
    assert prefilling.compiled_prefill_for(model).traces >= traces  # it ran (a new bucket traces)
    assert got.shape == expected.shape == (1, model.config.vocab_size)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-5)
    assert_same_cache(compiled_cache, eager_cache, length)


def test_reserved_and_capped_capacities_equal_eager(loaded, switch_on):
    """A reservation beyond the bucket (generate sizes a whole turn), and a cache capped below the
    bucket (150 tokens pad to 256 > 200): the capacities are the eager path's, and decode goes on."""
    model, _ = loaded
    ids = prompt(150)
    for make in (lambda: reserved(model.make_cache(), 400), lambda: model.make_cache(200)):
        compiled_cache, eager_cache = make(), make()
        got = prefilling.prefill(model, ids, compiled_cache)
        np.testing.assert_allclose(np.array(got), np.array(eager(model, ids, eager_cache)), rtol=1e-5, atol=1e-5)
        assert_same_cache(compiled_cache, eager_cache, len(ids))
        nxt = mx.array([[7]])
        np.testing.assert_allclose(np.array(model(nxt, compiled_cache)), np.array(model(nxt, eager_cache)),
                                   rtol=1e-5, atol=1e-5)


def test_trimmed_buffer_is_kept_like_eager(loaded, switch_on):
    """A session whose first token changed is trimmed to 0 and keeps its buffer: the compiled fill
    writes into it, as the eager write does, and leaves the same capacity."""
    model, _ = loaded
    compiled_cache, eager_cache = model.make_cache(), model.make_cache()
    for cache in (compiled_cache, eager_cache):
        eager(model, prompt(300, seed=1), cache)
        for layer in cache:
            layer.trim(0)
    ids = prompt(40)
    got = prefilling.prefill(model, ids, compiled_cache)
    np.testing.assert_allclose(np.array(got), np.array(eager(model, ids, eager_cache)), rtol=1e-5, atol=1e-5)
    assert_same_cache(compiled_cache, eager_cache, len(ids))


def test_greedy_generation_is_unchanged(loaded, monkeypatch):
    """`foundry_mlx.generate` greedy, switch on and off, short and bucket-crossing prompts."""
    model, tokenizer = loaded
    for length in (5, 130):
        ids = prompt(length, seed=2)
        texts = {}
        for value in ("0", "1"):
            monkeypatch.setenv(prefilling.SWITCH, value)
            texts[value] = foundry_mlx.generate(model, tokenizer, ids, max_tokens=12, ignore_eos=True)
        assert texts["1"] == texts["0"]


@pytest.mark.parametrize("length, padded", [(1, 16), (16, 16), (17, 32), (100, 128), (128, 128), (129, 256),
                                            (2048, 2048), (2049, 2176)])
def test_buckets(length, padded):
    assert prefilling.bucket(length) == padded


def test_one_trace_per_bucket(loaded, switch_on):
    """Two prompt lengths in one bucket trace once; the second length replays that trace."""
    model, _ = loaded
    compiled = prefilling.compiled_prefill_for(model)
    before = compiled.traces
    mx.eval(prefilling.prefill(model, prompt(3 * 128 + 7), model.make_cache()))
    assert compiled.traces == before + 1
    mx.eval(prefilling.prefill(model, prompt(3 * 128 + 100), model.make_cache()))
    mx.eval(prefilling.prefill(model, prompt(4 * 128), model.make_cache()))
    assert compiled.traces == before + 1


def test_each_gemm_switch_setting_traces_anew(loaded, switch_on, monkeypatch):
    """The GEMM's switches (FOUNDRY_QGEMM, _AHEAD, _SPLIT), FOUNDRY_QKV_HEADS and
    FOUNDRY_PREFILL_ATTENTION decide routes while tracing (prefill.route_switches), so a new setting
    of any gets its own trace of a bucket, and going back replays the first."""
    model, _ = loaded
    compiled = prefilling.compiled_prefill_for(model)
    ids = prompt(2 * 128 + 3)
    names = ("FOUNDRY_QGEMM_AHEAD", "FOUNDRY_QKV_HEADS", "FOUNDRY_QGEMM", "FOUNDRY_QGEMM_SPLIT",
             "FOUNDRY_PREFILL_ATTENTION")
    for name in names:
        monkeypatch.delenv(name, raising=False)
    mx.eval(prefilling.prefill(model, ids, model.make_cache()))
    before = compiled.traces
    for name, value in zip(names, ("2", "0", "0", "0", "0")):
        monkeypatch.setenv(name, value)
        mx.eval(prefilling.prefill(model, ids, model.make_cache()))
    assert compiled.traces == before + len(names)
    for name in names:
        monkeypatch.delenv(name, raising=False)
    mx.eval(prefilling.prefill(model, ids, model.make_cache()))
    assert compiled.traces == before + len(names)


def test_a_cache_that_is_not_fresh_runs_eagerly(loaded, switch_on, monkeypatch):
    """Later chunks and prompt-cache hits (offset > 0) take the eager path and match it."""
    model, _ = loaded
    cache, reference = model.make_cache(), model.make_cache()
    first, second = prompt(20), prompt(30, seed=3)
    prefilling.prefill(model, first, cache)
    eager(model, first, reference)
    calls = []
    monkeypatch.setattr(prefilling.CompiledPrefill, "__call__", lambda *a: calls.append(a))
    got = prefilling.prefill(model, second, cache)
    assert calls == []
    np.testing.assert_allclose(np.array(got), np.array(eager(model, second, reference)), rtol=1e-5, atol=1e-5)
    assert_same_cache(cache, reference, 50)


def test_bad_switch_value_is_one_sentence(loaded, monkeypatch):
    model, _ = loaded
    monkeypatch.setenv(prefilling.SWITCH, "yes")
    with pytest.raises(FoundryError, match="FOUNDRY_PREFILL_COMPILE must be 0 or 1"):
        prefilling.prefill(model, [1, 2, 3], model.make_cache())


@pytest.mark.parametrize("value, backend", [("0", "cuda"), ("", None), ("", "metal")])
def test_switch_off_never_compiles(loaded, monkeypatch, value, backend):
    """Off when asked (0), and by default wherever it was not measured faster (CPU, Metal)."""
    model, _ = loaded
    monkeypatch.setenv(prefilling.SWITCH, value)
    monkeypatch.setattr(prefilling.kernels, "gpu_backend", lambda: backend)
    monkeypatch.setattr(prefilling, "compiled_prefill_for", None)  # calling it would fail
    mx.eval(prefilling.prefill(model, [1, 2, 3], model.make_cache()))


def test_on_by_default_on_cuda(monkeypatch):
    monkeypatch.delenv(prefilling.SWITCH, raising=False)
    monkeypatch.setattr(prefilling.kernels, "gpu_backend", lambda: "cuda")
    assert prefilling.enabled()
    monkeypatch.setattr(prefilling.kernels, "gpu_backend", lambda: None)
    assert not prefilling.enabled()


@pytest.mark.gpu
def test_random_half_b_logits_match_eager_on_gpu(monkeypatch):
    """Qwen2.5-0.5B's shape, 4-bit, float16: compiled prefill (buckets of 100 and 130 tokens) vs
    eager, within 2% of the logits' scale (the prefill routes' bound in tests/kernels/
    test_qgemm_gpu.py: float16 rounding in another order, fused element-wise chains, and GEMMs
    of the padded height that may take another route)."""
    from foundry_mlx.random_model import make_random_model

    model, _ = make_random_model("qwen2.5-0.5b", "4bit", mx.float16, seed=4)
    monkeypatch.setenv(prefilling.SWITCH, "1")
    for length in (100, 130):
        ids = [(37 * i + 11) % 151000 for i in range(length)]
        compiled_cache, eager_cache = model.make_cache(), model.make_cache()
        got = np.array(prefilling.prefill(model, ids, compiled_cache).astype(mx.float32))
        expected = np.array(eager(model, ids, eager_cache).astype(mx.float32))
        scale = np.abs(expected).max()
        assert np.abs(got - expected).max() <= 0.02 * scale
        keys = np.array(compiled_cache[-1].keys[..., :length, :].astype(mx.float32))
        reference = np.array(eager_cache[-1].keys[..., :length, :].astype(mx.float32))
        assert np.abs(keys - reference).max() <= 0.02 * np.abs(reference).max()
        assert compiled_cache[0].offset == length


@pytest.mark.parametrize("layers, value, expected", [
    (28, "", [(0, 2), (2, 6), (6, 14), (14, 28)]),   # the 7B: the GPU waits for 2 layers' graph, not 28
    (24, "", [(0, 2), (2, 6), (6, 14), (14, 24)]),
    (24, "2", [(0, 2), (2, 24)]),
    (24, "1", [(0, 24)]),
    (7, "", [(0, 2), (2, 6), (6, 7)]),
    (2, "", [(0, 2)]),                                 # nothing left to overlap with
    (3, "9", [(0, 2), (2, 3)]),
])
def test_segments(monkeypatch, layers, value, expected):
    monkeypatch.setenv(prefilling.SEGMENTS_SWITCH, value)
    assert prefilling.segments(layers) == expected
    assert prefilling.segments(layers, 1) == (expected if value else [(0, layers)])


@pytest.mark.parametrize("shape, padded, expected", [
    ("qwen2.5-7b", 128, 4),     # measured: 4 segments 15.5 ms, one trace 17.4 (GPU-bound)
    ("qwen2.5-0.5b", 128, 1),   # measured: one trace faster (host-bound)
    ("qwen2.5-7b", 16, 1),      # 7.5 GFLOP a layer: weight streaming, little to hide behind
    ("qwen2.5-0.5b", 2048, 4),
])
def test_default_segments_follow_a_layers_arithmetic(shape, padded, expected):
    from types import SimpleNamespace

    from foundry_mlx.random_model import SHAPES

    sizes = SHAPES[shape]
    config = SimpleNamespace(**sizes, head_dim=sizes["hidden_size"] // sizes["num_attention_heads"])
    assert prefilling.default_segments(config, padded) == expected
    assert prefilling.default_segments(None, padded) == 1


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_segment_count_names_the_switch(monkeypatch, value):
    monkeypatch.setenv(prefilling.SEGMENTS_SWITCH, value)
    with pytest.raises(FoundryError, match=prefilling.SEGMENTS_SWITCH):
        prefilling.segments(24)


@pytest.mark.parametrize("length", (5, 130))
def test_segmented_prefill_equals_one_trace(loaded, switch_on, monkeypatch, length):
    """Traced and queued one layer at a time (the tiny models have two), a prefill gives exactly the
    single trace's logits, keys and values: the segments compute the same arrays."""
    model, _ = loaded
    monkeypatch.setattr(prefilling, "FIRST_SEGMENT", 1)
    ids = prompt(length, seed=4)
    results = {}
    for value in ("1", "2"):
        monkeypatch.setenv(prefilling.SEGMENTS_SWITCH, value)
        assert len(prefilling.segments(len(model.layers))) == int(value)
        cache = model.make_cache()
        logits = prefilling.prefill(model, ids, cache)
        results[value] = [np.array(logits)] + [np.array(a[..., :length, :]) for c in cache for a in (c.keys, c.values)]
    for one, segmented in zip(results["1"], results["2"], strict=True):
        np.testing.assert_array_equal(segmented, one)
