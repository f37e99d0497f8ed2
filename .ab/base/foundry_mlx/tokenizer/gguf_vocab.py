"""Turn a GGUF file's `tokenizer.ggml.*` metadata into a `tokenizers` (Rust) tokenizer.

A GGUF carries no `tokenizer.json`: it stores the vocabulary, the merges, a token type per token
and the *name* of the pre-tokenizer (`tokenizer.ggml.pre`). The split regexes below are the ones
llama.cpp's `llama-vocab.cpp` uses for each name (written in the `(?i:...)` form of the original
`tokenizer.json`, which the Rust regex engine supports), so the pieces BPE sees are the ones the
model was trained on. transformers' `integrations/gguf/gguf_tokenizer_mapping.py` builds the same
pipeline: `Split(regex, isolated)` steps, then `ByteLevel` without its own regex.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from ..errors import ModelFormatError
from .sentencepiece import build_sentencepiece

# llama.cpp's token types (enum llama_token_type).
TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Names of end-of-turn tokens that llama.cpp and mlx_lm also stop on, besides the file's eos id.
END_OF_TURN_NAMES = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end_of_text|>",
    "<|end|>",
    "<end_of_turn>",
)

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Like Llama 3 but digits one at a time.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen 3.5 keeps combining marks with their letters.
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How one `tokenizer.ggml.pre` value splits text, and llama.cpp's defaults that go with it."""

    # Applied in order, each one splitting the pieces the previous left (llama.cpp's
    # `unicode_regex_split` keeps both the matches and the text between them, as `isolated` does).
    splits: tuple[str, ...]
    # A piece that is already a whole vocabulary entry is taken as is (Llama 3's tokenizer.json).
    ignore_merges: bool = False
    # Whether BOS is added when the file has no `tokenizer.ggml.add_bos_token`.
    add_bos: bool = False


_SPECS = {
    "default": PreTokenizerSpec(
        (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")
    ),
    "llama3": PreTokenizerSpec((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True),
    "dbrx": PreTokenizerSpec((_LLAMA3_SPLIT,)),
    "qwen2": PreTokenizerSpec((_QWEN2_SPLIT,)),
    "qwen35": PreTokenizerSpec((_QWEN35_SPLIT,)),
    "gpt2": PreTokenizerSpec((_GPT2_SPLIT,)),
    "smollm": PreTokenizerSpec((r"\p{N}", _GPT2_SPLIT)),
}

# `tokenizer.ggml.pre` value → spec, grouped as llama.cpp groups them.
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": _SPECS["default"],
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2", "jina-v5-nano"),
        _SPECS["llama3"],
    ),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _SPECS["dbrx"]),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "stablelm2"), _SPECS["qwen2"]
    ),
    "qwen35": _SPECS["qwen35"],
    **dict.fromkeys(
        ("gpt-2", "phi-2", "mpt", "olmo", "mellum", "gigachat", "exaone4"), _SPECS["gpt2"]
    ),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"), _SPECS["smollm"]
    ),
}

SUPPORTED_MODELS = ("gpt2", "llama")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table that byte-level vocabularies are spelled in."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\u00a1"), ord("\u00ac") + 1),
        *range(ord("\u00ae"), ord("\u00ff") + 1),
    ]
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


BYTE_TO_UNICODE = bytes_to_unicode()
UNICODE_TO_BYTE = {character: byte for byte, character in BYTE_TO_UNICODE.items()}
# A token with any character outside the table is not byte-level spelled (a C-speed check).
_NOT_BYTE_LEVEL = re.compile(
    "[^" + "".join(re.escape(character) for character in BYTE_TO_UNICODE.values()) + "]"
)


@dataclass
class GGUFTokenizerParts:
    """What `build_from_gguf` returns: the backend plus the facts the `Tokenizer` keeps."""

    backend: BackendTokenizer
    vocab_size: int
    bos_token_id: int | None
    eos_token_id: int | None
    eos_token_ids: frozenset[int]
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None


def _token_id(metadata: Mapping[str, Any], key: str, vocab_size: int) -> int | None:
    value = metadata.get(f"tokenizer.ggml.{key}")
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ModelFormatError(
            f"tokenizer.ggml.{key} is {value!r}, not a token id below {vocab_size}; "
            "the GGUF file is corrupt: re-convert or download it again."
        )
    return value


def _string_list(metadata: Mapping[str, Any], key: str) -> list[str]:
    value = metadata.get(key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ModelFormatError(
            f"The GGUF file has no valid {key} (a list of strings); "
            "re-convert the model with a current llama.cpp."
        )
    return value


def build_from_gguf(metadata: Mapping[str, Any]) -> GGUFTokenizerParts:
    """Build the backend tokenizer a GGUF's metadata describes, or raise `ModelFormatError`."""
    model_type = metadata.get("tokenizer.ggml.model")
    if model_type is None:
        raise ModelFormatError(
            "The GGUF file has no tokenizer (tokenizer.ggml.model is missing); "
            "use a GGUF converted with its tokenizer."
        )
    if model_type not in SUPPORTED_MODELS:
        raise ModelFormatError(
            f"Tokenizer type tokenizer.ggml.model = {model_type!r} is not supported; supported: gpt2 "
            "(byte-level BPE) and llama (SentencePiece): use a model with one of these."
        )
    # llama.cpp also falls back to "default" when the name is missing (and warns).
    pre = metadata.get("tokenizer.ggml.pre") or "default"
    spec = PRE_TOKENIZERS.get(pre)
    if model_type == "llama":  # SentencePiece: no split regex; BOS unless the file says otherwise
        spec = PreTokenizerSpec((), add_bos=True)
    if spec is None:
        raise ModelFormatError(
            f"Pre-tokenizer tokenizer.ggml.pre = {pre!r} is not supported; supported: "
            f"{', '.join(sorted(PRE_TOKENIZERS))}: use a model with one of these."
        )

    tokens = _string_list(metadata, "tokenizer.ggml.tokens")
    vocab_size = len(tokens)
    token_types = metadata.get("tokenizer.ggml.token_type") or [TOKEN_TYPE_NORMAL] * vocab_size
    if len(token_types) != vocab_size:
        raise ModelFormatError(
            f"The GGUF file lists {vocab_size} tokens but {len(token_types)} token types; "
            "it is corrupt: re-convert or download it again."
        )

    if model_type == "llama":
        backend, vocab = build_sentencepiece(metadata, tokens, token_types)
    else:
        backend, vocab = _byte_level_backend(metadata, tokens, token_types, spec)

    bos = _token_id(metadata, "bos_token_id", vocab_size)
    eos = _token_id(metadata, "eos_token_id", vocab_size)
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", spec.add_bos))
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    if (add_bos and bos is None) or (add_eos and eos is None):
        raise ModelFormatError(
            "The GGUF file asks to add a BOS/EOS token but does not say which one "
            "(tokenizer.ggml.bos_token_id / eos_token_id); re-convert the model."
        )

    end_ids = {eos} | {
        _token_id(metadata, key, vocab_size) for key in ("eot_token_id", "eom_token_id")
    }
    for name in END_OF_TURN_NAMES:
        token_id = vocab.get(name)
        # Only real control tokens: in some vocabularies "<|end|>" could be ordinary text.
        if token_id is not None and token_types[token_id] in (
            TOKEN_TYPE_CONTROL,
            TOKEN_TYPE_USER_DEFINED,
        ):
            end_ids.add(token_id)
    end_ids.discard(None)

    template = metadata.get("tokenizer.chat_template")
    return GGUFTokenizerParts(
        backend=backend,
        vocab_size=vocab_size,
        bos_token_id=bos,
        eos_token_id=eos,
        eos_token_ids=frozenset(end_ids),
        pad_token_id=_token_id(metadata, "padding_token_id", vocab_size),
        unk_token_id=_token_id(metadata, "unknown_token_id", vocab_size),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        chat_template=template if isinstance(template, str) else None,
    )


def _byte_level_backend(
    metadata: Mapping[str, Any], tokens: list[str], token_types: list[int], spec: PreTokenizerSpec
) -> tuple[BackendTokenizer, dict[str, int]]:
    """A byte-level BPE (`tokenizer.ggml.model = gpt2`) and its vocabulary (spelling → id)."""
    merges = _string_list(metadata, "tokenizer.ggml.merges")
    # Ordinary tokens are byte-level spelled; a few converters store one as raw text, which is
    # respelled as transformers does. Control and user-defined tokens stay raw: they are matched
    # literally in the input text, as llama.cpp does.
    vocab: dict[str, int] = {}
    special: list[AddedToken] = []
    user_defined: list[AddedToken] = []
    for index, (token, token_type) in enumerate(zip(tokens, token_types, strict=True)):
        if token_type == TOKEN_TYPE_CONTROL:
            special.append(AddedToken(token, special=True, normalized=False))
        elif token_type == TOKEN_TYPE_USER_DEFINED:
            user_defined.append(AddedToken(token, special=False, normalized=False))
        elif _NOT_BYTE_LEVEL.search(token):
            token = "".join(BYTE_TO_UNICODE[byte] for byte in token.encode("utf-8"))
        vocab[token] = index

    # llama.cpp splits a merge at the first space after the first character.
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)
        if cut < 0:
            raise ModelFormatError(
                f"Merge {merge!r} in tokenizer.ggml.merges has no space between its two parts; "
                "the GGUF file is corrupt: re-convert or download it again."
            )
        pairs.append((merge[:cut], merge[cut + 1 :]))
    try:
        model = models.BPE(vocab=vocab, merges=pairs, ignore_merges=spec.ignore_merges)
    # The Rust side raises a bare Exception that names the merge not in the vocabulary.
    except Exception as error:  # noqa: BLE001
        raise ModelFormatError(
            f"The GGUF tokenizer's merges do not match its vocabulary ({error}); "
            "re-convert or download the model again."
        ) from None

    backend = BackendTokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in spec.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special)
    backend.add_tokens(user_defined)

    return backend, vocab


def special_ids_to_skip(backend: BackendTokenizer) -> frozenset[int]:
    """Ids that `decode(..., skip_special_tokens=True)` drops: the added tokens marked special."""
    return frozenset(
        token_id
        for token_id, token in backend.get_added_tokens_decoder().items()
        if token.special
    )

