"""The GGUF reader (`formats/gguf.py`) and the GGUF model reader (`formats/gguf_model.py`).

A file written by the gguf package's `GGUFWriter` must read back as written; a corrupt one must
fail at once with a `ModelFormatError` that names the problem: never hang, never allocate what a
corrupt length claims, never leak an IndexError/ValueError/struct.error from inside the parser.
Crafted files are built byte by byte below (`build`), independently of both writers.
"""

from __future__ import annotations

import struct
import time
import tracemalloc
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType
from tiny_models import TinySpec, metadata_for, qwen2_quantized_spec, write_tiny_model

from foundry_mlx import load, quant
from foundry_mlx.errors import FoundryError, ModelFormatError
from foundry_mlx.formats.gguf import GGUFFile, read_metadata
from foundry_mlx.formats.gguf_model import hf_name, read_config

T = GGMLQuantizationType
V = GGUFValueType
SECONDS_PER_CASE = 0.5  # a corrupt file is rejected from its header: milliseconds, not seconds
MAX_ALLOCATION = 32 << 20  # bytes; an absurd length must not be believed

EXTRA_METADATA = {
    "test.uint8": (200, V.UINT8, None),
    "test.int8": (-100, V.INT8, None),
    "test.uint16": (60000, V.UINT16, None),
    "test.int16": (-30000, V.INT16, None),
    "test.int32": (-2_000_000_000, V.INT32, None),
    "test.int64": (-(2**62), V.INT64, None),
    "test.uint64": (2**63 + 5, V.UINT64, None),
    "test.float64": (1 / 3, V.FLOAT64, None),
    "test.float32": (0.1, V.FLOAT32, None),
    "test.bool": (True, V.BOOL, None),
    "test.unicode": ("héllo ✓ 世界", V.STRING, None),
    "test.floats": ([0.5, -1.25, 3.0], V.ARRAY, V.FLOAT32),
    "test.nested": ([[1, 2, 3], [4]], V.ARRAY, V.ARRAY),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = qwen2_quantized_spec(extra_metadata=EXTRA_METADATA)
    return write_tiny_model(tmp_path_factory.mktemp("gguf") / "tiny.gguf", spec)


@pytest.fixture(scope="module")
def tiny_bytes(tiny) -> bytes:
    return tiny.path.read_bytes()


# --- reading back what was written ---------------------------------------------------------------


def _as_read(value, value_type):
    """A written value as the reader returns it: float32 values rounded to float32."""
    if isinstance(value, list):
        return [_as_read(v, value_type) for v in value]
    if value_type == V.FLOAT32:
        return float(np.float32(value))
    return value


def test_metadata_reads_back_as_written(tiny):
    metadata = GGUFFile(tiny.path).metadata
    written_types = {k: (vt if vt != V.ARRAY else it) for k, (_, vt, it) in metadata_for(tiny.spec).items()}
    assert set(metadata) == set(tiny.metadata)
    for key, value in tiny.metadata.items():
        assert metadata[key] == _as_read(value, written_types.get(key)), key
    assert metadata["test.float32"] != 0.1 and metadata["test.float64"] == 1 / 3
    assert read_metadata(tiny.path) == metadata


def test_tensor_directory_reads_back_as_written(tiny):
    gguf = GGUFFile(tiny.path)
    assert gguf.version == 3 and gguf.file_size == tiny.path.stat().st_size
    assert set(gguf.tensors) == set(tiny.tensor_types)
    reader = GGUFReader(tiny.path)  # the gguf package's reader as a second opinion on offsets
    offsets = {t.name: int(t.data_offset) for t in reader.tensors}
    for name, info in gguf.tensors.items():
        assert info.name == name
        assert info.shape == tiny.tensor_shapes[name]
        assert info.type == tiny.tensor_types[name]
        assert info.nbytes == tiny.tensor_bytes[name].size
        assert info.offset == offsets[name]
        assert info.n_elements == int(np.prod(tiny.tensor_shapes[name]))
        raw = gguf.raw(name)
        assert not raw.flags.writeable
        np.testing.assert_array_equal(np.ascontiguousarray(raw).view(np.uint8).reshape(-1), tiny.tensor_bytes[name])


def test_raw_shapes(tiny):
    gguf = GGUFFile(tiny.path)
    assert gguf.raw("blk.0.attn_q.weight").shape == (64, 64 // 32 * 22)  # Q5_0: 22 bytes per 32 values
    assert gguf.raw("blk.0.attn_q.bias").dtype == np.float32
    assert gguf.raw("blk.1.ffn_gate.weight").dtype == np.float16
    assert gguf.raw("blk.1.attn_output.weight").dtype == np.uint16  # BF16 as its bits
    assert gguf.raw("blk.1.attn_output.weight").shape == (64, 64)


def test_read_config(tiny, tmp_path):
    config = read_config(GGUFFile(tiny.path))
    spec = tiny.spec
    assert config.model_type == "qwen2"
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (spec.hidden, spec.layers, spec.ffn)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (spec.heads, spec.kv_heads, spec.head_dim)
    assert config.vocab_size == tiny.vocab_size
    assert config.max_position_embeddings == spec.context
    assert config.rope_theta == spec.rope_theta
    assert config.rms_norm_eps == float(np.float32(spec.eps))
    assert config.tie_word_embeddings is True and config.attention_bias is True
    assert config.rope_scaling is None
    llama = write_tiny_model(tmp_path / "llama.gguf", TinySpec(arch="llama", seed=3))
    llama_config = read_config(GGUFFile(llama.path))
    assert llama_config.model_type == "llama"
    assert llama_config.tie_word_embeddings is False and llama_config.attention_bias is False


def test_hf_names():
    assert hf_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj.weight"
    assert hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert hf_name("blk.12.ffn_down.weight") == "model.layers.12.mlp.down_proj.weight"
    assert hf_name("blk.1.ffn_norm.weight") == "model.layers.1.post_attention_layernorm.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None and hf_name("blk.0.attn_rot_embd") is None


# --- crafted files ---------------------------------------------------------------------------------


def string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, value_type: int, payload: bytes) -> bytes:
    return string(key) + struct.pack("<I", value_type) + payload


def kv_u32(key: str, value: int) -> bytes:
    return kv(key, V.UINT32, struct.pack("<I", value))


def kv_str(key: str, value: str) -> bytes:
    return kv(key, V.STRING, string(value))


def tensor_info(name: str, ne: list[int], type_id: int, offset: int) -> bytes:
    return string(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", type_id, offset)


def build(kvs: list[bytes], infos: list[bytes], data: bytes = b"", version: int = 3,
          kv_count: int | None = None, tensor_count: int | None = None, alignment: int = 32) -> bytes:
    header = b"GGUF" + struct.pack("<IQQ", version, len(infos) if tensor_count is None else tensor_count,
                                   len(kvs) if kv_count is None else kv_count)
    body = header + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % alignment) + data


def one_tensor_file(**overrides) -> bytes:
    """A small valid file: one F32 tensor of 2x8 values."""
    values = np.arange(16, dtype=np.float32).tobytes()
    parts = dict(kvs=[kv_str("general.architecture", "qwen2")], infos=[tensor_info("w", [8, 2], T.F32, 0)], data=values)
    parts.update(overrides)
    return build(**parts)


def test_crafted_builder_makes_valid_files(tmp_path):
    path = tmp_path / "valid.gguf"
    path.write_bytes(one_tensor_file())
    gguf = GGUFFile(path)
    assert gguf.metadata == {"general.architecture": "qwen2"}
    assert gguf.tensors["w"].shape == (2, 8) and gguf.tensors["w"].type == T.F32
    np.testing.assert_array_equal(gguf.raw("w"), np.arange(16, dtype=np.float32).reshape(2, 8))
    assert GGUFReader(path).tensors[0].name == "w"  # the gguf package agrees the file is well formed


def assert_rejected(path: Path, pattern: str) -> ModelFormatError:
    """GGUFFile(path) raises ModelFormatError matching `pattern`, quickly and without allocating
    anything like what the file claims."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ModelFormatError, match=pattern) as error:
            GGUFFile(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < SECONDS_PER_CASE, f"took {elapsed:.2f} s"
    assert peak < MAX_ALLOCATION, f"allocated {peak} bytes"
    message = str(error.value)
    assert "\n" not in message and path.name in message  # one line, naming the file
    return error.value


CRAFTED = {
    "not gguf": (b"\x89PNG\r\n\x1a\n" + b"\0" * 100, r"not a GGUF file.*PNG"),
    "tiny file": (b"GGUF\x03\x00", r"only 6 bytes"),
    "empty file": (b"", r"only 0 bytes"),
    "version 1": (one_tensor_file(version=1), r"version 1\b.*2 and 3"),
    "version 4": (one_tensor_file(version=4), r"version 4\b"),
    "big-endian": (b"GGUF" + struct.pack(">I", 3) + b"\0" * 40, r"version 50331648"),
    "absurd kv count": (one_tensor_file(kv_count=2**60), r"1152921504606846976 metadata entries"),
    "absurd tensor count": (one_tensor_file(tensor_count=2**60), r"1152921504606846976 tensors"),
    "absurd array length": (
        one_tensor_file(kvs=[kv("tokenizer.ggml.tokens", V.ARRAY, struct.pack("<IQ", V.STRING, 2**60))]),
        r"tokenizer\.ggml\.tokens.*claims 1152921504606846976 items",
    ),
    "absurd scalar array length": (
        one_tensor_file(kvs=[kv("tokenizer.ggml.token_type", V.ARRAY, struct.pack("<IQ", V.INT32, 2**60))]),
        r"tokenizer\.ggml\.token_type.*claims 1152921504606846976 items",
    ),
    "absurd nested array": (
        one_tensor_file(kvs=[kv("x", V.ARRAY, struct.pack("<IQ", V.ARRAY, 2) + struct.pack("<IQ", V.UINT8, 2**62))]),
        r"claims 4611686018427387904 items",
    ),
    "absurd string length": (one_tensor_file(kvs=[kv("general.name", V.STRING, struct.pack("<Q", 2**63))]), r"general\.name.*needs"),
    "absurd key length": (one_tensor_file(kvs=[struct.pack("<Q", 2**40) + b"key"]), r"metadata key #0 needs 1099511627776 bytes"),
    "unknown value type": (one_tensor_file(kvs=[kv("general.name", 77, b"\0" * 8)]), r"'general\.name' has unknown value type 77"),
    "unknown array item type": (one_tensor_file(kvs=[kv("a", V.ARRAY, struct.pack("<IQ", 99, 1))]), r"unknown item type 99"),
    "nesting too deep": (
        one_tensor_file(kvs=[kv("deep", V.ARRAY, struct.pack("<IQ", V.ARRAY, 1) * 6 + struct.pack("<IQ", V.UINT8, 1) + b"\0")]),
        r"nests arrays deeper",
    ),
    "invalid utf-8": (one_tensor_file(kvs=[kv_str("general.name", "x"), string(b"\xff\xfe") + struct.pack("<I", V.BOOL) + b"\x01"]),
                      r"not valid UTF-8"),
    "alignment not a power of two": (one_tensor_file(kvs=[kv_u32("general.alignment", 24)]), r"alignment 24 is not a power of two"),
    "alignment zero": (one_tensor_file(kvs=[kv_u32("general.alignment", 0)]), r"alignment 0"),
    "unknown tensor type": (one_tensor_file(infos=[tensor_info("w", [8, 2], 99, 0)]), r"'w'.*unknown type id 99"),
    "absurd tensor size": (one_tensor_file(infos=[tensor_info("w", [2**40, 2**30], T.F32, 0)]), r"'w' claims \d+ bytes"),
    "absurd tensor size overflowing 64 bits": (
        one_tensor_file(infos=[tensor_info("w", [2**62, 2**62, 2**62, 2**62], T.F32, 0)]), r"'w' claims \d+ bytes",
    ),
    "tensor offset past the end": (one_tensor_file(infos=[tensor_info("w", [8, 2], T.F32, 2**62)]), r"truncated.*'w'"),
    "misaligned tensor": (one_tensor_file(infos=[tensor_info("w", [8, 2], T.F32, 4)]), r"'w' is not aligned"),
    "rank 0": (one_tensor_file(infos=[tensor_info("w", [], T.F32, 0)]), r"'w' has rank 0"),
    "rank 5": (one_tensor_file(infos=[tensor_info("w", [1, 1, 1, 1, 16], T.F32, 0)]), r"'w' has rank 5"),
    "zero dimension": (one_tensor_file(infos=[tensor_info("w", [0, 2], T.F32, 0)]), r"'w' has shape \[0, 2\]"),
    "partial block": (one_tensor_file(infos=[tensor_info("w", [16, 1], T.Q8_0, 0)]), r"'w'.*whole number of 32-blocks"),
    "duplicate tensor": (
        one_tensor_file(infos=[tensor_info("w", [4], T.F32, 0), tensor_info("w", [4], T.F32, 32)], data=b"\0" * 64),
        r"'w' appears twice",
    ),
}


@pytest.mark.parametrize("name", CRAFTED)
def test_crafted_corrupt_files_are_rejected(tmp_path, name):
    content, pattern = CRAFTED[name]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(content)
    assert_rejected(path, pattern)


def test_truncated_in_header(tmp_path, tiny_bytes):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_bytes[:100])
    assert_rejected(path, r"truncated or corrupt")


def test_truncated_in_tensor_infos(tmp_path, tiny_bytes):
    first_name = tiny_bytes.index(string("token_embd.weight"))  # tensor names live only in the infos
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_bytes[: first_name + 12])
    assert_rejected(path, r"name of tensor #0 needs 17 bytes but only 4 remain")
    last_info = tiny_bytes.rindex(string("output_norm.weight"))
    path.write_bytes(tiny_bytes[: last_info + 30])
    assert_rejected(path, r"truncated or corrupt")


def test_truncated_in_data(tmp_path, tiny, tiny_bytes):
    gguf = GGUFFile(tiny.path)
    last = max(gguf.tensors.values(), key=lambda info: info.offset)
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_bytes[: last.offset + last.nbytes - 1])
    assert_rejected(path, rf"truncated: tensor '{last.name}' ends at byte {last.offset + last.nbytes}")


def test_paths_that_are_not_files(tmp_path):
    with pytest.raises(ModelFormatError, match="does not exist"):
        GGUFFile(tmp_path / "missing.gguf")
    with pytest.raises(ModelFormatError, match="is a directory"):
        GGUFFile(tmp_path)


def test_every_truncation_is_rejected(tmp_path, tiny, tiny_bytes):
    """Cut the real file at 150 places: every cut before the end of the last tensor is an error."""
    gguf = GGUFFile(tiny.path)
    end = max(info.offset + info.nbytes for info in gguf.tensors.values())
    path = tmp_path / "cut.gguf"
    start = time.perf_counter()
    for cut in np.unique(np.linspace(0, end - 1, 150).astype(int)):
        path.write_bytes(tiny_bytes[:cut])
        with pytest.raises(ModelFormatError):
            GGUFFile(path)
    assert time.perf_counter() - start < 150 * SECONDS_PER_CASE / 10


def test_corrupted_header_bytes_fail_cleanly(tmp_path, tiny, tiny_bytes):
    """Overwrite single bytes of the header (lengths, type ids, counts, names, shapes) at 400
    random places: each file either parses or raises ModelFormatError, never anything else."""
    gguf = GGUFFile(tiny.path)
    header_end = min(info.offset for info in gguf.tensors.values())
    rng = np.random.default_rng(0)
    path = tmp_path / "flipped.gguf"
    outcomes = {"parsed": 0, "rejected": 0}
    start = time.perf_counter()
    for _ in range(400):
        content = bytearray(tiny_bytes)
        position = int(rng.integers(4, header_end))
        content[position] = int(rng.integers(0, 256)) if rng.random() < 0.5 else 0xFF
        path.write_bytes(bytes(content))
        try:
            GGUFFile(path)
            outcomes["parsed"] += 1
        except ModelFormatError:
            outcomes["rejected"] += 1
    assert outcomes["rejected"] > 20  # the corruption did hit lengths and types
    assert time.perf_counter() - start < 400 * SECONDS_PER_CASE / 10


def test_corrupted_header_bytes_fail_cleanly_through_load(tmp_path, tiny, tiny_bytes):
    """The same through `load` (config, tokenizer, weights): a user error or a model, nothing else."""
    gguf = GGUFFile(tiny.path)
    header_end = min(info.offset for info in gguf.tensors.values())
    rng = np.random.default_rng(1)
    path = tmp_path / "flipped.gguf"
    rejected = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a flipped type id may name a re-quantized type
        for _ in range(300):
            content = bytearray(tiny_bytes)
            content[int(rng.integers(4, header_end))] = int(rng.integers(0, 256))
            path.write_bytes(bytes(content))
            try:
                load(str(path), progress=False)
            except FoundryError:
                rejected += 1
    assert rejected > 20


# --- the model level: architecture, tensors, metadata -------------------------------------------


def assert_load_fails(path: Path, pattern: str) -> None:
    start = time.perf_counter()
    with pytest.raises(ModelFormatError, match=pattern) as error:
        load(str(path), progress=False)
    assert time.perf_counter() - start < 2 * SECONDS_PER_CASE
    assert "\n" not in str(error.value)


def test_unknown_architecture(tmp_path):
    tiny = write_tiny_model(tmp_path / "mamba.gguf", TinySpec(general_architecture="mamba"))
    assert_load_fails(tiny.path, r"'mamba' model; this engine supports qwen2, llama")


def test_missing_layer_tensor(tmp_path):
    tiny = write_tiny_model(tmp_path / "missing.gguf", TinySpec(drop=("blk.1.ffn_down.weight",)))
    assert_load_fails(tiny.path, r"lacks 1 tensors .*first: model\.layers\.1\.mlp\.down_proj\.weight")


def test_missing_several_tensors(tmp_path):
    drop = ("blk.0.attn_q.weight", "blk.0.attn_k.weight", "output_norm.weight")
    tiny = write_tiny_model(tmp_path / "missing.gguf", TinySpec(drop=drop))
    assert_load_fails(tiny.path, r"lacks 3 tensors")


def test_missing_embedding(tmp_path):
    tiny = write_tiny_model(tmp_path / "missing.gguf", TinySpec(drop=("token_embd.weight",)))
    assert_load_fails(tiny.path, r"no token_embd\.weight")


def test_missing_metadata_key(tmp_path):
    tiny = write_tiny_model(tmp_path / "missing.gguf", TinySpec(omit_metadata=("qwen2.block_count",)))
    assert_load_fails(tiny.path, r"lacks the metadata key qwen2\.block_count")


@pytest.mark.parametrize(
    "key, value",
    [
        ("qwen2.embedding_length", ("sixty-four", V.STRING, None)),
        ("qwen2.block_count", ([2, 2], V.ARRAY, V.UINT32)),
        ("qwen2.attention.head_count", (0, V.UINT32, None)),
        ("qwen2.rope.freq_base", ("high", V.STRING, None)),
    ],
    ids=["string-for-int", "array-for-int", "zero-heads", "string-for-float"],
)
def test_metadata_of_the_wrong_type(tmp_path, key, value):
    tiny = write_tiny_model(tmp_path / "wrong.gguf", TinySpec(extra_metadata={key: value}))
    assert_load_fails(tiny.path, key.replace(".", r"\."))


def test_unloadable_tensor_type(tmp_path):
    """A type the gguf package knows but cannot dequantize (Q8_K: llama.cpp's internal dot-product type)."""
    values = b"\0" * GGML_QUANT_SIZES[T.Q8_K][1] * 2
    content = one_tensor_file(infos=[tensor_info("w", [256, 2], T.Q8_K, 0)], data=values)
    path = tmp_path / "q8k.gguf"
    path.write_bytes(content)
    gguf = GGUFFile(path)  # the directory is fine...
    with pytest.raises(ModelFormatError, match="Q8_K"):  # ...but the tensor cannot be loaded
        quant.load_tensor(gguf.raw("w"), T.Q8_K, gguf.tensors["w"].shape, mx.float32)
