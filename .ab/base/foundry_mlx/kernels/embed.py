"""The fused decode step's first kernel: the embedding row of the token in the step's `state`.

The token id is never on the host (the sampling kernel wrote it into `state[1]`), so the row is
gathered and dequantized on the device in one launch, where MLX ops would take a gather of the
packed row, of its scales, of its biases and a dequantize (four graph nodes). Output (hidden,).
"""

from __future__ import annotations

import mlx.core as mx

from ..quant import QuantizedWeight
from .source import KernelSource, rewritten

_BODY = """
  const int index = (int)(group_id * THREADS + thread_id);
  if (index >= HIDDEN) return;
  const long token = state[1];
  if (DENSE) {
    x[index] = static_cast<T>(table[token * HIDDEN + index]);
  } else {
    const unsigned int word = (unsigned int)table[token * (HIDDEN * BITS / 32) + (index * BITS) / 32];
    const int shift = (index * BITS) % 32;
    unsigned int q = word >> shift;
    if (shift + BITS > 32) q |= (unsigned int)table[token * (HIDDEN * BITS / 32) + (index * BITS) / 32 + 1] << (32 - shift);
    q &= (1u << BITS) - 1u;
    const long g = token * (HIDDEN / GROUP) + index / GROUP;
    x[index] = static_cast<T>(static_cast<float>(scales[g]) * static_cast<float>(q) + static_cast<float>(biases[g]));
  }
"""

THREADS = 256


def kernel_source() -> KernelSource:
    return KernelSource("foundry_embed_state", ("state", "table", "scales", "biases"), ("x",), _BODY)


# B rows: threadgroup g embeds part g % GROUPS of row g / GROUPS's token, state[row, 1].
_BATCH_ROWS = (
    ("const int index = (int)(group_id * THREADS + thread_id);",
     "const int row = (int)group_id / GROUPS;\n  const int index = (int)((group_id % GROUPS) * THREADS + thread_id);"),
    ("state[1]", "state[row * STATE_STRIDE + 1]"),
    ("x[index]", "x[(long)row * HIDDEN + index]"),
)


def batched_source() -> KernelSource:
    return KernelSource("foundry_embed_state_batch", ("state", "table", "scales", "biases"), ("x",),
                        rewritten(_BODY, _BATCH_ROWS))


def batched_launch_arguments(state: mx.array, table: QuantizedWeight | mx.array, dtype: mx.Dtype) -> dict:
    """`launch_arguments` for B rows: state (B, 8) → x (B, hidden), row b the embedding of state[b, 1]."""
    arguments = launch_arguments(state, table, dtype)
    batch = state.shape[0]
    hidden = arguments["output_shapes"][0][0]
    groups = arguments["grid"][0] // THREADS
    arguments["template"] += [("GROUPS", groups), ("STATE_STRIDE", state.shape[1])]
    arguments["grid"] = (groups * batch * THREADS, 1, 1)
    arguments["output_shapes"] = [(batch, hidden)]
    return arguments


def launch_arguments(state: mx.array, table: QuantizedWeight | mx.array, dtype: mx.Dtype) -> dict:
    """Keyword arguments for the kernel call: the row of token state[1] as `dtype` (hidden,)."""
    if isinstance(table, QuantizedWeight):
        hidden = table.shape[1]
        inputs = [state, table.weight, table.scales, table.biases]
        template = [("BITS", table.bits), ("GROUP", table.group_size), ("DENSE", False)]
    else:
        hidden = table.shape[1]
        inputs = [state, table, table[:1, :1], table[:1, :1]]  # placeholders: the dense form reads `table` only
        template = [("BITS", 32), ("GROUP", hidden), ("DENSE", True)]
    groups = -(-hidden // THREADS)
    return dict(
        inputs=inputs,
        template=[("T", dtype), ("HIDDEN", hidden), ("THREADS", THREADS)] + template,
        grid=(groups * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(hidden,)],
        output_dtypes=[dtype],
    )
