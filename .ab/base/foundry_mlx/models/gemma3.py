"""Gemma 3 (text): grouped-query attention with Q/K RMSNorm, four RMSNorms per layer, GeGLU, and
sliding-window (local) layers interleaved with global ones, each kind with its own RoPE base.

Read top to bottom: Attention → MLP → TransformerBlock → Model. What sets Gemma apart from the
Qwen2/Llama file:

* RMSNorm scales by `1 + weight` (the Hugging Face weight is kept for `convert`; the `1 +` is
  taken once here, `_norm_weight`);
* embeddings are multiplied by √hidden_size (in float32, as transformers and llama.cpp do;
  mlx-lm rounds the factor to bfloat16 first, 25.25 instead of 25.30 for hidden 640);
* each sub-layer's output is normed again before the residual add (post-attention and
  post-feed-forward norms), so residual adds cannot be fused into the projections;
* queries and keys are RMS-normed per head before RoPE; scores are scaled by
  query_pre_attn_scalar^-½;
* every `sliding_window_pattern`-th layer is global (RoPE base rope_theta, with its scaling);
  the others see the last `sliding_window` positions only (RoPE base rope_local_base_freq) and
  keep a `RotatingKVCache` of that size, so their memory stays flat in a long chat;
* the MLP is GeGLU: gelu_tanh(gate) * up; the logits may be soft-capped (Gemma 2's
  final_logit_softcapping; absent in Gemma 3 files).

The projections go through `ops` (the quantized GEMV kernels on a GPU, with the RMSNorm fused into
the projection that follows it); Q/K norms, RoPE, GeGLU and the post-norms stay on the reference
path (`decode_paths` lists which op takes which path). Decode runs eagerly (`eager_decode`):
the compiled step's fixed-shape cache view does not model a ring buffer.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from .. import ops
from ..config import ModelConfig
from ..engine.cache import KVCache
from ..engine.rotating_cache import RotatingKVCache
from ..layers import Embedding, Linear, RoPE
from . import split_projections


def _norm_weight(hf_weight: mx.array) -> mx.array:
    return 1.0 + hf_weight


def is_global(config: ModelConfig, index: int) -> bool:
    pattern = config.extra.get("sliding_window_pattern", 6)
    return index % pattern == pattern - 1


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, Any], prefix: str, global_layer: bool) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.eps = config.rms_norm_eps
        self.scale = config.extra.get("query_pre_attn_scalar", config.head_dim) ** -0.5
        self.softcap = config.extra.get("attn_logit_softcapping")
        self.norm_weight = _norm_weight(weights[f"{prefix}.input_layernorm.weight"])
        self.q_norm_weight = _norm_weight(weights[f"{prefix}.self_attn.q_norm.weight"])
        self.k_norm_weight = _norm_weight(weights[f"{prefix}.self_attn.k_norm.weight"])
        self.qkv_proj = Linear.fused([weights[f"{prefix}.self_attn.{p}_proj.weight"] for p in "qkv"])
        self.o_proj = Linear(weights[f"{prefix}.self_attn.o_proj.weight"])
        if global_layer:
            self.rope = RoPE(config.head_dim, config.rope_theta, config.rope_scaling)
        else:
            self.rope = RoPE(config.head_dim, config.extra.get("rope_local_base_freq", 10000.0))

    def __call__(self, x: mx.array, mask: str | mx.array | None, cache) -> mx.array:
        """Attention(RMSNorm(x)), before the post-attention norm."""
        batch, length, _ = x.shape
        qkv = ops.norm_linear(x, self.norm_weight, self.eps, self.qkv_proj)
        q_rows, kv_rows = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = mx.split(qkv, [q_rows, q_rows + kv_rows], axis=-1)
        q = q.reshape(batch, length, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(batch, length, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(batch, length, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = self.rope(mx.fast.rms_norm(q, self.q_norm_weight, self.eps), cache.offset)
        k = self.rope(mx.fast.rms_norm(k, self.k_norm_weight, self.eps), cache.offset)
        k, v = cache.update_and_fetch(k, v)
        if self.softcap:
            out = _softcapped_attention(q, k, v, self.scale, mask, self.softcap)
        else:
            out = ops.attention(q, k, v, self.scale, mask, cache)
        return ops.linear(out, self.o_proj)


def _softcapped_attention(q, k, v, scale, mask, cap) -> mx.array:
    """Attention with tanh-capped scores (Gemma 2), in plain ops: no fused kernel has the cap."""
    repeats = q.shape[1] // k.shape[1]
    k, v = mx.repeat(k, repeats, axis=1), mx.repeat(v, repeats, axis=1)
    scores = cap * mx.tanh((q * scale) @ k.swapaxes(-1, -2) / cap)
    if isinstance(mask, str):
        length, total = q.shape[2], k.shape[2]
        mask = mx.arange(total)[None] <= mx.arange(total - length, total)[:, None]
    if mask is not None:
        scores = mx.where(mask, scores, -math.inf)
    out = mx.softmax(scores, axis=-1, precise=True) @ v
    batch, _, length, _ = q.shape
    return out.transpose(0, 2, 1, 3).reshape(batch, length, -1)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, Any], prefix: str) -> None:
        super().__init__()
        self.eps = config.rms_norm_eps
        self.norm_weight = _norm_weight(weights[f"{prefix}.pre_feedforward_layernorm.weight"])
        self.gate_up_proj = Linear.fused([weights[f"{prefix}.mlp.{p}_proj.weight"] for p in ("gate", "up")])
        self.down_proj = Linear(weights[f"{prefix}.mlp.down_proj.weight"])

    def __call__(self, h: mx.array) -> mx.array:
        """down(gelu_tanh(gate(n)) * up(n)), n = RMSNorm(h); before the post-feed-forward norm."""
        gate, up = mx.split(ops.norm_linear(h, self.norm_weight, self.eps, self.gate_up_proj), 2, axis=-1)
        return ops.linear(nn.gelu_approx(gate) * up, self.down_proj)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, weights: dict[str, Any], index: int) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        self.is_global = is_global(config, index)
        self.eps = config.rms_norm_eps
        self.self_attn = Attention(config, weights, prefix, self.is_global)
        self.mlp = MLP(config, weights, prefix)
        self.post_attention_norm = _norm_weight(weights[f"{prefix}.post_attention_layernorm.weight"])
        self.post_feedforward_norm = _norm_weight(weights[f"{prefix}.post_feedforward_layernorm.weight"])

    def __call__(self, x: mx.array, mask: str | mx.array | None, cache) -> mx.array:
        h = _residual(x, mx.fast.rms_norm(self.self_attn(x, mask, cache), self.post_attention_norm, self.eps))
        return _residual(h, mx.fast.rms_norm(self.mlp(h), self.post_feedforward_norm, self.eps))


def _residual(x: mx.array, y: mx.array) -> mx.array:
    """x + y; in float16 (the GPU default) added in float32 and clipped to float16's range, as
    mlx-lm does: Gemma's residual stream can exceed 65504 and would become inf."""
    if x.dtype != mx.float16:
        return x + y
    bound = mx.finfo(mx.float16).max
    return mx.clip(x.astype(mx.float32) + y.astype(mx.float32), -bound, bound).astype(mx.float16)


class Model(nn.Module):
    eager_decode = True  # see the module docstring

    def __init__(self, config: ModelConfig, weights: dict[str, Any]) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = Embedding(weights["model.embed_tokens.weight"])
        self.embed_scale = math.sqrt(config.hidden_size)
        self.layers = [TransformerBlock(config, weights, i) for i in range(config.num_hidden_layers)]
        self.norm_weight = _norm_weight(weights["model.norm.weight"])
        self.final_softcap = config.extra.get("final_logit_softcapping")
        if config.tie_word_embeddings or "lm_head.weight" not in weights:
            self.lm_head = self.embed_tokens.as_linear()
        else:
            self.lm_head = Linear(weights["lm_head.weight"])

    def make_cache(self, max_size: int | None = None) -> list[KVCache | RotatingKVCache]:
        """A growing cache for each global layer, a window-sized ring for each local one."""
        limit = max_size or self.config.max_position_embeddings
        window = self.config.extra["sliding_window"]
        return [KVCache(limit) if layer.is_global else RotatingKVCache(window, limit) for layer in self.layers]

    def hidden(self, inputs: mx.array, cache: list) -> mx.array:
        """The last layer's output (B, L, hidden) for token ids (B, L), before the final norm."""
        h = self.embed_tokens(inputs)
        h = h * mx.array(self.embed_scale, dtype=mx.float32).astype(h.dtype)
        length = inputs.shape[1]
        masks = {}
        for layer, layer_cache in zip(self.layers, cache):
            if layer.is_global not in masks:  # every layer of a kind has the same offset
                masks[layer.is_global] = layer_cache.attention_mask(length)
            h = layer(h, masks[layer.is_global], layer_cache)
        return h

    def __call__(self, inputs: mx.array, cache: list | None = None, last_only: bool = False) -> mx.array:
        """Logits (B, L, vocab) for token ids (B, L); `last_only` computes the last position only."""
        if cache is None:
            cache = self.make_cache(inputs.shape[1])
        h = self.hidden(inputs, cache)
        if last_only:
            h = h[:, -1:, :]
        logits = ops.norm_linear(h, self.norm_weight, self.config.rms_norm_eps, self.lm_head)
        if self.final_softcap:
            logits = self.final_softcap * mx.tanh(logits / self.final_softcap)
        return logits

    def hf_weights(self) -> dict[str, Any]:
        """The weights under Hugging Face / mlx-lm names (fused projections split, norms as stored)."""
        config = self.config
        weights: dict[str, Any] = {
            "model.embed_tokens.weight": self.embed_tokens.table.stored,
            "model.norm.weight": self.norm_weight - 1.0,
        }
        if self.lm_head is not self.embed_tokens.table:
            weights["lm_head.weight"] = self.lm_head.stored
        for index, layer in enumerate(self.layers):
            prefix, attention, mlp = f"model.layers.{index}", layer.self_attn, layer.mlp
            norms = {
                "input_layernorm": attention.norm_weight,
                "self_attn.q_norm": attention.q_norm_weight,
                "self_attn.k_norm": attention.k_norm_weight,
                "post_attention_layernorm": layer.post_attention_norm,
                "pre_feedforward_layernorm": mlp.norm_weight,
                "post_feedforward_layernorm": layer.post_feedforward_norm,
            }
            for name, weight in norms.items():
                weights[f"{prefix}.{name}.weight"] = weight - 1.0
            weights |= split_projections(prefix, attention, mlp, config)
        return weights
