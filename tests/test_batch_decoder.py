"""The batched fused step (kernels/fused_batch.py, engine/batch_decoder.py) on the CPU, with its MLX-op
twin kernels: each row gives the tokens that row gets decoded alone by the single-sequence fused
step, whatever its neighbours, positions, joins and leaves; the plan stays 5 kernels per layer
and 3 more for any B; the server's scheduler decodes through it and matches each request alone."""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest
from test_batch import assert_follow_ups_reuse_the_prompt_cache, run_all
from tiny_models import load_fused_plan_model

import foundry_mlx as fm
from foundry_mlx.engine.batch_decoder import BatchedFusedDecoder, batch_decoder_for
from foundry_mlx.engine.decoder import FusedDecoder, prefilled
from foundry_mlx.engine.sampling import SamplingParams
from foundry_mlx.kernels import fused_batch, fused_step, sample
from foundry_mlx.server.prompt_cache import PromptCache
from foundry_mlx.server.scheduler import Scheduler, wait_until_idle
from foundry_mlx.server.sequence import GenerationRequest

GREEDY = SamplingParams()
PROMPTS = [[5, 17, 99, 3, 42, 7, 120, 64], [40, 41], [7, 7, 7, 7, 7, 9, 11, 13, 15, 17, 19, 21, 23], [200, 3, 1]]


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def engine(request, tmp_path_factory):
    return load_fused_plan_model(tmp_path_factory.mktemp("batch-fused"), request.param)



def _alone(model, prompt, count, sampling=GREEDY, seed=0):
    """The single-sequence fused step (twin kernels): the first token from the prefill, then `count`."""
    cache, logits = prefilled(model, prompt, 64)
    decoder = FusedDecoder(model, fused_step.ReferenceKernels())
    tokens = [decoder.start(cache, logits, sampling, list(prompt), seed).item()]
    return tokens + [decoder.advance().item() for _ in range(count)]


def _join(batch, owner, model, prompt, first, sampling=GREEDY, seed=0, counter_from_start=True):
    cache, _ = prefilled(model, prompt, 64)
    batch.join(owner, cache, first, list(prompt) + [first], sampling, seed, room=32)
    if counter_from_start and sampling.temperature > 0:  # the single step drew `first` with counter 0
        slot = batch.rows.index(owner)
        row = batch.state[slot].tolist()
        batch.state[slot] = mx.array(row[:2] + [1] + row[3:], dtype=mx.int32)


def test_rows_joining_and_leaving_give_each_rows_tokens_alone(engine):
    model, _ = engine
    seeded = SamplingParams(temperature=0.9, top_k=20, repetition_penalty=1.2, repetition_context=5)
    plans = [SamplingParams(), SamplingParams(repetition_penalty=1.3), seeded, SamplingParams()]
    alone = [_alone(model, p, 14, s, seed=33) for p, s in zip(PROMPTS, plans)]
    batch = BatchedFusedDecoder(model, fused_batch.BatchedReferenceKernels())
    got = {index: [alone[index][0]] for index in range(4)}
    schedule = {0: [0], 2: [1, 2], 5: [3]}  # step → rows joining before it
    leaving = {3: 1, 8: 0}  # step → the row leaving before it
    for step in range(12):
        for index in schedule.get(step, []):
            _join(batch, index, model, PROMPTS[index], alone[index][0], plans[index], seed=33)
        if step in leaving:
            index = leaving[step]
            caches = batch.leave(index, length=len(PROMPTS[index]) + len(got[index]) - 1)
            assert caches[0].offset == len(PROMPTS[index]) + len(got[index]) - 1
        tokens = batch.advance().tolist()
        for slot, index in enumerate(batch.rows):
            if index is not None:
                got[index].append(tokens[slot])
    assert len(batch.rows) == 4  # three rows at most: four slots (two busy is not a quarter)
    for index in range(4):
        assert got[index] == alone[index][: len(got[index])], f"row {index}"
    assert len(got[2]) == 11 and len(got[1]) == 2


def test_a_leaving_row_takes_its_positions_with_it(engine):
    model, _ = engine
    batch = BatchedFusedDecoder(model, fused_batch.BatchedReferenceKernels())
    first = [_alone(model, p, 0)[0] for p in PROMPTS[:2]]
    for index in range(2):
        _join(batch, index, model, PROMPTS[index], first[index])
    tokens = [batch.advance().tolist() for _ in range(3)]
    slot = batch.rows.index(1)
    caches = batch.leave(1, length=len(PROMPTS[1]) + 3)
    fed = PROMPTS[1] + [first[1]] + [t[slot] for t in tokens[:2]]
    expected, _ = prefilled(model, fed, 64)
    for ours, theirs in zip(caches, expected):
        assert mx.allclose(ours.keys, theirs.keys[..., : len(fed), :], atol=1e-4).item()
        assert mx.allclose(ours.values, theirs.values[..., : len(fed), :], atol=1e-4).item()
    assert batch.rows == [0, None] and batch.members == [0]  # half busy: not halved yet


def test_seeded_rows_do_not_depend_on_their_neighbours(engine):
    model, _ = engine
    sampling = SamplingParams(temperature=1.0, top_p=0.95, seed=7)

    def run(with_others):
        batch = BatchedFusedDecoder(model, fused_batch.BatchedReferenceKernels())
        if with_others:
            _join(batch, "other", model, PROMPTS[2], 4, SamplingParams(temperature=0.7), seed=3)
        _join(batch, "row", model, PROMPTS[0], 9, sampling, seed=7)
        if with_others:
            _join(batch, "third", model, PROMPTS[3], 5)
        out = []
        for _ in range(10):
            out.append(batch.advance().tolist()[batch.rows.index("row")])
        return out

    assert run(False) == run(True)


class _Tracking(fused_batch.BatchedReferenceKernels):
    """Records each kernel call and checks that every array it is given is a step input or an earlier
    kernel's output: then nothing but the kernels is in the step's graph, so with the GPU kernels
    (one graph node each) a step is 5·layers + 3 nodes for any B (counted with `graph_nodes` on
    the GPU: tests/kernels/test_fused_batch_gpu.py)."""

    def __init__(self, inputs):
        self.calls, self.known = [], {id(a) for a in inputs}

    def _track(self, name, arrays, outputs):
        self.calls.append(name)
        assert all(id(a) in self.known for a in arrays), f"{name} got an array made between kernels"
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        self.known |= {id(o) for o in outputs}
        return outputs if len(outputs) > 1 else outputs[0]

    def embed(self, state, table, dtype):
        return self._track("embed", [state], super().embed(state, table, dtype))

    def layer(self, x, attention, mlp, state, keys, values, next_attention=None):
        return fused_step.fused_layer.reference_layer(self, x, attention, mlp, state, keys, values)

    def qkv(self, x, attention, state, keys, values):
        return self._track("qkv", [x, state, keys, values], super().qkv(x, attention, state, keys, values))

    def attention(self, qkv, attention, state, keys, values):
        return self._track("attention", [qkv, state, keys, values], super().attention(qkv, attention, state, keys, values))

    def residual(self, x, layer, residual):
        return self._track("residual", [x, residual], super().residual(x, layer, residual))

    def swiglu(self, h, mlp):
        return self._track("swiglu", [h], super().swiglu(h, mlp))

    def head(self, h, norm_weight, eps, lm_head):
        return self._track("head", [h], super().head(h, norm_weight, eps, lm_head))

    def sample(self, logits, params, state, recent):
        return self._track("sample", [logits, params, state, recent], super().sample(logits, params, state, recent))


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_batched_plan_is_five_kernels_per_layer_and_three_more_for_any_batch(engine, rows):
    model, _ = engine
    state = mx.array([sample.state_row(4 + r, 10 + r, 0, 0, 0) for r in range(rows)], dtype=mx.int32)
    params = mx.array([sample.params_row(0.0, 0, 1.0, 0.0, 1.0, 8)] * rows, dtype=mx.float32)
    recent = mx.zeros((rows, 8), mx.int32)
    attention = model.layers[0].self_attn
    shape = (rows, attention.n_kv_heads, 32, attention.rope.dims)
    keys = [mx.zeros(shape) for _ in model.layers]
    values = [mx.zeros(shape) for _ in model.layers]
    kernels = _Tracking([state, params, recent, *keys, *values])
    next_state, tokens, *_ = fused_batch.decode_step(kernels, model, state, params, recent, keys, values)
    layers = model.config.num_hidden_layers
    assert len(kernels.calls) == 5 * layers + 3
    assert kernels.calls[0] == "embed" and kernels.calls[-2:] == ["head", "sample"]
    assert tokens.shape == (rows,) and next_state.shape == (rows, 8)


def test_scheduler_decodes_through_the_fused_batch_and_matches_alone(engine):
    model, tokenizer = engine
    prompts = ["hello", "the cat is on the mat and", "a", "we are here"]
    sampling = [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.9, seed=5, top_k=20),
                SamplingParams(repetition_penalty=1.3)]
    requests = [GenerationRequest(tokenizer.encode(p), 30 + 3 * i, s, ignore_eos=True)
                for i, (p, s) in enumerate(zip(prompts, sampling))]
    decoder = BatchedFusedDecoder(model, fused_batch.BatchedReferenceKernels())
    scheduler = Scheduler(model, tokenizer, max_batch=4, prompt_cache=None, fused=decoder)
    scheduler.start()
    try:
        together = run_all(scheduler, requests)
        assert scheduler.max_rows_seen == 4 and scheduler.batched_steps > 0
        assert wait_until_idle(scheduler)
        assert decoder.members == [] and decoder.rows == []  # everyone left: no buffers kept
        alone = [run_all(scheduler, [r])[0] for r in requests]
    finally:
        scheduler.stop()
    assert together == alone
    for index in (0, 1, 3):  # greedy: the model file's tokens too
        request = requests[index]
        assert together[index] == fm.generate(model, tokenizer, request.ids, max_tokens=request.max_tokens,
                                              sampling=request.sampling, ignore_eos=True)


def test_requests_that_arrive_together_start_together(engine, monkeypatch):
    """Four requests waiting at once are prefilled in one turn and join with one relayout, straight
    to four slots (joined one per turn, the batch was relaid out at 1, 2 and 4 slots, each a new
    step shape, with a drain of the steps queued ahead before every join)."""
    model, tokenizer = engine
    decoder = BatchedFusedDecoder(model, fused_batch.BatchedReferenceKernels())
    layouts = []
    relayout = decoder._relayout
    monkeypatch.setattr(decoder, "_relayout", lambda slots, dtype: layouts.append(slots) or relayout(slots, dtype))
    scheduler = Scheduler(model, tokenizer, max_batch=4, prompt_cache=None, fused=decoder)
    requests = [GenerationRequest(tokenizer.encode(p), 5 + i, ignore_eos=True)
                for i, p in enumerate(("hello", "a cat", "we are", "the mat"))]
    done = threading.Semaphore(0)
    for request in requests:
        scheduler.submit(request, lambda event: event.finish_reason is not None and done.release())
    scheduler.start()  # after the submissions: the first turn sees all four
    try:
        assert all(done.acquire(timeout=120) for _ in requests)
    finally:
        scheduler.stop()
    assert layouts[0] == 4 and all(slots < 4 for slots in layouts[1:]), layouts
    assert scheduler.max_rows_seen == 4


def test_fused_batch_rows_go_to_the_prompt_cache_intact(engine):
    model, tokenizer = engine
    cache = PromptCache(1 << 26)
    decoder = BatchedFusedDecoder(model, fused_batch.BatchedReferenceKernels())
    scheduler = Scheduler(model, tokenizer, max_batch=2, prompt_cache=cache, fused=decoder)
    scheduler.start()
    try:
        first = [GenerationRequest(tokenizer.encode(p), 6 + i, ignore_eos=True)
                 for i, p in enumerate(("hello the world", "a cat"))]
        replies = run_all(scheduler, first)
        assert wait_until_idle(scheduler) and len(cache) == 2
        assert_follow_ups_reuse_the_prompt_cache(scheduler, cache, first, replies)
    finally:
        scheduler.stop()


def test_the_cpu_keeps_the_model_file_batch(engine):
    """No GPU backend (or a model the plan does not cover): the scheduler's batched path stays the
    model file's (engine/batch.py), which tests/test_batch.py holds to each row alone."""
    model, tokenizer = engine
    assert batch_decoder_for(model) is None
    assert Scheduler(model, tokenizer).fused is None


def test_info_names_the_server_batch_path(engine, monkeypatch):
    from foundry_mlx.decode_paths import decode_paths

    model, _ = engine
    monkeypatch.delenv("FOUNDRY_FUSED", raising=False)
    paths = {backend: dict((op, path) for op, path, _ in decode_paths(model.config, backend))["server batch"]
             for backend in ("cuda", "metal")}
    assert paths == {"cuda": "fused batch", "metal": "model file"}
