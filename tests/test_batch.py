"""Batched decoding (`engine/batch.py`), the scheduler and the prompt cache, in process, on tiny models."""

from __future__ import annotations

import threading

import mlx.core as mx
import pytest
from tiny_models import TinySpec, qwen2_quantized_spec, write_tiny_model

import foundry_mlx as fm
from foundry_mlx.engine.batch import merge, split
from foundry_mlx.server.prompt_cache import PromptCache
from foundry_mlx.server.scheduler import Scheduler, wait_until_idle
from foundry_mlx.server.sequence import GenerationRequest


@pytest.fixture(scope="module", params=["f32", "quantized"])
def engine(request, tmp_path_factory):
    spec = TinySpec(seed=10) if request.param == "f32" else qwen2_quantized_spec()
    tiny = write_tiny_model(tmp_path_factory.mktemp("batch") / f"{request.param}.gguf", spec)
    return fm.load(str(tiny.path), progress=False)


PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [40, 41], [7, 7, 7, 7, 7], [200]]


def prefilled(model, ids):
    cache = model.make_cache()
    mx.eval(model(mx.array(ids)[None], cache))
    return cache


def test_batched_steps_equal_each_row_alone(engine):
    model, _ = engine
    batch = merge([prefilled(model, ids) for ids in PROMPTS])
    fed = [list(ids) for ids in PROMPTS]
    for step in range(3):
        tokens = [10 + step + row for row in range(len(PROMPTS))]
        logits = model(mx.array(tokens)[:, None], batch, last_only=True)[:, -1, :]
        for row, token in enumerate(tokens):
            fed[row].append(token)
            alone = model(mx.array(fed[row])[None])[:, -1, :]
            assert mx.allclose(logits[row], alone[0], atol=1e-4).item(), (step, row)
    # Back to per-row caches: each continues alone exactly where its row was.
    for row, cache in enumerate(split(batch, model)):
        assert cache[0].offset == len(fed[row])
        logits = model(mx.array([[5]]), cache)[:, -1, :]
        alone = model(mx.array(fed[row] + [5])[None])[:, -1, :]
        assert mx.allclose(logits, alone, atol=1e-4).item()


def test_padding_is_masked(engine):
    model, _ = engine
    batch = merge([prefilled(model, [1, 2, 3, 4, 5, 6]), prefilled(model, [9])])
    mask = batch[0].attention_mask(1)
    assert mask.shape == (2, 1, 1, 7)
    assert mask[1, 0, 0].tolist() == [False] * 5 + [True, True]
    assert batch[0].offset.tolist() == [6, 1]


def run_all(scheduler: Scheduler, requests: list[GenerationRequest]) -> list[str]:
    texts = [[] for _ in requests]
    done = threading.Barrier(len(requests) + 1, timeout=120)

    def collector(index):
        def emit(event):
            texts[index].append(event.text if event.finish_reason != "error" else f"<error: {event.error}>")
            if event.finish_reason is not None:
                threading.Thread(target=done.wait).start()

        return emit

    for index, request in enumerate(requests):
        scheduler.submit(request, collector(index))
    done.wait()
    return ["".join(t) for t in texts]


def test_scheduler_batches_and_matches_alone(engine):
    model, tokenizer = engine
    prompts = ["hello", "the cat is on the mat and", "a", "we are here"]
    sampling = [fm.SamplingParams(), fm.SamplingParams(), fm.SamplingParams(temperature=0.9, seed=5, top_k=20),
                fm.SamplingParams(repetition_penalty=1.3)]
    requests = [GenerationRequest(tokenizer.encode(p), 6 + 3 * i, s) for i, (p, s) in enumerate(zip(prompts, sampling))]
    expected = [fm.generate(model, tokenizer, r.ids, max_tokens=r.max_tokens, sampling=r.sampling) for r in requests]
    scheduler = Scheduler(model, tokenizer, max_batch=4, prompt_cache=None)
    scheduler.start()
    try:
        assert run_all(scheduler, requests) == expected
        assert scheduler.max_rows_seen == 4 and scheduler.batched_steps > 0
        assert wait_until_idle(scheduler)
        # Alone, each runs with its next step queued ahead (as stream_generate does): same tokens.
        assert [run_all(scheduler, [r])[0] for r in requests] == expected
    finally:
        scheduler.stop()


def test_scheduler_prompt_cache_reuses_prefix(engine):
    model, tokenizer = engine
    cache = PromptCache(1 << 26)
    scheduler = Scheduler(model, tokenizer, max_batch=2, prompt_cache=cache)
    scheduler.start()
    try:
        first = GenerationRequest(tokenizer.encode("hello the world"), 5)
        run_all(scheduler, [first])
        assert wait_until_idle(scheduler) and len(cache) == 1
        follow = GenerationRequest(tokenizer.encode("hello the world and more"), 4)
        events = []
        finished = threading.Event()
        scheduler.submit(follow, lambda e: (events.append(e), e.finish_reason and finished.set()))
        assert finished.wait(60)
        assert events[-1].cached_tokens > 0
        text = "".join(e.text for e in events)
        assert text == fm.generate(model, tokenizer, follow.ids, max_tokens=4)
    finally:
        scheduler.stop()


# --- prompt cache --------------------------------------------------------------------------------------


def test_prompt_cache_longest_prefix_lru_and_budget(engine):
    model, _ = engine
    one = prefilled(model, list(range(1, 11)))
    per_token = sum(c.keys[..., :1, :].nbytes + c.values[..., :1, :].nbytes for c in one)
    cache = PromptCache(per_token * 25)
    cache.store(list(range(1, 11)), one)
    cache.store(list(range(1, 6)), prefilled(model, list(range(1, 6))))  # inside the first: not stored again
    assert len(cache) == 1 and cache.nbytes == per_token * 10
    hit, shared = cache.lookup([1, 2, 3, 4, 99, 100], model)
    assert shared == 4 and hit[0].offset == 4
    assert cache.lookup(list(range(1, 11)), model)[1] == 9  # at least one id is left to run
    assert cache.lookup([50, 51], model) is None
    # Writing into a cache from a hit never changes the stored entry.
    model(mx.array([[77, 78]]), hit)
    again, _ = cache.lookup([1, 2, 3, 4, 5, 6], model)
    fresh = prefilled(model, [1, 2, 3, 4, 5])
    assert mx.array_equal(again[0].keys[..., :5, :], fresh[0].keys[..., :5, :]).item()
    cache.store([20] * 10, prefilled(model, [20] * 10))
    cache.lookup([1, 2, 3], model)  # the first entry is now the most recently used
    cache.store([30] * 10, prefilled(model, [30] * 10))  # over budget: evicts [20]*10
    assert cache.lookup([20, 20], model) is None
    assert cache.lookup([1, 2, 3], model) is not None and cache.nbytes <= cache.max_bytes
    cache.store(list(range(100, 140)), prefilled(model, list(range(100, 140))))  # larger than the budget: skipped
    assert cache.lookup([100, 101, 102], model) is None


def test_batch_cache_grows_keeping_its_contents(engine):
    model, _ = engine
    batch = merge([prefilled(model, ids) for ids in PROMPTS[:2]], reserve=1)
    layer = batch[0]
    before, capacity = layer.keys[..., : layer.column, :], layer.capacity
    heads, dim = layer.keys.shape[1], layer.keys.shape[3]
    new = mx.ones((2, heads, capacity, dim))
    keys, _ = layer.update_and_fetch(new, new)
    assert layer.capacity > capacity and keys.shape[2] == before.shape[2] + capacity
    assert mx.array_equal(keys[..., : before.shape[2], :], before).item()
    assert mx.array_equal(keys[..., before.shape[2] :, :], new).item()


def test_batched_rows_go_to_the_prompt_cache_intact(engine):
    model, tokenizer = engine
    cache = PromptCache(1 << 26)
    scheduler = Scheduler(model, tokenizer, max_batch=2, prompt_cache=cache, batched=True)
    scheduler.start()
    try:
        first = [GenerationRequest(tokenizer.encode(p), 6, ignore_eos=True) for p in ("hello the world", "a cat")]
        replies = run_all(scheduler, first)
        assert scheduler.batched_steps > 0 and wait_until_idle(scheduler) and len(cache) == 2
        assert_follow_ups_reuse_the_prompt_cache(scheduler, cache, first, replies)
    finally:
        scheduler.stop()


def assert_follow_ups_reuse_the_prompt_cache(scheduler: Scheduler, cache: PromptCache, first, replies) -> None:
    """Each conversation goes on from its stored KV (prompt + reply): one prompt-cache hit per
    follow-up, and the same text as a fresh run of the whole conversation."""
    model, tokenizer = scheduler.model, scheduler.tokenizer
    follow = [GenerationRequest(r.ids + tokenizer.encode(reply) + tokenizer.encode(" and"), 4, ignore_eos=True)
              for r, reply in zip(first, replies)]
    hits_before = cache.hits
    assert run_all(scheduler, follow) == [
        fm.generate(model, tokenizer, r.ids, max_tokens=4, ignore_eos=True) for r in follow
    ]
    assert cache.hits - hits_before == 2
