"""The KV cache of a sliding-window attention layer: it never holds more than the window.

A local layer of Gemma 3 lets position p attend to positions p - window + 1 … p only, so older
keys can be dropped: however long the conversation, the layer keeps `window` positions
(Gemma 3 270M: 512 × 1 KV head × 256 dims × 2 (K, V) × 4 bytes = 1 MiB per layer in float32).

The buffer is a ring: position p lives at index p % window once the window is full. A single
query (decode) attends over the whole buffer, in ring order (attention does not care about the
order of its keys; RoPE already encoded the positions). A block of queries (prefill) gets the
kept positions in order followed by the new ones, with a mask that is causal and windowed; then
the last `window` positions are kept. The contract is `engine/cache.py`'s (`update_and_fetch`,
`offset`, `attention_mask`, `trim`, `reserve`, `valid_length`, `nbytes`).
"""

from __future__ import annotations

import mlx.core as mx


class RotatingKVCache:
    def __init__(self, window: int, max_size: int) -> None:
        self.window = window
        self.max_size = max_size
        self.keys: mx.array | None = None  # (B, kv_heads, window, D) once written
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def filled(self) -> int:
        """How many buffer slots hold a position."""
        return min(self.offset, self.window)

    def reserve(self, positions: int) -> None:
        if positions > self.max_size:
            raise ValueError(f"KV cache asked for {positions} positions, more than its {self.max_size}")

    def _allocate(self, keys: mx.array, values: mx.array) -> None:
        batch, heads, _, _ = keys.shape
        self.keys = mx.zeros((batch, heads, self.window, keys.shape[3]), keys.dtype)
        self.values = mx.zeros((batch, heads, self.window, values.shape[3]), values.dtype)

    def _ordered(self) -> tuple[mx.array, mx.array]:
        """The kept positions, oldest first."""
        if self.offset <= self.window:
            return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]
        start = self.offset % self.window  # the slot of the oldest kept position
        order = mx.concatenate([mx.arange(start, self.window), mx.arange(0, start)])
        return self.keys[..., order, :], self.values[..., order, :]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        length = keys.shape[2]
        end = self.offset + length
        if end > self.max_size:
            raise ValueError(f"KV cache of {self.max_size} positions cannot take position {end - 1}")
        if self.keys is None:
            self._allocate(keys, values)
        if length == 1:
            slot = self.offset % self.window
            self.keys[..., slot : slot + 1, :] = keys
            self.values[..., slot : slot + 1, :] = values
            self.offset = end
            filled = self.filled
            return self.keys[..., :filled, :], self.values[..., :filled, :]
        kept_keys, kept_values = self._ordered()
        all_keys = mx.concatenate([kept_keys, keys], axis=2)
        all_values = mx.concatenate([kept_values, values], axis=2)
        if end <= self.window:
            self.keys[..., self.offset : end, :] = keys
            self.values[..., self.offset : end, :] = values
        else:  # keep the last `window` positions, position p at slot p % window
            shift = (end - self.window) % self.window
            self.keys = mx.roll(all_keys[..., -self.window :, :], shift, axis=2)
            self.values = mx.roll(all_values[..., -self.window :, :], shift, axis=2)
        self.offset = end
        return all_keys, all_values

    def valid_length(self) -> int:
        return self.filled

    def attention_mask(self, length: int) -> mx.array | None:
        """For `length` new queries: each sees the kept positions and the new ones that are at
        most `window - 1` behind it and not ahead of it. None for a single query (the buffer
        holds exactly what it may see)."""
        if length == 1:
            return None
        kept = self.filled
        queries = mx.arange(self.offset, self.offset + length)[:, None]
        keys = mx.arange(self.offset - kept, self.offset + length)[None, :]
        return (keys <= queries) & (queries - keys < self.window)

    def reusable_prefix(self, positions: int) -> int:
        """How much of a `positions`-long prefix this cache can keep: all of it, unless the ring
        has already overwritten what a shorter prefix needs (then nothing)."""
        return positions if positions >= self.offset or self.offset <= self.window else 0

    def trim(self, positions: int) -> None:
        if positions < self.offset and self.offset > self.window:
            positions = 0  # the ring no longer holds the positions before the cut
        self.offset = min(self.offset, positions)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
