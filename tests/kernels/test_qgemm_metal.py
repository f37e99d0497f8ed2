"""The quantized GEMM's Metal rendition, run on the CPU by the SIMT harness, against its reference twin.

Small shapes (the simulator runs one OS thread per GPU thread): M and N not multiples of the
64x64 tile, K of several tiles, every bit width, groups of 32, 64 and 128, both half types, the
bias and residual epilogue.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx.kernels import qgemm, qgemm_source
from foundry_mlx.kernels.metal_sim import bfloat16_to_float32, run_metal_kernel

from .metal_runs import run_source, to_numpy
from .qgemm_cases import Case, compare, make_inputs, oracle

CASES = [
    Case(20, 72, 128, bits=4, group=32),
    Case(70, 136, 256, bits=5, group=128),
    Case(17, 96, 192, bits=6, group=64),
    Case(65, 64, 256, bits=8, group=128),
    Case(33, 80, 128, bits=4, group=128, dtype="bfloat16"),
    Case(24, 72, 128, bits=5, group=32, bias=True, residual=True),
]


def _run(case: Case, **options) -> np.ndarray:
    inputs = make_inputs(case)
    launch = qgemm.launch("metal", **inputs)
    source = qgemm_source.kernel_source("metal", case.bias, case.residual)
    (output,) = run_source(source, launch.arguments(), **options)
    return bfloat16_to_float32(output) if case.dtype == "bfloat16" else output


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_metal_gemm_matches_reference(case):
    compare(case, _run(case), oracle(make_inputs(case)))


def test_metal_gemm_has_no_threadgroup_race():
    """One thread at a time, switching only at barriers and SIMD-group functions, in reverse order:
    a missing barrier between the dequantizing threads and the multiplying SIMD-groups reads poison."""
    case = Case(9, 64, 96, bits=4, group=32)
    compare(case, _run(case, schedule="reverse"), oracle(make_inputs(case)))


def test_harness_catches_a_wrong_kernel():
    """The comparison is not vacuous: a kernel that drops the weights' affine bias fails it."""
    case = CASES[0]
    inputs = make_inputs(case)
    launch = qgemm.launch("metal", **inputs)
    source = qgemm_source.kernel_source("metal")
    header, body = source.launch_text("metal")
    broken = body.replace("Q_TO_FLOAT(q & MASK) + w_bias", "Q_TO_FLOAT(q & MASK)")
    assert broken != body
    arguments = launch.arguments()
    (output,) = run_metal_kernel("broken_qgemm", source.input_names, source.output_names, broken, header,
                                 [to_numpy(a) for a in arguments["inputs"]], arguments["output_shapes"],
                                 arguments["output_dtypes"], arguments["grid"], arguments["threadgroup"],
                                 template=arguments["template"])
    with pytest.raises(AssertionError):
        compare(case, output, oracle(inputs))


@pytest.mark.parametrize("case", [Case(70, 136, 256, bits=5, group=128), Case(9, 64, 160, bits=4, group=32,
                                                                          bias=True, residual=True)],
                         ids=lambda c: c.id)
def test_two_stage_pipeline(case):
    """The CUDA rendition's schedule (two stages: tile k+1 is staged while tile k multiplies, one
    barrier per tile), the only part of it the simulator can run: the Metal rendition with two
    stages (unpadded, to fit 32 KB), one thread at a time in reverse order, so a stage overwritten
    while another SIMD-group still reads it shows up as a wrong result."""
    inputs = make_inputs(case)
    arguments = qgemm.launch("metal", **inputs).arguments()
    source = qgemm_source.kernel_source("metal", case.bias, case.residual)
    header, body = source.launch_text("metal")
    two_stages = header.replace("#define STAGES 1", "#define STAGES 2").replace("#define PAD 4", "#define PAD 0")
    assert two_stages.count("#define STAGES 2") == 1
    (output,) = run_metal_kernel("qgemm_two_stages", source.input_names, source.output_names, body, two_stages,
                                 [to_numpy(a) for a in arguments["inputs"]], arguments["output_shapes"],
                                 arguments["output_dtypes"], arguments["grid"], arguments["threadgroup"],
                                 template=arguments["template"], schedule="reverse")
    compare(case, output, oracle(inputs))


@pytest.mark.parametrize("case, split, stages", [
    (Case(20, 72, 256, bits=4, group=64), 2, 1),
    (Case(33, 80, 512, bits=5, group=128, bias=True, residual=True), 4, 1),
    (Case(17, 96, 256, bits=6, group=32, dtype="bfloat16"), 2, 2),
], ids=lambda v: v.id if isinstance(v, Case) else str(v))
def test_split_k(case, split, stages):
    """Split-K: each threadgroup walks only its K range and writes fp32 partials into its own slab;
    summed (and given bias and residual as qgemm.run does) they equal the reference. With two stages
    (the CUDA schedule) in reverse thread order as in test_two_stage_pipeline."""
    inputs = make_inputs(case)
    arguments = qgemm.launch("metal", inputs["x"], inputs["weight"], split=split).arguments()
    assert arguments["output_shapes"] == [(split, case.m, case.n)]
    source = qgemm_source.kernel_source("metal", split=True)
    header, body = source.launch_text("metal")
    if stages == 2:
        header = header.replace("#define STAGES 1", "#define STAGES 2").replace("#define PAD 4", "#define PAD 0")
    (partials,) = run_metal_kernel("qgemm_split", source.input_names, source.output_names, body, header,
                                   [to_numpy(a) for a in arguments["inputs"]], arguments["output_shapes"],
                                   arguments["output_dtypes"], arguments["grid"], arguments["threadgroup"],
                                   template=arguments["template"], schedule="reverse")
    slabs = partials.reshape(split, case.m, case.n)
    assert all(np.abs(s).max() > 0 for s in slabs), "a K range was left unwritten"
    # The second launch sums the slabs and adds the epilogue, as qgemm.run does.
    reduce = qgemm.reduce_launch(mx.array(partials), (case.m, case.n), getattr(mx, case.dtype),
                                 inputs["bias"] if case.bias else None, inputs["residual"] if case.residual else None)
    (y,) = run_source(qgemm_source.reduce_source(case.bias, case.residual), reduce.arguments())
    compare(case, bfloat16_to_float32(y) if case.dtype == "bfloat16" else y, oracle(inputs))
    # One slab alone is not the answer: the K ranges really are split.
    with pytest.raises(AssertionError):
        compare(case, slabs[0] * split, oracle(inputs))


@pytest.mark.parametrize("bias, residual", [(False, False), (True, False), (False, True), (True, True)])
def test_split_reduce_rounds_as_the_unsplit_epilogue(bias, residual):
    """The reduce launch alone on chosen partials (3 slabs, 5x7 with one partial thread group): the
    slabs summed in fp32, rounded to T, then the bias and the residual each added and rounded in T,
    the unsplit epilogue's order; checked against that computed here in numpy, bit for bit."""
    rng = np.random.default_rng(3)
    partials = rng.normal(size=(3, 5, 7)).astype(np.float32)
    b = rng.normal(size=7).astype(np.float16)
    r = rng.normal(size=(5, 7)).astype(np.float16)
    launch = qgemm.reduce_launch(mx.array(partials), (5, 7), mx.float16, mx.array(b) if bias else None,
                                 mx.array(r) if residual else None)
    (y,) = run_source(qgemm_source.reduce_source(bias, residual), launch.arguments())
    expected = (partials[0] + partials[1] + partials[2]).astype(np.float16)
    if bias:
        expected = (expected.astype(np.float32) + b.astype(np.float32)).astype(np.float16)
    if residual:
        expected = (r.astype(np.float32) + expected.astype(np.float32)).astype(np.float16)
    assert y.shape == (5, 7) and y.dtype == np.float16
    np.testing.assert_array_equal(y, expected)


def test_leading_axes_are_rows_without_reshapes():
    """x (B, L, K) and a residual (B, L, N) go to the kernel as they are (no reshape nodes): it flattens
    the leading axes into rows itself, and its output is (B, L, N) holding the 2-D product's values."""
    case = Case(20, 72, 128, bits=4, group=32, bias=True, residual=True)
    inputs = make_inputs(case)
    flat = _run(case)
    x, residual = inputs["x"].reshape(4, 5, 128), inputs["residual"].reshape(4, 5, 72)
    launch = qgemm.launch("metal", x, inputs["weight"], bias=inputs["bias"], residual=residual)
    assert launch.arguments()["output_shapes"] == [(4, 5, 72)]
    assert launch.arguments()["inputs"][0] is x and launch.arguments()["inputs"][-1] is residual
    (output,) = run_source(qgemm_source.kernel_source("metal", True, True), launch.arguments())
    assert output.shape == (4, 5, 72)
    np.testing.assert_array_equal(output.reshape(20, 72), flat)


@pytest.mark.parametrize("dtype", [np.float16, "bfloat16"])
def test_split_reduce_applies_swiglu_rounding_each_step(dtype):
    """The SwiGLU sum alone on chosen partials (3 slabs, 5 rows of [gate | up], 7 columns each):
    gate and up summed in fp32 and rounded to T, then sigmoid(gate), its product with gate and that
    product with up, each rounded to T as the MLX ops it replaces round; checked against numpy."""
    rng = np.random.default_rng(4)
    partials = rng.normal(size=(3, 5, 14)).astype(np.float32) * 2
    mx_dtype = mx.float16 if dtype is np.float16 else mx.bfloat16
    launch = qgemm.reduce_launch(mx.array(partials), (5, 7), mx_dtype)
    (y,) = run_source(qgemm_source.reduce_source(swiglu=True), launch.arguments())

    def rounded(values):  # to T and back to float32
        return np.array(mx.array(values.astype(np.float32)).astype(mx_dtype).astype(mx.float32))

    summed = partials[0] + partials[1] + partials[2]
    gate, up = rounded(summed[:, :7]), rounded(summed[:, 7:])
    sigmoid = rounded(1.0 / (1.0 + np.exp(-gate)))
    expected = rounded(rounded(sigmoid * gate) * up)
    got = bfloat16_to_float32(y) if dtype == "bfloat16" else y.astype(np.float32)
    assert y.shape == (5, 7)
    np.testing.assert_allclose(got, expected, rtol=2.0 ** -8, atol=1e-6)
    assert np.mean(got == expected) > 0.9
    assert np.abs(got - rounded(gate * up)).max() > 0.01, "the activation was not applied"
