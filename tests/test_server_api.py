"""`foundry-mlx serve` on a tiny model: routes, streaming, usage, stops, errors, auth, back-pressure.

The server runs as a real process on 127.0.0.1; clients are the official `openai` package and
httpx. Expected texts come from the engine itself (`foundry_mlx.generate`) in this process.
"""

from __future__ import annotations

import contextlib
import json
import time

import httpx
import openai
import pytest
from server_helpers import RunningServer
from tiny_models import TinySpec, write_tiny_model

import foundry_mlx as fm

CONTEXT = 1024


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("serve") / "tiny.gguf", TinySpec(seed=10, context=CONTEXT))


@pytest.fixture(scope="module")
def engine(tiny):
    return fm.load(str(tiny.path), progress=False)


@pytest.fixture(scope="module")
def server(tiny):
    running = RunningServer(str(tiny.path))
    yield running
    running.stop()


def chat_prompt(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_health_and_models(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert server.client().models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        server.client().models.retrieve("gpt-4")


def test_health_counts_the_engine_time_by_kind(server):
    """GET /health splits the engine thread's time into prefill, batch membership and decode: the
    numbers that say where a slow server spends its steps."""
    before = httpx.get(f"{server.url}/health").json()["engine_seconds"]
    server.client().completions.create(model="tiny", prompt="hello the world", max_tokens=6, temperature=0)
    after = httpx.get(f"{server.url}/health").json()["engine_seconds"]
    assert set(after) == {"prefill", "membership", "decode"}
    assert after["prefill"] > before["prefill"] and after["decode"] > before["decode"], (before, after)


def test_chat_streamed_equals_plain_equals_generate(server, engine):
    model, tokenizer = engine
    client = server.client()
    messages = [{"role": "user", "content": "hello the world"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = fm.generate(model, tokenizer, chat_prompt(tokenizer, "hello the world"), max_tokens=12, temperature=0)
    assert plain.choices[0].message.content == streamed == expected
    assert plain.choices[0].message.role == "assistant"
    prompt_tokens = len(tokenizer.encode(chat_prompt(tokenizer, "hello the world"), add_special_tokens=False))
    assert plain.usage.prompt_tokens == prompt_tokens
    finish = plain.choices[0].finish_reason
    assert finish in ("stop", "length") and (finish == "stop") == (plain.usage.completion_tokens < 12)
    assert plain.usage.total_tokens == prompt_tokens + plain.usage.completion_tokens
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and chunks[-1] is usage_chunks[0] and chunks[-1].choices == []
    assert usage_chunks[0].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]


def test_completion_and_raw_sse(server, engine):
    model, tokenizer = engine
    expected = fm.generate(model, tokenizer, "the cat is on the", max_tokens=10, temperature=0)
    plain = server.client().completions.create(model="tiny", prompt="the cat is on the", max_tokens=10, temperature=0)
    assert plain.choices[0].text == expected
    body = {"model": "tiny", "prompt": "the cat is on the", "max_tokens": 10, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    pieces = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(p["choices"][0]["text"] for p in pieces) == expected
    assert pieces[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_token_ids_prompt_and_max_completion_tokens(server, engine):
    model, tokenizer = engine
    ids = tokenizer.encode("we are here")
    expected = fm.generate(model, tokenizer, ids, max_tokens=3, temperature=0)
    out = server.client().completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0)
    assert out.choices[0].text == expected
    chat = server.client().chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=2, temperature=0)
    assert chat.usage.completion_tokens <= 2


def test_stop_string_cuts_and_reports_stop(server, engine):
    model, tokenizer = engine
    full = fm.generate(model, tokenizer, "hello", max_tokens=12, temperature=0, ignore_eos=True)
    stop = next(full[i : i + 2] for i in range(2, len(full) - 1) if "\ufffd" not in full[i : i + 2])
    out = server.client().completions.create(model="tiny", prompt="hello", max_tokens=12, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_seed_gives_the_same_sample(server):
    client = server.client()

    def sample(seed: int) -> str:
        return client.completions.create(model="tiny", prompt="a", max_tokens=8, temperature=1.0, seed=seed,
                                         extra_body={"top_k": 50}).choices[0].text

    assert sample(7) == sample(7)
    extras = client.completions.create(model="tiny", prompt="a", max_tokens=4, temperature=0.8,
                                       extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2})
    assert extras.usage.completion_tokens >= 1


# --- errors: status, OpenAI error object, and the server keeps serving ------------------------------

LONG = "hello " * 1100  # ~1100+ tokens: longer than the context of 1024
BAD_REQUESTS = [
    ("malformed json", "/v1/chat/completions", b'{"model": "tiny",', 400, None),
    ("not an object", "/v1/chat/completions", [1, 2], 400, None),
    ("wrong type", "/v1/chat/completions", {"model": "tiny", "messages": "hi"}, 400, "messages"),
    ("wrong type max_tokens", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("missing model", "/v1/completions", {"prompt": "a"}, 400, "model"),
    ("unknown model", "/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("max_tokens 0", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/chat/completions",
     {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_completion_tokens": -3}, 400,
     "max_completion_tokens"),
    ("beyond context", "/v1/completions", {"model": "tiny", "prompt": "a", "max_tokens": CONTEXT + 5}, 400, "max_tokens"),
    ("prompt too long", "/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 1}, 400, "prompt"),
    ("tools", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                       "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ("response_format", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                                 "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("logprobs", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}],
                                          "logprobs": True}, 400, "logprobs"),
    ("n > 1", "/v1/completions", {"model": "tiny", "prompt": "a", "n": 2}, 400, "n"),
    ("empty messages", "/v1/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
    ("bad role", "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "a"}]}, 400,
     "messages"),
    ("temperature", "/v1/completions", {"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("top_p", "/v1/completions", {"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("seed", "/v1/completions", {"model": "tiny", "prompt": "a", "seed": -1}, 400, "seed"),
    ("token id", "/v1/completions", {"model": "tiny", "prompt": [10**9]}, 400, "prompt"),
    ("stream_options alone", "/v1/completions", {"model": "tiny", "prompt": "a", "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("oversized body", "/v1/completions", {"model": "tiny", "prompt": "x" * (2 << 20)}, 413, None),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_error_object(server, name, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}{path}", content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error["message"].count(". ") == 0, error["message"]  # one sentence
    if param is not None:
        assert error["param"] == param, error


def test_wrong_route_and_method(server):
    assert httpx.get(f"{server.url}/v1/nothing").status_code == 404
    wrong = httpx.get(f"{server.url}/v1/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_openai_client_sees_errors(server):
    with pytest.raises(openai.NotFoundError):
        server.client().completions.create(model="nope", prompt="a")
    with pytest.raises(openai.BadRequestError, match="not supported"):
        server.client().chat.completions.create(model="tiny", messages=[{"role": "user", "content": "a"}], n=2)
    assert server.client().completions.create(model="tiny", prompt="a", max_tokens=1).usage.completion_tokens == 1


def test_serve_help_and_bad_options(tiny):
    from click.testing import CliRunner

    from foundry_mlx.cli import main

    help_text = CliRunner().invoke(main, ["serve", "--help"]).output
    for option in ("--host", "--port", "--api-key", "--max-batch", "--prompt-cache-bytes", "/v1/chat/completions"):
        assert option in help_text
    result = CliRunner().invoke(main, ["serve", "-m", str(tiny.path), "--max-batch", "0"])
    assert result.exit_code == 1 and result.output.strip() == "error: --max-batch must be at least 1, got 0."


def test_api_key(tiny):
    running = RunningServer(str(tiny.path), "--api-key", "s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client(api_key="wrong").models.list()
        assert httpx.get(f"{running.url}/v1/models").status_code == 401
        assert running.client(api_key="s3cret").models.list().data[0].id == "tiny"
        assert httpx.get(f"{running.url}/health").status_code == 200
    finally:
        running.stop()


def test_full_queue_503_and_disconnect_frees_slot(tmp_path):
    # A long context, so that the streams below are still running when the third request comes.
    long = write_tiny_model(tmp_path / "tiny.gguf", TinySpec(seed=10, context=1 << 16))
    running = RunningServer(str(long.path), "--max-batch", "1", "--max-queue", "1")
    try:
        body = {"model": "tiny", "prompt": "a", "max_tokens": 60000, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.Client(timeout=30) as first, httpx.Client(timeout=30) as second, contextlib.ExitStack() as streams:
            live = streams.enter_context(first.stream("POST", f"{running.url}/v1/completions", json=body))
            lines = live.iter_lines()  # kept: dropping the iterator would close the stream
            next(lines)
            queued = streams.enter_context(second.stream("POST", f"{running.url}/v1/completions", json=body))
            time.sleep(0.5)
            health = httpx.get(f"{running.url}/health").json()
            assert (health["live"], health["waiting"]) == (1, 1), (health, queued.status_code)
            refused = httpx.post(f"{running.url}/v1/completions", json=body, timeout=30)
            assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
            assert refused.json()["error"]["code"] == "server_busy"
            live.close()
            queued.close()
        deadline = time.monotonic() + 10
        while [httpx.get(f"{running.url}/health").json()[k] for k in ("live", "waiting")] != [0, 0]:
            assert time.monotonic() < deadline, "closed streams still hold their slots"
            time.sleep(0.1)
        done = running.client().completions.create(model="tiny", prompt="a", max_tokens=2)
        assert done.usage.completion_tokens <= 2
    finally:
        running.stop()
