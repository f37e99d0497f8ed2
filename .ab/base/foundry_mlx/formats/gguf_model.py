"""A GGUF file as a model: its `ModelConfig` and its weights under Hugging Face names.

Weights are converted to the internal representation by `quant.py`. Two GGUF conventions are
undone here so that the rest of the engine sees one layout for every family:

* llama.cpp's converter permutes the rows of Q and K of `llama`-architecture models (Llama,
  Mistral, SmolLM) so that RoPE rotates adjacent pairs (GGML "normal" RoPE). The permutation is
  reversed on the raw rows (exact, also for quantized rows), so every model uses the half-split
  ("NeoX", `traditional=False`) RoPE, as the Hugging Face weights do.
* GGUF names (`blk.3.attn_q.weight`) become Hugging Face names (`model.layers.3.self_attn.q_proj.weight`),
  which is also what `convert` writes for mlx-lm.
* Gemma's RMSNorm multiplies by `1 + weight`, and llama.cpp's converter stores `1 + weight` in the
  GGUF (convert_hf_to_gguf.py, Gemma3Model: `data_torch + 1` for every `norm.weight`; the
  stored values centre near 1, not 0). The Hugging Face weight is restored here (minus 1, as
  transformers' GGUF loader does), so `convert` writes what mlx-lm's `gemma3_text` expects;
  `models/gemma3.py` adds the 1 back once at load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from .. import quant
from ..config import ModelConfig
from ..errors import ModelFormatError
from .gguf import GGUFFile

SUPPORTED_ARCHITECTURES = ("qwen2", "llama", "gemma3")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Gemma 3 has four norms per layer; its `ffn_norm` is the one before the MLP.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_LAYER_NAMES_BY_ARCHITECTURE = {"gemma3": _GEMMA3_LAYER_NAMES}
# llama.cpp's fixed Gemma 3 facts (llama-model.cpp): every 6th layer global, local RoPE base 10k.
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def hf_name(gguf_name: str, architecture: str = "llama") -> str | None:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None if not a weight we use."""
    parts = gguf_name.split(".")
    layer_names = _LAYER_NAMES_BY_ARCHITECTURE.get(architecture, _LAYER_NAMES)
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def read_config(gguf: GGUFFile) -> ModelConfig:
    """The model's hyper-parameters from `{arch}.*` metadata."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelFormatError(
            f"{gguf.path.name} is a {arch!r} model; this engine supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (Qwen2/2.5, Llama 2/3, Mistral, SmolLM)."
        )

    def get(key: str, default: Any = None, per_layer: bool = False) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelFormatError(f"{gguf.path.name} lacks the metadata key {arch}.{key}; the file is incomplete.")
        # A corrupt value must not reach int()/float() or a division: that would be a traceback.
        items = value if per_layer and isinstance(value, list) and value else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in items):
            raise ModelFormatError(
                f"{gguf.path.name} has {arch}.{key} = {value!r:.60}, not a positive number; the file is corrupt."
            )
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = get("attention.head_count_kv", heads, per_layer=True)
    if isinstance(kv_heads, list):  # some converters store one value per layer
        if len(set(kv_heads)) != 1:
            raise ModelFormatError(f"{gguf.path.name} has a different KV head count per layer; not supported.")
        kv_heads = kv_heads[0]
    head_dim = int(get("attention.key_length", hidden // heads))
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ModelFormatError(f"{gguf.path.name} uses partial RoPE ({rope_dims} of {head_dim} dims); not supported.")
    embedding = gguf.tensors.get("token_embd.weight")
    if embedding is None:
        raise ModelFormatError(f"{gguf.path.name} has no token_embd.weight tensor; the file is incomplete.")
    return ModelConfig(
        model_type=arch,
        hidden_size=hidden,
        num_hidden_layers=int(get("block_count")),
        intermediate_size=int(get("feed_forward_length")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=head_dim,
        vocab_size=embedding.shape[0],
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        max_position_embeddings=int(get("context_length", 4096)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(gguf, arch),
        tie_word_embeddings="output.weight" not in gguf.tensors,
        attention_bias="blk.0.attn_q.bias" in gguf.tensors,
        name=str(meta.get("general.name", gguf.path.stem)),
        extra=_gemma3_extra(gguf, get, head_dim, hidden // heads) if arch == "gemma3" else {},
    )


def _gemma3_extra(gguf: GGUFFile, get: Any, head_dim: int, hidden_per_head: int) -> dict[str, Any]:
    """Gemma 3's own hyper-parameters, under mlx-lm's `gemma3_text` names. The GGUF stores the
    window; the pattern, the local RoPE base and the attention scale are llama.cpp's constants
    (llama-model.cpp: scale 1/sqrt(head_dim), but 1/sqrt(hidden/heads) for the 62-layer 27B;
    the same values as the Hugging Face configs' query_pre_attn_scalar: 256, and 168 for 27B)."""
    layers = int(get("block_count"))
    extra: dict[str, Any] = {
        "sliding_window": int(get("attention.sliding_window")),
        "sliding_window_pattern": GEMMA3_SLIDING_WINDOW_PATTERN,
        "rope_local_base_freq": GEMMA3_LOCAL_ROPE_BASE,
        "query_pre_attn_scalar": hidden_per_head if layers == 62 else head_dim,
    }
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        value = gguf.metadata.get(f"gemma3.{key}")
        if value:
            extra[key] = float(get(key))
    return extra


def _rope_scaling(gguf: GGUFFile, arch: str) -> dict[str, Any] | None:
    meta = gguf.metadata
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if "rope_freqs.weight" in gguf.tensors:  # Llama 3.1+: per-frequency factors stored as a tensor
        factors = quant.dequantize_numpy(gguf.raw("rope_freqs.weight"), gguf.tensors["rope_freqs.weight"].type, (-1,))
        return {"rope_type": "freq_factors", "factors": [float(f) for f in factors]}
    if kind in ("none", None):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta[f"{arch}.rope.scaling.factor"])}
    raise ModelFormatError(f"{gguf.path.name} uses {kind!r} RoPE scaling, which this engine does not support yet.")


def _unpermute_rows(raw: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py, LlamaModel.permute)."""
    rows = raw.shape[0]
    return raw.reshape(n_heads, rows // n_heads // 2, 2, *raw.shape[1:]).swapaxes(1, 2).reshape(raw.shape)


def read_weights(
    gguf: GGUFFile, config: ModelConfig, dtype: mx.Dtype, progress: bool = True, exact: bool = False, shard=None
) -> dict[str, Any]:
    """Every weight, converted, under its Hugging Face name (`quant.QuantizedWeight` or mx.array).

    `exact` loads the types with only a near affine form dense (see `quant.load_tensor`). `shard`
    (a plan from `distributed.planner`) keeps and converts only this rank's part of each weight."""
    weights: dict[str, Any] = {}
    names = [(name, hf_name(name, config.model_type)) for name in gguf.tensors]
    names = [(g, h) for g, h in names if h is not None and (shard is None or shard.keeps(h))]
    for gguf_name, name in tqdm(names, desc="loading weights", unit="tensor", disable=not progress, leave=False):
        info = gguf.tensors[gguf_name]
        raw = gguf.raw(gguf_name)
        if config.model_type == "llama" and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
            heads = config.num_attention_heads if ".q_proj." in name else config.num_key_value_heads
            raw = _unpermute_rows(np.asarray(raw), heads)
        if config.model_type == "gemma3" and name.endswith("norm.weight"):
            raw = quant.dequantize_numpy(raw, info.type, info.shape) - 1.0  # back to the HF weight
            weights[name] = mx.array(raw.astype(np.float32)).astype(dtype)
            continue
        if shard is None:
            weights[name] = quant.load_tensor(raw, info.type, info.shape, dtype, exact=exact)
        else:
            def load(part, shape, kind=info.type):
                return quant.load_tensor(part, kind, shape, dtype, exact=exact)

            weights[name] = shard.load_gguf(name, raw, info.type, info.shape, load)
    _check_complete(weights, config, gguf.path, shard)
    return weights


def _check_complete(weights: dict[str, Any], config: ModelConfig, path: Path, shard=None) -> None:
    needed = ["model.embed_tokens.weight", "model.norm.weight"]
    layer_names = _LAYER_NAMES_BY_ARCHITECTURE.get(config.model_type, _LAYER_NAMES)
    for i in range(config.num_hidden_layers):
        needed += [f"model.layers.{i}.{n}.weight" for n in layer_names.values()]
    missing = [n for n in needed if n not in weights and (shard is None or shard.keeps(n))]
    if missing:
        raise ModelFormatError(
            f"{path.name} lacks {len(missing)} tensors the {config.model_type} architecture needs "
            f"(first: {missing[0]}); the file is incomplete or of another architecture."
        )
