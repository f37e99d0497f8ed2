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

from .qgemv import LOAD_WORDS_CUDA
from .source import KernelSource

BK = 32  # K per tile: one 32-value chunk of a weight row = BITS whole uint32 words
# CUDA: at most 256 threads (the 128x128 tile's 8 warps), two blocks per SM: registers capped at 128
# (no spills, sm_90a), so two 128x128 tiles share an SM; uncapped, NVRTC's 156 fit one.
LAUNCH_BOUNDS = (256, 2)
MAX_REGISTERS = 65536 // (LAUNCH_BOUNDS[0] * LAUNCH_BOUNDS[1])

_HEADER = {
    "cuda": """
#define TILE_T T
#define TILE_SPACE
#define STAGES 2
#define PAD 8
#define UNROLL _Pragma("unroll")
#define WAIT_COPIES() asm volatile("cp.async.wait_all;\\n" ::: "memory")
// q < 2^23 as a float without I2F (a quarter-rate conversion that would rival the tensor cores' time
// per tile): its bits under the exponent of 2^23, minus 2^23. Exact.
#define Q_TO_FLOAT(q) (__uint_as_float(0x4B000000u | (q)) - 8388608.0f)
// 16 bytes global → shared without passing through registers; src-size 0 writes zeros (rows past M).
__device__ __forceinline__ void foundry_copy8(void* target, const void* source, bool valid) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(target));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\\n" :: "r"(address), "l"(source),
               "r"(valid ? 16 : 0) : "memory");
}
#define COPY_X8(target, source, valid) foundry_copy8(target, source, valid)
__device__ __forceinline__ void foundry_ldmatrix_x4(unsigned* r, const void* pointer) {
  const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(pointer));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address));
}
template <typename T> __device__ void foundry_mma(float* c, const unsigned* a, const unsigned* b);
template <> __device__ __forceinline__ void foundry_mma<__half>(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void foundry_mma<__nv_bfloat16>(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
""" + LOAD_WORDS_CUDA + """template <typename T> __device__ unsigned int foundry_pack2(float a, float b);
template <> __device__ __forceinline__ unsigned int foundry_pack2<__half>(float a, float b) {
  const __half2 pair = __floats2half2_rn(a, b);
  return *reinterpret_cast<const unsigned int*>(&pair);
}
template <> __device__ __forceinline__ unsigned int foundry_pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const unsigned int*>(&pair);
}
// V values rounded to T, stored 8 at a time (16-byte stores: rows of LD = 40 are conflict-free).
template <typename T, int V>
__device__ __forceinline__ void foundry_store_values(T* target, const float* values) {
#pragma unroll
  for (int i = 0; i < V; i += 8) {
    uint4 packed;
    packed.x = foundry_pack2<T>(values[i], values[i + 1]);
    packed.y = foundry_pack2<T>(values[i + 2], values[i + 3]);
    packed.z = foundry_pack2<T>(values[i + 4], values[i + 5]);
    packed.w = foundry_pack2<T>(values[i + 6], values[i + 7]);
    *reinterpret_cast<uint4*>(target + i) = packed;
  }
}
#define STORE_VALUES(T, V, target, values) foundry_store_values<T, V>(target, values)
// Dequantization without float conversions where q fits under T's mantissa (4-bit into half or
// bfloat16, 8-bit into half): two q's OR-ed under the exponent of BASE make the T pair
// (BASE + q0, BASE + q1) (a byte permute and a mask per pair), then one exact packed subtract of
// BASE and one packed fused multiply-add: T(scale * q + bias), rounded once. About 2 instructions
// a value where the float path (shift, mask, convert, FMA, pack) takes ~5; Nsight Compute put the
// 7B gate/up's warps at 35% issue utilisation, mostly waiting on fixed-latency dependencies.
template <typename T> struct foundry_pairs { static constexpr bool FOUR = false, EIGHT = false; };
template <> struct foundry_pairs<__half> {
  static constexpr bool FOUR = true, EIGHT = true;        // q + 1024 is exact for q < 1024
  static constexpr unsigned int BASE = 0x64006400u;       // half2(1024, 1024)
  static __device__ __forceinline__ unsigned int affine(unsigned int q, unsigned int s, unsigned int b) {
    const unsigned int base = BASE;
    const __half2 v = __hfma2(__hsub2(*reinterpret_cast<const __half2*>(&q), *reinterpret_cast<const __half2*>(&base)),
                              *reinterpret_cast<const __half2*>(&s), *reinterpret_cast<const __half2*>(&b));
    return *reinterpret_cast<const unsigned int*>(&v);
  }
};
template <> struct foundry_pairs<__nv_bfloat16> {
  static constexpr bool FOUR = true, EIGHT = false;       // q + 128 is exact for q < 128 only
  static constexpr unsigned int BASE = 0x43004300u;       // bfloat162(128, 128)
  static __device__ __forceinline__ unsigned int affine(unsigned int q, unsigned int s, unsigned int b) {
    const unsigned int base = BASE;
    const __nv_bfloat162 v = __hfma2(
        __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&q), *reinterpret_cast<const __nv_bfloat162*>(&base)),
        *reinterpret_cast<const __nv_bfloat162*>(&s), *reinterpret_cast<const __nv_bfloat162*>(&b));
    return *reinterpret_cast<const unsigned int*>(&v);
  }
};
// VALS values of one weight row (its packed words) → target, if T and BITS have the fast path;
// false otherwise (the skeleton's float path runs instead).
template <typename T, int BITS, int VALS>
__device__ __forceinline__ bool foundry_fast_dequant(T* target, const unsigned int* words, float scale, float bias,
                                                     bool valid) {
  using P = foundry_pairs<T>;
  if constexpr ((BITS == 4 && P::FOUR) || (BITS == 8 && P::EIGHT)) {
    const unsigned int s = foundry_pack2<T>(valid ? scale : 0.0f, valid ? scale : 0.0f);
    const unsigned int b = foundry_pack2<T>(valid ? bias : 0.0f, valid ? bias : 0.0f);
    unsigned int pairs[VALS / 2];
    if constexpr (BITS == 4) {
      UNROLL for (int i = 0; i < VALS / 8; ++i) {
        const unsigned int even = words[i] & 0x0F0F0F0Fu;        // bytes q0 q2 q4 q6
        const unsigned int odd = (words[i] >> 4) & 0x0F0F0F0Fu;  // bytes q1 q3 q5 q7
        // pair j: bytes (q2j, q2j, q2j+1, q2j+1), the odd copies masked off, BASE's exponent OR-ed in
        UNROLL for (int j = 0; j < 4; ++j)
          pairs[4 * i + j] = P::affine((__byte_perm(even, odd, j * 0x1111 + 0x4400) & 0x00FF00FFu) | P::BASE, s, b);
      }
    } else {
      // bytes (q0, BASE's high byte, q1, BASE's high byte): selectors 0 5 1 7 and 2 5 3 7
      UNROLL for (int i = 0; i < VALS / 4; ++i) {
        pairs[2 * i] = P::affine(__byte_perm(words[i], P::BASE, 0x7150), s, b);
        pairs[2 * i + 1] = P::affine(__byte_perm(words[i], P::BASE, 0x7352), s, b);
      }
    }
    UNROLL for (int i = 0; i < VALS / 8; ++i)
      reinterpret_cast<uint4*>(target)[i] = make_uint4(pairs[4 * i], pairs[4 * i + 1], pairs[4 * i + 2], pairs[4 * i + 3]);
    return true;
  } else {
    return false;
  }
}
#define FAST_DEQUANT(T, BITS, VALS, target, words, scale, bias, valid) \\
  foundry_fast_dequant<T, BITS, VALS>(target, words, scale, bias, valid)
""",
    "metal": """
#define TILE_T float
#define TILE_SPACE threadgroup
#define STAGES 1
#define PAD 4
#define UNROLL _Pragma("clang loop unroll(full)")
#define WAIT_COPIES()
#define Q_TO_FLOAT(q) static_cast<float>(q)
template <typename T>
inline void foundry_copy8(threadgroup float* target, const device T* source, bool valid) {
  for (int i = 0; i < 8; ++i) target[i] = valid ? static_cast<float>(source[i]) : 0.0f;
}
#define COPY_X8(target, source, valid) foundry_copy8(target, source, valid)
template <int W>
inline void foundry_load_words(const device uint32_t* source, thread unsigned int* target) {
  for (int i = 0; i < W; ++i) target[i] = source[i];
}
#define LOAD_WORDS(W, source, target) foundry_load_words<W>(source, target)
template <typename T, int V>
inline void foundry_store_values(threadgroup float* target, thread const float* values) {
  for (int i = 0; i < V; ++i) target[i] = static_cast<float>(static_cast<T>(values[i]));
}
#define STORE_VALUES(T, V, target, values) foundry_store_values<T, V>(target, values)
#define FAST_DEQUANT(T, BITS, VALS, target, words, scale, bias, valid) false
""",
}

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
    split-K, the fp32 partial sum of this threadgroup's K range, in its own (M, N) slab of y."""
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


def reduce_source(bias: bool = False, residual: bool = False) -> KernelSource:
    """Split-K's second launch: y = T(the S fp32 partial slabs summed) (+ bias) (+ residual), rounded
    where the unsplit epilogue rounds (template: T, THREADS; partials (S, M, N)). One launch in place
    of MLX's sum, cast and adds (four graph nodes, each a pass over memory)."""
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
