"""The fused decode step's plan (kernels/fused_step.py) and the sampling oracle (kernels/sample.py),
on the CPU: the plan runs with its MLX-op twin kernels and must give the model file's tokens; the
GPU kernels are held to these twins in tests/kernels/test_fused_gpu.py."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import load_fused_plan_model, qwen2_quantized_spec, write_tiny_model

from foundry_mlx import load
from foundry_mlx.engine import decoder as decoder_module
from foundry_mlx.engine import generate as generate_module
from foundry_mlx.engine.decoder import FusedDecoder
from foundry_mlx.engine.generate import Session, stream_generate
from foundry_mlx.engine.sampling import SamplingParams
from foundry_mlx.kernels import fused_step, sample
from foundry_mlx.kernels.sample import reference as draw


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request, tmp_path_factory):
    return load_fused_plan_model(tmp_path_factory.mktemp("fused"), request.param)


def _model_file_greedy(model, prompt, count):
    cache = model.make_cache()
    logits = model(mx.array([prompt]), cache, last_only=True)[:, -1, :]
    tokens = []
    for _ in range(count):
        tokens.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([[tokens[-1]]]), cache, last_only=True)[:, -1, :]
    return tokens


def test_plan_with_twin_kernels_gives_the_model_files_tokens(model):
    loaded, _ = model
    prompt = [5, 17, 99, 3, 42, 7, 120, 64]
    cache = loaded.make_cache()
    for layer_cache in cache:
        layer_cache.reserve(40)
    logits = loaded(mx.array([prompt]), cache, last_only=True)[:, -1, :]
    fused = FusedDecoder(loaded, fused_step.ReferenceKernels())
    tokens = [fused.start(cache, logits, SamplingParams(), prompt, 0).item()]
    tokens += [fused.advance().item() for _ in range(11)]
    assert tokens == _model_file_greedy(loaded, prompt, 12)
    assert cache[0].offset == len(prompt) + 11


class _Recording(fused_step.ReferenceKernels):
    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        attribute = super().__getattribute__(name)
        if name in ("embed", "qkv", "attention", "residual", "swiglu", "head", "sample"):
            self.calls.append(name)
        return attribute


def test_plan_is_five_kernels_per_layer_and_three_more(model):
    """The node budget of the GPU step (≤ 150 for 24 layers) is this plan's launch count: each
    kernel is one graph node, and nothing else sits between them (checked on the GPU)."""
    loaded, _ = model
    kernels = _Recording()
    cache = loaded.make_cache()
    for layer_cache in cache:
        layer_cache.reserve(16)
    logits = loaded(mx.array([[1, 2, 3]]), cache, last_only=True)[:, -1, :]
    fused = FusedDecoder(loaded, kernels)
    fused.start(cache, logits, SamplingParams(), [1, 2, 3], 0)
    kernels.calls.clear()
    fused.advance()
    layers = loaded.config.num_hidden_layers
    assert len(kernels.calls) == 5 * layers + 3
    assert kernels.calls[0] == "embed" and kernels.calls[-2:] == ["head", "sample"]


def test_stream_generate_through_the_fused_step_stops_exactly(model, monkeypatch):
    """Steps queued ahead past a stop never leak: the text ends at the stop, the session holds only
    fed-and-emitted tokens, and a follow-up turn reuses the cache like the model-file path."""
    loaded, tokenizer = model
    prompt = [9, 8, 7, 6, 5, 4]
    expected = [r.token for r in stream_generate(loaded, tokenizer, prompt, max_tokens=10, ignore_eos=True)]
    fused = FusedDecoder(loaded, fused_step.ReferenceKernels())
    monkeypatch.setattr(generate_module, "fused_decoder_for", lambda m: fused)
    monkeypatch.setenv("FOUNDRY_DECODE_AHEAD", "3")
    session = Session(loaded)
    got = [r.token for r in stream_generate(loaded, tokenizer, prompt, max_tokens=10, ignore_eos=True,
                                            session=session)]
    assert got == expected
    assert session.tokens == prompt + got[:-1]
    assert all(c.offset == len(session.tokens) for c in session.cache)
    stop_at = expected.index(expected[4])  # the first time that token comes
    eos = {expected[stop_at]}
    monkeypatch.setattr(type(tokenizer), "eos_token_ids", property(lambda self: eos), raising=False)
    session = Session(loaded)
    got = [r.token for r in stream_generate(loaded, tokenizer, prompt, max_tokens=10, session=session)]
    assert got == expected[: stop_at + 1]
    assert all(c.offset == len(session.tokens) for c in session.cache)
    follow = session.tokens + [11, 12]
    again = [r.token for r in stream_generate(loaded, tokenizer, follow, max_tokens=3, ignore_eos=True, session=session)]
    monkeypatch.setattr(generate_module, "fused_decoder_for", lambda m: None)
    fresh = [r.token for r in stream_generate(loaded, tokenizer, follow, max_tokens=3, ignore_eos=True)]
    assert again == fresh


def test_unsupported_models_fall_back_with_a_reason(tmp_path):
    path = tmp_path / "dense.gguf"
    write_tiny_model(path, qwen2_quantized_spec())  # has F16 and BF16 matrices
    loaded, _ = load(str(path), progress=False)
    assert "dense" in fused_step.unsupported_reason(loaded)
    assert decoder_module.fused_decoder_for(loaded) is None  # no GPU here in any case


# The sampling oracle: the arithmetic the kernel follows, checked against the distribution.

def _logits(seed=0, size=1000, scale=2.0):
    return mx.array((np.random.default_rng(seed).standard_normal(size) * scale).astype(np.float32))


def test_greedy_is_the_argmax_and_penalty_changes_it():
    logits = mx.array(np.array([1.0, 3.0, 2.9, -1.0], dtype=np.float32))
    assert draw(logits, 0.0, 0, 1.0, 0.0, 1.0, [], 0, 0) == 1
    assert draw(logits, 0.0, 0, 1.0, 0.0, 1.5, [1], 0, 0) == 2  # 3.0 / 1.5 = 2.0 < 2.9
    negative = mx.array(np.array([-1.0, -0.5], dtype=np.float32))
    assert draw(negative, 0.0, 0, 1.0, 0.0, 2.0, [1], 0, 0) == 0  # -0.5 * 2 = -1.0: tie, lowest id


def test_top_k_never_picks_outside_the_k_best():
    logits = _logits(1, scale=0.5)  # flat: outside tokens would show up if allowed
    best = set(np.argsort(-np.array(logits))[:7].tolist())
    picks = {draw(logits, 1.0, 7, 1.0, 0.0, 1.0, [], 3, c) for c in range(300)}
    assert picks <= best and len(picks) >= 5


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = mx.array(np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32)))
    assert {draw(logits, 1.0, 0, 0.75, 0.0, 1.0, [], 1, c) for c in range(300)} == {0, 1}
    assert {draw(logits, 1.0, 0, 0.85, 0.0, 1.0, [], 1, c) for c in range(300)} == {0, 1, 2}


def test_min_p_drops_tokens_below_the_fraction_of_the_best():
    logits = mx.array(np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32)))
    assert {draw(logits, 1.0, 0, 1.0, 0.2, 1.0, [], 2, c) for c in range(300)} == {0, 1, 2}


def test_draw_frequencies_follow_the_temperature_scaled_probabilities():
    logits = np.array([1.0, 0.5, 0.0, -0.5, -1.0, 0.2], dtype=np.float32)
    temperature, draws = 0.7, 4000
    counts = np.bincount([draw(mx.array(logits), temperature, 0, 1.0, 0.0, 1.0, [], 17, c) for c in range(draws)],
                         minlength=logits.size)
    probs = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
    chi2 = (((counts - draws * probs) ** 2) / (draws * probs)).sum()
    assert chi2 < 20.5  # 5 degrees of freedom, p = 0.001


def test_same_seed_same_draws_and_uniform_is_uniform():
    logits = _logits(2)
    first = [draw(logits, 0.9, 50, 0.95, 0.0, 1.1, [1, 2, 3], 42, c) for c in range(20)]
    assert first == [draw(logits, 0.9, 50, 0.95, 0.0, 1.1, [1, 2, 3], 42, c) for c in range(20)]
    assert first != [draw(logits, 0.9, 50, 0.95, 0.0, 1.1, [1, 2, 3], 43, c) for c in range(20)]
    values = np.array([sample.uniform(5, c) for c in range(20000)])
    assert values.min() >= 0 and values.max() < 1
    assert abs(values.mean() - 0.5) < 0.01 and abs(values.var() - 1 / 12) < 0.005


def test_thresholds_stop_64_nats_below_the_best():
    logits = np.array([0.0] + [-100.0] * 9, dtype=np.float32)
    assert sample.thresholds(logits, 5, 1.0, 0.0) == pytest.approx(-64.0)
    assert math.isclose(sample.thresholds(logits, 0, 1.0, 0.5), math.log(0.5), rel_tol=1e-6)


def test_other_families_are_not_planned(tmp_path):
    """Gemma 3 also has a fused qkv_proj, but its layer is not this plan's: it must not be taken."""
    from tiny_models import gemma3_spec

    path = tmp_path / "gemma.gguf"
    write_tiny_model(path, gemma3_spec())
    loaded, _ = load(str(path), progress=False)
    assert "not 'gemma3'" in fused_step.unsupported_reason(loaded)


def test_info_reports_which_decode_step_runs(model, monkeypatch):
    from foundry_mlx.decode_paths import decode_paths

    loaded, _ = model
    steps = {backend: dict((op, path) for op, path, _ in decode_paths(loaded.config, backend))["decode step"]
             for backend in ("cuda", "metal", "reference")}
    assert steps == {"cuda": "fused", "metal": "compiled", "reference": "compiled"}
    monkeypatch.setenv("FOUNDRY_FUSED", "1")
    assert dict((op, path) for op, path, _ in decode_paths(loaded.config, "metal"))["sampling"] == "custom sampling kernel"
    monkeypatch.setenv("FOUNDRY_FUSED", "0")
    assert dict((op, path) for op, path, _ in decode_paths(loaded.config, "cuda"))["decode step"] == "compiled"


@pytest.mark.parametrize("text, expected", [("", 8), ("3", 3), (" 16 ", 16), ("0", None), ("-2", None), ("four", None)])
def test_decode_ahead_is_read_and_checked_in_one_place(monkeypatch, text, expected):
    """FOUNDRY_DECODE_AHEAD (steps queued ahead, the generator's default 8 here): a bad value names
    the variable and a fix instead of a ValueError from deep inside the first reply."""
    from foundry_mlx.engine.decoder import decode_ahead
    from foundry_mlx.errors import FoundryError

    monkeypatch.setenv("FOUNDRY_DECODE_AHEAD", text)
    if expected is None:
        with pytest.raises(FoundryError, match="FOUNDRY_DECODE_AHEAD"):
            decode_ahead(8)
    else:
        assert decode_ahead(8) == expected


def test_state_and_params_made_without_host_buffers_equal_the_plain_ones():
    """kernels/sample.py's `device_state` (stacked from scalars) and `shared_params` (one array per
    value, reused by later requests) hold what `make_state` and `make_params` do."""
    for values in ((0, 0, 0, 1, 0), (4095, 17, 3, 2**32 - 5, 64)):
        assert sample.device_state(*values).tolist() == sample.make_state(*values).tolist()
        assert sample.device_state(*values).dtype == mx.int32
    first = sample.shared_params(0.7, 40, 0.9, 0.05, 1.1)
    assert first is sample.shared_params(0.7, 40, 0.9, 0.05, 1.1)
    assert first.tolist() == sample.make_params(0.7, 40, 0.9, 0.05, 1.1).tolist()
    assert sample.shared_params(0.0, 40, 0.9, 0.05, 1.1) is not first
