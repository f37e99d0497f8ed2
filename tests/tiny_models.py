"""Tiny but complete GGUF models for the unit tests, written with the `gguf` package's `GGUFWriter`.

Not a test module: plain functions the test files call from their own fixtures.

`write_tiny_model(path, TinySpec(...))` writes a `qwen2` (Q/K/V biases) or `llama` (no biases, Q/K
rows permuted exactly as llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` does) model with
a byte-level BPE vocabulary, ChatML special tokens and chat template, and returns a `TinyModel`:
what was written (metadata, tensor bytes and types) and the float32 weights *as
`gguf.quants.dequantize` sees the written bytes*, under Hugging Face names and in Hugging Face
row order (Q/K un-permuted here, with an index permutation, independently of the engine), so a
test can run an independent NumPy forward pass on them.

Tensor types are chosen per tensor (`TinySpec.types`): F32/F16/BF16 and Q4_0…Q8_0 go through
`gguf.quants.quantize`; the K-quants and IQ types, which the gguf package cannot quantize, are
random block bytes whose fp16 `d`/`dmin` fields are set to sane values (`random_blocks`).
Everything is seeded: the same spec gives the same file, byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

T = GGMLQuantizationType
V = GGUFValueType

# Types the gguf package can quantize from floats (the others are written as random blocks).
QUANTIZABLE = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)

# Byte offsets of the fp16 scale fields of each block type (llama.cpp ggml-common.h):
# ("d" multiplies the quantized values, "dmin" the sub-block minimums).
_F16_FIELDS: dict[GGMLQuantizationType, dict[str, int]] = {
    T.Q4_K: {"d": 0, "dmin": 2},
    T.Q5_K: {"d": 0, "dmin": 2},
    T.Q6_K: {"d": 208},
    T.Q2_K: {"d": 80, "dmin": 82},
    T.Q3_K: {"d": 108},
    T.IQ4_NL: {"d": 0},
    T.IQ4_XS: {"d": 0},
}
RANDOM_BLOCK_TYPES = tuple(_F16_FIELDS)

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A few merges of common English pieces, in byte-level spelling ("Ġ" is the space byte).
MERGES = (
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("e", "r"), ("o", "n"),
    ("Ġ", "s"), ("r", "e"), ("a", "t"), ("e", "n"), ("Ġ", "w"), ("o", "r"), ("Ġ", "h"),
    ("l", "l"), ("he", "ll"), ("hell", "o"), ("Ġ", "hello"), ("in", "g"), ("Ġ", "i"),
    ("Ġi", "s"), ("Ġ", "c"), ("o", "u"), ("Ġ", "o"), ("Ġo", "n"), ("Ġ", "m"), ("a", "n"),
    ("Ġ", "d"), ("e", "s"), ("Ġ", "f"), ("i", "s"), ("a", "r"),
)


def byte_level_alphabet() -> list[str]:
    """GPT-2's spelling of the 256 bytes (printable bytes as themselves, the others shifted by 256)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    table = {byte: chr(byte) for byte in printable}
    shift = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shift)
            shift += 1
    return [table[byte] for byte in range(256)]


def vocabulary() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges): token id b < 256 is byte b; then the merges; then specials."""
    tokens = byte_level_alphabet()
    for left, right in MERGES:
        assert left in tokens and right in tokens, (left, right)
        tokens.append(left + right)
    token_types = [1] * len(tokens) + [3] * len(SPECIAL_TOKENS)  # 1 normal, 3 control
    tokens += list(SPECIAL_TOKENS)
    return tokens, token_types, [f"{left} {right}" for left, right in MERGES]


@dataclass
class TinySpec:
    """What to write. `types` maps a GGUF tensor name ("blk.1.ffn_down.weight"), a name without
    its suffix ("blk.1.ffn_down"), or a kind ("ffn_down", "token_embd") to a type; matrices
    default to `default_type`, 1-D tensors (norms, biases) to F32, as llama.cpp writes them."""

    arch: str = "qwen2"  # "qwen2" (Q/K/V biases), "llama" (no biases, Q/K permuted) or "gemma3"
    sliding_window: int = 8  # gemma3 only (every 6th layer is global, as llama.cpp fixes it)
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    layers: int = 2
    ffn: int = 128
    context: int = 512
    rope_theta: float = 1_000_000.0
    eps: float = 1e-6
    tied: bool = False  # no output.weight: the embedding is the LM head
    types: dict[str, GGMLQuantizationType] = field(default_factory=dict)
    default_type: GGMLQuantizationType = T.F32
    seed: int = 0
    drop: tuple[str, ...] = ()  # GGUF tensor names not to write (incomplete files)
    general_architecture: str | None = None  # written as general.architecture (default: arch)
    extra_metadata: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = field(default_factory=dict)
    omit_metadata: tuple[str, ...] = ()


@dataclass
class TinyModel:
    path: Path
    spec: TinySpec
    metadata: dict[str, Any]  # every key written, with its value as written (general.architecture included)
    tensor_types: dict[str, GGMLQuantizationType]  # GGUF name → type
    tensor_shapes: dict[str, tuple[int, ...]]  # GGUF name → NumPy shape (rows, columns)
    tensor_bytes: dict[str, np.ndarray]  # GGUF name → the bytes written (uint8, flat)
    weights: dict[str, np.ndarray]  # Hugging Face name → float32, HF row order
    tokens: list[str]

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def token_id(self, token: str) -> int:
        return self.tokens.index(token)


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py, `LlamaModel.permute`, verbatim (numpy for torch)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def random_blocks(ggml_type: GGMLQuantizationType, rows: int, columns: int, rng: np.random.Generator,
                  std: float, signed: bool = False) -> np.ndarray:
    """Random block bytes (rows, bytes per row) of a type gguf cannot quantize, with the fp16
    `d`/`dmin` fields rescaled so the dequantized values have about `std` (never inf or NaN).
    `signed` lets d and dmin be negative too (llama.cpp writes negative Q6_K d, for instance)."""
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    assert columns % block_size == 0, f"{ggml_type.name} needs rows of a multiple of {block_size}"
    blocks = rng.integers(0, 256, (rows, columns // block_size, block_bytes), dtype=np.uint8)
    fields = _F16_FIELDS[ggml_type]
    factors = {name: rng.uniform(0.5, 1.5, blocks.shape[:2]) for name in fields}
    if signed:
        for name in fields:
            factors[name] *= rng.choice([-1.0, 1.0], blocks.shape[:2])

    def set_fields(multiplier: float) -> None:
        for name, start in fields.items():
            values = (factors[name] * multiplier).astype(np.float16)
            blocks[..., start : start + 2] = values[..., None].view(np.uint8)

    set_fields(1.0)
    measured = float(np.std(gguf_dequantize(blocks.reshape(rows, -1), ggml_type)))
    set_fields(std / measured)
    raw = blocks.reshape(rows, -1)
    assert np.isfinite(gguf_dequantize(raw, ggml_type)).all()
    return raw


def _type_for(spec: TinySpec, name: str, ndim: int) -> GGMLQuantizationType:
    if ndim == 1:  # norms and biases: F32 unless named in full
        return spec.types.get(name, T.F32)
    stem = name.rsplit(".", 1)[0]
    for key in (name, stem, stem.split(".")[-1]):
        if key in spec.types:
            return spec.types[key]
    return spec.default_type


def _encode(values: np.ndarray, ggml_type: GGMLQuantizationType, rng: np.random.Generator) -> np.ndarray:
    """The bytes (rows, bytes per row) of a float tensor in `ggml_type`."""
    if ggml_type == T.F32:
        raw = values.astype(np.float32)
    elif ggml_type == T.F16:
        raw = values.astype(np.float16)
    elif ggml_type in QUANTIZABLE:
        raw = gguf_quantize(values.astype(np.float32), ggml_type)
    else:
        rows, columns = values.shape
        raw = random_blocks(ggml_type, rows, columns, rng, std=float(values.std()))
    return raw.view(np.uint8).reshape(values.shape[0], -1) if raw.ndim == 2 else raw.view(np.uint8)


def _decode(raw: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of written bytes, through gguf.quants.dequantize (the oracle)."""
    if ggml_type == T.F32:
        return raw.view(np.float32).reshape(shape).copy()
    if ggml_type == T.F16:
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    return gguf_dequantize(raw.reshape(shape[0] if len(shape) == 2 else 1, -1), ggml_type).astype(np.float32).reshape(shape)


def _hf_name(gguf_name: str, arch: str = "qwen2") -> str:
    layer_names = {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    if arch == "gemma3":  # norms keep the GGUF's `1 + weight` values under these names
        layer_names.update(
            ffn_norm="pre_feedforward_layernorm", post_attention_norm="post_attention_layernorm",
            post_ffw_norm="post_feedforward_layernorm", attn_q_norm="self_attn.q_norm", attn_k_norm="self_attn.k_norm",
        )
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}.{parts[3]}"
    return {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[parts[0]] + "." + parts[1]


def metadata_for(spec: TinySpec) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
    """key → (value, value type, array item type) of everything but general.architecture."""
    tokens, token_types, merges = vocabulary()
    a = spec.arch
    entries: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]] = {
        "general.name": (f"tiny-{spec.arch}", V.STRING, None),
        f"{a}.context_length": (spec.context, V.UINT32, None),
        f"{a}.embedding_length": (spec.hidden, V.UINT32, None),
        f"{a}.block_count": (spec.layers, V.UINT32, None),
        f"{a}.feed_forward_length": (spec.ffn, V.UINT32, None),
        f"{a}.attention.head_count": (spec.heads, V.UINT32, None),
        f"{a}.attention.head_count_kv": (spec.kv_heads, V.UINT32, None),
        f"{a}.attention.key_length": (spec.head_dim, V.UINT32, None),
        f"{a}.attention.value_length": (spec.head_dim, V.UINT32, None),
        f"{a}.rope.dimension_count": (spec.head_dim, V.UINT32, None),
        f"{a}.rope.freq_base": (spec.rope_theta, V.FLOAT32, None),
        f"{a}.attention.layer_norm_rms_epsilon": (spec.eps, V.FLOAT32, None),
        "tokenizer.ggml.model": ("gpt2", V.STRING, None),
        "tokenizer.ggml.pre": ("qwen2", V.STRING, None),
        "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
        "tokenizer.ggml.token_type": (token_types, V.ARRAY, V.INT32),
        "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING),
        "tokenizer.ggml.bos_token_id": (tokens.index("<|endoftext|>"), V.UINT32, None),
        "tokenizer.ggml.eos_token_id": (tokens.index("<|im_end|>"), V.UINT32, None),
        "tokenizer.ggml.padding_token_id": (tokens.index("<|endoftext|>"), V.UINT32, None),
        "tokenizer.ggml.add_bos_token": (False, V.BOOL, None),
        "tokenizer.chat_template": (CHATML_TEMPLATE, V.STRING, None),
    }
    if a == "gemma3":
        entries[f"{a}.attention.sliding_window"] = (spec.sliding_window, V.UINT32, None)
    for key in spec.omit_metadata:
        entries.pop(key)
    entries.update(spec.extra_metadata)
    return entries


def _float_weights(spec: TinySpec, rng: np.random.Generator, vocab: int) -> dict[str, np.ndarray]:
    """GGUF name → float32 values in HF row order, before any quantization."""
    h, d = spec.hidden, spec.head_dim
    q_rows, kv_rows = spec.heads * d, spec.kv_heads * d

    def matrix(rows: int, columns: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, columns)) * gain / np.sqrt(columns)).astype(np.float32)

    def vector(size: int, mean: float, std: float) -> np.ndarray:
        return (mean + std * rng.standard_normal(size)).astype(np.float32)

    weights = {"token_embd.weight": rng.standard_normal((vocab, h)).astype(np.float32)}
    for i in range(spec.layers):
        p = f"blk.{i}."
        weights[p + "attn_norm.weight"] = vector(h, 1.0, 0.2)
        weights[p + "attn_q.weight"] = matrix(q_rows, h, 1.5)
        weights[p + "attn_k.weight"] = matrix(kv_rows, h, 1.5)
        weights[p + "attn_v.weight"] = matrix(kv_rows, h)
        if spec.arch == "qwen2":
            weights[p + "attn_q.bias"] = vector(q_rows, 0.0, 0.5)
            weights[p + "attn_k.bias"] = vector(kv_rows, 0.0, 0.5)
            weights[p + "attn_v.bias"] = vector(kv_rows, 0.0, 0.2)
        if spec.arch == "gemma3":
            weights[p + "attn_q_norm.weight"] = vector(d, 1.0, 0.2)
            weights[p + "attn_k_norm.weight"] = vector(d, 1.0, 0.2)
            weights[p + "post_attention_norm.weight"] = vector(h, 1.0, 0.2)
            weights[p + "post_ffw_norm.weight"] = vector(h, 1.0, 0.2)
        weights[p + "attn_output.weight"] = matrix(h, q_rows)
        weights[p + "ffn_norm.weight"] = vector(h, 1.0, 0.2)
        weights[p + "ffn_gate.weight"] = matrix(spec.ffn, h)
        weights[p + "ffn_up.weight"] = matrix(spec.ffn, h)
        weights[p + "ffn_down.weight"] = matrix(h, spec.ffn)
    weights["output_norm.weight"] = vector(h, 1.0, 0.2)
    if not spec.tied:
        weights["output.weight"] = matrix(vocab, h, 3.0)
    return weights


def write_tiny_model(path: str | Path, spec: TinySpec | None = None) -> TinyModel:
    """Write the model `spec` describes to `path` (a .gguf file) and describe what was written."""
    spec = spec or TinySpec()
    path = Path(path)
    rng = np.random.default_rng(spec.seed)
    tokens, _, _ = vocabulary()
    floats = _float_weights(spec, rng, len(tokens))

    writer = GGUFWriter(str(path), spec.general_architecture or spec.arch)
    metadata: dict[str, Any] = {"general.architecture": spec.general_architecture or spec.arch}
    for key, (value, value_type, item_type) in metadata_for(spec).items():
        writer.add_key_value(key, value, value_type, sub_type=item_type)
        metadata[key] = value

    types, shapes, written, weights = {}, {}, {}, {}
    for name, values in floats.items():
        ggml_type = _type_for(spec, name, values.ndim)
        permuted = None
        if spec.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = spec.heads
            kv_heads = spec.heads if ".attn_q." in name else spec.kv_heads
            values = llama_permute(values, heads, kv_heads)
            # Which HF row each GGUF row holds: the same permutation applied to row indices.
            permuted = llama_permute(np.arange(values.shape[0]), heads, kv_heads)
        raw = _encode(values, ggml_type, rng)
        gguf_order = _decode(raw, ggml_type, values.shape)
        if permuted is not None:
            hf_order = np.empty_like(gguf_order)
            hf_order[permuted] = gguf_order
            gguf_order = hf_order
        types[name], shapes[name], written[name] = ggml_type, values.shape, raw.reshape(-1)
        weights[_hf_name(name, spec.arch)] = gguf_order
        if name in spec.drop:
            continue
        if ggml_type in (T.F32, T.F16):
            writer.add_tensor(name, raw.view(np.float32 if ggml_type == T.F32 else np.float16).reshape(values.shape))
        else:
            writer.add_tensor(name, raw.reshape(values.shape[0], -1) if values.ndim == 2 else raw, raw_dtype=ggml_type)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for name in spec.drop:
        for table in (types, shapes, written):
            table.pop(name)
        weights.pop(_hf_name(name, spec.arch))
    return TinyModel(path, spec, metadata, types, shapes, written, weights, tokens)


# Spec presets the test files share.

def qwen2_quantized_spec(**overrides: Any) -> TinySpec:
    """Qwen2 with the real Q4_K_M file's mix: Q5_0 Q/K, Q8_0 V, Q8_0 embedding, K-quant
    ffn_down (ffn 256 so its rows hold whole 256-blocks), legacy types elsewhere, tied head."""
    values: dict[str, Any] = dict(
        arch="qwen2", ffn=256, tied=True, seed=1,
        types={
            "token_embd": T.Q8_0, "attn_q": T.Q5_0, "attn_k": T.Q5_0, "attn_v": T.Q8_0,
            "attn_output": T.Q4_0, "ffn_gate": T.Q4_1, "ffn_up": T.Q5_1,
            "blk.0.ffn_down": T.Q4_K, "blk.1.ffn_down": T.Q6_K, "blk.1.attn_output": T.BF16,
            "blk.1.ffn_gate": T.F16,
        },
    )
    values.update(overrides)
    return TinySpec(**values)


def llama_quantized_spec(**overrides: Any) -> TinySpec:
    """Llama with quantized (hence row-permuted block) Q/K, separate Q8_0 head, Q5_K ffn_down."""
    values: dict[str, Any] = dict(
        arch="llama", ffn=256, rope_theta=500_000.0, eps=1e-5, seed=2,
        types={
            "token_embd": T.Q4_0, "attn_q": T.Q8_0, "attn_k": T.Q5_0, "attn_v": T.Q4_1,
            "attn_output": T.Q5_1, "ffn_gate": T.Q8_0, "ffn_up": T.Q4_0, "ffn_down": T.Q5_K,
            "output": T.Q8_0,
        },
    )
    values.update(overrides)
    return TinySpec(**values)


def fused_plan_spec(family: str) -> TinySpec:
    """A tiny qwen2 or llama model the fused decode step plans (kernels/fused_step.py): every
    projection quantized (qwen2's real-file mix keeps some matrices F16/BF16, which it refuses)."""
    if family == "llama":
        return llama_quantized_spec()
    types = qwen2_quantized_spec().types
    return qwen2_quantized_spec(types={"token_embd": types["token_embd"]}, default_type=types["attn_q"])


def load_fused_plan_model(folder: Path, family: str):
    """(model, tokenizer) of a `fused_plan_spec(family)` model written to `folder`, checked to be one
    the fused step plans."""
    from foundry_mlx import load
    from foundry_mlx.kernels import fused_step

    path = folder / f"{family}.gguf"
    write_tiny_model(path, fused_plan_spec(family))
    model, tokenizer = load(str(path), progress=False)
    assert fused_step.unsupported_reason(model) is None
    return model, tokenizer


def gemma3_spec(**overrides: Any) -> TinySpec:
    """Gemma 3 with 6 layers (layer 5 global), a window of 8, GGUF Q8_0/Q5_0/Q4_K like the real file."""
    values: dict[str, Any] = dict(
        arch="gemma3", layers=6, heads=4, kv_heads=1, head_dim=32, ffn=256, tied=True, seed=3,
        rope_theta=1_000_000.0, sliding_window=8,
        types={"token_embd": T.Q8_0, "attn_q": T.Q5_0, "attn_k": T.Q5_0, "attn_v": T.Q8_0, "attn_output": T.Q4_0,
               "ffn_gate": T.Q5_0, "ffn_up": T.Q5_0, "ffn_down": T.Q4_K},
    )
    values.update(overrides)
    return TinySpec(**values)
