"""SentencePiece vocabularies in a GGUF (`tokenizer.ggml.model = llama`) as a `tokenizers` BPE.

A SentencePiece GGUF stores pieces spelled with `▁` for a space, a score per piece, byte pieces
`<0x00>`…`<0xFF>` for byte fallback, and no merges. It is rebuilt here as transformers'
GGUF loader rebuilds it (`integrations/gguf/gguf_tokenizer_mapping.py`, transformers 5.x), so the
ids match the reference this engine is tested against:

* a BPE model with byte fallback whose merges are recovered from the vocabulary: every split of a
  piece into two pieces that are both in the vocabulary is a merge, ranked by the piece's score
  (transformers' `generate_merges`). Gemma's scores do not follow its merge order, so Gemma ranks
  by position in the file instead;
* Gemma: spaces become `▁` in a normalizer, no prefix space, and pieces made only of spaces
  (stored as real spaces) are respelled with `▁`. Other families (Llama 2, Mistral): a
  `Metaspace` pre-tokenizer that adds the prefix space the file's `add_space_prefix` asks for;
* control pieces are special added tokens and user-defined pieces (Gemma's `\\n\\n`, `<b>`)
  plain added tokens, matched whole in the text as llama.cpp does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from ..errors import ModelFormatError

TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4
SPACE = "\u2581"
_GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")


def generate_merges(vocab: Mapping[str, int], ranks: Mapping[str, float]) -> list[tuple[str, str]]:
    """Every (left, right) split of a piece into two vocabulary pieces, best-ranked piece first
    (ties: longer left, then longer right part first), as transformers orders them."""
    merges = []
    for piece, rank in ranks.items():
        local = [
            (piece[:cut], piece[cut:], rank)
            for cut in range(1, len(piece))
            if piece[:cut] in vocab and piece[cut:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def build_sentencepiece(
    metadata: Mapping[str, Any], tokens: Sequence[str], token_types: Sequence[int]
) -> tuple[BackendTokenizer, dict[str, int]]:
    """The backend tokenizer for a SentencePiece GGUF, and its vocabulary (piece → id)."""
    gemma = metadata.get("general.architecture") in _GEMMA_ARCHITECTURES
    if gemma:
        tokens = [SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks: Mapping[str, float] = {token: -index for index, token in enumerate(tokens)}
    else:
        scores = metadata.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != len(tokens):
            raise ModelFormatError(
                "The GGUF's SentencePiece vocabulary has no valid tokenizer.ggml.scores (one per token); "
                "re-convert the model with a current llama.cpp."
            )
        ranks = dict(zip(tokens, scores))
    vocab = {token: index for index, token in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else "<unk>"
    model = models.BPE(
        vocab=vocab, merges=generate_merges(vocab, ranks), fuse_unk=True, unk_token=unk, byte_fallback=True
    )
    backend = BackendTokenizer(model)
    decoding = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        backend.normalizer = normalizers.Replace(" ", SPACE)
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPACE, prepend_scheme="first" if prefix else "never", split=False
        )
        if prefix:
            decoding.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(decoding)
    backend.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, token_types)
            if kind == TOKEN_TYPE_CONTROL
        ]
    )
    backend.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, kind in zip(metadata["tokenizer.ggml.tokens"], token_types)
            if kind == TOKEN_TYPE_USER_DEFINED and token in vocab
        ]
    )
    return backend, vocab
