"""Gemma 3 on a tiny generated GGUF (tests/tiny_models.py `gemma3_spec`: 6 layers, layer 5 global,
a sliding window of 8) against transformers on the same file (scripts/make_tiny_gemma3_reference.py):
sequences five times the window, so the local layers' ring buffers wrap again and again, through
every path that fills them (one prefill, token-by-token decode, a follow-up prefill at an offset);
and the memory those caches hold in a chat far longer than the window.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import gemma3_spec, write_tiny_model

from foundry_mlx import load
from foundry_mlx.engine.chat import Chat
from foundry_mlx.engine.decoder import decoder_for
from foundry_mlx.engine.rotating_cache import RotatingKVCache

REFERENCE = json.loads((Path(__file__).parent / "data" / "reference_gemma3_tiny.json").read_text())
SEQUENCE = REFERENCE["sequence"]
LOGITS = np.array(REFERENCE["logits"], dtype=np.float32)
# Same dequantized weights on both sides: float32 summation order only (measured ≤ 2e-5).
BOUND = 1e-3


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    tiny = write_tiny_model(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf", gemma3_spec())
    assert hashlib.sha256(tiny.path.read_bytes()).hexdigest() == REFERENCE["gguf_sha256"], "regenerate the reference"
    model, tokenizer = load(str(tiny.path), progress=False, dtype="float32")
    return tiny, model, tokenizer


def test_layer_kinds_and_config(tiny_gemma):
    tiny, model, _ = tiny_gemma
    assert [layer.is_global for layer in model.layers] == [t == "full_attention" for t in REFERENCE["config"]["layer_types"]]
    assert model.config.extra["sliding_window"] == REFERENCE["config"]["sliding_window"] == tiny.spec.sliding_window
    assert model.config.extra["query_pre_attn_scalar"] == REFERENCE["config"]["query_pre_attn_scalar"]


def test_one_prefill_matches_reference(tiny_gemma):
    _, model, _ = tiny_gemma
    ours = np.array(model(mx.array([SEQUENCE])))[0]
    assert np.abs(ours - LOGITS).max() < BOUND


def test_decode_token_by_token_matches_reference(tiny_gemma):
    _, model, _ = tiny_gemma
    cache = model.make_cache()
    first = np.array(model(mx.array([SEQUENCE[:6]]), cache, last_only=True))[0, -1]
    differences = [np.abs(first - LOGITS[5]).max()]
    decode = decoder_for(model)
    for position in range(6, len(SEQUENCE)):
        logits = np.array(decode(mx.array([SEQUENCE[position]]), cache))[0]
        differences.append(np.abs(logits - LOGITS[position]).max())
    assert max(differences) < BOUND, differences
    assert cache[0].offset == len(SEQUENCE) and cache[0].keys.shape[2] == 8


@pytest.mark.parametrize("cut", [3, 8, 15, 17])
def test_follow_up_prefill_at_an_offset_matches_reference(tiny_gemma, cut):
    _, model, _ = tiny_gemma
    cache = model.make_cache()
    model(mx.array([SEQUENCE[:cut]]), cache)
    ours = np.array(model(mx.array([SEQUENCE[cut:]]), cache))[0]
    assert np.abs(ours - LOGITS[cut:]).max() < BOUND


def test_greedy_continuation_matches_reference(tiny_gemma):
    from foundry_mlx import stream_generate

    _, model, tokenizer = tiny_gemma
    ours = [
        r.token
        for r in stream_generate(
            model, tokenizer, REFERENCE["prompt"], max_tokens=len(REFERENCE["greedy_ids"]), ignore_eos=True
        )
    ]
    index = next((i for i, (a, b) in enumerate(zip(ours, REFERENCE["greedy_ids"])) if a != b), None)
    assert index is None or REFERENCE["margins"][index] < 2 * BOUND


def test_local_layers_keep_the_window_in_a_long_chat(tiny_gemma):
    """A chat ~25 times longer than the window: each local layer's cache stays at exactly the
    window's bytes, measured after every turn; the global layer's grows with the conversation."""
    tiny, model, tokenizer = tiny_gemma
    spec = tiny.spec
    window_bytes = spec.sliding_window * spec.kv_heads * spec.head_dim * 2 * 4  # K and V, float32
    chat = Chat(model, tokenizer)
    local_sizes, global_sizes, lengths = [], [], []
    for turn in range(6):
        for _ in chat.send(f"turn {turn}: the answer is {turn * 7}", max_tokens=24):
            pass
        caches = chat.session.cache
        local_sizes.append({c.nbytes for c in caches if isinstance(c, RotatingKVCache)})
        global_sizes.append(sum(c.nbytes for c in caches if not isinstance(c, RotatingKVCache)))
        lengths.append(caches[0].offset)
    assert lengths[-1] > 20 * spec.sliding_window
    assert local_sizes == [{window_bytes}] * 6
    assert global_sizes[-1] > global_sizes[0] > 0


def test_a_diverging_turn_after_the_ring_wrapped_recomputes(tiny_gemma):
    """Session.reuse cannot cut a wrapped ring back: it prefills from 0, and the logits are the
    reference's."""
    from foundry_mlx.engine.generate import Session, _prefill

    _, model, _ = tiny_gemma
    session = Session(model)
    _prefill(model, session, SEQUENCE[:30])
    altered = SEQUENCE[:20] + [(SEQUENCE[20] + 1) % 256] + SEQUENCE[21:25]
    assert session.reuse(altered) == 0
    logits = np.array(_prefill(model, session, altered))[0]
    fresh = np.array(model(mx.array([altered]), last_only=True))[0, -1]
    assert np.abs(logits - fresh).max() < BOUND
    assert session.reuse(SEQUENCE[:5]) == 0  # the ring wrapped: nothing reusable


def test_info_lists_the_path_of_each_operation(tiny_gemma):
    from foundry_mlx.decode_paths import decode_paths
    from foundry_mlx.describe import describe

    tiny, model, _ = tiny_gemma
    text = describe(str(tiny.path))
    assert "sliding window 8" in text and "every 6th layer global" in text
    assert re.search(r"GeGLU.*reference \(the GEMV's activation epilogue is SwiGLU only\)", text)
    assert re.search(r"decode step\s+eager", text)
    on_gpu = dict((op, path) for op, path, _ in decode_paths(model.config, "cuda"))
    assert on_gpu["RMSNorm + Q/K/V projection"] == on_gpu["down"] == "custom GEMV kernel"
    assert on_gpu["attention (local ring, global)"] == "custom decode-attention kernel"
    assert on_gpu["Q/K RMSNorm + RoPE"] == "reference"
    on_cpu = {path for _, path, _ in decode_paths(model.config, "reference")}
    assert on_cpu == {"reference", "eager"}


MLX_LM_EMBED_SCALE = "mlx-lm rounds √hidden to bfloat16 before scaling the embeddings"


def test_mlx_lm_loads_the_converted_tiny_gemma(tiny_gemma, tmp_path):
    """`convert` writes an mlx-lm `gemma3_text` directory (HF norm weights, per-layer bits, tied head):
    mlx-lm's logits equal ours once our embedding factor is rounded as mlx-lm rounds it (bfloat16),
    and differ by little with the exact factor that transformers and llama.cpp use."""
    import json as json_module

    import mlx_lm

    from foundry_mlx.formats import mlx_dir

    _, model, tokenizer = tiny_gemma
    out = mlx_dir.save_directory(model, tokenizer, tmp_path / "gemma-mlx", progress=False)
    config = json_module.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["sliding_window"] == 8
    lm_model, _ = mlx_lm.load(str(out))
    ids = mx.array([SEQUENCE])
    theirs = np.array(lm_model(ids))[0]
    exact = np.array(model(ids))[0]
    rounded = float(mx.array(model.embed_scale, dtype=mx.bfloat16).astype(mx.float32).item())
    original, model.embed_scale = model.embed_scale, rounded
    try:
        same_factor = np.array(model(ids))[0]
    finally:
        model.embed_scale = original
    assert np.abs(same_factor - theirs).max() < BOUND
    assert 0 < np.abs(exact - theirs).max() < 0.5, MLX_LM_EMBED_SCALE
    reloaded, _ = load(str(out), progress=False)  # and foundry-mlx reads its own output back
    assert np.abs(np.array(reloaded(ids))[0] - exact).max() < 1e-6


def test_convert_can_write_a_named_template(tiny_gemma, tmp_path):
    from click.testing import CliRunner

    from foundry_mlx.cli import main
    from foundry_mlx.tokenizer import Tokenizer

    tiny, _, _ = tiny_gemma
    result = CliRunner().invoke(main, ["convert", str(tiny.path), str(tmp_path / "out"), "--chat-template", "gemma"])
    assert result.exit_code == 0, result.output
    saved = Tokenizer.from_directory(tmp_path / "out")
    assert saved.apply_chat_template([{"role": "user", "content": "hi"}]).endswith("<start_of_turn>model\n")


def test_float16_residual_stream_is_clipped_not_inf(tiny_gemma):
    """The GPU default dtype: a residual stream past float16's range is clipped (as mlx-lm does),
    so the logits stay finite; at ordinary scale float16 tracks float32."""
    from foundry_mlx.models.gemma3 import _residual

    big = mx.array([60000.0, -60000.0, 1.0], dtype=mx.float16)
    assert np.isfinite(np.array(_residual(big, big).astype(mx.float32))).all()
    assert np.array(_residual(big, big).astype(mx.float32)).tolist()[:2] == [65504.0, -65504.0]
    tiny, _, _ = tiny_gemma
    half, _ = load(str(tiny.path), progress=False, dtype="float16")
    logits = np.array(half(mx.array([SEQUENCE[:12]])).astype(mx.float32))[0]
    assert np.isfinite(logits).all() and np.abs(logits - LOGITS[:12]).max() < 0.1 * np.abs(LOGITS[:12]).max()


class _TwinKernels:
    """Stands in for a GPU kernel set on the CPU: the same calls `ops` makes to the custom kernels,
    answered by the kernels' reference twins. It proves the plumbing a GPU decode step of Gemma
    relies on: which ops take the kernel path, the fused norms, and decode attention reading the
    ring buffer through `valid_length`."""

    backend = "twin"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def linear(self, x, layer, residual=None, norm_weight=None, eps=None, swiglu=False):
        from foundry_mlx.kernels import qgemv

        variant = qgemv.Variant(norm=norm_weight is not None, residual=residual is not None, swiglu=swiglu)
        self.calls.append(variant.name)
        return qgemv.reference(variant, x, layer.quantized, norm_weight=norm_weight, eps=eps,
                               residual=residual).reshape(1, 1, -1)

    @staticmethod
    def supports_attention(head_dim: int) -> bool:
        from foundry_mlx.kernels import sdpa

        return sdpa.supported(head_dim)

    def decode_attention(self, q, keys, values, valid, scale):
        from foundry_mlx.kernels import sdpa

        self.calls.append(f"attention over {int(valid)} of {keys.shape[2]}")
        return sdpa.reference(q, keys, values, int(valid), scale).reshape(1, 1, -1)


def test_decode_through_the_kernel_path_matches_reference(tiny_gemma, monkeypatch):
    from foundry_mlx import kernels

    _, model, _ = tiny_gemma
    twin = _TwinKernels()
    monkeypatch.setattr(kernels, "active", lambda: twin)
    cache = model.make_cache()
    model(mx.array([SEQUENCE[:6]]), cache)  # prefill stays on MLX's own paths
    assert twin.calls == []
    decode = decoder_for(model)
    for position in range(6, 30):
        logits = np.array(decode(mx.array([SEQUENCE[position]]), cache))[0]
        assert np.abs(logits - LOGITS[position]).max() < BOUND, position
    per_step = len(twin.calls) // 24
    assert per_step == 6 * 5 + 1  # per layer: qkv (norm), attention, o_proj, gate/up (norm), down; lm_head
    assert "attention over 8 of 8" in twin.calls and "attention over 30 of 256" in twin.calls
    assert {"foundry_qgemv_norm", "foundry_qgemv"} == {c for c in twin.calls if c.startswith("foundry")}
