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

Building a replay's graph costs host time too (~1.5 ms for the 7B's 715 nodes on the H200,
during which the GPU had nothing queued), so where the GPU's share is large the layers are traced
in segments (the first 2 layers, then 4, 8, the rest): each segment's graph is built and queued
(`mx.async_eval`) while the GPU runs the one before, and the GPU waits only for the first
segment's. The segments' outputs are the same arrays the single trace computes. Measured on the
H200 (eedb4b3, prefill alone, pp128, `benchmarks/results/h200-prefill-ab-eedb4b3.txt`): the 7B
17.24/17.52 ms in one trace → 15.50/15.62 in four segments; the 0.5B, whose prefill is bound by
host time per node rather than by its GPU work, 5.46/6.16 → 6.37/7.46 (each segment's call and
queueing is host time added). So the default is 4 segments where a layer's prefill is at least
SEGMENT_MIN_FLOPS (7B at 128 tokens: 60 GFLOP a layer; 0.5B: 3.8), else one trace;
FOUNDRY_PREFILL_SEGMENTS=N sets the number for every prompt (1: one trace).

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
from ..config import prefill_flops
from ..errors import FoundryError
from ..kernels import qgemm, qkv_heads, sdpa_prefill
from .cache import KVCache

SWITCH = "FOUNDRY_PREFILL_COMPILE"
SEGMENTS_SWITCH = "FOUNDRY_PREFILL_SEGMENTS"
DEFAULT_SEGMENTS = 4
FIRST_SEGMENT = 2  # layers in the first segment (the GPU's wait); each next one twice as many
SEGMENT_MIN_FLOPS = 20e9  # a layer's prefill arithmetic from which segments pay (between the two measured)
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


def default_segments(config, padded: int) -> int:
    """DEFAULT_SEGMENTS where one layer's prefill of `padded` tokens is at least SEGMENT_MIN_FLOPS
    of arithmetic (the GPU's time hides the next segment's graph building), else 1."""
    if config is None:
        return 1
    layer_flops = (prefill_flops(config, padded) - prefill_flops(config, 0)) / config.num_hidden_layers
    return DEFAULT_SEGMENTS if layer_flops >= SEGMENT_MIN_FLOPS else 1


def segments(layers: int, default: int = DEFAULT_SEGMENTS) -> list[tuple[int, int]]:
    """The (start, stop) layer ranges a prefill is traced and queued in: FOUNDRY_PREFILL_SEGMENTS
    (else `default`) of them at most (1: one trace of every layer), FIRST_SEGMENT layers first, then
    twice as many each time, the last segment taking the rest."""
    value = os.environ.get(SEGMENTS_SWITCH, "").strip()
    if value and not (value.isdigit() and int(value) >= 1):
        raise FoundryError(f"{SEGMENTS_SWITCH}={value!r} is not a whole number of segments >= 1; 1 traces the "
                           "prefill in one piece, unset it for the default (by the model's size).")
    most = int(value) if value else default
    bounds, start, size = [], 0, FIRST_SEGMENT
    while len(bounds) + 1 < most and start + size < layers:
        bounds.append((start, start + size))
        start, size = start + size, size * 2
    return bounds + [(start, layers)]


def route_switches() -> tuple[str, ...]:
    """The settings (as set) that choose kernels while a prefill is traced: one trace per value."""
    return (*qgemm.trace_switches(), os.environ.get(qkv_heads.SWITCH, ""), os.environ.get(sdpa_prefill.SWITCH, ""))


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
    """A model's compiled prefill: one `mx.compile` per kernel backend, route switches
    (`route_switches`: all decide kernels while tracing) and layer segment, and within it one trace
    per bucket."""

    def __init__(self, model) -> None:
        self.model = model
        self.traces = 0  # how many times the forward pass was traced (tests count them)
        self.failed = False
        self._compiled: dict[tuple, object] = {}
        # Weights still lazy (random models) would otherwise be recomputed inside every replay.
        mx.eval(model.parameters())

    def _segment(self, start: int, stop: int):
        """The traced function of layers [start, stop): token ids (first segment) or the hidden
        states in, and `last` (the true last position); the hidden states out (the final norm and
        LM head's logits at `last` for the last segment), with the segment's keys and values."""
        final = stop == len(self.model.layers)

        def forward(inputs: mx.array, last: mx.array):
            if start == 0:
                self.traces += 1  # runs only while tracing
            caches = [_TraceCache() for _ in range(start, stop)]
            if start == 0 and final:
                h = self.model.hidden(inputs, caches)
            else:
                h = self.model.run_layers(self.model.embed(inputs) if start == 0 else inputs, caches, start)
            if final:
                h = self.model.head(mx.take(h, last, axis=1)).reshape(1, -1)
            return h, [c.keys for c in caches], [c.values for c in caches]

        return forward

    def __call__(self, ids: Sequence[int], cache: list[KVCache]) -> mx.array:
        length = len(ids)
        h = mx.array(list(ids) + [0] * (bucket(length) - length))[None]
        last = mx.array([length - 1])
        # A model without `run_layers` (its layers are not a plain chain) is traced in one piece.
        if callable(getattr(self.model, "run_layers", None)):
            bounds = segments(len(cache), default_segments(getattr(self.model, "config", None), h.shape[1]))
        else:
            bounds = [(0, len(cache))]
        for start, stop in bounds:
            key = (kernels.backend_name(), *route_switches(), start, stop)
            forward = self._compiled.get(key)
            if forward is None:
                forward = self._compiled[key] = mx.compile(self._segment(start, stop))
            h, keys, values = forward(h, last)
            for layer_cache, layer_keys, layer_values in zip(cache[start:stop], keys, values):
                layer_cache.fill(layer_keys, layer_values, length)
            if stop < len(cache):  # queue it: the GPU runs it while the next segment's graph is built
                mx.async_eval(h, [c.keys for c in cache[start:stop]], [c.values for c in cache[start:stop]])
        return h


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
