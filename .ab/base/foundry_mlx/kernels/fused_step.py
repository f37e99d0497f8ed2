"""The fused decode step: one token of a Qwen2 / Llama model as ~5 kernels per layer, token id in,
token id out, everything on the device.

Why: MLX spends ~3.5–5 µs of host time per graph node even inside `mx.compile`, and the model-file
step was 610 nodes for the 0.5B model (362 of them reshapes), so decode was bound by the host, not
the GPU. This plan lives beside the model (gpt-fast's rule: the model file stays the readable
reference and the path for prefill, CPU and other families) and calls kernels that take and
return flat buffers, so a step is

    embed(state) → per layer: [norm+QKV+bias+RoPE+KV write] → [attention] → [o_proj+residual]
                              → [norm+gate/up+SwiGLU] → [down+residual]
    → [final norm+LM head] → [sample → next state]

= 5·layers + 3 nodes (123 for the 0.5B model's 24 layers). The step's device-resident `state`
(kernels/sample.py) carries the position and the token from one step to the next, so no scalar
is created on the host per token; the sampled token also lands in a 4-byte `token` output that
the host reads. The KV rows are written into the cache buffers in place by the QKV kernel (see
kernels/qgemv.py), and the penalty's token ring in place by the sampler.

`ReferenceKernels` runs the same plan on MLX ops (any backend, the CPU too): the plan's wiring is
tested on the CPU against the model file, and each GPU kernel against its own twin.
"""

from __future__ import annotations

import os

import mlx.core as mx

from ..layers import Linear
from . import embed, fused_layer, qgemv, qgemv_launch, qgemv_preload, sample, sdpa, sdpa_split

QKV = qgemv.Variant(norm=True, bias=True, rope=True, fused=True)
QKV_NO_BIAS = qgemv.Variant(norm=True, rope=True, fused=True)
RESIDUAL = qgemv.Variant(residual=True, fused=True)
SWIGLU = qgemv.Variant(norm=True, swiglu=True, fused=True)
HEAD = qgemv.Variant(norm=True, fused=True)
# Families whose decode layer is exactly RMSNorm → QKV(+bias) → RoPE → GQA → o_proj → RMSNorm →
# SwiGLU → down (Gemma 3's Q/K norms, GeGLU and post-norms are not this plan: it decodes per op).
PLANNED_FAMILIES = ("qwen2", "llama")


def unsupported_reason(model) -> str | None:
    """Why the fused step cannot run `model` (None when it can)."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in PLANNED_FAMILIES:
        return f"the fused step is planned for {', '.join(PLANNED_FAMILIES)}, not {family!r}"
    if getattr(model, "parallel", None) is not None:
        return "a sharded model (tensor or pipeline parallel) needs the model file's collectives"
    layers = getattr(model, "layers", None)
    if not layers or not hasattr(layers[0], "self_attn") or not hasattr(layers[0].self_attn, "qkv_proj"):
        return "the model's layers are not the Qwen2 / Llama shape the fused step is planned for"
    linears = [model.lm_head]
    for layer in layers:
        attention, mlp = layer.self_attn, layer.mlp
        linears += [attention.qkv_proj, attention.o_proj, mlp.gate_up_proj, mlp.down_proj]
        if attention.rope.dims != attention.qkv_proj.out_features // (attention.n_heads + 2 * attention.n_kv_heads):
            return "the head dimension differs from the QKV projection's"
        if not sdpa.supported(attention.rope.dims):
            return f"decode attention has no kernel for head dimension {attention.rope.dims}"
    for linear in linears:
        if linear.bits is None:
            return "a projection is dense (not quantized); the GEMV kernels read MLX's affine layout"
        if linear.in_features % 32 or linear.in_features % linear.group_size:
            return f"a projection's input width {linear.in_features} is not a multiple of 32 and of its group"
    if model.lm_head.in_features * 4 > qgemv.MAX_STAGED_BYTES:
        return "the hidden size is too wide to stage the normalised input in shared memory"
    return None


class GpuKernels:
    """The step's kernels for one GPU backend; each kernel object is built once per source."""

    def __init__(self, backend: str, layer_kernel: bool | None = None) -> None:
        self.backend = backend
        self._built: dict[str, object] = {}
        # Whether each layer is one launch: on CUDA None until `prepare` chooses per model
        # (FOUNDRY_LAYER_KERNEL=1 / 0 forces it on / off); on Metal only when asked for (its grid
        # barriers rest on threadgroups staying resident, which Metal does not promise:
        # kernels/fused_layer_metal.py).
        switch = os.environ.get("FOUNDRY_LAYER_KERNEL", "")
        wanted = layer_kernel if layer_kernel is not None else {"1": True, "0": False}.get(switch)
        self.layer_kernel = wanted if backend == "cuda" else bool(wanted)

    def _kernel(self, source):
        kernel = self._built.get(source.name)
        if kernel is None:
            kernel = self._built[source.name] = source.build(self.backend)
        return kernel

    def _gemv(self, variant: qgemv.Variant, eps: float | None, x: mx.array, layer: Linear, **kwargs) -> mx.array:
        launch = qgemv_launch.launch(variant, x, layer.quantized, backend=self.backend, **kwargs)
        if qgemv_preload.ENABLED and qgemv_preload.fits(dict(launch.template), variant.rows_per_unit):
            return self._kernel(qgemv_preload.standalone_source(variant, self.backend, eps))(**launch.arguments())[0]
        return self._kernel(qgemv.kernel_source(variant, self.backend, eps))(**launch.arguments())[0]

    def embed(self, state: mx.array, table: Linear, dtype: mx.Dtype) -> mx.array:
        arguments = embed.launch_arguments(state, table.stored, dtype)
        return self._kernel(embed.kernel_source())(**arguments)[0]

    def qkv(self, x, attention, state, keys, values):
        variant = QKV if "bias" in attention.qkv_proj else QKV_NO_BIAS
        rope = attention.rope
        out = self._gemv(
            variant, attention.eps, x, attention.qkv_proj, norm_weight=attention.norm_weight,
            bias=attention.qkv_proj.bias if variant.bias else None, inv_freq=rope.inverse_frequencies,
            rope_rows=(attention.n_heads + attention.n_kv_heads) * rope.dims, head_dim=rope.dims,
            state=state, k_cache=keys, v_cache=values,
        )
        return out, keys, values  # the kernel wrote the new rows into `keys` and `values` in place

    def attention(self, qkv, attention, state, keys, values):
        if self.backend == "cuda":  # positions split over the GPU, the last share merging (sdpa_split.split_source)
            parts = self._attention_parts(attention)
            arguments = sdpa_split.split_launch_arguments(qkv, keys, values, state, parts, attention.n_heads)
            return self._kernel(sdpa_split.split_source(attention.scale))(**arguments)[0]
        arguments = sdpa.fused_launch_arguments(qkv, keys, values, state, attention.n_heads)
        return self._kernel(sdpa.fused_source(attention.scale))(**arguments)[0]

    @staticmethod
    def _attention_parts(attention) -> mx.array:
        return fused_layer.scratch(sdpa_split.parts_size(attention.n_heads, attention.rope.dims), mx.float32)

    def residual(self, x, layer: Linear, residual):
        return self._gemv(RESIDUAL, None, x, layer, residual=residual)

    def swiglu(self, h, mlp):
        return self._gemv(SWIGLU, mlp.eps, h, mlp.gate_up_proj, norm_weight=mlp.norm_weight)

    def head(self, h, norm_weight, eps, lm_head):
        return self._gemv(HEAD, eps, h, lm_head, norm_weight=norm_weight)

    def prepare(self, model) -> None:
        """Choose one launch per layer or five for `model`, and make the buffers the kernels reuse
        across steps before the step is traced."""
        if self.layer_kernel is None:
            self.layer_kernel = fused_layer.suits(model)
        dtype = model.layers[0].self_attn.norm_weight.dtype
        for layer in model.layers:
            if self.layer_kernel:
                fused_layer.scratch_buffers(layer.self_attn, layer.mlp, dtype, self.backend)
            elif self.backend == "cuda":
                self._attention_parts(layer.self_attn)

    def layer(self, x, attention, mlp, state, keys, values, next_attention=None):
        """One layer: a single launch (kernels/fused_layer.py) on CUDA, else the five kernels.
        `next_attention`: the next layer's, whose weights the launch asks L2 for."""
        if not self.layer_kernel:
            return fused_layer.reference_layer(self, x, attention, mlp, state, keys, values)
        source, arguments = fused_layer.launch_arguments(x, attention, mlp, state, keys, values, next_attention,
                                                         self.backend)
        return self._kernel(source)(**arguments)[0], keys, values

    def sample(self, logits, params, state, recent):
        arguments = sample.launch_arguments(logits, params, state, recent, self.backend)
        next_state, token, _ = self._kernel(sample.kernel_source(self.backend))(**arguments)
        return next_state, token, recent  # the kernel wrote the token into the `recent` ring in place


class ReferenceKernels:
    """The same plan on MLX ops: functional cache and ring updates instead of in-place writes."""

    backend = "reference"

    def embed(self, state, table: Linear, dtype):
        ids = state[1:2]
        if table.bits is None:
            return table.weight[ids].reshape(-1).astype(dtype)
        row = mx.dequantize(table.weight[ids], table.scales[ids], table.biases[ids], group_size=table.group_size,
                            bits=table.bits)
        return row.reshape(-1).astype(dtype)

    def qkv(self, x, attention, state, keys, values):
        rope = attention.rope
        qkv_layer = attention.qkv_proj
        h = mx.fast.rms_norm(x.reshape(1, -1), attention.norm_weight, attention.eps)
        y = qkv_layer.matmul(h)
        if "bias" in qkv_layer:
            y = y + qkv_layer.bias
        heads, kv_heads, dims = attention.n_heads, attention.n_kv_heads, rope.dims
        q, k, v = mx.split(y, [heads * dims, (heads + kv_heads) * dims], axis=-1)
        position = state[0]
        q = rope(q.reshape(1, heads, 1, dims), position)
        k = rope(k.reshape(1, kv_heads, 1, dims), position)
        v = v.reshape(1, kv_heads, 1, dims)
        start = state[0:1]
        keys = mx.slice_update(keys, k.astype(keys.dtype), start, axes=(2,))
        values = mx.slice_update(values, v.astype(values.dtype), start, axes=(2,))
        return mx.concatenate([q.reshape(-1), k.reshape(-1), v.reshape(-1)]), keys, values

    def attention(self, qkv, attention, state, keys, values):
        heads, dims = attention.n_heads, attention.rope.dims
        q = qkv[: heads * dims].reshape(1, heads, 1, dims)
        mask = (mx.arange(keys.shape[2]) <= state[0])[None, None, None, :]
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attention.scale, mask=mask)
        return out.reshape(-1)

    def residual(self, x, layer: Linear, residual):
        return residual + layer.matmul(x.reshape(1, -1)).reshape(-1)

    def swiglu(self, h, mlp):
        y = mlp.gate_up_proj.matmul(mx.fast.rms_norm(h.reshape(1, -1), mlp.norm_weight, mlp.eps))
        gate, up = mx.split(y, 2, axis=-1)
        return (gate * mx.sigmoid(gate) * up).reshape(-1)

    def head(self, h, norm_weight, eps, lm_head):
        return lm_head.matmul(mx.fast.rms_norm(h.reshape(1, -1), norm_weight, eps)).reshape(-1)

    def layer(self, x, attention, mlp, state, keys, values, next_attention=None):
        return fused_layer.reference_layer(self, x, attention, mlp, state, keys, values)

    def sample(self, logits, params, state, recent):
        p = params.tolist()
        s = state.tolist()
        ring = recent.tolist()
        seen = ring[: min(s[4], len(ring))]
        token = sample.reference(logits, p[0], int(p[1]), p[2], p[3], p[4], seen, s[3] & 0xFFFFFFFF, s[2])
        ring[s[4] % len(ring)] = token
        greedy = p[0] <= 0
        next_state = mx.array([s[0] + 1, token, s[2] + (0 if greedy else 1), s[3], s[4] + 1, s[5], s[6], s[7]],
                              dtype=mx.int32)
        return next_state, mx.array([token], dtype=mx.int32), mx.array(ring, dtype=mx.int32)


def decode_step(kernels, model, state, params, recent, keys: list, values: list):
    """One token: returns (next state, token (1,), keys, values, recent). The state's token is fed
    at its position; keys/values are the layers' (1, kv_heads, S, D) cache buffers."""
    dtype = model.layers[0].self_attn.norm_weight.dtype
    x = kernels.embed(state, model.embed_tokens.table, dtype)
    keys, values = list(keys), list(values)
    layers = model.layers
    for i, layer in enumerate(layers):
        following = layers[i + 1].self_attn if i + 1 < len(layers) else None
        x, keys[i], values[i] = kernels.layer(x, layer.self_attn, layer.mlp, state, keys[i], values[i], following)
    logits = kernels.head(x, model.norm_weight, model.config.rms_norm_eps, model.lm_head)
    next_state, token, recent = kernels.sample(logits, params, state, recent)
    return next_state, token, keys, values, recent
