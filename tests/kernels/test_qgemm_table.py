"""Routing prefill's quantized products: the measured table, the FOUNDRY_QGEMM switch, and the `ops` seam."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import kernels, ops
from foundry_mlx.errors import FoundryError
from foundry_mlx.kernels import qgemm, qgemm_source, qgemm_table
from foundry_mlx.layers import Linear
from foundry_mlx.quant import QuantizedWeight

from .metal_runs import run_source
from .qgemm_cases import Case, make_inputs

KEY = ("cuda", 512, 4608, 3584, 4, 64)


def test_default_is_mlx_everywhere(monkeypatch):
    monkeypatch.delenv("FOUNDRY_QGEMM", raising=False)
    assert qgemm_table.MEASURED == {}, "entries need a measurement beside them (benchmarks/qgemm_bench.py)"
    for m in (16, 100, 512, 2048, 4096):
        assert not qgemm_table.use_kernel("cuda", m, 4608, 3584, 4, 64)


def test_a_measured_win_routes_its_bucket_only(monkeypatch):
    monkeypatch.delenv("FOUNDRY_QGEMM", raising=False)
    table = {KEY: True}
    assert qgemm_table.use_kernel("cuda", 512, 4608, 3584, 4, 64, table)
    assert qgemm_table.use_kernel("cuda", 400, 4608, 3584, 4, 64, table)  # nearest measured M is 512
    assert not qgemm_table.use_kernel("cuda", 2048, 4608, 3584, 4, 64, table)
    assert not qgemm_table.use_kernel("metal", 512, 4608, 3584, 4, 64, table)
    assert not qgemm_table.use_kernel("cuda", 512, 4608, 3584, 8, 64, table)
    assert not qgemm_table.use_kernel("cuda", 4, 4608, 3584, 4, 64, {("cuda", 16, 4608, 3584, 4, 64): True})


def test_buckets():
    assert [qgemm_table.m_bucket(m) for m in (8, 16, 40, 50, 128, 300, 512, 1100, 4096)] == \
        [16, 16, 16, 128, 128, 512, 512, 2048, 2048]


def test_switch(monkeypatch):
    monkeypatch.setenv("FOUNDRY_QGEMM", "1")
    assert qgemm_table.use_kernel("cuda", 100, 10, 32, 4, 32)
    assert not qgemm_table.use_kernel("cuda", 1, 10, 32, 4, 32)
    monkeypatch.setenv("FOUNDRY_QGEMM", "0")
    assert not qgemm_table.use_kernel(*KEY, table={KEY: True})
    monkeypatch.setenv("FOUNDRY_QGEMM", "yes")
    with pytest.raises(FoundryError, match="FOUNDRY_QGEMM"):
        qgemm_table.use_kernel(*KEY)


def test_no_gpu_backend_means_mlx(monkeypatch):
    monkeypatch.setenv("FOUNDRY_QGEMM", "1")
    inputs = make_inputs(Case(20, 72, 128, group=32))
    assert not qgemm.routed(None, inputs["x"], inputs["weight"])
    assert qgemm.routed("cuda", inputs["x"], inputs["weight"])
    assert not qgemm.routed("cuda", inputs["x"].astype(mx.float32), inputs["weight"])


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
