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
VARIABLE = "FOUNDRY_QGEMM"
SWITCH = {"0": "mlx", "1": "kernel", "dense": "dense"}

# (backend, M bucket, N, K, bits, group size) → the route that measured faster than MLX by >= 5%.
MEASURED: dict[tuple[str, int, int, int, int, int], str] = {
    # NVIDIA H200, mlx 0.32.4, commit fe87a63: benchmarks/results/h200-qgemm-cold.json (`qgemm_bench.py
    # --no-tiles --budget 170`), float16 x, 4-bit weights in groups of 64, cold (calls cycle through
    # weight copies of >= 512 MB, as a prefill reads each matrix once; e042b39's table timed one warm
    # copy, and two M=128 "kernel" entries it made lost in real prefills). MLX/route per entry.
    # Everything else (every M=16 point, 0.5B's qkv and o at 512 and 2048) measured fastest on MLX's
    # quantized_matmul.
    # M=128 (the 128 bucket, where a chat prompt's prefill lands) is decided end to end instead, since
    # micro-benchmarks mislead at this size both ways (independent calls overlap on the GPU and hide
    # small grids; chained ones pay a dependency per call: h200-qgemm-chained.md). The 7B: our kernel
    # with split-K for every product of a 128-token prefill, `foundry-mlx bench` pp128 5,697 tok/s
    # (h200-qwen2.5-7b-4bit-pp128-eff4a5c.md) against 4,652 with MLX's products (the table before,
    # h200-qwen2.5-7b-4bit-DEVICE_WEIGHTS-1-91df070.md); prefill alone (prefill_compile_bench,
    # h200-prefill-routes-a3a6fdd.txt) kernel / dense / MLX 22.4 / 22.5 / 26.8 ms. The 0.5B: our kernel
    # for its four products too, `foundry-mlx bench` pp128 (9c8f864, h200-0.5b-pp128-qgemm-*-9c8f864.md,
    # five trials each) 18,000 tok/s median (buffers freed before each run) and 20,274 (kept) against
    # 14,635-15,316 on MLX's products (kept). One earlier run (eff4a5c) had the kernel route at
    # 10.7-12.4k; prefill alone then also favoured the kernel (6.6 against 7.7 ms).
    ("cuda", 128, 4608, 3584, 4, 64): "kernel",    # 7B qkv
    ("cuda", 128, 3584, 3584, 4, 64): "kernel",    # 7B o_proj
    ("cuda", 128, 37888, 3584, 4, 64): "kernel",   # 7B gate_up
    ("cuda", 128, 3584, 18944, 4, 64): "kernel",   # 7B down
    ("cuda", 128, 1152, 896, 4, 64): "kernel",     # 0.5B qkv
    ("cuda", 128, 896, 896, 4, 64): "kernel",      # 0.5B o_proj
    ("cuda", 128, 9728, 896, 4, 64): "kernel",     # 0.5B gate_up
    ("cuda", 128, 896, 4864, 4, 64): "kernel",     # 0.5B down
    # Qwen2.5-7B
    ("cuda", 512, 4608, 3584, 4, 64): "dense",     # qkv 1.06x
    ("cuda", 2048, 4608, 3584, 4, 64): "dense",    # qkv 2.58x
    ("cuda", 512, 3584, 3584, 4, 64): "dense",     # o_proj 1.38x
    ("cuda", 2048, 3584, 3584, 4, 64): "dense",    # o_proj 2.47x
    ("cuda", 512, 37888, 3584, 4, 64): "dense",    # gate_up 1.72x
    ("cuda", 2048, 37888, 3584, 4, 64): "dense",   # gate_up 3.34x
    ("cuda", 512, 3584, 18944, 4, 64): "dense",    # down 1.81x
    ("cuda", 2048, 3584, 18944, 4, 64): "dense",   # down 3.15x
    ("cuda", 128, 152064, 3584, 4, 64): "kernel",  # lm_head 1.13x
    ("cuda", 512, 152064, 3584, 4, 64): "dense",   # lm_head 1.83x
    ("cuda", 2048, 152064, 3584, 4, 64): "dense",  # lm_head 3.38x
    # Qwen2.5-0.5B
    ("cuda", 512, 9728, 896, 4, 64): "dense",      # gate_up 1.26x
    ("cuda", 2048, 9728, 896, 4, 64): "dense",     # gate_up 2.36x
    ("cuda", 2048, 896, 4864, 4, 64): "dense",     # down 2.21x
    ("cuda", 512, 151936, 896, 4, 64): "dense",    # lm_head 1.76x
    ("cuda", 2048, 151936, 896, 4, 64): "dense",   # lm_head 3.31x
}


def m_bucket(m: int) -> int:
    """The measured M nearest to m on a log scale (prefill cost scales with M between them)."""
    return min(M_BUCKETS, key=lambda bucket: abs(math.log2(max(m, 1)) - math.log2(bucket)))


def switch() -> str | None:
    """FOUNDRY_QGEMM as the forced route ("mlx", "kernel" or "dense"), or None (use the table)."""
    value = os.environ.get(VARIABLE, "")
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
