// VCRD's PRM-free validity weight, one read of each logits row (CPU).
//
//   a_S = argmax_v z_S[v]                 (first maximum on ties, as torch.argmax)
//   m, s: max and sum_v exp(z_T[v] - m)   (online, rescaled when the max grows)
//   H   = the top_k largest teacher logits (a min-heap of size top_k, its root the admission bar)
//   log p_T(a_S) = z_T[a_S] - m - log s;  sum_{top_k} p_T^2 = sum_{h in H} exp(2 (h - m)) / s^2
//   w = exp(clamp(gamma * (log p_T(a_S) - log(sum_{top_k} p_T^2 + eps)), log_lo, log_hi))
// The top_k largest p_T^2 sit at the top_k largest teacher logits (softmax and squaring are monotone),
// so the heap holds logits and the normaliser is applied once at the end.
//
// Layout: rows split over threads (at::parallel_for); each row is streamed in blocks of kBlock
// elements converted to float in a stack buffer, so bf16/fp16 rows read once and every inner loop
// works on L1-resident floats and vectorises (max, sum of a polynomial exp, NaN flags). The heap is
// touched only for blocks whose max beats its root: after the first few blocks of a random row that is
// a small fraction of them.
//
// Bytes: 2 rows x V x itemsize read, 4 bytes written per row; for V = 32000 fp32 that is 256 kB per
// row, bandwidth-bound at ~34 GB/s (FACTS.md) = ~7.5 us per row when the exp keeps up.
// History: v1 (this) one pass, vectorised exp, heap; NaN inputs and all -inf teacher rows give a NaN
// weight that the Python wrapper turns into a ValueError naming the argument.
#include "distillkit.h"
#include "vec_math.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

namespace distillkit {

namespace {

constexpr int64_t kBlock = 512;

template <typename T>
inline void load_block(const T* src, int64_t len, float* dst) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<float>(src[i]);
}

template <typename TT, typename TS>
float validity_row(const TT* zt, const TS* zs, int64_t vocab, int64_t top_k, double gamma, double log_lo,
                   double log_hi, double eps, std::vector<float>& heap) {
  alignas(64) float bt[kBlock];
  alignas(64) float bs[kBlock];
  const float neg_inf = -std::numeric_limits<float>::infinity();
  float m = neg_inf, s = 0.f, best = neg_inf;
  int64_t best_idx = 0;
  int nan_count = 0;
  heap.clear();
  float bar = neg_inf;  // the heap root once it holds top_k entries; a logit must beat it to enter
  const std::greater<float> min_heap;
  for (int64_t c0 = 0; c0 < vocab; c0 += kBlock) {
    const int64_t len = std::min(kBlock, vocab - c0);
    load_block(zt + c0, len, bt);
    load_block(zs + c0, len, bs);
    float bmax_t = neg_inf, bmax_s = neg_inf;
    int nans = 0;
#pragma omp simd reduction(max : bmax_t, bmax_s) reduction(+ : nans)
    for (int64_t i = 0; i < len; ++i) {
      bmax_t = std::max(bmax_t, bt[i]);
      bmax_s = std::max(bmax_s, bs[i]);
      nans += (bt[i] != bt[i]) + (bs[i] != bs[i]);
    }
    nan_count += nans;
    if (bmax_t > m) {
      s *= exp_nonpositive(m - bmax_t);  // m = -inf on the first block: exp(-inf) -> ~0, s was 0
      m = bmax_t;
    }
    if (m > neg_inf) {
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int64_t i = 0; i < len; ++i) acc += exp_nonpositive(bt[i] - m);
      s += acc;
    }
    if (bmax_s > best) {  // strictly greater: an earlier block keeps ties
      for (int64_t i = 0; i < len; ++i) {
        if (bs[i] == bmax_s) { best_idx = c0 + i; break; }
      }
      best = bmax_s;
    }
    if (static_cast<int64_t>(heap.size()) < top_k || bmax_t > bar) {
      for (int64_t i = 0; i < len; ++i) {
        const float x = bt[i];
        if (static_cast<int64_t>(heap.size()) < top_k) {
          heap.push_back(x);
          if (static_cast<int64_t>(heap.size()) == top_k) {
            std::make_heap(heap.begin(), heap.end(), min_heap);
            bar = heap.front();
          }
        } else if (x > bar) {
          std::pop_heap(heap.begin(), heap.end(), min_heap);
          heap.back() = x;
          std::push_heap(heap.begin(), heap.end(), min_heap);
          bar = heap.front();
        }
      }
    }
  }
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (nan_count > 0 || !(m > neg_inf) || std::isinf(m)) return static_cast<float>(nan);
  // the online sum used the fast exp; recompute nothing, its relative error is ~1e-7
  const double log_s = std::log(static_cast<double>(s));
  const double log_p_greedy = static_cast<double>(static_cast<float>(zt[best_idx])) - m - log_s;
  double top_sq = 0.0;
  for (const float h : heap) top_sq += std::exp(2.0 * (static_cast<double>(h) - m));
  top_sq /= static_cast<double>(s) * static_cast<double>(s);
  double scaled = 0.0;  // gamma = 0: exp(clip(0)), never 0 * -inf
  if (gamma != 0.0) scaled = gamma * (log_p_greedy - std::log(top_sq + eps));
  scaled = std::min(std::max(scaled, log_lo), log_hi);  // -inf (p_T(a_S) = 0) clamps to log_lo
  return static_cast<float>(std::exp(scaled));
}

template <typename TT, typename TS>
void validity_rows(const at::Tensor& zt, const at::Tensor& zs, at::Tensor& out, int64_t top_k, double gamma,
                   double log_lo, double log_hi, double eps) {
  const int64_t rows = zt.size(0), vocab = zt.size(1);
  const TT* pt = zt.data_ptr<TT>();
  const TS* ps = zs.data_ptr<TS>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> heap;
    heap.reserve(top_k);
    for (int64_t r = begin; r < end; ++r) {
      po[r] = validity_row(pt + r * vocab, ps + r * vocab, vocab, top_k, gamma, log_lo, log_hi, eps, heap);
    }
  });
}

template <typename TT>
void dispatch_student(const at::Tensor& zt, const at::Tensor& zs, at::Tensor& out, int64_t top_k, double gamma,
                      double log_lo, double log_hi, double eps) {
  switch (zs.scalar_type()) {
    case at::kFloat: validity_rows<TT, float>(zt, zs, out, top_k, gamma, log_lo, log_hi, eps); break;
    case at::kBFloat16: validity_rows<TT, c10::BFloat16>(zt, zs, out, top_k, gamma, log_lo, log_hi, eps); break;
    case at::kHalf: validity_rows<TT, c10::Half>(zt, zs, out, top_k, gamma, log_lo, log_hi, eps); break;
    case at::kDouble: validity_rows<TT, double>(zt, zs, out, top_k, gamma, log_lo, log_hi, eps); break;
    default: TORCH_CHECK(false, "student_logits: unsupported dtype ", zs.scalar_type());
  }
}

}  // namespace

// teacher_logits, student_logits: [N, V] contiguous CPU, float32/bfloat16/float16/float64 (independently).
// Returns float32 [N]; NaN marks a row with a NaN input or no finite teacher maximum.
at::Tensor teacher_likelihood_validity_cpu(const at::Tensor& teacher_logits, const at::Tensor& student_logits,
                                           int64_t top_k, double gamma, double log_lo, double log_hi, double eps) {
  TORCH_CHECK(teacher_logits.device().is_cpu() && student_logits.device().is_cpu(),
              "teacher_likelihood_validity_cpu: CPU tensors expected");
  TORCH_CHECK(teacher_logits.dim() == 2 && teacher_logits.sizes() == student_logits.sizes(),
              "teacher_logits and student_logits must both be [N, V]");
  TORCH_CHECK(top_k >= 1 && top_k <= teacher_logits.size(1), "top_k must be in [1, V]");
  const at::Tensor zt = teacher_logits.contiguous();
  const at::Tensor zs = student_logits.contiguous();
  at::Tensor out = at::empty({zt.size(0)}, zt.options().dtype(at::kFloat));
  switch (zt.scalar_type()) {
    case at::kFloat: dispatch_student<float>(zt, zs, out, top_k, gamma, log_lo, log_hi, eps); break;
    case at::kBFloat16: dispatch_student<c10::BFloat16>(zt, zs, out, top_k, gamma, log_lo, log_hi, eps); break;
    case at::kHalf: dispatch_student<c10::Half>(zt, zs, out, top_k, gamma, log_lo, log_hi, eps); break;
    case at::kDouble: dispatch_student<double>(zt, zs, out, top_k, gamma, log_lo, log_hi, eps); break;
    default: TORCH_CHECK(false, "teacher_logits: unsupported dtype ", zt.scalar_type());
  }
  return out;
}

void bind_validity(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("teacher_likelihood_validity_cpu", &teacher_likelihood_validity_cpu,
        "VCRD PRM-free validity weight, one pass per row (CPU)", py::arg("teacher_logits"),
        py::arg("student_logits"), py::arg("top_k"), py::arg("gamma"), py::arg("log_lo"), py::arg("log_hi"),
        py::arg("eps"), py::call_guard<py::gil_scoped_release>());
#ifdef DISTILLKIT_WITH_CUDA
  m.def("teacher_likelihood_validity_cuda", &teacher_likelihood_validity_cuda,
        "VCRD PRM-free validity weight, one pass per row (CUDA)", py::arg("teacher_logits"),
        py::arg("student_logits"), py::arg("top_k"), py::arg("gamma"), py::arg("log_lo"), py::arg("log_hi"),
        py::arg("eps"), py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace distillkit
