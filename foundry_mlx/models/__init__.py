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
