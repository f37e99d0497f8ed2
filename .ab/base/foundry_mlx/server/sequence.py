"""One request as the scheduler runs it: prompt ids, KV cache, sampler, detokenizer, stop rules.

The decode rules are those of `engine.generate.stream_generate` (end-of-turn ids, stop strings
never emitted in part, `max_tokens`), applied one token at a time so that the scheduler can feed
the tokens of many sequences through one batched model step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

from ..engine.cache import KVCache
from ..engine.generate import _StopMatcher
from ..engine.sampling import Sampler, SamplingParams

RESERVE_TOKENS = 1024


@dataclass
class GenerationRequest:
    """What the HTTP layer asks the engine for (already validated)."""

    ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate through end-of-turn tokens (benchmarks, tests)


@dataclass
class Event:
    """New text of one sequence, sent to its client; `finish_reason` set on the last one."""

    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # "stop", "length", or "error"
    error: str | None = None
    time_to_first_token: float = 0.0


class LiveSequence:
    """The engine-side state of one request, from admission to its last token."""

    def __init__(self, request: GenerationRequest, tokenizer, emit: Callable[[Event], None]) -> None:
        self.request = request
        self.emit = emit
        self.sampler: Sampler | None = None  # MLX state is made on the engine thread (`start`)
        self.recent: mx.array | None = None
        self.detokenizer = tokenizer.detokenizer()
        self.stops = _StopMatcher(request.stop)
        self.eos = frozenset() if request.ignore_eos else tokenizer.eos_token_ids
        self.cache: list[KVCache] | None = None
        self.tokens: list[int] = []  # the ids the cache holds, in order
        self.cached_tokens = 0  # how many of the prompt came from the prompt cache
        self.started = False
        self.prefilled = False
        self.pending: int | None = None  # sampled, to be fed at the next step
        self.speculative: mx.array | None = None  # the next token, from a step queued ahead
        self.generated = 0
        self.finished = False
        self.cancelled = False
        self.submitted = time.perf_counter()
        self.first_token_time = 0.0

    @property
    def prompt_left(self) -> list[int]:
        """Prompt ids not yet in the cache."""
        return [] if self.prefilled or self.finished else self.request.ids[len(self.tokens) :]

    @property
    def decoding(self) -> bool:
        return self.pending is not None and not self.finished and not self.cancelled

    def start(self, cache: list[KVCache], cached: Sequence[int]) -> None:
        """Take a cache that already holds `cached` (a prefix of the prompt, maybe empty)."""
        self.started = True
        params = self.request.sampling
        self.sampler = Sampler(params)
        if params.repetition_penalty != 1.0:
            self.recent = mx.array(self.request.ids[-params.repetition_context :])
        self.cache = cache
        self.tokens = list(cached)
        self.cached_tokens = len(cached)
        # Room for the prompt and a reply of typical length up front; a longer one grows the cache
        # in steps, so that many clients asking for the whole context do not reserve it all at once.
        needed = len(self.request.ids) + min(self.request.max_tokens, RESERVE_TOKENS)
        for layer_cache in cache:
            layer_cache.reserve(needed)

    def sample(self, logits: mx.array, recent: mx.array | None = None) -> mx.array:
        """The next token (1,) from this sequence's last-position logits (1, vocab); `recent`
        overrides the recent tokens (a step queued before the last token was accepted)."""
        return self.sampler(logits, self.recent if recent is None else recent)

    def fed(self) -> None:
        """The pending token went through the model (its KV is in the cache now)."""
        self.tokens.append(self.pending)
        self.pending = None

    def accept(self, token: int) -> None:
        """A new token was sampled: emit its text, apply the stop rules."""
        self.generated += 1
        self.prefilled = True
        if self.generated == 1:
            self.first_token_time = time.perf_counter() - self.submitted
        if self.recent is not None:
            context = self.request.sampling.repetition_context
            self.recent = mx.concatenate([self.recent, mx.array([token])])[-context:]
        finished = token in self.eos
        text = "" if finished else self.detokenizer.add(token)
        reason = "stop" if finished else ("length" if self.generated >= self.request.max_tokens else None)
        if reason is not None:
            text += self.detokenizer.flush()
        text, hit = self.stops.feed(text, final=reason is not None)
        if hit:
            reason = "stop"
        if reason is None:
            self.pending = token
        else:
            self.finished = True
        self._send(self._event(text, reason))

    def fail(self, message: str) -> None:
        self.finished = True
        self._send(self._event("", "error", message))

    def _send(self, event: Event) -> None:
        try:
            self.emit(event)
        except Exception:  # the receiver is gone (its event loop closed): nobody waits for more
            self.cancelled = True

    def _event(self, text: str, reason: str | None, error: str | None = None) -> Event:
        return Event(
            text=text,
            prompt_tokens=len(self.request.ids),
            cached_tokens=self.cached_tokens,
            completion_tokens=self.generated,
            finish_reason=reason,
            error=error,
            time_to_first_token=self.first_token_time,
        )
