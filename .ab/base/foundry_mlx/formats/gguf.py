"""Read GGUF files: metadata, tensor directory and memory-mapped tensor bytes.

The `gguf` package supplies the format's constants (value types, quantization types and their
block sizes) and, in `quant.py`, the NumPy dequantizers. Its `GGUFReader` is not used for the
header because it takes ~6.5 s on the 0.5B model (it builds one NumPy view per token string)
and trusts every length it reads: an array length of 2**60 makes it loop forever. This parser
checks every length against the bytes that remain before it reads, so a truncated or corrupt
file fails at once with a `ModelFormatError` that says what is wrong.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..errors import ModelFormatError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4

_SCALARS: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.FLOAT64: "<d",
    GGUFValueType.BOOL: "<?",
}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory.

    `shape` is in NumPy order (outermost first), the reverse of GGUF's `ne` order: a weight of
    `ne = [in_features, out_features]` has shape `(out_features, in_features)`.
    """

    name: str
    shape: tuple[int, ...]
    type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape))


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buffer: memoryview, path: Path) -> None:
        self.buffer = buffer
        self.pos = 0
        self.path = path

    def remaining(self) -> int:
        return len(self.buffer) - self.pos

    def fail(self, what: str) -> ModelFormatError:
        return ModelFormatError(
            f"{self.path} is not a valid GGUF file ({what} at byte {self.pos}); "
            "it is truncated or corrupt: download it again."
        )

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.remaining():
            raise self.fail(f"{what} needs {n} bytes but only {self.remaining()} remain")
        view = self.buffer[self.pos : self.pos + n]
        self.pos += n
        return view

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        length = self.scalar("<Q", what)
        raw = self.take(length, what)
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as error:
            raise self.fail(f"{what} is not valid UTF-8") from error

    def value(self, value_type: int, what: str, depth: int = 0) -> Any:
        try:
            kind = GGUFValueType(value_type)
        except ValueError:
            raise self.fail(f"{what} has unknown value type {value_type}") from None
        if kind == GGUFValueType.STRING:
            return self.string(what)
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind], what)
        if depth >= MAX_NESTING:
            raise self.fail(f"{what} nests arrays deeper than {MAX_NESTING}")
        item_type = self.scalar("<I", what)
        count = self.scalar("<Q", what)
        try:
            item_kind = GGUFValueType(item_type)
        except ValueError:
            raise self.fail(f"{what} has unknown item type {item_type}") from None
        if item_kind in _SCALARS:
            size = struct.calcsize(_SCALARS[item_kind])
            if count > self.remaining() // size:
                raise self.fail(f"{what} claims {count} items, more than the file holds")
            raw = self.take(count * size, what)
            return np.frombuffer(raw, dtype=np.dtype(_SCALARS[item_kind])).tolist()
        # Strings and nested arrays take at least 8 bytes per item (their length prefix).
        if count > self.remaining() // 8:
            raise self.fail(f"{what} claims {count} items, more than the file holds")
        return [self.value(item_type, what, depth + 1) for _ in range(count)]


class GGUFFile:
    """A GGUF file: `metadata` (key → plain Python value) and `tensors` (name → TensorInfo).

    Tensor bytes are memory-mapped, not read: `raw(name)` returns a read-only NumPy view.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            raise ModelFormatError(f"{self.path} does not exist.") from None
        except IsADirectoryError:
            raise ModelFormatError(f"{self.path} is a directory, not a GGUF file.") from None
        with handle:
            size = self.path.stat().st_size
            if size < 24:
                raise ModelFormatError(
                    f"{self.path} is not a GGUF file: it has only {size} bytes."
                )
            self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        self.file_size = size
        self._parse(memoryview(self._mmap))

    def _parse(self, buffer: memoryview) -> None:
        cursor = _Cursor(buffer, self.path)
        magic = bytes(cursor.take(4, "magic"))
        if magic != MAGIC:
            raise ModelFormatError(
                f"{self.path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')."
            )
        self.version = cursor.scalar("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            raise ModelFormatError(
                f"{self.path} is GGUF version {self.version}; only versions 2 and 3 are "
                "supported: re-convert it with a current llama.cpp."
            )
        tensor_count = cursor.scalar("<Q", "tensor count")
        kv_count = cursor.scalar("<Q", "metadata count")
        # Each metadata entry takes >= 13 bytes and each tensor entry >= 28: cheap sanity bounds.
        if kv_count > cursor.remaining() // 13 or tensor_count > cursor.remaining() // 28:
            raise cursor.fail(
                f"header claims {kv_count} metadata entries and {tensor_count} tensors"
            )
        self.metadata: dict[str, Any] = {}
        for index in range(kv_count):
            key = cursor.string(f"metadata key #{index}")
            value_type = cursor.scalar("<I", f"type of {key!r}")
            self.metadata[key] = cursor.value(value_type, f"metadata {key!r}")

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise cursor.fail(f"general.alignment {alignment!r} is not a power of two")

        infos = [self._tensor_info(cursor, index) for index in range(tensor_count)]
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, relative, nbytes in infos:
            if name in self.tensors:
                raise cursor.fail(f"tensor {name!r} appears twice")
            if relative % alignment:
                raise cursor.fail(f"tensor {name!r} is not aligned to {alignment} bytes")
            offset = data_start + relative
            if offset + nbytes > self.file_size:
                raise ModelFormatError(
                    f"{self.path} is truncated: tensor {name!r} ends at byte {offset + nbytes} "
                    f"but the file has {self.file_size} bytes; download it again."
                )
            self.tensors[name] = TensorInfo(name, shape, ggml_type, offset, nbytes)

    @staticmethod
    def _tensor_info(cursor: _Cursor, index: int) -> tuple:
        name = cursor.string(f"name of tensor #{index}")
        n_dims = cursor.scalar("<I", f"rank of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cursor.fail(f"tensor {name!r} has rank {n_dims}")
        ne = [cursor.scalar("<Q", f"shape of {name!r}") for _ in range(n_dims)]
        raw_type = cursor.scalar("<I", f"type of {name!r}")
        relative = cursor.scalar("<Q", f"offset of {name!r}")
        try:
            ggml_type = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelFormatError(
                f"tensor {name!r} in {cursor.path} has unknown type id {raw_type}; this file "
                "needs a newer `gguf` package (pip install -U gguf) or is corrupt."
            ) from None
        block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
        if any(d == 0 for d in ne) or ne[0] % block_size:
            raise cursor.fail(
                f"tensor {name!r} has shape {ne}, not a whole number of {block_size}-blocks"
            )
        n_elements = int(np.prod(ne, dtype=object))
        nbytes = n_elements // block_size * block_bytes
        if nbytes > cursor.buffer.nbytes:
            raise cursor.fail(f"tensor {name!r} claims {nbytes} bytes, more than the file")
        return name, tuple(reversed(ne)), ggml_type, relative, nbytes

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only view, shape (rows..., bytes_per_row) for block types
        and the element shape for plain F32/F16/BF16/integer types (BF16 as uint16)."""
        info = self.tensors[name]
        data = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=info.offset)
        plain = {
            GGMLQuantizationType.F32: np.float32,
            GGMLQuantizationType.F16: np.float16,
            GGMLQuantizationType.BF16: np.uint16,
            GGMLQuantizationType.F64: np.float64,
            GGMLQuantizationType.I8: np.int8,
            GGMLQuantizationType.I16: np.int16,
            GGMLQuantizationType.I32: np.int32,
            GGMLQuantizationType.I64: np.int64,
        }
        if info.type in plain:
            return data.view(plain[info.type]).reshape(info.shape)
        block_size, block_bytes = GGML_QUANT_SIZES[info.type]
        return data.reshape(*info.shape[:-1], info.shape[-1] // block_size * block_bytes)

    def close(self) -> None:
        """Release the memory map (views returned by `raw` must not be used afterwards)."""
        self._mmap.close()


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a GGUF file as plain Python values (no tensor data is read)."""
    return GGUFFile(path).metadata
