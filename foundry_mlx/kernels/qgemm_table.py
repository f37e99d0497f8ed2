"""Which route prefill's quantized products take, measured per shape: MLX, our kernel, or dense.

Three ways compute x @ dequant(W)ᵀ for M tokens: MLX's `quantized_matmul` (the default), our
quantized GEMM (kernels/qgemm.py), and dequantize-then-dense-matmul (kernels/qgemm_dense.py).
Which is fastest depends on the shape (few tiles on a narrow N, small M, enough M to amortize a
dequantization), so the engine leaves MLX only where a measurement says another route wins:
`MEASURED` maps (backend, M bucket, N, K, bits, group size) to "kernel" or "dense". It is filled
from benchmarks/qgemm_bench.py's output (which prints the entries it measured as wins by >= 5%)
with the machine, commit and file beside them. No entry means MLX.

`FOUNDRY_QGEMM=0` forces MLX, `1` our kernel, `dense` the dense route, wherever they can run;
`auto` (or unset) uses the table. The forced values are for benchmarking and tests.
"""

from __future__ import annotations

import math
import os

from ..errors import FoundryError

M_BUCKETS = (16, 128, 512, 2048)  # the M values the benchmark measures
MIN_ROWS = 8  # below this a product is decode-like: never routed without the switch
ROUTES = ("mlx", "kernel", "dense")
SWITCH = {"0": "mlx", "1": "kernel", "dense": "dense"}

# (backend, M bucket, N, K, bits, group size) → the route that measured faster than MLX by >= 5%.
MEASURED: dict[tuple[str, int, int, int, int, int], str] = {
    # NVIDIA H200, mlx 0.32.4, kernel at commit 1eb91fa: benchmarks/results/h200-qgemm.json (committed
    # in 93b9363), float16 x, timed on the tile `qgemm.tile` picks now (128x128 for all of these; at
    # M=128 and 512 that is the file's tile_128x128_us column). Qwen2.5-7B matrices; every 0.5B
    # shape and M=16 lost to MLX. MLX/ours per entry; dense is not measured yet.
    ("cuda", 128, 37888, 3584, 4, 64): "kernel",   # gate_up 1.07x
    ("cuda", 512, 37888, 3584, 4, 64): "kernel",   # gate_up 1.17x
    ("cuda", 2048, 37888, 3584, 4, 64): "kernel",  # gate_up 1.20x
    ("cuda", 128, 3584, 18944, 4, 64): "kernel",   # down 1.13x
    ("cuda", 512, 3584, 18944, 4, 64): "kernel",   # down 1.22x
    ("cuda", 2048, 3584, 18944, 4, 64): "kernel",  # down 1.22x
    ("cuda", 2048, 4608, 3584, 4, 64): "kernel",   # qkv 1.18x (1.04x at M=512: under 5%)
    ("cuda", 2048, 3584, 3584, 4, 64): "kernel",   # o_proj 1.09x
    ("cuda", 128, 152064, 3584, 4, 64): "kernel",  # lm_head 1.16x
    ("cuda", 512, 152064, 3584, 4, 64): "kernel",  # lm_head 1.20x
    ("cuda", 2048, 152064, 3584, 4, 64): "kernel", # lm_head 1.20x
}


def m_bucket(m: int) -> int:
    """The measured M nearest to m on a log scale (prefill cost scales with M between them)."""
    return min(M_BUCKETS, key=lambda bucket: abs(math.log2(max(m, 1)) - math.log2(bucket)))


def switch() -> str | None:
    """FOUNDRY_QGEMM as the forced route ("mlx", "kernel" or "dense"), or None (use the table)."""
    value = os.environ.get("FOUNDRY_QGEMM", "")
    if value in ("", "auto"):
        return None
    if value in SWITCH:
        return SWITCH[value]
    raise FoundryError(f"FOUNDRY_QGEMM={value!r} is not 0, 1, dense or auto; unset it to use the measured table.")


def route(backend: str, m: int, n: int, k: int, bits: int, group_size: int, table: dict | None = None) -> str:
    """The route for an (m, n, k) product with these weights: "mlx", "kernel" or "dense"."""
    forced = switch()
    if forced is not None:
        return forced if m >= 2 else "mlx"
    if m < MIN_ROWS:
        return "mlx"
    table = MEASURED if table is None else table
    return table.get((backend, m_bucket(m), n, k, bits, group_size), "mlx")
