"""The ring schedule of the prefill GEMM (kernels/qgemm_ring.py, FOUNDRY_QGEMM_AHEAD), in its Metal
rendition on the CPU SIMT harness: copies are synchronous there, but the slots, the copy groups,
the waits and the barriers are the CUDA schedule's, run one thread at a time in reverse order, so
a slot overwritten while it is still to be read shows up as a wrong result."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx.errors import FoundryError
from foundry_mlx.kernels import qgemm, qgemm_ring, qgemm_source
from foundry_mlx.kernels.metal_sim import bfloat16_to_float32, run_metal_kernel

from .metal_runs import run_source, to_numpy
from .qgemm_cases import Case, compare, make_inputs, oracle

TILE = (32, 32, 2, 2)  # small enough for Metal's 32 KB with four slots of 8-bit words

CASES = [
    (Case(20, 72, 256, bits=4, group=64), 2),
    (Case(33, 40, 192, bits=5, group=32, bias=True, residual=True), 3),
    (Case(17, 48, 96, bits=6, group=32, dtype="bfloat16"), 2),   # 3 K tiles: the ring runs past the end
    (Case(9, 64, 320, bits=8, group=64), 3),
    (Case(40, 33, 32, bits=4, group=32, bias=True), 2),          # one K tile
]


def _run(case: Case, ahead: int, body_change=None) -> np.ndarray:
    inputs = make_inputs(case)
    arguments = qgemm.launch("metal", tile_shape=TILE, ahead=ahead, **inputs).arguments()
    assert ("AHEAD", ahead) in arguments["template"]
    source = qgemm_ring.kernel_source("metal", case.bias, case.residual)
    header, body = source.launch_text("metal")
    if body_change is not None:
        changed = body_change(body)
        assert changed != body
        body = changed
    (output,) = run_metal_kernel("qgemm_ring", source.input_names, source.output_names, body, header,
                                 [to_numpy(a) for a in arguments["inputs"]], arguments["output_shapes"],
                                 arguments["output_dtypes"], arguments["grid"], arguments["threadgroup"],
                                 template=arguments["template"], schedule="reverse")
    return bfloat16_to_float32(output) if case.dtype == "bfloat16" else output


@pytest.mark.parametrize("case, ahead", CASES, ids=lambda v: v.id if isinstance(v, Case) else f"ahead{v}")
def test_ring_schedule_matches_reference(case, ahead):
    compare(case, _run(case, ahead), oracle(make_inputs(case)))


def test_ring_catches_a_slot_reused_too_soon():
    """With one slot fewer, tile kt + AHEAD lands where tile kt is still to be multiplied."""
    case, ahead = CASES[0]
    broken = _run(case, ahead, lambda body: body.replace("constexpr int SLOTS = AHEAD + 1;", "constexpr int SLOTS = AHEAD;"))
    with pytest.raises(AssertionError):
        compare(case, broken, oracle(make_inputs(case)))


def test_ring_split_k_partials_sum_to_the_reference():
    case = Case(20, 72, 512, bits=4, group=64, bias=True, residual=True)
    inputs = make_inputs(case)
    arguments = qgemm.launch("metal", inputs["x"], inputs["weight"], tile_shape=TILE, split=2, ahead=2).arguments()
    (partials,) = run_source(qgemm_ring.kernel_source("metal", split=True), arguments, schedule="reverse")
    reduce = qgemm.reduce_launch(mx.array(partials), (case.m, case.n), mx.float16, inputs["bias"], inputs["residual"])
    (y,) = run_source(qgemm_source.reduce_source(True, True), reduce.arguments())
    compare(case, y, oracle(inputs))


def test_ring_source_is_the_skeleton_rewritten():
    """Derived, not copied: the multiply, dequantization and epilogue text of qgemm_source stay in it,
    and the default kernel's source has none of the ring's parts."""
    ring = qgemm_ring.kernel_source("cuda", True, True).body
    default = qgemm_source.kernel_source("cuda", True, True).body
    assert qgemm_source._MULTIPLY["cuda"] in ring and qgemm_source._STORE["cuda"] in ring
    assert "Q_TO_FLOAT(q & MASK) + w_bias" in ring
    assert "extern __shared__" in ring and "extern __shared__" not in default
    assert "AHEAD" not in default and "w_raw" not in default


def test_shared_bytes_and_switch(monkeypatch):
    # 7B tile, 4 bits: 3 x tiles + 2 weight tiles of 128 x 40 halves, 3 slots of 128 rows x 4 words.
    assert qgemm_ring.shared_bytes((128, 128, 2, 4), 4, 2, 2) == (3 * 128 + 2 * 128) * 40 * 2 + 3 * 128 * 4 * 4
    assert qgemm_ring.shared_bytes((128, 128, 2, 4), 4, 3, 2) > 48 * 1024  # hence dynamic shared memory
    monkeypatch.delenv(qgemm_ring.SWITCH, raising=False)
    assert qgemm_ring.ahead() == 1
    monkeypatch.setenv(qgemm_ring.SWITCH, "3")
    assert qgemm_ring.ahead() == 3
    monkeypatch.setenv(qgemm_ring.SWITCH, "5")
    with pytest.raises(FoundryError, match="FOUNDRY_QGEMM_AHEAD"):
        qgemm_ring.ahead()
