"""Tests of the Metal kernel simulator itself (foundry_mlx.kernels.metal_sim): running kernels (threadgroups, SIMD-groups, barriers, poison, errors).

Each test pins one behaviour that kernel tests rely on, with a kernel that gives
a different answer if the simulator gets that behaviour wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from foundry_mlx.kernels.metal_sim import (
    BFloat16Array,
    MetalCompileError,
    MetalRuntimeError,
    bfloat16_array,
    bfloat16_to_float32,
    run_metal_kernel,
)

pytestmark = pytest.mark.filterwarnings("ignore::foundry_mlx.kernels.metal_sim.MetalCompileWarning")

SERIAL_SCHEDULES = ("forward", "reverse", "random")


def run(name: str, source: str, inputs: dict[str, Any], outputs: dict[str, tuple], grid, group, **options):
    """run_metal_kernel with inputs {name: array} and outputs {name: (shape, dtype)}."""
    shapes = [shape for shape, _ in outputs.values()]
    dtypes = [dtype for _, dtype in outputs.values()]
    return run_metal_kernel(
        name, list(inputs), list(outputs), source, "", list(inputs.values()), shapes, dtypes, grid, group, **options
    )


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
