"""Single-token decode steps as one compiled MLX graph.

At 0.5B parameters a decode step is a few hundred small kernels, and building that graph in
Python each token costs about as much as running it (measured on the H100: custom kernels
decoded at 200 tok/s through the eager path, below mlx-lm's 217, although every kernel was as
fast or faster than MLX's own). `mx.compile` traces the step once and replays it from C++.

Tracing needs fixed shapes, so inside the step the KV cache is a `StepCache`: the new position
is written at an array offset and attention runs over the whole buffer with a mask. The buffer
grows by 256 positions at a time, so the step is re-traced once per 256 tokens. One trace per
kernel backend: the choice between kernels and the reference path is made while tracing.
`FOUNDRY_COMPILE=0` (or `Decoder(model, compiled=False)`) runs the same steps eagerly.
"""

from __future__ import annotations

import os
import warnings

import mlx.core as mx

from .. import kernels
from ..errors import FoundryError
from .cache import KVCache, StepCache
from .prefill import prefill


class Decoder:
    def __init__(self, model, compiled: bool | None = None) -> None:
        self.model = model
        self.compiled = os.environ.get("FOUNDRY_COMPILE", "1") != "0" if compiled is None else compiled
        self._steps: dict[str, object] = {}

    def _step(self, token: mx.array, offset: mx.array, length: mx.array, keys: list[mx.array], values: list[mx.array]):
        caches = [StepCache(k, v, offset, length) for k, v in zip(keys, values)]
        logits = self.model(token.reshape(1, 1), caches, last_only=True)[:, -1, :]
        return logits, [c.keys for c in caches], [c.values for c in caches]

    def __call__(self, token: mx.array, cache: list[KVCache]) -> mx.array:
        """Logits (1, vocab) after feeding `token` (shape (1,)) at the caches' current offset."""
        if not self.compiled:
            return self.model(token.reshape(1, 1), cache, last_only=True)[:, -1, :]
        position = cache[0].offset
        for layer_cache in cache:
            layer_cache.reserve(position + 1)
        backend = kernels.backend_name()
        step = self._steps.get(backend)
        if step is None:
            step = self._steps[backend] = mx.compile(self._step)
        try:
            logits, keys, values = step(
                token, mx.array(position, dtype=mx.int32), mx.array(position + 1, dtype=mx.int32),
                [c.keys for c in cache], [c.values for c in cache],
            )
        except (RuntimeError, ValueError) as error:  # an MLX build whose compile rejects a primitive
            warnings.warn(f"compiled decode failed ({error}); decoding eagerly instead", stacklevel=2)
            self.compiled = False
            return self(token, cache)
        for layer_cache, k, v in zip(cache, keys, values):
            layer_cache.keys, layer_cache.values = k, v
            layer_cache.offset = position + 1
        return logits


def decoder_for(model) -> Decoder:
    """The model's Decoder, made on first use (it holds the compiled traces)."""
    decoder = getattr(model, "_decoder", None)
    if decoder is None:
        # A family whose caches the fixed-shape step cannot model (Gemma 3's ring buffers) decodes eagerly.
        decoder = Decoder(model, compiled=False if getattr(model, "eager_decode", False) else None)
        object.__setattr__(model, "_decoder", decoder)
    return decoder


class FusedDecoder:
    """The fused decode step (kernels/fused_step.py): token id in, token id out, on the device.

    `start` samples the first token from the prefill's logits with the sampling kernel and sets
    up the step's device-resident state; each `advance` queues one compiled step (~5 graph nodes
    per layer) and returns its token as a lazy (1,) array. Nothing here waits for the device.
    """

    def __init__(self, model, kernel_set, compiled: bool = True) -> None:
        from ..kernels import fused_step

        self.model = model
        self.kernels = kernel_set
        if hasattr(kernel_set, "prepare"):
            kernel_set.prepare(model)
        self._step, self.functional = plan_step(fused_step.decode_step, kernel_set, model, compiled)

    def start(self, cache: list[KVCache], logits: mx.array, params, recent_ids: list[int], seed: int) -> mx.array:
        from ..kernels import sample

        self.cache = cache
        window = max(params.repetition_context, 1)
        history = list(recent_ids[-window:]) if params.repetition_penalty != 1.0 else []
        # Made on the device where they can be (kernels/sample.py's `device_state`: host-written arrays
        # cost the first token ~0.15 ms each on CUDA); the ring is written in place, so it is new.
        if history:
            self.recent = mx.array(history + [0] * (window - len(history)), dtype=mx.int32)
        else:
            self.recent = mx.zeros((window,), dtype=mx.int32)
        self.params = sample.shared_params(params.temperature, params.top_k, params.top_p, params.min_p,
                                           params.repetition_penalty)
        position = cache[0].offset - 1  # the prompt's last position: the sampled token goes after it
        state = sample.device_state(position, 0, 0, seed, len(history))
        self.state, token, self.recent = self.kernels.sample(logits.reshape(-1), self.params, state, self.recent)
        self.position = position + 1
        return token

    def advance(self) -> mx.array:
        """Queue the step that feeds the current token; return the token it samples (lazy). The
        caches must hold the position already (`stream_generate` reserves a whole turn up front)."""
        if self.position >= self.cache[0].capacity:
            for layer_cache in self.cache:
                layer_cache.reserve(self.position + 1)
        keys = [c.keys for c in self.cache]
        values = [c.values for c in self.cache]
        outputs = self._step(self.state, self.params, self.recent, keys, values)
        self.state, token = outputs[0], outputs[1]
        if self.functional:
            keys, values, self.recent = outputs[2], outputs[3], outputs[4]
            for layer_cache, k, v in zip(self.cache, keys, values):
                layer_cache.keys, layer_cache.values = k, v
        self.position += 1
        for layer_cache in self.cache:
            layer_cache.offset = self.position
        return token


def plan_step(decode_step, kernel_set, model, compiled: bool = True):
    """(step function, functional) for a fused plan's `decode_step` (single or batched). GPU kernels
    write the cache and the penalty ring in place, so their step returns (state, token) and is
    compiled; the reference twins return new cache and ring arrays too (functional) and run eagerly."""
    functional = kernel_set.backend == "reference"

    def step(state, params, recent, keys, values):
        next_state, token, keys, values, recent = decode_step(kernel_set, model, state, params, recent, keys, values)
        if functional:
            return next_state, token, keys, values, recent
        return next_state, token

    return (mx.compile(step) if compiled and not functional else step), functional


def decode_ahead(default: int) -> int:
    """Fused steps queued ahead of the token the host is handling: FOUNDRY_DECODE_AHEAD, else
    `default` (the generator and the server each pick their own). One place reads and checks it."""
    text = os.environ.get("FOUNDRY_DECODE_AHEAD", "").strip()
    if not text:
        return default
    try:
        ahead = int(text)
    except ValueError:
        ahead = 0
    if ahead < 1:
        raise FoundryError(f"FOUNDRY_DECODE_AHEAD={text!r} is not a positive whole number of steps; "
                           "unset it, or set e.g. FOUNDRY_DECODE_AHEAD=4")
    return ahead


def fused_kernel_set():
    """The active GPU kernel set where fused steps run by default (CUDA; Metal with FOUNDRY_FUSED=1;
    never with FOUNDRY_FUSED=0 or on the CPU), else None."""
    kernel_set = kernels.active()
    if kernel_set is None:
        return None
    switch = os.environ.get("FOUNDRY_FUSED", "")
    if switch == "0" or (switch != "1" and kernel_set.backend != "cuda"):
        return None
    return kernel_set


def fused_decoder_for(model) -> FusedDecoder | None:
    """The model's fused decoder where the kernel backend and the model allow it, else None.

    On by default on CUDA, where its kernels and tokens were checked on the H200; off by default
    on Metal, whose renditions have run only in the CPU SIMT harness so far: `FOUNDRY_FUSED=1`
    turns it on there (benchmark it with `foundry-mlx bench`), `FOUNDRY_FUSED=0` off everywhere
    (the per-kernel compiled step is used instead)."""
    kernel_set = fused_kernel_set()
    if kernel_set is None:
        return None
    from ..kernels import fused_step

    cached = getattr(model, "_fused_decoder", None)
    if cached is not None and cached.kernels.backend == kernel_set.backend:
        return cached
    if fused_step.unsupported_reason(model) is not None:
        return None
    decoder = FusedDecoder(model, fused_step.GpuKernels(kernel_set.backend))
    object.__setattr__(model, "_fused_decoder", decoder)
    return decoder


def prefilled(model, prompt: list[int], reserve: int) -> tuple[list[KVCache], mx.array]:
    """A fresh cache with room for `reserve` positions holding `prompt`, and the prompt's last
    logits (1, vocab), evaluated: where a decode test or benchmark starts."""
    cache = model.make_cache()
    for layer_cache in cache:
        layer_cache.reserve(reserve)
    logits = prefill(model, prompt, cache)
    mx.eval(logits, [c.keys for c in cache], [c.values for c in cache])
    return cache, logits


def graph_nodes(*outputs: mx.array) -> int:
    """Primitives in the graph that computes `outputs` from evaluated inputs (what MLX walks and
    dispatches each time; `mx.export_to_dot` draws one rectangle per primitive)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".dot") as handle:
        mx.export_to_dot(handle.name, *outputs)
        return handle.read().decode().count("shape=rectangle")


def step_nodes(model) -> int:
    """Graph nodes of one decode step as generation runs it (fused, or the model-file step)."""
    mx.eval(model.parameters())  # weights made lazily (random models) are not part of the step
    cache = model.make_cache(64)
    prompt = mx.array([[1, 2, 3, 4]])
    for layer_cache in cache:
        layer_cache.reserve(16)
    logits = model(prompt, cache, last_only=True)[:, -1, :]
    fused = fused_decoder_for(model)
    if fused is not None:
        from .sampling import SamplingParams

        token = fused.start(cache, logits, SamplingParams(), [1, 2, 3, 4], 0)
        mx.eval(token, fused.state, fused.recent, [c.keys for c in cache], [c.values for c in cache])
        token = fused.advance()
        count = graph_nodes(token, fused.state)
        mx.eval(token, fused.state)
        return count
    mx.eval(logits, [c.keys for c in cache], [c.values for c in cache])
    return graph_nodes(decoder_for(model)(mx.array([5]), cache))
