"""The fused decode step for B sequences at once: the plan of kernels/fused_step.py (the same
`decode_step`, 5·layers + 3 launches) with every kernel taking B rows.

Why: the server's batched step through the model file was ~600 MLX graph nodes, eager, so at
~3.5–5 µs of host time per node a step of 8 rows cost 3+ ms whatever the GPU did, and 8 clients
got barely 2.4× one client's tokens. Here a step is the single-sequence step's node count for any
B, and each GEMV reads its weights once for all rows (kernels/qgemv_batch.py).

Shapes: x (B, hidden); the step's device-resident `state` (B, 8) and `params` (B, 8), one row per
sequence (kernels/sample.py: position, token, RNG counter, seed, ring count, parked flag); the
penalty rings (B, R); per layer one K and one V buffer (B, kv_heads, S, D), row b in slot b. Each
row has its own position: RoPE, the KV write and attention's length read state[b, 0]. A slot with
no sequence is *parked* (state[b, 5] = 1, position 0): its rows are computed and ignored, and its
state does not move.

`BatchedReferenceKernels` is the twin on MLX ops (the CPU path, and the oracle of the GPU tests).
"""

from __future__ import annotations

import mlx.core as mx

from ..layers import Linear
from . import embed, fused_layer, qgemv_batch, sample, sdpa
from .fused_step import GpuKernels, decode_step

__all__ = ["BatchedGpuKernels", "BatchedReferenceKernels", "decode_step"]


class BatchedGpuKernels(GpuKernels):
    """The step's kernels for B rows on one GPU backend. `qkv`, `residual`, `swiglu` and `head`
    are GpuKernels' own (the same variants), through the batched `_gemv`; the layer is the five
    kernels (the one-launch layer kernel of kernels/fused_layer.py is single-row)."""

    def __init__(self, backend: str) -> None:
        super().__init__(backend, layer_kernel=False)

    def _gemv(self, variant, eps, x, layer: Linear, **kwargs) -> mx.array:
        launch = qgemv_batch.launch(variant, x, layer.quantized, **kwargs)
        return self._kernel(qgemv_batch.kernel_source(variant, self.backend, eps))(**launch.arguments())[0]

    def embed(self, state, table: Linear, dtype):
        arguments = embed.batched_launch_arguments(state, table.stored, dtype)
        return self._kernel(embed.batched_source())(**arguments)[0]

    def attention(self, qkv, attention, state, keys, values):
        arguments = sdpa.batched_launch_arguments(qkv, keys, values, state, attention.n_heads)
        return self._kernel(sdpa.batched_source(attention.scale))(**arguments)[0]

    def layer(self, x, attention, mlp, state, keys, values, next_attention=None):
        return fused_layer.reference_layer(self, x, attention, mlp, state, keys, values)

    def sample(self, logits, params, state, recent):
        arguments = sample.batched_launch_arguments(logits, params, state, recent, self.backend)
        next_state, tokens, _ = self._kernel(sample.batched_source(self.backend))(**arguments)
        return next_state, tokens, recent  # the kernel wrote each row's token into its ring in place


class BatchedReferenceKernels:
    """The batched plan on MLX ops: functional cache and ring updates instead of in-place writes."""

    backend = "reference"

    def embed(self, state, table: Linear, dtype):
        ids = state[:, 1]
        if table.bits is None:
            return table.weight[ids].astype(dtype)
        rows = mx.dequantize(table.weight[ids], table.scales[ids], table.biases[ids], group_size=table.group_size,
                             bits=table.bits)
        return rows.astype(dtype)

    def qkv(self, x, attention, state, keys, values):
        rope, layer = attention.rope, attention.qkv_proj
        batch = x.shape[0]
        y = layer.matmul(mx.fast.rms_norm(x, attention.norm_weight, attention.eps))
        if "bias" in layer:
            y = y + layer.bias
        heads, kv_heads, dims = attention.n_heads, attention.n_kv_heads, rope.dims
        q, k, v = mx.split(y, [heads * dims, (heads + kv_heads) * dims], axis=-1)
        positions = state[:, 0]
        q = rope(q.reshape(batch, heads, 1, dims), positions)
        k = rope(k.reshape(batch, kv_heads, 1, dims), positions)
        v = v.reshape(batch, kv_heads, 1, dims)
        here = (mx.arange(keys.shape[2])[None, :] == positions[:, None])[:, None, :, None]  # (B, 1, S, 1)
        keys = mx.where(here, k.astype(keys.dtype), keys)
        values = mx.where(here, v.astype(values.dtype), values)
        return mx.concatenate([q.reshape(batch, -1), k.reshape(batch, -1), v.reshape(batch, -1)], axis=1), keys, values

    def attention(self, qkv, attention, state, keys, values):
        heads, dims = attention.n_heads, attention.rope.dims
        batch = qkv.shape[0]
        q = qkv[:, : heads * dims].reshape(batch, heads, 1, dims)
        mask = (mx.arange(keys.shape[2])[None, :] <= state[:, 0:1])[:, None, None, :]
        out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=attention.scale, mask=mask)
        return out.reshape(batch, -1)

    def residual(self, x, layer: Linear, residual):
        return residual + layer.matmul(x)

    def swiglu(self, h, mlp):
        gate, up = mx.split(mlp.gate_up_proj.matmul(mx.fast.rms_norm(h, mlp.norm_weight, mlp.eps)), 2, axis=-1)
        return gate * mx.sigmoid(gate) * up

    def head(self, h, norm_weight, eps, lm_head):
        return lm_head.matmul(mx.fast.rms_norm(h, norm_weight, eps))

    def layer(self, x, attention, mlp, state, keys, values, next_attention=None):
        return fused_layer.reference_layer(self, x, attention, mlp, state, keys, values)

    def sample(self, logits, params, state, recent):
        """Each row drawn by the host oracle (kernels/sample.py `reference`), with the batched
        kernel's rules: a parked row keeps its state; the ring is the row's own window."""
        rows, states, rings, tokens = params.tolist(), state.tolist(), recent.tolist(), []
        for row, (p, s, ring) in enumerate(zip(rows, states, rings)):
            if s[5]:
                tokens.append(0)
                continue
            window = min(int(p[5]), len(ring)) if p[5] >= 1 else len(ring)
            seen = ring[: min(s[4], window)]
            token = sample.reference(logits[row], p[0], int(p[1]), p[2], p[3], p[4], seen, s[3] & 0xFFFFFFFF, s[2])
            ring[s[4] % window] = token
            states[row] = [s[0] + 1, token, s[2] + (0 if p[0] <= 0 else 1), s[3], s[4] + 1, s[5], s[6], s[7]]
            tokens.append(token)
        return (mx.array(states, dtype=mx.int32), mx.array(tokens, dtype=mx.int32),
                mx.array(rings, dtype=mx.int32))
