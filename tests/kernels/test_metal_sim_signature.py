"""Tests of the Metal kernel simulator itself (foundry_mlx.kernels.metal_sim): the kernel signature MLX would write, and the threadgroup-declaration rewrite.

Each test pins one behaviour that kernel tests rely on, with a kernel that gives
a different answer if the simulator gets that behaviour wrong.
"""

from __future__ import annotations

import numpy as np
import pytest

from foundry_mlx.kernels.metal_sim import (
    metal_signature,
    run_metal_kernel,
)
from foundry_mlx.kernels.metal_sim.rewrite import rewrite_threadgroup_declarations

pytestmark = pytest.mark.filterwarnings("ignore::foundry_mlx.kernels.metal_sim.MetalCompileWarning")


# ------------------------------------------------------------- signature --
def test_signature_written_by_hand_device_scalar_shape_attribute() -> None:
    source = "    uint i = thread_position_in_grid.x;\n    y[i] = alpha * x[i] + x_shape[0];\n"
    inputs = [np.zeros(16, np.float32), np.float32(2.0)]
    name, text = metal_signature("axpy", ["x", "alpha"], ["y"], source, "", inputs, [np.float32])
    assert name == "custom_kernel_axpy_float_floats_float"
    assert text == (
        "[[kernel]] void custom_kernel_axpy_float_floats_float(\n"
        "  const device float* x [[buffer(0)]],\n"
        "  const constant int* x_shape [[buffer(1)]],\n"
        "  const constant float& alpha [[buffer(2)]],\n"
        "  device float* y [[buffer(3)]],\n"
        "  uint3 thread_position_in_grid [[thread_position_in_grid]]) {\n" + source + "\n}\n"
    )


def test_signature_written_by_hand_templates_constant_input_and_mlx_quirk() -> None:
    # Two outputs, a shape buffer and no attribute: MLX's comma test counts the
    # shape buffer and closes the parameter list twice. Reproduced on purpose:
    # such a kernel does not compile on a Mac either.
    inputs = [np.zeros(4, np.uint8), np.zeros(64, np.float16)]
    template = [("bits", 4), ("transpose", False), ("T", np.float16)]
    name, text = metal_signature(
        "q", ["w", "s"], ["o1", "o2"], "o1[0] = w_shape[0];", "// header\n", inputs, [np.float32, np.int32], template
    )
    kernel = "custom_kernel_q__4_0_float16_t_uint8_tc_float16_t_float_int32_t"
    assert name == kernel
    assert text == (
        "// header\n"
        "template <int bits, bool transpose, typename T>\n"
        f"[[kernel]] void {kernel}(\n"
        "  const constant uint8_t* w [[buffer(0)]],\n"
        "  const constant int* w_shape [[buffer(1)]],\n"
        "  const device float16_t* s [[buffer(2)]],\n"
        "  device float* o1 [[buffer(3)]]) {\n"
        "  device int32_t* o2 [[buffer(4)]]) {\n"
        "o1[0] = w_shape[0];\n}\n\n"
        f'template [[host_name("{kernel}")]] [[kernel]] decltype({kernel}<4, 0, float16_t>) {kernel}<4, 0, float16_t>;\n'
    )


def mlx_generated_source(capfd, tmp_path, source: str, inputs: list, output_dtypes: list, template: list) -> str:
    """What MLX itself prints with verbose=True, obtained through export tracing
    (the only way an MLX without Metal generates the source without running it)."""
    mx = pytest.importorskip("mlx.core")
    output_names = ["out", "out2"][: len(output_dtypes)]
    kernel = mx.fast.metal_kernel(name="k", input_names=["a", "b", "c"], output_names=output_names, source=source)
    mx_template = [(n, v if isinstance(v, (bool, int)) else getattr(mx, np.dtype(v).name)) for n, v in template]
    mx_dtypes = [getattr(mx, np.dtype(d).name) for d in output_dtypes]

    def call(*arrays):
        shapes = [(1,)] * len(output_names)
        return kernel(
            inputs=list(arrays), template=mx_template, grid=(1, 1, 1), threadgroup=(1, 1, 1),
            output_shapes=shapes, output_dtypes=mx_dtypes, verbose=True,
        )  # fmt: skip

    capfd.readouterr()
    try:
        mx.export_function(str(tmp_path / "kernel.mlxfn"), call, *[mx.array(x) for x in inputs])
    except Exception as error:  # an MLX that cannot trace metal_kernel
        pytest.skip(f"MLX cannot export metal_kernel here: {error}")
    printed = capfd.readouterr().out
    return printed.split("```\n", 1)[1].rsplit("\n```", 1)[0]


SIGNATURE_CASES = [
    (
        "uint i = thread_position_in_grid.x; out[i] = a[i] * c + b_shape[0] + threads_per_threadgroup.x;"
        " // simdgroup_index_in_threadgroup",
        [np.zeros(9, np.float32), np.zeros(3, np.int32), np.float32(2)],
        [np.uint32],
        [("T", np.float16), ("N", 3), ("B", True)],
    ),
    (
        "out[0] = a_strides[0] + a_ndim + c[0]; out2[0] = 1;",
        [np.zeros((2, 5), np.int8), np.zeros(7, np.uint16), np.zeros(8, np.bool_)],
        [np.float16, np.int32],
        [],
    ),
]


@pytest.mark.parametrize(("source", "inputs", "output_dtypes", "template"), SIGNATURE_CASES)
def test_signature_matches_mlx(source, inputs, output_dtypes, template, capfd, tmp_path) -> None:
    expected = mlx_generated_source(capfd, tmp_path, source, inputs, output_dtypes, template)
    output_names = ["out", "out2"][: len(output_dtypes)]
    _, text = metal_signature("k", ["a", "b", "c"], output_names, source, "", inputs, output_dtypes, template)
    assert text == expected


def test_header_with_metal_includes_and_threadgroup_macro() -> None:
    # The project's portable kernels spell threadgroup storage `SHARED`.
    header = (
        "#include <metal_stdlib>\n#include <metal_simdgroup>\nusing namespace metal;\n"
        "#define SHARED threadgroup\n#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)\n"
        "inline float twice(float v) { return 2.0f * v; }\n"
    )
    source = """
        uint t = thread_position_in_threadgroup.x;
        SHARED float values[64];
        values[t] = twice(x[t]);
        BARRIER();
        out[t] = values[63 - t];
    """
    x = np.arange(64, dtype=np.float32)
    (out,) = run_metal_kernel(
        "macros", ["x"], ["out"], source, header, [x], [(64,)], [np.float32], (64, 1, 1), (64, 1, 1)
    )
    np.testing.assert_array_equal(out, 2 * x[::-1])


def test_threadgroup_rewrite_keeps_lines_and_leaves_pointers_and_comments() -> None:
    text = (
        "threadgroup float partial[32]; // threadgroup float not_me[4];\n"
        "threadgroup T tile[BM][BK +\n 4], row[BK];\n"
        "threadgroup float* view = partial;\n"
        "threadgroup_barrier(mem_flags::mem_threadgroup);\n"
    )
    rewritten = rewrite_threadgroup_declarations(text)
    assert rewritten.count("\n") == text.count("\n")
    lines = rewritten.split("\n")
    assert lines[0] == (
        "float (&partial)[32] = ::metal_sim_detail::threadgroup_variable<float[32], __COUNTER__>();"
        " // threadgroup float not_me[4];"
    )
    assert "T (&tile)[BM][BK + 4] = " in lines[1] and "T (&row)[BK] = " in lines[1]
    assert lines[3:5] == ["threadgroup float* view = partial;", "threadgroup_barrier(mem_flags::mem_threadgroup);"]
