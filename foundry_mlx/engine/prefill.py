"""Prefill of a prompt's first chunk as one compiled MLX graph (on CUDA by default; `FOUNDRY_PREFILL_COMPILE`).

Short prompts pay MLX's host time per graph node (~25-30 nodes a layer) besides their GEMMs (a
128-token prefill of the 7B on the H200 was nonetheless GPU-bound, 29 of 33 ms in kernels, until
split-K: kernels/qgemm.py). `mx.compile` traces the forward pass once and replays it from
C++, with its element-wise chains fused. Measured on the H200 (bae500d,
`benchmarks/device_prefill_compile.sh`, `benchmarks/results/h200-prefill-compile*`), eager →
compiled tok/s: 0.5B pp128 10,836 → 16,680, pp512 33,790 → 61,389; 7B pp128 3,230 → 3,860, pp512
13,495 → 16,019. So it is on by default on CUDA; on Metal and the CPU (not measured there) it
is off unless `FOUNDRY_PREFILL_COMPILE=1`; `0` runs the eager path everywhere.

A trace is made per input shape, so the prompt is padded at its end to a bucket: the next
multiple of `BUCKET` (128) positions, one trace for 128 prompt lengths with whole GEMM tiles of
rows, at most 127 wasted rows (6% at 2048); below 128, the next power of two from 16, since
padding a 5-token prompt to 128 rows would cost the 7B model GEMMs of ~11 ms where the 5 rows
take weight-bandwidth time (~1-2 ms): 4 more traces bound that waste to 2x. Causal attention keeps
the real positions from seeing the pads. Inside the trace the
layers write a temporary cache of exactly the padded length (the caller's capacity never enters
the shape), and the final norm and LM head run at the true last position only, given as an
array (so the true length never enters the shape either). Outside, each layer's keys and values
go into the caller's cache with one node per array (`KVCache.fill`).

It applies where the result equals the eager path's: one sequence, a fresh cache (every layer
at offset 0: a prompt's first chunk; later chunks and prompt-cache hits run eagerly) of plain
`KVCache`s (Gemma 3's sliding-window rings stay eager), and a model with a `head` (the final
norm and LM head; a pipeline stage has none: its sends and receives stay out of traces).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import mlx.core as mx

from .. import kernels
from ..errors import FoundryError
from ..kernels import qgemm
from .cache import KVCache

SWITCH = "FOUNDRY_PREFILL_COMPILE"
BUCKET = 128
SMALLEST_BUCKET = 16


def enabled() -> bool:
    """Whether prefill is compiled: the switch's value, else the default (on where it was measured
    faster: CUDA)."""
    value = os.environ.get(SWITCH, "")
    if value not in ("", "0", "1"):
        raise FoundryError(f"{SWITCH} must be 0 or 1, not {value!r}; 0 for the eager prefill, unset for the default.")
    if value == "":
        return kernels.gpu_backend() == "cuda"
    return value == "1"


def bucket(length: int) -> int:
    """The padded length a prompt of `length` tokens is traced at (never 1: the decode kernels'
    single-token routes stay out of prefill traces)."""
    if length <= BUCKET:
        return max(SMALLEST_BUCKET, 1 << (length - 1).bit_length())
    return -(-length // BUCKET) * BUCKET


class _TraceCache:
    """A layer's fresh cache inside the trace: it keeps the one write it gets (the whole padded
    prompt) and attends over exactly that, so the trace needs no buffer of its own."""

    offset = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys, self.values = keys, values
        return keys, values

    def attention_mask(self, length: int) -> str | None:
        return "causal" if length > 1 else None

    def valid_length(self) -> int:
        return self.keys.shape[2]


class CompiledPrefill:
    """A model's compiled prefill: one `mx.compile` per kernel backend and quantized-GEMM switches
    (both decide routes while tracing), and within it one trace per bucket."""

    def __init__(self, model) -> None:
        self.model = model
        self.traces = 0  # how many times the forward pass was traced (tests count them)
        self.failed = False
        self._compiled: dict[tuple[str, str], object] = {}
        # Weights still lazy (random models) would otherwise be recomputed inside every replay.
        mx.eval(model.parameters())

    def _forward(self, ids: mx.array, last: mx.array):
        self.traces += 1  # runs only while tracing
        caches = [_TraceCache() for _ in self.model.layers]
        h = self.model.hidden(ids, caches)
        logits = self.model.head(mx.take(h, last, axis=1))
        return logits.reshape(1, -1), [c.keys for c in caches], [c.values for c in caches]

    def __call__(self, ids: Sequence[int], cache: list[KVCache]) -> mx.array:
        length = len(ids)
        padded = mx.array(list(ids) + [0] * (bucket(length) - length))[None]
        key = (kernels.backend_name(), *qgemm.trace_switches())
        forward = self._compiled.get(key)
        if forward is None:
            forward = self._compiled[key] = mx.compile(self._forward)
        logits, keys, values = forward(padded, mx.array([length - 1]))
        for layer_cache, layer_keys, layer_values in zip(cache, keys, values):
            layer_cache.fill(layer_keys, layer_values, length)
        return logits


def applies(model, cache: list, length: int) -> bool:
    """Whether the compiled prefill gives what the eager one would for this model and cache."""
    return (
        length >= 1
        # The class's own `head`: a wrapper that forwards attributes but overrides `__call__`
        # (tests force tokens that way) must keep seeing its calls.
        and callable(getattr(type(model), "head", None))
        and len(cache) == len(model.layers)
        and all(type(c) is KVCache and c.offset == 0 and length <= c.max_size for c in cache)
    )


def compiled_prefill_for(model) -> CompiledPrefill:
    """The model's CompiledPrefill, made on first use (it holds the traces)."""
    prefill = getattr(model, "_compiled_prefill", None)
    if prefill is None:
        prefill = CompiledPrefill(model)
        object.__setattr__(model, "_compiled_prefill", prefill)
    return prefill


def prefill(model, ids: Sequence[int], cache: list) -> mx.array:
    """Run `ids` (one sequence) through the model at the caches' offset; return the last
    position's logits (1, vocab), lazy. Compiled where `enabled` and it `applies`, else the
    eager forward pass."""
    if enabled() and applies(model, cache, len(ids)):
        compiled = compiled_prefill_for(model)
        if not compiled.failed:
            try:
                return compiled(ids, cache)
            except (RuntimeError, ValueError) as error:  # an MLX build whose compile rejects a primitive
                warnings.warn(f"compiled prefill failed ({error}); prefilling eagerly instead", stacklevel=2)
                compiled.failed = True
    return model(mx.array(list(ids))[None], cache, last_only=True)[:, -1, :]
