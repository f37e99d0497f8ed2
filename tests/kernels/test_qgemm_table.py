"""Routing prefill's quantized products: the measured table, the FOUNDRY_QGEMM switch, and the `ops` seam."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import kernels, ops
from foundry_mlx.errors import FoundryError
from foundry_mlx.kernels import qgemm, qgemm_dense, qgemm_source, qgemm_table
from foundry_mlx.layers import Linear
from foundry_mlx.quant import QuantizedWeight

from .metal_runs import run_source
from .qgemm_cases import Case, make_inputs

KEY = ("cuda", 512, 4608, 3584, 4, 64)


def test_unmeasured_shapes_stay_on_mlx(monkeypatch):
    monkeypatch.delenv("FOUNDRY_QGEMM", raising=False)
    for m in (16, 100, 512, 2048, 4096):
        assert qgemm_table.route("cuda", m, 1000, 3584, 4, 64) == "mlx"
        assert qgemm_table.route("cuda", m, 4608, 3584, 4, 64, table={}) == "mlx"


def test_measured_entries_name_a_route_and_a_real_shape():
    """Every entry is "kernel" or "dense" (absent is MLX) for a bucket the benchmark measures."""
    for (backend, bucket, n, k, bits, group), route in qgemm_table.MEASURED.items():
        assert backend in ("cuda", "metal") and bucket in qgemm_table.M_BUCKETS
        assert route in ("kernel", "dense"), f"{route!r}: MLX is the absence of an entry"
        assert n > 0 and k % group == 0 and bits in qgemm.BITS


def test_the_measured_table_is_the_default(monkeypatch):
    monkeypatch.delenv("FOUNDRY_QGEMM", raising=False)
    assert qgemm_table.MEASURED, "the H200 measurements (benchmarks/results/h200-qgemm.json) found kernel wins"
    for key, route in qgemm_table.MEASURED.items():
        assert qgemm_table.route(*key) == route


def test_each_route_serves_its_bucket_only(monkeypatch):
    monkeypatch.delenv("FOUNDRY_QGEMM", raising=False)
    dense_key = ("cuda", 2048, 4608, 3584, 4, 64)
    table = {KEY: "kernel", dense_key: "dense"}
    assert qgemm_table.route("cuda", 512, 4608, 3584, 4, 64, table) == "kernel"
    assert qgemm_table.route("cuda", 400, 4608, 3584, 4, 64, table) == "kernel"  # nearest measured M is 512
    assert qgemm_table.route("cuda", 2048, 4608, 3584, 4, 64, table) == "dense"
    assert qgemm_table.route("cuda", 4096, 4608, 3584, 4, 64, table) == "dense"
    assert qgemm_table.route("cuda", 128, 4608, 3584, 4, 64, table) == "mlx"
    assert qgemm_table.route("metal", 512, 4608, 3584, 4, 64, table) == "mlx"
    assert qgemm_table.route("cuda", 512, 4608, 3584, 8, 64, table) == "mlx"
    assert qgemm_table.route("cuda", 4, 4608, 3584, 4, 64, {("cuda", 16, 4608, 3584, 4, 64): "dense"}) == "mlx"


def test_buckets():
    assert [qgemm_table.m_bucket(m) for m in (8, 16, 40, 50, 128, 300, 512, 1100, 4096)] == \
        [16, 16, 16, 128, 128, 512, 512, 2048, 2048]


@pytest.mark.parametrize("value, forced", [("1", "kernel"), ("dense", "dense"), ("0", "mlx")])
def test_switch_forces_a_route_over_the_table(monkeypatch, value, forced):
    monkeypatch.setenv("FOUNDRY_QGEMM", value)
    assert qgemm_table.route("cuda", 100, 10, 32, 4, 32) == forced
    assert qgemm_table.route(*KEY, table={KEY: "kernel" if forced != "kernel" else "dense"}) == forced
    assert qgemm_table.route("cuda", 1, 10, 32, 4, 32) == "mlx"  # one row is decode's


@pytest.mark.parametrize("value", ["", "auto"])
def test_switch_auto_uses_the_table(monkeypatch, value):
    monkeypatch.setenv("FOUNDRY_QGEMM", value)
    assert qgemm_table.route(*KEY, table={KEY: "dense"}) == "dense"


@pytest.mark.parametrize("value", ["yes", "2", "Dense", "kernel"])
def test_switch_rejects_other_values(monkeypatch, value):
    monkeypatch.setenv("FOUNDRY_QGEMM", value)
    with pytest.raises(FoundryError, match="FOUNDRY_QGEMM") as error:
        qgemm_table.route(*KEY)
    assert str(error.value).count(".") == 1 and "\n" not in str(error.value)  # one sentence


def test_no_gpu_backend_means_mlx(monkeypatch):
    inputs = make_inputs(Case(20, 72, 128, group=32))
    x, weight = inputs["x"], inputs["weight"]
    for value in ("1", "dense"):
        monkeypatch.setenv("FOUNDRY_QGEMM", value)
        assert qgemm.route(None, x, weight) == "mlx"
    monkeypatch.setenv("FOUNDRY_QGEMM", "1")
    assert qgemm.route("cuda", x, weight) == "kernel"
    assert qgemm.route("cuda", x.astype(mx.float32), weight) == "mlx"  # the kernel needs T = the scales' dtype
    monkeypatch.setenv("FOUNDRY_QGEMM", "dense")
    assert qgemm.route("cuda", x, weight) == "dense"
    assert qgemm.route("cuda", x.astype(mx.float32), weight) == "dense"  # dense handles any float x


def test_ops_linear_routes_through_the_kernel(monkeypatch):
    """With a (pretend) Metal backend and the switch on, `ops.linear` on a prefill-shaped x runs the
    kernel (here its Metal source in the simulator) with the layer's bias and the residual, and
    matches the reference path; with the switch off it never calls the kernel."""
    inputs = make_inputs(Case(20, 72, 128, bits=5, group=32))
    layer = Linear(inputs["weight"], bias=mx.linspace(-1, 1, 72).astype(mx.float16))
    x = inputs["x"].reshape(1, 20, 128)
    residual = mx.random.normal((1, 20, 72)).astype(mx.float16)
    calls = []

    def simulated(backend, x, weight, bias=None, residual=None):
        calls.append(backend)
        launch = qgemm.launch(backend, x, weight, bias, residual)
        source = qgemm_source.kernel_source(backend, bias is not None, residual is not None)
        return mx.array(run_source(source, launch.arguments())[0])

    monkeypatch.setattr(kernels, "active", lambda: SimpleNamespace(backend="metal"))
    monkeypatch.setattr(qgemm, "run", simulated)
    monkeypatch.setattr(qgemm_dense, "run", lambda *args, **kw: calls.append("dense"))
    monkeypatch.setenv("FOUNDRY_QGEMM", "1")
    ours = ops.linear(x, layer, residual=residual)
    assert calls == ["metal"] and ours.shape == (1, 20, 72)
    monkeypatch.setenv("FOUNDRY_QGEMM", "0")
    up = Linear(QuantizedWeight(layer.weight, layer.scales.astype(mx.float32),
                                      layer.biases.astype(mx.float32), 5, 32), bias=layer.bias.astype(mx.float32))
    reference = ops.linear(x.astype(mx.float32), up, residual=residual.astype(mx.float32))
    assert calls == ["metal"]
    error = np.abs(np.array(ours.astype(mx.float32)) - np.array(reference)).max() / np.abs(np.array(reference)).max()
    assert error < 4 * 2**-10, f"relative error {error:.3g}"


def test_cuda_tile_follows_the_h200_measurements():
    """kernels/qgemm.py's tile rule: the M-sized tiles up to 32 rows, then 128x128 unless it leaves
    fewer than 16 threadgroups (0.5B qkv at M=128 measured faster on 64x128)."""
    def name(m, n):
        return "x".join(map(str, qgemm.tile("cuda", m, n)[:2]))
    assert [name(m, 4608) for m in (1, 16, 17, 32)] == ["16x128", "16x128", "32x128", "32x128"]
    assert name(128, 4608) == name(512, 3584) == name(33, 37888) == "128x128"  # 36, 112, 296 groups
    assert name(128, 1152) == name(128, 896) == "64x128"  # 9 and 7 threadgroups of 128x128
    assert name(2048, 896) == "128x128"
    assert qgemm.tile("metal", 2048, 4608) == qgemm.METAL_TILE


def test_ops_linear_takes_the_dense_route_where_the_table_says_dense(monkeypatch):
    """A table entry "dense" for the shape's bucket sends `ops.linear` (with a GPU backend active) to
    kernels/qgemm_dense.py with the layer's bias and the residual, never to the kernel; a shape in
    another bucket stays on MLX. Both agree with MLX's quantized_matmul path."""
    inputs = make_inputs(Case(100, 72, 128, group=32))
    layer = Linear(inputs["weight"], bias=mx.linspace(-1, 1, 72).astype(mx.float16))
    x = inputs["x"].reshape(2, 50, 128)
    residual = mx.random.normal((2, 50, 72), key=mx.random.key(1)).astype(mx.float16)
    calls = []
    dense = qgemm_dense.run
    monkeypatch.setattr(qgemm_dense, "run", lambda *args, **kw: calls.append("dense") or dense(*args, **kw))
    monkeypatch.setattr(qgemm, "run", lambda *args, **kw: calls.append("kernel"))
    monkeypatch.setattr(kernels, "active", lambda: SimpleNamespace(backend="cuda"))
    monkeypatch.setattr(qgemm_table, "MEASURED", {("cuda", 128, 72, 128, 4, 32): "dense"})
    monkeypatch.delenv("FOUNDRY_QGEMM", raising=False)
    ours = ops.linear(x, layer, residual=residual)
    assert calls == ["dense"] and ours.shape == (2, 50, 72) and ours.dtype == mx.float16
    ops.linear(x[:, :4], layer, residual=residual[:, :4])  # 8 rows: bucket 16, not in the table
    assert calls == ["dense"]
    expected = residual + layer.matmul(x) + layer.bias
    error = np.abs(np.array(ours - expected, dtype=np.float32)).max() / np.abs(np.array(expected, dtype=np.float32)).max()
    assert error < 4 * 2**-10, f"relative error {error:.3g}"


def test_split_k_fills_small_cuda_grids():
    """A CUDA grid is split along K by powers of two up to MAX_SPLIT while the split grid still fits
    in one wave (two 128x128 tiles or four 128-thread ones per SM), only where the K tiles divide into
    runs of >= MIN_SPLIT_TILES; never on Metal."""
    def split(backend, m, n, k):
        return qgemm.split_k(backend, m, n, k, qgemm.tile(backend, m, n))
    assert qgemm.slots(qgemm.CUDA_TILES["128x128"]) == 2 * qgemm.SMS
    assert qgemm.slots(qgemm.CUDA_TILES["64x128"]) == 4 * qgemm.SMS
    assert split("cuda", 128, 3584, 18944) == 8      # 7B down: 28 threadgroups → 224
    assert split("cuda", 128, 4608, 3584) == 4       # 7B QKV: 36 → 144 (288 would overflow 264)
    assert split("cuda", 128, 37888, 3584) == 1      # 7B gate/up: 296 already
    assert split("cuda", 512, 3584, 3584) == 2       # 112 → 224
    assert split("cuda", 2048, 3584, 18944) == 1
    assert split("cuda", 128, 1152, 896) == 2        # 28 K tiles: a second halving would leave 7
    assert split("cuda", 128, 896, 4864) == 8        # 0.5B down: 14 threadgroups of 64x128 → 112
    assert split("cuda", 16, 1000, 96) == 1          # 3 K tiles do not halve
    assert split("metal", 128, 3584, 18944) == 1


def test_split_launch_takes_no_epilogue():
    inputs = make_inputs(Case(16, 64, 256, bias=True))
    with pytest.raises(ValueError, match="split-K"):
        qgemm.launch("cuda", inputs["x"], inputs["weight"], bias=inputs["bias"], split=2)
    with pytest.raises(ValueError, match="split-K"):
        qgemm.launch("cuda", inputs["x"], inputs["weight"], split=16)  # 8 K tiles
    launch = qgemm.launch("cuda", inputs["x"], inputs["weight"], split=2)
    assert launch.arguments()["output_shapes"] == [(2, 16, 64)] and launch.arguments()["output_dtypes"] == [mx.float32]


def test_swiglu_sum_takes_split_products_without_an_epilogue():
    """The SwiGLU activation rides on split-K's sum: an unsplit product, or one with a bias or a
    residual, is refused before anything is launched; the sum's launch covers N/2 outputs a row."""
    inputs = make_inputs(Case(16, 64, 256, bias=True))
    for options in (dict(split=1), dict(split=2, bias=inputs["bias"])):
        with pytest.raises(ValueError, match="SwiGLU"):
            qgemm.run("cuda", inputs["x"], inputs["weight"], swiglu=True, **options)
    launch = qgemm.reduce_launch(mx.zeros((2, 16, 64)), (16, 32), mx.float16)
    assert launch.arguments()["output_shapes"] == [(16, 32)] and launch.grid == (512, 1, 1)
    with pytest.raises(ValueError, match="SwiGLU"):
        qgemm_source.reduce_source(bias=True, swiglu=True)


def test_splits_is_the_default_split_of_run():
    """`splits` (what ops.norm_swiglu asks before routing the activation into the sum) is the split
    `run` makes by default: the 0.5B's gate/up at 128 rows is split on CUDA, never on Metal."""
    inputs = make_inputs(Case(128, 2 * 4864, 896))
    assert qgemm.splits("cuda", inputs["x"], inputs["weight"]) == qgemm.split_k("cuda", 128, 2 * 4864, 896,
                                                                               qgemm.tile("cuda", 128, 2 * 4864)) > 1
    assert qgemm.splits("metal", inputs["x"], inputs["weight"]) == 1


@pytest.mark.parametrize("split, fused", [(2, True), (1, False)])
def test_norm_swiglu_sums_the_activation_where_the_kernel_splits(monkeypatch, split, fused):
    """`ops.norm_swiglu` on a prefill-shaped x: where the kernel route splits K, one call of the
    kernel with `swiglu` (here: the split partials made by numpy and summed by the Metal reduce on the
    simulator); unsplit, the product then MLX's split and activation. Both match the reference path."""
    inputs = make_inputs(Case(20, 2 * 48, 128, bits=4, group=32))
    layer = Linear(inputs["weight"])
    x = inputs["x"].reshape(1, 20, 128)
    norm = mx.ones((128,), dtype=mx.float16)
    calls = []

    def simulated(backend, h, weight, bias=None, residual=None, swiglu=False):
        calls.append(swiglu)
        y = np.array(qgemm.reference(h, weight).astype(mx.float32)).reshape(20, 96)
        if not swiglu:
            return mx.array(y.reshape(1, 20, 96)).astype(mx.float16)
        partials = mx.array(np.stack([y * 0.25, y * 0.75]))  # two K ranges' fp32 sums
        launch = qgemm.reduce_launch(partials, (1, 20, 48), mx.float16)
        return mx.array(run_source(qgemm_source.reduce_source(swiglu=True), launch.arguments())[0])

    monkeypatch.setattr(kernels, "active", lambda: SimpleNamespace(backend="cuda"))
    monkeypatch.setattr(qgemm, "route", lambda *args: "kernel")
    monkeypatch.setattr(qgemm, "splits", lambda *args: split)
    monkeypatch.setattr(qgemm, "run", simulated)
    ours = ops.norm_swiglu(x, norm, 1e-6, layer)
    assert calls == [fused] and ours.shape == (1, 20, 48)
    gate, up = mx.split(qgemm.reference(mx.fast.rms_norm(x, norm, 1e-6), layer.quantized), 2, axis=-1)
    reference = np.array((mx.sigmoid(gate) * gate * up).astype(mx.float32))
    error = np.abs(np.array(ours.astype(mx.float32)) - reference).max() / np.abs(reference).max()
    assert error < 4 * 2**-10, f"relative error {error:.3g}"


def test_split_switch_turns_split_k_off(monkeypatch):
    """FOUNDRY_QGEMM_SPLIT=0: no product is split (a host-bound prefill's choice); 1 or unset: the
    one-wave rule; anything else names the switch."""
    shape = (128, 896, 896, qgemm.tile("cuda", 128, 896))
    monkeypatch.delenv(qgemm.SPLIT_SWITCH, raising=False)
    assert qgemm.split_k("cuda", *shape) > 1
    monkeypatch.setenv(qgemm.SPLIT_SWITCH, "0")
    assert qgemm.split_k("cuda", *shape) == 1
    monkeypatch.setenv(qgemm.SPLIT_SWITCH, "no")
    with pytest.raises(FoundryError, match=qgemm.SPLIT_SWITCH):
        qgemm.split_k("cuda", *shape)
