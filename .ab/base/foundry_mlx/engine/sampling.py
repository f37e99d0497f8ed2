"""Token sampling on device: greedy, temperature, top-k, top-p, min-p, repetition penalty.

Everything here is `mlx` ops on the logits, so the decode loop never copies the vocabulary-sized
logits to the host; only the chosen token id crosses. Randomness comes from an explicit key
split once per step, so the same seed gives the same tokens whatever else uses MLX's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from ..errors import FoundryError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1 disables
    repetition_context: int = 64  # how many recent tokens the penalty looks at
    seed: int | None = None

    def validate(self) -> None:
        if self.temperature < 0:
            raise FoundryError(f"temperature must be >= 0, got {self.temperature}.")
        if self.top_k < 0:
            raise FoundryError(f"top-k must be >= 0 (0 disables it), got {self.top_k}.")
        if not 0 < self.top_p <= 1:
            raise FoundryError(f"top-p must be in (0, 1], got {self.top_p}.")
        if not 0 <= self.min_p < 1:
            raise FoundryError(f"min-p must be in [0, 1), got {self.min_p}.")
        if self.repetition_penalty <= 0:
            raise FoundryError(f"repetition penalty must be > 0, got {self.repetition_penalty}.")


class Sampler:
    """Maps last-position logits (1, vocab) and recent tokens to the next token id (1,)."""

    def __init__(self, params: SamplingParams) -> None:
        params.validate()
        self.params = params
        self._key = mx.random.key(params.seed if params.seed is not None else _fresh_seed())

    def __call__(self, logits: mx.array, recent: mx.array | None = None) -> mx.array:
        p = self.params
        logits = logits.astype(mx.float32)
        if p.repetition_penalty != 1.0 and recent is not None and recent.size > 0:
            logits = apply_repetition_penalty(logits, recent, p.repetition_penalty)
        if p.temperature == 0:
            return mx.argmax(logits, axis=-1)
        logprobs = logits / p.temperature
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        if p.top_k > 0 and p.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, p.top_k)
        if p.top_p < 1.0:
            logprobs = apply_top_p(logprobs, p.top_p)
        if p.min_p > 0.0:
            logprobs = apply_min_p(logprobs, p.min_p)
        self._key, step_key = mx.random.split(self._key)
        return mx.random.categorical(logprobs, key=step_key)


def _fresh_seed() -> int:
    import secrets

    return secrets.randbits(31)


def apply_repetition_penalty(logits: mx.array, recent: mx.array, penalty: float) -> mx.array:
    """CTRL-style: divide positive logits of recent tokens by `penalty`, multiply negative ones."""
    chosen = logits[:, recent]
    chosen = mx.where(chosen > 0, chosen / penalty, chosen * penalty)
    logits[:, recent] = chosen
    return logits


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens."""
    kth = mx.sort(logprobs, axis=-1)[:, -k, None]  # not [-k : -k + 1]: empty for k = 1
    return mx.where(logprobs < kth, -mx.inf, logprobs)


def apply_top_p(logprobs: mx.array, top_p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches `top_p`."""
    order = mx.argsort(-logprobs, axis=-1)
    sorted_logprobs = mx.take_along_axis(logprobs, order, axis=-1)
    cumulative = mx.cumsum(mx.exp(sorted_logprobs), axis=-1)
    # A token stays if the mass before it is below top_p (so the most likely always stays).
    keep_sorted = (cumulative - mx.exp(sorted_logprobs)) < top_p
    kept = mx.where(keep_sorted, sorted_logprobs, -mx.inf)
    inverse = mx.argsort(order, axis=-1)
    return mx.take_along_axis(kept, inverse, axis=-1)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Keep tokens whose probability is at least `min_p` times the most likely one's."""
    threshold = mx.max(logprobs, axis=-1, keepdims=True) + mx.log(mx.array(min_p))
    return mx.where(logprobs < threshold, -mx.inf, logprobs)
