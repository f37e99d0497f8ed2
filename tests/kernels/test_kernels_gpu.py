"""The kernels on a real GPU backend (CUDA on the H100, or Metal), against their reference twin.

Marked `gpu`: skipped where MLX has neither backend (see tests/conftest.py). Run on the device
machine with `pytest -m gpu tests/`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import kernels
from foundry_mlx.engine.generate import stream_generate
from foundry_mlx.kernels import qgemv, qgemv_launch
from foundry_mlx.kernels.decode import KernelSet

from .qgemv_cases import CASES, compare, make_inputs, reference_inputs

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def kernel_set():
    return KernelSet(kernels.gpu_backend())


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_gpu_gemv_matches_reference(kernel_set, case):
    kwargs = make_inputs(case)
    launch = qgemv_launch.launch(case.variant, **kwargs)
    ours = kernel_set._run(case.variant, launch)
    reference = qgemv.reference(case.variant, **reference_inputs(kwargs))
    compare(case, np.array(ours.astype(mx.float32)), np.array(reference))


def _greedy_with_margins(model, tokenizer, prompt, count):
    """Greedy tokens, and at each step the reference path's top-1/top-2 logit margin."""
    tokens = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=count, ignore_eos=True)]
    logits = model(mx.array([list(prompt) + tokens[:-1]]))[0, len(prompt) - 1 :].astype(mx.float32)
    top2 = mx.sort(logits, axis=-1)[:, -2:]
    return tokens, np.array(top2[:, 1] - top2[:, 0])


def test_custom_kernels_generate_the_reference_tokens(monkeypatch):
    """Greedy decode of a random model of Qwen2.5-0.5B's real shape and GGUF bit mix: the per-kernel
    compiled step (the fused step off) and the reference path agree token for token, except after
    a detected near-tie. (tests/kernels/test_fused_gpu.py holds the fused step to the same.)"""
    from foundry_mlx.random_model import make_random_model

    monkeypatch.setenv("FOUNDRY_FUSED", "0")

    model, tokenizer = make_random_model("qwen2.5-0.5b", "q4km", mx.float16, seed=1)
    prompt = list(range(100, 140))
    try:
        kernels.set_mode("reference")
        reference, margins = _greedy_with_margins(model, tokenizer, prompt, 48)
        kernels.set_mode("custom")
        assert kernels.backend_name() in ("cuda", "metal")
        calls = []
        original = KernelSet._run
        KernelSet._run = lambda self, variant, launch: calls.append(variant) or original(self, variant, launch)
        try:
            ours = [r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=48, ignore_eos=True)]
        finally:
            KernelSet._run = original
    finally:
        kernels.set_mode("auto")
    # The decode step was built from the fused kernels: per layer QKV, o_proj, gate/up, down; then
    # the head (the compiled step calls them while tracing, then replays the trace).
    assert len(calls) >= 4 * model.config.num_hidden_layers + 1
    for index, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            # float16 logits of size ~5 carry ~0.005 of rounding each; two kernels round differently.
            assert margins[index] < 0.05, f"token {index}: {a} vs {b}, reference margin {margins[index]:.4f}"
            break


def test_custom_decode_logits_match_reference():
    """Logits of single-token decode steps through the kernels vs the reference path, same cache."""
    from foundry_mlx.random_model import make_random_model

    model, _ = make_random_model("qwen2.5-0.5b", "q4km", mx.float16, seed=2)
    prompt = mx.array([list(range(7, 39))])
    outputs = {}
    try:
        for mode in ("reference", "custom"):
            kernels.set_mode(mode)
            cache = model.make_cache()
            model(prompt, cache)  # prefill (MLX GEMM paths in both modes)
            steps = [model(mx.array([[token]]), cache)[0, -1].astype(mx.float32) for token in (5, 77, 901)]
            outputs[mode] = np.array(mx.stack(steps))
    finally:
        kernels.set_mode("auto")
    scale = np.abs(outputs["reference"]).max()
    assert np.abs(outputs["custom"] - outputs["reference"]).max() / scale < 0.02


def test_compiled_custom_step_equals_eager_custom_step():
    """The compiled decode step (fixed-shape cache, array position) runs the same kernels."""
    from foundry_mlx.engine.decoder import Decoder
    from foundry_mlx.random_model import make_random_model

    model, _ = make_random_model("qwen2.5-0.5b", "q4km", mx.float16, seed=3)
    prompt = mx.array([list(range(11, 51))])
    try:
        kernels.set_mode("custom")
        eager_cache, compiled_cache = model.make_cache(), model.make_cache()
        model(prompt, eager_cache)
        model(prompt, compiled_cache)
        eager, compiled = Decoder(model, compiled=False), Decoder(model, compiled=True)
        for token in (3, 1000, 77):
            a = eager(mx.array([token]), eager_cache).astype(mx.float32)
            b = compiled(mx.array([token]), compiled_cache).astype(mx.float32)
            scale = mx.abs(a).max().item()
            assert mx.abs(a - b).max().item() / scale < 1e-2
    finally:
        kernels.set_mode("auto")
