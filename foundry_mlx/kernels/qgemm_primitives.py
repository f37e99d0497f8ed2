"""The quantized GEMM's per-backend primitives (kernels/qgemm_source.py writes the algorithm once
on top of them): how x reaches shared memory, the fragment loads and the tile multiply's
instruction, how dequantized values are packed and stored, and each backend's constants.

| primitive           | CUDA                                                  | Metal                         |
|---------------------|-------------------------------------------------------|-------------------------------|
| COPY_X8             | `cp.async` 16 bytes, zero-fill past M                 | plain copy, converted to float|
| fragment helpers    | `ldmatrix.x4`, `mma.sync.m16n8k16` (fp32 accumulate)  | none (MSL's simdgroup calls)  |
| STORE_VALUES        | floats rounded to T, 16-byte stores                   | floats rounded to T, as float |
| FAST_DEQUANT        | 4/8-bit q into T pairs without float conversion       | false (the float path)        |
"""

from __future__ import annotations

from .qgemv import LOAD_WORDS_CUDA

# The tensor cores' m16n8k16 multiply (fp32 accumulate) for both half types, and two floats rounded
# into a T pair: shared with the prefill attention (kernels/sdpa_prefill.py).
MMA_CUDA = """template <typename T> __device__ void foundry_mma(float* c, const unsigned* a, const unsigned* b);
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
"""
PACK2_CUDA = """template <typename T> __device__ unsigned int foundry_pack2(float a, float b);
template <> __device__ __forceinline__ unsigned int foundry_pack2<__half>(float a, float b) {
  const __half2 pair = __floats2half2_rn(a, b);
  return *reinterpret_cast<const unsigned int*>(&pair);
}
template <> __device__ __forceinline__ unsigned int foundry_pack2<__nv_bfloat16>(float a, float b) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const unsigned int*>(&pair);
}
"""

HEADER = {
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
""" + MMA_CUDA + LOAD_WORDS_CUDA + PACK2_CUDA + """// V values rounded to T, stored 8 at a time (16-byte stores: rows of LD = 40 are conflict-free).
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
// The pair type and BASE's bits per T (FOUR / EIGHT: whether 4- and 8-bit q stay exact at BASE + q).
template <typename T> struct foundry_pairs { static constexpr bool FOUR = false, EIGHT = false; };
template <> struct foundry_pairs<__half> {
  using T2 = __half2;
  static constexpr bool FOUR = true, EIGHT = true;        // q + 1024 is exact for q < 1024
  static constexpr unsigned int BASE = 0x64006400u;       // half2(1024, 1024)
};
template <> struct foundry_pairs<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr bool FOUR = true, EIGHT = false;       // q + 128 is exact for q < 128 only
  static constexpr unsigned int BASE = 0x43004300u;       // bfloat162(128, 128)
};
// (BASE + q0, BASE + q1) as a T pair → scale * q + bias for both, rounded once.
template <typename T>
__device__ __forceinline__ unsigned int foundry_affine(unsigned int q, unsigned int s, unsigned int b) {
  using T2 = typename foundry_pairs<T>::T2;
  const unsigned int base = foundry_pairs<T>::BASE;
  const T2 v = __hfma2(__hsub2(*reinterpret_cast<const T2*>(&q), *reinterpret_cast<const T2*>(&base)),
                       *reinterpret_cast<const T2*>(&s), *reinterpret_cast<const T2*>(&b));
  return *reinterpret_cast<const unsigned int*>(&v);
}
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
          pairs[4 * i + j] = foundry_affine<T>((__byte_perm(even, odd, j * 0x1111 + 0x4400) & 0x00FF00FFu) | P::BASE, s, b);
      }
    } else {
      // bytes (q0, BASE's high byte, q1, BASE's high byte): selectors 0 5 1 7 and 2 5 3 7
      UNROLL for (int i = 0; i < VALS / 4; ++i) {
        pairs[2 * i] = foundry_affine<T>(__byte_perm(words[i], P::BASE, 0x7150), s, b);
        pairs[2 * i + 1] = foundry_affine<T>(__byte_perm(words[i], P::BASE, 0x7352), s, b);
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
