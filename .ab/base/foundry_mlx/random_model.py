"""Random-weight models of real architectures' exact shapes, for machines that cannot download.

Decode and prefill speed depend on shapes, bit widths and the number of kernels, not on the
weights' values, so a random model of Qwen2.5-0.5B's shape and its GGUF Q4_K_M bit mix times
like the real file. Values are drawn so activations stay finite through every layer (uniform
weights of variance 1/in_features), which keeps sampling and any NaN checks honest.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

from . import models
from .config import ModelConfig
from .quant import QuantizedWeight

SHAPES: dict[str, dict] = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, intermediate_size=4864, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, num_hidden_layers=28, intermediate_size=8960, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, intermediate_size=18944, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064),
}
QUANTS = ("q4km", "4bit", "8bit", "fp16")


@dataclass(frozen=True)
class Recipe:
    """Bits per role; None = dense."""

    default: int | None
    group_size: int
    embedding: int | None
    lm_head: int | None
    value_alternate: int | None  # v_proj and down_proj of every other layer (Q4_K_M's Q6_K choice)


def recipe(quant: str, hidden_size: int) -> Recipe:
    if quant == "q4km":
        # llama.cpp's Q4_K_M: Q4_K, with Q6_K for half of attn_v/ffn_down and the output; rows whose
        # width is not a multiple of 256 fall back to Q5_0 (0.5B: everything but ffn_down). Q6_K
        # loads as 8-bit, Q5_0 as 5-bit, Q4_K as 4-bit, all in groups of 32.
        base = 5 if hidden_size % 256 else 4
        return Recipe(base, 32, base, 8, 8)
    if quant == "4bit":
        return Recipe(4, 64, 4, 4, None)
    if quant == "8bit":
        return Recipe(8, 64, 8, 8, None)
    if quant == "fp16":
        return Recipe(None, 64, None, None, None)
    raise ValueError(f"unknown quantization {quant!r}; one of {', '.join(QUANTS)}")


def _matrix(rows: int, columns: int, bits: int | None, group_size: int, dtype: mx.Dtype, key: mx.array):
    bound = (3.0 / columns) ** 0.5
    if bits is None:
        return mx.random.uniform(-bound, bound, (rows, columns), key=key).astype(dtype)
    low_key, high_key = mx.random.split(key)
    shape = (rows, columns * bits // 32)
    low = mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32, key=low_key)
    words = low | (mx.random.randint(0, 1 << 16, shape, dtype=mx.uint32, key=high_key) << 16)
    groups = columns // group_size
    scale = mx.full((rows, groups), 2 * bound / (2**bits - 1), dtype=dtype)
    return QuantizedWeight(words, scale, mx.full((rows, groups), -bound, dtype=dtype), bits, group_size)


def make_random_model(shape: str, quant: str, dtype: mx.Dtype = mx.float16, seed: int = 0):
    """(model, tokenizer) of random weights; `shape` from SHAPES, `quant` from QUANTS."""
    sizes = SHAPES[shape]
    hidden, ffn = sizes["hidden_size"], sizes["intermediate_size"]
    heads, kv_heads = sizes["num_attention_heads"], sizes["num_key_value_heads"]
    head_dim = hidden // heads
    config = ModelConfig(model_type="qwen2", head_dim=head_dim, rms_norm_eps=1e-6, max_position_embeddings=32768,
                         rope_theta=1000000.0, tie_word_embeddings=False, attention_bias=True,
                         name=f"random {shape} {quant}", **sizes)
    plan = recipe(quant, hidden)
    # Q4_K needs rows of 256: where a width is not a multiple of it, the base type is used instead.
    down_bits = plan.default if plan.default != 5 else 4
    keys = iter(mx.random.split(mx.random.key(seed), 16 * config.num_hidden_layers + 8))
    weights = {
        "model.embed_tokens.weight": _matrix(config.vocab_size, hidden, plan.embedding, plan.group_size, dtype, next(keys)),
        "lm_head.weight": _matrix(config.vocab_size, hidden, plan.lm_head, plan.group_size, dtype, next(keys)),
        "model.norm.weight": mx.ones((hidden,), dtype=dtype),
    }
    for index in range(config.num_hidden_layers):
        prefix = f"model.layers.{index}"
        alternate = plan.value_alternate if index % 2 == 0 else None
        shapes = {
            "self_attn.q_proj": (heads * head_dim, hidden, plan.default),
            "self_attn.k_proj": (kv_heads * head_dim, hidden, plan.default),
            "self_attn.v_proj": (kv_heads * head_dim, hidden, alternate or plan.default),
            "self_attn.o_proj": (hidden, heads * head_dim, plan.default),
            "mlp.gate_proj": (ffn, hidden, plan.default),
            "mlp.up_proj": (ffn, hidden, plan.default),
            "mlp.down_proj": (hidden, ffn, alternate or down_bits),
        }
        for name, (rows, columns, bits) in shapes.items():
            weights[f"{prefix}.{name}.weight"] = _matrix(rows, columns, bits, plan.group_size, dtype, next(keys))
        for name, rows in (("q_proj", heads * head_dim), ("k_proj", kv_heads * head_dim), ("v_proj", kv_heads * head_dim)):
            weights[f"{prefix}.self_attn.{name}.bias"] = (0.1 * mx.random.normal((rows,), key=next(keys))).astype(dtype)
        weights[f"{prefix}.input_layernorm.weight"] = mx.ones((hidden,), dtype=dtype)
        weights[f"{prefix}.post_attention_layernorm.weight"] = mx.ones((hidden,), dtype=dtype)
    model = models.build(config, weights)
    model.source = f"random:{shape}:{quant}"
    return model, synthetic_tokenizer(config.vocab_size)


def synthetic_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer whose vocabulary has `vocab_size` entries (no merges): every id
    decodes, so any generated token streams as text; ChatML specials at the end."""
    from .tokenizer import Tokenizer
    from .tokenizer.gguf_vocab import bytes_to_unicode

    byte_tokens = list(bytes_to_unicode().values())
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    fillers = [f"Ġtoken{i}" for i in range(vocab_size - len(byte_tokens) - len(specials))]
    tokens = byte_tokens + fillers + specials
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": [],
        "tokenizer.ggml.token_type": [1] * (len(tokens) - 3) + [3, 3, 3],
        "tokenizer.ggml.eos_token_id": vocab_size - 1,
        "tokenizer.ggml.bos_token_id": vocab_size - 3,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    }
    return Tokenizer.from_gguf_metadata(metadata)
