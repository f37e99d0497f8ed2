"""Experimental: the prefill GEMM with its weights copied several tiles ahead (FOUNDRY_QGEMM_AHEAD).

Off by default and not yet run on a GPU. Why it exists: Nsight Compute on the H200 put the 7B's
gate/up product at M=128 (the largest share of a 128-token prefill) at ~31% issue utilisation,
its warps mostly waiting on global loads (long scoreboard) and fixed latencies
(benchmarks/results/h200-ncu-qgemm-37888x3584-m128-56fcebe.txt). In kernels/qgemm_source.py a
tile's packed weight words are loaded into registers one tile ahead and dequantized after the
multiply, so each 32-wide K step waits out about one DRAM round trip.

Here (CUDA) x's tile and the weight tile's packed words both travel by `cp.async` into rings of
AHEAD + 1 slots in shared memory, AHEAD tiles before they are multiplied; a tile is dequantized
from its ring slot into the double-buffered T tile one step ahead as before, and scales and biases
are still read one tile ahead into registers. Copy group g holds x's tile g and the words of tile
g + 1, so the top of step kt waits for group kt with `cp.async.wait_group AHEAD - 1`: one wait and
one barrier per step, as now. Shared memory outgrows the 48 KB of static arrays (7B tiles: 56 KB
at AHEAD=2, 68 KB at 3), so CUDA takes it as dynamic shared memory (`shared_bytes`).

The body is derived from qgemm_source's skeleton by `rewritten` (a change there fails loudly
here), so the tile walk, dequantization, multiply and epilogues stay the measured ones. Metal
keeps qgemm_source's single-stage path; its rendition of this schedule (copies synchronous, the
same slots, waits and barriers) runs in the CPU harness in tests/kernels/test_qgemm_ring.py.

    FOUNDRY_QGEMM_AHEAD=2 foundry-mlx bench ...   (2 or 3; unset or 1: the default kernel)
"""

from __future__ import annotations

import os

from ..errors import FoundryError
from . import qgemm_source
from .source import KernelSource, rewritten

SWITCH = "FOUNDRY_QGEMM_AHEAD"
CHOICES = (2, 3)

_HEADER = {
    "cuda": """
// W words (W = 1, 2 or 4; aligned to their size) global -> shared, asynchronously.
template <int W>
__device__ __forceinline__ void foundry_ring_copy(unsigned int* target, const unsigned int* source) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(target));
  if constexpr (W == 4) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\\n" :: "r"(address), "l"(source) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\\n" :: "r"(address), "l"(source), "n"(W * 4) : "memory");
  }
}
#define RING_COPY(W, target, source) foundry_ring_copy<W>(target, source)
#define COMMIT_COPIES() asm volatile("cp.async.commit_group;\\n" ::: "memory")
#define WAIT_AHEAD() asm volatile("cp.async.wait_group %0;\\n" :: "n"(AHEAD - 1) : "memory")
""",
    "metal": """
template <int W, typename Target, typename Source>
inline void foundry_ring_copy(Target target, Source source) {
  for (int i = 0; i < W; ++i) target[i] = source[i];
}
#define RING_COPY(W, target, source) foundry_ring_copy<W>(target, source)
#define COMMIT_COPIES()
#define WAIT_AHEAD()
template <int W, typename Source>
inline void foundry_ring_words(Source source, thread unsigned int* target) {
  for (int i = 0; i < W; ++i) target[i] = source[i];
}
""",
}

# Where the tiles live: one dynamic buffer on CUDA (its size is `shared_bytes`), static arrays on Metal.
_TILES = {
    "cuda": """  extern __shared__ __align__(16) unsigned char foundry_ring_shared[];
  TILE_T* x_tile = reinterpret_cast<TILE_T*>(foundry_ring_shared);
  TILE_T* w_tile = x_tile + SLOTS * BM * LD;
  unsigned int* w_raw = reinterpret_cast<unsigned int*>(w_tile + 2 * BN * LD);
""",
    "metal": """  threadgroup TILE_T x_tile[SLOTS * BM * LD];
  threadgroup TILE_T w_tile[2 * BN * LD];
  threadgroup unsigned int w_raw[SLOTS * BN * BITS];
""",
}

_RAW_WORDS = {"cuda": "LOAD_WORDS(WORDS, w_raw + ((slot_) * BN + w_local) * BITS + w_part * WORDS, words);",
              "metal": "foundry_ring_words<WORDS>(w_raw + ((slot_) * BN + w_local) * BITS + w_part * WORDS, words);"}

_LOOP = """  // Copy group g: x's tile g and the packed words of tile g + 1 (group 0 also tile 0's). Step kt
  // waits for group kt: x tile kt to multiply, the words of tile kt + 1 to dequantize.
  constexpr int CHUNK_WORDS = BITS % 4 == 0 ? 4 : (BITS % 2 == 0 ? 2 : 1);
  constexpr int RAW_CHUNKS = BITS / CHUNK_WORDS;        // copies per weight row of a tile
#define COPY_RAW(slot_, kt_) \\
  for (int c = (int)thread_id; c < BN * RAW_CHUNKS; c += THREADS) { \\
    const int r = c / RAW_CHUNKS, part = c % RAW_CHUNKS; \\
    if (col0 + r < N) \\
      RING_COPY(CHUNK_WORDS, w_raw + ((slot_) * BN + r) * BITS + part * CHUNK_WORDS, \\
                w + (long)(col0 + r) * WORDS_PER_ROW + (long)(KT0 + (kt_)) * BITS + part * CHUNK_WORDS); \\
  }
#define ISSUE(g_) \\
  if ((g_) < K_TILES) { LOAD_X((g_) % SLOTS, (g_)) } \\
  if ((g_) + 1 < K_TILES) { COPY_RAW(((g_) + 1) % SLOTS, (g_) + 1) } \\
  COMMIT_COPIES();
  COPY_RAW(0, 0)
  for (int g = 0; g < AHEAD; ++g) { ISSUE(g) }
  WAIT_AHEAD();
  BARRIER();
  FETCH_W(0)
  STORE_W(0, 0)
  for (int kt = 0; kt < K_TILES; ++kt) {
    const bool more = kt + 1 < K_TILES;
    WAIT_AHEAD();                                          // group kt landed (this thread's copies)
    BARRIER();                                             // everyone's; tile kt-1's slots no longer read
    ISSUE(kt + AHEAD)
    if (more) { FETCH_W(kt + 1) }
    {
      const TILE_SPACE TILE_T* xs = x_tile + (kt % SLOTS) * BM * LD;
      const TILE_SPACE TILE_T* ws = w_tile + (kt & 1) * BN * LD;
{multiply}
    }
    if (more) { STORE_W((kt + 1) & 1, (kt + 1) % SLOTS) }
  }
#undef COPY_RAW
#undef ISSUE
"""


def ahead() -> int:
    """FOUNDRY_QGEMM_AHEAD as tiles in flight (1: unset, the default kernel)."""
    value = os.environ.get(SWITCH, "").strip()
    if value in ("", "1"):
        return 1
    if value.isdigit() and int(value) in CHOICES:
        return int(value)
    raise FoundryError(f"{SWITCH}={value!r} is not 1, 2 or 3; unset it for the default prefill GEMM.")


def kernel_source(backend: str, bias: bool = False, residual: bool = False, split: bool = False) -> KernelSource:
    """qgemm_source.kernel_source's GEMM with the ring schedule (one more template constant: AHEAD)."""
    base = qgemm_source.kernel_source(backend, bias, residual, split)
    multiply = qgemm_source._MULTIPLY[backend]
    body = rewritten(base.body, (
        ("  SHARED TILE_T x_tile[STAGES * BM * LD];\n  SHARED TILE_T w_tile[STAGES * BN * LD];\n",
         "  constexpr int SLOTS = AHEAD + 1;                       // ring slots of x tiles and packed words\n"
         + _TILES[backend]),
        ("    LOAD_WORDS(WORDS, w + w_row * WORDS_PER_ROW + (long)(KT0 + (kt_)) * BITS + w_part * WORDS, words); \\\n",
         ""),
        ("#define STORE_W(stage_) \\\n  if (w_owner) { \\\n",
         "#define STORE_W(stage_, slot_) \\\n  if (w_owner) { \\\n    " + _RAW_WORDS[backend] + " \\\n"),
    ), once=True)
    start = body.index("  LOAD_X(0, 0)\n")
    end = body.index(qgemm_source._STORE[backend])
    body = body[:start] + _LOOP.replace("{multiply}", multiply) + body[end:]
    return KernelSource(base.name + "_ring", base.input_names, base.output_names, body,
                        base.header + _HEADER[backend], launch_bounds=base.launch_bounds)


def shared_bytes(tile_shape: tuple[int, int, int, int], bits: int, ahead_tiles: int, element_bytes: int) -> int:
    """Dynamic shared memory of one CUDA threadgroup: AHEAD + 1 x tiles, two weight tiles (rows of
    BK + 8 elements, CUDA's padding) and AHEAD + 1 slots of packed words."""
    block_m, block_n = tile_shape[:2]
    row = qgemm_source.BK + 8
    slots = ahead_tiles + 1
    return (slots * block_m + 2 * block_n) * row * element_bytes + slots * block_n * bits * 4
