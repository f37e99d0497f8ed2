"""`foundry-mlx info`: what is inside a model, read from its header alone (no weights loaded)."""

from __future__ import annotations

from collections import Counter

from . import quant, sources
from .errors import ModelFormatError
from .formats.gguf import GGUFFile
from .formats.gguf_model import read_config


def describe(name: str) -> str:
    path = sources.resolve(name)
    if path.is_dir():
        raise ModelFormatError(f"{path} is a directory; `info` reads GGUF files (directories: see config.json).")
    gguf = GGUFFile(path)
    config = read_config(gguf)
    meta = gguf.metadata
    types = Counter(info.type.name for info in gguf.tensors.values())
    parameters = sum(info.n_elements for info in gguf.tensors.values())
    lines = [
        f"file            {path} ({gguf.file_size / 1e6:.1f} MB, GGUF v{gguf.version})",
        f"name            {config.name}",
        f"architecture    {config.model_type}",
        f"parameters      {parameters / 1e6:.1f} M",
        f"layers          {config.num_hidden_layers}",
        f"hidden size     {config.hidden_size}",
        f"heads           {config.num_attention_heads} query, {config.num_key_value_heads} key/value, head dim {config.head_dim}",
        f"feed-forward    {config.intermediate_size}",
        f"vocabulary      {config.vocab_size}",
        f"context length  {config.max_position_embeddings}",
        f"rope            theta {config.rope_theta:g}, scaling {config.rope_scaling['rope_type'] if config.rope_scaling else 'none'}",
        f"output head     {'tied to the embedding' if config.tie_word_embeddings else 'separate'}",
        f"tokenizer       {meta.get('tokenizer.ggml.model', '?')} (pre-tokenizer {meta.get('tokenizer.ggml.pre', '?')})",
        f"chat template   {'present' if meta.get('tokenizer.chat_template') else 'absent (use generate, not chat)'}",
        "tensor types    " + ", ".join(f"{t} ×{n}" for t, n in types.most_common()),
    ]
    for type_name in sorted(types):
        rule = quant.POLICY.get(quant.T[type_name])
        form = rule.note if rule else "dequantized, re-quantized to 8-bit g32 (warned)"
        exact = "exact" if rule is not None and rule.exact else "near"
        lines.append(f"  {type_name:6s} → {form} ({exact})")
    return "\n".join(lines)
