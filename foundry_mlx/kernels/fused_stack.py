"""Several layers in one launch on CUDA: the layer kernel's body (kernels/fused_layer.py) in a loop
over the layers, a grid-wide barrier between them.

Why: with one launch per layer, the 0.5B model's step measured ~0.81 ms of host time against
~0.90 ms per token on the H200 (`benchmarks/results/h200-step-overheads.md`, e2a593b): MLX spends
~17 µs of host time on each layer launch (~3.7 µs base, ~0.23 µs per KB of the 22 KB source it
hashes, ~0.35 µs per input), so the host and the device ran neck and neck, and removing device work
(the attention's merge phase) moved nothing. A stack of layers is one launch: the source is hashed
once, and a CUDA-graph node boundary (the gap between two kernels) disappears at each layer.

How: the layers' arrays come in as separate inputs (`qkv_w_0`, `qkv_w_1`, …; MLX passes each as a
pointer); the body copies them into per-name tables at the start and, at each layer, binds the
single-layer body's names (`qkv_w`, `k_cache`, `x`, …) to that layer's entries, so the arithmetic
is the layer kernel's, unchanged. Layer l + 1's input is layer l's output (`x_out`, read back after
the barrier). While a layer runs, the next layer's QKV weights are prefetched into L2.

Which layers stack: consecutive layers whose layer kernels are the same source (same bits per
projection, widths and heads). A uniform 4-bit model is one stack; a GGUF Q4_K_M mix, whose layers
differ in bits (every other layer's v_proj and down_proj), is one stack per layer.

Measured on the H200 (ee30108, `benchmarks/results/h200-step-overheads.md`), 0.5B 4-bit, µs per
token at depth 0 / 2048: one stack of 24 layers 1,000 / 1,112, one launch per layer 902 / 1,013.
The host's work per idle step fell (512 → 414–592 µs, build + queue) but the device's rose: the
step is device-bound, the CUDA graph already hid the gaps between layer launches, and the stack
adds a barrier per layer and the pointer tables' loads. So it is off by default:
`FOUNDRY_LAYER_STACK=1` turns it on, for the persistent kernel this is the first step towards.
"""

from __future__ import annotations

import os

from . import fused_layer
from .source import KernelSource, rewritten

SHARED_INPUTS = ("inv_freq", "state", "scratch", "attn_parts")  # one array for every layer of a stack
MAX_LAYERS = 64  # layers per launch: the inputs are pointers (8 bytes each), within CUDA's parameter space


def enabled() -> bool:
    return os.environ.get("FOUNDRY_LAYER_STACK", "") == "1"


def stacks(model) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive layers that share one layer-kernel source."""
    runs: list[tuple[int, int]] = []
    names = [fused_layer.layer_source(layer.self_attn, layer.mlp)[0].name for layer in model.layers]
    start = 0
    for index in range(1, len(names) + 1):
        if index == len(names) or names[index] != names[start] or index - start == MAX_LAYERS:
            runs.append((start, index))
            start = index
    return runs


def _pointer_type(name: str) -> str:
    return "const uint32_t*" if name.endswith("_w") else "const T*"


def stack_source(attention, mlp, layers: int) -> tuple[KernelSource, list[str], list[str]]:
    """The kernel running `layers` layers of one shape, its input names, and which of the layer
    kernel's inputs are per layer (named `<name>_<layer>` here)."""
    source, names = fused_layer.layer_source(attention, mlp)
    per_layer = [n for n in names if n not in SHARED_INPUTS and n != "x"]
    inputs = ["x_first"] + [f"{n}_{index}" for index in range(layers) for n in per_layer]
    inputs += [n for n in names if n in SHARED_INPUTS]
    lines = []
    for name in per_layer:
        entries = ", ".join(f"{name}_{index}" for index in range(layers))
        lines.append(f"  {_pointer_type(name)} const {name}_of[{layers}] = {{{entries}}};")
    lines.append(f"  for (int layer = 0; layer < {layers}; ++layer) {{")
    lines += [f"    {_pointer_type(name)} {name} = {name}_of[layer];" for name in per_layer]
    # Layer 0 reads the stack's input; every later layer the previous one's output.
    lines.append("    const T* x = layer == 0 ? x_first : x_out;")
    lines.append(_next_layer_prefetch(attention.qkv_proj, layers))
    # The capacity is the same in every layer's cache: read it from layer 0's buffer.
    body = rewritten(source.body, ((fused_layer.CAPACITY, "k_cache_0_shape[2]"),))
    lines += ["    {", body, "    }", "    foundry_grid_sync();", "  }"]
    name = f"{source.name}_x{layers}"
    return KernelSource(name, tuple(inputs), source.output_names, "\n".join(lines), source.header), inputs, per_layer


def _next_layer_prefetch(qkv, layers: int) -> str:
    """Ask L2 for the next layer's QKV weights while this layer runs: its first phase reads them
    right after the barrier that ends this layer."""
    groups = qkv.out_features * (qkv.in_features // qkv.group_size)
    return "\n".join([
        f"    if (layer + 1 < {layers}) {{",
        f"      foundry_prefetch_l2(qkv_w_of[layer + 1], {qkv.out_features * qkv.in_features * qkv.bits // 8}l);",
        f"      foundry_prefetch_l2(qkv_scales_of[layer + 1], {groups}l * (long)sizeof(T));",
        f"      foundry_prefetch_l2(qkv_biases_of[layer + 1], {groups}l * (long)sizeof(T));",
        "    }",
    ])


def launch_arguments(x, model_layers, state, keys: list, values: list) -> tuple[KernelSource, dict]:
    """The stack kernel over `model_layers` (one shape) and its call's keyword arguments."""
    first = model_layers[0]
    source, names, per_layer = stack_source(first.self_attn, first.mlp, len(model_layers))
    arrays = {}
    for index, layer in enumerate(model_layers):
        _, kwargs = fused_layer.launch_arguments(x, layer.self_attn, layer.mlp, state, keys[index], values[index])
        single = dict(zip(fused_layer.layer_source(layer.self_attn, layer.mlp)[1], kwargs["inputs"]))
        arrays |= {f"{name}_{index}": single[name] for name in per_layer}
        if index == 0:
            arrays |= {name: single[name] for name in SHARED_INPUTS}
            arguments = kwargs
    arrays["x_first"] = x
    arguments = dict(arguments, inputs=[arrays[name] for name in names])
    return source, arguments
