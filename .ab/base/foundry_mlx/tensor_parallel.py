"""Tensor parallelism: every rank holds 1/N of each layer's matrices and all ranks run every layer.

The Megatron split, as mlx-lm's `shard_linear` does it, on this engine's own weights:

* column-parallel (output rows split): Q, K, V and gate, up. Each rank computes its own
  attention heads and its own slice of the MLP's hidden units, with no communication;
* row-parallel (input columns split): O and down. Each rank's product is a partial sum, and one
  `mx.distributed.all_sum` per projection completes it: two per layer.

Q/K/V and gate/up are fused matrices in the models (`Linear.fused`); each part is sliced first and
the per-rank parts are fused by the model as usual, so rank r's QKV is [Q_r; K_r; V_r]. KV heads are
split where `num_key_value_heads % N == 0` and replicated otherwise (each rank keeps the one KV
head its query heads read, which needs `N % num_key_value_heads == 0`).

Quantized matrices are sliced on group boundaries. A GGUF tensor is sliced before it is converted:
rows are whole blocks already; a column range is widened to whole GGUF blocks (256 values for the
K-quants), converted, then cut at 32-column group boundaries, so each rank converts and keeps
only its share (the real 0.5B model's `ffn_down` splits at column 2432 = 9.5 Q4_K blocks).

The residual add and the biases of O and down happen once: rank 0 passes the residual into its
partial product (the ops seam fuses it there) and holds the bias; the other ranks add neither.

The embedding and the LM head are split by vocabulary rows (on the 0.5B model they are 45% of
the weights): a rank looks up the ids in its range, zeros elsewhere, and an all-reduce of the
hidden vector completes the lookup (exact: the other terms are zeros); its LM head computes its
range of logits, and an all-gather assembles them. A vocabulary that does not split evenly is
replicated. The final norms are replicated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from gguf import GGML_QUANT_SIZES

from . import ops, quant
from .config import ModelConfig
from .errors import FoundryError
from .layers import Embedding, Linear

COLUMN_PARALLEL = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("self_attn.o_proj", "mlp.down_proj")


def all_sum_linear(x: mx.array, layer: Linear, residual: mx.array | None = None) -> mx.array:
    """`ops.linear(x, layer, residual)` for every layer; for a row-parallel shard (a `layer.group`
    set by `TensorPlan.build`), the partial products summed over the group, residual added once."""
    group = getattr(layer, "group", None)
    if group is None:
        return ops.linear(x, layer, residual=residual)
    partial = ops.linear(x, layer, residual=residual if group.rank() == 0 else None)
    return mx.distributed.all_sum(partial, group=group)


def gather_norm_linear(x: mx.array, norm_weight: mx.array, eps: float, layer: Linear) -> mx.array:
    """`ops.norm_linear` (final norm, LM head); for a vocabulary-split head, the ranks' logits gathered."""
    logits = ops.norm_linear(x, norm_weight, eps, layer)
    group = getattr(layer, "vocab_group", None)
    if group is None:
        return logits
    gathered = mx.distributed.all_gather(mx.moveaxis(logits, -1, 0), group=group)
    return mx.moveaxis(gathered, 0, -1)


class VocabParallelEmbedding(Embedding):
    """Rows [start, start + rows) of the table; ids outside give zeros; summed over the group."""

    def __init__(self, table: Linear, start: int, group) -> None:
        nn.Module.__init__(self)
        self.table, self.start, self.group = table, start, group

    def __call__(self, ids: mx.array) -> mx.array:
        local = ids - self.start
        inside = (local >= 0) & (local < self.table.out_features)
        rows = super().__call__(mx.where(inside, local, 0))
        return mx.distributed.all_sum(mx.where(inside[..., None], rows, 0), group=self.group)


@dataclasses.dataclass(frozen=True)
class TensorPlan:
    """Which rows or columns of each weight rank `rank` of `size` keeps."""

    config: ModelConfig
    rank: int
    size: int
    group: Any = None  # mx.distributed.Group; None in unit tests that only slice

    def __post_init__(self) -> None:
        c, n = self.config, self.size
        if c.num_attention_heads % n:
            raise FoundryError(
                f"{c.num_attention_heads} attention heads do not split over {n} ranks; "
                "use a number of ranks that divides them, or --distributed pipeline."
            )
        if c.num_key_value_heads % n and n % c.num_key_value_heads:
            raise FoundryError(
                f"{c.num_key_value_heads} KV heads neither split over nor replicate onto {n} ranks; "
                "use a number of ranks that divides or is a multiple of them, or --distributed pipeline."
            )
        if c.intermediate_size % (n * quant.GROUP_SIZE) or (self.heads * c.head_dim) % quant.GROUP_SIZE:
            raise FoundryError(
                f"The MLP ({c.intermediate_size}) or attention ({c.num_attention_heads * c.head_dim}) width does not "
                f"split over {n} ranks into whole groups of {quant.GROUP_SIZE} columns; use fewer ranks or --distributed pipeline."
            )

    @property
    def heads(self) -> int:
        return self.config.num_attention_heads // self.size

    @property
    def kv_heads(self) -> int:
        kv = self.config.num_key_value_heads
        return kv // self.size if kv % self.size == 0 else 1

    @property
    def kv_start(self) -> int:
        """The first KV head this rank keeps (replicated KV: the one its query heads read)."""
        c = self.config
        if c.num_key_value_heads % self.size == 0:
            return self.rank * self.kv_heads
        return self.rank * self.heads // (c.num_attention_heads // c.num_key_value_heads)

    @property
    def vocab_rows(self) -> int | None:
        """Rows of the embedding and LM head per rank; None: replicated (uneven vocabulary)."""
        vocab = self.config.vocab_size
        return vocab // self.size if vocab % self.size == 0 else None

    @property
    def intermediate(self) -> int:
        return self.config.intermediate_size // self.size

    def local_config(self) -> ModelConfig:
        """The configuration of the slice of the model this rank runs."""
        return dataclasses.replace(
            self.config, num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
            intermediate_size=self.intermediate,
        )

    def keeps(self, name: str) -> bool:
        return True  # every rank holds a part of every weight

    def _module(self, name: str) -> tuple[str | None, str]:
        module, leaf = name.rsplit(".", 1)
        kind = next((k for k in COLUMN_PARALLEL + ROW_PARALLEL if module.endswith(k)), None)
        return kind, leaf

    def rows(self, name: str) -> tuple[int, int] | None:
        """The output rows (or bias entries) this rank keeps of a column-parallel weight; None: all."""
        kind, _ = self._module(name)
        head_dim = self.config.head_dim
        if kind == "self_attn.q_proj":
            return self.rank * self.heads * head_dim, (self.rank + 1) * self.heads * head_dim
        if kind in ("self_attn.k_proj", "self_attn.v_proj"):
            return self.kv_start * head_dim, (self.kv_start + self.kv_heads) * head_dim
        if kind in ("mlp.gate_proj", "mlp.up_proj"):
            return self.rank * self.intermediate, (self.rank + 1) * self.intermediate
        if name in ("model.embed_tokens.weight", "lm_head.weight") and self.vocab_rows:
            return self.rank * self.vocab_rows, (self.rank + 1) * self.vocab_rows
        return None

    def columns(self, name: str) -> tuple[int, int] | None:
        """The input columns this rank keeps of a row-parallel weight; None: all."""
        kind, leaf = self._module(name)
        if leaf != "weight":
            return None
        if kind == "self_attn.o_proj":
            width = self.heads * self.config.head_dim
        elif kind == "mlp.down_proj":
            width = self.intermediate
        else:
            return None
        return self.rank * width, (self.rank + 1) * width

    def _row_parallel_bias(self, name: str) -> bool:
        kind, leaf = self._module(name)
        return kind in ROW_PARALLEL and leaf == "bias"

    def shard(self, name: str, weight: Any) -> Any:
        """This rank's part of a loaded weight (dense array or `quant.QuantizedWeight`), made compact."""
        if self._row_parallel_bias(name):
            return weight if self.rank == 0 else mx.zeros_like(weight)
        rows, columns = self.rows(name), self.columns(name)
        if rows is not None:
            weight = _map(weight, lambda a: a[rows[0] : rows[1]])
        if columns is not None:
            weight = slice_columns(weight, *columns)
        return _map(weight, mx.contiguous) if rows or columns else weight

    def load_gguf(self, name: str, raw: np.ndarray, ggml_type, shape: tuple[int, ...], load: Callable) -> Any:
        """Convert only this rank's part of a GGUF tensor: `load(raw, shape)` converts raw bytes."""
        if self._row_parallel_bias(name):
            return self.shard(name, load(raw, shape))
        rows, columns = self.rows(name), self.columns(name)
        if rows is not None:
            raw, shape = raw[rows[0] : rows[1]], (rows[1] - rows[0], *shape[1:])
        if columns is None:
            return load(raw, shape)
        start, stop = columns
        if raw.shape == tuple(shape):  # plain F32/F16/BF16: elements, not blocks
            return load(raw[:, start:stop], (shape[0], stop - start))
        block_values, block_bytes = GGML_QUANT_SIZES[ggml_type]
        first, last = start // block_values, -(-stop // block_values)
        part = load(raw[:, first * block_bytes : last * block_bytes], (shape[0], (last - first) * block_values))
        offset = first * block_values
        return _map(slice_columns(part, start - offset, stop - offset), mx.contiguous)

    def build(self, config: ModelConfig, weights: dict[str, Any]):
        """The family's model on this rank's weights, its O and down projections bound to the group."""
        from . import models

        model = models.build(self.local_config(), weights)
        for layer in model.layers:
            layer.self_attn.o_proj.group = self.group
            layer.mlp.down_proj.group = self.group
        if self.vocab_rows:
            tied = model.lm_head is model.embed_tokens.table
            start = self.rank * self.vocab_rows
            model.embed_tokens = VocabParallelEmbedding(model.embed_tokens.table, start, self.group)
            if tied:
                model.lm_head = model.embed_tokens.table
            model.lm_head.vocab_group = self.group
        model.config = config
        model.parallel = self
        return model


def slice_columns(weight: Any, start: int, stop: int) -> Any:
    """Columns [start, stop) of a dense or affine-quantized matrix; quantized: on group boundaries."""
    if not isinstance(weight, quant.QuantizedWeight):
        return weight[:, start:stop]
    group = weight.group_size
    if start % group or stop % group:
        raise FoundryError(
            f"Columns {start}:{stop} do not fall on the weight's groups of {group}; use fewer ranks or --distributed pipeline."
        )
    words = group * weight.bits // 32  # packed uint32 words per group
    return quant.QuantizedWeight(
        weight.weight[:, start // group * words : stop // group * words],
        weight.scales[:, start // group : stop // group],
        weight.biases[:, start // group : stop // group],
        weight.bits,
        group,
    )


def _map(weight: Any, function: Callable[[mx.array], mx.array]) -> Any:
    if isinstance(weight, quant.QuantizedWeight):
        return quant.QuantizedWeight(
            function(weight.weight), function(weight.scales), function(weight.biases), weight.bits, weight.group_size
        )
    return function(weight)
