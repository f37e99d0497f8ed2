"""`foundry-mlx info`: what is inside a model, read from its header alone (no weights loaded)."""

from __future__ import annotations

from collections import Counter

from . import kernels, quant, sources
from .decode_paths import decode_paths
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
        *_family_lines(config),
        f"output head     {'tied to the embedding' if config.tie_word_embeddings else 'separate'}",
        f"tokenizer       {meta.get('tokenizer.ggml.model', '?')} (pre-tokenizer {meta.get('tokenizer.ggml.pre', '?')})",
        f"chat template   {'present' if meta.get('tokenizer.chat_template') else _no_template(meta)}",
        "tensor types    " + ", ".join(f"{t} ×{n}" for t, n in types.most_common()),
    ]
    for type_name in sorted(types):
        rule = quant.POLICY.get(quant.T[type_name])
        form = rule.note if rule else "dequantized, re-quantized to 8-bit g32 (warned)"
        exact = "exact" if rule is not None and rule.exact else "near"
        lines.append(f"  {type_name:6s} → {form} ({exact})")
    backend = _backend()
    lines.append(f"decode path     on {backend}, per operation:")
    for operation, path, reason in decode_paths(config, backend):
        lines.append(f"  {operation:44s} {path} ({reason})")
    return "\n".join(lines)


def _backend() -> str:
    try:
        return kernels.backend_name()
    except Exception:  # noqa: BLE001  (`--kernels custom` without a GPU: say what auto would do)
        return kernels.gpu_backend() or "reference"


def _no_template(meta: dict) -> str:
    from .tokenizer.named_templates import suggested_template

    vocabulary = set(meta.get("tokenizer.ggml.tokens") or ())
    name = suggested_template(vocabulary.__contains__)
    return f"absent (generate needs none; chat uses the built-in '{name}', or --chat-template NAME|FILE)"


def _family_lines(config) -> list[str]:
    extra = config.extra
    if config.model_type != "gemma3":
        return []
    pattern = extra["sliding_window_pattern"]
    return [
        f"attention       sliding window {extra['sliding_window']} (local RoPE theta {extra['rope_local_base_freq']:g}), "
        f"every {pattern}th layer global; scale query_pre_attn_scalar^-1/2 = {extra['query_pre_attn_scalar']}^-1/2",
        f"soft-capping    {extra.get('final_logit_softcapping') or 'none'} (final logits)",
    ]
