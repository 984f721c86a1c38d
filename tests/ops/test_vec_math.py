"""csrc/cpu/vec_math.h on its own: a small C++ program built against the header (no extension build).

The skew KL kernels' vexp and the scoring/validity kernels' exp_nonpositive are one exp (the same
Cody-Waite reduction and expf_remainder polynomial); they may differ only where their roundings of
n = x / ln2 disagree (round-half-even vs floor(+0.5), one float in [-87, 0] when swept exhaustively).
The float16 row conversions (F16C where the CPU has it) must match c10::Half's scalar conversions.
"""
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"

_PROGRAM = r"""
#include "cpu/vec_math.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

using namespace distillkit;

int main() {
  // every 61st float in [-87, 0] (bit patterns of -0.0 up to -87.0), plus the ends
  const uint32_t lo = 0x80000000u, hi = __builtin_bit_cast(uint32_t, -87.0f);
  long n = 0, differ = 0;
  int max_ulp = 0;
  for (uint64_t b = lo; b <= hi + 60ull; b += 61) {
    const float x = __builtin_bit_cast(float, static_cast<uint32_t>(b > hi ? hi : b));
    const float a = vexp(x), c = exp_nonpositive(x);
    ++n;
    if (a != c) {
      ++differ;
      const int u = std::abs(__builtin_bit_cast(int32_t, a) - __builtin_bit_cast(int32_t, c));
      max_ulp = u > max_ulp ? u : max_ulp;
    }
  }
  // every float16 bit pattern through half_to_float and back through float_to_half
  const int64_t kHalves = 65536 + 3;  // odd length: the scalar tail runs too
  std::vector<c10::Half> h(kHalves), back(kHalves);
  std::vector<float> f(kHalves);
  for (int64_t i = 0; i < kHalves; ++i) h[i] = c10::Half(static_cast<uint16_t>(i % 65536), c10::Half::from_bits());
  half_to_float(h.data(), f.data(), kHalves);
  long bad_h2f = 0, bad_f2h = 0;
  for (int64_t i = 0; i < kHalves; ++i) {
    const float want = static_cast<float>(h[i]);
    bad_h2f += !(__builtin_bit_cast(uint32_t, f[i]) == __builtin_bit_cast(uint32_t, want) || (want != want && f[i] != f[i]));
  }
  // floats between and beyond the halves (ties, overflow, subnormals) to float16
  std::vector<float> g;
  for (uint64_t b = 0; b <= 0xffffffffull; b += 4099) g.push_back(__builtin_bit_cast(float, static_cast<uint32_t>(b)));
  std::vector<c10::Half> gh(g.size());
  float_to_half(g.data(), gh.data(), static_cast<int64_t>(g.size()));
  for (size_t i = 0; i < g.size(); ++i) {
    const c10::Half want(g[i]);
    const bool both_nan = g[i] != g[i] && static_cast<float>(gh[i]) != static_cast<float>(gh[i]);
    bad_f2h += !(gh[i].x == want.x || both_nan);
  }
  std::printf("%ld %ld %d %ld %ld %zu\n", n, differ, max_ulp, bad_h2f, bad_f2h, g.size());
  return 0;
}
"""


@pytest.fixture(scope="module")
def vec_math_report(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    from torch.utils.cpp_extension import include_paths

    d = tmp_path_factory.mktemp("vec_math")
    (d / "t.cpp").write_text(_PROGRAM)
    # the extension's flags (setup.py: -O3 -march=native, ISO C++17 so no FP contraction)
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", f"-I{CSRC}", *(f"-I{p}" for p in include_paths()),
           str(d / "t.cpp"), "-o", str(d / "t")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    out = subprocess.run([str(d / "t")], check=True, capture_output=True, text=True, timeout=300).stdout
    n, differ, max_ulp, bad_h2f, bad_f2h, n_f2h = (int(v) for v in out.split())
    return {"n": n, "differ": differ, "max_ulp": max_ulp, "bad_h2f": bad_h2f, "bad_f2h": bad_f2h, "n_f2h": n_f2h}


def test_vexp_is_exp_nonpositive(vec_math_report):
    r = vec_math_report
    assert r["n"] > 18_000_000
    # only a rounding of n at a near-tie can tell them apart, and then by one ulp
    assert r["max_ulp"] <= 1
    assert r["differ"] <= r["n"] // 1_000_000, r


def test_half_row_conversions_match_c10(vec_math_report):
    r = vec_math_report
    assert r["n_f2h"] > 1_000_000
    assert r["bad_h2f"] == 0 and r["bad_f2h"] == 0, r
