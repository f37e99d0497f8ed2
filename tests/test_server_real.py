"""`foundry-mlx serve` with the real Qwen2.5-Coder-0.5B on the CPU, through the official openai client.

Slow (the CPU prefills ~4 tok/s): short prompts, few tokens.
"""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner
from server_helpers import RunningServer

from foundry_mlx import sources
from foundry_mlx.cli import main

pytestmark = pytest.mark.slow
MODEL = sources.DEFAULT_MODEL


@pytest.fixture(scope="module")
def server(qwen_gguf_path):
    running = RunningServer(MODEL)
    yield running
    running.stop()


def test_streamed_equals_plain_equals_generate(server):
    client = server.client(timeout=300)
    messages = [{"role": "user", "content": "Name a prime."}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The same prompt text through `foundry-mlx generate` (the model's own chat template, rendered here).
    from foundry_mlx.formats.gguf import GGUFFile
    from foundry_mlx.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(sources.resolve(MODEL)).metadata)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    result = CliRunner().invoke(main, ["generate", "-m", MODEL, "-p", prompt, "-n", "6", "--json"], catch_exceptions=False)
    generated = json.loads(result.stdout.strip().splitlines()[-1])["text"]
    assert plain.choices[0].message.content == streamed == generated
    assert streamed.strip(), "the model said nothing"
    assert plain.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == plain.usage.prompt_tokens - 1  # the repeat reused it


def first_token_seconds(client, messages) -> tuple[float, int]:
    start = time.perf_counter()
    first, cached = None, None
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            cached = chunk.usage.prompt_tokens_details.cached_tokens
    return first, cached


def test_follow_up_turn_reuses_the_prefix(server):
    client = server.client(timeout=300)
    turn = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 3?"}]
    reply = client.chat.completions.create(model=MODEL, messages=turn, max_tokens=8, temperature=0)
    follow = turn + [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "And times 4?"}]
    warm, warm_cached = first_token_seconds(client, follow)
    # The same conversation with a different first word: as long, but no cached prefix past the role tag.
    cold_follow = [{"role": "system", "content": "Be terse."}] + follow[1:]
    cold, cold_cached = first_token_seconds(client, cold_follow)
    print(f"\nfollow-up turn: time to first token {warm:.2f} s with {warm_cached} cached prompt tokens, "
          f"{cold:.2f} s with {cold_cached}")
    assert warm_cached >= reply.usage.prompt_tokens and cold_cached < 5
    assert warm < 0.75 * cold  # about 0.45 measured; the margin is for a busy shared machine
