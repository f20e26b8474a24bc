// Finding inf and nan in floats of any IEEE layout, fast: what the codecs check binary inputs
// with. Torch-free: the 16-bit layouts add their FloatBits where their types are known (oip.cpp).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace syncbatch::http {

/// The exponent bits of a floating-point layout: all ones for inf and nan.
template <class T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using Bits = std::uint32_t;
  static constexpr Bits kExponent = 0x7f800000;
};
template <>
struct FloatBits<double> {
  using Bits = std::uint64_t;
  static constexpr Bits kExponent = 0x7ff0000000000000;
};

/// Whether any of n floats is inf or nan, its exponent bits all ones: one branch-free pass the
/// compiler vectorizes, where a test per element that may throw is not.
template <class T>
bool any_non_finite(const T* p, std::size_t n) {
  using Bits = typename FloatBits<T>::Bits;
  static_assert(sizeof(T) == sizeof(Bits));
  unsigned any = 0;
  for (std::size_t i = 0; i < n; ++i) {
    Bits b = 0;
    std::memcpy(&b, p + i, sizeof b);
    any |= static_cast<unsigned>((b & FloatBits<T>::kExponent) == FloatBits<T>::kExponent);
  }
  return any != 0;
}

/// The index of the first inf or nan of n floats, or n when all are finite: the branch-free pass
/// above, then a scan only where it found one.
template <class T>
std::size_t first_non_finite(const T* p, std::size_t n) {
  if (!any_non_finite(p, n)) return n;
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<double>(p[i]))) return i;
  return n;
}

}  // namespace syncbatch::http
