"""Incremental detokenization: text for each new token, never half a UTF-8 character."""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence

# Generic mode: tokens of context decoded in front of the new ones, and how many undecodable
# tokens to hold before giving up (a UTF-8 character spans at most 4 byte-fallback tokens).
_CONTEXT_TOKENS = 4
_MAX_PENDING_TOKENS = 8


class StreamingDetokenizer:
    """Turns token ids into text one at a time, as a model generates them.

    `add(token_id)` returns the text that became printable with this token: bytes of a character
    that is still incomplete (an emoji spread over several byte tokens) are held back until the
    rest arrives. `flush()` returns what is left, with U+FFFD for bytes that never completed.
    `text` is everything returned so far. Each step costs O(1) in the length of the output.
    """

    def __init__(
        self,
        token_bytes: Callable[[int], bytes] | None,
        decode: Callable[[Sequence[int]], str],
    ) -> None:
        # Byte-level vocabularies give each token's bytes directly (`token_bytes`), and an
        # incremental UTF-8 decoder holds back incomplete characters. Any other decoder (say
        # SentencePiece's, which drops the first token's leading space) is handled by decoding a
        # small window and emitting the difference.
        self._token_bytes = token_bytes
        self._decode = decode
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._context: list[int] = []
        self._pending: list[int] = []
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _emit(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece

    def add(self, token_id: int) -> str:
        """Feed one token id; return the newly printable text (possibly "")."""
        if self._token_bytes is not None:
            return self._emit(self._utf8.decode(self._token_bytes(token_id)))
        self._pending.append(token_id)
        window = self._context + self._pending
        text = self._decode(window)
        if text.endswith("\ufffd") and len(self._pending) < _MAX_PENDING_TOKENS:
            return ""
        return self._emit(self._advance(window, text))

    def _advance(self, window: list[int], text: str) -> str:
        prefix = self._decode(self._context) if self._context else ""
        self._context = window[-_CONTEXT_TOKENS:]
        self._pending = []
        return text[len(prefix) :]

    def flush(self) -> str:
        """Return whatever is still held back; incomplete bytes become U+FFFD."""
        if self._token_bytes is not None:
            return self._emit(self._utf8.decode(b"", final=True))
        if not self._pending:
            return ""
        window = self._context + self._pending
        return self._emit(self._advance(window, self._decode(window)))
