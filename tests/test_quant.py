"""The quantization policy (`foundry_mlx/quant.py`) against the `gguf` package's dequantizers.

For each GGUF type the same bytes are converted by `quant.load_tensor`, dequantized back with
`quant.dequantize` (MLX's affine layout), and compared with `gguf.quants.dequantize`. The error
bound of each comparison is stated where it is asserted.
"""

from __future__ import annotations

import warnings

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from tiny_models import QUANTIZABLE, random_blocks

from foundry_mlx import quant
from foundry_mlx.errors import ModelFormatError

T = GGMLQuantizationType
ROWS, COLUMNS = 5, 512  # several rows, several 256-blocks per row: catches row/block order mistakes
EPS32 = float(np.finfo(np.float32).eps)


def raw_tensor(ggml_type: GGMLQuantizationType, rows: int = ROWS, columns: int = COLUMNS, seed: int = 0) -> np.ndarray:
    """Bytes of a (rows, columns) tensor as `GGUFFile.raw` returns them: plain types as their
    values (BF16 as uint16 bits), block types as uint8 (rows, bytes per row)."""
    rng = np.random.default_rng(seed)
    values = (rng.standard_normal((rows, columns)) * rng.uniform(0.01, 3, (rows, 1))).astype(np.float32)
    if ggml_type == T.F32:
        return values
    if ggml_type == T.F16:
        return values.astype(np.float16)
    if ggml_type == T.BF16:
        return gguf_quantize(values, T.BF16).view(np.uint16).reshape(rows, columns)
    if ggml_type in QUANTIZABLE or ggml_type == T.MXFP4:
        return gguf_quantize(values, ggml_type)
    return random_blocks(ggml_type, rows, columns, rng, std=0.05, signed=True)


def oracle(raw: np.ndarray, ggml_type: GGMLQuantizationType) -> np.ndarray:
    """gguf.quants.dequantize of the same bytes, float32."""
    if ggml_type in (T.F32, T.F16):
        return raw.astype(np.float32)
    return gguf_dequantize(np.ascontiguousarray(raw).view(np.uint8), ggml_type).astype(np.float32)


def ours(raw: np.ndarray, ggml_type: GGMLQuantizationType, **options) -> np.ndarray:
    shape = (raw.shape[0], oracle(raw, ggml_type).shape[1])
    return np.array(quant.dequantize(quant.load_tensor(raw, ggml_type, shape, mx.float32, **options)))


# --- every type of the policy ---------------------------------------------------------------------

EXACT_TYPES = [t for t, rule in quant.POLICY.items() if rule.exact]
NEAR_TYPES = [t for t, rule in quant.POLICY.items() if not rule.exact]


def test_policy_covers_what_the_architecture_promises():
    assert {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K} <= set(quant.POLICY)
    assert NEAR_TYPES == [T.Q6_K]


@pytest.mark.parametrize("ggml_type", EXACT_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_types_are_exact(ggml_type, seed):
    """Bound 0 in float32. Why it is exactly 0 and not "within rounding": in every exact type the
    product scale*q is exact in float32 (an fp16 d, or d times a 6-bit scale, has <= 17
    significant bits; q has <= 8), so scale*q + bias rounds once, as gguf's d*(q - offset) or
    d*q + m does, to the same float."""
    raw = raw_tensor(ggml_type, seed=seed)
    weight = quant.load_tensor(raw, ggml_type, (ROWS, COLUMNS), mx.float32)
    rule = quant.POLICY[ggml_type]
    if rule.bits is None:
        assert isinstance(weight, mx.array) and weight.dtype == mx.float32
    else:
        assert isinstance(weight, quant.QuantizedWeight)
        assert (weight.bits, weight.group_size, weight.shape) == (rule.bits, 32, (ROWS, COLUMNS))
    np.testing.assert_array_equal(np.array(quant.dequantize(weight)), oracle(raw, ggml_type))


def _q6_k_bound(raw: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per value: the bound of quant._q6_k's docstring, and whether the value is in its group's
    dominant sub-block. Derived from the block bytes (llama.cpp block_q6_K: ql[128], qh[64],
    int8 scales[16], fp16 d), not from the converter.

    Each group of 32 is a pair of 16-value sub-blocks sharing the 8-bit scale d*s_dom/4, s_dom
    the pair's scale of larger magnitude. The dominant sub-block is exact; a value of the other
    is rounded to the nearest of the 256 levels (error <= half a level = |d*s_dom|/8), except
    at the clipped top, level 128 -> 127, where it is <= one level, |d*s_dom|/4."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 210)
    scales = blocks[..., 192:208].view(np.int8).astype(np.float64)  # (rows, blocks, 16 sub-blocks)
    d = blocks[..., 208:210].copy().view(np.float16)[..., 0].astype(np.float64)  # (rows, blocks)
    pairs = np.abs(scales).reshape(rows, -1, 8, 2)
    dominant = np.stack([pairs[..., 0] >= pairs[..., 1], pairs[..., 0] < pairs[..., 1]], -1).reshape(rows, -1, 16)
    step = np.repeat(np.abs(d)[..., None] * pairs.max(-1) / 4, 2, axis=-1)  # one level, per sub-block
    values = np.abs(reference.astype(np.float64)).reshape(rows, -1, 16, 16)  # (rows, blocks, sub-block, value)
    level = values / np.where(step > 0, step, 1)[..., None]
    bound = np.where(level > 127.5, 1.0, 0.5) * step[..., None]
    return bound.reshape(rows, -1), np.broadcast_to(dominant[..., None], bound.shape).reshape(rows, -1)


def _q6_k_edge_blocks() -> np.ndarray:
    """Random Q6_K rows plus pairs built to hit the edges: equal scales of opposite sign (the
    level +128 that must clip to 127), a zero scale, both scales zero, negative d."""
    raw = raw_tensor(T.Q6_K, rows=4, columns=512, seed=7).copy()
    blocks = raw.reshape(4, 2, 210)
    scales = blocks[..., 192:208].view(np.int8)
    scales[0, 0, 0:2] = [37, -37]
    scales[0, 0, 2:4] = [-128, 127]
    scales[0, 1, 0:2] = [0, 0]
    scales[1, 0, 0:4] = [0, 5, -9, 0]
    blocks[0, 0, 0:128] = 0  # q = 0 → q - 32 = -32: with ratio -1 the level is +128
    blocks[0, 0, 128:192] = 0
    d = blocks[..., 208:210].copy().view(np.float16)
    d[2] = -np.abs(d[2])
    blocks[..., 208:210] = d.view(np.uint8)
    return blocks.reshape(4, -1)


@pytest.mark.parametrize("raw", [raw_tensor(T.Q6_K), raw_tensor(T.Q6_K, seed=3), _q6_k_edge_blocks()],
                         ids=["random", "random2", "edges"])
def test_q6_k_error_within_its_documented_bound(raw):
    reference = oracle(raw, T.Q6_K)
    weight = quant.load_tensor(raw, T.Q6_K, reference.shape, mx.float32)
    assert isinstance(weight, quant.QuantizedWeight) and weight.bits == 8 and weight.group_size == 32
    error = np.abs(np.array(quant.dequantize(weight)).astype(np.float64) - reference)
    bound, dominant = _q6_k_bound(raw, reference)
    # Float rounding: our scale*q (19-bit scale times an 8-bit q) may round once, and the bias
    # add once: a few ulps of the group's range (256 levels).
    slack = 4 * EPS32 * 256 * bound
    assert (error <= bound + slack).all(), f"worst excess {np.max(error - bound - slack):.3g}"
    assert (error[dominant] <= slack[dominant]).all()
    # The bound is not vacuous: non-dominant values do get rounded.
    assert error[~dominant].max() > 0.2 * bound[~dominant].max()


def test_q6_k_clipped_level_is_within_one_step():
    """The crafted pair [37, -37] with every q - 32 = -32 (row 0, block 0): the second
    sub-block's values d*(-37)*(-32) are level +128 of the group's grid, which stops at 127."""
    raw = _q6_k_edge_blocks()
    reference = oracle(raw, T.Q6_K)
    d = float(raw[0, 208:210].view(np.float16)[0])
    np.testing.assert_array_equal(reference[0, 16:32], np.float32(d * 37 * 32))
    step = abs(d) * 37 / 4
    error = np.abs(ours(raw, T.Q6_K).astype(np.float64) - reference)
    np.testing.assert_allclose(error[0, 16:32], step, rtol=1e-5)  # exactly one level: the clip
    assert error[0, :16].max() <= 1e-6 * step  # the dominant sub-block is exact


# --- types with no exact form: re-quantized -------------------------------------------------------

REQUANTIZED_TYPES = [T.Q2_K, T.Q3_K, T.IQ4_NL, T.IQ4_XS, T.MXFP4]


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(quant, "_warned", set())


@pytest.mark.parametrize("ggml_type", REQUANTIZED_TYPES, ids=lambda t: t.name)
def test_requantized_types_within_half_a_level(ggml_type, fresh_warnings):
    """8-bit min-max re-quantization of a group of 32 puts every value within half a level of a
    grid from its min to its max: |error| <= (max - min) / 510 per group, plus float rounding
    (a few ulps of the group's largest magnitude)."""
    raw = raw_tensor(ggml_type, seed=4)
    reference = oracle(raw, ggml_type)
    with pytest.warns(UserWarning, match=ggml_type.name):
        weight = quant.load_tensor(raw, ggml_type, reference.shape, mx.float32)
    assert isinstance(weight, quant.QuantizedWeight) and weight.bits == quant.REQUANTIZED_BITS == 8
    error = np.abs(np.array(quant.dequantize(weight)).astype(np.float64) - reference).reshape(ROWS, -1, 32)
    groups = reference.astype(np.float64).reshape(ROWS, -1, 32)
    bound = (groups.max(-1) - groups.min(-1)) / 510 + 4 * EPS32 * np.abs(groups).max(-1)
    assert (error.max(-1) <= bound).all(), f"worst ratio {np.max(error.max(-1) / bound):.3f}"


def test_requantization_warns_once_per_type(fresh_warnings):
    raw = raw_tensor(T.Q2_K)
    with pytest.warns(UserWarning) as first:
        quant.load_tensor(raw, T.Q2_K, (ROWS, COLUMNS), mx.float32)
    assert len(first) == 1
    message = str(first[0].message)
    assert "Q2_K" in message and "re-quantized" in message and "\n" not in message
    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        quant.load_tensor(raw, T.Q2_K, (ROWS, COLUMNS), mx.float32)
        quant.load_tensor(raw_tensor(T.Q6_K), T.Q6_K, (ROWS, COLUMNS), mx.float32)  # in POLICY: never warns
        quant.load_tensor(raw_tensor(T.Q4_K), T.Q4_K, (ROWS, COLUMNS), mx.float32)
    assert later == []
    with pytest.warns(UserWarning, match="Q3_K"):  # another type warns on its own
        quant.load_tensor(raw_tensor(T.Q3_K), T.Q3_K, (ROWS, COLUMNS), mx.float32)


@pytest.mark.parametrize("ggml_type", [T.I8, T.I32, T.F64, T.Q8_K, T.Q8_1], ids=lambda t: t.name)
def test_types_that_are_not_weights_raise_model_format_error(ggml_type, fresh_warnings):
    block_size, block_bytes = GGML_QUANT_SIZES[ggml_type]
    raw = np.zeros((2, 256 // block_size * block_bytes), dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ModelFormatError, match=ggml_type.name):
            quant.load_tensor(raw, ggml_type, (2, 256), mx.float32)


# --- exact=True, quantize=False, 1-D tensors, chunking ---------------------------------------------


@pytest.mark.parametrize("ggml_type", [T.Q6_K, T.Q2_K, T.IQ4_NL], ids=lambda t: t.name)
def test_exact_option_loads_near_types_dense_and_exact(ggml_type, fresh_warnings):
    raw = raw_tensor(ggml_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weight = quant.load_tensor(raw, ggml_type, (ROWS, COLUMNS), mx.float32, exact=True)
    assert isinstance(weight, mx.array)
    np.testing.assert_array_equal(np.array(weight), oracle(raw, ggml_type))


@pytest.mark.parametrize("ggml_type", [T.Q4_K, T.Q5_0, T.Q8_0], ids=lambda t: t.name)
def test_exact_option_keeps_exact_types_quantized(ggml_type):
    weight = quant.load_tensor(raw_tensor(ggml_type), ggml_type, (ROWS, COLUMNS), mx.float32, exact=True)
    assert isinstance(weight, quant.QuantizedWeight)


def test_quantize_false_and_vectors_are_dense():
    raw = raw_tensor(T.Q8_0)
    dense = quant.load_tensor(raw, T.Q8_0, (ROWS, COLUMNS), mx.float32, quantize=False)
    assert isinstance(dense, mx.array)
    np.testing.assert_array_equal(np.array(dense), oracle(raw, T.Q8_0))
    vector = quant.load_tensor(raw[0], T.Q8_0, (COLUMNS,), mx.float32)
    assert isinstance(vector, mx.array) and vector.shape == (COLUMNS,)
    np.testing.assert_array_equal(np.array(vector), oracle(raw[:1], T.Q8_0)[0])


@pytest.mark.parametrize("ggml_type", [T.Q5_K, T.Q6_K, T.Q2_K], ids=lambda t: t.name)
def test_conversion_in_row_chunks_equals_one_piece(ggml_type, monkeypatch, fresh_warnings):
    raw = raw_tensor(ggml_type, rows=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = ours(raw, ggml_type)
        monkeypatch.setattr(quant, "ROWS_PER_CHUNK", 3)
        np.testing.assert_array_equal(ours(raw, ggml_type), whole)


def test_quantized_matmul_reads_the_converted_layout():
    """What the model actually runs: MLX's quantized_matmul on our packed Q5_0 (5-bit) weight."""
    raw = raw_tensor(T.Q5_0, rows=8, columns=256)
    weight = quant.load_tensor(raw, T.Q5_0, (8, 256), mx.float32)
    x = np.random.default_rng(0).standard_normal((3, 256)).astype(np.float32)
    got = np.array(mx.quantized_matmul(mx.array(x), weight.weight, weight.scales, weight.biases,
                                       transpose=True, group_size=32, bits=5))
    expected = x.astype(np.float64) @ oracle(raw, T.Q5_0).astype(np.float64).T
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.abs(expected).max())


# --- pack / unpack --------------------------------------------------------------------------------


def reference_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """MLX's layout, written the slow, obvious way: value j of a row occupies bits
    j*bits .. j*bits+bits-1 of the row's little-endian bit stream of uint32 words."""
    rows, columns = q.shape
    words = np.zeros((rows, columns * bits // 32), dtype=np.uint64)
    for r in range(rows):
        for j in range(columns):
            for b in range(bits):
                if (int(q[r, j]) >> b) & 1:
                    position = j * bits + b
                    words[r, position // 32] |= np.uint64(1) << np.uint64(position % 32)
    return words.astype(np.uint32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_matches_reference_and_unpack_inverts_it(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2**bits, (3, 64), dtype=np.uint8)
    q[0, :] = 2**bits - 1  # all ones: every bit of every word set where values are
    packed = quant.pack(q, bits)
    assert packed.dtype == np.uint32 and packed.shape == (3, 64 * bits // 32)
    np.testing.assert_array_equal(packed, reference_pack(q, bits))
    np.testing.assert_array_equal(quant.unpack(packed, bits), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_pack_agrees_with_mx_quantize(bits):
    w = np.random.default_rng(10 + bits).standard_normal((4, 128)).astype(np.float32)
    words, scales, biases = (np.array(a) for a in mx.quantize(mx.array(w), group_size=32, bits=bits))
    q = quant.unpack(words, bits)
    assert q.max() < 2**bits
    np.testing.assert_array_equal(quant.pack(q, bits), words)
    # mx.dequantize reads the stream as we do: w = scale * q + bias per group of 32.
    mine = (q.reshape(4, -1, 32) * scales[..., None] + biases[..., None]).reshape(4, 128)
    theirs = np.array(mx.dequantize(mx.array(words), mx.array(scales), mx.array(biases), group_size=32, bits=bits))
    np.testing.assert_allclose(theirs, mine, rtol=0, atol=2 * EPS32 * np.abs(mine).max())


# --- concatenate_rows / split_rows -----------------------------------------------------------------


def _loaded(ggml_type, rows, seed):
    raw = raw_tensor(ggml_type, rows=rows, columns=256, seed=seed)
    return quant.load_tensor(raw, ggml_type, (rows, 256), mx.float32), oracle(raw, ggml_type)


def test_concatenate_promotes_5_bit_to_8_bit_exactly():
    q5, q5_values = _loaded(T.Q5_0, 6, 1)
    q8, q8_values = _loaded(T.Q8_0, 4, 2)
    assert (q5.bits, q8.bits) == (5, 8)
    fused = quant.concatenate_rows([q5, q8])
    assert isinstance(fused, quant.QuantizedWeight) and fused.bits == 8 and fused.shape == (10, 256)
    # Exact: a 5-bit integer is the same integer in 8 bits, with the same scale and bias.
    np.testing.assert_array_equal(np.array(quant.dequantize(fused)), np.concatenate([q5_values, q8_values]))
    parts = quant.split_rows(fused, [6, 4])
    assert [p.shape for p in parts] == [(6, 256), (4, 256)] and all(p.bits == 8 for p in parts)
    np.testing.assert_array_equal(np.array(quant.dequantize(parts[0])), q5_values)
    np.testing.assert_array_equal(np.array(quant.dequantize(parts[1])), q8_values)


def test_concatenate_qkv_of_three_widths():
    (q, q_values), (k, k_values), (v, v_values) = _loaded(T.Q4_0, 4, 3), _loaded(T.Q5_1, 2, 4), _loaded(T.Q8_0, 2, 5)
    fused = quant.concatenate_rows([q, k, v])
    assert fused.bits == 8
    np.testing.assert_array_equal(np.array(quant.dequantize(fused)), np.concatenate([q_values, k_values, v_values]))
    for part, values in zip(quant.split_rows(fused, [4, 2, 2]), (q_values, k_values, v_values), strict=True):
        np.testing.assert_array_equal(np.array(quant.dequantize(part)), values)


def test_concatenate_same_width_keeps_the_packed_words():
    (a, _), (b, _) = _loaded(T.Q4_K, 3, 6), _loaded(T.Q4_0, 2, 7)
    fused = quant.concatenate_rows([a, b])
    assert fused.bits == 4
    np.testing.assert_array_equal(np.array(fused.weight), np.concatenate([np.array(a.weight), np.array(b.weight)]))


def test_concatenate_dense_and_mixed():
    (q, q_values) = _loaded(T.Q8_0, 3, 8)
    dense = mx.array(np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32))
    mixed = quant.concatenate_rows([q, dense])
    assert isinstance(mixed, mx.array)
    np.testing.assert_array_equal(np.array(mixed), np.concatenate([q_values, np.array(dense)]))
    both = quant.concatenate_rows([dense, dense])
    assert isinstance(both, mx.array) and both.shape == (4, 256)
    halves = quant.split_rows(both, [2, 2])
    np.testing.assert_array_equal(np.array(halves[1]), np.array(dense))
