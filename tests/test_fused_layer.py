"""The layer kernel's launch plan (kernels/fused_layer.py), checked without a GPU: every phase
covers its units in at most a round or two of the resident blocks, intermediates never overlap in
the scratch buffer, and the attention phase gives every block a share of the positions. (Its
arithmetic is checked on the GPU: tests/kernels/test_fused_gpu.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from foundry_mlx.kernels import fused_layer, qgemv, qgemv_launch

# (hidden, ffn, heads, kv_heads, head_dim) of Qwen2.5-0.5B and -7B
SHAPES = {"0.5b": (896, 4864, 14, 2, 64), "7b": (3584, 18944, 28, 4, 128)}


class _Linear:
    def __init__(self, rows: int, columns: int, bits: int) -> None:
        self.out_features, self.in_features, self.bits, self.group_size = rows, columns, bits, 64

    def __contains__(self, name: str) -> bool:  # `"bias" in linear`, as layers.Linear answers it
        return False


def _half_b_layer():
    """(attention, mlp) stand-ins of a 4-bit Qwen2.5-0.5B layer: what `layer_source` reads."""
    hidden, ffn, heads, kv_heads, dims = SHAPES["0.5b"]
    attention = SimpleNamespace(qkv_proj=_Linear((heads + 2 * kv_heads) * dims, hidden, 4),
                                o_proj=_Linear(hidden, heads * dims, 4), n_heads=heads, n_kv_heads=kv_heads,
                                rope=SimpleNamespace(dims=dims), eps=1e-6, scale=dims ** -0.5)
    mlp = SimpleNamespace(gate_up_proj=_Linear(2 * ffn, hidden, 4), down_proj=_Linear(hidden, ffn, 4), eps=1e-6)
    return attention, mlp


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("bits", [4, 6, 8])
def test_each_phase_takes_few_rounds_of_the_blocks(shape, bits):
    hidden, ffn, heads, kv_heads, dims = SHAPES[shape]
    phases = [((heads + 2 * kv_heads) * dims // 2, hidden, 2), (hidden, heads * dims, 1), (ffn, hidden, 2),
              (hidden, ffn, 1)]
    for units, k, rows_per_unit in phases:
        constants, groups = fused_layer._gemv_constants(units, k, _Linear(units * rows_per_unit, k, bits),
                                                        rows_per_unit)
        slots = constants["ROWS"] * rows_per_unit
        assert slots <= fused_layer.MAX_SLOTS
        assert groups * constants["WARPS_N"] * constants["ROWS"] >= units  # every unit is covered
        # one round per block, or as many rows per SIMD-group as its registers allow
        assert groups <= fused_layer.BLOCKS or slots > fused_layer.MAX_SLOTS - rows_per_unit
        assert -(-groups // fused_layer.BLOCKS) <= 2
        assert constants["WARPS_N"] * constants["WARPS_K"] == qgemv_launch.WARPS


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_scratch_regions_are_aligned_and_disjoint(shape):
    hidden, ffn, heads, kv_heads, dims = SHAPES[shape]
    sizes = {"qkv": (heads + 2 * kv_heads) * dims, "attended": heads * dims, "h": hidden, "activated": ffn}
    offsets = fused_layer.scratch_offsets(sizes["qkv"], sizes["attended"], hidden, ffn)
    spans = sorted((offsets[name], offsets[name] + size) for name, size in sizes.items())
    for (start, end), (next_start, _) in zip(spans, spans[1:]):
        assert start % 8 == 0 and end <= next_start
    assert spans[-1][1] <= offsets["scratch_size"]


@pytest.mark.parametrize("heads", [2, 14, 28, 40, 64, 200])
def test_attention_shares_fill_the_blocks(heads):
    splits = fused_layer.attention_splits(heads)
    assert splits >= 1 and heads * splits <= max(fused_layer.BLOCKS, heads)
    assert heads * splits * 2 > fused_layer.BLOCKS or splits == 16  # no block left idle that a share could use


def test_the_layer_source_names_each_phase_and_writes_one_output():
    attention, mlp = _half_b_layer()
    heads, dims = attention.n_heads, attention.rope.dims
    source, inputs = fused_layer.layer_source(attention, mlp)
    assert source.output_names == ("x_out",)
    assert "scratch" in inputs and "attn_parts" in inputs
    assert source.body.count("foundry_grid_sync();") == 4  # five phases, four barriers
    assert source.body.count("atomicInc(shares_done + head, last)") == 1  # attention merges its own shares
    splits = fused_layer.attention_splits(heads)
    assert f"MUTABLE(float, attn_parts) + {heads * splits * (dims + 2)})" in source.body  # counters after the parts
    assert "prefetch.global.L2" in source.header


def test_gemv_phases_load_weights_before_their_barrier_and_ask_l2_for_the_next_qkv(monkeypatch):
    """The 0.5B layer's four GEMV phases each load their weights (and epilogue operands) into
    registers before the barrier they wait on; the down phase asks L2 for the next layer's QKV.
    With the preload off, the loop form comes back and no phase reads its weights early."""
    attention, mlp = _half_b_layer()
    source, inputs = fused_layer.layer_source(attention, mlp)
    load = "LOAD_WORDS(W, w + (long)row * WORDS_PER_ROW + base * BITS_ / 32, pw[it][r]);"
    compute = "acc[r] += static_cast<float>(ps[it][r]) * dot"
    # Between barriers: [QKV, attention's start] | attention, o_proj's loads | o_proj, gate/up's
    # loads | gate/up, down's loads and the next QKV's prefetch | down.
    spans = source.body.split("foundry_grid_sync();")
    assert len(spans) == 5
    assert [span.count(load) for span in spans] == [1, 1, 1, 1, 0]
    assert [span.count(compute) for span in spans] == [1, 0, 1, 1, 1]
    assert spans[0].index(load) < spans[0].index(compute)
    # the epilogues read their operands from registers loaded with the weights
    assert "static_cast<float>(residual[unit])" not in source.body and source.body.count("e_residual[u] = residual[unit];") == 2
    assert "static_cast<float>(state[0]) * inv_freq[d]" not in source.body and "e_freq[u] = inv_freq[d];" in source.body
    assert "foundry_prefetch_l2(next_qkv_w" in spans[3] and "next_qkv_w" in inputs
    monkeypatch.setattr(fused_layer, "PRELOAD", False)
    plain, _ = fused_layer.layer_source(attention, mlp)
    assert "pw[ITERS]" not in plain.body and plain.body.count("foundry_grid_sync();") == 4


def test_compact_keeps_code_directives_and_strings():
    from foundry_mlx.kernels.source import compact

    text = """
  // a comment line
  #define TWICE(v) (2 * (v))   // trailing comment
    int x = TWICE(3);

  asm volatile("prefetch.global.L2 [%0];" :: "l"(p)); // why
  const char* url = "http://example";  // kept: the quote before it is open
"""
    assert compact(text) == ('#define TWICE(v) (2 * (v))\nint x = TWICE(3);\n'
                             'asm volatile("prefetch.global.L2 [%0];" :: "l"(p));\n'
                             'const char* url = "http://example";\n')


def test_rewritten_applies_in_turn_and_fails_loudly_when_a_pattern_is_gone():
    """How batched and split kernel forms are derived from one body (source.rewritten)."""
    from foundry_mlx.kernels.source import rewritten

    assert rewritten("a b a", [("a", "x"), ("b", "y")]) == "x y x"
    assert rewritten("a b", [("a", "b"), ("b b", "c")]) == "c"  # each replacement sees the last one's text
    with pytest.raises(AssertionError, match="not once"):
        rewritten("a b a", [("a", "x")], once=True)
    with pytest.raises(AssertionError, match="0 times"):
        rewritten("a b", [("c", "x")])


def test_every_kernel_source_compacts_to_the_same_tokens():
    """What MLX is given is the rendered kernel minus comments and layout, token for token."""
    import re

    from foundry_mlx.kernels import embed, qgemm_source, sample, sdpa
    from foundry_mlx.kernels.source import compact

    sources = [qgemv.kernel_source(qgemv.Variant(norm=True, bias=True, rope=True, fused=True), "cuda", 1e-6),
               sdpa.fused_source(0.125), embed.kernel_source(), sample.kernel_source("cuda"),
               qgemm_source.kernel_source("cuda", bias=True, residual=True)]
    for source in sources:
        for backend in ("cuda", "metal"):
            for text in source.render(backend):
                without_comments = re.sub(r"//[^\n]*", "", text)
                assert compact(text).split() == without_comments.split()
                assert len(compact(text)) < len(text)


@pytest.mark.parametrize("shape, chosen", [("0.5b", True), ("7b", False)])
def test_one_launch_per_layer_is_chosen_for_layers_that_fit_in_l2(shape, chosen):
    hidden, ffn, heads, kv_heads, dims = SHAPES[shape]

    def linear(rows, columns):  # 4-bit, group 64, float16 scales and biases
        packed = SimpleNamespace(nbytes=rows * columns // 2)
        groups = SimpleNamespace(nbytes=rows * columns // 64 * 2)
        return SimpleNamespace(weight=packed, scales=groups, biases=groups)

    attention = SimpleNamespace(qkv_proj=linear((heads + 2 * kv_heads) * dims, hidden), o_proj=linear(hidden, hidden))
    mlp = SimpleNamespace(gate_up_proj=linear(2 * ffn, hidden), down_proj=linear(hidden, ffn))
    model = SimpleNamespace(layers=[SimpleNamespace(self_attn=attention, mlp=mlp)])
    assert fused_layer.suits(model) is chosen


@pytest.mark.parametrize("switch", ["1", "0", ""])
def test_metal_takes_the_layer_kernel_only_when_asked(switch, monkeypatch):
    """On Metal the layer kernel (its grid-wide barriers rest on threadgroups staying resident, which
    Metal does not promise) is an experiment a Mac user turns on with FOUNDRY_LAYER_KERNEL=1; never
    chosen by itself. On CUDA the switch forces it either way, unset lets `prepare` choose."""
    from foundry_mlx.kernels import fused_step

    monkeypatch.setenv("FOUNDRY_LAYER_KERNEL", switch)
    assert fused_step.GpuKernels("metal").layer_kernel is (switch == "1")
    assert fused_step.GpuKernels("metal", layer_kernel=True).layer_kernel is True
    assert fused_step.GpuKernels("cuda").layer_kernel is {"1": True, "0": False}.get(switch)


def test_timing_marks_every_phase_end_and_barrier_only_when_asked(monkeypatch):
    """FOUNDRY_LAYER_TIMING=1 (benchmarks/layer_timing.py): a clock mark after each phase's body
    and each barrier, stored after the attention's parts and counters; off, none of it."""
    attention, mlp = _half_b_layer()
    heads, dims = attention.n_heads, attention.rope.dims
    plain, _ = fused_layer.layer_source(attention, mlp)
    assert "foundry_mark" not in plain.body + plain.header
    monkeypatch.setattr(fused_layer, "TIMING", True)
    timed, _ = fused_layer.layer_source(attention, mlp)
    assert timed.name == plain.name + "_timed"
    marks = [f"foundry_mark(foundry_marks, {k}, MARKS, foundry_start);" for k in range(2 * fused_layer.PHASES - 1)]
    positions = [timed.body.index(mark) for mark in marks]
    assert positions == sorted(positions) and timed.body.count("foundry_mark(") == len(marks)
    parts = heads * fused_layer.attention_splits(heads) * (dims + 2) + heads
    assert f"constexpr long MARKS_AT = {parts};" in timed.body


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_preloaded_standalone_gemvs_fit_their_registers(shape):
    """FOUNDRY_GEMV_PRELOAD=1 (the five-kernel step's GEMVs in the preloaded form) takes a launch
    only where its weights fit in qgemv_preload.REGISTERS per thread: every projection of the 0.5B
    and 7B shapes at 4 bits, the 8-bit LM head of 151,936 rows too."""
    from foundry_mlx.kernels import qgemv_preload

    hidden, ffn, heads, kv_heads, dims = SHAPES[shape]
    projections = [((heads + 2 * kv_heads) * dims // 2, hidden, 2, 4), (hidden, heads * dims, 1, 4),
                   (ffn, hidden, 2, 4), (hidden, ffn, 1, 4), (151936, hidden, 1, 8)]
    for units, k, rows_per_unit, bits in projections:
        constants, _ = qgemv_launch.shape_constants(units, k, bits, 64)
        assert qgemv_preload.fits(constants, rows_per_unit), (units, k, bits)
    constants, _ = qgemv_launch.shape_constants(896, 1 << 18, 4, 64)  # a K far longer than any layer's
    assert not qgemv_preload.fits(constants, 1)
