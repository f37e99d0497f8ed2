"""Tests of the Metal kernel simulator itself (foundry_mlx.kernels.metal_sim).

Each test pins one behaviour that kernel tests rely on, with a kernel that gives
a different answer if the simulator gets that behaviour wrong.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from foundry_mlx.kernels.metal_sim import (
    BFloat16Array,
    MetalCompileError,
    MetalRuntimeError,
    bfloat16_array,
    bfloat16_to_float32,
    build,
    metal_signature,
    run_metal_kernel,
)
from foundry_mlx.kernels.metal_sim.rewrite import rewrite_threadgroup_declarations

pytestmark = pytest.mark.filterwarnings("ignore::foundry_mlx.kernels.metal_sim.MetalCompileWarning")

SERIAL_SCHEDULES = ("forward", "reverse", "random")


def run(name: str, source: str, inputs: dict[str, Any], outputs: dict[str, tuple], grid, group, **options):
    """run_metal_kernel with inputs {name: array} and outputs {name: (shape, dtype)}."""
    shapes = [shape for shape, _ in outputs.values()]
    dtypes = [dtype for _, dtype in outputs.values()]
    return run_metal_kernel(
        name, list(inputs), list(outputs), source, "", list(inputs.values()), shapes, dtypes, grid, group, **options
    )


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


# ------------------------------------------------------------- execution --
REDUCE_SOURCE = """
    threadgroup float partial[32];
    uint lane = thread_index_in_simdgroup;
    uint simdgroup = simdgroup_index_in_threadgroup;
    float sum = simd_sum(x[thread_position_in_grid.x]);
    if (lane == 0) {
        partial[simdgroup] = sum;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (simdgroup == 0) {
        float total = lane < simdgroups_per_threadgroup ? partial[lane] : 0.0f;
        total = simd_sum(total);
        if (lane == 0) {
            out[threadgroup_position_in_grid.x] = total;
        }
    }
"""


@pytest.mark.parametrize("schedule", ["concurrent", *SERIAL_SCHEDULES])
def test_threadgroup_reduction_with_partial_last_threadgroup(schedule) -> None:
    # The full signature, as a kernel test calls it. 1000 threads in groups of
    # 256: the last group has 232 threads, its last SIMD-group 8 lanes; a
    # thread launched past the grid would read NaN from the redzone.
    x = np.random.default_rng(0).random(1000, dtype=np.float32)
    (out,) = run_metal_kernel(
        name="reduce",
        input_names=["x"],
        output_names=["out"],
        source=REDUCE_SOURCE,
        header="",
        inputs=[x],
        output_shapes=[(4,)],
        output_dtypes=[np.float32],
        grid=(1000, 1, 1),
        threadgroup=(256, 1, 1),
        schedule=schedule,
    )
    np.testing.assert_allclose(out, [x[g * 256 : (g + 1) * 256].sum() for g in range(4)], rtol=1e-5)


SHUFFLE_SOURCE = """
    uint t = thread_position_in_grid.x;
    float v = x[t];
    xor_out[t] = simd_shuffle_xor(v, 5);
    down_out[t] = simd_shuffle_down(v, 3);
    up_out[t] = simd_shuffle_up(v, 2);
    broadcast_out[t] = simd_broadcast(v, 7);
    prefix_out[t] = simd_prefix_exclusive_sum(v);
    max_out[t] = simd_max(v);
"""
SHUFFLES = ["xor", "down", "up", "broadcast", "prefix", "max"]


def simd_model(x: np.ndarray) -> dict[str, np.ndarray]:
    """Metal's SIMD-group functions over the active lanes; NaN where a lane reads
    a lane missing from a partial SIMD-group (undefined on a GPU)."""
    out = {name: np.full(x.size, np.nan, np.float32) for name in SHUFFLES}
    for t in range(x.size):
        base, lane = t - t % 32, t % 32
        active = x[base : base + 32]
        padded = np.concatenate([active, np.full(32 - active.size, np.nan, np.float32)])
        out["xor"][t] = padded[lane ^ 5]
        out["down"][t] = x[t] if lane + 3 >= 32 else padded[lane + 3]
        out["up"][t] = x[t] if lane < 2 else padded[lane - 2]
        out["broadcast"][t] = padded[7]
        out["prefix"][t] = active[:lane].sum()
        out["max"][t] = active.max()
    return out


def test_simd_shuffles_match_numpy_model_with_partial_simdgroup() -> None:
    # One threadgroup of 45 threads: SIMD-group 1 has 13 active lanes.
    x = (np.arange(45, dtype=np.float32) * 1.5 - 20) ** 2
    outputs = {f"{name}_out": ((45,), np.float32) for name in SHUFFLES}
    results = run("shuffles", SHUFFLE_SOURCE, {"x": x}, outputs, (45, 1, 1), (64, 1, 1))
    model = simd_model(x)
    for name, result in zip(SHUFFLES, results, strict=True):
        np.testing.assert_allclose(result, model[name], rtol=1e-6, err_msg=name)


def test_lanes_that_returned_are_inactive() -> None:
    source = """
        uint lane = thread_index_in_simdgroup;
        float v = float(lane);
        v += 0.0f * simd_sum(v) + 0.0f * simd_max(v);  // every lane exchanges values first
        if (lane >= 20) {
            return;
        }
        count[lane] = simd_sum(1u);
        from_returned_lane[lane] = simd_shuffle(v, 25);
    """
    outputs = {"count": ((32,), np.uint32), "from_returned_lane": ((32,), np.float32)}
    count, returned = run("early_return", source, {"x": np.zeros(1, np.float32)}, outputs, (32, 1, 1), (32, 1, 1))
    assert (count[:20] == 20).all()
    assert np.isnan(returned[:20]).all()


RACE_SOURCE = """
    threadgroup float shared[64];
    uint t = thread_index_in_threadgroup;
    shared[t] = x[t];
    float own = simd_sum(x[t]);  // synchronises a SIMD-group, not the threadgroup
    BARRIER
    out[t] = shared[t ^ 32] + 0.0f * own;  // written by the other SIMD-group
"""


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_missing_barrier_between_simdgroups_is_exposed(schedule) -> None:
    x = np.arange(64, dtype=np.float32)
    barrier = "threadgroup_barrier(mem_flags::mem_threadgroup);"
    (good,) = run("race_fixed", RACE_SOURCE.replace("BARRIER", barrier), {"x": x}, {"out": ((64,), np.float32)},
                  (64, 1, 1), (64, 1, 1), schedule=schedule)  # fmt: skip
    np.testing.assert_array_equal(good, x[np.arange(64) ^ 32])
    (bad,) = run("race", RACE_SOURCE.replace("BARRIER", ""), {"x": x}, {"out": ((64,), np.float32)},
                 (64, 1, 1), (64, 1, 1), schedule=schedule)  # fmt: skip
    # The SIMD-group that runs first reads threadgroup memory still poisoned.
    first = slice(0, 32) if schedule == "forward" else slice(32, 64)
    assert np.isnan(bad[first]).all()


def test_unwritten_output_elements_stay_poisoned() -> None:
    source = """
        uint i = thread_position_in_grid.x;
        if (i % 7 != 3) {
            out_f[i] = x[i];
            out_i[i] = int(x[i]);
        }
    """
    x = np.arange(40, dtype=np.float32)
    outputs = {"out_f": ((40,), np.float32), "out_i": ((40,), np.int32)}
    out_f, out_i = run("holes", source, {"x": x}, outputs, (40, 1, 1), (32, 1, 1))
    holes = np.arange(40) % 7 == 3
    assert np.isnan(out_f[holes]).all() and (out_f[~holes] == x[~holes]).all()
    assert (out_i[holes].view(np.uint32) == 0xABABABAB).all() and (out_i[~holes] == x[~holes]).all()
    _, filled = run("holes", source, {"x": x}, outputs, (40, 1, 1), (32, 1, 1), init_value=-1.0)
    assert (filled[holes] == -1).all()


@pytest.mark.parametrize(
    ("misspelt", "real"),
    [("simd_summ(v)", "simd_sum"), ("threadgroup_barier(mem_flags::mem_threadgroup)", "threadgroup_barrier")],
)
def test_misspelt_builtin_is_a_compile_error(misspelt, real) -> None:
    source = f"float v = x[0];\n{misspelt};\nout[0] = v;"
    with pytest.raises(MetalCompileError) as raised:
        run("typo", source, {"x": np.ones(8, np.float32)}, {"out": ((1,), np.float32)}, (1, 1, 1), (1, 1, 1))
    message = str(raised.value)
    name = misspelt.split("(")[0]
    assert f"custom_kernel_typo_float_float.metal:5:1: error: use of undeclared identifier '{name}'" in message
    # clang before 21 adds "did you mean 'simd_sum'?"; newer clang (zig's) no
    # longer suggests names for calls to undeclared functions.
    assert "did you mean" not in message or f"did you mean '{real}'" in message


def test_templates_and_half_bfloat16_in_and_out() -> None:
    source = """
        uint i = thread_position_in_grid.x;
        float scaled = float(a[i]) * SCALE + (NEGATE ? -1.0f : 1.0f);
        out_half[i] = half(scaled);
        out_bfloat[i] = bfloat16_t(scaled);
        T h = a_half[i];
        out_square[i] = max(T(h * h), T(0.5));
        bfloat16_t b = a_bfloat[i];
        out_bfloat_math[i] = b * b + b;
    """
    inputs = {
        "a": np.linspace(-3, 3, 50, dtype=np.float32),
        "a_half": np.linspace(-2, 2, 50).astype(np.float16),
        "a_bfloat": bfloat16_array(np.linspace(-2, 2, 50)),
    }
    outputs = {
        "out_half": ((50,), np.float16),
        "out_bfloat": ((50,), "bfloat16"),
        "out_square": ((50,), np.float16),
        "out_bfloat_math": ((50,), "bfloat16"),
    }
    template = [("T", np.float16), ("SCALE", 3), ("NEGATE", True)]
    out_half, out_bfloat, out_square, out_bfloat_math = run(
        "mixed", source, inputs, outputs, (50, 1, 1), (32, 1, 1), template=template
    )
    scaled = inputs["a"] * 3 - 1
    np.testing.assert_array_equal(out_half, scaled.astype(np.float16))
    assert isinstance(out_bfloat, BFloat16Array)
    np.testing.assert_array_equal(out_bfloat.view(np.uint16), bfloat16_array(scaled).view(np.uint16))
    np.testing.assert_array_equal(out_square, np.maximum(inputs["a_half"] ** 2, np.float16(0.5)))
    b = bfloat16_to_float32(inputs["a_bfloat"])
    expected = bfloat16_array(bfloat16_to_float32(bfloat16_array(b * b)) + b)
    np.testing.assert_array_equal(out_bfloat_math.view(np.uint16), expected.view(np.uint16))


def test_groups_subset_of_a_huge_grid() -> None:
    source = """
        threadgroup uint seen[32];
        uint lane = thread_index_in_threadgroup;
        seen[lane] = thread_position_in_grid.x;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[thread_position_in_grid.x] = seen[31 - lane] + threadgroups_per_grid.x;
    """
    groups = [0, 1234, 18999]
    outputs = {"out": ((19000 * 32,), np.uint32)}
    (out,) = run(
        "sampled", source, {"x": np.zeros(1, np.float32)}, outputs, (19000 * 32, 1, 1), (32, 1, 1), groups=groups
    )
    written = np.zeros(out.size, bool)
    for g in groups:
        rows = slice(g * 32, g * 32 + 32)
        np.testing.assert_array_equal(out[rows], np.arange(g * 32 + 31, g * 32 - 1, -1) + 19000)
        written[rows] = True
    assert (out[~written] == 0xABABABAB).all()


ATTRIBUTES = [
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threads_per_threadgroup",
    "threadgroups_per_grid",
    "dispatch_threads_per_threadgroup",
    "grid_size",
]


def test_attributes_follow_non_uniform_dispatch() -> None:
    grid, group = (5, 3, 2), (4, 2, 2)  # partial threadgroups along x and y
    stride = 3 * len(ATTRIBUTES) + 3
    lines = [f"out[base + {3 * k + d}] = {a}.{'xyz'[d]};" for k, a in enumerate(ATTRIBUTES) for d in range(3)]
    source = (
        "uint3 p = thread_position_in_grid;\n"
        f"uint base = ((p.z * 3 + p.y) * 5 + p.x) * {stride};\n" + "\n".join(lines) + "\n"
        f"out[base + {stride - 3}] = thread_index_in_threadgroup;\n"
        f"out[base + {stride - 2}] = simdgroup_index_in_threadgroup;\n"
        f"out[base + {stride - 1}] = thread_index_in_simdgroup;\n"
    )
    (out,) = run(
        "attributes", source, {"x": np.zeros(1, np.float32)}, {"out": ((30 * stride,), np.uint32)}, grid, group
    )
    rows = out.reshape(2, 3, 5, stride)
    for z, y, x in np.ndindex(2, 3, 5):
        position = np.array([x, y, z])
        tg = position // group
        actual = np.minimum(group, np.array(grid) - tg * group)
        local = position - tg * group
        index = local[0] + actual[0] * (local[1] + actual[1] * local[2])
        expected = np.concatenate(
            [position, local, tg, actual, [2, 2, 1], group, grid, [index, index // 32, index % 32]]
        )
        np.testing.assert_array_equal(rows[z, y, x], expected)


def test_shape_strides_ndim_and_atomic_outputs() -> None:
    source = """
        uint i = thread_position_in_grid.x;
        float v = x[elem_to_loc(i, x_shape, x_strides, x_ndim)];
        atomic_fetch_add_explicit(&total[0], v, memory_order_relaxed);
        atomic_fetch_max_explicit(&total[1], v, memory_order_relaxed);
    """
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    (total,) = run("atomics", source, {"x": x}, {"total": ((2,), np.float32)}, (24, 1, 1), (16, 1, 1),
                   init_value=0.0, atomic_outputs=True)  # fmt: skip
    np.testing.assert_array_equal(total, [x.sum(), x.max()])


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("if (t < 32) { threadgroup_barrier(mem_flags::mem_threadgroup); }\nout[t] = 1;", "threadgroup_barrier"),
        ("float s = t % 32 < 16 ? simd_sum(1.0f) : simd_max(1.0f);\nout[t] = s;", "divergent"),
        ("out[t + 1] = 1;", r"wrote outside buffer\(s\) out"),
    ],
)
def test_undefined_behaviour_is_reported(source, message) -> None:
    source = "uint t = thread_index_in_threadgroup;\n" + source
    with pytest.raises(MetalRuntimeError, match=message):
        run("ub", source, {"x": np.zeros(1, np.float32)}, {"out": ((64,), np.float32)}, (64, 1, 1), (64, 1, 1))


def test_threadgroup_memory_limit() -> None:
    source = "threadgroup float big[9000];\nbig[0] = 1;\nout[0] = big[0];"
    with pytest.raises(ValueError, match="36000 bytes of threadgroup memory"):
        run("big", source, {"x": np.zeros(1, np.float32)}, {"out": ((1,), np.float32)}, (1, 1, 1), (1, 1, 1))


def test_simdgroup_matrix_multiply_and_fragment_layout() -> None:
    source = """
        simdgroup_matrix<T, 8, 8> A, B, D;
        simdgroup_load(A, a);
        simdgroup_load(B, b, 8, ulong2(0), true);  // B transposed
        simdgroup_multiply_accumulate(D, A, B, make_filled_simdgroup_matrix<T, 8, 8>(T(1)));
        simdgroup_store(D, out);
        uint lane = thread_index_in_simdgroup;
        fragments[2 * lane] = A.thread_elements()[0];
        fragments[2 * lane + 1] = A.thread_elements()[1];
    """
    rng = np.random.default_rng(2)
    a, b = rng.random((8, 8), dtype=np.float32), rng.random((8, 8), dtype=np.float32)
    outputs = {"out": ((8, 8), np.float32), "fragments": ((64,), np.float32)}
    out, fragments = run("mma", source, {"a": a, "b": b}, outputs, (32, 1, 1), (32, 1, 1), template=[("T", np.float32)])
    np.testing.assert_allclose(out, a @ b.T + 1, rtol=1e-6)
    lane = np.arange(32)
    row = (lane // 4 & 4) + (lane // 2) % 4  # MLX steel mma.h get_coord
    column = (lane // 4 & 2) * 2 + (lane % 2) * 2
    np.testing.assert_array_equal(fragments.reshape(32, 2), np.stack([a[row, column], a[row, column + 1]], axis=1))


# -------------------------------------------------------------- compiler --
@pytest.fixture
def fresh_compiler(monkeypatch):
    """build.compiler() found afresh under the test's environment, and again after it."""
    for variable in ("FOUNDRY_CXX", "METAL_SIM_CXX", "ZIG_GLOBAL_CACHE_DIR", "ZIG_LOCAL_CACHE_DIR"):
        monkeypatch.delenv(variable, raising=False)
    build.compiler.cache_clear()
    yield build.compiler
    build.compiler.cache_clear()


def test_compiler_is_found_and_takes_half_arguments() -> None:
    # Without a compiler every simulator test fails (never skips) with the
    # same one-line fix; this one names the problem first.
    print(f"metal_sim compiler: {build.compiler().description}")
    assert build.compiler_flags()[0] == "-std=c++20"


def _fake_compiler(folder, name: str, version: str) -> None:
    script = folder / name
    script.write_text(f"#!/bin/sh\necho '{version}'\n")
    script.chmod(0o755)


def test_clang_on_the_path_comes_before_ziglang(fresh_compiler, monkeypatch, tmp_path) -> None:
    _fake_compiler(tmp_path, "clang++", "fake clang version 99")
    monkeypatch.setenv("PATH", str(tmp_path))
    found = fresh_compiler()
    assert found.command == (str(tmp_path / "clang++"),)
    assert "fake clang version 99" in found.description


def test_foundry_cxx_overrides_the_path(fresh_compiler, monkeypatch, tmp_path) -> None:
    _fake_compiler(tmp_path, "clang++", "fake clang version 99")
    _fake_compiler(tmp_path, "my-zig", "fake zig clang")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("FOUNDRY_CXX", "my-zig c++")
    found = fresh_compiler()
    assert found.command == (str(tmp_path / "my-zig"), "c++")
    assert set(found.environment) == {"ZIG_GLOBAL_CACHE_DIR", "ZIG_LOCAL_CACHE_DIR"}


def test_without_clang_the_ziglang_package_is_used(fresh_compiler, monkeypatch, tmp_path) -> None:
    if importlib.util.find_spec("ziglang") is None:
        pytest.fail('ziglang is missing: pip install -e ".[test]" installs it')
    monkeypatch.setenv("PATH", str(tmp_path))
    found = fresh_compiler()
    assert found.command[-1] == "c++" and found.description.startswith("zig c++")
    assert Path(found.environment["ZIG_GLOBAL_CACHE_DIR"]).parent == build.cache_dir()


def test_no_compiler_is_an_error_that_says_how_to_get_one(fresh_compiler, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(build, "_zig_compiler", lambda: None)
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[test\]"'):
        fresh_compiler()
    monkeypatch.setenv("FOUNDRY_CXX", "no-such-clang++")
    with pytest.raises(RuntimeError, match="no-such-clang.. .from FOUNDRY_CXX. not found"):
        fresh_compiler()
