"""Prompt cache: the KV caches of earlier requests, keyed by their token ids, within a byte budget.

A chat client resends the whole conversation each turn, so a new request usually starts with
the tokens of an earlier one (its prompt and its reply). `lookup` finds the stored entry that
shares the longest prefix with the new ids and returns a copy-on-write cache holding that prefix,
so only the new tokens are prefilled. Entries are evicted least recently used first once their
bytes pass the budget; an entry that is a prefix of a newer one is dropped as redundant.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import mlx.core as mx

from ..engine.batch import set_contents
from ..engine.cache import KVCache


class PromptCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[int, ...], list[tuple[mx.array, mx.array]]] = OrderedDict()
        self._sizes: dict[tuple[int, ...], int] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def nbytes(self) -> int:
        return sum(self._sizes.values())

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int], model) -> tuple[list[KVCache], int] | None:
        """A fresh cache holding the longest stored prefix of `ids` (leaving at least one id to
        run, which gives the first token's logits), and that prefix's length; None on a miss."""
        with self._lock:
            best, best_shared = None, 0
            for tokens in self._entries:
                shared = _common_prefix(tokens, ids)
                if shared > best_shared:
                    best, best_shared = tokens, shared
            best_shared = min(best_shared, len(ids) - 1)
            if best is None or best_shared <= 0:
                self.misses += 1
                return None
            self._entries.move_to_end(best)
            arrays = self._entries[best]
            self.hits += 1
        caches = model.make_cache()
        for cache, (keys, values) in zip(caches, arrays):
            # A slice is a new array: the cache grows into fresh buffers and never writes the entry.
            set_contents(cache, keys[..., :best_shared, :], values[..., :best_shared, :])
        return caches, best_shared

    def store(self, tokens: Sequence[int], caches: list[KVCache]) -> None:
        """Keep the KV of `tokens` (the caches hold at least those positions)."""
        key = tuple(tokens)
        if not key or self.max_bytes <= 0:
            return
        arrays = [
            (mx.contiguous(c.keys[..., : len(key), :]), mx.contiguous(c.values[..., : len(key), :])) for c in caches
        ]
        mx.eval(arrays)
        size = sum(k.nbytes + v.nbytes for k, v in arrays)
        if size > self.max_bytes:
            return
        with self._lock:
            for tokens in list(self._entries):
                if len(tokens) >= len(key) and tokens[: len(key)] == key:
                    self._entries.move_to_end(tokens)  # already held, within a longer entry
                    return
                if key[: len(tokens)] == tokens:
                    self._drop(tokens)  # the new entry covers this one
            self._entries[key] = arrays
            self._sizes[key] = size
            while self.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def _drop(self, tokens: tuple[int, ...]) -> None:
        del self._entries[tokens]
        del self._sizes[tokens]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._sizes.clear()


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared
