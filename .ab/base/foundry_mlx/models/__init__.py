"""Model families, found by file name: `models/{model_type}.py` defines `Model`."""

from __future__ import annotations

import importlib
from typing import Any

import mlx.core as mx

from ..config import ModelConfig
from ..errors import ModelFormatError

FAMILIES = ("qwen2", "llama", "gemma3")


def build(config: ModelConfig, weights: dict[str, Any]):
    """Instantiate the family's `Model` from converted weights, evaluated (loaded) now."""
    if config.model_type not in FAMILIES:
        raise ModelFormatError(
            f"Model type {config.model_type!r} is not supported; supported: {', '.join(FAMILIES)}."
        )
    module = importlib.import_module(f"{__name__}.{config.model_type}")
    model = module.Model(config, weights)
    mx.eval(model.parameters())
    return model


def split_projections(prefix: str, attention, mlp, config: ModelConfig) -> dict[str, Any]:
    """A layer's fused projections under Hugging Face names, split back apart: q/k/v (and their
    biases where the family has them), o, gate/up and down, as stored (quantized or dense). What
    `convert` writes for every family; a family adds its own norms around it."""
    from .. import quant

    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    weights: dict[str, Any] = {}
    for name, part in zip("qkv", quant.split_rows(attention.qkv_proj.stored, [q_rows, kv_rows, kv_rows])):
        weights[f"{prefix}.self_attn.{name}_proj.weight"] = part
    if "bias" in attention.qkv_proj:
        for name, part in zip("qkv", mx.split(attention.qkv_proj.bias, [q_rows, q_rows + kv_rows])):
            weights[f"{prefix}.self_attn.{name}_proj.bias"] = part
    weights[f"{prefix}.self_attn.o_proj.weight"] = attention.o_proj.stored
    gate, up = quant.split_rows(mlp.gate_up_proj.stored, [config.intermediate_size] * 2)
    weights[f"{prefix}.mlp.gate_proj.weight"] = gate
    weights[f"{prefix}.mlp.up_proj.weight"] = up
    weights[f"{prefix}.mlp.down_proj.weight"] = mlp.down_proj.stored
    return weights
