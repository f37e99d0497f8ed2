"""Sampling (`engine/sampling.py`) against NumPy: which tokens each filter keeps, the repetition
penalty, seeding, and the distribution of draws."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx.engine.sampling import (
    Sampler,
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
)
from foundry_mlx.errors import FoundryError

VOCAB = 200


def random_logits(seed: int, vocab: int = VOCAB, scale: float = 3.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((1, vocab)) * scale).astype(np.float32)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kept(filtered: mx.array) -> set[int]:
    values = np.array(filtered)[0]
    assert not np.isnan(values).any()
    return set(np.flatnonzero(np.isfinite(values)).tolist())


# NumPy definitions of the sets, written from the definitions, not from the engine.

def numpy_top_k(logprobs: np.ndarray, k: int) -> set[int]:
    return set(np.argsort(-logprobs[0], kind="stable")[:k].tolist())


def numpy_top_p(logprobs: np.ndarray, top_p: float) -> tuple[set[int], float]:
    """The smallest set of most likely tokens whose mass reaches top_p; and how close any
    token's "mass before it" is to top_p (the boundary where float rounding could decide)."""
    order = np.argsort(-logprobs[0])
    probs = np.exp(logprobs[0][order])
    before = np.cumsum(probs) - probs
    keep = before < top_p
    return set(order[keep].tolist()), float(np.min(np.abs(before - top_p)))


def numpy_min_p(logprobs: np.ndarray, min_p: float) -> tuple[set[int], float]:
    probs = np.exp(logprobs[0])
    threshold = min_p * probs.max()
    return set(np.flatnonzero(probs >= threshold).tolist()), float(np.min(np.abs(probs - threshold)) / threshold)


# --- filters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 2, 7, 50, VOCAB - 1])
def test_top_k_keeps_exactly_the_k_most_likely(seed, k):
    logprobs = log_softmax(random_logits(seed))
    assert kept(apply_top_k(mx.array(logprobs.astype(np.float32)), k)) == numpy_top_k(logprobs, k)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.9, 0.99])
def test_top_p_keeps_the_smallest_set_reaching_p(seed, top_p):
    logprobs = log_softmax(random_logits(seed))
    expected, distance = numpy_top_p(logprobs, top_p)
    assert distance > 1e-5, "a token sits on the boundary: pick another seed"
    assert kept(apply_top_p(mx.array(logprobs.astype(np.float32)), top_p)) == expected


def test_top_p_always_keeps_the_most_likely_token():
    logprobs = log_softmax(np.array([[10.0, 0.0, -1.0, -2.0]], dtype=np.float32))  # p(top) > 0.99
    assert kept(apply_top_p(mx.array(logprobs.astype(np.float32)), 0.01)) == {0}


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.9])
def test_min_p_keeps_tokens_above_the_scaled_maximum(seed, min_p):
    logprobs = log_softmax(random_logits(seed))
    expected, distance = numpy_min_p(logprobs, min_p)
    assert distance > 1e-5, "a token sits on the boundary: pick another seed"
    assert kept(apply_min_p(mx.array(logprobs.astype(np.float32)), min_p)) == expected


def test_filters_leave_kept_values_unchanged():
    logprobs = log_softmax(random_logits(9)).astype(np.float32)
    for filtered in (apply_top_k(mx.array(logprobs), 10), apply_top_p(mx.array(logprobs), 0.7),
                     apply_min_p(mx.array(logprobs), 0.2)):
        values = np.array(filtered)[0]
        finite = np.isfinite(values)
        np.testing.assert_array_equal(values[finite], logprobs[0][finite])
        assert (values[~finite] == -np.inf).all()


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(temperature=1.0, top_k=3, seed=1), lambda lp: numpy_top_k(lp, 3)),
        (SamplingParams(temperature=1.0, top_p=0.5, seed=2), lambda lp: numpy_top_p(lp, 0.5)[0]),
        (SamplingParams(temperature=1.0, min_p=0.3, seed=3), lambda lp: numpy_min_p(lp, 0.3)[0]),
        (SamplingParams(temperature=0.7, top_k=20, top_p=0.8, min_p=0.05, seed=4),
         lambda lp: numpy_top_k(lp, 20) & numpy_top_p(log_softmax(lp / 0.7), 0.8)[0]),
    ],
    ids=["top-k", "top-p", "min-p", "combined"],
)
def test_sampler_draws_only_from_the_kept_set(params, allowed):
    logits = random_logits(21, vocab=50, scale=2.0)
    allowed_set = allowed(log_softmax(logits))
    sampler = Sampler(params)
    draws = {int(sampler(mx.array(logits)).item()) for _ in range(300)}
    assert draws <= allowed_set
    assert len(draws) >= min(2, len(allowed_set))


def test_top_k_1_with_a_temperature_is_greedy():
    """`--top-k 1 -t 0.8`: the only kept token is the most likely one."""
    logits = random_logits(6)
    sampler = Sampler(SamplingParams(temperature=0.8, top_k=1, seed=0))
    assert {int(sampler(mx.array(logits)).item()) for _ in range(20)} == {int(np.argmax(logits))}


# --- greedy, temperature, repetition penalty --------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_argmax(seed):
    logits = random_logits(seed)
    token = Sampler(SamplingParams())(mx.array(logits))
    assert token.shape == (1,) and int(token.item()) == int(np.argmax(logits))


def test_greedy_ignores_the_seed_and_the_filters():
    logits = random_logits(3)
    for params in (SamplingParams(seed=1), SamplingParams(seed=2, top_k=5, top_p=0.5, min_p=0.2)):
        assert int(Sampler(params)(mx.array(logits)).item()) == int(np.argmax(logits))


def numpy_repetition_penalty(logits: np.ndarray, recent: list[int], penalty: float) -> np.ndarray:
    out = logits.copy()
    for token in set(recent):
        out[0, token] = out[0, token] / penalty if out[0, token] > 0 else out[0, token] * penalty
    return out


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_numpy(penalty):
    logits = random_logits(5)
    recent = [3, 17, 17, 42, 199, 0, 3]  # duplicates are penalized once
    got = np.array(apply_repetition_penalty(mx.array(logits), mx.array(recent), penalty))
    np.testing.assert_allclose(got, numpy_repetition_penalty(logits, recent, penalty), rtol=1e-6)


def test_repetition_penalty_changes_the_greedy_choice():
    logits = np.array([[2.0, 1.9, -1.0, 0.5]], dtype=np.float32)
    sampler = Sampler(SamplingParams(repetition_penalty=1.5))
    assert int(sampler(mx.array(logits)).item()) == 0
    # 2.0 / 1.5 = 1.33 < 1.9: the repeated token loses its lead.
    assert int(sampler(mx.array(logits), mx.array([0])).item()) == 1
    # Negative logits are multiplied (pushed down), never divided (which would raise them).
    logits = np.array([[-1.0, -1.2]], dtype=np.float32)
    assert int(sampler(mx.array(logits), mx.array([1])).item()) == 0
    assert int(sampler(mx.array(logits), mx.array([0])).item()) == 1


def test_sampler_leaves_the_callers_logits_alone():
    logits = mx.array(random_logits(8))
    before = np.array(logits)
    Sampler(SamplingParams(temperature=1.0, repetition_penalty=1.5, seed=0))(logits, mx.array([int(np.argmax(before))]))
    np.testing.assert_array_equal(np.array(logits), before)


# --- seeds and the distribution --------------------------------------------------------------------


def draws(params: SamplingParams, logits: np.ndarray, count: int) -> list[int]:
    sampler = Sampler(params)
    array = mx.array(logits)
    return [int(sampler(array).item()) for _ in range(count)]


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = random_logits(11, vocab=30, scale=1.0)
    first = draws(SamplingParams(temperature=1.0, seed=1234), logits, 60)
    assert draws(SamplingParams(temperature=1.0, seed=1234), logits, 60) == first
    assert draws(SamplingParams(temperature=1.0, seed=4321), logits, 60) != first


def test_seeded_sampler_ignores_the_global_rng():
    logits = random_logits(12, vocab=30, scale=1.0)
    mx.random.seed(0)
    first = draws(SamplingParams(temperature=1.0, seed=7), logits, 20)
    mx.random.seed(99)
    mx.random.uniform(shape=(10,))
    assert draws(SamplingParams(temperature=1.0, seed=7), logits, 20) == first


def test_unseeded_samplers_differ():
    logits = random_logits(13, vocab=30, scale=0.5)
    assert draws(SamplingParams(temperature=1.0), logits, 40) != draws(SamplingParams(temperature=1.0), logits, 40)


# chi-square critical values at p = 0.001 (df 4: 18.467, df 2: 13.816): with the seeds fixed the
# test is deterministic; the threshold says how unlikely a correct sampler is to exceed it.
CHI2_CRITICAL = {4: 18.467, 2: 13.816}


def chi_square(observed: np.ndarray, probabilities: np.ndarray) -> float:
    expected = probabilities * observed.sum()
    return float(((observed - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_draws_follow_the_softmax_distribution(temperature):
    logits = np.array([[1.0, 0.0, 2.0, -0.5, 0.7]], dtype=np.float32)
    probabilities = np.exp(log_softmax(logits / temperature))[0]
    counts = np.bincount(draws(SamplingParams(temperature=temperature, seed=2024), logits, 4000), minlength=5)
    assert chi_square(counts, probabilities) < CHI2_CRITICAL[4]


def test_chi_square_would_catch_a_wrong_temperature():
    """The test above has power: draws at temperature 1 fail against the temperature-0.5 law."""
    logits = np.array([[1.0, 0.0, 2.0, -0.5, 0.7]], dtype=np.float32)
    counts = np.bincount(draws(SamplingParams(temperature=1.0, seed=2024), logits, 4000), minlength=5)
    assert chi_square(counts, np.exp(log_softmax(logits / 0.5))[0]) > 10 * CHI2_CRITICAL[4]


def test_draws_after_top_k_follow_the_renormalized_distribution():
    logits = np.array([[1.0, 0.0, 2.0, -0.5, 0.7]], dtype=np.float32)
    counts = np.bincount(draws(SamplingParams(temperature=1.0, top_k=3, seed=77), logits, 3000), minlength=5)
    assert counts[1] == counts[3] == 0
    top = np.array([0, 2, 4])
    probabilities = np.exp(logits[0][top] - log_softmax(logits[:, top]).max())
    probabilities /= probabilities.sum()
    assert chi_square(counts[top], probabilities) < CHI2_CRITICAL[2]


# --- parameters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params, name",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_k=-1), "top-k"),
        (dict(top_p=0.0), "top-p"),
        (dict(top_p=1.5), "top-p"),
        (dict(top_p=-0.1), "top-p"),
        (dict(min_p=1.0), "min-p"),
        (dict(min_p=-0.1), "min-p"),
        (dict(repetition_penalty=0.0), "repetition penalty"),
        (dict(repetition_penalty=-2.0), "repetition penalty"),
    ],
)
def test_invalid_parameters_raise_foundry_error(params, name):
    with pytest.raises(FoundryError, match=name) as error:
        Sampler(SamplingParams(**params))
    assert "\n" not in str(error.value)
    with pytest.raises(FoundryError):
        SamplingParams(**params).validate()


def test_valid_edge_parameters_are_accepted():
    for params in (dict(temperature=0.0), dict(top_k=0), dict(top_p=1.0), dict(min_p=0.0), dict(repetition_penalty=1.0)):
        Sampler(SamplingParams(**params))
