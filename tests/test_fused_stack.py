"""The layer stack's plan (kernels/fused_stack.py), checked without a GPU: which layers share a
launch, and that the stack runs the layer kernel's own body with each layer's arrays bound to the
names it reads. (Its arithmetic against one launch per layer is checked on the GPU:
tests/kernels/test_fused_gpu.py.)"""

from __future__ import annotations

from types import SimpleNamespace

from test_fused_layer import _Linear

from foundry_mlx.kernels import fused_layer, fused_stack


def _layer(bits: int = 4, down_bits: int = 4):
    attention = SimpleNamespace(qkv_proj=_Linear(1152, 896, bits), o_proj=_Linear(896, 896, bits), n_heads=14,
                                n_kv_heads=2, rope=SimpleNamespace(dims=64), eps=1e-6, scale=0.125)
    mlp = SimpleNamespace(gate_up_proj=_Linear(9728, 896, bits), down_proj=_Linear(896, 4864, down_bits), eps=1e-6)
    return SimpleNamespace(self_attn=attention, mlp=mlp)


def test_consecutive_layers_of_one_shape_share_a_launch():
    uniform = SimpleNamespace(layers=[_layer() for _ in range(24)])
    assert fused_stack.stacks(uniform) == [(0, 24)]
    # A Q4_K_M-like mix: some layers' down projection has more bits, so their kernel differs.
    mixed = SimpleNamespace(layers=[_layer(4, 6 if i in (0, 1, 5, 6, 7) else 4) for i in range(10)])
    assert fused_stack.stacks(mixed) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    long = SimpleNamespace(layers=[_layer() for _ in range(fused_stack.MAX_LAYERS + 3)])
    assert fused_stack.stacks(long) == [(0, fused_stack.MAX_LAYERS), (fused_stack.MAX_LAYERS, fused_stack.MAX_LAYERS + 3)]


def test_the_stack_binds_each_layers_arrays_to_the_layer_body():
    layer = _layer()
    single, single_inputs = fused_layer.layer_source(layer.self_attn, layer.mlp)
    source, inputs, per_layer = fused_stack.stack_source(layer.self_attn, layer.mlp, 3)
    assert set(per_layer) == set(single_inputs) - {"x", *fused_stack.SHARED_INPUTS}
    assert inputs[0] == "x_first" and len(inputs) == 1 + 3 * len(per_layer) + len(fused_stack.SHARED_INPUTS)
    assert "const uint32_t* const qkv_w_of[3] = {qkv_w_0, qkv_w_1, qkv_w_2};" in source.body
    assert "const T* k_cache = k_cache_of[layer];" in source.body
    assert "const T* x = layer == 0 ? x_first : x_out;" in source.body
    # The layer body once, with its capacity read from layer 0's cache, and a barrier after each layer.
    assert source.body.count("foundry_grid_sync();") == single.body.count("foundry_grid_sync();") + 1
    assert "k_cache_shape" not in source.body and "k_cache_0_shape[2]" in source.body
    assert source.header == single.header and source.output_names == single.output_names
