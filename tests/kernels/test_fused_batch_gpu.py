"""The batched fused step (kernels/fused_batch.py, engine/batch_decoder.py) on a real GPU backend, on a
random model of Qwen2.5-0.5B's shape: each batched kernel against its twin with rows at different
positions, each row against the single-row kernels, greedy tokens of every row equal to the
single-sequence fused step's, seeded rows independent of their neighbours, and the step's graph
nodes: the single step's 5·layers + 3, whatever B."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import kernels
from foundry_mlx.engine.batch_decoder import BatchedFusedDecoder
from foundry_mlx.engine.decoder import FusedDecoder, graph_nodes, prefilled
from foundry_mlx.engine.sampling import SamplingParams
from foundry_mlx.kernels import fused_batch, fused_step, sample

pytestmark = pytest.mark.gpu

POSITIONS = [37, 250, 5, 600]


@pytest.fixture(scope="module")
def model():
    from foundry_mlx.random_model import make_random_model

    loaded, _ = make_random_model("qwen2.5-0.5b", "q4km", mx.float16, seed=4)
    return loaded


def _close(a, b, tolerance):
    a, b = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
    scale = max(np.abs(b).max(), 1e-3)
    assert np.abs(a - b).max() / scale < tolerance, f"max error {np.abs(a - b).max()} at scale {scale}"


def _random(shape, seed, scale=1.0):
    return mx.array((np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float16))


def _state():
    return mx.array([sample.state_row(p, 1000 + 77 * i, 0, 1, 0) for i, p in enumerate(POSITIONS)], dtype=mx.int32)


def test_each_batched_kernel_matches_its_twin(model):
    gpu, ref = fused_batch.BatchedGpuKernels(kernels.gpu_backend()), fused_batch.BatchedReferenceKernels()
    attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
    state = _state()
    rows = len(POSITIONS)
    _close(gpu.embed(state, model.embed_tokens.table, mx.float16),
           ref.embed(state, model.embed_tokens.table, mx.float16), 1e-3)
    x = _random((rows, 896), 1)
    shape = (rows, attention.n_kv_heads, 768, attention.rope.dims)
    keys, values = _random(shape, 2), _random(shape, 3)
    keys_gpu, values_gpu = mx.array(keys) + 0, mx.array(values) + 0
    mx.eval(keys_gpu, values_gpu)
    qkv_gpu, _, _ = gpu.qkv(x, attention, state, keys_gpu, values_gpu)
    qkv_ref, keys_ref, values_ref = ref.qkv(x, attention, state, keys, values)
    _close(qkv_gpu, qkv_ref, 1e-2)
    mx.eval(qkv_gpu)
    for row, position in enumerate(POSITIONS):  # written in place, each row at its own position
        _close(keys_gpu[row, :, position], keys_ref[row, :, position], 1e-2)
        _close(values_gpu[row, :, position], values_ref[row, :, position], 1e-2)
    _close(keys_gpu, keys_ref, 1e-2)  # and nothing else moved
    _close(gpu.attention(qkv_ref, attention, state, keys_ref, values_ref),
           ref.attention(qkv_ref, attention, state, keys_ref, values_ref), 1e-2)
    attended = _random((rows, 896), 4)
    _close(gpu.residual(attended, attention.o_proj, x), ref.residual(attended, attention.o_proj, x), 1e-2)
    _close(gpu.swiglu(x, mlp), ref.swiglu(x, mlp), 1e-2)
    activated = _random((rows, mlp.down_proj.in_features), 5, 0.3)
    _close(gpu.residual(activated, mlp.down_proj, x), ref.residual(activated, mlp.down_proj, x), 1e-2)
    eps = model.config.rms_norm_eps
    _close(gpu.head(x, model.norm_weight, eps, model.lm_head), ref.head(x, model.norm_weight, eps, model.lm_head), 1e-2)


def test_each_row_is_the_single_row_kernels_result(model):
    """Row b of a batched GEMV equals the single-row kernel on row b (same arithmetic, same order)."""
    batched, single = fused_batch.BatchedGpuKernels(kernels.gpu_backend()), fused_step.GpuKernels(kernels.gpu_backend())
    mlp = model.layers[3].mlp
    x = _random((8, 896), 6, 2.0)
    rows = batched.swiglu(x, mlp)
    for row in range(8):
        _close(rows[row], single.swiglu(x[row], mlp), 1e-3)
    logits = batched.head(x, model.norm_weight, model.config.rms_norm_eps, model.lm_head)
    for row in (0, 7):
        alone = single.head(x[row], model.norm_weight, model.config.rms_norm_eps, model.lm_head)
        _close(logits[row], alone, 1e-3)
    assert rows.shape == (8, mlp.down_proj.in_features)



def _prompts(count):
    rng = np.random.default_rng(9)
    return [[int(t) for t in rng.integers(10, 50000, size=length)] for length in (40, 300, 7, 520, 64, 12, 150, 90)[:count]]


def _margins(model, prompt, tokens):
    logits = model(mx.array([list(prompt) + tokens[:-1]]))[0, len(prompt) - 1 :].astype(mx.float32)
    top2 = mx.sort(logits, axis=-1)[:, -2:]
    return np.array(top2[:, 1] - top2[:, 0])


def test_batched_greedy_tokens_equal_each_row_alone(model):
    gpu_single = fused_step.GpuKernels(kernels.gpu_backend())
    prompts = _prompts(8)
    alone = []
    for prompt in prompts:
        cache, logits = prefilled(model, prompt, 700)
        decoder = FusedDecoder(model, gpu_single)
        alone.append([decoder.start(cache, logits, SamplingParams(), prompt, 0).item()]
                     + [decoder.advance().item() for _ in range(32)])
    batch = BatchedFusedDecoder(model, fused_batch.BatchedGpuKernels(kernels.gpu_backend()))
    got = {}
    for index, prompt in enumerate(prompts):
        cache, _ = prefilled(model, prompt, 700)
        batch.join(index, cache, alone[index][0], prompt + [alone[index][0]], SamplingParams(), 0, room=40)
        got[index] = [alone[index][0]]
        if index in (2, 5):  # rows joining between steps, the others at different depths
            tokens = batch.advance().tolist()
            for slot, owner in enumerate(batch.rows):
                if owner is not None:
                    got[owner].append(tokens[slot])
    while min(len(g) for g in got.values()) < 33:
        tokens = batch.advance().tolist()
        for slot, owner in enumerate(batch.rows):
            got[owner].append(tokens[slot])
    assert len(batch.rows) == 8
    for index, prompt in enumerate(prompts):
        ours, theirs = got[index][:33], alone[index]
        if ours != theirs:
            at = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            margin = _margins(model, prompt, theirs)[at - 1]
            assert margin < 0.05, f"row {index}, token {at}: {ours[at]} vs {theirs[at]}, margin {margin:.4f}"


def test_seeded_rows_are_reproducible_with_any_neighbours(model):
    backend = kernels.gpu_backend()
    sampling = SamplingParams(temperature=0.9, top_k=40, top_p=0.9, repetition_penalty=1.1, seed=11)
    prompts = _prompts(4)

    def run(others):
        batch = BatchedFusedDecoder(model, fused_batch.BatchedGpuKernels(backend))
        for index in range(others):
            cache, _ = prefilled(model, prompts[index + 1], 700)
            batch.join(index, cache, 5, prompts[index + 1] + [5], SamplingParams(temperature=1.0), 100 + index)
        cache, _ = prefilled(model, prompts[0], 700)
        batch.join("row", cache, 9, prompts[0] + [9], sampling, 11, room=30)
        return [batch.advance().tolist()[batch.rows.index("row")] for _ in range(24)]

    first = run(0)
    assert run(3) == first
    assert run(1) == first


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_batched_step_is_the_single_steps_graph_nodes(model, rows):
    batch = BatchedFusedDecoder(model, fused_batch.BatchedGpuKernels(kernels.gpu_backend()))
    for index, prompt in enumerate(_prompts(rows)):
        cache, _ = prefilled(model, prompt, 700)
        batch.join(index, cache, 7, prompt + [7], SamplingParams(), 0, room=20)
    mx.eval(batch.advance(), batch.state)
    tokens = batch.advance()
    nodes = graph_nodes(tokens, batch.state)
    layers = model.config.num_hidden_layers
    print(f"batched fused step, {rows} rows: {nodes} graph nodes for {layers} layers")
    assert nodes <= 5 * layers + 3
    mx.eval(tokens)
