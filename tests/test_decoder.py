"""The compiled decode step (engine/decoder.py) against the eager forward pass it replaces."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import TinySpec, write_tiny_model

from foundry_mlx import load
from foundry_mlx.engine.cache import STEP
from foundry_mlx.engine.decoder import Decoder


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("decoder") / "tiny.gguf"
    write_tiny_model(path, TinySpec())
    loaded, _ = load(str(path), progress=False)
    return loaded


def test_compiled_steps_equal_eager_steps_across_cache_growth(model):
    """Token by token through a 256-position boundary (the buffer grows and the step is re-traced):
    the compiled step's logits equal the eager forward pass's, and the caches hold the same keys."""
    rng = np.random.default_rng(0)
    prompt = mx.array(rng.integers(0, 200, size=(1, STEP - 3)))
    eager_cache, compiled_cache = model.make_cache(), model.make_cache()
    model(prompt, eager_cache)
    model(prompt, compiled_cache)
    decoder = Decoder(model, compiled=True)
    for token in rng.integers(0, 200, size=8).tolist():
        expected = model(mx.array([[token]]), eager_cache, last_only=True)[:, -1, :]
        got = decoder(mx.array([token]), compiled_cache)
        assert got.shape == expected.shape
        np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-5)
    assert compiled_cache[0].offset == eager_cache[0].offset == STEP + 5
    assert compiled_cache[0].capacity == 2 * STEP  # grew once, by one step
    end = eager_cache[0].offset
    for eager, compiled in zip(eager_cache, compiled_cache):
        np.testing.assert_allclose(np.array(compiled.keys[..., :end, :]), np.array(eager.keys[..., :end, :]), atol=1e-6)


def test_masked_positions_do_not_leak(model):
    """Garbage beyond the offset (a longer, trimmed turn) must not change the compiled step."""
    prompt = mx.array([[5, 6, 7, 8]])
    clean, dirty = model.make_cache(), model.make_cache()
    model(prompt, clean)
    model(mx.array([[5, 6, 7, 8, 9, 10, 11]]), dirty)
    for layer in dirty:
        layer.trim(4)  # positions 4..6 still hold keys of tokens 9..11
    decoder = Decoder(model, compiled=True)
    np.testing.assert_allclose(
        np.array(decoder(mx.array([42]), dirty)), np.array(decoder(mx.array([42]), clean)), rtol=1e-5, atol=1e-5
    )
