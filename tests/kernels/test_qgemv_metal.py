"""The GEMV kernels' Metal source, run on the CPU by the SIMT harness, against their reference twin."""

from __future__ import annotations

import numpy as np
import pytest

from foundry_mlx.kernels import qgemv, qgemv_launch, qgemv_preload
from foundry_mlx.kernels.metal_sim import bfloat16_to_float32, run_metal_kernel

from .metal_runs import run_source, sampled_rows, to_numpy
from .qgemv_cases import CASES, compare, make_inputs, reference_inputs


def _matches_reference(case, source, launch, kwargs) -> None:
    """Run `source` on `launch` in the harness (only the case's sampled threadgroups, if it names
    some) and compare the outputs with the reference twin's."""
    reference = np.array(qgemv.reference(case.variant, **reference_inputs(kwargs)))
    (output,) = run_source(source, launch.arguments(), groups=case.sample_groups)
    output = bfloat16_to_float32(output) if case.dtype == "bfloat16" else output
    rows = None
    if case.sample_groups is not None:
        rows = sampled_rows(launch.template, launch.output_shape[0], case.sample_groups)
    compare(case, output, reference, rows)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_metal_gemv_matches_reference(case):
    kwargs = make_inputs(case)
    launch = qgemv_launch.launch(case.variant, **kwargs)
    _matches_reference(case, qgemv.kernel_source(case.variant, "metal"), launch, kwargs)


def test_harness_catches_a_wrong_kernel():
    """The comparison is not vacuous: a kernel that drops the bias term of the affine identity fails."""
    case = CASES[-4]  # a small one
    kwargs = make_inputs(case)
    launch = qgemv_launch.launch(case.variant, **kwargs)
    reference = np.array(qgemv.reference(case.variant, **kwargs))
    header, source = qgemv.kernel_source(case.variant, "metal").launch_text("metal")
    broken = source.replace("+ static_cast<float>(biases[g]) * x_sum", "")
    assert broken != source
    (output,) = run_metal_kernel("broken_gemv", case.variant.input_names(), ["y"], broken, header,
                                 [to_numpy(a) for a in launch.inputs], [launch.output_shape], [launch.output_dtype],
                                 launch.grid, launch.threadgroup, template=launch.template)
    with pytest.raises(AssertionError):
        compare(case, output, reference)


@pytest.mark.parametrize("case", [c for c in CASES if c.sample_groups is None], ids=lambda c: c.id)
def test_preloaded_form_matches_reference(case):
    """qgemv_preload.preloaded_body (the layer kernel's GEMV phases: weights and epilogue operands loaded
    into registers first, then the rest) as one kernel, on the same launch: the same outputs."""
    kwargs = make_inputs(case)
    launch = qgemv_launch.launch(case.variant, **kwargs)
    load, compute = qgemv_preload.preloaded_body(case.variant)
    assert "pw[it][r]" in load and "acc[r] +=" in compute and "acc[r] +=" not in load
    source = qgemv_preload.standalone_source(case.variant, "metal")  # load + compute, one launch
    assert load in source.body and compute in source.body
    _matches_reference(case, source, launch, kwargs)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("qkv_896x1152_b8", "down_4864x896_b4_residual",
                                                                  "edge_96x37_b6", "edge_rope_no_bias_b4",
                                                                  "edge_swiglu_g128_b6_f16")], ids=lambda c: c.id)
def test_cuda_standalone_geometry_matches_reference(case, monkeypatch):
    """The standalone kernels' CUDA settings (two rows per SIMD-group, the K walk unrolled two steps)
    in the Metal rendition: units not a multiple of the rows, odd K steps, every epilogue."""
    monkeypatch.setenv("FOUNDRY_GEMV_UNROLL", "2")
    kwargs = make_inputs(case)
    launch = qgemv_launch.launch(case.variant, **kwargs, backend="cuda")
    assert dict(launch.template)["ROWS"] == 2
    source = qgemv.kernel_source(case.variant, "metal")
    assert "#pragma unroll 2" in source.body
    _matches_reference(case, source, launch, kwargs)


@pytest.mark.parametrize("case", [c for c in CASES if c.variant.norm], ids=lambda c: c.id)
@pytest.mark.parametrize("unroll", ["1", "2"])
def test_deferred_norm_matches_reference(case, unroll, monkeypatch):
    """FOUNDRY_GEMV_DEFERRED_NORM=1 (kernels/qgemv_deferred_norm.py): no norm prologue, x·w formed
    as it is loaded, x² summed in one more slot, inv_rms applied in the epilogue: the same outputs,
    split K or not (the QKV cases split K; gate/up does not)."""
    monkeypatch.setenv("FOUNDRY_GEMV_DEFERRED_NORM", "1")
    monkeypatch.setenv("FOUNDRY_GEMV_UNROLL", unroll)
    kwargs = make_inputs(case)
    launch = qgemv_launch.launch(case.variant, **kwargs)
    source = qgemv.kernel_source(case.variant, "metal")
    assert "x_norm" not in source.body and "acc[SLOTS] += xs[i] * xs[i]" in source.body
    _matches_reference(case, source, launch, kwargs)
