"""The family-agnostic model configuration every format is read into."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# mlx-lm and transformers call the text-only Gemma 3 `gemma3_text` (`gemma3` is the multimodal one).
HF_MODEL_TYPES = {"gemma3": "gemma3_text"}
OUR_MODEL_TYPES = {hf: ours for ours, hf in HF_MODEL_TYPES.items()}
FAMILY_KEYS = {
    "gemma3": (
        "sliding_window", "sliding_window_pattern", "rope_local_base_freq", "query_pre_attn_scalar",
        "final_logit_softcapping", "attn_logit_softcapping",
    ),
}


@dataclass
class ModelConfig:
    """Hyper-parameters of a decoder-only transformer, named as in Hugging Face config.json."""

    model_type: str  # "qwen2", "llama" or "gemma3": picks foundry_mlx/models/{model_type}.py
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # family-specific keys, passed through

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json as Hugging Face and mlx-lm read it."""
        values = asdict(self)
        values.pop("extra")
        values.pop("name")
        values.update(self.extra)
        values["architectures"] = [ARCHITECTURES[self.model_type]]
        values["model_type"] = HF_MODEL_TYPES.get(self.model_type, self.model_type)
        if values["rope_scaling"] is None:
            values.pop("rope_scaling")
        return values

    @classmethod
    def from_hf_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Read a Hugging Face / mlx-lm config.json."""
        heads = values["num_attention_heads"]
        known = {f for f in cls.__dataclass_fields__ if f not in ("extra", "name", "head_dim")}
        kwargs = {k: v for k, v in values.items() if k in known}
        kwargs["model_type"] = OUR_MODEL_TYPES.get(values["model_type"], values["model_type"])
        kwargs["extra"] = {k: values[k] for k in FAMILY_KEYS.get(kwargs["model_type"], ()) if k in values}
        kwargs.setdefault("num_key_value_heads", heads)
        kwargs.setdefault("attention_bias", values.get("model_type") == "qwen2")
        head_dim = values.get("head_dim") or values["hidden_size"] // heads
        return cls(head_dim=head_dim, **kwargs)


def prefill_flops(config, length: int) -> float:
    """Multiply-adds x2 of prefilling `length` tokens: every layer's projections for every token,
    causal attention (scores and weighted values over the positions each query sees), and the LM
    head for the last position only (what the engines compute). Sliding windows are ignored: an
    upper bound for Gemma 3's local layers."""
    hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    head_dim = config.head_dim
    projections = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
    projections += 3 * hidden * config.intermediate_size
    attention = 2 * heads * head_dim * length * (length + 1) / 2  # QK^T and PV, causal
    per_layer = 2 * projections * length + 2 * attention
    return config.num_hidden_layers * per_layer + 2 * hidden * config.vocab_size
