"""The batched fused step's kernels (kernels/fused_batch.py) as Metal source on the CPU SIMT harness,
against their MLX-op twins, with B = 3 rows at different positions (and a parked row where the
kernel treats one specially): the only check their Metal rendition gets without a Mac."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import load_fused_plan_model

from foundry_mlx.kernels import embed, fused_step, qgemv_batch, sample, sdpa
from foundry_mlx.kernels.fused_batch import BatchedReferenceKernels

from .metal_runs import run_source

POSITIONS = [5, 17, 0]
CAPACITY = 32
REFERENCE = BatchedReferenceKernels()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request, tmp_path_factory):
    return load_fused_plan_model(tmp_path_factory.mktemp("batch-metal"), request.param)[0]


def _state(positions, tokens=(7, 100, 3), parked=()):
    rows = [sample.state_row(p, t, 0, 0, 0, parked=i in parked) for i, (p, t) in enumerate(zip(positions, tokens))]
    return mx.array(rows, dtype=mx.int32)


def _random(shape, seed, scale=1.0):
    return mx.array((np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32))


def _gemv(variant, eps, x, layer, **kwargs):
    launch = qgemv_batch.launch(variant, x, layer.quantized, **kwargs)
    names = [n for n in ("k_cache", "v_cache") if n in kwargs]
    return run_source(qgemv_batch.kernel_source(variant, "metal", eps), launch.arguments(), written_inputs=names)


def _close(ours, theirs, tolerance=2e-4):
    np.testing.assert_allclose(np.asarray(ours), np.array(theirs), rtol=tolerance, atol=tolerance)


def test_metal_batched_qkv_writes_each_row_at_its_position(model):
    attention = model.layers[0].self_attn
    variant = fused_step.QKV if "bias" in attention.qkv_proj else fused_step.QKV_NO_BIAS
    rope = attention.rope
    x = _random((3, attention.qkv_proj.in_features), 1)
    keys = _random((3, attention.n_kv_heads, CAPACITY, rope.dims), 2)
    values = _random((3, attention.n_kv_heads, CAPACITY, rope.dims), 3)
    state = _state(POSITIONS)
    out, new_keys, new_values = _gemv(
        variant, attention.eps, x, attention.qkv_proj, norm_weight=attention.norm_weight,
        bias=attention.qkv_proj.bias if variant.bias else None, inv_freq=rope.inverse_frequencies,
        rope_rows=(attention.n_heads + attention.n_kv_heads) * rope.dims, head_dim=rope.dims, state=state,
        k_cache=keys, v_cache=values)
    expected, expected_keys, expected_values = REFERENCE.qkv(x, attention, state, keys, values)
    _close(out, expected)
    _close(new_keys, expected_keys)  # the new rows, and every other position untouched
    _close(new_values, expected_values)
    assert not np.allclose(new_keys, np.array(keys))


@pytest.mark.parametrize("staged", [True, False], ids=["staged", "normalised-per-row"])
def test_metal_batched_projections_match_twins(model, staged, monkeypatch):
    """Both forms of the RMSNorm'd GEMVs: the B rows staged in shared memory once, and (where B·K
    would not fit) normalised again for each weight row."""
    if not staged:
        monkeypatch.setattr(qgemv_batch, "STAGED_BYTES", 0)
    attention, mlp = model.layers[0].self_attn, model.layers[0].mlp
    hidden, ffn = attention.o_proj.out_features, mlp.down_proj.in_features
    x, residual = _random((3, attention.o_proj.in_features), 4), _random((3, hidden), 5)
    (out,) = _gemv(fused_step.RESIDUAL, None, x, attention.o_proj, residual=residual)
    _close(out, REFERENCE.residual(x, attention.o_proj, residual))
    h = _random((3, hidden), 6, scale=3.0)
    (out,) = _gemv(fused_step.SWIGLU, mlp.eps, h, mlp.gate_up_proj, norm_weight=mlp.norm_weight)
    _close(out, REFERENCE.swiglu(h, mlp))
    activated = _random((3, ffn), 7)
    (out,) = _gemv(fused_step.RESIDUAL, None, activated, mlp.down_proj, residual=residual)
    _close(out, REFERENCE.residual(activated, mlp.down_proj, residual))
    eps = model.config.rms_norm_eps
    (out,) = _gemv(fused_step.HEAD, eps, h, model.lm_head, norm_weight=model.norm_weight)
    _close(out, REFERENCE.head(h, model.norm_weight, eps, model.lm_head))


def test_metal_batched_rows_are_independent_of_their_neighbours(model):
    """Row 1 of a batch gives row 0 of a batch of one, bit for bit: a row's tokens cannot depend on
    who else is decoding."""
    mlp = model.layers[0].mlp
    h = _random((3, mlp.gate_up_proj.in_features), 8)
    (batch,) = _gemv(fused_step.SWIGLU, mlp.eps, h, mlp.gate_up_proj, norm_weight=mlp.norm_weight)
    (alone,) = _gemv(fused_step.SWIGLU, mlp.eps, h[1:2], mlp.gate_up_proj, norm_weight=mlp.norm_weight)
    np.testing.assert_array_equal(batch[1], alone[0])


def test_metal_batched_attention_reads_each_rows_length(model):
    attention = model.layers[0].self_attn
    dims, heads, kv_heads = attention.rope.dims, attention.n_heads, attention.n_kv_heads
    qkv = _random((3, (heads + 2 * kv_heads) * dims), 9)
    keys, values = _random((3, kv_heads, CAPACITY, dims), 10), _random((3, kv_heads, CAPACITY, dims), 11)
    state = _state(POSITIONS)
    (out,) = run_source(sdpa.batched_source(attention.scale),
                        sdpa.batched_launch_arguments(qkv, keys, values, state, heads))
    _close(out, REFERENCE.attention(qkv, attention, state, keys, values))
    # Row 2 at position 0 attends to its one position only: its values' first row, per head.
    first = np.array(values)[2, :, 0, :]
    _close(out[2].reshape(heads, dims), np.repeat(first, heads // kv_heads, axis=0))


def test_metal_batched_embedding_takes_each_rows_token(model):
    state = _state(POSITIONS)
    (x,) = run_source(embed.batched_source(), embed.batched_launch_arguments(state, model.embed_tokens.table.stored,
                                                                             mx.float32))
    _close(x, REFERENCE.embed(state, model.embed_tokens.table, mx.float32), 1e-6)


@pytest.mark.parametrize("schedule", ["concurrent", "reverse"])
def test_metal_batched_sampling_draws_each_row_by_its_own_rules(schedule):
    vocab, width = 500, 16
    logits = _random((3, vocab), 12, scale=2.5)
    params = mx.array([sample.params_row(0.0, 0, 1.0, 0.0, 1.3, window=4), sample.params_row(0.8, 30, 0.9, 0.05, 1.0),
                       sample.params_row(1.0, 0, 1.0, 0.0, 1.0)], dtype=mx.float32)
    best = int(np.argmax(np.array(logits[0])))
    ring = np.zeros((3, width), dtype=np.int32)
    ring[0, :6] = [1, 2, 3, best, 8, 9]  # the window is 4: ids past it are not penalized
    state = mx.array([sample.state_row(11, 0, 0, 5, 6), sample.state_row(40, 0, 3, 77, 0),
                      sample.state_row(9, 4, 2, 1, 0, parked=True)], dtype=mx.int32)
    arguments = sample.batched_launch_arguments(logits, params, state, mx.array(ring), "metal", threads=64)
    next_state, tokens, _, rings = run_source(sample.batched_source("metal"), arguments, schedule=schedule,
                                              written_inputs=["recent"])
    expected_state, expected_tokens, expected_rings = REFERENCE.sample(logits, params, state, mx.array(ring))
    assert tokens[:2].tolist() == expected_tokens[:2].tolist()
    assert next_state.tolist() == expected_state.tolist()
    assert next_state[2].tolist() == np.array(state)[2].tolist()  # parked: nothing moves
    np.testing.assert_array_equal(rings, np.array(expected_rings))
    assert rings[0, 6 % 4] == tokens[0]  # row 0's ring wraps at its own window
    alone = sample.reference(logits[0], 0.0, 0, 1.0, 0.0, 1.3, [1, 2, 3, best], 5, 0)
    assert tokens[0] == alone != best


def test_metal_batched_sources_leave_the_single_row_kernels_alone():
    """The batched forms are separate sources with their own names; the single-row step's kernels
    (and so its speed at B = 1) are unchanged by them."""
    names = {sdpa.batched_source(0.25).name, embed.batched_source().name, sample.batched_source("metal").name,
             qgemv_batch.kernel_source(fused_step.RESIDUAL, "metal").name}
    single = {sdpa.fused_source(0.25).name, embed.kernel_source().name, sample.kernel_source("metal").name,
              fused_step.qgemv.kernel_source(fused_step.RESIDUAL, "metal").name}
    assert not names & single
    assert "BATCH" not in fused_step.qgemv.kernel_source(fused_step.RESIDUAL, "metal").body
    assert "group_id / HEADS" not in sdpa.fused_source(0.25).body


class _Simulated:
    """A kernel object that runs the Metal rendition on the harness; inputs the kernel writes in place
    (KV caches, penalty rings) are written back into the very arrays it was given, as on a GPU."""

    IN_PLACE = ("k_cache", "v_cache", "recent")

    def __init__(self, source):
        self.source = source

    def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes):
        written = [n for n in self.IN_PLACE if n in self.source.input_names]
        arguments = dict(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                         output_shapes=output_shapes, output_dtypes=output_dtypes)
        results = run_source(self.source, arguments, written_inputs=written)
        for name, data in zip(written, results[len(output_shapes):]):
            target = inputs[self.source.input_names.index(name)]
            target[:] = mx.array(data).astype(target.dtype)
        return [mx.array(r) for r in results[: len(output_shapes)]]


def test_the_whole_batched_step_in_metal_equals_the_twin_plan(model, monkeypatch):
    """BatchedGpuKernels and the decoder's in-place path, every kernel the Metal rendition on the
    harness (the sampler with a 64-thread group): rows joining at different depths give the twin
    plan's tokens, and the rows written into the caches are the twin's."""
    from foundry_mlx.engine.batch_decoder import BatchedFusedDecoder
    from foundry_mlx.engine.sampling import SamplingParams
    from foundry_mlx.kernels import fused_batch

    monkeypatch.setattr(sample, "THREADS", {"metal": 64, "cuda": 1024})
    gpu = fused_batch.BatchedGpuKernels("metal")
    monkeypatch.setattr(gpu, "_kernel", _Simulated)
    prompts = [[5, 17, 99, 3, 42], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7, 9]]
    plans = [SamplingParams(), SamplingParams(temperature=0.8, top_k=10), SamplingParams(repetition_penalty=1.3)]
    decoders = {"metal": BatchedFusedDecoder(model, gpu, compiled=False),
                "twin": BatchedFusedDecoder(model, BatchedReferenceKernels())}
    tokens = {name: [] for name in decoders}
    for name, decoder in decoders.items():
        for step in range(3):
            cache = model.make_cache()
            mx.eval(model(mx.array([prompts[step]]), cache))
            decoder.join(step, cache, 11 + step, prompts[step] + [11 + step], plans[step], 21 + step, room=8)
            tokens[name].append(decoder.advance().tolist())
    assert tokens["metal"] == tokens["twin"]
    metal, twin = decoders["metal"], decoders["twin"]
    for slot, owner in enumerate(metal.rows):
        if owner is not None:
            length = len(prompts[owner]) + 3 - owner
            _close(metal.keys[1][slot, :, :length], twin.keys[1][slot, :, :length], 1e-4)
            _close(metal.values[0][slot, :, :length], twin.values[0][slot, :, :length], 1e-4)
            _close(metal.recent[slot], twin.recent[slot], 0)
