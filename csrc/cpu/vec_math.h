// Vectorisable elementwise math shared by the CPU kernels (no libm calls: without -ffast-math,
// std::exp does not vectorise).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

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

}  // namespace distillkit
