"""Dtype handling shared by the signature port and the runner.

MLX names element types with ``get_type_string`` (mlx/backend/common/compiled.cpp)
and those names end up in both the kernel name and its signature, so the
mapping here must match MLX exactly. numpy has no bfloat16: bfloat16 data
travels as uint16 bit patterns tagged with :class:`BFloat16Array` (ml_dtypes
arrays are accepted as inputs too, but ml_dtypes is not a dependency).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# MLX dtype name -> MLX get_type_string.
TYPE_STRINGS: dict[str, str] = {
    "float32": "float",
    "float16": "float16_t",
    "bfloat16": "bfloat16_t",
    "float64": "double",
    "complex64": "complex64_t",
    "bool": "bool",
    "int8": "int8_t",
    "int16": "int16_t",
    "int32": "int32_t",
    "int64": "int64_t",
    "uint8": "uint8_t",
    "uint16": "uint16_t",
    "uint32": "uint32_t",
    "uint64": "uint64_t",
}

# Dtypes the simulator can move in and out of a kernel (no double/complex:
# Metal has neither).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "bool": np.dtype(np.bool_),
    "int8": np.dtype(np.int8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "uint8": np.dtype(np.uint8),
    "uint16": np.dtype(np.uint16),
    "uint32": np.dtype(np.uint32),
    "uint64": np.dtype(np.uint64),
}

FLOAT_DTYPES = frozenset({"float32", "float16", "bfloat16"})


class BFloat16Array(np.ndarray):
    """uint16 bit patterns that a kernel sees as ``bfloat16_t``.

    Create one with :func:`bfloat16_array` (from floats) or
    ``bits.view(BFloat16Array)`` (from raw uint16 bits); read one back with
    :func:`bfloat16_to_float32`.
    """


def bfloat16_array(values: Any) -> BFloat16Array:
    """Round float values to bfloat16 (nearest even, NaN kept) as tagged bits."""
    floats = np.ascontiguousarray(values, dtype=np.float32)
    bits = floats.view(np.uint32).astype(np.uint64)
    rounded = ((bits + ((bits >> 16) & 1) + 0x7FFF) >> 16).astype(np.uint16)
    rounded = np.where(np.isnan(floats), np.uint16(0x7FC0), rounded)
    return np.asarray(rounded, dtype=np.uint16).view(BFloat16Array)


def bfloat16_to_float32(bits: Any) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32 exactly."""
    raw = np.ascontiguousarray(bits).view(np.uint16)
    return (raw.astype(np.uint32) << 16).view(np.float32)


def dtype_name(dtype: Any) -> str:
    """Canonical MLX dtype name for a numpy, ml_dtypes, mlx or string dtype."""
    if isinstance(dtype, str):
        name = dtype
    elif isinstance(dtype, np.dtype) or (isinstance(dtype, type) and issubclass(dtype, np.generic)):
        name = np.dtype(dtype).name
    else:
        name = str(dtype)  # mlx.core.Dtype prints as "mlx.core.float32"
    name = name.removeprefix("mlx.core.")
    name = {"bool_": "bool", "half": "float16", "float": "float32"}.get(name, name)
    if name not in TYPE_STRINGS:
        raise TypeError(f"unsupported dtype {dtype!r}")
    return name


def type_string(dtype: Any) -> str:
    """MLX's get_type_string for ``dtype``."""
    return TYPE_STRINGS[dtype_name(dtype)]


def storage_dtype(name: str) -> np.dtype:
    """numpy dtype holding the bytes of MLX dtype ``name``."""
    if name not in STORAGE_DTYPES:
        raise TypeError(f"dtype {name} cannot be passed to a Metal kernel (Metal has no double or complex)")
    return STORAGE_DTYPES[name]


def kernel_input(value: Any) -> tuple[str, np.ndarray]:
    """MLX dtype name and C-contiguous storage array of one kernel input.

    Python scalars follow MLX's conversion (bool, int32, float32); numpy
    scalars and 0-d arrays stay 0-d, which MLX passes by reference.
    """
    if isinstance(value, BFloat16Array):
        return "bfloat16", np.asarray(value.view(np.ndarray), order="C")
    if isinstance(value, bool):
        return "bool", np.array(value, dtype=np.bool_)
    if isinstance(value, int):
        return "int32", np.array(value, dtype=np.int32)
    if isinstance(value, float):
        return "float32", np.array(value, dtype=np.float32)
    array = np.asarray(value)
    if array.dtype.name == "bfloat16":  # ml_dtypes
        return "bfloat16", np.asarray(array, order="C").view(np.uint16)
    name = dtype_name(array.dtype)
    return name, np.asarray(array, dtype=storage_dtype(name), order="C")


def output_array(name: str, storage: np.ndarray) -> np.ndarray:
    """Result array for MLX dtype ``name`` (bfloat16 comes back tagged)."""
    if name == "bfloat16":
        return storage.view(BFloat16Array)
    return storage


def filled_bytes(name: str, count: int, init_value: float | None) -> np.ndarray:
    """Initial contents of an output: ``init_value`` converted as MLX would,
    else poison (all bits set, NaN for floats; 0xAB bytes for integers)."""
    dtype = storage_dtype(name)
    if init_value is None:
        byte = 0xFF if name in FLOAT_DTYPES else 0xAB
        return np.full(count * dtype.itemsize, byte, dtype=np.uint8)
    if name == "bfloat16":
        values = bfloat16_array(np.full(count, init_value, dtype=np.float32))
        return values.view(np.ndarray).view(np.uint8)
    values = np.full(count, init_value, dtype=np.float32).astype(dtype)
    return values.view(np.uint8)
