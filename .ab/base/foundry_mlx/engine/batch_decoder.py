"""Several sequences decoded by the fused step at once (kernels/fused_batch.py): token ids in,
token ids out, on the device, in about the single-sequence step's graph nodes whatever B is.

The decoder holds *slots*: row b of every per-step array (state, params, penalty ring) and of each
layer's K and V buffer (slots, kv_heads, S, D). A sequence joins into a free slot (its KV rows are
copied in from its own cache, its state row written) and leaves by having its rows copied out and
its slot parked; both happen between steps, and only for that sequence, so a join or a leave never
rebuilds the others. The slot count is a power of two (1, 2, 4, 8, 16…), so a server sees a few
kernel specialisations, not one per batch size; it doubles when a join finds no free slot and
halves when a leave leaves at most a quarter of them busy.

Each step is one compiled call of the plan; each row's position lives in its state row on the
device, and a host copy (`positions`) only decides when the buffers must grow (by 256 positions,
all rows at once). Rows sample by their own parameters and seeds (the draw hashes the row's seed
and counter), so a row's tokens do not depend on which others share the batch.
"""

from __future__ import annotations

import mlx.core as mx

from .batch import set_contents
from .cache import STEP, KVCache
from .decoder import fused_kernel_set, plan_step
from .sampling import SamplingParams

RING = 64  # the penalty rings' width, widened when a sequence with a longer window joins


class BatchedFusedDecoder:
    def __init__(self, model, kernel_set, compiled: bool = True) -> None:
        from ..kernels import fused_batch

        self.model, self.kernels = model, kernel_set
        self._step, self.functional = plan_step(fused_batch.decode_step, kernel_set, model, compiled)
        self.clear()

    def clear(self) -> None:
        """No slots, no buffers (after a failed step, or before the first join)."""
        self.rows: list[object | None] = []
        self.positions: list[int] = []
        self.state = self.params = self.recent = None
        self.keys: list[mx.array] = []
        self.values: list[mx.array] = []

    @property
    def members(self) -> list[object]:
        return [row for row in self.rows if row is not None]

    @property
    def capacity(self) -> int:
        """Positions each slot's buffers hold."""
        return self.keys[0].shape[2] if self.keys else 0

    def join(self, owner, cache: list[KVCache], token: int, history: list[int], sampling: SamplingParams,
             seed: int, room: int = 1) -> None:
        """Take `owner`'s sequence: `cache` holds its positions so far, `token` is fed next, `history`
        is every id so far (the penalty's window), `room` the positions to reserve past the current."""
        if owner in self.rows:
            raise ValueError("this sequence is already in the batch")
        position = cache[0].offset
        if None not in self.rows:
            self._relayout(max(1, 2 * len(self.rows)), cache[0].keys.dtype)
        self._reserve(position + room)
        slot = self.rows.index(None)
        window = max(sampling.repetition_context, 1)
        ring = list(history[-window:]) if sampling.repetition_penalty != 1.0 else []
        if window > self.recent.shape[1]:
            self.recent = mx.pad(self.recent, [(0, 0), (0, window - self.recent.shape[1])])
        from ..kernels import sample

        self.state[slot] = mx.array(sample.state_row(position, token, 0, seed, len(ring)), dtype=mx.int32)
        self.params[slot] = mx.array(sample.params_row(sampling.temperature, sampling.top_k, sampling.top_p,
                                                       sampling.min_p, sampling.repetition_penalty, window),
                                     dtype=mx.float32)
        self.recent[slot] = mx.array(ring + [0] * (self.recent.shape[1] - len(ring)), dtype=mx.int32)
        for layer, layer_cache in enumerate(cache):
            if position:
                self.keys[layer][slot : slot + 1, :, :position, :] = layer_cache.keys[..., :position, :]
                self.values[layer][slot : slot + 1, :, :position, :] = layer_cache.values[..., :position, :]
        self.rows[slot] = owner
        self.positions[slot] = position
        mx.eval(self.state, self.params, self.recent, self.keys, self.values)

    def make_room(self, joining: int, dtype: mx.Dtype, positions: int = 0) -> None:
        """Room for `joining` more sequences, each up to `positions`, in one relayout and one grow:
        joined one by one, 8 arrivals relaid the buffers out at 2, 4 and 8 slots (each a new step
        shape to trace) and grew them once per longer reply."""
        if joining > self.rows.count(None):
            self._relayout(1 << (len(self.members) + joining - 1).bit_length(), dtype)
        self._reserve(positions)

    def leave(self, owner, length: int | None = None) -> list[KVCache] | None:
        """Let `owner` go; with `length`, its first `length` positions come back as its own caches."""
        slot = self.rows.index(owner)
        caches = None
        if length is not None:
            caches = self.model.make_cache()
            for layer_cache, keys, values in zip(caches, self.keys, self.values):
                set_contents(layer_cache, mx.contiguous(keys[slot : slot + 1, :, :length, :]),
                             mx.contiguous(values[slot : slot + 1, :, :length, :]))
            mx.eval([[c.keys, c.values] for c in caches])
        self._park(slot)
        self.rows[slot] = None
        busy = len(self.members)
        if busy == 0:
            self.clear()
        elif 4 * busy <= len(self.rows):
            self._relayout(len(self.rows) // 2, self.keys[0].dtype)
        return caches

    def advance(self) -> mx.array:
        """Queue one step of every slot; return the tokens it samples, (slots,) lazy (a parked
        slot's entry means nothing)."""
        self._reserve(max(p for p, row in zip(self.positions, self.rows) if row is not None) + 1)
        outputs = self._step(self.state, self.params, self.recent, self.keys, self.values)
        self.state, tokens = outputs[0], outputs[1]
        if self.functional:
            self.keys, self.values, self.recent = list(outputs[2]), list(outputs[3]), outputs[4]
        for slot, row in enumerate(self.rows):
            if row is not None:
                self.positions[slot] += 1
        return tokens

    # --- layout -------------------------------------------------------------------------------

    def _park(self, slot: int) -> None:
        from ..kernels import sample

        self.state[slot] = mx.array(sample.state_row(0, 0, 0, 0, 0, parked=True), dtype=mx.int32)
        self.positions[slot] = 0

    def _reserve(self, positions: int) -> None:
        """Grow every buffer to hold `positions` (whole 256-steps), keeping what they hold."""
        if positions <= self.capacity:
            return
        size = -(-positions // STEP) * STEP
        self.keys = [_resized(k, len(self.rows), size) for k in self.keys]
        self.values = [_resized(v, len(self.rows), size) for v in self.values]
        mx.eval(self.keys, self.values)

    def _relayout(self, slots: int, dtype: mx.Dtype) -> None:
        """`slots` slots, the members first (in their order), the rest parked; new buffers hold
        `dtype` (the joining cache's: the KV rows are copied, never converted)."""
        from ..kernels import sample

        keep = [slot for slot, row in enumerate(self.rows) if row is not None]
        if not self.keys:  # the first join: empty buffers of the model's shape
            attention = self.model.layers[0].self_attn
            shape = (slots, attention.n_kv_heads, STEP, attention.rope.dims)
            self.keys = [mx.zeros(shape, dtype) for _ in self.model.layers]
            self.values = [mx.zeros(shape, dtype) for _ in self.model.layers]
            parked = sample.state_row(0, 0, 0, 0, 0, parked=True)
            self.state = mx.array([parked] * slots, dtype=mx.int32)
            self.params = mx.zeros((slots, sample.PARAMS_SIZE), mx.float32)
            self.recent = mx.zeros((slots, RING), mx.int32)
        else:
            index = mx.array(keep, dtype=mx.int32)
            self.keys = [_resized(k[index], slots, k.shape[2]) for k in self.keys]
            self.values = [_resized(v[index], slots, v.shape[2]) for v in self.values]
            parked = mx.array([sample.state_row(0, 0, 0, 0, 0, parked=True)], dtype=mx.int32)
            self.state = mx.concatenate([self.state[index]] + [parked] * (slots - len(keep)))
            self.params = _resized(self.params[index], slots)
            self.recent = _resized(self.recent[index], slots)
        self.rows = [self.rows[slot] for slot in keep] + [None] * (slots - len(keep))
        self.positions = [self.positions[slot] for slot in keep] + [0] * (slots - len(keep))
        mx.eval(self.state, self.params, self.recent, self.keys, self.values)


def _resized(array: mx.array, rows: int, positions: int | None = None) -> mx.array:
    """`array` with `rows` rows (and `positions` along axis 2), zero-padded; never truncated."""
    padding = [(0, rows - array.shape[0])] + [(0, 0)] * (array.ndim - 1)
    if positions is not None:
        padding[2] = (0, positions - array.shape[2])
    return mx.pad(array, padding) if any(after for _, after in padding) else array


def batch_decoder_for(model) -> BatchedFusedDecoder | None:
    """The batched fused decoder where the single-sequence fused step would run (CUDA; Metal with
    FOUNDRY_FUSED=1; never the CPU, other families, dense or sharded models), else None."""
    kernel_set = fused_kernel_set()
    if kernel_set is None:
        return None
    from ..kernels import fused_batch, fused_step

    if fused_step.unsupported_reason(model) is not None:
        return None
    return BatchedFusedDecoder(model, fused_batch.BatchedGpuKernels(kernel_set.backend))
