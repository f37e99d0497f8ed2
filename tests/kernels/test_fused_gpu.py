"""The fused decode step (kernels/fused_step.py) and the sampling kernel on a real GPU backend.

Each kernel of the step against its reference twin on a random model of Qwen2.5-0.5B's real shape,
then the whole step: greedy tokens equal to the reference path's (divergence only after a detected
near-tie), its graph-node bound, seeded sampling reproducible, and the sampling kernel's draws
against the host oracle and against the probabilities it should follow.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import kernels
from foundry_mlx.engine.decoder import FusedDecoder, prefilled, step_nodes
from foundry_mlx.engine.generate import stream_generate
from foundry_mlx.engine.sampling import SamplingParams
from foundry_mlx.kernels import fused_step, qgemv_preload, sample

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model():
    from foundry_mlx.random_model import make_random_model

    loaded, tokenizer = make_random_model("qwen2.5-0.5b", "q4km", mx.float16, seed=4)
    return loaded, tokenizer



def _close(a, b, tolerance):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    scale = max(np.abs(b).max(), 1e-3)
    assert np.abs(a - b).max() / scale < tolerance, f"max error {np.abs(a - b).max()} at scale {scale}"


@pytest.mark.parametrize("preload", [False, True], ids=["loop", "preloaded"])
def test_each_fused_kernel_matches_its_twin(model, monkeypatch, preload):
    """preloaded: the GEMVs in the form that loads every weight before computing
    (FOUNDRY_GEMV_PRELOAD=1, kernels/qgemv_preload.py) where a launch's weights fit in registers."""
    monkeypatch.setattr(qgemv_preload, "ENABLED", preload)
    loaded, _ = model
    gpu, ref = fused_step.GpuKernels(kernels.gpu_backend()), fused_step.ReferenceKernels()
    prompt = list(range(200, 237))
    cache, _ = prefilled(loaded, prompt, 300)
    state = sample.make_state(len(prompt), 4242, 0, 1, 0)
    attention, mlp = loaded.layers[0].self_attn, loaded.layers[0].mlp
    x_gpu = gpu.embed(state, loaded.embed_tokens.table, mx.float16)
    x_ref = ref.embed(state, loaded.embed_tokens.table, mx.float16)
    _close(x_gpu, x_ref, 1e-3)
    keys, values = mx.array(cache[0].keys), mx.array(cache[0].values)
    keys_ref, values_ref = mx.array(cache[0].keys), mx.array(cache[0].values)
    qkv_gpu, keys, values = gpu.qkv(x_ref, attention, state, keys, values)
    qkv_ref, keys_ref, values_ref = ref.qkv(x_ref, attention, state, keys_ref, values_ref)
    _close(qkv_gpu, qkv_ref, 1e-2)
    mx.eval(qkv_gpu)
    _close(keys[..., len(prompt), :], keys_ref[..., len(prompt), :], 1e-2)  # written in place
    _close(values[..., len(prompt), :], values_ref[..., len(prompt), :], 1e-2)
    out_gpu = gpu.attention(qkv_ref, attention, state, keys_ref, values_ref)
    out_ref = ref.attention(qkv_ref, attention, state, keys_ref, values_ref)
    _close(out_gpu, out_ref, 1e-2)
    _close(gpu.residual(out_ref, attention.o_proj, x_ref), ref.residual(out_ref, attention.o_proj, x_ref), 1e-2)
    _close(gpu.swiglu(x_ref, mlp), ref.swiglu(x_ref, mlp), 1e-2)
    logits_gpu = gpu.head(x_ref, loaded.norm_weight, loaded.config.rms_norm_eps, loaded.lm_head)
    logits_ref = ref.head(x_ref, loaded.norm_weight, loaded.config.rms_norm_eps, loaded.lm_head)
    _close(logits_gpu, logits_ref, 1e-2)


def _margins(model, prompt, tokens):
    logits = model(mx.array([list(prompt) + tokens[:-1]]))[0, len(prompt) - 1 :].astype(mx.float32)
    top2 = mx.sort(logits, axis=-1)[:, -2:]
    return np.array(top2[:, 1] - top2[:, 0])


@pytest.mark.parametrize("depth", [40, 600])
def test_fused_greedy_tokens_equal_reference_path(model, depth):
    loaded, tokenizer = model
    prompt = [int(i) for i in np.random.default_rng(depth).integers(10, 50000, size=depth)]
    try:
        kernels.set_mode("reference")
        reference = [r.token for r in stream_generate(loaded, tokenizer, prompt, max_tokens=48, ignore_eos=True)]
        margins = _margins(loaded, prompt, reference)
        kernels.set_mode("custom")
        from foundry_mlx.engine.decoder import fused_decoder_for

        assert fused_decoder_for(loaded) is not None
        ours = [r.token for r in stream_generate(loaded, tokenizer, prompt, max_tokens=48, ignore_eos=True)]
    finally:
        kernels.set_mode("auto")
    for index, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            assert margins[index] < 0.05, f"token {index}: {a} vs {b}, reference margin {margins[index]:.4f}"
            break
    assert len(ours) == len(reference) == 48


def test_fused_step_is_a_handful_of_graph_nodes(model):
    loaded, _ = model
    nodes = step_nodes(loaded)
    layers = loaded.config.num_hidden_layers
    print(f"fused decode step: {nodes} graph nodes for {layers} layers")
    assert nodes <= 150
    assert nodes <= 5 * layers + 3


def test_seeded_sampling_is_reproducible(model):
    loaded, tokenizer = model
    prompt = list(range(300, 330))
    params = dict(max_tokens=24, ignore_eos=True, temperature=0.9, top_k=40, top_p=0.9, seed=11)
    first = [r.token for r in stream_generate(loaded, tokenizer, prompt, **params)]
    second = [r.token for r in stream_generate(loaded, tokenizer, prompt, **params)]
    other = [r.token for r in stream_generate(loaded, tokenizer, prompt, **(params | {"seed": 12}))]
    assert first == second
    assert first != other


def _kernel_draw(gpu, logits, params, seed, counter, recent=()):
    ring = mx.array((list(recent) + [0] * 64)[:64], dtype=mx.int32)
    state = sample.make_state(0, 0, counter, seed, len(recent))
    _, token, _ = gpu.sample(logits, sample.make_params(*params), state, ring)
    return token.item()


@pytest.mark.parametrize("params", [
    (0.0, 0, 1.0, 0.0, 1.0), (0.0, 0, 1.0, 0.0, 1.3), (1.0, 0, 1.0, 0.0, 1.0), (0.7, 50, 1.0, 0.0, 1.0),
    (1.0, 0, 0.9, 0.0, 1.0), (0.8, 40, 0.95, 0.05, 1.1), (1.5, 0, 1.0, 0.1, 1.0),
])
def test_sampling_kernel_matches_oracle_at_full_vocabulary(params):
    gpu = fused_step.GpuKernels(kernels.gpu_backend())
    rng = np.random.default_rng(0)
    logits = mx.array((rng.standard_normal(151936) * 3).astype(np.float16))
    recent = rng.integers(0, 151936, size=20).tolist()
    mismatches = 0
    for counter in range(12):
        ours = _kernel_draw(gpu, logits, params, 1234, counter, recent)
        theirs = sample.reference(logits, *params, recent, 1234, counter)
        mismatches += ours != theirs
    assert mismatches <= 1  # float sums in another order may move a boundary, rarely


def test_sampling_kernel_follows_the_distribution():
    """Draw frequencies over a small vocabulary against the probabilities; top-k and top-p sets."""
    gpu = fused_step.GpuKernels(kernels.gpu_backend())
    logits = mx.array(np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0], dtype=np.float32))
    draws = 3000
    counts = np.zeros(8)
    for counter in range(draws):
        counts[_kernel_draw(gpu, logits, (1.0, 0, 1.0, 0.0, 1.0), 99, counter)] += 1
    probs = np.exp(np.array(logits)) / np.exp(np.array(logits)).sum()
    chi2 = (((counts - draws * probs) ** 2) / (draws * probs)).sum()
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001
    top_k = {_kernel_draw(gpu, logits, (1.0, 3, 1.0, 0.0, 1.0), 5, c) for c in range(400)}
    assert top_k == {0, 1, 2}
    # top-p: the smallest prefix (most probable first) whose mass reaches p. The probabilities are
    # 0.405, 0.245, 0.149, ...: p = 0.7 keeps tokens 0..2 (0.650 < 0.7 <= 0.799), p = 0.6 keeps 0..1.
    for top_p, expected in ((0.7, {0, 1, 2}), (0.6, {0, 1})):
        assert int(np.searchsorted(np.cumsum(probs), top_p)) + 1 == len(expected)
        drawn = {_kernel_draw(gpu, logits, (1.0, 0, top_p, 0.0, 1.0), 6, c) for c in range(400)}
        assert drawn == expected, top_p


def test_fused_decoder_runs_reference_kernels_on_gpu_too(model):
    """The plan with the twin kernels on the GPU gives the fused GPU kernels' greedy tokens."""
    loaded, _ = model
    prompt = list(range(500, 520))
    tokens = {}
    for name, kernel_set in (("gpu", fused_step.GpuKernels(kernels.gpu_backend())),
                             ("reference", fused_step.ReferenceKernels())):
        cache, logits = prefilled(loaded, prompt, 300)
        decoder = FusedDecoder(loaded, kernel_set)
        sequence = [decoder.start(cache, logits, SamplingParams(), prompt, 0).item()]
        sequence += [decoder.advance().item() for _ in range(6)]
        tokens[name] = sequence
    assert tokens["gpu"][:3] == tokens["reference"][:3]


def test_layer_kernel_equals_the_five_kernels(model):
    """kernels/fused_layer.py: one launch per layer (grid-wide barriers) against the same layer as
    five launches, with the K/V rows it writes into the cache."""
    loaded, _ = model
    gpu = fused_step.GpuKernels(kernels.gpu_backend(), layer_kernel=True)
    five = fused_step.GpuKernels(kernels.gpu_backend(), layer_kernel=False)
    prompt = list(range(900, 1233))
    cache, _ = prefilled(loaded, prompt, reserve=600)
    state = sample.make_state(len(prompt), 77, 0, 1, 0)
    x = five.embed(state, loaded.embed_tokens.table, mx.float16)
    for index in (0, 5, 23):
        layer = loaded.layers[index]
        keys_a, values_a = mx.array(cache[index].keys) + 0, mx.array(cache[index].values) + 0
        keys_b, values_b = mx.array(cache[index].keys) + 0, mx.array(cache[index].values) + 0
        mx.eval(keys_a, values_a, keys_b, values_b)
        ours, _, _ = gpu.layer(x, layer.self_attn, layer.mlp, state, keys_a, values_a)
        theirs, _, _ = five.layer(x, layer.self_attn, layer.mlp, state, keys_b, values_b)
        mx.eval(ours, theirs)
        _close(ours, theirs, 2e-3)
        _close(keys_a[..., len(prompt), :], keys_b[..., len(prompt), :], 1e-3)
        _close(values_a[..., len(prompt), :], values_b[..., len(prompt), :], 1e-3)
