"""Which path each operation of a decode step takes: a custom GPU kernel or the reference (plain
MLX ops), and why. `foundry-mlx info` prints this table; it is derived from the same facts the
model files and `ops.py` act on (the family's layer structure, the kernel set's limits, the backend).
"""

from __future__ import annotations

import os

from .config import ModelConfig
from .kernels import sdpa

GEMV = "custom GEMV kernel"
ATTENTION = "custom decode-attention kernel"


def _attention(config: ModelConfig) -> tuple[str, str]:
    if config.extra.get("attn_logit_softcapping"):
        return "reference", "soft-capped scores: no kernel has the cap"
    if not sdpa.supported(config.head_dim):
        return "reference", f"head dim {config.head_dim} is outside the kernel's 8..256"
    return ATTENTION, f"{config.num_attention_heads} query / {config.num_key_value_heads} KV heads, head dim {config.head_dim}"


def _qwen2_llama(config: ModelConfig, backend: str) -> list[tuple[str, str, str]]:
    plan = [
        ("RMSNorm + Q/K/V projection + RoPE", GEMV, "norm, bias and RoPE fused in one launch"),
        ("attention", *_attention(config)),
        ("o_proj + residual", GEMV, "residual add fused"),
        ("RMSNorm + gate/up + SwiGLU", GEMV, "norm and SwiGLU fused"),
        ("down + residual", GEMV, "residual add fused"),
        ("final RMSNorm + lm_head", GEMV, "norm fused"),
    ]
    switch = os.environ.get("FOUNDRY_FUSED", "")
    fused = switch == "1" or (switch != "0" and backend == "cuda")
    if fused and sdpa.supported(config.head_dim):
        plan[0] = (plan[0][0], GEMV, "norm, bias and RoPE fused; writes K/V into the cache in place")
        plan.append(("sampling", "custom sampling kernel", "penalty, temperature, top-k/p, min-p, seeded draw on device"))
        plan.append(("decode step", "fused", "5 kernels per layer + 3, token in and out on the device "
                                              "(kernels/fused_step.py; FOUNDRY_FUSED=0 turns it off); on CUDA "
                                              "one launch per layer where a layer fits in L2 (kernels/fused_layer.py)"))
        plan.append(("server batch", "fused batch", "concurrent requests as rows of one fused step, the same "
                                                    "launches for any B (kernels/fused_batch.py)"))
    else:
        why = "FOUNDRY_FUSED=0" if switch == "0" else f"the fused step is off by default on {backend} (FOUNDRY_FUSED=1)"
        plan.append(("sampling", "reference", "MLX ops on the logits"))
        plan.append(("decode step", "compiled", f"one mx.compile trace per 256 positions; {why}"))
        plan.append(("server batch", "model file", "left-padded batched KV cache, MLX ops (engine/batch.py)"))
    return plan


def _gemma3(config: ModelConfig) -> list[tuple[str, str, str]]:
    return [
        ("RMSNorm + Q/K/V projection", GEMV, "norm fused; RoPE not: the Q/K norms come first"),
        ("Q/K RMSNorm + RoPE", "reference", "per-head norm before RoPE: no fused kernel"),
        ("attention (local ring, global)", *_attention(config)),
        ("o_proj", GEMV, "no residual fused: the post-attention norm comes first"),
        ("post-attention / post-FFN RMSNorm + residual", "reference", "a norm between projection and residual"),
        ("RMSNorm + gate/up", GEMV, "norm fused"),
        ("GeGLU (gelu_tanh(gate) * up)", "reference", "the GEMV's activation epilogue is SwiGLU only"),
        ("down", GEMV, "no residual fused: the post-FFN norm comes first"),
        ("final RMSNorm + lm_head", GEMV, "norm fused"),
        ("decode step", "eager", "the compiled step's fixed-shape cache does not model ring buffers"),
    ]


def decode_paths(config: ModelConfig, backend: str) -> list[tuple[str, str, str]]:
    """(operation, path, reason) for one decode step of `config` on `backend` (metal, cuda, reference).
    Quantized weights are assumed (dense weights, as with --exact, take the reference GEMV path)."""
    plan = _gemma3(config) if config.model_type == "gemma3" else _qwen2_llama(config, backend)
    if backend != "reference":
        return plan
    reason = "no Metal or CUDA backend in this MLX, or --kernels reference"
    return [
        (op, path, why) if path in ("compiled", "eager", "reference") and "fused step" not in why
        else (op, "reference", reason) if path != "compiled" else (op, "compiled", "one mx.compile trace per 256 positions")
        for op, path, why in plan
    ]


DECODE_STEPS = ("auto", "per-op", "fused", "layer")


def select_decode_step(choice: str) -> None:
    """Set this process's decode-step switches for `choice` (what `foundry-mlx bench --decode-step`
    does): per-op = the compiled model-file step (FOUNDRY_FUSED=0); fused = five kernels per layer
    (FOUNDRY_FUSED=1, FOUNDRY_LAYER_KERNEL=0), the switch to flip on a Mac; layer = one launch per
    layer (on Metal an experiment, kernels/fused_layer_metal.py); auto = the defaults. Call it before
    the first decode step is built."""
    if choice not in DECODE_STEPS:
        raise ValueError(f"decode step {choice!r} is not one of {', '.join(DECODE_STEPS)}")
    settings = {"per-op": {"FOUNDRY_FUSED": "0"}, "fused": {"FOUNDRY_FUSED": "1", "FOUNDRY_LAYER_KERNEL": "0"},
                "layer": {"FOUNDRY_FUSED": "1", "FOUNDRY_LAYER_KERNEL": "1"}}.get(choice, {})
    os.environ.update(settings)


def check_decode_step(choice: str, model, backend: str) -> None:
    """Raise a one-sentence FoundryError when `choice` cannot run `model` on `backend`."""
    from .errors import FoundryError
    from .kernels import fused_step

    if choice in ("fused", "layer"):
        if backend not in ("metal", "cuda"):
            raise FoundryError(f"--decode-step {choice} needs MLX's Metal or CUDA backend (this run has "
                               f"{backend}); use --decode-step per-op or auto.")
        reason = fused_step.unsupported_reason(model)
        if reason is not None:
            raise FoundryError(f"--decode-step {choice} cannot run this model: {reason}; use per-op or auto.")
