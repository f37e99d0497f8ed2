"""The model on tiny GGUF models against an independent NumPy forward pass.

The reference below is written from the Hugging Face definition of Qwen2/Llama (RMSNorm, GQA
attention with a causal mask, half-split RoPE with the file's theta, SwiGLU, separate or tied
head) and runs on the float32 weights `gguf.quants.dequantize` sees in the written file, under
Hugging Face names and row order (tests/tiny_models.py un-permutes llama's Q/K with an index
permutation of its own). It computes in float64, so it is the exact result to within ~1e-12 and
the comparison bound measures only the engine's float32 error.

Bound: the engine runs in float32 (unit roundoff 6e-8). Each logit is a chain of dot products of
length <= 256 through 2 layers, softmax and RMSNorm; with round-off growing like sqrt(length) per
dot product and a few layers' gain, the expected relative error is ~1e-6 of the largest logit
(measured on these models: 4e-7 .. 8e-7). The test allows 2e-5 * max(1, max|reference|), twenty
times that. A load with a wrong Q/K row order, a wrong theta or a missing bias moves logits by
O(1) (asserted below too, so the bound is known to be sensitive).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import TinyModel, TinySpec, llama_quantized_spec, qwen2_quantized_spec, write_tiny_model

from foundry_mlx import load
from foundry_mlx.engine import generate as generate_module
from foundry_mlx.engine.generate import Session, stream_generate

RELATIVE_BOUND = 2e-5

SPECS = {
    "qwen2-f32": TinySpec(arch="qwen2", seed=10),
    "qwen2-quantized-tied": qwen2_quantized_spec(),
    "llama-quantized": llama_quantized_spec(),
    "llama-f32-tied": TinySpec(arch="llama", tied=True, rope_theta=10_000.0, eps=1e-5, seed=11),
}


# --- the independent reference -------------------------------------------------------------------


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_half_split(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Hugging Face `rotate_half` RoPE: x (L, heads, D); pairs (i, i + D/2)."""
    dim = x.shape[-1]
    inverse_frequencies = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # (D/2,)
    angles = positions[:, None].astype(np.float64) * inverse_frequencies[None, :]  # (L, D/2)
    cos = np.concatenate([np.cos(angles)] * 2, axis=-1)[:, None, :]
    sin = np.concatenate([np.sin(angles)] * 2, axis=-1)[:, None, :]
    rotated = np.concatenate([-x[..., dim // 2 :], x[..., : dim // 2]], axis=-1)
    return x * cos + rotated * sin


def reference_logits(tiny: TinyModel, ids: list[int], rope_theta: float | None = None,
                     weights: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """Logits (L, vocab) in float64 for the whole sequence `ids`."""
    spec = tiny.spec
    w = {k: v.astype(np.float64) for k, v in (weights or tiny.weights).items()}
    theta = spec.rope_theta if rope_theta is None else rope_theta
    length = len(ids)
    positions = np.arange(length)
    group = spec.heads // spec.kv_heads
    causal = np.triu(np.ones((length, length), dtype=bool), k=1)  # True where the key is in the future

    x = w["model.embed_tokens.weight"][ids]
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        h = rms_norm(x, w[p + "input_layernorm.weight"], spec.eps)

        def project(name: str, h: np.ndarray = h, p: str = p) -> np.ndarray:
            out = h @ w[p + f"self_attn.{name}.weight"].T
            return out + w[p + f"self_attn.{name}.bias"] if p + f"self_attn.{name}.bias" in w else out

        q = project("q_proj").reshape(length, spec.heads, spec.head_dim)
        k = project("k_proj").reshape(length, spec.kv_heads, spec.head_dim)
        v = project("v_proj").reshape(length, spec.kv_heads, spec.head_dim)
        q, k = rope_half_split(q, positions, theta), rope_half_split(k, positions, theta)
        heads = []
        for head in range(spec.heads):
            kv = head // group  # query head h reads KV head h // (heads / kv_heads), as HF's repeat_kv
            scores = q[:, head, :] @ k[:, kv, :].T / np.sqrt(spec.head_dim)
            scores[causal] = -np.inf
            scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
            heads.append((scores / scores.sum(axis=-1, keepdims=True)) @ v[:, kv, :])
        x = x + np.concatenate(heads, axis=-1) @ w[p + "self_attn.o_proj.weight"].T
        h = rms_norm(x, w[p + "post_attention_layernorm.weight"], spec.eps)
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "mlp.down_proj.weight"].T
    head = w["lm_head.weight"] if "lm_head.weight" in w else w["model.embed_tokens.weight"]
    return rms_norm(x, w["model.norm.weight"], spec.eps) @ head.T


def reference_greedy(tiny: TinyModel, ids: list[int], count: int) -> tuple[list[int], float]:
    """`count` greedy tokens after `ids` by full recomputation, and the smallest top-1/top-2 margin."""
    ids, out, margin = list(ids), [], np.inf
    for _ in range(count):
        last = reference_logits(tiny, ids)[-1]
        top = np.sort(last)[-2:]
        margin = min(margin, top[1] - top[0])
        out.append(int(np.argmax(last)))
        ids.append(out[-1])
    return out, margin


def assert_close(ours: np.ndarray, reference: np.ndarray) -> None:
    bound = RELATIVE_BOUND * max(1.0, float(np.abs(reference).max()))
    error = float(np.abs(ours.astype(np.float64) - reference).max())
    assert error <= bound, f"max |engine - reference| = {error:.3g} > {bound:.3g}"


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(SPECS))
def tiny(request, tmp_path_factory) -> TinyModel:
    return write_tiny_model(tmp_path_factory.mktemp("models") / f"{request.param}.gguf", SPECS[request.param])


@pytest.fixture(scope="module")
def loaded(tiny):
    """Exact load (Q6_K dense): every weight equals the gguf dequantization, so only float32 error remains."""
    model, tokenizer = load(str(tiny.path), progress=False, exact=True)
    return model, tokenizer


PROMPT = [272, 258, 264, 44, 258, 267, 268, 108, 100, 33, 288, 290, 5, 200, 17, 99, 256, 260, 30]


# --- the forward pass -------------------------------------------------------------------------------


def test_logits_match_numpy_reference(tiny, loaded):
    model, _ = loaded
    ours = np.array(model(mx.array(PROMPT)[None]))[0]
    assert ours.shape == (len(PROMPT), tiny.vocab_size)
    assert_close(ours, reference_logits(tiny, PROMPT))


def test_reference_is_sensitive_to_what_the_loader_must_get_right(tiny, loaded):
    """The bound above would catch a wrong theta or (for llama) Q/K left in GGUF row order."""
    model, _ = loaded
    ours = np.array(model(mx.array(PROMPT)[None]))[0].astype(np.float64)
    bound = RELATIVE_BOUND * max(1.0, float(np.abs(ours).max()))
    wrong_theta = reference_logits(tiny, PROMPT, rope_theta=tiny.spec.rope_theta * 7.3)
    assert np.abs(ours - wrong_theta).max() > 100 * bound
    if tiny.spec.arch == "llama":
        from tiny_models import llama_permute

        permuted = dict(tiny.weights)
        for i in range(tiny.spec.layers):
            q, k = f"model.layers.{i}.self_attn.q_proj.weight", f"model.layers.{i}.self_attn.k_proj.weight"
            permuted[q] = llama_permute(permuted[q], tiny.spec.heads, tiny.spec.heads)
            permuted[k] = llama_permute(permuted[k], tiny.spec.heads, tiny.spec.kv_heads)
        assert np.abs(ours - reference_logits(tiny, PROMPT, weights=permuted)).max() > 100 * bound


def test_default_load_is_close_to_exact(tiny):
    """The default load (Q6_K as 8-bit) stays near the reference. Q6_K's per-value error is at
    most half a level of its 8-bit group (quant._q6_k), so the logits move by a small fraction of
    their size: measured here 0.1% of max|logit| (the real model: 0.24 on logits of ~20, 1%).
    Allow 1%; a wrong sub-block order or scale would move them by O(1)."""
    model, _ = load(str(tiny.path), progress=False)
    ours = np.array(model(mx.array(PROMPT)[None]))[0]
    reference = reference_logits(tiny, PROMPT)
    if not any(t.name == "Q6_K" for t in tiny.tensor_types.values()):
        assert_close(ours, reference)
    else:
        assert np.abs(ours - reference).max() <= 0.01 * np.abs(reference).max()


def test_incremental_decode_equals_full_sequence(tiny, loaded):
    model, _ = loaded
    full = reference_logits(tiny, PROMPT)
    cache = model.make_cache()
    prefill = 7
    steps = [np.array(model(mx.array(PROMPT[:prefill])[None], cache))[0]]
    for token in PROMPT[prefill:]:
        steps.append(np.array(model(mx.array([[token]]), cache))[0])
    assert cache[0].offset == len(PROMPT)
    assert_close(np.concatenate(steps), full)


def test_last_only_is_the_last_row(tiny, loaded):
    model, _ = loaded
    last = np.array(model(mx.array(PROMPT)[None], last_only=True))[0]
    assert last.shape == (1, tiny.vocab_size)
    assert_close(last, reference_logits(tiny, PROMPT)[-1:])


def test_greedy_generation_matches_reference(tiny, loaded):
    model, tokenizer = loaded
    expected, margin = reference_greedy(tiny, PROMPT, 6)
    # A near-tie could legitimately flip under float32 error; these seeds have none.
    assert margin > 1e-2
    tokens = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=6)]
    assert tokens == expected


def test_chunked_prefill_equals_one_shot(tiny, loaded, monkeypatch):
    model, tokenizer = loaded
    one_shot_session = Session(model)
    one_shot = np.array(generate_module._prefill(model, one_shot_session, PROMPT))
    one_shot_tokens = [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=5)]

    monkeypatch.setattr(generate_module, "PREFILL_STEP", 4)  # 19 tokens: chunks of 4, 4, 4, 4, then 3
    chunked_session = Session(model)
    chunked = np.array(generate_module._prefill(model, chunked_session, PROMPT))
    assert chunked_session.cache[0].offset == len(PROMPT) == len(chunked_session.tokens)
    assert_close(chunked, reference_logits(tiny, PROMPT)[-1:])
    assert_close(one_shot, reference_logits(tiny, PROMPT)[-1:])
    assert [r.token for r in stream_generate(model, tokenizer, PROMPT, max_tokens=5)] == one_shot_tokens


def test_chunked_prefill_with_a_last_chunk_of_one(tiny, loaded, monkeypatch):
    model, _ = loaded
    monkeypatch.setattr(generate_module, "PREFILL_STEP", 6)  # 19 = 6 + 6 + 6 + 1: last chunk has no mask
    logits = np.array(generate_module._prefill(model, Session(model), PROMPT))
    assert_close(logits, reference_logits(tiny, PROMPT)[-1:])


# --- sessions --------------------------------------------------------------------------------------


def _tokens(model, tokenizer, ids, max_tokens, session=None) -> list[int]:
    return [r.token for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens, session=session)]


def test_session_reused_across_turns_equals_fresh_run(tiny, loaded):
    model, tokenizer = loaded
    session = Session(model)
    first = _tokens(model, tokenizer, PROMPT, 5, session)
    # The cache holds the prompt and every generated token but the last (never fed back).
    assert session.tokens == PROMPT + first[:-1]
    assert all(c.offset == len(session.tokens) for c in session.cache)
    second_prompt = PROMPT + first + [10, 258, 275]
    second = _tokens(model, tokenizer, second_prompt, 5, session)
    assert second == _tokens(model, tokenizer, second_prompt, 5)
    assert second == reference_greedy(tiny, second_prompt, 5)[0]


def test_session_that_diverges_is_trimmed(tiny, loaded):
    """A later prompt that shares only a prefix with the cache must not see the stale tail."""
    model, tokenizer = loaded
    session = Session(model)
    _tokens(model, tokenizer, PROMPT, 4, session)
    diverged = PROMPT[:10] + [7, 7, 7, 300 % tiny.vocab_size]
    assert _tokens(model, tokenizer, diverged, 4, session) == _tokens(model, tokenizer, diverged, 4)
    assert session.tokens[: len(diverged)] == diverged


def test_session_growing_past_one_cache_step(tiny, loaded):
    """The second turn needs more than 256 positions: the cache grows (with a copy) mid-session."""
    model, tokenizer = loaded
    rng = np.random.default_rng(5)
    long_prompt = rng.integers(0, 256, 200).tolist()
    session = Session(model)
    first = _tokens(model, tokenizer, long_prompt, 3, session)
    assert session.cache[0].capacity == 256
    second_prompt = long_prompt + first + rng.integers(0, 256, 80).tolist()
    second = _tokens(model, tokenizer, second_prompt, 3, session)
    assert session.cache[0].capacity == 512
    assert second == _tokens(model, tokenizer, second_prompt, 3)
    expected, margin = reference_greedy(tiny, second_prompt, 3)
    assert margin > 1e-2 and second == expected
