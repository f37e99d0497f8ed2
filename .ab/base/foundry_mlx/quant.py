"""The quantization policy: the one place a GGUF tensor type is described.

Every weight ends up in one of two internal forms:

* dense, in the model's compute dtype, or
* MLX's affine layout (what `mx.quantize` returns): `q` packed little-endian into uint32 words as
  one bit stream, and per-group `scales` and `biases`, so that `w = scales * q + biases`. MLX's
  `quantized_matmul` (prefill) and our GEMV kernels (decode) both read this layout.

GGUF block formats are converted at load time. The conversion is exact where the math allows:
each block's integers `q` are kept as they are and the block's float factors become the group's
scale and bias. `POLICY` says, per type, which form a type takes and whether it is exact; adding a
type means adding one entry there. Types with no exact affine form are dequantized by the `gguf`
package and re-quantized to 8 bits (with a one-line warning per type).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from .errors import ModelFormatError

T = GGMLQuantizationType
GROUP_SIZE = 32  # every GGUF block format maps to groups of 32 (a 256-block is 8 or 16 sub-blocks)
ROWS_PER_CHUNK = 4096  # convert this many rows at a time: bounds the NumPy temporaries


@dataclass(frozen=True)
class QuantizedWeight:
    """A matrix in MLX's affine layout: `(rows, columns)` with `columns % group_size == 0`."""

    weight: mx.array  # uint32, (rows, columns * bits // 32)
    scales: mx.array  # (rows, columns // group_size)
    biases: mx.array
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.weight.shape[0], self.weight.shape[1] * 32 // self.bits)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes


@dataclass(frozen=True)
class Affine:
    """Unpacked affine form in NumPy: integers `q` (rows, columns) and float32 factors per group."""

    q: np.ndarray
    scales: np.ndarray
    biases: np.ndarray
    bits: int


@dataclass(frozen=True)
class Rule:
    """How one GGUF type is loaded: `convert` maps raw blocks (rows, bytes) to `Affine`."""

    bits: int | None  # None: kept dense
    exact: bool
    note: str
    convert: Callable[[np.ndarray], Affine] | None = None


# ---------------------------------------------------------------------------------------------
# Block decoders. `blocks` has shape (rows, n_blocks, block_bytes); the layouts are llama.cpp's
# (ggml-common.h). Each returns q as uint8 (rows, columns) and per-32 scales/biases in float32.


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[..., start : start + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """16 bytes → 32 values: the low nibbles are values 0..15, the high nibbles 16..31."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=-1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """A little-endian uint32 of high bits → one 0/1 per value."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")
    return bits[..., :count]


def _per_group(values: np.ndarray, rows: int) -> np.ndarray:
    return values.reshape(rows, -1).astype(np.float32)


def _legacy(blocks: np.ndarray, *, offset: int, has_min: bool, has_high: bool) -> Affine:
    """Q4_0, Q4_1, Q5_0, Q5_1: 32 values per block, w = d * q - offset (or d * q + m)."""
    rows = blocks.shape[0]
    d = _f16(blocks, 0)
    pos = 4 if has_min else 2
    q = _nibbles(blocks[..., pos + (4 if has_high else 0) :])
    if has_high:
        q = q | (_high_bits(blocks[..., pos : pos + 4], 32) << 4)
    bias = _f16(blocks, 2) if has_min else -offset * d
    return Affine(q.reshape(rows, -1), _per_group(d, rows), _per_group(bias, rows), 5 if has_high else 4)


def _q8_0(blocks: np.ndarray) -> Affine:
    rows = blocks.shape[0]
    d = _f16(blocks, 0)
    q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return Affine(q.reshape(rows, -1), _per_group(d, rows), _per_group(-128 * d, rows), 8)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 scale bytes of Q4_K/Q5_K → 8 six-bit scales and 8 six-bit mins (get_scale_min_k4)."""
    s = packed.astype(np.uint8)
    low = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], -1)
    mins = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], -1)
    return low.astype(np.float32), mins.astype(np.float32)


def _k_quant(blocks: np.ndarray, *, high: bool) -> Affine:
    """Q4_K and Q5_K: 256 values in 8 sub-blocks of 32, w = d*scale_j*q - dmin*min_j."""
    rows, n_blocks = blocks.shape[:2]
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    scales, mins = _k_scales(blocks[..., 4:16])
    qs = blocks[..., 48:176] if high else blocks[..., 16:144]
    # Each 32-byte chunk c holds sub-block 2c in its low nibbles and 2c+1 in its high nibbles.
    chunks = qs.reshape(rows, n_blocks, 4, 32)
    q = np.stack([chunks & 0x0F, chunks >> 4], axis=3).reshape(rows, n_blocks, 8, 32)
    if high:
        bits = np.unpackbits(blocks[..., 16:48, None], axis=-1, bitorder="little")  # (.., 32, 8)
        q = q | (bits.transpose(0, 1, 3, 2) << 4)  # sub-block j takes bit j of qh[l]
    return Affine(
        q.reshape(rows, -1),
        (d[..., None] * scales).reshape(rows, -1),
        (-dmin[..., None] * mins).reshape(rows, -1),
        5 if high else 4,
    )


def _q6_k(blocks: np.ndarray) -> Affine:
    """Q6_K: 256 values in 16 sub-blocks of 16, w = d * scale_i * (q - 32), q 6-bit.

    MLX's kernels take groups of 32 or more, so each pair of sub-blocks shares one 8-bit group
    with scale d*s_dom/4, where s_dom is the pair's scale of larger magnitude: that sub-block is
    exact (4*(q-32) is an integer in [-128, 124]), the other is rounded to the nearest of 256
    levels (error <= d*|s_dom|/8, or d*|s_dom|/4 at the clipped end; on the real model's
    ffn_down: max 0.002, 0.4% of the largest weight). A 6-bit group-16 form would be exact, but
    MLX's quantized_matmul, our prefill path, has no group 16; `exact=True` loads Q6_K dense.
    """
    rows, n_blocks = blocks.shape[:2]
    ql, qh = blocks[..., 0:128], blocks[..., 128:192]
    scales = blocks[..., 192:208].view(np.int8).astype(np.float32)  # (rows, nb, 16)
    d = _f16(blocks, 208)
    half_values = []
    for half in range(2):
        low = ql[..., 64 * half : 64 * half + 64]
        high = qh[..., 32 * half : 32 * half + 32]
        parts = [
            (low[..., 0:32] & 0x0F) | (((high >> 0) & 3) << 4),
            (low[..., 32:64] & 0x0F) | (((high >> 2) & 3) << 4),
            (low[..., 0:32] >> 4) | (((high >> 4) & 3) << 4),
            (low[..., 32:64] >> 4) | (((high >> 6) & 3) << 4),
        ]
        half_values.append(np.concatenate(parts, axis=-1))
    q = np.concatenate(half_values, axis=-1).astype(np.float32) - 32  # (rows, nb, 256)
    pairs = scales.reshape(rows, n_blocks, 8, 2)
    dominant = np.where(np.abs(pairs[..., 0]) >= np.abs(pairs[..., 1]), pairs[..., 0], pairs[..., 1])
    ratio = np.divide(pairs, dominant[..., None], out=np.zeros_like(pairs), where=dominant[..., None] != 0)
    levels = q.reshape(rows, n_blocks, 8, 2, 16) * (4 * ratio[..., None])
    q8 = np.clip(np.rint(levels) + 128, 0, 255).astype(np.uint8)
    scale = d[..., None] * dominant / 4
    return Affine(q8.reshape(rows, -1), scale.reshape(rows, -1), (-128 * scale).reshape(rows, -1), 8)


POLICY: dict[GGMLQuantizationType, Rule] = {
    T.F32: Rule(None, True, "dense"),
    T.F16: Rule(None, True, "dense"),
    T.BF16: Rule(None, True, "dense"),
    T.Q4_0: Rule(4, True, "affine 4-bit g32", lambda b: _legacy(b, offset=8, has_min=False, has_high=False)),
    T.Q4_1: Rule(4, True, "affine 4-bit g32", lambda b: _legacy(b, offset=0, has_min=True, has_high=False)),
    T.Q5_0: Rule(5, True, "affine 5-bit g32", lambda b: _legacy(b, offset=16, has_min=False, has_high=True)),
    T.Q5_1: Rule(5, True, "affine 5-bit g32", lambda b: _legacy(b, offset=0, has_min=True, has_high=True)),
    T.Q8_0: Rule(8, True, "affine 8-bit g32", _q8_0),
    T.Q4_K: Rule(4, True, "affine 4-bit g32 (d*scale, dmin*min folded)", lambda b: _k_quant(b, high=False)),
    T.Q5_K: Rule(5, True, "affine 5-bit g32 (d*scale, dmin*min folded)", lambda b: _k_quant(b, high=True)),
    T.Q6_K: Rule(8, False, "affine 8-bit g32 (pairs of 16-sub-blocks, one exact)", _q6_k),
}
REQUANTIZED_BITS = 8  # for every other block type: gguf dequantizes, we re-quantize to 8 bits
_warned: set[GGMLQuantizationType] = set()


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integers (rows, columns) < 2**bits into MLX's uint32 little-endian bit stream."""
    rows, columns = q.shape
    q = np.ascontiguousarray(q, dtype=np.uint8)
    if bits == 8:  # little-endian bytes are already the stream
        return q.view(np.uint32)
    if bits == 4:
        return np.ascontiguousarray(q[:, 0::2] | (q[:, 1::2] << 4)).view(np.uint32)
    # 3, 5, 6 bits: every 8 values fill `bits` whole bytes; build each byte from the values
    # that overlap it (uint16 so shifts cannot overflow).
    values = [q[:, i::8].astype(np.uint16) for i in range(8)]
    out = np.empty((rows, columns // 8, bits), dtype=np.uint8)
    for k in range(bits):
        byte = np.zeros((rows, columns // 8), dtype=np.uint16)
        for i, value in enumerate(values):
            shift = bits * i - 8 * k
            if -bits < shift < 8:
                byte |= value << shift if shift >= 0 else value >> -shift
        out[..., k] = byte & 0xFF
    return out.reshape(rows, -1).view(np.uint32)


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack`: uint32 words (rows, n) → uint8 integers (rows, n * 32 // bits)."""
    rows = words.shape[0]
    stream = np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.uint16)).astype(np.uint16)
    return (stream.reshape(rows, -1, bits) * weights).sum(-1).astype(np.uint8)


def rule_for(ggml_type: GGMLQuantizationType) -> Rule:
    """The policy entry for a type; types without one are re-quantized (warned once per type)."""
    if ggml_type in POLICY:
        return POLICY[ggml_type]
    if (
        ggml_type not in GGML_QUANT_SIZES
        or ggml_type in (T.I8, T.I16, T.I32, T.I64, T.F64)
        or not _gguf_can_dequantize(ggml_type)
    ):
        raise ModelFormatError(f"tensor type {ggml_type.name} is not a weight type this engine can load.")
    if ggml_type not in _warned:
        _warned.add(ggml_type)
        warnings.warn(
            f"{ggml_type.name} has no exact affine form: dequantized by the gguf package and "
            f"re-quantized to {REQUANTIZED_BITS}-bit groups of {GROUP_SIZE} (max error (max-min)/510 per group).",
            stacklevel=2,
        )
    return Rule(REQUANTIZED_BITS, False, "dequantized, re-quantized 8-bit g32")


def _gguf_can_dequantize(ggml_type: GGMLQuantizationType) -> bool:
    """Whether the installed gguf package has a dequantizer for the type (Q8_K, Q8_1 have none)."""
    try:
        gguf_dequantize(np.zeros(GGML_QUANT_SIZES[ggml_type][1], dtype=np.uint8), ggml_type)
    except NotImplementedError:
        return False
    return True


def load_tensor(raw: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...], dtype: mx.Dtype,
                quantize: bool = True, exact: bool = False) -> mx.array | QuantizedWeight:
    """Convert one GGUF tensor (bytes as `GGUFFile.raw` returns them) to the internal form.

    `shape` is the NumPy shape. One-dimensional tensors and `quantize=False` give dense arrays;
    `exact=True` gives dense arrays for the types whose affine form is only near (Q6_K, Q2_K, …),
    at the cost of memory: measured on the 0.5B model, Q6_K as 8-bit moves the logits by up to
    0.24 (typically 0.03) from an exact reference, dense by 3e-4.
    """
    rule = rule_for(ggml_type)
    if rule.bits is None or len(shape) == 1 or not quantize or (exact and not rule.exact):
        return mx.array(dequantize_numpy(raw, ggml_type, shape)).astype(dtype)
    rows = int(np.prod(shape[:-1]))
    raw = raw.reshape(rows, -1)
    pieces = [_convert_rows(raw[start : start + ROWS_PER_CHUNK], ggml_type, rule) for start in range(0, rows, ROWS_PER_CHUNK)]
    weight, scales, biases = (np.concatenate(part) for part in zip(*pieces))
    return QuantizedWeight(mx.array(weight), mx.array(scales).astype(dtype), mx.array(biases).astype(dtype), rule.bits, GROUP_SIZE)


def _convert_rows(raw: np.ndarray, ggml_type: GGMLQuantizationType, rule: Rule) -> tuple[np.ndarray, ...]:
    if rule.convert is None:  # re-quantize through float
        affine = _requantize(gguf_dequantize(np.ascontiguousarray(raw), ggml_type).astype(np.float32), rule.bits)
    else:
        block_bytes = GGML_QUANT_SIZES[ggml_type][1]
        affine = rule.convert(raw.reshape(raw.shape[0], -1, block_bytes))
    return pack(affine.q, affine.bits), affine.scales, affine.biases


def _requantize(values: np.ndarray, bits: int) -> Affine:
    """Min-max affine quantization per group: every value within half a level of the grid from
    the group's min to its max, |error| <= (max - min) / (2 * (2**bits - 1)). (`mx.quantize`
    shifts its grid so that 0 is exact, which can leave one end of a group a whole level away.)"""
    rows = values.shape[0]
    groups = values.reshape(rows, -1, GROUP_SIZE)
    low, high = groups.min(axis=-1), groups.max(axis=-1)
    scales = (high - low) / (2**bits - 1)
    levels = np.divide(groups - low[..., None], scales[..., None], out=np.zeros_like(groups), where=scales[..., None] > 0)
    q = np.clip(np.rint(levels), 0, 2**bits - 1).astype(np.uint8)
    return Affine(q.reshape(rows, -1), scales, low, bits)


def dequantize_numpy(raw: np.ndarray, ggml_type: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of a tensor, through the gguf package (BF16 given as uint16 bits)."""
    if ggml_type == T.F32:
        return np.asarray(raw, dtype=np.float32).reshape(shape)
    if ggml_type == T.F16:
        return np.asarray(raw).astype(np.float32).reshape(shape)
    if ggml_type == T.BF16:
        return (np.asarray(raw).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    return gguf_dequantize(np.ascontiguousarray(raw), ggml_type).astype(np.float32).reshape(shape)


def dequantize(weight: QuantizedWeight | mx.array) -> mx.array:
    """The float values of a weight in either internal form."""
    if isinstance(weight, QuantizedWeight):
        return mx.dequantize(weight.weight, weight.scales, weight.biases, group_size=weight.group_size, bits=weight.bits)
    return weight


def concatenate_rows(weights: list[QuantizedWeight | mx.array]) -> QuantizedWeight | mx.array:
    """Stack matrices along rows into one (e.g. Q, K, V → QKV) so one kernel reads them all.

    Quantized matrices of different widths are first promoted to the widest: an affine b-bit
    integer is also a valid integer at any larger width with the same scale and bias, so the
    promotion is exact (Qwen2.5's Q/K are Q5_0 where its V is Q8_0). Mixed dense and quantized
    matrices are all made dense.
    """
    if all(isinstance(w, mx.array) for w in weights):
        return mx.concatenate(weights, axis=0)
    if not all(isinstance(w, QuantizedWeight) for w in weights):
        return mx.concatenate([dequantize(w) for w in weights], axis=0)
    bits = max(w.bits for w in weights)
    group_sizes = {w.group_size for w in weights}
    if len(group_sizes) != 1:
        return mx.concatenate([dequantize(w) for w in weights], axis=0)
    packed = [w.weight if w.bits == bits else mx.array(pack(unpack(np.array(w.weight), w.bits), bits)) for w in weights]
    return QuantizedWeight(
        mx.concatenate(packed, axis=0),
        mx.concatenate([w.scales for w in weights], axis=0),
        mx.concatenate([w.biases for w in weights], axis=0),
        bits,
        group_sizes.pop(),
    )


def split_rows(weight: QuantizedWeight | mx.array, sizes: list[int]) -> list[QuantizedWeight | mx.array]:
    """Inverse of `concatenate_rows` (at the promoted width): used by `convert`."""
    bounds = np.cumsum(sizes)[:-1].tolist()
    if isinstance(weight, mx.array):
        return mx.split(weight, bounds, axis=0)
    parts = zip(*(mx.split(a, bounds, axis=0) for a in (weight.weight, weight.scales, weight.biases)))
    return [QuantizedWeight(w, s, b, weight.bits, weight.group_size) for w, s, b in parts]
