"""The layer kernel's Metal rendition (kernels/fused_layer_metal.py), run by the CPU SIMT harness
with every threadgroup at once (its phases wait for one another at grid-wide barriers), against
the same layer as the fused step's twin kernels on MLX: the only check the Metal rendition gets
without a Mac, and the arithmetic check of the layer kernel's shared text without a GPU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from tiny_models import load_fused_plan_model

from foundry_mlx.engine.decoder import prefilled
from foundry_mlx.kernels import fused_layer, fused_step, sample
from foundry_mlx.kernels.source import KernelSource

from .metal_runs import run_source


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model(request, tmp_path_factory):
    return load_fused_plan_model(tmp_path_factory.mktemp("layer_metal"), request.param)[0]


@pytest.mark.parametrize("blocks, depth", [(4, 5), (8, 37)])
def test_metal_layer_kernel_equals_the_twin_layer(model, monkeypatch, blocks, depth):
    """Four threadgroups take the phases in several rounds (the loop form); eight, with fewer
    rounds, some phases in one (weights loaded before the barrier). The new K/V rows land in the
    cache at the step's position, as the five kernels write them."""
    monkeypatch.setattr(fused_layer, "METAL_BLOCKS", blocks)
    fused_layer._scratches.clear()
    prompt = [(7 * i + 3) % 200 + 1 for i in range(depth)]
    cache, _ = prefilled(model, prompt, reserve=depth + 8)
    state = sample.make_state(depth, 11, 0, 0, 0)
    twin = fused_step.ReferenceKernels()
    x = twin.embed(state, model.embed_tokens.table, model.layers[0].self_attn.norm_weight.dtype)
    layer, following = model.layers[0], model.layers[1].self_attn
    keys, values = cache[0].keys, cache[0].values
    expected, expected_keys, expected_values = fused_layer.reference_layer(twin, x, layer.self_attn, layer.mlp, state,
                                                                           keys, values)
    source, arguments = fused_layer.launch_arguments(x, layer.self_attn, layer.mlp, state, keys, values, following,
                                                     backend="metal")
    # The harness is far slower than a GPU: a barrier's bounded wait (fused_layer_metal) would give
    # up, so it waits without bound here (a hang is the harness's timeout, reported).
    source = KernelSource(source.name, source.input_names, source.output_names, source.body,
                          "#define FOUNDRY_SPIN_LIMIT 0u\n" + source.header)
    out, keys_after, values_after = run_source(source, arguments, groups_at_once=True,
                                               written_inputs=("k_cache", "v_cache"))
    tolerance = 2e-3 if x.dtype == mx.float32 else 2e-2
    np.testing.assert_allclose(out, np.array(expected), rtol=tolerance, atol=tolerance)
    for got, want in ((keys_after, expected_keys), (values_after, expected_values)):
        np.testing.assert_allclose(got[..., : depth + 1, :], np.array(want)[..., : depth + 1, :], rtol=tolerance,
                                   atol=tolerance)
