"""Gemma 3 (SentencePiece) and SmolLM2 (byte-level BPE, `smollm` pre-tokenizer) tokenizers on the
real GGUF files against transformers reading the same files (scripts/make_tokenizer_reference.py
--name gemma3|smollm2): ids, decoding, chat templates (Gemma's file has none: both sides render the
built-in `gemma` template), and streaming detokenization."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from foundry_mlx import sources
from foundry_mlx.errors import FoundryError
from foundry_mlx.formats.gguf import GGUFFile
from foundry_mlx.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data"
CORPUS = json.loads((DATA / "tokenizer_corpus.json").read_text(encoding="utf-8"))
FAMILIES = {"gemma3": ("gemma3-270m", "gemma"), "smollm2": ("smollm2-135m", None)}
REFERENCES = {
    name: json.loads((DATA / f"tokenizer_reference_{name}.json").read_text(encoding="utf-8")) for name in FAMILIES
}


@pytest.fixture(scope="session")
def family_tokenizers() -> dict[str, Tokenizer]:
    loaded = {}
    for name, (alias, template) in FAMILIES.items():
        path = sources.resolve(alias)
        assert REFERENCES[name]["gguf_sha256"] == sources.ALIASES[alias].sha256
        tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)
        if template is not None:
            assert tokenizer.chat_template is None  # the base model's file has none
            tokenizer.set_chat_template(template)
        loaded[name] = tokenizer
    return loaded


def _cases(section: str) -> Any:
    items = [(name, item) for name, reference in REFERENCES.items() for item in reference[section]]
    return pytest.mark.parametrize(("family", "item"), items, ids=[f"{n}-{i['name']}" for n, i in items])


def test_references_cover_the_corpus_and_special_tokens() -> None:
    for reference in REFERENCES.values():
        names = [e["name"] for e in reference["entries"]]
        assert names[: len(CORPUS)] == [e["name"] for e in CORPUS]
        assert "model_special_tokens" in names


@_cases("entries")
def test_encode_and_decode_match_reference(family_tokenizers, family: str, item: dict[str, Any]) -> None:
    tokenizer = family_tokenizers[family]
    assert tokenizer.encode(item["text"]) == item["ids"]
    assert tokenizer.decode(item["ids"]) == item["decoded"]
    assert tokenizer.decode(item["ids"], skip_special_tokens=True) == item["decoded_skip_special"]


@_cases("entries")
def test_streaming_concatenates_to_decode(family_tokenizers, family: str, item: dict[str, Any]) -> None:
    tokenizer = family_tokenizers[family]
    detokenizer = tokenizer.detokenizer()
    pieces = [detokenizer.add(token) for token in item["ids"]]
    pieces.append(detokenizer.flush())
    assert "".join(pieces) == item["decoded"]
    assert all("\ufffd" not in piece for piece in pieces) or "\ufffd" in item["decoded"]


@_cases("chats")
def test_chat_template_matches_reference(family_tokenizers, family: str, item: dict[str, Any]) -> None:
    tokenizer = family_tokenizers[family]
    if "refused" in item:
        with pytest.raises(FoundryError, match="refused"):
            tokenizer.apply_chat_template(item["messages"], **item["options"])
        return
    assert tokenizer.apply_chat_template(item["messages"], **item["options"]) == item["prompt"]
    assert tokenizer.apply_chat_template(item["messages"], tokenize=True, **item["options"]) == item["ids"]


def test_gemma_facts(family_tokenizers) -> None:
    gemma = family_tokenizers["gemma3"]
    assert gemma.encode("Hi")[0] == gemma.bos_token_id == 2  # the file asks for BOS
    assert gemma.token_to_id("<end_of_turn>") in gemma.eos_token_ids
    assert gemma.suggested_chat_template() == "gemma"
    # byte fallback: a character outside the vocabulary becomes its UTF-8 bytes, and back
    text = "\U0001d11e\U000e0100"
    assert gemma.decode(gemma.encode(text, add_special_tokens=False)) == text


def test_gemma_streaming_holds_back_partial_bytes(family_tokenizers) -> None:
    gemma = family_tokenizers["gemma3"]
    ids = gemma.encode("\U000e0100", add_special_tokens=False)  # a rare character: byte tokens
    assert len(ids) == 4 and all(gemma.id_to_token(i).startswith("<0x") for i in ids)
    detokenizer = gemma.detokenizer()
    assert [detokenizer.add(i) for i in ids] == ["", "", "", "\U000e0100"]


def test_smollm_facts(family_tokenizers) -> None:
    smollm = family_tokenizers["smollm2"]
    assert smollm.encode("Hi") == smollm.encode("Hi", add_special_tokens=False)  # no BOS
    assert smollm.token_to_id("<|im_end|>") in smollm.eos_token_ids
    # llama.cpp's `smollm` pre-tokenizer splits digits one by one
    assert [smollm.decode([i]) for i in smollm.encode("12345")] == list("12345")
