"""The quantized GEMM's source: one tile algorithm (kernels/qgemm.py), two renditions.

The skeleton (tile walk, x staging, weight dequantization, pipeline, guarded epilogue) is written
once; each backend supplies only the tile multiply and how a fragment's elements map to the output:

| part                 | CUDA (`mx.fast.cuda_kernel`)                   | Metal (`mx.fast.metal_kernel`)           |
|----------------------|------------------------------------------------|------------------------------------------|
| x tile → shared      | `cp.async` (16 bytes, zero-fill past M)        | plain copy, converted to float           |
| stages               | 2 (next tile lands while this one multiplies)  | 1 (no asynchronous copy)                 |
| tile element         | T (what the tensor cores read)                 | float (simdgroup_float8x8 throughout)    |
| fragments            | `ldmatrix` + `mma.sync.m16n8k16`, fp32 accum   | `simdgroup_load` + `multiply_accumulate` |

Metal tiles hold float because MSL's `simdgroup_multiply_accumulate` takes one element type for all
operands and a half accumulator would lose the fp32 accumulation the CUDA rendition keeps.
"""

from __future__ import annotations

from .qgemm_primitives import HEADER as _HEADER
from .source import KernelSource

BK = 32  # K per tile: one 32-value chunk of a weight row = BITS whole uint32 words
# CUDA: at most 256 threads (the 128x128 tile's 8 warps), two blocks per SM: registers capped at 128
# (no spills, sm_90a), so two 128x128 tiles share an SM; uncapped, NVRTC's 156 fit one.
LAUNCH_BOUNDS = (256, 2)
MAX_REGISTERS = 65536 // (LAUNCH_BOUNDS[0] * LAUNCH_BOUNDS[1])

# Accumulators, the multiply of one staged tile, and where each accumulator element lands.
_ACCUMULATORS = {
    "cuda": """
  constexpr int MT = WM / 16, NT = WN / 8;               // m16n8 fragments per warp
  float acc[MT][NT][4];
  UNROLL for (int i = 0; i < MT; ++i) UNROLL for (int j = 0; j < NT; ++j) UNROLL for (int e = 0; e < 4; ++e)
    acc[i][j][e] = 0.0f;""",
    "metal": """
  constexpr int MT = WM / 8, NT = WN / 8;                // 8x8 fragments per SIMD-group
  simdgroup_float8x8 acc[MT][NT];
  UNROLL for (int i = 0; i < MT; ++i) UNROLL for (int j = 0; j < NT; ++j)
    acc[i][j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);""",
}

_MULTIPLY = {
    # ldmatrix.x4 on x: lanes 0-15 address rows 0-15 at k, lanes 16-31 the same rows at k+8 (the A
    # fragment's four 8x8 quarters). On the weight tile ([n][k], i.e. B column-major): lanes 0-7 rows
    # n 0-7 at k, 8-15 the same at k+8, 16-31 rows n 8-15: two n8 fragments per load.
    "cuda": """
      UNROLL for (int kk = 0; kk < BK; kk += 16) {
        unsigned a[MT][4], b[NT][2];
        UNROLL for (int i = 0; i < MT; ++i)
          foundry_ldmatrix_x4(a[i], xs + (warp_m * WM + i * 16 + (int)(lane % 16)) * LD + kk + (int)(lane / 16) * 8);
        UNROLL for (int j = 0; j < NT; j += 2) {
          unsigned r[4];
          foundry_ldmatrix_x4(r, ws + (warp_n * WN + j * 8 + (int)(lane % 8) + (int)(lane / 16) * 8) * LD + kk
                                    + (int)((lane / 8) % 2) * 8);
          b[j][0] = r[0]; b[j][1] = r[1]; b[j + 1][0] = r[2]; b[j + 1][1] = r[3];
        }
        UNROLL for (int i = 0; i < MT; ++i) UNROLL for (int j = 0; j < NT; ++j) foundry_mma<T>(acc[i][j], a[i], b[j]);
      }""",
    # The weight tile is [n][k]; loading it transposed gives B(k, n).
    "metal": """
      UNROLL for (int kk = 0; kk < BK; kk += 8) {
        simdgroup_float8x8 a[MT], b[NT];
        UNROLL for (int i = 0; i < MT; ++i) simdgroup_load(a[i], xs, LD, ulong2(kk, warp_m * WM + i * 8));
        UNROLL for (int j = 0; j < NT; ++j) simdgroup_load(b[j], ws, LD, ulong2(kk, warp_n * WN + j * 8), true);
        UNROLL for (int i = 0; i < MT; ++i) UNROLL for (int j = 0; j < NT; ++j)
          simdgroup_multiply_accumulate(acc[i][j], a[i], b[j], acc[i][j]);
      }""",
}

# mma.sync's C fragment: lane holds (lane/4, 2*(lane%4) + {0,1}) and the same 8 rows down.
# simdgroup_matrix: the coordinates MLX's steel kernels use (mma.h get_coord).
_STORE = {
    "cuda": """
  UNROLL for (int i = 0; i < MT; ++i) UNROLL for (int j = 0; j < NT; ++j) UNROLL for (int e = 0; e < 4; ++e) {
    const int row = row0 + warp_m * WM + i * 16 + (int)(lane / 4) + (e / 2) * 8;
    const int col = col0 + warp_n * WN + j * 8 + (int)(lane % 4) * 2 + e % 2;
    FINISH(row, col, acc[i][j][e]);
  }""",
    "metal": """
  const int quad = (int)lane / 4;
  const int frag_row = (quad & 4) + ((int)lane / 2) % 4;
  const int frag_col = (quad & 2) * 2 + ((int)lane % 2) * 2;
  UNROLL for (int i = 0; i < MT; ++i) UNROLL for (int j = 0; j < NT; ++j) UNROLL for (int e = 0; e < 2; ++e) {
    const int row = row0 + warp_m * WM + i * 8 + frag_row;
    const int col = col0 + warp_n * WN + j * 8 + frag_col + e;
    FINISH(row, col, acc[i][j].thread_elements()[e]);
  }""",
}


def _finish(bias: bool, residual: bool, split: bool = False) -> str:
    """The epilogue of one output element, rounded to T where the reference path rounds; with
    split-K, the fp32 partial sum of this threadgroup's K range, in its own (M, N) slab of
    `partials`."""
    if split:
        lines = ["y[((long)split * m_rows + r_) * N + c_] = v_;"]
    else:
        lines = ["T value = static_cast<T>(v_);"]
        if bias:
            lines.append("value = static_cast<T>(static_cast<float>(value) + static_cast<float>(bias[c_]));")
        if residual:
            lines.append("value = static_cast<T>(static_cast<float>(residual[(long)r_ * N + c_]) "
                         "+ static_cast<float>(value));")
        lines.append("y[(long)r_ * N + c_] = value;")
    body = " ".join(lines)
    return f"#define FINISH(row_, col_, v_) do {{ const int r_ = (row_), c_ = (col_); if (r_ < m_rows && c_ < N) {{ {body} }} }} while (0)"


_SKELETON = """
  constexpr int BK = {bk};
  constexpr int LD = BK + PAD;                             // padded rows: conflict-free fragment loads
  constexpr int THREADS = WARPS_M * WARPS_N * 32;
  constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;      // each warp's share of the output tile
  // M, N and K are read from the shapes, not baked in: one compiled kernel per (T, bits, group,
  // tile) serves every matrix of a model and every prompt length.
  const int K = x_shape[x_ndim - 1];
  int m_rows = 1;                                          // x's leading axes, flattened
  for (int d = 0; d + 1 < x_ndim; ++d) m_rows *= x_shape[d];
  const int N = w_shape[0];
  const int WORDS_PER_ROW = K * BITS / 32;
  const int GROUPS_PER_ROW = K / GROUP;
  constexpr unsigned int MASK = (1u << BITS) - 1u;
  static_assert(BN <= THREADS, "every weight row of a tile needs a thread to dequantize it");
  const int m_tiles = (m_rows + BM - 1) / BM;
  const int mn_tiles = m_tiles * ((N + BN - 1) / BN);
  // Split-K (SPLIT_K > 1, for grids too small to fill the GPU): threadgroup `split` walks only the
  // split-th K range and writes its fp32 partial sums; reduce_source's launch adds them up.
  const int split = (int)group_id / mn_tiles;
  const int K_TILES = K / BK / SPLIT_K;                    // this threadgroup's K tiles
  const int KT0 = split * K_TILES;                         // its first one
  // M fastest: threadgroups that run together share a weight tile (x, the smaller operand, stays cached).
  const int tile_m = (int)group_id % mn_tiles % m_tiles;
  const int tile_n = (int)group_id % mn_tiles / m_tiles;
  const int row0 = tile_m * BM, col0 = tile_n * BN;
  SHARED TILE_T x_tile[STAGES * BM * LD];
  SHARED TILE_T w_tile[STAGES * BN * LD];
  const int warp_m = (int)warp / WARPS_N, warp_n = (int)warp % WARPS_N;

  // Each weight row of a tile is dequantized by SPLIT threads, VALS values each: two where there
  // are threads enough and half a 32-value chunk is whole words (4, 6, 8 bits), else one (5 bits).
  // Per thread: its words, one scale, one bias (a 32-wide K tile never straddles a group: groups
  // are 32, 64 or 128 and tiles start at k % 32 == 0).
  constexpr int SPLIT = (THREADS >= 2 * BN && (16 * BITS) % 32 == 0) ? 2 : 1;
  constexpr int VALS = BK / SPLIT;
  constexpr int WORDS = VALS * BITS / 32;
  const int w_local = (int)thread_id / SPLIT;
  const int w_part = (int)thread_id % SPLIT;
  const bool w_owner = w_local < BN;
  const bool w_valid = w_owner && col0 + w_local < N;
  const long w_row = w_valid ? col0 + w_local : 0;
  unsigned int words[WORDS + 1];
  float w_scale = 0.0f, w_bias = 0.0f;
{accumulators}

#define LOAD_X(stage_, kt_) \\
  for (int c = (int)thread_id; c < BM * (BK / 8); c += THREADS) {{ \\
    const int r = c / (BK / 8), part = c % (BK / 8); \\
    const bool ok = row0 + r < m_rows; \\
    COPY_X8(x_tile + (stage_) * BM * LD + r * LD + part * 8, \\
            x + (long)(ok ? row0 + r : 0) * K + (KT0 + (kt_)) * BK + part * 8, ok); \\
  }}
#define FETCH_W(kt_) \\
  if (w_owner) {{ \\
    LOAD_WORDS(WORDS, w + w_row * WORDS_PER_ROW + (long)(KT0 + (kt_)) * BITS + w_part * WORDS, words); \\
    const long g = w_row * GROUPS_PER_ROW + (KT0 + (kt_)) * BK / GROUP; \\
    w_scale = static_cast<float>(scales[g]); \\
    w_bias = static_cast<float>(biases[g]); \\
  }}
  // Values are rounded to T as mx.dequantize's are, so the tile multiply sees the reference's weights.
#define STORE_W(stage_) \\
  if (w_owner) {{ \\
    TILE_SPACE TILE_T* w_target = w_tile + (stage_) * BN * LD + w_local * LD + w_part * VALS; \\
    if (!FAST_DEQUANT(T, BITS, VALS, w_target, words, w_scale, w_bias, w_valid)) {{ \\
      words[WORDS] = 0u; \\
      float values[VALS]; \\
      UNROLL for (int i = 0; i < VALS; ++i) {{ \\
        const int bit = i * BITS, shift = bit & 31; \\
        unsigned int q = words[bit >> 5] >> shift; \\
        if (shift + BITS > 32) q |= words[(bit >> 5) + 1] << (32 - shift); \\
        values[i] = w_valid ? w_scale * Q_TO_FLOAT(q & MASK) + w_bias : 0.0f; \\
      }} \\
      STORE_VALUES(T, VALS, w_target, values); \\
    }} \\
  }}
{finish}

  LOAD_X(0, 0)
  FETCH_W(0)
  STORE_W(0)
  for (int kt = 0; kt < K_TILES; ++kt) {{
    const int stage = STAGES == 2 ? (kt & 1) : 0;
    const bool more = kt + 1 < K_TILES;
    WAIT_COPIES();
    BARRIER();                                             // tile kt staged; tile kt-1 no longer read
    if (STAGES == 2 && more) {{
      LOAD_X(stage ^ 1, kt + 1)
      FETCH_W(kt + 1)
    }}
    {{
      const TILE_SPACE TILE_T* xs = x_tile + stage * BM * LD;
      const TILE_SPACE TILE_T* ws = w_tile + stage * BN * LD;
{multiply}
    }}
    if (more) {{
      if (STAGES == 1) {{
        BARRIER();
        LOAD_X(0, kt + 1)
        FETCH_W(kt + 1)
      }}
      STORE_W(STAGES == 2 ? stage ^ 1 : 0)
    }}
  }}
{store}
#undef LOAD_X
#undef FETCH_W
#undef STORE_W
#undef FINISH
"""


_REDUCE = """
  const int S = partials_shape[0];
  const int m_rows = partials_shape[1];
  const int N = partials_shape[2];
  const long i = (long)group_id * THREADS + (long)thread_id;
{finish}
  if (i < (long)m_rows * N) {{
    float v = 0.0f;
    for (int s = 0; s < S; ++s) v += partials[(long)s * m_rows * N + i];   // in K order, as one range would
    FINISH((int)(i / N), (int)(i % N), v);
  }}
#undef FINISH
"""


# The gate/up product's split-K sum with the activation: thread i takes gate column c and up column
# c + N/2 of row r (the fused matrix is [gate; up]).
_REDUCE_SWIGLU = """
  const int S = partials_shape[0];
  const int m_rows = partials_shape[1];
  const int N = partials_shape[2];
  const int HALF_N = N / 2;
  const long i = (long)group_id * THREADS + (long)thread_id;
  if (i < (long)m_rows * HALF_N) {
    const long at = i / HALF_N * N + i % HALF_N;
    float g = 0.0f, u = 0.0f;
    for (int s = 0; s < S; ++s) {                          // in K order, as one range would
      g += partials[(long)s * m_rows * N + at];
      u += partials[(long)s * m_rows * N + at + HALF_N];
    }
    const float gate = static_cast<float>(static_cast<T>(g)), up = static_cast<float>(static_cast<T>(u));
    const float sigmoid = static_cast<float>(static_cast<T>(1.0f / (1.0f + PRECISE_EXP(-gate))));
    y[i] = static_cast<T>(static_cast<float>(static_cast<T>(sigmoid * gate)) * up);
  }
"""


def reduce_source(bias: bool = False, residual: bool = False, swiglu: bool = False) -> KernelSource:
    """Split-K's second launch: y = T(the S fp32 partial slabs summed) (+ bias) (+ residual), rounded
    where the unsplit epilogue rounds (template: T, THREADS; partials (S, M, N)). One launch in place
    of MLX's sum, cast and adds (four graph nodes, each a pass over memory). `swiglu` (no bias or
    residual): the product is [gate | up] and y (M, N/2) = silu(gate) * up, rounded to T after each
    step as the MLX ops it replaces (a split and a compiled element-wise node) round."""
    if swiglu:
        if bias or residual:
            raise ValueError("the SwiGLU sum takes no bias or residual")
        return KernelSource("foundry_qgemm_reduce_swiglu", ("partials",), ("y",), _REDUCE_SWIGLU)
    epilogue = (("bias",) if bias else ()) + (("residual",) if residual else ())
    name = "foundry_qgemm_reduce" + ("_bias" if bias else "") + ("_residual" if residual else "")
    return KernelSource(name, ("partials",) + epilogue, ("y",), _REDUCE.format(finish=_finish(bias, residual)))


def kernel_name(bias: bool, residual: bool, split: bool = False) -> str:
    if split:
        return "foundry_qgemm_split"
    return "foundry_qgemm" + ("_bias" if bias else "") + ("_residual" if residual else "")


def input_names(bias: bool, residual: bool, split: bool = False) -> tuple[str, ...]:
    epilogue = () if split else (("bias",) if bias else ()) + (("residual",) if residual else ())
    return ("x", "w", "scales", "biases") + epilogue


def kernel_source(backend: str, bias: bool = False, residual: bool = False, split: bool = False) -> KernelSource:
    """The GEMM for `backend` (template: T, BITS, GROUP, BM, BN, WARPS_M, WARPS_N, and SPLIT_K for the
    split variant; M (x's leading axes), N and K from the shapes). `split`: y is (SPLIT_K, M, N) fp32
    partial sums, with no epilogue (`reduce_source` sums them and adds bias and residual)."""
    body = _SKELETON.format(bk=BK, accumulators=_ACCUMULATORS[backend], multiply=_MULTIPLY[backend],
                            store=_STORE[backend], finish=_finish(bias, residual, split))
    if not split:
        body = "  constexpr int SPLIT_K = 1;\n" + body
    return KernelSource(kernel_name(bias, residual, split), input_names(bias, residual, split), ("y",), body,
                        _HEADER[backend], launch_bounds=LAUNCH_BOUNDS)
