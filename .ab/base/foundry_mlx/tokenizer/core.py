"""`Tokenizer`: a `tokenizers` (Rust) tokenizer with the special tokens and chat template."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, processors

from ..errors import FoundryError, ModelFormatError
from .chat_template import ChatTemplate
from .gguf_vocab import (
    END_OF_TURN_NAMES,
    UNICODE_TO_BYTE,
    build_from_gguf,
    special_ids_to_skip,
)
from .named_templates import named_template, suggested_template
from .streaming import StreamingDetokenizer


def _set_post_processor(
    backend: BackendTokenizer, bos: int | None, eos: int | None, add_bos: bool, add_eos: bool
) -> None:
    """Make `encode(..., add_special_tokens=True)` add BOS/EOS exactly when the model asks.

    It lives in the backend (not in `encode`) so that the saved tokenizer.json makes
    transformers and mlx_lm add the same tokens.
    """
    front = [(backend.id_to_token(bos), bos)] if add_bos and bos is not None else []
    back = [(backend.id_to_token(eos), eos)] if add_eos and eos is not None else []
    single = [name for name, _ in front] + ["$A:0"] + [name for name, _ in back]
    pair = single + [name for name, _ in front] + ["$B:1"] + [name for name, _ in back]
    backend.post_processor = processors.TemplateProcessing(
        single=single, pair=pair, special_tokens=front + back
    )


def _token_content(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            value = json.load(handle)
    except (OSError, ValueError) as error:
        raise ModelFormatError(
            f"{path} cannot be read as JSON ({error}); fix or re-download it."
        ) from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path} is not a JSON object; fix or re-download it.")
    return value


class Tokenizer:
    """Text ↔ token ids for one model, with its chat template and stop tokens.

    Build it with `Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)` or
    `Tokenizer.from_directory(path)` (a Hugging Face style folder with tokenizer.json);
    `save(directory)` writes such a folder.
    """

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        vocab_size: int,
        bos_token_id: int | None,
        eos_token_id: int | None,
        eos_token_ids: frozenset[int],
        add_bos_token: bool,
        add_eos_token: bool = False,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self.vocab_size = vocab_size
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.eos_token_ids = eos_token_ids
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        self.chat_template = chat_template
        self._compiled_template: ChatTemplate | None = None
        self._special_ids = special_ids_to_skip(backend)
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file describes (`GGUFFile(path).metadata`)."""
        parts = build_from_gguf(metadata)
        _set_post_processor(
            parts.backend,
            parts.bos_token_id,
            parts.eos_token_id,
            parts.add_bos_token,
            parts.add_eos_token,
        )
        return cls(
            parts.backend,
            vocab_size=parts.vocab_size,
            bos_token_id=parts.bos_token_id,
            eos_token_id=parts.eos_token_id,
            eos_token_ids=parts.eos_token_ids,
            add_bos_token=parts.add_bos_token,
            add_eos_token=parts.add_eos_token,
            pad_token_id=parts.pad_token_id,
            unk_token_id=parts.unk_token_id,
            chat_template=parts.chat_template,
        )

    @classmethod
    def from_directory(cls, path: str | Path) -> Tokenizer:
        """Load a Hugging Face style tokenizer folder (tokenizer.json, tokenizer_config.json)."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelFormatError(
                f"{directory} has no tokenizer.json; point to a model folder that includes one."
            )
        try:
            backend = BackendTokenizer.from_file(str(tokenizer_file))
        # The Rust side raises a bare Exception that says what it could not parse.
        except Exception as error:  # noqa: BLE001
            raise ModelFormatError(
                f"{tokenizer_file} is not a valid tokenizer ({error}); re-download it."
            ) from None
        config_file = directory / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}

        def token_id(key: str) -> int | None:
            content = _token_content(config.get(key))
            return None if content is None else backend.token_to_id(content)

        bos, eos = token_id("bos_token"), token_id("eos_token")
        if "add_bos_token" in config or "add_eos_token" in config:
            add_bos = bool(config.get("add_bos_token")) and bos is not None
            add_eos = bool(config.get("add_eos_token")) and eos is not None
            _set_post_processor(backend, bos, eos, add_bos, add_eos)
        else:  # the tokenizer.json's own post-processor decides (Llama 3 adds BOS there)
            added = backend.encode("").ids
            add_bos = bos is not None and added[:1] == [bos]
            add_eos = eos is not None and len(added) > int(add_bos) and added[-1] == eos

        end_ids = {eos}
        for extra in ("generation_config.json", "config.json"):
            if (directory / extra).is_file():
                value = _read_json(directory / extra).get("eos_token_id")
                end_ids.update(value if isinstance(value, list) else [value])
        # Only added tokens: in some vocabularies "<|end|>" could be ordinary text.
        added = {token.content for token in backend.get_added_tokens_decoder().values()}
        end_ids.update(backend.token_to_id(name) for name in END_OF_TURN_NAMES if name in added)
        end_ids = {i for i in end_ids if isinstance(i, int)}

        return cls(
            backend,
            vocab_size=backend.get_vocab_size(with_added_tokens=True),
            bos_token_id=bos,
            eos_token_id=eos,
            eos_token_ids=frozenset(end_ids),
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            pad_token_id=token_id("pad_token"),
            unk_token_id=token_id("unk_token"),
            chat_template=_read_chat_template(directory, config),
        )

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json that transformers and mlx_lm load."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {
            # The generic fast class takes tokenizer.json as is; a model-specific class
            # (Qwen2Tokenizer...) may rebuild parts of the pipeline from its own defaults.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            # Our decode never cleans up spaces (it is lossy: "a ." would become "a.").
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 60,
        }
        for key, token_id in (
            ("bos_token", self.bos_token_id),
            ("eos_token", self.eos_token_id),
            ("pad_token", self.pad_token_id),
            ("unk_token", self.unk_token_id),
        ):
            if token_id is not None:
                config[key] = self.id_to_token(token_id)
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(directory / "tokenizer_config.json", "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2, ensure_ascii=False)
            handle.write("\n")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. Special tokens written in the text (`<|im_start|>`) become their
        single ids; BOS is added only if the model asks for it and `add_special_tokens`."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text for `ids`; bytes that do not form valid UTF-8 become U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry for an id, as spelled in the vocabulary (byte-level: "Ġhello")."""
        return self._backend.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None."""
        return self._backend.token_to_id(token)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = False,
        **kwargs: Any,
    ) -> str | list[int]:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with the model's template.

        Extra keyword arguments reach the template as variables (`tools`, `documents`,
        `enable_thinking`...); `continue_final_message=True` ends the prompt inside the last
        message instead of opening a new turn. With `tokenize=True` the ids are returned,
        encoded without adding BOS (the template writes any it wants), as transformers does.
        """
        if self.chat_template is None:
            raise FoundryError(
                "This model has no chat template; name one (chat_template='gemma' or 'chatml' in "
                "load(), --chat-template on the CLI) or use `generate` for raw completion instead."
            )
        if self._compiled_template is None:
            self._compiled_template = ChatTemplate(self.chat_template)
        special_tokens = {
            key: self.decode([token_id])
            for key, token_id in (
                ("bos_token", self.bos_token_id),
                ("eos_token", self.eos_token_id),
                ("pad_token", self.pad_token_id),
                ("unk_token", self.unk_token_id),
            )
            if token_id is not None
        }
        prompt = self._compiled_template.render(
            messages,
            add_generation_prompt=add_generation_prompt,
            special_tokens=special_tokens,
            **kwargs,
        )
        return self.encode(prompt, add_special_tokens=False) if tokenize else prompt

    def set_chat_template(self, template: str) -> None:
        """Use another chat template: a built-in name (`chatml`, `gemma`), a Jinja file, or Jinja source."""
        if "{{" in template or "{%" in template:
            source = template
        else:
            source = named_template(template)
        ChatTemplate(source)  # a syntax error shows now, not at the first message
        self.chat_template, self._compiled_template = source, None

    def suggested_chat_template(self) -> str:
        """The built-in template that fits this vocabulary (for a model without its own)."""
        return suggested_template(lambda text: self.token_to_id(text) is not None)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        """A fresh `StreamingDetokenizer` for one generated sequence."""
        if not self._byte_level:
            return StreamingDetokenizer(
                None, lambda ids: self.decode(ids, skip_special_tokens=skip_special_tokens)
            )
        if skip_special_tokens:
            return StreamingDetokenizer(
                lambda i: b"" if i in self._special_ids else self._token_bytes(i), self.decode
            )
        return StreamingDetokenizer(self._token_bytes, self.decode)

    def _token_bytes(self, token_id: int) -> bytes:
        """A byte-level token's bytes, by the same rule as the `ByteLevel` decoder: map each
        character back to its byte, or take the UTF-8 of a token spelled in raw text."""
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            token = self._backend.id_to_token(token_id)
            if token is None:
                cached = b""
            else:
                try:
                    cached = bytes(UNICODE_TO_BYTE[character] for character in token)
                except KeyError:
                    cached = token.encode("utf-8")
            self._bytes_cache[token_id] = cached
        return cached


def _read_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """The template from tokenizer_config.json, chat_template.jinja or chat_template.json."""
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text(encoding="utf-8")
    if (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
        return template if isinstance(template, str) else None
    return None
