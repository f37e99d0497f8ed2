"""Model weights moved into the GPU's own memory after loading (CUDA).

MLX's CUDA allocator gives an array made on the host side (a file read by `mx.load`, an array
built from numpy, as both loaders do) *managed* memory (`cudaMallocManaged`, in
mlx/backend/cuda/allocator.cpp: `malloc` without a stream), while arrays computed on the GPU get
`cudaMallocAsync` device memory. Managed pages migrate to the GPU on first touch, but kernels that
stream a model's weights still read them far slower than device memory: on the H200, random 7B
4-bit weights, a 128-token prefill's quantized GEMMs ran 2-2.6x slower than on weights made on the
GPU (`benchmarks/qgemm_bench.py`'s cold-weight times against the same kernels inside a prefill, Nsight
Compute, commit 0fd4073; the weight copies that benchmark cycles through are computed on the GPU). So on CUDA each weight is copied once on the GPU (`x * 1`: exact for every
dtype, -0.0 included) into a fresh device buffer, a bounded batch at a time so the peak stays one
batch above the model, and the managed buffers are returned to the driver.

`FOUNDRY_DEVICE_WEIGHTS=0` keeps the weights where loading put them (for comparison); Metal (unified
memory) and the CPU have nothing to move.
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
    """On where MLX's arrays from the host land in managed memory (CUDA), unless switched off."""
    value = os.environ.get(SWITCH, "")
    if value not in ("", "0", "1"):
        raise FoundryError(f"{SWITCH} must be 0 or 1, not {value!r}; unset it for the default (on with CUDA).")
    if value == "":
        return kernels.gpu_backend() == "cuda"
    return value == "1"


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
