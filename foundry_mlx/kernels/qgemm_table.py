"""Where prefill runs our quantized GEMM instead of MLX's `quantized_matmul`: measured, per shape.

A kernel that wins at one shape can lose at another (few tiles on a narrow N, small M), so the
engine uses it only where a measurement says it wins: `MEASURED` maps (backend, M bucket, N, K,
bits, group size) to True. It is filled from benchmarks/qgemm_bench.py's output (which prints the
entries it measured as wins) with the machine and date beside them. No entry means MLX.

`FOUNDRY_QGEMM=1` forces the kernel wherever it can run, `FOUNDRY_QGEMM=0` forces MLX; both are for
benchmarking and tests.
"""

from __future__ import annotations

import math
import os

from ..errors import FoundryError

M_BUCKETS = (16, 128, 512, 2048)  # the M values the benchmark measures
MIN_ROWS = 8  # below this a product is decode-like: never routed without the switch

# (backend, M bucket, N, K, bits, group size) → True where the kernel measured faster than MLX.
MEASURED: dict[tuple[str, int, int, int, int, int], bool] = {}


def m_bucket(m: int) -> int:
    """The measured M nearest to m on a log scale (prefill cost scales with M between them)."""
    return min(M_BUCKETS, key=lambda bucket: abs(math.log2(max(m, 1)) - math.log2(bucket)))


def switch() -> bool | None:
    """FOUNDRY_QGEMM as True (force on), False (force off) or None (use the table)."""
    value = os.environ.get("FOUNDRY_QGEMM", "")
    if value in ("", "auto"):
        return None
    if value in ("0", "1"):
        return value == "1"
    raise FoundryError(f"FOUNDRY_QGEMM={value!r} is not 0, 1 or auto; unset it to use the measured table.")


def use_kernel(backend: str, m: int, n: int, k: int, bits: int, group_size: int,
               table: dict | None = None) -> bool:
    """Whether an (m, n, k) product with these weights should run through the kernel."""
    forced = switch()
    if forced is not None:
        return forced and m >= 2
    if m < MIN_ROWS:
        return False
    table = MEASURED if table is None else table
    return bool(table.get((backend, m_bucket(m), n, k, bits, group_size), False))
