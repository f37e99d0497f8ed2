// MSL math functions (metal_math, metal_common, metal_integer, metal_geometric)
// for msl_shim.h. Float work goes through clang builtins so no C library
// header brings non-MSL names into the kernel.
#pragma once

// metal_math's float constants (MSL spec, "Math Functions": MAXFLOAT, HUGE_VALF, INFINITY, NAN).
#define MAXFLOAT __FLT_MAX__
#define HUGE_VALF __builtin_huge_valf()
#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")

namespace metal_sim_detail {

using metal::enable_if_t;
using metal::is_same_v;

template <class T>
constexpr bool is_float_scalar = is_same_v<T, float> ||
    is_same_v<T, metal::half> || is_same_v<T, metal::bfloat> ||
    is_same_v<T, double>;
template <class T>
constexpr bool is_integer_scalar = __is_integral(T);
template <class T>
constexpr bool is_scalar = is_float_scalar<T> || is_integer_scalar<T>;
template <class T>
constexpr bool is_vector = vector_size<T> > 0;
template <class T>
using element_t = typename vector_info<T>::element;
template <class T>
constexpr bool is_float_type = is_float_scalar<element_t<T>>;

template <class T>
struct type_tag {
  typedef T type;
};
struct no_type {};

// Result type of a Metal function taking A and B: same types, or float for
// mixed float/half/bfloat scalars, or the vector when one side is a scalar.
// Mixed integer/float or mixed integer types have no result (ambiguous in
// Metal too).
template <class A, class B>
constexpr auto common_tag() {
  if constexpr (is_same_v<A, B>) {
    if constexpr (is_same_v<A, double>) {
      return type_tag<float>{};
    } else if constexpr (is_scalar<A> || is_vector<A>) {
      return type_tag<A>{};
    } else {
      return no_type{};
    }
  } else if constexpr (is_float_scalar<A> && is_float_scalar<B>) {
    return type_tag<float>{};
  } else if constexpr (is_vector<A> && is_scalar<B>) {
    return type_tag<A>{};
  } else if constexpr (is_scalar<A> && is_vector<B>) {
    return type_tag<B>{};
  } else {
    return no_type{};
  }
}
template <class A, class B>
using common_t = typename decltype(common_tag<A, B>())::type;
template <class A, class B, class C>
using common3_t = common_t<common_t<A, B>, C>;
template <class T>
using float_result_t = enable_if_t<is_float_type<T>, common_t<T, T>>;

template <class T>
constexpr auto component(const T& value, int index) {
  if constexpr (is_vector<T>) {
    return value[index];
  } else {
    (void)index;
    return value;
  }
}

// Applies `f` to each component (converted to R's element type) of the
// arguments; scalars are broadcast.
template <class R, class F, class... A>
constexpr R elementwise(F f, const A&... args) {
  typedef element_t<R> E;
  if constexpr (!is_vector<R>) {
    return R(f(E(args)...));
  } else {
    R result;
    for (int i = 0; i < vector_size<R>; ++i) {
      result[i] = E(f(E(component(args, i))...));
    }
    return result;
  }
}

} // namespace metal_sim_detail

namespace metal {

#define METAL_SIM_UNARY(name, expression)                                 \
  template <class T>                                                      \
  inline metal_sim_detail::float_result_t<T> name(T x) {                  \
    return metal_sim_detail::elementwise<                                 \
        metal_sim_detail::float_result_t<T>>(                             \
        [](auto value) {                                                  \
          const float v = float(value);                                   \
          return decltype(value)(expression);                             \
        },                                                                \
        x);                                                               \
  }
METAL_SIM_UNARY(exp, __builtin_expf(v))
METAL_SIM_UNARY(exp2, __builtin_exp2f(v))
METAL_SIM_UNARY(exp10, __builtin_powf(10.0f, v))
METAL_SIM_UNARY(log, __builtin_logf(v))
METAL_SIM_UNARY(log2, __builtin_log2f(v))
METAL_SIM_UNARY(log10, __builtin_log10f(v))
METAL_SIM_UNARY(sqrt, __builtin_sqrtf(v))
METAL_SIM_UNARY(rsqrt, 1.0f / __builtin_sqrtf(v))
METAL_SIM_UNARY(cbrt, __builtin_cbrtf(v))
METAL_SIM_UNARY(sin, __builtin_sinf(v))
METAL_SIM_UNARY(cos, __builtin_cosf(v))
METAL_SIM_UNARY(tan, __builtin_tanf(v))
METAL_SIM_UNARY(asin, __builtin_asinf(v))
METAL_SIM_UNARY(acos, __builtin_acosf(v))
METAL_SIM_UNARY(atan, __builtin_atanf(v))
METAL_SIM_UNARY(sinh, __builtin_sinhf(v))
METAL_SIM_UNARY(cosh, __builtin_coshf(v))
METAL_SIM_UNARY(tanh, __builtin_tanhf(v))
METAL_SIM_UNARY(asinh, __builtin_asinhf(v))
METAL_SIM_UNARY(acosh, __builtin_acoshf(v))
METAL_SIM_UNARY(atanh, __builtin_atanhf(v))
METAL_SIM_UNARY(floor, __builtin_floorf(v))
METAL_SIM_UNARY(ceil, __builtin_ceilf(v))
METAL_SIM_UNARY(round, __builtin_roundf(v))
METAL_SIM_UNARY(rint, __builtin_rintf(v))
METAL_SIM_UNARY(trunc, __builtin_truncf(v))
METAL_SIM_UNARY(fabs, __builtin_fabsf(v))
METAL_SIM_UNARY(
    fract, __builtin_fminf(v - __builtin_floorf(v), 0x1.fffffep-1f))
METAL_SIM_UNARY(saturate, __builtin_fminf(__builtin_fmaxf(v, 0.0f), 1.0f))
METAL_SIM_UNARY(sign, v > 0.0f ? 1.0f : (v < 0.0f ? -1.0f : v * 0.0f))
#undef METAL_SIM_UNARY

#define METAL_SIM_BINARY(name, expression)                                \
  template <class A, class B,                                             \
      class R = metal_sim_detail::common_t<A, B>,                         \
      class = enable_if_t<metal_sim_detail::is_float_type<R>>>            \
  inline R name(A a, B b) {                                               \
    return metal_sim_detail::elementwise<R>(                              \
        [](auto first, auto second) {                                     \
          const float x = float(first);                                   \
          const float y = float(second);                                  \
          return decltype(first)(expression);                             \
        },                                                                \
        a, b);                                                            \
  }
METAL_SIM_BINARY(pow, __builtin_powf(x, y))
METAL_SIM_BINARY(powr, __builtin_powf(x, y))
METAL_SIM_BINARY(fmod, __builtin_fmodf(x, y))
METAL_SIM_BINARY(atan2, __builtin_atan2f(x, y))
METAL_SIM_BINARY(copysign, __builtin_copysignf(x, y))
METAL_SIM_BINARY(fmax, __builtin_fmaxf(x, y))
METAL_SIM_BINARY(fmin, __builtin_fminf(x, y))
METAL_SIM_BINARY(fdim, __builtin_fdimf(x, y))
METAL_SIM_BINARY(step, y < x ? 0.0f : 1.0f)
METAL_SIM_BINARY(divide, x / y)
#undef METAL_SIM_BINARY

template <class T, class = enable_if_t<metal_sim_detail::is_scalar<
                       metal_sim_detail::element_t<T>>>>
inline T abs(T x) {
  return metal_sim_detail::elementwise<T>(
      [](auto value) {
        typedef decltype(value) E;
        if constexpr (metal_sim_detail::is_float_scalar<E>) {
          return E(__builtin_fabsf(float(value)));
        } else {
          return E(value < E(0) ? E(-value) : value);
        }
      },
      x);
}

template <class A, class B, class R = metal_sim_detail::common_t<A, B>>
inline R max(A a, B b) {
  return metal_sim_detail::elementwise<R>(
      [](auto x, auto y) {
        typedef decltype(x) E;
        if constexpr (metal_sim_detail::is_float_scalar<E>) {
          return E(__builtin_fmaxf(float(x), float(y)));
        } else {
          return x > y ? x : y;
        }
      },
      a, b);
}

template <class A, class B, class R = metal_sim_detail::common_t<A, B>>
inline R min(A a, B b) {
  return metal_sim_detail::elementwise<R>(
      [](auto x, auto y) {
        typedef decltype(x) E;
        if constexpr (metal_sim_detail::is_float_scalar<E>) {
          return E(__builtin_fminf(float(x), float(y)));
        } else {
          return x < y ? x : y;
        }
      },
      a, b);
}

template <class A, class B, class C,
    class R = metal_sim_detail::common3_t<A, B, C>>
inline R clamp(A x, B low, C high) {
  return min(max(R(x), R(low)), R(high));
}

template <class A, class B, class C,
    class R = metal_sim_detail::common3_t<A, B, C>,
    class = enable_if_t<metal_sim_detail::is_float_type<R>>>
inline R fma(A a, B b, C c) {
  return metal_sim_detail::elementwise<R>(
      [](auto x, auto y, auto z) {
        return decltype(x)(__builtin_fmaf(float(x), float(y), float(z)));
      },
      a, b, c);
}

template <class A, class B, class C,
    class R = metal_sim_detail::common3_t<A, B, C>,
    class = enable_if_t<metal_sim_detail::is_float_type<R>>>
inline R mix(A x, B y, C a) {
  return metal_sim_detail::elementwise<R>(
      [](auto first, auto second, auto weight) {
        const float f = float(first);
        return decltype(first)(f + (float(second) - f) * float(weight));
      },
      x, y, a);
}

template <class T>
inline T select(T a, T b, bool c) {
  return c ? b : a;
}

#define METAL_SIM_PREDICATE(name, expression)                             \
  template <class T,                                                      \
      class = enable_if_t<metal_sim_detail::is_float_scalar<T>>>          \
  inline bool name(T value) {                                             \
    const float v = float(value);                                         \
    return expression;                                                    \
  }
METAL_SIM_PREDICATE(isnan, __builtin_isnan(v))
METAL_SIM_PREDICATE(isinf, __builtin_isinf(v))
METAL_SIM_PREDICATE(isfinite, __builtin_isfinite(v))
METAL_SIM_PREDICATE(signbit, __builtin_signbit(v))
#undef METAL_SIM_PREDICATE

template <class T, class = enable_if_t<metal_sim_detail::is_vector<T>>>
inline metal_sim_detail::element_t<T> dot(T a, T b) {
  float sum = 0.0f;
  for (int i = 0; i < metal_sim_detail::vector_size<T>; ++i) {
    sum += float(a[i]) * float(b[i]);
  }
  return metal_sim_detail::element_t<T>(sum);
}

template <class T, class = enable_if_t<metal_sim_detail::is_vector<T>>>
inline metal_sim_detail::element_t<T> length(T a) {
  return metal_sim_detail::element_t<T>(__builtin_sqrtf(float(dot(a, a))));
}

template <class T>
inline bool all(T value) {
  for (int i = 0; i < metal_sim_detail::vector_size<T>; ++i) {
    if (!value[i]) {
      return false;
    }
  }
  return true;
}
inline bool all(bool value) {
  return value;
}

template <class T>
inline bool any(T value) {
  for (int i = 0; i < metal_sim_detail::vector_size<T>; ++i) {
    if (value[i]) {
      return true;
    }
  }
  return false;
}
inline bool any(bool value) {
  return value;
}

template <class T,
    class = enable_if_t<metal_sim_detail::is_integer_scalar<T>>>
inline T popcount(T x) {
  return T(__builtin_popcountll((unsigned long long)x &
      (~0ull >> (64 - 8 * sizeof(T)))));
}

template <class T,
    class = enable_if_t<metal_sim_detail::is_integer_scalar<T>>>
inline T clz(T x) {
  const unsigned long long bits =
      (unsigned long long)x & (~0ull >> (64 - 8 * sizeof(T)));
  return T(bits == 0 ? 8 * sizeof(T)
                     : __builtin_clzll(bits) - (64 - 8 * sizeof(T)));
}

template <class T,
    class = enable_if_t<metal_sim_detail::is_integer_scalar<T>>>
inline T ctz(T x) {
  const unsigned long long bits =
      (unsigned long long)x & (~0ull >> (64 - 8 * sizeof(T)));
  return T(bits == 0 ? 8 * sizeof(T) : __builtin_ctzll(bits));
}

// metal::fast and metal::precise hold the same float functions.
#define METAL_SIM_EXPORT(name) \
  namespace fast {             \
  using metal::name;           \
  }                            \
  namespace precise {          \
  using metal::name;           \
  }
METAL_SIM_EXPORT(exp)
METAL_SIM_EXPORT(exp2)
METAL_SIM_EXPORT(exp10)
METAL_SIM_EXPORT(log)
METAL_SIM_EXPORT(log2)
METAL_SIM_EXPORT(log10)
METAL_SIM_EXPORT(sqrt)
METAL_SIM_EXPORT(rsqrt)
METAL_SIM_EXPORT(cbrt)
METAL_SIM_EXPORT(sin)
METAL_SIM_EXPORT(cos)
METAL_SIM_EXPORT(tan)
METAL_SIM_EXPORT(asin)
METAL_SIM_EXPORT(acos)
METAL_SIM_EXPORT(atan)
METAL_SIM_EXPORT(sinh)
METAL_SIM_EXPORT(cosh)
METAL_SIM_EXPORT(tanh)
METAL_SIM_EXPORT(asinh)
METAL_SIM_EXPORT(acosh)
METAL_SIM_EXPORT(atanh)
METAL_SIM_EXPORT(floor)
METAL_SIM_EXPORT(ceil)
METAL_SIM_EXPORT(round)
METAL_SIM_EXPORT(rint)
METAL_SIM_EXPORT(trunc)
METAL_SIM_EXPORT(fabs)
METAL_SIM_EXPORT(fract)
METAL_SIM_EXPORT(saturate)
METAL_SIM_EXPORT(sign)
METAL_SIM_EXPORT(pow)
METAL_SIM_EXPORT(powr)
METAL_SIM_EXPORT(fmod)
METAL_SIM_EXPORT(atan2)
METAL_SIM_EXPORT(copysign)
METAL_SIM_EXPORT(fmax)
METAL_SIM_EXPORT(fmin)
METAL_SIM_EXPORT(fdim)
METAL_SIM_EXPORT(divide)
METAL_SIM_EXPORT(max)
METAL_SIM_EXPORT(min)
METAL_SIM_EXPORT(clamp)
METAL_SIM_EXPORT(fma)
METAL_SIM_EXPORT(mix)
METAL_SIM_EXPORT(step)
METAL_SIM_EXPORT(isnan)
METAL_SIM_EXPORT(isinf)
#undef METAL_SIM_EXPORT

} // namespace metal
