"""Prefill and decode: turn a prompt into a stream of tokens.

* Prefill runs the new prompt tokens through the model in chunks (MLX's batched GEMM paths), at
  any start position: a follow-up turn prefills only what the KV cache does not already hold.
* Decode pipelines: step n+1 is queued with `mx.async_eval` before token n is handed to Python,
  so graph building and the host round trip overlap the GPU's work. The one `.item()` per step
  is the token that must be emitted.
* Stops on end-of-turn ids, stop strings (never emitting a partial match), or `max_tokens`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from ..errors import ContextLengthError, FoundryError
from .cache import KVCache
from .decoder import decode_ahead, decoder_for, fused_decoder_for
from .prefill import prefill
from .sampling import Sampler, SamplingParams, _fresh_seed

PREFILL_STEP = 2048


@dataclass
class GenerationResponse:
    """One step of a stream: the new text and the running statistics."""

    text: str
    token: int | None
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    time_to_first_token: float = 0.0
    peak_memory_gb: float = 0.0
    finish_reason: str | None = None  # "stop", "length", or None while running


@dataclass
class Session:
    """A KV cache and the token ids it holds, reused across the turns of a conversation."""

    model: object
    cache: list[KVCache] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cache:
            self.cache = self.model.make_cache()

    @property
    def context_length(self) -> int:
        return self.model.config.max_position_embeddings

    def reuse(self, ids: Sequence[int]) -> int:
        """Keep the cached prefix shared with `ids` (at least one id left to run); return its length."""
        shared = 0
        for cached, new in zip(self.tokens, ids):
            if cached != new:
                break
            shared += 1
        shared = min(shared, len(ids) - 1)
        for layer_cache in self.cache:  # a sliding-window cache may no longer hold a shorter prefix
            shared = min(shared, getattr(layer_cache, "reusable_prefix", lambda n: n)(shared))
        for layer_cache in self.cache:
            layer_cache.trim(shared)
        del self.tokens[shared:]
        return shared


def _encode(tokenizer, prompt: str | Sequence[int]) -> list[int]:
    if not isinstance(prompt, str):
        return list(prompt)
    bos = tokenizer.id_to_token(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else None
    # A prompt rendered from a chat template may already start with BOS: never add a second one.
    return tokenizer.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))


def stream_generate(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    max_tokens: int = 256,
    sampling: SamplingParams | None = None,
    stop: Sequence[str] = (),
    session: Session | None = None,
    ignore_eos: bool = False,
    **sampling_kwargs,
) -> Iterator[GenerationResponse]:
    """Generate up to `max_tokens` tokens after `prompt`, yielding text as it becomes final.

    `sampling` (or keyword arguments of `SamplingParams`: temperature, top_k, top_p, min_p,
    repetition_penalty, seed) chooses the sampler; the default is greedy. Pass a `Session` to keep
    the KV cache across calls (multi-turn chat). `ignore_eos` generates through end-of-turn
    tokens (benchmarks).
    """
    sampling = sampling or SamplingParams(**sampling_kwargs)
    sampler = Sampler(sampling)
    ids = _encode(tokenizer, prompt)
    if not ids:
        raise FoundryError("The prompt is empty; give at least one token of text.")
    if max_tokens < 1:
        raise FoundryError(f"max_tokens must be at least 1, got {max_tokens}.")
    session = session or Session(model)
    cached = session.reuse(ids)
    needed = len(ids) + max_tokens
    if needed > session.context_length:
        raise ContextLengthError(
            f"The conversation so far ({len(ids)} tokens) plus max tokens ({max_tokens}) needs "
            f"{needed} positions, more than the model's context of {session.context_length}; "
            "shorten the prompt or lower --max-tokens."
        )
    for layer_cache in session.cache:
        layer_cache.reserve(needed)

    mx.reset_peak_memory()
    start = time.perf_counter()
    logits = _prefill(model, session, ids[cached:])
    runner = _runner(model, session, sampling, sampler, ids, logits)
    ahead = runner.ahead
    pending = deque([runner.first])
    mx.async_eval(runner.first)
    queued = 0  # decode steps queued: each feeds one token to the model

    detokenizer = tokenizer.detokenizer()
    stops = _StopMatcher(stop)
    eos = frozenset() if ignore_eos else tokenizer.eos_token_ids
    prompt_tokens = len(ids) - cached
    first_token_time = 0.0
    for count in range(1, max_tokens + 1):
        # Queue the next steps now; they run while Python handles this token below. Before the
        # first token only one: building `ahead` steps' graphs first (~0.3-1 ms of host time each)
        # delayed the first token by all of them while the device already ran them, which inflated
        # both the time to first token and the decode rate measured from it.
        while queued < max_tokens - 1 and len(pending) <= (1 if count == 1 else ahead):
            pending.append(runner.advance(pending[-1]))
            mx.async_eval(pending[-1])
            queued += 1
        value = pending.popleft().item()
        if count <= queued:
            session.tokens.append(value)  # it was fed to the model by a step already queued
        if count == 1:
            first_token_time = time.perf_counter() - start
        finished = value in eos
        text = "" if finished else detokenizer.add(value)
        reason = "stop" if finished else ("length" if count == max_tokens else None)
        if reason is not None:
            text += detokenizer.flush()
        text, hit = stops.feed(text, final=reason is not None)
        if hit:
            reason = "stop"
        elapsed = time.perf_counter() - start - first_token_time
        yield GenerationResponse(
            text=text,
            token=value,
            prompt_tokens=prompt_tokens,
            prompt_tps=prompt_tokens / max(first_token_time, 1e-9),
            generation_tokens=count,
            generation_tps=(count - 1) / elapsed if count > 1 and elapsed > 0 else 0.0,
            time_to_first_token=first_token_time,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
            finish_reason=reason,
        )
        if reason is not None:
            # Steps queued past the end fed tokens nobody will see: forget their cache positions.
            for layer_cache in session.cache:
                layer_cache.trim(len(session.tokens))
            return


class _ReferenceRunner:
    """Logits from the model-file step (compiled, per-kernel or reference ops), then `Sampler`."""

    ahead = 1

    def __init__(self, model, session: Session, sampling: SamplingParams, sampler: Sampler, ids, logits) -> None:
        self.decode = decoder_for(model)
        self.session, self.sampler, self.sampling = session, sampler, sampling
        self.recent = mx.array(ids[-sampling.repetition_context :]) if sampling.repetition_penalty != 1.0 else None
        self.first = sampler(logits, self.recent)

    def advance(self, token: mx.array) -> mx.array:
        if self.recent is not None:
            self.recent = mx.concatenate([self.recent, token])[-self.sampling.repetition_context :]
        return self.sampler(self.decode(token, self.session.cache), self.recent)


class _FusedRunner:
    """The fused step (kernels/fused_step.py): tokens and sampling stay on the device, so steps can
    be queued several ahead of the token Python is handling (FOUNDRY_DECODE_AHEAD, default 8: on the
    H200, 0.5B shape, 616 tok/s with one step ahead, 878 with four)."""

    def __init__(self, fused, session: Session, sampling: SamplingParams, ids, logits) -> None:
        self.fused = fused
        self.ahead = decode_ahead(8)
        seed = sampling.seed if sampling.seed is not None else _fresh_seed()
        self.first = fused.start(session.cache, logits, sampling, list(ids), seed)

    def advance(self, token: mx.array) -> mx.array:
        return self.fused.advance()


def _runner(model, session: Session, sampling: SamplingParams, sampler: Sampler, ids, logits):
    fused = fused_decoder_for(model)
    if fused is not None:
        return _FusedRunner(fused, session, sampling, ids, logits)
    return _ReferenceRunner(model, session, sampling, sampler, ids, logits)


def _prefill(model, session: Session, new_ids: list[int]) -> mx.array:
    """Run the uncached prompt ids through the model; return the last position's logits (1, vocab)."""
    position = 0
    while len(new_ids) - position > PREFILL_STEP:
        chunk = mx.array(new_ids[position : position + PREFILL_STEP])[None]
        model.hidden(chunk, session.cache)
        mx.eval([c.keys for c in session.cache] + [c.values for c in session.cache])
        mx.clear_cache()
        position += PREFILL_STEP
    logits = prefill(model, new_ids[position:], session.cache)
    session.tokens.extend(new_ids)
    return logits


def generate(model, tokenizer, prompt: str | Sequence[int], max_tokens: int = 256, **kwargs) -> str:
    """The whole completion of `prompt` as one string (see `stream_generate` for the options)."""
    return "".join(response.text for response in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))


class _StopMatcher:
    """Holds back text that could be the start of a stop string; cuts at the first full match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str, final: bool) -> tuple[str, bool]:
        if not self.stops:
            return text, False
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.pending = self.pending[:cut], ""
            return out, True
        if final:
            out, self.pending = self.pending, ""
            return out, False
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out, False
