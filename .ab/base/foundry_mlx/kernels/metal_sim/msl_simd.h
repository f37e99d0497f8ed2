// Barriers, SIMD-group functions, atomics and threadgroup storage for
// msl_shim.h, backed by the SIMT runtime (sim_runtime.h), plus the part of
// MLX's kernels/utils.h that custom kernels commonly use.
//
// Every synchronising call records its call site (__builtin_LINE/COLUMN at
// the caller), so lanes that reach different SIMD-group functions or barriers
// (divergent control flow) are reported instead of being silently paired.
#pragma once

namespace metal_sim_detail {

// Storage of one `threadgroup` declaration: its offset in the per-threadgroup
// arena is fixed when the kernel library loads (static initialisation).
template <class T, int Slot>
struct ThreadgroupSlot {
  static const size_t offset;
};
template <class T, int Slot>
const size_t ThreadgroupSlot<T, Slot>::offset =
    ::metal_sim::register_threadgroup_slot(sizeof(T), alignof(T));

template <class T, int Slot>
inline T& threadgroup_variable() {
  return *reinterpret_cast<T*>(::metal_sim::runtime_threadgroup_memory() +
      ThreadgroupSlot<T, Slot>::offset);
}

template <class T>
struct Gathered {
  T values[32];
  uint32_t mask;
  unsigned lane;
  bool active(unsigned l) const {
    return l < 32 && ((mask >> l) & 1);
  }
  // Lanes that did not take part hold poison (all bits set: NaN for floats).
  T at(unsigned l) const {
    if (active(l)) {
      return values[l];
    }
    T poison;
    __builtin_memset(&poison, 0xFF, sizeof(T));
    return poison;
  }
  unsigned first() const {
    return unsigned(__builtin_ctz(mask));
  }
};

template <class T>
inline Gathered<T> gather(const T& value, unsigned line, unsigned column) {
  static_assert(sizeof(T) <= ::metal_sim::kSlotBytes,
      "value too large for a SIMD-group function");
  const ::metal_sim::SimdExchange exchange =
      ::metal_sim::runtime_simd_exchange(&value, sizeof(T), line, column);
  Gathered<T> gathered;
  gathered.mask = exchange.active_mask;
  gathered.lane = exchange.lane;
  for (unsigned l = 0; l < 32; ++l) {
    __builtin_memcpy(&gathered.values[l],
        exchange.slots + l * ::metal_sim::kSlotBytes, sizeof(T));
  }
  return gathered;
}

// Pairwise tree over the active lanes in lane order.
template <class T, class F>
inline T reduce(const Gathered<T>& g, F combine) {
  T values[32];
  bool present[32];
  for (unsigned l = 0; l < 32; ++l) {
    values[l] = g.values[l];
    present[l] = g.active(l);
  }
  for (unsigned stride = 1; stride < 32; stride *= 2) {
    for (unsigned l = 0; l + stride < 32; l += 2 * stride) {
      if (present[l + stride]) {
        values[l] = present[l] ? T(combine(values[l], values[l + stride]))
                               : values[l + stride];
        present[l] = true;
      }
    }
  }
  return values[0];
}

template <class T, class F>
inline T scan(const Gathered<T>& g, F combine, T identity, bool inclusive) {
  T total = identity;
  for (unsigned l = 0; l < g.lane; ++l) {
    if (g.active(l)) {
      total = T(combine(total, g.values[l]));
    }
  }
  return inclusive ? T(combine(total, g.values[g.lane])) : total;
}

} // namespace metal_sim_detail

namespace metal {

enum class mem_flags : unsigned {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
};
constexpr mem_flags operator|(mem_flags a, mem_flags b) {
  return mem_flags(unsigned(a) | unsigned(b));
}

inline void threadgroup_barrier(mem_flags,
    unsigned line = __builtin_LINE(),
    unsigned column = __builtin_COLUMN()) {
  ::metal_sim::runtime_threadgroup_barrier(line, column);
}

inline void simdgroup_barrier(mem_flags,
    unsigned line = __builtin_LINE(),
    unsigned column = __builtin_COLUMN()) {
  ::metal_sim::runtime_simdgroup_barrier(line, column);
}

#define METAL_SIM_SITE \
  unsigned line = __builtin_LINE(), unsigned column = __builtin_COLUMN()
#define METAL_SIM_GATHER(value) \
  metal_sim_detail::gather(value, line, column)

#define METAL_SIM_REDUCTION(name, expression)                             \
  template <class T>                                                      \
  inline T name(T data, METAL_SIM_SITE) {                                 \
    return metal_sim_detail::reduce(                                      \
        METAL_SIM_GATHER(data), [](T a, T b) { return expression; });    \
  }
METAL_SIM_REDUCTION(simd_sum, a + b)
METAL_SIM_REDUCTION(simd_product, a * b)
METAL_SIM_REDUCTION(simd_max, max(a, b))
METAL_SIM_REDUCTION(simd_min, min(a, b))
METAL_SIM_REDUCTION(simd_and, a & b)
METAL_SIM_REDUCTION(simd_or, a | b)
METAL_SIM_REDUCTION(simd_xor, a ^ b)
#undef METAL_SIM_REDUCTION

#define METAL_SIM_SCAN(name, expression, identity, inclusive)            \
  template <class T>                                                      \
  inline T name(T data, METAL_SIM_SITE) {                                 \
    return metal_sim_detail::scan(METAL_SIM_GATHER(data),                 \
        [](T a, T b) { return expression; }, T(identity), inclusive);     \
  }
METAL_SIM_SCAN(simd_prefix_exclusive_sum, a + b, 0, false)
METAL_SIM_SCAN(simd_prefix_inclusive_sum, a + b, 0, true)
METAL_SIM_SCAN(simd_prefix_exclusive_product, a * b, 1, false)
METAL_SIM_SCAN(simd_prefix_inclusive_product, a * b, 1, true)
#undef METAL_SIM_SCAN

template <class T>
inline T simd_shuffle(T data, ushort simd_lane_id, METAL_SIM_SITE) {
  return METAL_SIM_GATHER(data).at(simd_lane_id);
}

template <class T>
inline T simd_broadcast(T data, ushort broadcast_lane_id, METAL_SIM_SITE) {
  return METAL_SIM_GATHER(data).at(broadcast_lane_id);
}

template <class T>
inline T simd_broadcast_first(T data, METAL_SIM_SITE) {
  const auto g = METAL_SIM_GATHER(data);
  return g.at(g.first());
}

// The upper `delta` lanes keep their own value (no wrap around).
template <class T>
inline T simd_shuffle_down(T data, ushort delta, METAL_SIM_SITE) {
  const auto g = METAL_SIM_GATHER(data);
  const unsigned source = g.lane + delta;
  return source >= 32 ? data : g.at(source);
}

// The lower `delta` lanes keep their own value.
template <class T>
inline T simd_shuffle_up(T data, ushort delta, METAL_SIM_SITE) {
  const auto g = METAL_SIM_GATHER(data);
  return g.lane < delta ? data : g.at(g.lane - delta);
}

template <class T>
inline T simd_shuffle_xor(T data, ushort mask, METAL_SIM_SITE) {
  const auto g = METAL_SIM_GATHER(data);
  return g.at(g.lane ^ mask);
}

template <class T>
inline T simd_shuffle_rotate_down(T data, ushort delta, METAL_SIM_SITE) {
  const auto g = METAL_SIM_GATHER(data);
  return g.at((g.lane + delta) % 32);
}

template <class T>
inline T simd_shuffle_rotate_up(T data, ushort delta, METAL_SIM_SITE) {
  const auto g = METAL_SIM_GATHER(data);
  return g.at((g.lane + 32 - delta % 32) % 32);
}

template <class T>
inline T simd_shuffle_and_fill_down(
    T data, T filling, ushort delta, ushort modulo, METAL_SIM_SITE) {
  const auto values = METAL_SIM_GATHER(data);
  const auto fills = METAL_SIM_GATHER(filling);
  const unsigned base = values.lane / modulo * modulo;
  const unsigned index = values.lane % modulo + delta;
  return index < modulo ? values.at(base + index)
                        : fills.at(base + index - modulo);
}
template <class T>
inline T simd_shuffle_and_fill_down(
    T data, T filling, ushort delta, METAL_SIM_SITE) {
  return simd_shuffle_and_fill_down(data, filling, delta, 32, line, column);
}

template <class T>
inline T simd_shuffle_and_fill_up(
    T data, T filling, ushort delta, ushort modulo, METAL_SIM_SITE) {
  const auto values = METAL_SIM_GATHER(data);
  const auto fills = METAL_SIM_GATHER(filling);
  const unsigned base = values.lane / modulo * modulo;
  const unsigned index = values.lane % modulo;
  return index >= delta ? values.at(base + index - delta)
                        : fills.at(base + modulo + index - delta);
}
template <class T>
inline T simd_shuffle_and_fill_up(
    T data, T filling, ushort delta, METAL_SIM_SITE) {
  return simd_shuffle_and_fill_up(data, filling, delta, 32, line, column);
}

inline bool simd_all(bool expr, METAL_SIM_SITE) {
  return metal_sim_detail::reduce(
      METAL_SIM_GATHER(expr), [](bool a, bool b) { return a && b; });
}

inline bool simd_any(bool expr, METAL_SIM_SITE) {
  return metal_sim_detail::reduce(
      METAL_SIM_GATHER(expr), [](bool a, bool b) { return a || b; });
}

inline bool simd_is_first(METAL_SIM_SITE) {
  const auto g = METAL_SIM_GATHER(true);
  return g.lane == g.first();
}

struct simd_vote {
  typedef uint64_t vote_t;
  vote_t bits;
  explicit constexpr simd_vote(vote_t v = 0) : bits(v) {}
  explicit constexpr operator vote_t() const {
    return bits;
  }
  constexpr bool all() const {
    return bits == 0xFFFFFFFFull;
  }
  constexpr bool any() const {
    return bits != 0;
  }
};

inline simd_vote simd_ballot(bool expr, METAL_SIM_SITE) {
  const auto g = METAL_SIM_GATHER(expr);
  uint64_t bits = 0;
  for (unsigned l = 0; l < 32; ++l) {
    bits |= uint64_t(g.active(l) && g.values[l]) << l;
  }
  return simd_vote(bits);
}

inline simd_vote simd_active_threads_mask(METAL_SIM_SITE) {
  return simd_vote(METAL_SIM_GATHER(true).mask);
}

#undef METAL_SIM_GATHER
#undef METAL_SIM_SITE

// ---------------------------------------------------------------- atomics --
enum memory_order {
  memory_order_relaxed = __ATOMIC_RELAXED,
  memory_order_acquire = __ATOMIC_ACQUIRE,
  memory_order_release = __ATOMIC_RELEASE,
  memory_order_acq_rel = __ATOMIC_ACQ_REL,
  memory_order_seq_cst = __ATOMIC_SEQ_CST,
};

template <class T>
struct atomic {
  T value_;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<bool> atomic_bool;
typedef atomic<float> atomic_float;
typedef atomic<ulong> atomic_ulong;

template <class T>
inline void atomic_store_explicit(
    volatile atomic<T>* object, T desired, memory_order) {
  __atomic_store(&object->value_, &desired, __ATOMIC_SEQ_CST);
}

template <class T>
inline T atomic_load_explicit(volatile atomic<T>* object, memory_order) {
  T result;
  __atomic_load(&object->value_, &result, __ATOMIC_SEQ_CST);
  return result;
}

template <class T>
inline T atomic_exchange_explicit(
    volatile atomic<T>* object, T desired, memory_order) {
  T result;
  __atomic_exchange(&object->value_, &desired, &result, __ATOMIC_SEQ_CST);
  return result;
}

template <class T>
inline bool atomic_compare_exchange_weak_explicit(volatile atomic<T>* object,
    T* expected, T desired, memory_order, memory_order) {
  return __atomic_compare_exchange(&object->value_, expected, &desired, false,
      __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}

// Read-modify-write through compare-exchange so float works too.
#define METAL_SIM_ATOMIC_FETCH(name, expression)                           \
  template <class T, class U>                                              \
  inline T name(volatile atomic<T>* object, U operand, memory_order) {     \
    const T b = T(operand);                                                \
    T a = atomic_load_explicit(object, memory_order_relaxed);              \
    while (!atomic_compare_exchange_weak_explicit(object, &a,              \
        T(expression), memory_order_relaxed, memory_order_relaxed)) {      \
    }                                                                      \
    return a;                                                              \
  }
METAL_SIM_ATOMIC_FETCH(atomic_fetch_add_explicit, a + b)
METAL_SIM_ATOMIC_FETCH(atomic_fetch_sub_explicit, a - b)
METAL_SIM_ATOMIC_FETCH(atomic_fetch_and_explicit, a & b)
METAL_SIM_ATOMIC_FETCH(atomic_fetch_or_explicit, a | b)
METAL_SIM_ATOMIC_FETCH(atomic_fetch_xor_explicit, a ^ b)
METAL_SIM_ATOMIC_FETCH(atomic_fetch_max_explicit, a > b ? a : b)
METAL_SIM_ATOMIC_FETCH(atomic_fetch_min_explicit, a < b ? a : b)
#undef METAL_SIM_ATOMIC_FETCH

} // namespace metal

// ------------------------------------- subset of MLX's kernels/utils.h --
template <typename U>
struct Limits {
  static constexpr U max = metal::numeric_limits<U>::max();
  static constexpr U min = metal::numeric_limits<U>::min();
  static constexpr U finite_max = metal::numeric_limits<U>::max();
  static constexpr U finite_min = metal::numeric_limits<U>::min();
};
#define METAL_SIM_FLOAT_LIMIT(type)                                        \
  template <>                                                              \
  struct Limits<type> {                                                    \
    static constexpr type max = metal::numeric_limits<type>::infinity();   \
    static constexpr type min = -metal::numeric_limits<type>::infinity();  \
    static constexpr type finite_max = metal::numeric_limits<type>::max(); \
    static constexpr type finite_min =                                     \
        -metal::numeric_limits<type>::max();                               \
  };
METAL_SIM_FLOAT_LIMIT(float)
METAL_SIM_FLOAT_LIMIT(metal::half)
METAL_SIM_FLOAT_LIMIT(metal::bfloat)
#undef METAL_SIM_FLOAT_LIMIT

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(
    IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

template <typename IdxT = int64_t>
inline IdxT elem_to_loc(
    metal::uint3 elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc =
      elem.x * IdxT(strides[ndim - 1]) + elem.y * IdxT(strides[ndim - 2]);
  for (int d = ndim - 3; d >= 0; --d) {
    loc += (elem.z % shape[d]) * IdxT(strides[d]);
    elem.z /= shape[d];
  }
  return loc;
}

template <typename T, typename U>
inline T ceildiv(T N, U M) {
  return (N + M - 1) / M;
}

inline float log1p(float x) {
  const float xp1 = 1.0f + x;
  if (xp1 == __builtin_huge_valf()) {
    return __builtin_huge_valf();
  }
  if (xp1 == 1.0f) {
    return x;
  }
  return x * (metal::log(xp1) / (xp1 - 1.0f));
}
