"""Generation (`engine/generate.py`) and multi-turn chat (`engine/chat.py`) on a tiny model."""

from __future__ import annotations

import re

import mlx.core as mx
import pytest
from tiny_models import TinySpec, write_tiny_model

from foundry_mlx import load
from foundry_mlx.engine.chat import Chat
from foundry_mlx.engine.decoder import Decoder
from foundry_mlx.engine.generate import Session, _StopMatcher, generate, stream_generate
from foundry_mlx.engine.sampling import SamplingParams
from foundry_mlx.errors import ContextLengthError, FoundryError
from foundry_mlx.formats.gguf import GGUFFile
from foundry_mlx.tokenizer import Tokenizer

CONTEXT = 512
PROMPT = "hello there"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("generate") / "tiny.gguf", TinySpec(seed=10, context=CONTEXT))


@pytest.fixture(scope="module")
def loaded(tiny):
    return load(str(tiny.path), progress=False)


def run(loaded, prompt=PROMPT, max_tokens=24, **kwargs):
    model, tokenizer = loaded
    return list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class ForcedToken:
    """The model, except that the `at_call`-th forward pass (1: the prefill) strongly prefers
    `token`: a way to make the model emit a chosen token (an end-of-turn) at a chosen step."""

    def __init__(self, model, token: int, at_call: int) -> None:
        self.model, self.token, self.at_call, self.calls = model, token, at_call, 0
        # Decode steps must come through __call__ to be counted: an eager decoder of this proxy
        # (the compiled one traces the forward pass once and replays it).
        self._decoder = Decoder(self, compiled=False)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, cache=None, last_only=False):
        logits = self.model(inputs, cache, last_only)
        self.calls += 1
        if self.calls == self.at_call:
            logits = logits + 1000.0 * (mx.arange(logits.shape[-1]) == self.token)
        return logits


# --- lengths and end of turn ---------------------------------------------------------------------


def test_max_tokens_is_honoured_with_finish_reason_length(loaded):
    _, tokenizer = loaded
    responses = run(loaded, max_tokens=9)
    assert len(responses) == 9
    assert not {r.token for r in responses} & tokenizer.eos_token_ids
    assert [r.finish_reason for r in responses] == [None] * 8 + ["length"]
    assert [r.generation_tokens for r in responses] == list(range(1, 10))
    prompt_length = len(tokenizer.encode(PROMPT))
    assert all(r.prompt_tokens == prompt_length for r in responses)
    assert responses[-1].time_to_first_token > 0


def test_the_first_token_comes_before_the_steps_queued_ahead(loaded, monkeypatch):
    """With 8 steps queued ahead, the first token is read after queueing one: queueing all 8 first
    delayed it by their host time while the device ran them (inflating the measured decode rate
    too). From the second token on, the queue fills to 8, and the tokens are the same."""
    from foundry_mlx.engine import generate as generation

    model, tokenizer = loaded
    calls = []
    make = generation._runner

    def runner(*args):
        made = make(*args)
        made.ahead = 8
        advance = made.advance
        made.advance = lambda token: calls.append(1) or advance(token)
        return made

    expected = [r.token for r in run(loaded, max_tokens=20, ignore_eos=True)]
    monkeypatch.setattr(generation, "_runner", runner)
    stream = stream_generate(model, tokenizer, PROMPT, max_tokens=20, ignore_eos=True)
    tokens = [next(stream).token]
    assert len(calls) == 1
    tokens.append(next(stream).token)
    assert len(calls) == 9
    tokens += [r.token for r in stream]
    assert tokens == expected and len(calls) == 19


def test_max_tokens_one(loaded):
    responses = run(loaded, max_tokens=1)
    assert len(responses) == 1 and responses[0].finish_reason == "length"


@pytest.mark.parametrize("end_token", ["<|im_end|>", "<|endoftext|>"])
def test_stops_at_end_of_turn_without_its_text(loaded, tiny, end_token):
    model, tokenizer = loaded
    end_id = tiny.token_id(end_token)
    assert end_id in tokenizer.eos_token_ids
    free = run(loaded, max_tokens=6)
    forced = ForcedToken(model, end_id, at_call=4)  # the 4th token is the end of turn
    responses = list(stream_generate(forced, tokenizer, PROMPT, max_tokens=20))
    assert [r.token for r in responses] == [r.token for r in free[:3]] + [end_id]
    assert responses[-1].finish_reason == "stop"
    assert [r.finish_reason for r in responses[:-1]] == [None] * 3
    text = "".join(r.text for r in responses)
    assert end_token not in text
    assert text == tokenizer.decode([r.token for r in free[:3]])


def test_eos_as_the_first_token(loaded, tiny):
    model, tokenizer = loaded
    forced = ForcedToken(model, tiny.token_id("<|im_end|>"), at_call=1)
    responses = list(stream_generate(forced, tokenizer, PROMPT, max_tokens=20))
    assert len(responses) == 1 and responses[0].finish_reason == "stop" and responses[0].text == ""


# --- stop strings ---------------------------------------------------------------------------------


def test_stop_string_across_chunks_is_cut_and_never_leaks(loaded):
    free = run(loaded, max_tokens=24)
    chunks = [r.text for r in free]
    text = "".join(chunks)
    # A stop string spanning three stream chunks: end of one, all of the next, start of the third.
    i = next(i for i in range(2, len(chunks) - 2) if chunks[i] and chunks[i + 1] and chunks[i + 2])
    stop = chunks[i][-1] + chunks[i + 1] + chunks[i + 2][0]
    assert len(stop) >= 3
    expected = text[: text.index(stop)]
    responses = run(loaded, max_tokens=24, stop=[stop])
    assert "".join(r.text for r in responses) == expected
    assert responses[-1].finish_reason == "stop"
    assert len(responses) <= i + 3  # generation ended once the stop string was complete
    # No chunk ever carried the beginning of the stop string that was later completed.
    emitted = ""
    for response in responses:
        emitted += response.text
        assert emitted == expected[: len(emitted)]


def test_stop_string_that_never_completes_is_released(loaded):
    free = run(loaded, max_tokens=24)
    text = "".join(r.text for r in free)
    stop = text[4:7] + "\x00never"  # its first characters do appear: held back, then released
    responses = run(loaded, max_tokens=24, stop=[stop])
    assert "".join(r.text for r in responses) == text
    assert responses[-1].finish_reason == "length"


def test_earliest_of_several_stop_strings_wins(loaded):
    text = "".join(r.text for r in run(loaded, max_tokens=24))
    early, late = text[5:7], text[14:17]
    assert text.index(early) < text.index(late)
    responses = run(loaded, max_tokens=24, stop=[late, early, ""])  # "" is ignored
    assert "".join(r.text for r in responses) == text[: text.index(early)]


@pytest.mark.parametrize(
    "stops, chunks, expected_out, expected_hit",
    [
        (["END"], ["abcE", "N", "Dxyz"], ["abc", "", ""], [False, False, True]),
        (["END"], ["abcE", "Nx", "yz"], ["abc", "ENx", "yz"], [False, False, False]),
        (["END"], ["abcEN"], ["abcEN"], [False]),  # final: what is held back is released
        (["ab", "b"], ["xab"], ["x"], [True]),
        (["bc", "cd"], ["abcd"], ["a"], [True]),
        (["aaa"], ["a", "a", "b"], ["", "", "aab"], [False, False, False]),
        ([], ["abc"], ["abc"], [False]),
    ],
)
def test_stop_matcher(stops, chunks, expected_out, expected_hit):
    matcher = _StopMatcher(stops)
    outputs, hits = [], []
    for index, chunk in enumerate(chunks):
        out, hit = matcher.feed(chunk, final=index == len(chunks) - 1)
        outputs.append(out)
        hits.append(hit)
    assert (outputs, hits) == (expected_out, expected_hit)


# --- generate vs stream, prompts, context ------------------------------------------------------------


def test_generate_is_the_join_of_the_stream(loaded):
    model, tokenizer = loaded
    assert generate(model, tokenizer, PROMPT, max_tokens=12) == "".join(r.text for r in run(loaded, max_tokens=12))
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=3)
    streamed = "".join(r.text for r in run(loaded, max_tokens=12, sampling=params))
    assert generate(model, tokenizer, PROMPT, max_tokens=12, sampling=params) == streamed
    assert generate(model, tokenizer, PROMPT, max_tokens=12, temperature=0.9, top_p=0.95, seed=3) == streamed


def test_string_and_id_prompts_agree(loaded):
    _, tokenizer = loaded
    ids = tokenizer.encode(PROMPT)
    assert [r.token for r in run(loaded, ids, max_tokens=5)] == [r.token for r in run(loaded, PROMPT, max_tokens=5)]


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt_errors(loaded, prompt):
    model, tokenizer = loaded
    with pytest.raises(FoundryError, match="empty"):
        run(loaded, prompt)
    with pytest.raises(FoundryError, match="empty"):
        generate(model, tokenizer, prompt)


def test_max_tokens_below_one_errors(loaded):
    with pytest.raises(FoundryError, match="max_tokens"):
        run(loaded, max_tokens=0)


def _assert_one_sentence(message: str) -> None:
    assert "\n" not in message and message.endswith(".")
    assert not re.search(r"[.!?]\s+[A-Z]", message), message


def test_prompt_plus_max_tokens_beyond_context(loaded):
    _, tokenizer = loaded
    prompt_length = len(tokenizer.encode(PROMPT))
    max_tokens = CONTEXT - prompt_length + 1
    with pytest.raises(ContextLengthError) as error:
        run(loaded, max_tokens=max_tokens)
    message = str(error.value)
    _assert_one_sentence(message)
    assert str(CONTEXT + 1) in message and str(CONTEXT) in message and str(prompt_length) in message


def test_prompt_plus_max_tokens_exactly_the_context(loaded):
    prompt = list(range(40, 40 + 250)) * 2  # 500 tokens
    responses = run(loaded, prompt, max_tokens=CONTEXT - 500)  # needs every position of the context
    assert responses[-1].finish_reason in ("length", "stop")
    assert len(responses) == CONTEXT - 500 or responses[-1].finish_reason == "stop"


def test_session_turn_beyond_context(loaded):
    model, tokenizer = loaded
    session = Session(model)
    first = [r.token for r in run(loaded, PROMPT, max_tokens=4, session=session)]
    follow_up = tokenizer.encode(PROMPT) + first + list(range(40, 240)) * 2
    with pytest.raises(ContextLengthError):
        run(loaded, follow_up, max_tokens=200, session=session)
    # The session still works, and agrees with a fresh run.
    second = [r.token for r in run(loaded, follow_up[:100], max_tokens=3, session=session)]
    assert second == [r.token for r in run(loaded, follow_up[:100], max_tokens=3)]


# --- chat -----------------------------------------------------------------------------------------------


@pytest.fixture
def spy(loaded, monkeypatch):
    """Records the length of every sequence the model runs (prefill chunks and decode steps)."""
    model, _ = loaded
    lengths: list[int] = []
    original = model.hidden

    def hidden(inputs, cache):
        lengths.append(inputs.shape[1])
        return original(inputs, cache)

    monkeypatch.setattr(model, "hidden", hidden)
    # Eager decode steps, so that each one passes through `hidden` (a compiled step replays a trace).
    monkeypatch.setattr(model, "_decoder", Decoder(model, compiled=False))
    return lengths


def send(chat: Chat, content: str, max_tokens: int = 5) -> list:
    return list(chat.send(content, max_tokens=max_tokens))


def rendered_ids(tokenizer, messages) -> list[int]:
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def test_chat_keeps_history(loaded):
    model, tokenizer = loaded
    chat = Chat(model, tokenizer, system="You are terse.")
    first = send(chat, "hello")
    second = send(chat, "and then?")
    assert chat.messages == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "".join(r.text for r in first)},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "".join(r.text for r in second)},
    ]


def test_chat_prefills_only_the_new_turn(loaded, spy):
    model, tokenizer = loaded
    chat = Chat(model, tokenizer, system="sys")
    send(chat, "hello", max_tokens=5)
    cached = list(chat.session.tokens)
    first_prompt = rendered_ids(tokenizer, chat.messages[:2])
    assert cached[: len(first_prompt)] == first_prompt
    assert len(cached) == len(first_prompt) + 4  # the last generated token is never fed back

    spy.clear()
    history = chat.messages + [{"role": "user", "content": "tell me more"}]
    second_prompt = rendered_ids(tokenizer, history)
    new_tokens = len(second_prompt) - common_prefix(second_prompt, cached)
    responses = send(chat, "tell me more", max_tokens=3)
    assert common_prefix(second_prompt, cached) >= len(first_prompt)  # the first turn's prompt is reused
    assert responses[0].prompt_tokens == new_tokens < len(second_prompt)
    assert spy == [new_tokens, 1, 1]  # one prefill of the new tokens, then one token per step
    assert all(c.offset == len(chat.session.tokens) for c in chat.session.cache)
    # Same tokens as a fresh run on the whole rendered conversation.
    fresh = run(loaded, second_prompt, max_tokens=3)
    assert [r.token for r in responses] == [r.token for r in fresh]


def test_chat_reset(loaded):
    model, tokenizer = loaded
    chat = Chat(model, tokenizer, system="sys")
    send(chat, "hello")
    send(chat, "again")
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "sys"}]
    assert chat.session.tokens == [] and chat.session.cache[0].offset == 0
    after_reset = send(chat, "hello")
    fresh = send(Chat(model, tokenizer, system="sys"), "hello")
    assert [r.token for r in after_reset] == [r.token for r in fresh]
    assert after_reset[0].prompt_tokens == len(rendered_ids(tokenizer, chat.messages[:2]))


@pytest.mark.parametrize("how", ["close", "keyboard-interrupt"])
def test_interrupted_turn_leaves_no_half_message(loaded, how):
    model, tokenizer = loaded
    chat = Chat(model, tokenizer)
    send(chat, "hello")
    before = [dict(m) for m in chat.messages]
    stream = chat.send("a question that gets interrupted", max_tokens=20)
    next(stream)
    next(stream)
    if how == "close":
        stream.close()
    else:
        with pytest.raises(KeyboardInterrupt):
            stream.throw(KeyboardInterrupt)
    assert chat.messages == before
    # The next turn is what a fresh chat with the same history would say (the stale tail of the
    # interrupted turn in the KV cache is not used).
    after = send(chat, "next")
    fresh_chat = Chat(model, tokenizer)
    fresh_chat.messages = [dict(m) for m in before]
    assert [r.token for r in after] == [r.token for r in send(fresh_chat, "next")]


def test_failed_turn_leaves_no_half_message(loaded):
    model, tokenizer = loaded
    chat = Chat(model, tokenizer)
    send(chat, "hello")
    before = [dict(m) for m in chat.messages]
    with pytest.raises(ContextLengthError):
        send(chat, "x", max_tokens=CONTEXT)
    assert chat.messages == before


def test_turn_is_kept_when_the_caller_stops_after_the_final_response(loaded):
    model, tokenizer = loaded
    chat = Chat(model, tokenizer)
    reply = ""
    for response in chat.send("hello", max_tokens=4):
        reply += response.text
        if response.finish_reason is not None:
            break  # a natural way to consume a stream; the turn is complete
    assert chat.messages == [{"role": "user", "content": "hello"}, {"role": "assistant", "content": reply}]


def test_template_failure_leaves_no_half_message(loaded, tiny):
    model, tokenizer = loaded
    metadata = dict(GGUFFile(tiny.path).metadata)
    metadata["tokenizer.chat_template"] = (
        "{% if messages|length > 2 %}{{ raise_exception('only one exchange') }}{% endif %}"
        + metadata["tokenizer.chat_template"]
    )
    chat = Chat(model, Tokenizer.from_gguf_metadata(metadata))
    send(chat, "hello")
    before = [dict(m) for m in chat.messages]
    with pytest.raises(FoundryError, match="only one exchange"):
        send(chat, "again")
    assert chat.messages == before
