"""SentencePiece GGUF vocabularies (`tokenizer.ggml.model = llama`) on tiny hand-made metadata:
merges recovered from the vocabulary, byte fallback, the `▁` space convention for Llama-style
(prefix space from `add_space_prefix`) and Gemma-style (normalizer, no prefix) files, BOS, and
streaming over byte tokens. The real Gemma 3 file is compared with transformers in
test_tokenizer_families.py."""

from __future__ import annotations

from typing import Any

import pytest

from foundry_mlx.errors import ModelFormatError
from foundry_mlx.tokenizer import Tokenizer
from foundry_mlx.tokenizer.sentencepiece import generate_merges

SPECIAL = ["<unk>", "<s>", "</s>"]
BYTES = [f"<0x{b:02X}>" for b in range(256)]
PIECES = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "▁wor", "▁world",
          "ld", "▁▁"]


def metadata(architecture: str = "llama", **extra: Any) -> dict[str, Any]:
    tokens = SPECIAL + BYTES + PIECES
    scores = [0.0] * len(SPECIAL + BYTES) + [-float(i) for i in range(len(PIECES))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(PIECES)
    values = {
        "general.architecture": architecture,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    values.update(extra)
    return values


def pieces(tokenizer: Tokenizer, text: str, **kwargs: Any) -> list[str]:
    return [tokenizer.id_to_token(i) for i in tokenizer.encode(text, **kwargs)]


def test_generate_merges_orders_by_rank_then_length() -> None:
    vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "bb": 4}
    merges = generate_merges(vocab, {"ab": -1.0, "abb": -3.0, "bb": -2.0, "a": 0.0, "b": 0.0})
    assert merges == [("a", "b"), ("b", "b"), ("ab", "b"), ("a", "bb")]


def test_llama_style_adds_a_prefix_space_and_bos() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(metadata())
    assert pieces(tokenizer, "hello world") == ["<s>", "▁hello", "▁world"]
    assert tokenizer.decode(tokenizer.encode("hello world")) == "<s> hello world"
    assert tokenizer.decode(tokenizer.encode("hello world"), skip_special_tokens=True) == "hello world"


def test_no_prefix_space_when_the_file_says_so() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(metadata(**{"tokenizer.ggml.add_space_prefix": False}))
    assert pieces(tokenizer, "hello world", add_special_tokens=False) == ["hello", "▁world"]


def test_byte_fallback_and_utf8_safe_streaming() -> None:
    tokenizer = Tokenizer.from_gguf_metadata(metadata(**{"tokenizer.ggml.add_bos_token": False}))
    ids = tokenizer.encode("hé", add_special_tokens=False)
    assert [tokenizer.id_to_token(i) for i in ids] == ["▁", "h", "<0xC3>", "<0xA9>"]
    assert tokenizer.decode(ids) == "hé"
    detokenizer = tokenizer.detokenizer()
    assert [detokenizer.add(i) for i in ids] + [detokenizer.flush()] == ["", "h", "", "é", ""]


def test_gemma_style_spaces_become_pieces_without_a_prefix() -> None:
    spaces = metadata("gemma3", **{"tokenizer.ggml.add_bos_token": True})
    spaces["tokenizer.ggml.tokens"] = [("  " if t == "▁▁" else t) for t in spaces["tokenizer.ggml.tokens"]]
    tokenizer = Tokenizer.from_gguf_metadata(spaces)
    # Gemma ranks merges by position in the file: "▁world" (earlier) wins over "▁▁" (last).
    assert pieces(tokenizer, "hello  world") == ["<s>", "hello", "▁", "▁world"]
    assert pieces(tokenizer, "hello  ") == ["<s>", "hello", "▁▁"]  # the file's "  " is respelled
    assert tokenizer.decode(tokenizer.encode("hello  world"), skip_special_tokens=True) == "hello  world"


def test_scores_are_required_outside_gemma() -> None:
    broken = metadata()
    broken.pop("tokenizer.ggml.scores")
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.scores"):
        Tokenizer.from_gguf_metadata(broken)
