"""The KV cache of one attention layer.

The contract models rely on is mlx-lm's: `update_and_fetch(keys, values)` stores the new
positions and returns the views to attend over; `offset` is the next position (it feeds RoPE).

Storage grows on demand in steps of 256 positions, never beyond `max_size` (the session's
budget, itself capped by the model's context), and is never preallocated to the full context:
a 32k-token cache of a 0.5B model would hold ~400 MB for a chat that uses a few hundred
positions. Whole 256-steps also matter for speed: MLX's CUDA backend uses its cuDNN decode
attention only for caches whose length is a multiple of 256. `reserve` lets the generator size
the cache for a whole turn (prompt + max new tokens) up front, so decode never copies it.
"""

from __future__ import annotations

import mlx.core as mx

STEP = 256


class KVCache:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self._reserved = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def reserve(self, positions: int) -> None:
        """Make room for `positions` in total, now if the cache exists, else at its first write."""
        if positions > self.max_size:
            raise ValueError(f"KV cache asked for {positions} positions, more than its {self.max_size}")
        self._reserved = max(self._reserved, positions)
        if self.keys is not None and positions > self.capacity:
            self._grow(positions, self.keys, self.values)

    def _size(self, positions: int) -> int:
        return min(-(-positions // STEP) * STEP, self.max_size)

    def _grow(self, positions: int, like_keys: mx.array, like_values: mx.array) -> None:
        size = self._size(positions)
        batch, kv_heads, _, k_dim = like_keys.shape
        new_keys = mx.zeros((batch, kv_heads, size, k_dim), like_keys.dtype)
        new_values = mx.zeros((batch, kv_heads, size, like_values.shape[3]), like_values.dtype)
        if self.keys is not None and self.offset > 0:
            new_keys[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_values[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_keys, new_values

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start = self.offset
        end = start + keys.shape[2]
        if end > self.max_size:
            raise ValueError(f"KV cache of {self.max_size} positions cannot take position {end - 1}")
        if end > self.capacity:
            self._grow(max(end, self._reserved), keys, values)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def fill(self, keys: mx.array, values: mx.array, length: int) -> None:
        """Take positions [0, length) from `keys`, `values` (1, kv_heads, ≥ length, head_dim), made
        for this cache while it was empty (a compiled prefill over a padded prompt).

        It leaves what `update_and_fetch` of those positions would have: the same offset, capacity
        and contents below the offset, in one graph node per array (a pad, where eager writes take
        a zeros and a slice update), since host time per node is what a short prefill costs.
        Positions from `length` on may hold the padding's keys: nothing reads past the offset.
        """
        if self.offset:
            raise ValueError("KV cache fill needs an empty cache")
        if length > self.max_size:
            raise ValueError(f"KV cache of {self.max_size} positions cannot take position {length - 1}")
        if length <= self.capacity:  # a trimmed buffer with room: keep it, as a write would
            written = min(keys.shape[2], self.capacity)
            self.keys[..., :written, :] = keys[..., :written, :]
            self.values[..., :written, :] = values[..., :written, :]
        else:
            size = self._size(max(length, self._reserved))
            self.keys, self.values = _sized(keys, size), _sized(values, size)
        self.offset = length

    def valid_length(self) -> int:
        """How many positions, from 0, hold keys (what attention reads)."""
        return self.offset

    def attention_mask(self, length: int) -> str | None:
        """The mask for `length` new queries: causal within them (MLX aligns it to the end of the
        keys, so earlier positions are all visible); none for a single query."""
        return "causal" if length > 1 else None

    def trim(self, positions: int) -> None:
        """Forget everything from `positions` on (a later turn diverged from the cached tokens)."""
        self.offset = min(self.offset, positions)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


def _sized(array: mx.array, size: int) -> mx.array:
    """`array` along its positions axis cut or zero-padded to `size`, row-contiguous (the decode
    kernels write the cache in place and assume that layout)."""
    extra = size - array.shape[2]
    if extra > 0:
        return mx.pad(array, [(0, 0), (0, 0), (0, extra), (0, 0)])
    return mx.contiguous(array[..., :size, :])


class StepCache:
    """The KV cache as a compiled decode step sees it: fixed shapes, the position as an array.

    `mx.compile` traces a function once per input shapes; a step that slices the cache to
    `offset + 1` positions would change shape every token. So the step writes the new position
    with `slice_update` at an array offset and attends over the whole buffer, masking the
    positions not written yet. Shapes change only when the buffer grows (every 256 positions).
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array, length: mx.array) -> None:
        self.keys, self.values, self.offset, self.length = keys, values, offset, length

    def valid_length(self) -> mx.array:
        return self.length  # offset + 1, given as an input so the trace holds no extra node

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start = self.offset.reshape(1)
        self.keys = mx.slice_update(self.keys, keys, start, axes=(2,))
        self.values = mx.slice_update(self.values, values, start, axes=(2,))
        return self.keys, self.values

    def attention_mask(self, length: int) -> mx.array:
        if length != 1:
            raise ValueError("StepCache serves single-token decode steps")
        return (mx.arange(self.keys.shape[2]) <= self.offset)[None, None, None, :]
