// Metal Shading Language as C++ (clang++ -std=c++20): stands in for the prefix
// MLX puts before every custom kernel (metal::utils(): <metal_stdlib>,
// `using namespace metal;`, bfloat16_t, float16_t, ...).
//
// Only real MSL names are declared, so a misspelt builtin fails to compile as
// it would on a Mac. No standard-library header is included for the same
// reason: math goes through compiler builtins.
//
// Deliberate differences from Metal (see the package docstring):
// * half is clang's storage-only __fp16: arithmetic on half values is done in
//   float and rounded to half when stored, so a half expression may keep more
//   precision than the GPU (about one half ulp per operation).
// * bfloat16_t is a struct (as MLX's own bf16.h was before Metal 3.1); a
//   conditional `c ? bf : 0` is ambiguous, write `c ? bf : bfloat16_t(0)`.
// * no bool/bfloat vector types, no textures, no quad_*; simdgroup_matrix
//   is 8x8 only.
#pragma once

#include "sim_abi.h"

// Address spaces: pointers are plain pointers on the CPU. `threadgroup`
// declarations inside kernels are rewritten into shared per-threadgroup
// storage before compilation (see rewrite.py); elsewhere the word vanishes.
#define device
#define constant
#define thread
#define threadgroup
#define kernel
#define METAL_FUNC inline __attribute__((always_inline))
// MLX 0.32 needs macOS 14, i.e. Metal 3.1 (native bfloat).
#define __METAL_VERSION__ 310
#define MLX_MTL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")

namespace metal {

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef __fp16 half;

template <class T, int N>
using vec = T __attribute__((ext_vector_type(N)));

#define METAL_SIM_VECTORS(scalar, name) \
  typedef vec<scalar, 2> name##2;       \
  typedef vec<scalar, 3> name##3;       \
  typedef vec<scalar, 4> name##4;
METAL_SIM_VECTORS(float, float)
METAL_SIM_VECTORS(half, half)
METAL_SIM_VECTORS(int, int)
METAL_SIM_VECTORS(uint, uint)
METAL_SIM_VECTORS(short, short)
METAL_SIM_VECTORS(ushort, ushort)
METAL_SIM_VECTORS(char, char)
METAL_SIM_VECTORS(uchar, uchar)
METAL_SIM_VECTORS(long, long)
METAL_SIM_VECTORS(ulong, ulong)
#undef METAL_SIM_VECTORS

// ---------------------------------------------------------------- traits --
template <class T, class U>
struct is_same {
  static constexpr bool value = false;
};
template <class T>
struct is_same<T, T> {
  static constexpr bool value = true;
};
template <class T, class U>
constexpr bool is_same_v = is_same<T, U>::value;

template <bool B, class T = void>
struct enable_if {};
template <class T>
struct enable_if<true, T> {
  typedef T type;
};
template <bool B, class T = void>
using enable_if_t = typename enable_if<B, T>::type;

template <bool B, class T, class F>
struct conditional {
  typedef T type;
};
template <class T, class F>
struct conditional<false, T, F> {
  typedef F type;
};
template <bool B, class T, class F>
using conditional_t = typename conditional<B, T, F>::type;

template <class T>
struct remove_cv {
  typedef T type;
};
template <class T>
struct remove_cv<const T> {
  typedef T type;
};
template <class T>
struct remove_cv<volatile T> {
  typedef T type;
};
template <class T>
struct remove_cv<const volatile T> {
  typedef T type;
};
template <class T>
using remove_cv_t = typename remove_cv<T>::type;

struct bfloat;

template <class T>
constexpr bool is_floating_point_v = is_same_v<remove_cv_t<T>, float> ||
    is_same_v<remove_cv_t<T>, half> || is_same_v<remove_cv_t<T>, bfloat>;
template <class T>
constexpr bool is_integral_v = __is_integral(T);
template <class T>
constexpr bool is_arithmetic_v = is_integral_v<T> || is_floating_point_v<T>;
template <class T>
constexpr bool is_signed_v = is_floating_point_v<T> ||
    (is_integral_v<T> && T(-1) < T(0));
template <class T>
constexpr bool is_unsigned_v = is_integral_v<T> && !is_signed_v<T>;
template <class F, class T>
constexpr bool is_convertible_v = __is_convertible_to(F, T);
template <class T>
struct is_floating_point {
  static constexpr bool value = is_floating_point_v<T>;
};
template <class T>
struct is_integral {
  static constexpr bool value = is_integral_v<T>;
};
template <class T>
struct is_arithmetic {
  static constexpr bool value = is_arithmetic_v<T>;
};
template <class T>
struct is_signed {
  static constexpr bool value = is_signed_v<T>;
};
template <class T>
struct is_unsigned {
  static constexpr bool value = is_unsigned_v<T>;
};
template <class F, class T>
struct is_convertible {
  static constexpr bool value = is_convertible_v<F, T>;
};

// ------------------------------------------------------------------ bfloat --
constexpr uint16_t float_to_bfloat_bits(float x) {
  const uint32_t bits = __builtin_bit_cast(uint32_t, x);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) {
    return 0x7FC0; // NaN
  }
  return uint16_t((bits + ((bits >> 16) & 1) + 0x7FFFu) >> 16);
}

constexpr float bfloat_bits_to_float(uint16_t bits) {
  return __builtin_bit_cast(float, uint32_t(bits) << 16);
}

template <class T>
constexpr bool can_convert_to_bfloat =
    !is_same_v<T, bfloat> && is_convertible_v<T, float>;
template <class T>
constexpr bool can_convert_from_bfloat =
    !is_same_v<T, bfloat> && is_convertible_v<float, T>;

// Modelled on MLX's _MLX_BFloat16 (metal_3_0/bf16.h): round to nearest even.
struct bfloat {
  uint16_t bits_;
  bfloat() = default;
  struct from_bits_tag {};
  constexpr bfloat(uint16_t bits, from_bits_tag) : bits_(bits) {}
  template <class T, class = enable_if_t<can_convert_to_bfloat<T>>>
  constexpr bfloat(T x) : bits_(float_to_bfloat_bits(static_cast<float>(x))) {}
  template <class T, class = enable_if_t<can_convert_from_bfloat<T>>>
  constexpr operator T() const {
    return static_cast<T>(bfloat_bits_to_float(bits_));
  }
};

constexpr bfloat operator-(bfloat x) {
  return -static_cast<float>(x);
}

#define METAL_SIM_BF_BINARY(op, result, other, compute)            \
  constexpr result operator op(bfloat a, other b) {                \
    return static_cast<compute>(a) op static_cast<compute>(b);     \
  }                                                                \
  constexpr result operator op(other a, bfloat b) {                \
    return static_cast<compute>(a) op static_cast<compute>(b);     \
  }
#define METAL_SIM_BF_ARITHMETIC(op)                                \
  constexpr bfloat operator op(bfloat a, bfloat b) {               \
    return static_cast<float>(a) op static_cast<float>(b);         \
  }                                                                \
  METAL_SIM_BF_BINARY(op, float, float, float)                     \
  METAL_SIM_BF_BINARY(op, float, double, float)                    \
  METAL_SIM_BF_BINARY(op, float, half, float)                      \
  METAL_SIM_BF_BINARY(op, bfloat, int32_t, float)                  \
  METAL_SIM_BF_BINARY(op, bfloat, uint32_t, float)                 \
  METAL_SIM_BF_BINARY(op, bfloat, int64_t, float)                  \
  METAL_SIM_BF_BINARY(op, bfloat, uint64_t, float)
#define METAL_SIM_BF_COMPARE(op)                                   \
  constexpr bool operator op(bfloat a, bfloat b) {                 \
    return static_cast<float>(a) op static_cast<float>(b);         \
  }                                                                \
  METAL_SIM_BF_BINARY(op, bool, float, float)                      \
  METAL_SIM_BF_BINARY(op, bool, double, float)                     \
  METAL_SIM_BF_BINARY(op, bool, half, float)                       \
  METAL_SIM_BF_BINARY(op, bool, int32_t, float)                    \
  METAL_SIM_BF_BINARY(op, bool, uint32_t, float)                   \
  METAL_SIM_BF_BINARY(op, bool, int64_t, float)                    \
  METAL_SIM_BF_BINARY(op, bool, uint64_t, float)
METAL_SIM_BF_ARITHMETIC(+)
METAL_SIM_BF_ARITHMETIC(-)
METAL_SIM_BF_ARITHMETIC(*)
METAL_SIM_BF_ARITHMETIC(/)
METAL_SIM_BF_COMPARE(>)
METAL_SIM_BF_COMPARE(<)
METAL_SIM_BF_COMPARE(>=)
METAL_SIM_BF_COMPARE(<=)
METAL_SIM_BF_COMPARE(==)
METAL_SIM_BF_COMPARE(!=)

#define METAL_SIM_BF_INPLACE(op, other)                            \
  constexpr bfloat& operator op##=(bfloat& a, other b) {           \
    a = static_cast<float>(a) op static_cast<float>(b);            \
    return a;                                                      \
  }
#define METAL_SIM_BF_INPLACE_OTHER(op, other)                      \
  METAL_SIM_BF_INPLACE(op, other)                                  \
  constexpr other& operator op##=(other& a, bfloat b) {            \
    a = static_cast<float>(a) op static_cast<float>(b);            \
    return a;                                                      \
  }
#define METAL_SIM_BF_INPLACE_ALL(op)                               \
  METAL_SIM_BF_INPLACE(op, bfloat)                                 \
  METAL_SIM_BF_INPLACE_OTHER(op, float)                            \
  METAL_SIM_BF_INPLACE_OTHER(op, half)                             \
  METAL_SIM_BF_INPLACE_OTHER(op, int16_t)                          \
  METAL_SIM_BF_INPLACE_OTHER(op, int32_t)                          \
  METAL_SIM_BF_INPLACE_OTHER(op, int64_t)                          \
  METAL_SIM_BF_INPLACE_OTHER(op, uint16_t)                         \
  METAL_SIM_BF_INPLACE_OTHER(op, uint32_t)                         \
  METAL_SIM_BF_INPLACE_OTHER(op, uint64_t)
METAL_SIM_BF_INPLACE_ALL(+)
METAL_SIM_BF_INPLACE_ALL(-)
METAL_SIM_BF_INPLACE_ALL(*)
METAL_SIM_BF_INPLACE_ALL(/)
#undef METAL_SIM_BF_BINARY
#undef METAL_SIM_BF_ARITHMETIC
#undef METAL_SIM_BF_COMPARE
#undef METAL_SIM_BF_INPLACE
#undef METAL_SIM_BF_INPLACE_OTHER
#undef METAL_SIM_BF_INPLACE_ALL

// Literal suffix 1.5h (half). clang cannot lex a `bf` suffix: write bfloat(1.5).
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wuser-defined-literals"
constexpr half operator"" h(long double value) {
  return half(double(value));
}
constexpr half operator"" h(unsigned long long value) {
  return half(double(value));
}
#pragma clang diagnostic pop

// ---------------------------------------------------------------- as_type --
template <class T, class U>
constexpr T as_type(U value) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of equal size");
  return __builtin_bit_cast(T, value);
}

// --------------------------------------------------------- numeric_limits --
template <class T>
struct numeric_limits {
  static constexpr bool is_specialized = __is_integral(T);
  static constexpr T max() {
    return T(~0ull >> (64 - 8 * sizeof(T) + (T(-1) < T(0) ? 1 : 0)));
  }
  static constexpr T min() {
    return T(-1) < T(0) ? T(-max() - 1) : T(0);
  }
  static constexpr T lowest() {
    return min();
  }
};
template <>
struct numeric_limits<bool> {
  static constexpr bool is_specialized = true;
  static constexpr bool min() {
    return false;
  }
  static constexpr bool lowest() {
    return false;
  }
  static constexpr bool max() {
    return true;
  }
};
#define METAL_SIM_FLOAT_LIMITS(type, make, maximum, smallest, epsilon_value) \
  template <>                                                               \
  struct numeric_limits<type> {                                             \
    static constexpr bool is_specialized = true;                            \
    static constexpr bool has_infinity = true;                              \
    static constexpr bool has_quiet_NaN = true;                             \
    static constexpr type min() {                                           \
      return make(smallest);                                                \
    }                                                                       \
    static constexpr type max() {                                           \
      return make(maximum);                                                 \
    }                                                                       \
    static constexpr type lowest() {                                        \
      return make(-(maximum));                                              \
    }                                                                       \
    static constexpr type epsilon() {                                       \
      return make(epsilon_value);                                           \
    }                                                                       \
    static constexpr type infinity() {                                      \
      return make(__builtin_huge_valf());                                   \
    }                                                                       \
    static constexpr type quiet_NaN() {                                     \
      return make(__builtin_nanf(""));                                      \
    }                                                                       \
  };
#define METAL_SIM_AS(type) (type)
METAL_SIM_FLOAT_LIMITS(float, METAL_SIM_AS(float), 0x1.fffffep127f,
    0x1p-126f, 0x1p-23f)
METAL_SIM_FLOAT_LIMITS(half, METAL_SIM_AS(half), 65504.0f, 0x1p-14f,
    0x1p-10f)
METAL_SIM_FLOAT_LIMITS(bfloat, bfloat, 0x1.fep127f, 0x1p-126f, 0x1p-7f)
#undef METAL_SIM_AS
#undef METAL_SIM_FLOAT_LIMITS

} // namespace metal

typedef metal::bfloat bfloat16_t;
typedef metal::half float16_t;

namespace metal_sim_detail {

template <class T>
struct vector_info {
  static constexpr int size = 0; // scalar
  typedef T element;
};
template <class T, int N>
struct vector_info<T __attribute__((ext_vector_type(N)))> {
  static constexpr int size = N;
  typedef T element;
};

template <class T>
constexpr int vector_size = vector_info<metal::remove_cv_t<T>>::size;

template <class T, int N, class A>
constexpr void append(T* out, int& index, const A& arg) {
  if constexpr (vector_size<A> == 0) {
    out[index++] = T(arg);
  } else {
    for (int i = 0; i < vector_size<A>; ++i) {
      out[index++] = T(arg[i]);
    }
  }
}

// Metal vector constructors: float4(x) splats a scalar or converts a vector
// element by element; float4(a, b, ...) concatenates scalars and vectors.
template <class T, int N, class... A>
constexpr metal::vec<T, N> make_vector(const A&... args) {
  T out[N] = {};
  if constexpr (sizeof...(A) == 1 && ((vector_size<A> == 0) && ...)) {
    for (int i = 0; i < N; ++i) {
      out[i] = T(args...);
    }
  } else if constexpr (sizeof...(A) > 0) {
    constexpr int count = ((vector_size<A> == 0 ? 1 : vector_size<A>)+...);
    static_assert(count == N, "wrong number of components for vector");
    int index = 0;
    (append<T, N>(out, index, args), ...);
  }
  metal::vec<T, N> result;
  for (int i = 0; i < N; ++i) {
    result[i] = out[i];
  }
  return result;
}

} // namespace metal_sim_detail

// Function-like macros only expand when the name is followed by '(', so the
// type names stay usable in declarations.
#define float2(...) ::metal_sim_detail::make_vector<float, 2>(__VA_ARGS__)
#define float3(...) ::metal_sim_detail::make_vector<float, 3>(__VA_ARGS__)
#define float4(...) ::metal_sim_detail::make_vector<float, 4>(__VA_ARGS__)
#define half2(...) ::metal_sim_detail::make_vector<metal::half, 2>(__VA_ARGS__)
#define half3(...) ::metal_sim_detail::make_vector<metal::half, 3>(__VA_ARGS__)
#define half4(...) ::metal_sim_detail::make_vector<metal::half, 4>(__VA_ARGS__)
#define int2(...) ::metal_sim_detail::make_vector<int, 2>(__VA_ARGS__)
#define int3(...) ::metal_sim_detail::make_vector<int, 3>(__VA_ARGS__)
#define int4(...) ::metal_sim_detail::make_vector<int, 4>(__VA_ARGS__)
#define uint2(...) ::metal_sim_detail::make_vector<metal::uint, 2>(__VA_ARGS__)
#define uint3(...) ::metal_sim_detail::make_vector<metal::uint, 3>(__VA_ARGS__)
#define uint4(...) ::metal_sim_detail::make_vector<metal::uint, 4>(__VA_ARGS__)
#define short2(...) ::metal_sim_detail::make_vector<short, 2>(__VA_ARGS__)
#define short3(...) ::metal_sim_detail::make_vector<short, 3>(__VA_ARGS__)
#define short4(...) ::metal_sim_detail::make_vector<short, 4>(__VA_ARGS__)
#define ushort2(...) ::metal_sim_detail::make_vector<metal::ushort, 2>(__VA_ARGS__)
#define ushort3(...) ::metal_sim_detail::make_vector<metal::ushort, 3>(__VA_ARGS__)
#define ushort4(...) ::metal_sim_detail::make_vector<metal::ushort, 4>(__VA_ARGS__)
#define char2(...) ::metal_sim_detail::make_vector<char, 2>(__VA_ARGS__)
#define char3(...) ::metal_sim_detail::make_vector<char, 3>(__VA_ARGS__)
#define char4(...) ::metal_sim_detail::make_vector<char, 4>(__VA_ARGS__)
#define uchar2(...) ::metal_sim_detail::make_vector<metal::uchar, 2>(__VA_ARGS__)
#define uchar3(...) ::metal_sim_detail::make_vector<metal::uchar, 3>(__VA_ARGS__)
#define uchar4(...) ::metal_sim_detail::make_vector<metal::uchar, 4>(__VA_ARGS__)
#define long2(...) ::metal_sim_detail::make_vector<long, 2>(__VA_ARGS__)
#define long3(...) ::metal_sim_detail::make_vector<long, 3>(__VA_ARGS__)
#define long4(...) ::metal_sim_detail::make_vector<long, 4>(__VA_ARGS__)
#define ulong2(...) ::metal_sim_detail::make_vector<metal::ulong, 2>(__VA_ARGS__)
#define ulong3(...) ::metal_sim_detail::make_vector<metal::ulong, 3>(__VA_ARGS__)
#define ulong4(...) ::metal_sim_detail::make_vector<metal::ulong, 4>(__VA_ARGS__)

#include "msl_math.h"
#include "msl_simd.h"
#include "msl_simdgroup_matrix.h"

using namespace metal;
