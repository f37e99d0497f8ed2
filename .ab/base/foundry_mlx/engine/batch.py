"""Several sequences decoded together: a batched KV cache with left padding.

The rows of a batch share one buffer per layer, (B, kv_heads, capacity, head_dim). Every row's
positions end at the same column, so a row shorter than the longest has `left_padding[b]` unused
columns in front of its first position. Two things keep that invisible to the model:

* the attention mask (boolean, (B, 1, L, keys)) hides each row's padding columns as well as the
  future (causal), so a padded row attends exactly to its own positions;
* `offset`, what the model hands to RoPE, is an array of B positions (`column - left_padding`):
  `mx.fast.rope` takes one offset per batch row, so every row is rotated by its own position.

Rows join and leave only between steps: `merge` builds a batch from per-sequence caches (the
engine's `KVCache`), `split` gives each row its own cache back. A batch of one is never built:
a sequence decoding alone keeps the single-sequence path (compiled step, custom kernels).
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from .cache import STEP, KVCache


class BatchKVCache:
    """One layer's keys and values for B rows, aligned at their ends (left padding)."""

    def __init__(self, keys: mx.array, values: mx.array, left_padding: Sequence[int], column: int) -> None:
        self.keys, self.values = keys, values
        self.left_padding = list(left_padding)
        self._padding = mx.array(self.left_padding, dtype=mx.int32)
        self.column = column  # the next column to write, the same for every row

    @property
    def offset(self) -> mx.array:
        """Each row's position of the next token (B,): RoPE rotates every row by its own."""
        return self.column - self._padding

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start, end = self.column, self.column + keys.shape[2]
        if end > self.capacity:
            self.keys, self.values = _grown(self.keys, end, start), _grown(self.values, end, start)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.column = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def valid_length(self) -> int:
        return self.column

    def attention_mask(self, length: int) -> mx.array:
        """Which keys each of `length` new queries sees: its own row's positions up to itself."""
        keys = mx.arange(self.column + length)
        queries = self.column + mx.arange(length)
        causal = keys[None, :] <= queries[:, None]  # (L, K)
        own = keys[None, :] >= self._padding[:, None]  # (B, K)
        return (causal[None] & own[:, None, :])[:, None]  # (B, 1, L, K)


def _grown(buffer: mx.array, needed: int, used: int) -> mx.array:
    size = -(-needed // STEP) * STEP
    batch, heads, _, dim = buffer.shape
    grown = mx.zeros((batch, heads, size, dim), buffer.dtype)
    grown[..., :used, :] = buffer[..., :used, :]
    return grown


def merge(row_caches: Sequence[list[KVCache]], reserve: int = 1) -> list[BatchKVCache]:
    """One batched cache per layer from each row's per-layer caches (copied, right-aligned), with
    room for `reserve` more positions before the buffer grows."""
    lengths = [cache[0].offset for cache in row_caches]
    column = max(lengths)
    capacity = -(-(column + reserve) // STEP) * STEP
    padding = [column - length for length in lengths]
    layers = []
    for layer in range(len(row_caches[0])):
        first = row_caches[0][layer]
        keys = mx.zeros((len(row_caches), first.keys.shape[1], capacity, first.keys.shape[3]), first.keys.dtype)
        values = mx.zeros((len(row_caches), first.values.shape[1], capacity, first.values.shape[3]), first.values.dtype)
        for row, (cache, pad) in enumerate(zip(row_caches, padding)):
            keys[row : row + 1, :, pad:column, :] = cache[layer].keys[..., : cache[layer].offset, :]
            values[row : row + 1, :, pad:column, :] = cache[layer].values[..., : cache[layer].offset, :]
        layers.append(BatchKVCache(keys, values, padding, column))
    mx.eval([c.keys for c in layers] + [c.values for c in layers])
    return layers


def split(batch: list[BatchKVCache], model) -> list[list[KVCache]]:
    """Each row's own per-layer caches again (copies, without the padding)."""
    rows = []
    for row, pad in enumerate(batch[0].left_padding):
        caches = model.make_cache()
        for cache, layer in zip(caches, batch):
            set_contents(
                cache,
                mx.contiguous(layer.keys[row : row + 1, :, pad : layer.column, :]),
                mx.contiguous(layer.values[row : row + 1, :, pad : layer.column, :]),
            )
        rows.append(caches)
    mx.eval([[c.keys, c.values] for caches in rows for c in caches])
    return rows


def set_contents(cache: KVCache, keys: mx.array, values: mx.array) -> None:
    """Make `cache` hold exactly `keys`, `values` (1, kv_heads, positions, head_dim) from position 0."""
    cache.keys, cache.values, cache.offset = keys, values, keys.shape[2]
