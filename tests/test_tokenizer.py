"""Tokenizer tests: the Qwen GGUF against transformers' reference, plus a tiny synthetic vocabulary.

tests/data/tokenizer_reference.json is written by scripts/make_tokenizer_reference.py from
transformers reading the same GGUF (that needs torch, so it is not re-run here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from foundry_mlx.errors import FoundryError, ModelFormatError
from foundry_mlx.formats.gguf import GGUFFile
from foundry_mlx.tokenizer import StreamingDetokenizer, Tokenizer

DATA = Path(__file__).parent / "data"
CORPUS = json.loads((DATA / "tokenizer_corpus.json").read_text(encoding="utf-8"))
REFERENCE = json.loads((DATA / "tokenizer_reference.json").read_text(encoding="utf-8"))
ENTRIES = REFERENCE["entries"]
CHATS = REFERENCE["chats"]


@pytest.fixture(scope="module")
def qwen_tokenizer(qwen_gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(GGUFFile(qwen_gguf_path).metadata)


def _by_name(items: list[dict[str, Any]]) -> Any:
    return pytest.mark.parametrize("item", items, ids=[item["name"] for item in items])


# --- the real model against the reference -------------------------------------------------------


def test_reference_matches_corpus() -> None:
    # A corpus edit without re-running the script would silently test stale data.
    assert [(e["name"], e["text"]) for e in ENTRIES] == [(e["name"], e["text"]) for e in CORPUS]
    assert len(ENTRIES) >= 40


@_by_name(ENTRIES)
def test_encode_matches_reference(qwen_tokenizer: Tokenizer, item: dict[str, Any]) -> None:
    assert qwen_tokenizer.encode(item["text"]) == item["ids"]


@_by_name(ENTRIES)
def test_decode_matches_reference(qwen_tokenizer: Tokenizer, item: dict[str, Any]) -> None:
    assert qwen_tokenizer.decode(item["ids"]) == item["decoded"]
    skipped = qwen_tokenizer.decode(item["ids"], skip_special_tokens=True)
    assert skipped == item["decoded_skip_special"]


@_by_name(CHATS)
def test_chat_template_matches_reference(qwen_tokenizer: Tokenizer, item: dict[str, Any]) -> None:
    prompt = qwen_tokenizer.apply_chat_template(item["messages"], **item["options"])
    assert prompt == item["prompt"]
    ids = qwen_tokenizer.apply_chat_template(item["messages"], tokenize=True, **item["options"])
    assert ids == item["ids"]


def test_special_token_facts(qwen_tokenizer: Tokenizer) -> None:
    assert qwen_tokenizer.vocab_size == 151936
    assert qwen_tokenizer.bos_token_id == 151643
    assert qwen_tokenizer.eos_token_ids == frozenset({151645, 151643})  # <|im_end|>, <|endoftext|>
    assert qwen_tokenizer.add_bos_token is False
    assert qwen_tokenizer.token_to_id("<|im_start|>") == 151644
    assert qwen_tokenizer.id_to_token(151645) == "<|im_end|>"
    assert qwen_tokenizer.id_to_token(14990) == "hello"
    assert qwen_tokenizer.token_to_id("no such token") is None
    # Literal special tokens in the text are single ids (as llama.cpp and transformers do).
    assert qwen_tokenizer.encode("<|im_start|>user") == [151644, 872]


# --- streaming detokenizer ----------------------------------------------------------------------


def _stream(detokenizer: StreamingDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.add(token) for token in ids] + [detokenizer.flush()]


@_by_name(ENTRIES)
def test_streaming_concatenates_to_decode(qwen_tokenizer: Tokenizer, item: dict[str, Any]) -> None:
    ids = item["ids"]
    for detokenizer in (
        qwen_tokenizer.detokenizer(),
        # The windowed mode that non-byte-level decoders get, tried on the same ids.
        StreamingDetokenizer(None, qwen_tokenizer.decode),
    ):
        pieces = _stream(detokenizer, ids)
        assert not any("\ufffd" in piece for piece in pieces)
        assert "".join(pieces) == qwen_tokenizer.decode(ids)
        assert detokenizer.text == qwen_tokenizer.decode(ids)


def test_streaming_holds_back_incomplete_emoji(qwen_tokenizer: Tokenizer) -> None:
    ids = qwen_tokenizer.encode("🫠")  # one code point, four UTF-8 bytes, three byte tokens
    assert len(ids) == 3
    windowed = StreamingDetokenizer(None, qwen_tokenizer.decode)
    for detokenizer in (qwen_tokenizer.detokenizer(), windowed):
        assert [detokenizer.add(token) for token in ids] == ["", "", "🫠"]
        assert detokenizer.flush() == ""

    # " 👩" is two tokens: b" \xf0\x9f\x91" and b"\xa9"; the space need not wait.
    detokenizer = qwen_tokenizer.detokenizer()
    assert [detokenizer.add(token) for token in qwen_tokenizer.encode(" 👩")] == [" ", "👩"]

    detokenizer = qwen_tokenizer.detokenizer()
    assert detokenizer.add(qwen_tokenizer.encode("hi")[0]) == "hi"
    assert detokenizer.add(ids[0]) == ""
    assert detokenizer.flush() == "\ufffd"  # bytes that never completed
    assert detokenizer.text == "hi\ufffd"


def test_streaming_can_skip_special_tokens(qwen_tokenizer: Tokenizer) -> None:
    ids = qwen_tokenizer.encode("<|im_start|>assistant\nok<|im_end|>")
    detokenizer = qwen_tokenizer.detokenizer(skip_special_tokens=True)
    assert "".join(_stream(detokenizer, ids)) == "assistant\nok"


# --- save / from_directory ----------------------------------------------------------------------


def test_save_and_from_directory_round_trip(qwen_tokenizer: Tokenizer, tmp_path: Path) -> None:
    qwen_tokenizer.save(tmp_path)
    loaded = Tokenizer.from_directory(tmp_path)
    for entry in ENTRIES:
        assert loaded.encode(entry["text"]) == entry["ids"], entry["name"]
        assert loaded.decode(entry["ids"]) == entry["decoded"], entry["name"]
    assert loaded.chat_template == qwen_tokenizer.chat_template
    assert loaded.eos_token_ids == qwen_tokenizer.eos_token_ids
    assert loaded.bos_token_id == qwen_tokenizer.bos_token_id
    assert loaded.add_bos_token is False
    chat = CHATS[2]
    assert loaded.apply_chat_template(chat["messages"], **chat["options"]) == chat["prompt"]


def test_saved_directory_loads_in_transformers(qwen_tokenizer: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    qwen_tokenizer.save(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for entry in ENTRIES:
        assert reference(entry["text"])["input_ids"] == entry["ids"], entry["name"]
        assert reference.decode(entry["ids"]) == entry["decoded"], entry["name"]
    for chat in CHATS:
        messages, options = chat["messages"], chat["options"]
        rendered = reference.apply_chat_template(messages, tokenize=False, **options)
        assert rendered == chat["prompt"], chat["name"]


def test_saved_directory_loads_in_mlx_lm(qwen_tokenizer: Tokenizer, tmp_path: Path) -> None:
    tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")
    qwen_tokenizer.save(tmp_path)
    wrapper = tokenizer_utils.load(tmp_path)
    for entry in ENTRIES:
        assert wrapper.encode(entry["text"]) == entry["ids"], entry["name"]
    assert qwen_tokenizer.eos_token_id in wrapper.eos_token_ids
    detokenizer = wrapper.detokenizer
    for token in CHATS[4]["ids"]:
        detokenizer.add_token(token)
    detokenizer.finalize()
    assert detokenizer.text == qwen_tokenizer.decode(CHATS[4]["ids"])


def test_from_directory_without_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(ModelFormatError, match="tokenizer.json"):
        Tokenizer.from_directory(tmp_path)


# --- a tiny synthetic vocabulary ----------------------------------------------------------------

TINY_TOKENS = [
    "<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>",  # 0-2: control
    "H", "e", "l", "o", "Ġ", "w", "r", "d", "1", "2", "3", "4", "5", "'", "s",  # 3-17
    "He", "ll", "Hell", "Hello", "12", "123", "45",  # 18-24: reachable by merges
    "Ġworld",  # 25: in the vocabulary but no merge builds it
    "'s", "<think>",  # 26, 27 (user-defined)
]
TINY_TYPES = [3, 3, 3] + [1] * 24 + [4]
TINY_MERGES = ["H e", "l l", "He ll", "Hell o", "1 2", "12 3", "4 5", "' s"]
TINY_TEXT = "Hello world's 12345<|eot_id|>"


def tiny_metadata(pre: str | None = "llama-bpe", **extra: Any) -> dict[str, Any]:
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": TINY_TOKENS,
        "tokenizer.ggml.token_type": TINY_TYPES,
        "tokenizer.ggml.merges": TINY_MERGES,
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
        **extra,
    }
    if pre is not None:
        metadata["tokenizer.ggml.pre"] = pre
    return metadata


def tiny(template: str | None = None, **extra: Any) -> Tokenizer:
    if template is not None:
        extra["tokenizer.chat_template"] = template
    return Tokenizer.from_gguf_metadata(tiny_metadata(**extra))


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        # Llama 3: BOS by default, digits in threes, a whole-word vocabulary entry taken as is.
        ("llama-bpe", [0, 21, 25, 26, 7, 23, 24, 1]),
        ("llama3", [0, 21, 25, 26, 7, 23, 24, 1]),
        # Same regex without ignore_merges: " world" is built from pieces.
        ("dbrx", [21, 7, 8, 6, 9, 5, 10, 26, 7, 23, 24, 1]),
        # Qwen 2: digits one at a time, no BOS.
        ("qwen2", [21, 7, 8, 6, 9, 5, 10, 26, 7, 11, 12, 13, 14, 15, 1]),
        # GPT-2: the space joins the number (" 12345").
        ("gpt-2", [21, 7, 8, 6, 9, 5, 10, 26, 7, 23, 24, 1]),
        ("smollm", [21, 7, 8, 6, 9, 5, 10, 26, 7, 11, 12, 13, 14, 15, 1]),
    ],
)
def test_tiny_vocabulary_pre_tokenizers(pre: str, expected: list[int]) -> None:
    tokenizer = tiny(pre=pre)
    assert tokenizer.encode(TINY_TEXT) == expected
    bos_text = "<|begin_of_text|>" if expected[0] == 0 else ""
    assert tokenizer.decode(expected) == bos_text + TINY_TEXT


def test_tiny_llama3_details() -> None:
    tokenizer = tiny()
    assert tokenizer.add_bos_token is True
    assert tokenizer.encode("Hello", add_special_tokens=False) == [21]
    assert tokenizer.encode("HE'S", add_special_tokens=False)[-1:] != [26]  # 'S is not 's
    assert tokenizer.encode("<think>Hello") == [0, 27, 21]  # user-defined: matched whole
    assert tokenizer.decode([0, 27, 21], skip_special_tokens=True) == "<think>Hello"
    assert tokenizer.eos_token_ids == frozenset({1, 2})  # eos plus <|end_of_text|> by name
    # The file's flag wins over the pre-tokenizer's default.
    assert tiny(**{"tokenizer.ggml.add_bos_token": False}).encode("Hello") == [21]


def test_tiny_llama3_round_trips_through_save(tmp_path: Path) -> None:
    tokenizer = tiny(template="{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    tokenizer.save(tmp_path)
    loaded = Tokenizer.from_directory(tmp_path)
    assert loaded.encode(TINY_TEXT) == tokenizer.encode(TINY_TEXT) == [0, 21, 25, 26, 7, 23, 24, 1]
    assert loaded.add_bos_token is True
    messages = [{"role": "user", "content": "Hello"}]
    assert loaded.apply_chat_template(messages) == "<|begin_of_text|>Hello"
    assert loaded.apply_chat_template(messages, tokenize=True) == [0, 21]

    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert reference(TINY_TEXT)["input_ids"] == [0, 21, 25, 26, 7, 23, 24, 1]


def test_missing_pre_falls_back_to_default() -> None:
    # llama.cpp's default splits punctuation runs and numbers apart, like this.
    assert tiny(pre=None).encode("Hello 12345") == [21, 7, 23, 24]


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        (tiny_metadata(pre="made-up-pre"), r"'made-up-pre'.*supported:.*llama-bpe.*qwen2"),
        (tiny_metadata(**{"tokenizer.ggml.model": "llama"}), r"SentencePiece.*tokenizer.ggml.scores"),
        (tiny_metadata(**{"tokenizer.ggml.model": "t5"}), r"'t5'.*gpt2.*llama \(SentencePiece\)"),
        ({"general.architecture": "qwen2"}, r"no tokenizer"),
        (tiny_metadata(**{"tokenizer.ggml.merges": ["H e", "x y"]}), r"merges do not match"),
        (tiny_metadata(**{"tokenizer.ggml.token_type": [1]}), r"token types"),
        (tiny_metadata(**{"tokenizer.ggml.eos_token_id": 999}), r"eos_token_id"),
    ],
)
def test_unsupported_or_corrupt_metadata(metadata: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelFormatError, match=message):
        Tokenizer.from_gguf_metadata(metadata)


# --- chat template sandbox ----------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ lipsum.__globals__['os'].popen('id').read() }}",
        "{{ raise_exception.__globals__ }}",
        "{{ self.__init__.__globals__ }}",
        "{{ messages.append(1) }}",
        "{% set ns = namespace() %}{% set ns._hidden = 1 %}",
        "{{ '{0.__class__}'.format('') }}",
    ],
)
def test_template_cannot_reach_python_internals(template: str) -> None:
    with pytest.raises(FoundryError, match="unsafe|may not start"):
        tiny(template).apply_chat_template(MESSAGES)


@pytest.mark.parametrize(
    "template", ["{% include '/etc/passwd' %}", "{% import 'os' as os %}", "{% extends 'x' %}"]
)
def test_template_cannot_load_files(template: str) -> None:
    with pytest.raises(FoundryError, match="load another template or file"):
        tiny(template).apply_chat_template(MESSAGES)


def test_template_sees_only_plain_data() -> None:
    # A rich object's public methods are out of the sandbox's sight; the template gets a
    # placeholder string instead of the object.
    class Exporter:
        called = False

        def export(self) -> str:
            Exporter.called = True
            return "exported"

    tokenizer = tiny("{{ messages[0].content }}|{{ extra }}")
    messages = [{"role": "user", "content": Exporter()}]
    assert tokenizer.apply_chat_template(messages, extra=Exporter()) == "<Exporter>|<Exporter>"
    with pytest.raises(FoundryError):
        tiny("{{ messages[0].content.export() }}").apply_chat_template(messages)
    assert not Exporter.called


def test_template_syntax_error() -> None:
    with pytest.raises(FoundryError, match="not valid Jinja"):
        tiny("{% for m in messages %}{{ m.content }").apply_chat_template(MESSAGES)


def test_template_raise_exception() -> None:
    template = (
        "{% if messages[0].role != 'system' %}{{ raise_exception('need a system') }}{% endif %}"
    )
    with pytest.raises(FoundryError, match="need a system"):
        tiny(template).apply_chat_template(MESSAGES)


def test_no_template() -> None:
    with pytest.raises(FoundryError, match="no chat template.*generate"):
        tiny().apply_chat_template(MESSAGES)


def test_template_features_transformers_provides() -> None:
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{{ m | tojson }}{% generation %}|{{ eos_token }}{% endgeneration %}{% endfor %}"
        "{{ strftime_now('%Y')|length }}{{ extra }}"
    )
    messages = [{"role": "user", "content": "é <b>", "tool_calls": None}, MESSAGES[0]]
    rendered = tiny(template).apply_chat_template(messages, extra="!")
    # tojson keeps non-ASCII and HTML characters; None-valued keys are dropped.
    assert rendered == '{"role": "user", "content": "é <b>"}|<|eot_id|>4!'


def test_template_whitespace_control_like_transformers() -> None:
    # trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before it;
    # a template ending in a newline loses it (transformers rendered this exact string).
    template = (
        "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n"
        "    {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}\n  <gen>\n{% endif %}\n"
    )
    messages = [MESSAGES[0], {"role": "assistant", "content": "x"}]
    assert tiny(template).apply_chat_template(messages) == "[Hello]\n  <gen>\n"
    assert tiny(template).apply_chat_template(messages, add_generation_prompt=False) == "[Hello]\n"
