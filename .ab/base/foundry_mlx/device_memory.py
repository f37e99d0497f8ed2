"""Model weights moved into the GPU's own memory after loading (CUDA).

MLX's CUDA allocator gives an array made on the host side (a file read by `mx.load`, an array
built from numpy, as both loaders do) *managed* memory (`cudaMallocManaged`, in
mlx/backend/cuda/allocator.cpp: `malloc` without a stream), while arrays computed on the GPU get
`cudaMallocAsync` device memory. `FOUNDRY_DEVICE_WEIGHTS=1` copies each weight once on the GPU
(`x * 1`: exact for every dtype, -0.0 included) into a fresh device buffer, a bounded batch at a
time so the peak stays one batch above the model, and returns the managed buffers to the driver.

It is off by default: on the H200 (random weights, `foundry-mlx bench`, benchmarks/results/
h200-*-DEVICE_WEIGHTS-*) the order of two back-to-back runs mattered more than the switch. 0.5B
decode, off then on: 1,216 then 1,354 tok/s (91df070); on then off: 1,209 then 1,377 (eff4a5c);
7B pp128 off then on 4,496 then 4,652, decode 405 both. Nothing here says managed pages, once
migrated, are slower to stream; the switch stays for a machine where they are (one without
`concurrentManagedAccess`, say) to measure. Metal (unified memory) and the CPU have nothing to move.
"""

from __future__ import annotations

import os

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from . import kernels
from .errors import FoundryError

SWITCH = "FOUNDRY_DEVICE_WEIGHTS"
BATCH_BYTES = 1 << 30  # weights copied per evaluation: the transient extra memory


def enabled() -> bool:
    """With FOUNDRY_DEVICE_WEIGHTS=1 on CUDA (where MLX puts arrays from the host in managed memory)."""
    value = os.environ.get(SWITCH, "")
    if value not in ("", "0", "1"):
        raise FoundryError(f"{SWITCH} must be 0 or 1, not {value!r}; unset it for the default (off).")
    return value == "1" and kernels.gpu_backend() == "cuda"


def into_device_memory(model, batch_bytes: int = BATCH_BYTES) -> int:
    """Copy every weight of `model` into a buffer computed on the default device, in place of the
    one loading made; returns the bytes moved (0 where `enabled()` says there is nothing to do)."""
    if not enabled():
        return 0
    moved = 0
    batch: list[tuple[str, mx.array]] = []
    size = 0
    copies: dict[int, mx.array] = {}  # one copy of an array two names share (tied embeddings)

    def flush() -> None:
        nonlocal batch, size
        if batch:
            mx.eval([array for _, array in batch])
            model.update(tree_unflatten(batch), strict=False)
            batch, size = [], 0

    for name, array in tree_flatten(model.parameters()):
        if id(array) not in copies:
            copies[id(array)] = array * 1
            size += array.nbytes
            moved += array.nbytes
        batch.append((name, copies[id(array)]))
        if size >= batch_bytes:
            flush()
    flush()
    mx.clear_cache()  # the replaced buffers go back to the driver, not to MLX's cache for reuse
    return moved
