"""Quantized GEMM for prefill: y = x @ dequant(W)ᵀ (+ bias) (+ residual), W in MLX's affine layout.

Prefill multiplies M tokens (16 to 4096) by every weight matrix, so it is bound by arithmetic,
not by streaming weights as decode is. The kernel fuses the dequantization into the GEMM: each
threadgroup owns a BM×BN output tile, walks K in tiles of 32, and per tile stages x in shared
memory and dequantizes the weight tile there (scale·q + bias, rounded to T as `mx.dequantize`
rounds), so the dense weights never exist in device memory. The tile multiply runs on the tensor
cores (CUDA: `mma.sync.m16n8k16`, fp16/bf16 in, fp32 accumulate) or SIMD-group matrices (Metal);
the source is in kernels/qgemm_source.py. The optional epilogue adds the layer's bias and the
residual stream, as `ops.linear` would after MLX's `quantized_matmul`.

Whether prefill uses it is decided per shape by measurements (kernels/qgemm_table.py): MLX's own
`quantized_matmul` stays the default wherever nothing says the kernel (or the dense route,
kernels/qgemm_dense.py) wins.
"""

from __future__ import annotations

import math
import os

import mlx.core as mx

from ..errors import FoundryError
from ..quant import QuantizedWeight
from . import qgemm_dense, qgemm_ring, qgemm_source, qgemm_table
from .qgemv_launch import Launch

DTYPES = (mx.float16, mx.bfloat16)
GROUP_SIZES = (32, 64, 128)
BITS = (4, 5, 6, 8)


# (BM, BN, warps along M, warps along N): each warp computes (BM / warps_m) x (BN / warps_n).
CUDA_TILES = {
    "128x128": (128, 128, 2, 4),  # 8 warps of 64x32 (4x4 mma fragments): the large-M tile
    "64x128": (64, 128, 1, 4),    # 4 warps of 64x32: more threadgroups for narrow N or mid M
    "32x128": (32, 128, 1, 4),    # 4 warps of 32x32
    "16x128": (16, 128, 1, 4),    # 4 warps of 16x32: M <= 16 without computing padding rows
}
METAL_TILE = (64, 64, 2, 2)  # 4 SIMD-groups of 32x32; float tiles of 2x64x36 fit 32 KB


def tile(backend: str, m: int, n: int) -> tuple[int, int, int, int]:
    """The tile for one launch. CUDA: the smallest tile that covers M for M <= 32; above that 128x128
    unless it leaves fewer than 16 threadgroups for the 132 SMs, then 64x128.

    Measured on an H200 (benchmarks/results/h200-qgemm.json, kernel at commit 1eb91fa, file
    committed in 93b9363): 128x128 beat 64x128 at 29 of the 30 points with M >= 128 (Qwen2.5 7B
    and 0.5B matrices), by 10-25% on the 7B ones (7B down at M=512: 376 against 468 µs); the one
    loss is 0.5B qkv at M=128 (9 threadgroups: 19.1 against 18.1 µs), hence the floor. The floor
    also sends 0.5B o and down at M=128 (7 threadgroups) to 64x128, 3-5% slower there; MLX's
    quantized_matmul is twice as fast as either on those shapes, so the table never routes them."""
    if backend == "metal":
        return METAL_TILE
    if m <= 32:
        return CUDA_TILES["16x128" if m <= 16 else "32x128"]
    if groups(m, n, CUDA_TILES["128x128"]) >= 16:
        return CUDA_TILES["128x128"]
    return CUDA_TILES["64x128"]


# Split-K on CUDA: a grid too small to fill the GPU has its K split into 2, 4 or 8 ranges (fp32
# partials, summed in `run`). 132 SMs on an H100/H200, each holding REGISTERS_PER_SM // (threads x 128)
# of our threadgroups (qgemm_source.LAUNCH_BOUNDS caps registers at 128): two 128x128 tiles, four of
# the 128-thread ones. The 7B's down at M=128 is 28 threadgroups; unsplit it took 571 µs inside a
# prefill (benchmarks/results/h200-ncu-prefill-7b-4bit-0fd4073.txt).
SMS = 132
REGISTERS_PER_SM = 65536
MAX_SPLIT = 8
MIN_SPLIT_TILES = 8  # K tiles (of 32) each split keeps at least


def groups(m: int, n: int, tile_shape: tuple[int, int, int, int]) -> int:
    """Threadgroups (output tiles) of an M x N product in this tile, before any split."""
    return -(-m // tile_shape[0]) * -(-n // tile_shape[1])


def slots(tile_shape: tuple[int, int, int, int]) -> int:
    """Threadgroups of this tile the GPU runs at once (one wave)."""
    threads = tile_shape[2] * tile_shape[3] * 32
    return SMS * (REGISTERS_PER_SM // (threads * qgemm_source.MAX_REGISTERS))


def split_k(backend: str, m: int, n: int, k: int, tile_shape: tuple[int, int, int, int]) -> int:
    """How many K ranges a launch is split into (1: none): CUDA only, doubling while the split grid
    still fits in one wave (`slots`) and the K tiles divide evenly into runs of >= MIN_SPLIT_TILES.
    FOUNDRY_QGEMM_SPLIT=0 never splits (each split product is two graph nodes: what a prefill bound
    by host time per node pays for a GPU that waits anyway)."""
    if backend != "cuda" or not splitting():
        return 1
    tiles, places, k_tiles = groups(m, n, tile_shape), slots(tile_shape), k // qgemm_source.BK
    split = 1
    while (tiles * 2 * split <= places and 2 * split <= MAX_SPLIT and k_tiles % (2 * split) == 0
           and k_tiles // (2 * split) >= MIN_SPLIT_TILES):
        split *= 2
    return split


SPLIT_SWITCH = "FOUNDRY_QGEMM_SPLIT"


def splitting() -> bool:
    """Whether split-K may be used: FOUNDRY_QGEMM_SPLIT=0 turns it off (unset or 1: on)."""
    value = os.environ.get(SPLIT_SWITCH, "").strip()
    if value not in ("", "0", "1"):
        raise FoundryError(f"{SPLIT_SWITCH}={value!r} is not 0 or 1; unset it for the default (split where the "
                           "grid is smaller than one wave).")
    return value != "0"


def supported(x: mx.array, weight: QuantizedWeight) -> bool:
    """Whether the kernel handles this input and weight (else MLX's quantized_matmul must)."""
    _, k = weight.shape
    return (x.dtype in DTYPES and weight.bits in BITS and weight.group_size in GROUP_SIZES
            and k % weight.group_size == 0 and x.shape[-1] == k and weight.scales.dtype == x.dtype)


def launch(backend: str, x: mx.array, weight: QuantizedWeight, bias: mx.array | None = None,
           residual: mx.array | None = None, tile_shape: tuple[int, int, int, int] | None = None,
           split: int = 1, ahead: int = 1) -> Launch:
    """Arguments for one call on x (..., K): the output is (..., N), x's leading axes kept (the kernel
    flattens them into M rows, so no reshape node is needed either side); with `split` > 1 (the split
    variant, no bias or residual) (split, M, N) fp32 partial sums.
    `residual` has the output's size. `tile_shape` overrides the chosen tile (the benchmark compares
    them). `ahead` > 1: the ring schedule's template (kernels/qgemm_ring.py, experimental)."""
    if not supported(x, weight):
        raise ValueError(f"quantized GEMM does not handle x {x.shape} {x.dtype} with {weight.bits}-bit "
                         f"weights {weight.shape}, group {weight.group_size}")
    n, k = weight.shape
    m = x.size // k
    block_m, block_n, warps_m, warps_n = tile_shape or tile(backend, m, n)
    inputs = [x, weight.weight, weight.scales, weight.biases]
    if split > 1 and (bias is not None or residual is not None or (k // qgemm_source.BK) % split):
        raise ValueError(f"split-K by {split} takes no epilogue and K tiles ({k // qgemm_source.BK}) it divides")
    if residual is not None and residual.size != m * n:
        raise ValueError(f"residual {residual.shape} does not match the product's {m}x{n}")
    if bias is not None:
        inputs.append(bias)
    if residual is not None:
        inputs.append(residual)
    template = [("T", x.dtype), ("BITS", weight.bits), ("GROUP", weight.group_size), ("BM", block_m),
                ("BN", block_n), ("WARPS_M", warps_m), ("WARPS_N", warps_n)]
    if ahead > 1:
        template.append(("AHEAD", ahead))
    threads = warps_m * warps_n * 32
    tiles = groups(m, n, (block_m, block_n, warps_m, warps_n))
    if split > 1:
        template.append(("SPLIT_K", split))
        return Launch(inputs, template, (tiles * split * threads, 1, 1), (threads, 1, 1), (split, m, n),
                      mx.float32)
    return Launch(inputs, template, (tiles * threads, 1, 1), (threads, 1, 1), (*x.shape[:-1], n), x.dtype)


def reference(x: mx.array, weight: QuantizedWeight, bias: mx.array | None = None,
              residual: mx.array | None = None) -> mx.array:
    """The twin in plain `mlx` ops, (..., N) like the kernel: dequantize, then a dense matmul, which
    is the dense route itself (kernels/qgemm_dense.py; the kernel needs x's dtype for the scales,
    so dequantizing to x's dtype is dequantizing to the scales')."""
    return qgemm_dense.run(x, weight, bias, residual)


_kernels: dict[tuple, object] = {}


def _kernel(backend: str, bias: bool, residual: bool, split: bool, shared_memory: int = 0, reduce: bool = False,
            swiglu: bool = False):
    """The kernel object per (backend, epilogue, split), built on first use: the GEMM, split-K's sum
    (`reduce`, with the SwiGLU activation or not), or with dynamic `shared_memory` (bytes, the ring
    schedule's) qgemm_ring's GEMM, one object per size (MLX fixes it per object)."""
    key = (backend, bias, residual, split, shared_memory, reduce, swiglu)
    kernel = _kernels.get(key)
    if kernel is None:
        if reduce:
            source = qgemm_source.reduce_source(bias, residual, swiglu)
        else:
            source = (qgemm_ring if shared_memory else qgemm_source).kernel_source(backend, bias, residual, split)
        kernel = _kernels[key] = source.build(backend, shared_memory)
    return kernel


def trace_switches() -> tuple[str, str, str]:
    """The settings (as set) that decide, while a prefill is traced, which route and schedule its
    products take: engine/prefill.py keeps one compiled trace per value."""
    return (os.environ.get(qgemm_table.VARIABLE, ""), os.environ.get(qgemm_ring.SWITCH, ""),
            os.environ.get(SPLIT_SWITCH, ""))


def splits(backend: str, x: mx.array, weight: QuantizedWeight) -> int:
    """The K ranges `run` splits this product into by default (1: none): `_plan`'s choice."""
    return _plan(backend, x, weight, None, None)[1]


def run(backend: str, x: mx.array, weight: QuantizedWeight, bias: mx.array | None = None,
        residual: mx.array | None = None, tile_shape: tuple[int, int, int, int] | None = None,
        split: int | None = None, swiglu: bool = False) -> mx.array:
    """The kernel's y (..., N) on `backend`; kernel objects are built once per (backend, epilogue).
    `split` K ranges (default `split_k`'s choice): their fp32 partials are summed by a second launch
    (`reduce_launch`), rounded to T and given the bias and residual as the unsplit epilogue does.
    `swiglu` (split launches only, no bias or residual): that sum also applies the activation of a
    [gate; up] product, y (..., N/2) = silu(gate) * up, one graph node where MLX ops take two."""
    n = weight.shape[0]
    tile_shape, split, ahead, shared = _plan(backend, x, weight, tile_shape, split)
    if swiglu and (split == 1 or bias is not None or residual is not None):
        raise ValueError("the SwiGLU activation is applied by split-K's sum, of a product with no bias or residual")
    if split == 1:
        arguments = launch(backend, x, weight, bias, residual, tile_shape, ahead=ahead).arguments()
        return _kernel(backend, bias is not None, residual is not None, False, shared)(**arguments)[0]
    partials = _partials(backend, x, weight, tile_shape, split, ahead, shared)
    arguments = reduce_launch(partials, (*x.shape[:-1], n // 2 if swiglu else n), x.dtype, bias, residual).arguments()
    return _kernel(backend, bias is not None, residual is not None, False, reduce=True, swiglu=swiglu)(**arguments)[0]


def split_partials(backend: str, x: mx.array, weight: QuantizedWeight,
                   tile_shape: tuple[int, int, int, int] | None = None, split: int | None = None) -> mx.array:
    """Split-K's first launch alone: the (split, M, N) fp32 partial sums of x @ Wᵀ, for a consumer
    that sums them itself (kernels/qkv_heads.py's `run_summed`; `run` sums them by its reduce launch)."""
    return _partials(backend, x, weight, *_plan(backend, x, weight, tile_shape, split))


def _plan(backend: str, x: mx.array, weight: QuantizedWeight, tile_shape: tuple[int, int, int, int] | None,
          split: int | None) -> tuple[tuple[int, int, int, int], int, int, int]:
    """(tile, K ranges, ring depth, dynamic shared bytes) of one product: the given tile and split,
    else `tile`'s and `split_k`'s choice."""
    n, k = weight.shape
    m = x.size // k
    tile_shape = tile_shape or tile(backend, m, n)
    split = split_k(backend, m, n, k, tile_shape) if split is None else split
    ahead = qgemm_ring.ahead() if backend == "cuda" else 1
    shared = qgemm_ring.shared_bytes(tile_shape, weight.bits, ahead, x.dtype.size) if ahead > 1 else 0
    return tile_shape, split, ahead, shared


def _partials(backend: str, x: mx.array, weight: QuantizedWeight, tile_shape: tuple[int, int, int, int], split: int,
              ahead: int, shared: int) -> mx.array:
    arguments = launch(backend, x, weight, tile_shape=tile_shape, split=split, ahead=ahead).arguments()
    return _kernel(backend, False, False, True, shared)(**arguments)[0]


REDUCE_THREADS = 256


def reduce_launch(partials: mx.array, shape: tuple[int, ...], dtype, bias: mx.array | None = None,
                  residual: mx.array | None = None) -> Launch:
    """Arguments for split-K's sum (qgemm_source.reduce_source) of `partials` (S, M, N) into `shape`
    of `dtype` (M·N elements, or M·N/2 for the SwiGLU sum), with the bias and the residual (of that
    size) added."""
    inputs = [partials] + ([bias] if bias is not None else []) + ([residual] if residual is not None else [])
    threads = -(-math.prod(shape) // REDUCE_THREADS) * REDUCE_THREADS
    return Launch(inputs, [("T", dtype), ("THREADS", REDUCE_THREADS)], (threads, 1, 1), (REDUCE_THREADS, 1, 1),
                  shape, dtype)


def route(backend: str | None, x: mx.array, weight: QuantizedWeight) -> str:
    """How `ops.linear` should run this product: "kernel" (ours), "dense" (kernels/qgemm_dense.py)
    or "mlx" (`quantized_matmul`). Only with a GPU kernel backend active, and only a route that
    handles this input: the measured table (or FOUNDRY_QGEMM) picks among them."""
    if backend is None:
        return "mlx"
    n, k = weight.shape
    m = x.size // k
    choice = qgemm_table.route(backend, m, n, k, weight.bits, weight.group_size)
    handles = {"kernel": supported, "dense": qgemm_dense.supported}.get(choice)
    return choice if handles is not None and handles(x, weight) else "mlx"
