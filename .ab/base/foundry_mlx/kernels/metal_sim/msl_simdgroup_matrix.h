// simdgroup_matrix<T, 8, 8> for msl_shim.h (metal_simdgroup_matrix).
//
// As on the GPU, each lane holds two elements of the 8x8 matrix (row, col)
// and (row, col + 1), at the coordinates MLX's steel kernels assume
// (mma.h get_coord), so thread_elements() tricks behave as on a Mac. Loads
// and stores touch only the lane's own elements; multiplies gather the
// fragments of all lanes through a SIMD-group exchange and compute in float.
#pragma once

namespace metal_sim_detail {

template <class T>
struct fragment_storage {
  typedef metal::vec<T, 2> type;
};
template <>
struct fragment_storage<metal::bfloat> {
  struct type {
    metal::bfloat values[2];
    metal::bfloat& operator[](int i) {
      return values[i];
    }
    const metal::bfloat& operator[](int i) const {
      return values[i];
    }
  };
};

// Row and first column of the two elements lane `lane` holds.
inline void fragment_coordinates(unsigned lane, int& row, int& column) {
  const int quad = int(lane / 4);
  row = (quad & 4) + int(lane / 2) % 4;
  column = (quad & 2) * 2 + int(lane % 2) * 2;
}

} // namespace metal_sim_detail

namespace metal {

template <class T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8,
      "the simulator supports 8x8 simdgroup matrices only");
  typename metal_sim_detail::fragment_storage<T>::type elements_;

  simdgroup_matrix() = default;
  // Diagonal matrix with `diagonal` on the diagonal.
  explicit simdgroup_matrix(T diagonal) {
    int row, column;
    metal_sim_detail::fragment_coordinates(
        ::metal_sim::runtime_simd_lane(), row, column);
    for (int j = 0; j < 2; ++j) {
      elements_[j] = row == column + j ? diagonal : T(0);
    }
  }
  typename metal_sim_detail::fragment_storage<T>::type& thread_elements() {
    return elements_;
  }
  const typename metal_sim_detail::fragment_storage<T>::type&
  thread_elements() const {
    return elements_;
  }
};

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <class T, int Cols, int Rows>
inline simdgroup_matrix<T, Cols, Rows> make_filled_simdgroup_matrix(
    T value) {
  simdgroup_matrix<T, Cols, Rows> result;
  result.elements_[0] = value;
  result.elements_[1] = value;
  return result;
}

template <class T, class U>
inline void simdgroup_load(simdgroup_matrix<T, 8, 8>& destination,
    const U* source,
    ulong elements_per_row = 8,
    ulong2 matrix_origin = ulong2(0),
    bool transpose_matrix = false) {
  int row, column;
  metal_sim_detail::fragment_coordinates(
      ::metal_sim::runtime_simd_lane(), row, column);
  for (int j = 0; j < 2; ++j) {
    const ulong r = ulong(transpose_matrix ? column + j : row);
    const ulong c = ulong(transpose_matrix ? row : column + j);
    destination.elements_[j] = T(
        source[(matrix_origin.y + r) * elements_per_row + matrix_origin.x + c]);
  }
}

template <class T, class U>
inline void simdgroup_store(simdgroup_matrix<T, 8, 8> matrix,
    U* destination,
    ulong elements_per_row = 8,
    ulong2 matrix_origin = ulong2(0),
    bool transpose_matrix = false) {
  int row, column;
  metal_sim_detail::fragment_coordinates(
      ::metal_sim::runtime_simd_lane(), row, column);
  for (int j = 0; j < 2; ++j) {
    const ulong r = ulong(transpose_matrix ? column + j : row);
    const ulong c = ulong(transpose_matrix ? row : column + j);
    destination[(matrix_origin.y + r) * elements_per_row + matrix_origin.x +
        c] = U(matrix.elements_[j]);
  }
}

namespace simdgroup_matrix_detail {

template <class A, class B, class C>
struct Operands {
  typename metal_sim_detail::fragment_storage<A>::type a;
  typename metal_sim_detail::fragment_storage<B>::type b;
  typename metal_sim_detail::fragment_storage<C>::type c;
};

// Full 8x8 matrices from every lane's fragments, then this lane's elements
// of a * b + c (summed over k in order, in float).
template <class D, class A, class B, class C>
inline void multiply_accumulate(simdgroup_matrix<D, 8, 8>& d,
    const simdgroup_matrix<A, 8, 8>& a,
    const simdgroup_matrix<B, 8, 8>& b,
    const simdgroup_matrix<C, 8, 8>& c,
    unsigned line,
    unsigned column) {
  const Operands<A, B, C> mine{a.elements_, b.elements_, c.elements_};
  const auto gathered = metal_sim_detail::gather(mine, line, column);
  float full_a[8][8], full_b[8][8], full_c[8][8];
  for (unsigned lane = 0; lane < 32; ++lane) {
    const Operands<A, B, C> part = gathered.at(lane);
    int r, col;
    metal_sim_detail::fragment_coordinates(lane, r, col);
    for (int j = 0; j < 2; ++j) {
      full_a[r][col + j] = float(part.a[j]);
      full_b[r][col + j] = float(part.b[j]);
      full_c[r][col + j] = float(part.c[j]);
    }
  }
  int r, col;
  metal_sim_detail::fragment_coordinates(gathered.lane, r, col);
  for (int j = 0; j < 2; ++j) {
    float sum = full_c[r][col + j];
    for (int k = 0; k < 8; ++k) {
      sum += full_a[r][k] * full_b[k][col + j];
    }
    d.elements_[j] = D(sum);
  }
}

} // namespace simdgroup_matrix_detail

template <class D, class A, class B, class C>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<D, 8, 8>& d,
    const simdgroup_matrix<A, 8, 8>& a,
    const simdgroup_matrix<B, 8, 8>& b,
    const simdgroup_matrix<C, 8, 8>& c,
    unsigned line = __builtin_LINE(),
    unsigned column = __builtin_COLUMN()) {
  simdgroup_matrix_detail::multiply_accumulate(d, a, b, c, line, column);
}

template <class D, class A, class B>
inline void simdgroup_multiply(simdgroup_matrix<D, 8, 8>& d,
    const simdgroup_matrix<A, 8, 8>& a,
    const simdgroup_matrix<B, 8, 8>& b,
    unsigned line = __builtin_LINE(),
    unsigned column = __builtin_COLUMN()) {
  const simdgroup_matrix<D, 8, 8> zero =
      make_filled_simdgroup_matrix<D, 8, 8>(D(0));
  simdgroup_matrix_detail::multiply_accumulate(d, a, b, zero, line, column);
}

template <class T>
inline simdgroup_matrix<T, 8, 8> operator*(const simdgroup_matrix<T, 8, 8>& a,
    const simdgroup_matrix<T, 8, 8>& b) {
  simdgroup_matrix<T, 8, 8> d;
  simdgroup_multiply(d, a, b);
  return d;
}

} // namespace metal
