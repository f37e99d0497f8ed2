"""The server under load, on tiny models: 8 concurrent streaming clients batched together, and a
burst of 200 malformed or hostile requests mixed with valid ones.

Answers of concurrent requests must equal what each request gets alone at temperature 0; a
batched step may round differently, so a difference is allowed only after a near-tie (the two
best logits within `TIE`), which the test finds by running the model itself.
"""

from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import mlx.core as mx
import pytest
from server_helpers import RunningServer
from tiny_models import CHATML_TEMPLATE, TinySpec, V, write_tiny_model

import foundry_mlx as fm

TIE = 1e-3
PROMPTS = ["hello", "the cat is on the mat", "a", "we are here and there and everywhere", "is it on",
           "hello hello hello the", "mand", "the world is here, on the mat, in the sun, and hello again"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("load") / "tiny.gguf", TinySpec(seed=10, context=1024))


@pytest.fixture(scope="module")
def engine(tiny):
    return fm.load(str(tiny.path), progress=False)


def greedy_margins(model, tokenizer, prompt: str, count: int) -> list[tuple[str, float]]:
    """The greedy continuation of `prompt`, as (text so far, gap between the two best logits) per token."""
    ids = tokenizer.encode(prompt)
    detokenizer, out = tokenizer.detokenizer(), []
    for _ in range(count):
        logits = model(mx.array(ids)[None])[0, -1]
        top = mx.sort(logits)[-2:].tolist()
        token = int(mx.argmax(logits).item())
        ids.append(token)
        out.append((detokenizer.text + detokenizer.add(token), top[1] - top[0]))
    return out


def assert_same_or_after_tie(model, tokenizer, prompt: str, alone: str, batched: str, count: int) -> None:
    if batched == alone:
        return
    steps = greedy_margins(model, tokenizer, prompt, count)
    diverged = next(i for i, (text, _) in enumerate(steps) if not batched.startswith(text.rstrip("\ufffd")))
    closest = min(margin for _, margin in steps[: diverged + 1])
    assert closest < TIE, f"{prompt!r}: batched {batched!r} != alone {alone!r} with no near-tie before it"


@pytest.mark.parametrize("batching", ["on", "off"])
def test_eight_concurrent_streams_equal_each_alone(tiny, engine, batching):
    model, tokenizer = engine
    lengths = [48, 80, 16, 64, 32, 96, 24, 72]  # long enough to overlap on a busy machine
    running = RunningServer(str(tiny.path), "--max-batch", "8", "--batching", batching)
    try:
        client = running.client(timeout=120)

        def ask(index: int, stream: bool) -> str:
            kwargs = dict(model="tiny", prompt=PROMPTS[index], max_tokens=lengths[index], temperature=0,
                          extra_body={"ignore_eos": True})
            if not stream:
                return client.completions.create(**kwargs).choices[0].text
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs) if c.choices)

        start = time.perf_counter()
        alone = [ask(i, stream=False) for i in range(8)]
        sequential = time.perf_counter() - start
        before = httpx.get(f"{running.url}/health").json()
        start = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda i: ask(i, stream=True), range(8)))
        concurrent = time.perf_counter() - start
        health = httpx.get(f"{running.url}/health").json()
        print(f"\n8 requests, {sum(lengths)} tokens: one after another {sequential:.2f} s, concurrently {concurrent:.2f} s; "
              f"largest batch {health['largest_batch']}, batched steps {health['batched_steps'] - before['batched_steps']}")
        assert health["largest_batch"] >= 4, "the requests never ran together"
        assert (health["batched_steps"] > before["batched_steps"]) == (batching == "on")
        for index in range(8):
            assert_same_or_after_tie(model, tokenizer, PROMPTS[index], alone[index], together[index], lengths[index])
        assert (health["live"], health["waiting"]) == (0, 0)
    finally:
        running.stop()


# --- a burst of bad requests --------------------------------------------------------------------------

HOSTILE_TEMPLATE = (
    "{% if messages[0]['content'] == 'spin' %}{% for i in range(100000) %}{% for j in range(100000) %}"
    "{% endfor %}{% endfor %}{% endif %}"
    "{% if messages[0]['content'] == 'grow' %}{% set ns = namespace(s='0123456789abcdef') %}"
    "{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}{% endif %}" + CHATML_TEMPLATE
)


def bad_requests() -> list[tuple[str, bytes | dict, dict]]:
    chat = "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    return [
        (chat, b"{not json", {}),
        (chat, b"\xff\xfe\x00garbage", {}),
        (chat, b"[" * 100_000, {}),
        (chat, {"model": "tiny", "messages": user, "max_tokens": 10**9}, {}),
        (chat, {"model": "tiny", "messages": user, "tools": [{"type": "function"}]}, {}),
        (chat, {"model": "tiny", "messages": [{"role": "user", "content": 5}]}, {}),
        (chat, {"model": "tiny", "messages": user, "n": 3}, {}),
        (chat, {"model": ["tiny"], "messages": user}, {}),
        ("/v1/completions", {"model": "tiny", "prompt": "x" * (1 << 21)}, {}),
        ("/v1/completions", {"model": "tiny", "prompt": "hello " * 2000}, {}),
        ("/v1/completions", {"model": "tiny", "prompt": [-1, 2]}, {}),
        ("/v1/completions", {"model": "tiny", "prompt": "a", "stop": ["x"] * 100}, {}),
        (chat, {"model": "tiny", "messages": [{"role": "user", "content": "a"}] * 25_000}, {}),
    ]


def hostile_messages() -> list[tuple[str, dict, dict]]:
    """Messages that make the hostile template loop forever or double a string 40 times."""
    return [("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": word}], "max_tokens": 2}, {})
            for word in ("spin", "grow")]


def test_burst_of_bad_requests_leaves_server_serving(tmp_path, engine):
    hostile = write_tiny_model(tmp_path / "tiny.gguf", TinySpec(
        seed=10, context=1024, extra_metadata={"tokenizer.chat_template": (HOSTILE_TEMPLATE, V.STRING, None)}))
    model, tokenizer = engine  # the same weights: only the template differs
    running = RunningServer(str(hostile.path), "--template-timeout", "1")
    try:
        valid = {p: fm.generate(model, tokenizer, p, max_tokens=6, temperature=0) for p in PROMPTS[:3]}
        chat_prompt = tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[3]}], add_generation_prompt=True)
        valid[PROMPTS[3]] = fm.generate(model, tokenizer, chat_prompt, max_tokens=6, temperature=0)

        def valid_request(prompt: str):
            if prompt == PROMPTS[3]:
                return "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": prompt}],
                                                "max_tokens": 6, "temperature": 0}, {}
            return "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0}, {}

        def answer(response) -> str:
            choice = response.json()["choices"][0]
            return choice["text"] if "text" in choice else choice["message"]["content"]

        for prompt in valid:  # warm-up, then the memory baseline
            httpx.post(running.url + valid_request(prompt)[0], json=valid_request(prompt)[1], timeout=60)
        baseline = running.rss_bytes()
        bad = bad_requests() * 10 + hostile_messages() * 2
        random.Random(0).shuffle(bad)
        kept = [PROMPTS[i % 4] for i in range(200 - len(bad))]
        jobs = [("valid", p, valid_request(p)) for p in kept] + [("bad", None, b) for b in bad]
        random.Random(1).shuffle(jobs)
        assert len(jobs) == 200

        def send(job):
            kind, prompt, (path, body, headers) = job
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            response = httpx.post(running.url + path, content=content, timeout=60,
                                  headers={"Content-Type": "application/json", **headers})
            return kind, prompt, response

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(send, jobs))
        for kind, prompt, response in results:
            if kind == "valid":
                assert response.status_code == 200, response.text
                assert answer(response) == valid[prompt]
            else:
                assert 400 <= response.status_code < 500, response.text
                error = response.json()["error"]
                assert error["message"] and error["type"]
        assert running.alive()
        spins = [r for k, p, r in results if k == "bad" and "template took longer" in r.text]
        grows = [r for k, p, r in results if k == "bad" and "memory" in r.text]
        assert spins and grows, "the hostile templates were not refused by their limits"
        grown = running.rss_bytes() - baseline
        print(f"\nserver RSS {baseline / 2**20:.0f} MiB before the burst, {grown / 2**20:+.0f} MiB after")
        assert grown < 64 * 2**20
        after = httpx.post(running.url + "/v1/completions", json=valid_request(PROMPTS[0])[1], timeout=60)
        assert answer(after) == valid[PROMPTS[0]]
    finally:
        running.stop()
