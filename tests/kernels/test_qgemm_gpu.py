"""The quantized GEMM on a real GPU backend (CUDA on the H200, or Metal) against its reference twin.

Marked `gpu`: skipped where MLX has neither backend (tests/conftest.py). Run on the device with
`pytest -m gpu tests/kernels/test_qgemm_gpu.py`. Tolerance: tests/kernels/qgemm_cases.py (4 ulps
of T relative to the output's largest value; the oracle is the twin in float32).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx import kernels
from foundry_mlx.kernels import qgemm, qgemm_dense

from .qgemm_cases import Case, compare, make_inputs, oracle

pytestmark = pytest.mark.gpu

# (name, N, K): the real matrices of Qwen2.5-0.5B (hidden 896, intermediate 4864, 14 q heads and
# 2 kv heads of 64, vocab 151936) and Qwen2.5-7B (hidden 3584, intermediate 18944, kv 512, vocab 152064).
SHAPES = [
    ("0.5b_qkv", 896 + 2 * 128, 896), ("0.5b_o", 896, 896), ("0.5b_gate_up", 2 * 4864, 896),
    ("0.5b_down", 896, 4864), ("0.5b_lm_head", 151936, 896),
    ("7b_qkv", 3584 + 2 * 512, 3584), ("7b_o", 3584, 3584), ("7b_gate_up", 2 * 18944, 3584),
    ("7b_down", 3584, 18944), ("7b_lm_head", 152064, 3584),
]
REAL = [Case(m, n, k, name=f"{name}_") for name, n, k in SHAPES for m in (16, 100, 512, 2048)]
EDGES = [
    Case(17, 896, 896, name="edge_"),
    Case(17, 200, 256, bits=4, group=128, name="edge_"),      # N not a multiple of the tile
    Case(100, 1000, 640, bits=5, group=32, name="edge_"),
    Case(513, 1152, 896, bits=6, group=128, name="edge_"),
    Case(130, 4608, 3584, bits=8, group=64, name="edge_"),
    Case(300, 999, 512, bits=8, group=32, name="edge_"),
    Case(100, 1152, 896, bits=4, group=64, dtype="bfloat16", name="edge_"),
    Case(2048, 4608, 3584, bits=5, group=32, dtype="bfloat16", name="edge_"),
    Case(130, 1152, 896, bits=8, group=64, dtype="bfloat16", name="edge_"),  # bfloat16 8-bit: the float path
    Case(100, 896, 4864, bits=4, group=64, bias=True, residual=True, name="edge_"),
    Case(1000, 1152, 896, bits=5, group=32, bias=True, name="edge_"),
]


@pytest.fixture(scope="module")
def backend():
    return kernels.gpu_backend()


@pytest.mark.parametrize("case", REAL + EDGES, ids=lambda c: c.id)
def test_gpu_gemm_matches_reference(backend, case):
    inputs = make_inputs(case)
    ours = qgemm.run(backend, **inputs)
    assert ours.dtype == getattr(mx, case.dtype)
    compare(case, np.array(ours.astype(mx.float32)), oracle(inputs))


@pytest.mark.parametrize("switch, module", [("1", qgemm), ("dense", qgemm_dense)], ids=["kernel", "dense"])
def test_prefill_logits_through_each_route_match_mlx(monkeypatch, switch, module):
    """A random model of Qwen2.5-0.5B's shape (4-bit, groups of 64): prefill logits of 100 tokens
    with every quantized product forced through one route (FOUNDRY_QGEMM=1: our kernel; =dense:
    dequantize + dense matmul) vs MLX's quantized_matmul (FOUNDRY_QGEMM=0). All round to float16
    after every product and differ only in accumulation order and where rounding happens; over 24
    layers that stays within 2% of the logits' scale (the decode kernels' bound in
    tests/kernels/test_kernels_gpu.py). The route's products are counted (`run`, and for the kernel
    `split_partials` too: a split QKV product's partials go to the summed heads kernel) so a routing
    slip that silently falls back to MLX fails."""
    from foundry_mlx.random_model import make_random_model

    model, _ = make_random_model("qwen2.5-0.5b", "4bit", mx.float16, seed=4)
    prompt = mx.array([[(37 * i + 11) % 151000 for i in range(100)]])
    calls = []
    original = module.run
    monkeypatch.setattr(module, "run", lambda *args, **kw: calls.append(1) or original(*args, **kw))
    if module is qgemm:
        partials = qgemm.split_partials
        monkeypatch.setattr(qgemm, "split_partials", lambda *args, **kw: calls.append(1) or partials(*args, **kw))
    logits = {}
    for value in ("0", switch):
        monkeypatch.setenv("FOUNDRY_QGEMM", value)
        logits[value] = np.array(model(prompt)[0].astype(mx.float32))
    # per layer: QKV, o_proj, gate/up, down; then the LM head
    assert len(calls) == 4 * model.config.num_hidden_layers + 1
    reference, ours = logits["0"], logits[switch]
    scale = np.abs(reference).max()
    assert np.isfinite(ours).all()
    error = np.abs(ours - reference).max() / scale
    assert error < 0.02, f"logits differ by {error:.3g} of their scale"


@pytest.mark.parametrize("tile_name", sorted(qgemm.CUDA_TILES))
def test_every_cuda_tile(backend, tile_name):
    """Each tile the benchmark may choose, on a shape ragged in M and N (guards in every tile)."""
    if backend != "cuda":
        pytest.skip("CUDA tiles")
    case = Case(77, 1000, 640, bits=5, group=32, bias=True, residual=True, name=f"tile{tile_name}_")
    inputs = make_inputs(case)
    ours = qgemm.run(backend, **inputs, tile_shape=qgemm.CUDA_TILES[tile_name])
    compare(case, np.array(ours.astype(mx.float32)), oracle(inputs))


@pytest.mark.parametrize("split", [2, 4, 8])
def test_every_split(backend, split):
    """Split-K at each factor `split_k` may choose, ragged in M and N, with the epilogue added after
    the partial sums (qgemm.run)."""
    case = Case(77, 1000, 1024, bits=5, group=32, bias=True, residual=True, name=f"split{split}_")
    inputs = make_inputs(case)
    ours = qgemm.run(backend, **inputs, split=split)
    assert ours.dtype == getattr(mx, case.dtype)
    compare(case, np.array(ours.astype(mx.float32)), oracle(inputs))


@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_split_sum_applies_swiglu(backend, split, dtype):
    """`swiglu=True`: split-K's sum gives silu(gate) * up of a [gate; up] product within one rounding
    of T of the MLX ops it replaces (sigmoid, then two products, each rounded to T). Not bit for bit:
    MLX's sigmoid on half runs in half steps (1 / (1 + exp(|x|)), mlx/backend/cuda/device/
    unary_ops.cuh), ours in fp32 rounded once (H200, 6071c0d: 75% of the elements equal). The 0.5B's
    gate/up shape at 77 rows."""
    if backend != "cuda":
        pytest.skip("split-K is CUDA's")
    case = Case(77, 2 * 4864, 896, bits=4, group=64, dtype=dtype, name=f"swiglu{split}_")
    inputs = make_inputs(case)
    ours = np.array(qgemm.run(backend, **inputs, split=split, swiglu=True).astype(mx.float32))
    gate, up = mx.split(qgemm.run(backend, **inputs, split=split), 2, axis=-1)
    expected = np.array((mx.sigmoid(gate) * gate * up).astype(mx.float32))
    assert ours.shape == (77, 4864)
    tolerance = 2.0 ** (-9 if dtype == "float16" else -6)
    np.testing.assert_allclose(ours, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())
    assert np.abs(ours - np.array((gate * up).astype(mx.float32))).max() > 0.01, "the activation was not applied"


RING_CASES = [Case(128, n, k, name=f"ring_{name}_") for name, n, k in SHAPES if name.startswith("7b") and "lm" not in name]
RING_CASES += [EDGES[2], EDGES[3], EDGES[8], Case(77, 1000, 1024, bits=8, group=32, bias=True, residual=True, name="ring_")]


@pytest.mark.parametrize("ahead", [2, 3])
@pytest.mark.parametrize("case", RING_CASES, ids=lambda c: c.id)
def test_ring_schedule_matches_reference(monkeypatch, backend, case, ahead):
    """FOUNDRY_QGEMM_AHEAD (kernels/qgemm_ring.py, CUDA): the 7B's products at 128 rows (split-K
    where split_k chooses it) and ragged edges at 5, 6 and 8 bits, each with its dynamic shared memory."""
    if backend != "cuda":
        pytest.skip("the ring schedule is CUDA's (Metal's rendition runs in tests/kernels/test_qgemm_ring.py)")
    monkeypatch.setenv("FOUNDRY_QGEMM_AHEAD", str(ahead))
    inputs = make_inputs(case)
    ours = qgemm.run(backend, **inputs)
    compare(case, np.array(ours.astype(mx.float32)), oracle(inputs))
