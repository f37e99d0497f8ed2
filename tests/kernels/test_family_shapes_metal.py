"""The decode kernels' Metal source on the CPU harness at Gemma 3 270M's and SmolLM2-135M's shapes.

Which kernel each family's decode step uses (`foundry-mlx info` prints the same table):
* SmolLM2 (llama: hidden 576, 9 heads / 3 KV heads, head dim 64, Q4_1 → 4-bit, Q8_0 head):
  the Qwen2 path unchanged: RMSNorm+QKV+RoPE, o_proj+residual, RMSNorm+gate/up+SwiGLU,
  down+residual, final norm+lm_head, decode attention (GQA 3:1, head dim 64).
* Gemma 3 (hidden 640, 4 heads / 1 KV head, head dim 256): RMSNorm+QKV without RoPE (the Q/K
  norms sit between the projection and RoPE), RMSNorm+gate/up without SwiGLU (GeGLU runs on the
  reference path), o_proj and down without residual (the post-norms sit before the residual add),
  final norm+lm_head over 262,144 rows, decode attention with head dim 256 and one KV head.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from foundry_mlx.kernels import qgemv, qgemv_launch, sdpa

from .metal_runs import run_source, sampled_rows
from .qgemv_cases import Case, compare, make_inputs, reference_inputs

NORM, PLAIN = qgemv.Variant(norm=True), qgemv.Variant()
CASES = [
    # Gemma 3 270M: Q5_0 Q/K fused with Q8_0 V → 8-bit; Q4_K o_proj; Q5_0 gate/up; Q6_K/Q4_K down.
    Case("gemma3_qkv_640x1536_b8_norm", NORM, 640, 1536, 8),
    Case("gemma3_o_proj_1024x640_b4", PLAIN, 1024, 640, 4),
    Case("gemma3_lm_head_640x262144_b8_norm", NORM, 640, 262144, 8, sample_groups=(0, 1, 8191, 16383)),
    # SmolLM2-135M: Q4_1 everywhere (4-bit), Q8_0 tied head.
    Case("smollm2_qkv_576x960_b4_norm_rope", qgemv.Variant(norm=True, rope=True), 576, 960, 4, head_dim=64,
         rope_rows=768, position=611),
    Case("smollm2_gate_up_576x3072_b4_swiglu", qgemv.Variant(norm=True, swiglu=True), 576, 3072, 4),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_metal_gemv_at_family_shapes(case):
    kwargs = make_inputs(case)
    launch = qgemv_launch.launch(case.variant, **kwargs)
    reference = np.array(qgemv.reference(case.variant, **reference_inputs(kwargs)))
    (output,) = run_source(qgemv.kernel_source(case.variant, "metal"), launch.arguments(), groups=case.sample_groups)
    rows = None
    if case.sample_groups is not None:
        rows = sampled_rows(launch.template, launch.output_shape[0], case.sample_groups)
        assert rows.max() < launch.output_shape[0] and len(rows) > 0
    compare(case, output, reference, rows)


# Not repeated here (the same kernel at another K or N, covered by tests/kernels/qgemv_cases.py):
# Gemma's gate/up (norm, 640→4096) and down (plain, 2048→640); SmolLM2's down (+residual) and head.

# (heads, kv_heads, head_dim, buffer length, valid): Gemma's full 512-window ring and a global
# layer mid-buffer; SmolLM2's 3:1 grouping.
ATTENTION = [(4, 1, 256, 512, 512), (4, 1, 256, 768, 600), (9, 3, 64, 256, 200)]


@pytest.mark.parametrize("case", ATTENTION, ids=str)
def test_metal_decode_attention_at_family_shapes(case):
    heads, kv_heads, head_dim, length, valid = case
    rng = np.random.default_rng(1)
    q = mx.array(rng.standard_normal(heads * head_dim).astype(np.float32))
    keys = mx.array(rng.standard_normal((1, kv_heads, length, head_dim)).astype(np.float32))
    values = mx.array(rng.standard_normal((1, kv_heads, length, head_dim)).astype(np.float32))
    scale = head_dim**-0.5
    arguments = sdpa.launch_arguments(q, keys, values, mx.array(valid, dtype=mx.int32), scale)
    (out,) = run_source(sdpa.SOURCE, arguments)
    np.testing.assert_allclose(out, np.array(sdpa.reference(q, keys, values, valid, scale)), rtol=1e-4, atol=1e-5)
