"""Qwen2 / Qwen2.5: a decoder-only transformer with grouped-query attention, Q/K/V biases,
RMSNorm, SwiGLU and half-split RoPE.

Read top to bottom: Attention → MLP → TransformerBlock → Model. The hot operations go through
`ops` (reference MLX ops or custom kernels); this file holds no kernel code. Two fusions shape
the layers: Q, K and V are one matrix (one GEMV reads them all), and so are gate and up. Each
RMSNorm is applied inside the projection that follows it and each residual add inside the
projection that precedes it, so the decode step launches few kernels. O and down go through
`all_sum_linear` and the LM head through `gather_norm_linear`: the `ops` calls, plus the sum or
gather over ranks when `tensor_parallel` has sharded them.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from ..config import ModelConfig
from ..engine.cache import KVCache
from ..layers import Embedding, Linear, RoPE, attention_scale
from ..tensor_parallel import all_sum_linear, gather_norm_linear


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, Any], prefix: str) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.eps = config.rms_norm_eps
        self.scale = attention_scale(config.head_dim)
        self.norm_weight = weights[f"{prefix}.input_layernorm.weight"]
        projections = [f"{prefix}.self_attn.{p}_proj" for p in "qkv"]
        self.qkv_proj = Linear.fused(
            [weights[f"{p}.weight"] for p in projections], [weights.get(f"{p}.bias") for p in projections]
        )
        self.o_proj = Linear(weights[f"{prefix}.self_attn.o_proj.weight"])
        self.rope = RoPE(config.head_dim, config.rope_theta, config.rope_scaling)

    def __call__(self, x: mx.array, mask: str | mx.array | None, cache: KVCache) -> mx.array:
        """x + Attention(RMSNorm(x))."""
        q, k, v = ops.norm_qkv_rope(
            x, self.norm_weight, self.eps, self.qkv_proj, self.rope, cache.offset, self.n_heads, self.n_kv_heads
        )
        k, v = cache.update_and_fetch(k, v)
        out = ops.attention(q, k, v, self.scale, mask, cache)
        return all_sum_linear(out, self.o_proj, residual=x)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, Any], prefix: str) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.norm_weight = weights[f"{prefix}.post_attention_layernorm.weight"]
        self.gate_up_proj = Linear.fused([weights[f"{prefix}.mlp.{p}_proj.weight"] for p in ("gate", "up")])
        self.down_proj = Linear(weights[f"{prefix}.mlp.down_proj.weight"])

    def __call__(self, h: mx.array) -> mx.array:
        """h + down(silu(gate(RMSNorm(h))) * up(RMSNorm(h)))."""
        activation = ops.norm_swiglu(h, self.norm_weight, self.eps, self.gate_up_proj)
        return all_sum_linear(activation, self.down_proj, residual=h)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, Any], index: int) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        self.self_attn = Attention(config, weights, prefix)
        self.mlp = MLP(config, weights, prefix)

    def __call__(self, x: mx.array, mask: str | mx.array | None, cache: KVCache) -> mx.array:
        return self.mlp(self.self_attn(x, mask, cache))


class Model(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(weights["model.embed_tokens.weight"])
        self.layers = [TransformerBlock(config, weights, i) for i in range(config.num_hidden_layers)]
        self.norm_weight = weights["model.norm.weight"]
        if config.tie_word_embeddings or "lm_head.weight" not in weights:
            self.lm_head = self.embed_tokens.as_linear()
        else:
            self.lm_head = Linear(weights["lm_head.weight"])

    def make_cache(self, max_size: int | None = None) -> list[KVCache]:
        """One KV cache per layer, growing on demand up to `max_size` (default: the context)."""
        limit = max_size or self.config.max_position_embeddings
        return [KVCache(limit) for _ in self.layers]

    def hidden(self, inputs: mx.array, cache: list[KVCache]) -> mx.array:
        """The last layer's output (B, L, hidden) for token ids (B, L), before the final norm."""
        return self.run_layers(self.embed(inputs), cache)

    def embed(self, inputs: mx.array) -> mx.array:
        """Token ids (B, L) → the first layer's input (B, L, hidden)."""
        return self.embed_tokens(inputs)

    def run_layers(self, h: mx.array, cache: list[KVCache], start: int = 0) -> mx.array:
        """h through layers start, start + 1, … (one per cache given): `hidden` in pieces, for a
        prefill traced and queued in segments (engine/prefill.py)."""
        mask = cache[0].attention_mask(h.shape[1])
        for layer, layer_cache in zip(self.layers[start:], cache):
            h = layer(h, mask, layer_cache)
        return h

    def __call__(self, inputs: mx.array, cache: list[KVCache] | None = None, last_only: bool = False) -> mx.array:
        """Logits (B, L, vocab) for token ids (B, L); `last_only` computes the last position only."""
        if cache is None:
            cache = self.make_cache(inputs.shape[1])
        h = self.hidden(inputs, cache)
        if last_only:
            h = h[:, -1:, :]
        return self.head(h)

    def head(self, h: mx.array) -> mx.array:
        """Logits (B, L, vocab) of hidden states (B, L, hidden): the final norm and the LM head (a
        method of its own so a compiled prefill, engine/prefill.py, can apply it at one position)."""
        return gather_norm_linear(h, self.norm_weight, self.config.rms_norm_eps, self.lm_head)
