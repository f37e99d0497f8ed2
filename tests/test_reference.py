"""The real model against an independent reference (transformers on PyTorch, float32).

The reference data come from scripts/make_reference.py. Coherent text proves little (a wrong
Q/K row order still writes plausible sentences): these tests compare token ids and logits.

Tolerances, measured on these prompts (last-position logits, max |ours - reference|):
* exact load (Q6_K dense): 3e-5 .. 3e-4, float32 summation order only → bound 2e-3;
* default load (Q6_K as 8-bit, see quant._q6_k): 0.02 .. 0.24 → bound 0.5.
Greedy tokens must agree until the end of a turn, except after a near-tie: a divergence is
accepted only where the reference's top-1/top-2 margin at that step is below the mode's bound
(twice the logit bound: the two logits can each move by it), and nothing is compared after it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import generate

DATA = Path(__file__).parent / "data"
REFERENCE = json.loads((DATA / "reference_qwen.json").read_text())
LOGITS = np.load(DATA / "reference_qwen_logits.npz")
CASES = {case["name"]: case for case in REFERENCE["cases"]}
LOGIT_BOUND = {"exact": 2e-3, "default": 0.5}

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["exact", "default"])
def loaded(request):
    return request.param, request.getfixturevalue("qwen_exact" if request.param == "exact" else "qwen")


@pytest.mark.parametrize("name", CASES)
def test_prompt_tokens_and_template_match_reference(qwen, name):
    _, tokenizer = qwen
    case = CASES[name]
    if "messages" in case:
        assert tokenizer.apply_chat_template(case["messages"], add_generation_prompt=True) == case["prompt"]
    assert tokenizer.encode(case["prompt"], add_special_tokens=False) == case["prompt_ids"]


@pytest.mark.parametrize("name", CASES)
def test_last_position_logits_match_reference(loaded, name):
    mode, (model, _) = loaded
    case = CASES[name]
    ours = np.array(model(mx.array([case["prompt_ids"]]), last_only=True)[0, -1])
    reference = LOGITS[name]
    difference = np.abs(ours - reference).max()
    assert difference < LOGIT_BOUND[mode], f"{mode}: max |Δlogit| {difference:.4g}"
    assert ours.argmax() == reference.argmax() or reference[ours.argmax()] > reference.max() - 2 * LOGIT_BOUND[mode]


def first_divergence(ours: list[int], reference: list[int]) -> int | None:
    for index, (a, b) in enumerate(zip(ours, reference)):
        if a != b:
            return index
    return None


@pytest.mark.parametrize("name", CASES)
def test_greedy_continuation_matches_reference(loaded, name):
    mode, (model, tokenizer) = loaded
    case = CASES[name]
    reference = case["greedy_ids"]
    ours = [r.token for r in _stream(model, tokenizer, case["prompt_ids"], len(reference))]
    # We stop at an end-of-turn token; the reference recorded past it: compare up to our stop.
    assert len(ours) == len(reference) or ours[-1] in tokenizer.eos_token_ids
    index = first_divergence(ours, reference)
    if index is not None:
        margin = case["margins"][index]
        assert margin < 2 * LOGIT_BOUND[mode], (
            f"{mode}: token {index} is {ours[index]}, reference {reference[index]} "
            f"(reference margin {margin:.3f} is no near-tie)"
        )


def _stream(model, tokenizer, ids, max_tokens):
    from foundry_mlx import stream_generate

    return list(stream_generate(model, tokenizer, ids, max_tokens=max_tokens))


def test_greedy_text_of_the_chat_case(qwen):
    """The text, not only the ids, comes out right through the streaming detokenizer."""
    model, tokenizer = qwen
    case = CASES["chat_code"]
    text = generate(model, tokenizer, case["prompt_ids"], max_tokens=len(case["greedy_ids"]))
    assert text == tokenizer.decode(case["greedy_ids"])
