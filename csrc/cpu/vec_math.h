// Vectorisable elementwise math shared by the CPU kernels (no libm calls: without -ffast-math,
// std::exp does not vectorise): one exp polynomial (expf_remainder) behind exp_nonpositive and vexp,
// vlog, and float16 <-> float32 row conversion.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <c10/util/Half.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace distillkit {

// e^r for |r| <= ln2 / 2 (the remainder of a Cody-Waite reduction x = n ln2 + r): the Cephes expf
// polynomial. The caller multiplies by 2^n.
inline float expf_remainder(float r) {
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// e^x for x <= 0 in float: Cody-Waite reduction x = n ln2 + r and the Cephes expf polynomial,
// |rel err| < 2e-7 on [-87, 0]. Below -87 the result is clamped to e^-87 ~ 1.6e-38 instead of 0:
// every softmax row sum has a term e^0 = 1, so the clamp moves a sum by at most V * 1.6e-38.
#pragma omp declare simd notinbranch
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;  // ln2 split into an exact high part ...
  r = r - n * -2.12194440e-4f;     // ... and the remainder
  const float p = expf_remainder(r);
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in [-126, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float bits_to_float(int32_t v) { return __builtin_bit_cast(float, v); }
inline int32_t float_to_bits(float v) { return __builtin_bit_cast(int32_t, v); }

// e^x for x <= 88 (the skew KL kernels' inputs are <= 0): the Cody-Waite reduction of exp_nonpositive
// with round-to-nearest n and expf_remainder, ~1 ulp. Branch-free so that `omp simd` loops vectorise it.
// Below -87.3 it returns 0 (true value < 1.2e-38, invisible next to a softmax sum >= 1); NaN stays NaN.
// On [-87, 0] it equals exp_nonpositive except where the two round n differently (tests/ops/test_vec_math.py).
inline float vexp(float x) {
  const float xc = x < 88.0f ? (x > -87.3f ? x : -87.3f) : 88.0f;
  // round-to-nearest by the 1.5 * 2^23 trick (nearbyint does not vectorise without -ffast-math)
  const float kf = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  const float y = expf_remainder(r);
  const float scale = bits_to_float((static_cast<int32_t>(kf) + 127) << 23);
  const float out = y * scale;
  return x < -87.3f ? 0.0f : (x != x ? x : out);
}

// log for x >= 0: x = f' 2^e with f' in [sqrt(1/2), sqrt(2)), log(f') by the Cephes logf polynomial
// in f = f' - 1 (~1 ulp). Denormals are pre-scaled by 2^23; 0 -> -inf, negative or NaN -> NaN, inf -> inf.
inline float vlog(float x) {
  // every value is computed before it is selected: GCC (without -fno-trapping-math) will not
  // if-convert, hence not vectorise, a floating-point operation inside a conditional
  const bool denormal = x < 1.17549435e-38f;
  const float x_scaled = x * 8388608.0f;
  const float xs = denormal ? x_scaled : x;
  const int32_t bits = float_to_bits(xs);
  int32_t e = ((bits >> 23) & 0xff) - 127 - (denormal ? 23 : 0);
  float f = bits_to_float((bits & 0x007fffff) | 0x3f800000);  // in [1, 2)
  const bool upper = f > 1.41421356f;
  const float f_half = f * 0.5f;
  f = upper ? f_half : f;
  e = upper ? e + 1 : e;
  f = f - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float ef = static_cast<float>(e);
  y = y + ef * -2.12194440e-4f;
  y = y - 0.5f * z;
  const float out = f + y + ef * 0.693359375f;
  const float inf = std::numeric_limits<float>::infinity();
  return x > 0.0f ? (x < inf ? out : inf) : (x == 0.0f ? -inf : std::numeric_limits<float>::quiet_NaN());
}

// float64 inputs (tests, gradcheck) use libm: exactness matters there, speed does not.
inline double vexp(double x) { return std::exp(x); }
inline double vlog(double x) { return std::log(x); }

// GCC 12 converts float16 one element at a time even inside `omp simd` loops (c10::Half and _Float16
// alike, ~10x slower than float32 here), so float16 rows are staged through float copies with F16C.
inline void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

inline void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8)  // round to nearest even, as c10::Half(float)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

}  // namespace distillkit
