"""Pipeline parallelism: each rank holds a contiguous range of layers, for models that do not fit one device.

Rank 0 holds the embedding and the first layers, the last rank the last layers, the final norm and
the LM head (and the embedding too when the head is tied to it). A forward pass runs the stages in
order: a rank receives the hidden states from the rank before it (`mx.distributed.recv_like`),
runs its layers, and sends them on (`mx.distributed.send`). The last rank's logits are then summed
with zeros from every other rank (`all_sum`): that hands every rank the same logits, so each
samples the same token, and it keeps each rank's send in the graph it evaluates.

A single sequence gains no speed this way (one stage works at a time); it gains memory: each rank
holds about 1/N of the layers. Layers are split as evenly as possible, the first ranks taking one
more where the count does not divide.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import ops
from .config import ModelConfig
from .engine.cache import KVCache
from .errors import FoundryError
from .layers import Embedding, Linear


@dataclasses.dataclass(frozen=True)
class PipelinePlan:
    """Which layers (and which of embedding, norm, LM head) rank `rank` of `size` holds."""

    config: ModelConfig
    rank: int
    size: int
    group: Any = None  # mx.distributed.Group

    def __post_init__(self) -> None:
        if self.size > self.config.num_hidden_layers:
            raise FoundryError(
                f"{self.size} pipeline ranks for {self.config.num_hidden_layers} layers leave some rank without a "
                "layer; use at most as many ranks as layers."
            )

    @property
    def layers(self) -> range:
        base, extra = divmod(self.config.num_hidden_layers, self.size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def keeps(self, name: str) -> bool:
        if name.startswith("model.layers."):
            return int(name.split(".")[2]) in self.layers
        if name == "model.embed_tokens.weight":  # the last rank needs it as a tied LM head
            return self.first or (self.last and self.config.tie_word_embeddings)
        return self.last  # model.norm, lm_head

    def shard(self, name: str, weight: Any) -> Any:
        return weight  # whole tensors: `keeps` already chose them

    def load_gguf(self, name: str, raw: np.ndarray, ggml_type, shape: tuple[int, ...], load: Callable) -> Any:
        return load(raw, shape)

    def build(self, config: ModelConfig, weights: dict[str, Any]) -> PipelineModel:
        if self.last and "lm_head.weight" not in weights and "model.embed_tokens.weight" not in weights:
            raise FoundryError("The model has neither lm_head.weight nor a tied embedding; the file is incomplete.")
        model = PipelineModel(config, weights, self)
        mx.eval(model.parameters())
        return model


class PipelineModel(nn.Module):
    """This rank's stage of a family's model, with the `Model` interface the engine uses."""

    def __init__(self, config: ModelConfig, weights: dict[str, Any], plan: PipelinePlan) -> None:
        super().__init__()
        family = importlib.import_module(f"foundry_mlx.models.{config.model_type}")
        self.config = config
        self.parallel = plan
        self.group = plan.group
        self.layers = [family.TransformerBlock(config, weights, i) for i in plan.layers]
        if plan.first:
            self.embed_tokens = Embedding(weights["model.embed_tokens.weight"])
        if plan.last:
            self.norm_weight = weights["model.norm.weight"]
            head = weights.get("lm_head.weight")
            if head is None or config.tie_word_embeddings:
                head = weights["model.embed_tokens.weight"]
            self.lm_head = Linear(head)

    @property
    def dtype(self) -> mx.Dtype:
        return self.layers[0].self_attn.norm_weight.dtype

    def make_cache(self, max_size: int | None = None) -> list[KVCache]:
        """One KV cache per layer of this stage."""
        limit = max_size or self.config.max_position_embeddings
        return [KVCache(limit) for _ in self.layers]

    def hidden(self, inputs: mx.array, cache: list[KVCache]) -> mx.array:
        """This stage's output (B, L, hidden); every rank but the last has also sent it on."""
        plan = self.parallel
        batch, length = inputs.shape
        if plan.first:
            h = self.embed_tokens(inputs)
        else:
            like = mx.zeros((batch, length, self.config.hidden_size), dtype=self.dtype)
            h = mx.distributed.recv_like(like, plan.rank - 1, group=self.group)
        mask = cache[0].attention_mask(length)
        for layer, layer_cache in zip(self.layers, cache):
            h = layer(h, mask, layer_cache)
        if not plan.last:
            h = mx.distributed.send(h, plan.rank + 1, group=self.group)
        return h

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None, last_only: bool = False) -> mx.array:
        """Logits (B, L, vocab), the same on every rank; `last_only` computes the last position only."""
        if cache is None:
            cache = self.make_cache(inputs.shape[1])
        h = self.hidden(inputs, cache)
        if last_only:
            h = h[:, -1:, :]
        if self.parallel.last:
            logits = ops.norm_linear(h, self.norm_weight, self.config.rms_norm_eps, self.lm_head)
        else:
            zeros = mx.zeros((*h.shape[:2], self.config.vocab_size), dtype=self.dtype)
            logits = mx.depends(zeros, h)
        return mx.distributed.all_sum(logits, group=self.group)
