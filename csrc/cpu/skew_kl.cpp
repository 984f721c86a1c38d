// Skew KL / skew reverse KL at the logits level (DistiLLM), CPU kernels.
//
// Per row i (a token), with q = softmax(s / T) (student), p = softmax(t / T) (teacher):
//   skew KL          L = sum_j p_j (log p_j - log m_j),  m = alpha p + (1 - alpha) q
//                    dL/ds_j = (1 - alpha) / T * q_j (S - r_j),    r_j = p_j / m_j, S = sum_k q_k r_k
//   skew reverse KL  L = sum_j q_j (log q_j - log m_j),  m = (1 - alpha) p + alpha q
//                    dL/ds_j = 1 / T * (h_j - q_j (L - alpha A)),   h_j = q_j (log q_j - log m_j) - alpha q_j^2 / m_j,
//                                                                  A = sum_k q_k^2 / m_k
// detach_mixture (DistiLLM-2's skew reverse KL): no gradient through m, i.e. the alpha q^2 / m and
// alpha A terms drop out. The kernel writes the per-row loss L_i and, when asked, scale_i dL_i/ds_i
// (the gradient of sum_i scale_i L_i); rows with scale_i == 0 (ignored tokens) are skipped: loss 0,
// gradient 0, whatever their logits hold. The teacher is a constant.
//
// History (N=2048, V=32000 fp32, 2 threads, AVX-512; see bench/bench_skew_kl.py):
//   v1  four passes per row over L2-resident data: max; exp into two row scratch buffers (the row's
//       exp values are reused, so each element costs exactly 2 exp + 1 log); loss + the gradient's
//       row sum; gradient write. std::exp/log do not vectorise without -ffast-math, so exp/log here
//       are Cephes-style polynomials written to vectorise under `omp simd` (accuracy: tests/ops).
//   v2  pass 3 was scalar: GCC refused to if-convert its selects under -ftrapping-math (the default);
//       `#pragma GCC optimize("no-trapping-math")` vectorises it (standalone row kernel, one thread:
//       ~31 -> ~5 ns per element on a loaded machine). The loss sums in float per 512-element chunk,
//       in double across chunks.
//   v3  float16 ran ~11x slower than float32 (scalar conversions); its rows now go through float
//       copies converted with F16C (bfloat16 converts by shifts and vectorises as is).
//   v4  the row scale (token weight x kept / kept count) is folded into the gradient write, so the
//       fused-linear losses need no extra [c, V] pass; scale 0 replaces the labels mask.
//   v5  (distillkit/ops/skew_kl.py) the autograd forward computes the loss only and the backward
//       reruns this kernel with the incoming gradient folded into the scale: one fresh [N, V] buffer
//       instead of two (a fresh 250 MB CPU buffer costs ~0.2 s of page faults here) and none kept
//       between forward and backward. bench/bench_skew_kl.py, 2048 x 32000 fp32, 2 shared threads:
//       forward 137-153 ms vs eager 3.6-3.9 s (0.04x); forward + backward 0.39-0.44 s vs eager
//       5.5 s (0.07x); peak extra memory 250 MiB (the gradient) vs 2.6 GiB.
//   v6  undefined rows (NaN or +inf logits, all -inf) return NaN instead of the clean 0 the probability
//       guards gave; rows whose mixture underflows (alpha = 0 or near it with far-apart distributions:
//       log m = -inf, an inf loss) are detected from the row's sums and redone in log space in double.
//       The vectorised pass is unchanged (a flag counted inside it changed GCC's vector width and the
//       rounding of the sums).
// Bytes: read s, t once from DRAM (later passes hit L2: a 32000-float row is 125 KiB), write the
// gradient once: 3 x 4 x N x V = 786 MB -> ~23 ms at 34 GB/s; the math (2 exp + 1 log + 2 div per
// element) is the floor.
//
// GCC does not if-convert (so does not vectorise) the selects of pass 3 while it must assume that
// floating-point operations trap; nothing here reads FP exception flags. NaN/inf semantics are kept
// (this is not -ffast-math). See v2 above.
// Placed before the includes so that inlined header functions share the option.
#pragma GCC optimize("no-trapping-math")

#include "distillkit.h"
#include "vec_math.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace distillkit {

namespace {

// Probabilities below this count as 0: alpha * p (or (1 - alpha) * p) must not underflow to a zero
// mixture while p > 0 (that would give p * log(p / 0) = inf for a term worth < 1e-28).
template <typename acc_t>
constexpr acc_t kTinyProb = std::is_same_v<acc_t, double> ? acc_t(1e-290) : acc_t(1e-30);

constexpr int64_t kChunk = 512;  // elements per float partial sum of the loss

template <typename acc_t>
struct RowArgs {
  int64_t vocab;
  acc_t alpha;
  acc_t inv_temperature;
  acc_t alpha_in_grad;  // alpha, or 0 when the mixture is detached (skew reverse KL only)
};

// One row: returns the loss L, writes row_scale * dL/ds into grad_row when WITH_GRAD. exp_q/exp_p: [V] scratch.
template <bool REVERSE, bool WITH_GRAD, typename scalar_t, typename acc_t>
acc_t skew_kl_row(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, scalar_t* __restrict__ grad_row,
                  acc_t* __restrict__ exp_q, acc_t* __restrict__ exp_p, const RowArgs<acc_t>& a,
                  acc_t row_scale) {
  const int64_t V = a.vocab;
  const acc_t inv_t = a.inv_temperature;
  // pass 1: row maxima (the softmax shift; T > 0 so max(s / T) = max(s) / T)
  acc_t max_s = -std::numeric_limits<acc_t>::infinity(), max_t = max_s;
#pragma omp simd reduction(max : max_s, max_t)
  for (int64_t j = 0; j < V; ++j) {
    const acc_t sj = static_cast<acc_t>(s[j]), tj = static_cast<acc_t>(t[j]);
    max_s = sj > max_s ? sj : max_s;
    max_t = tj > max_t ? tj : max_t;
  }
  // pass 2: the exp of every element, kept for passes 3 and 4 (so each element pays 2 exp in all)
  acc_t sum_q = 0, sum_p = 0;
#pragma omp simd reduction(+ : sum_q, sum_p)
  for (int64_t j = 0; j < V; ++j) {
    const acc_t eq = vexp((static_cast<acc_t>(s[j]) - max_s) * inv_t);
    const acc_t ep = vexp((static_cast<acc_t>(t[j]) - max_t) * inv_t);
    exp_q[j] = eq;
    exp_p[j] = ep;
    sum_q += eq;
    sum_p += ep;
  }
  if (!(std::isfinite(sum_q) && std::isfinite(sum_p))) {
    // A NaN or +inf logit (inf - inf) or a row of -inf makes a softmax sum NaN: the loss is undefined.
    // Report NaN (the op's CPU check raises on it) instead of letting the probability guards below drop
    // every term and return a clean-looking 0.
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    if constexpr (WITH_GRAD)
      for (int64_t j = 0; j < V; ++j) grad_row[j] = static_cast<scalar_t>(nan);
    return nan;
  }
  const acc_t inv_q = acc_t(1) / sum_q, inv_p = acc_t(1) / sum_p;
  const acc_t log_sum_q = std::log(sum_q), log_sum_p = std::log(sum_p);
  const acc_t alpha = a.alpha, beta = acc_t(1) - a.alpha, alpha_g = a.alpha_in_grad, tiny = kTinyProb<acc_t>;
  // pass 3: loss and the gradient's row sum; exp_p is overwritten with the per-element gradient part.
  // Chunks sum in acc_t vector lanes, chunks add in double: the loss is a small difference of terms of
  // entropy size.
  double loss = 0, row_sum = 0;
  for (int64_t begin = 0; begin < V; begin += kChunk) {
    const int64_t end = begin + kChunk < V ? begin + kChunk : V;
    acc_t chunk_loss = 0, chunk_sum = 0;
#pragma omp simd reduction(+ : chunk_loss, chunk_sum)
    for (int64_t j = begin; j < end; ++j) {
      const acc_t q = exp_q[j] * inv_q, p = exp_p[j] * inv_p;
      if constexpr (!REVERSE) {
        const acc_t m = alpha * p + beta * q;
        const acc_t log_p = (static_cast<acc_t>(t[j]) - max_t) * inv_t - log_sum_p;
        const acc_t term_all = p * (log_p - vlog(m)), qr_all = q * (p / m);  // selected below
        const acc_t term = p > tiny ? term_all : acc_t(0);
        chunk_loss += term;
        if constexpr (WITH_GRAD) {
          const acc_t qr = p > tiny ? qr_all : acc_t(0);
          exp_p[j] = qr;
          chunk_sum += qr;
        }
      } else {
        const acc_t m = beta * p + alpha * q;
        const acc_t log_q = (static_cast<acc_t>(s[j]) - max_s) * inv_t - log_sum_q;
        const acc_t term_all = q * (log_q - vlog(m)), qqm_all = q * (q / m);  // selected below
        const acc_t term = q > tiny ? term_all : acc_t(0);
        chunk_loss += term;
        if constexpr (WITH_GRAD) {
          const acc_t qqm = q > tiny ? qqm_all : acc_t(0);
          exp_p[j] = term - alpha_g * qqm;
          chunk_sum += qqm;
        }
      }
    }
    loss += chunk_loss;
    row_sum += chunk_sum;
  }
  if (!(std::isfinite(loss) && std::isfinite(row_sum))) {
    // Rare rows (alpha at or near 0 or 1 with far-apart distributions): the mixture underflowed where
    // its term still counts, so log m = -inf or p / m overflowed above (the inputs are finite: checked
    // after pass 2). Redo pass 3 in log space, log m = logaddexp(log a + log p, log b + log q), in
    // double, one element at a time. (Detected from the sums, so the vectorised loop above is untouched.)
    const double la = a.alpha > 0 ? std::log(static_cast<double>(alpha)) : -INFINITY;
    const double lb = beta > 0 ? std::log(static_cast<double>(beta)) : -INFINITY;
    loss = 0;
    row_sum = 0;
    for (int64_t j = 0; j < V; ++j) {
      const double log_q = (static_cast<double>(s[j]) - max_s) * inv_t - log_sum_q;
      const double log_p = (static_cast<double>(t[j]) - max_t) * inv_t - log_sum_p;
      // skew KL mixes alpha p + (1 - alpha) q, skew reverse KL (1 - alpha) p + alpha q
      const double x = (REVERSE ? lb : la) + log_p, y = (REVERSE ? la : lb) + log_q;
      const double hi = x > y ? x : y, lo = x > y ? y : x;
      const double lm = hi == -INFINITY ? -INFINITY : hi + std::log1p(std::exp(lo - hi));
      const double q = std::exp(log_q), p = std::exp(log_p);
      if constexpr (!REVERSE) {
        const bool on = p > tiny;
        const double qr = on ? std::exp(log_q + log_p - lm) : 0.0;
        loss += on ? p * (log_p - lm) : 0.0;
        if constexpr (WITH_GRAD) {
          exp_p[j] = static_cast<acc_t>(qr);
          row_sum += qr;
        }
      } else {
        const bool on = q > tiny;
        // q^2 / m is only used times alpha_g, and unbounded when that is 0 (alpha = 0: m = p)
        const double term = on ? q * (log_q - lm) : 0.0, qqm = on && alpha_g > 0 ? std::exp(2 * log_q - lm) : 0.0;
        loss += term;
        if constexpr (WITH_GRAD) {
          exp_p[j] = static_cast<acc_t>(term - alpha_g * qqm);
          row_sum += qqm;
        }
      }
    }
  }
  if constexpr (WITH_GRAD) {
    // pass 4: the gradient, written once in the logits' dtype
    if constexpr (!REVERSE) {
      const acc_t c = row_scale * beta * inv_t, S = static_cast<acc_t>(row_sum);
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) grad_row[j] = static_cast<scalar_t>(c * (exp_q[j] * inv_q * S - exp_p[j]));
    } else {
      const acc_t k = static_cast<acc_t>(loss - static_cast<double>(alpha_g) * row_sum), c = row_scale * inv_t;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) grad_row[j] = static_cast<scalar_t>(c * (exp_p[j] - exp_q[j] * inv_q * k));
    }
  }
  return static_cast<acc_t>(loss);
}

template <bool REVERSE, bool WITH_GRAD, typename scalar_t, typename acc_t>
void skew_kl_rows(const scalar_t* student, const scalar_t* teacher, const acc_t* scale, int64_t rows,
                  const RowArgs<acc_t>& a, acc_t* loss, scalar_t* grad) {
  const int64_t V = a.vocab;
  constexpr bool kStageHalf = std::is_same_v<scalar_t, c10::Half>;
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> exp_q(V), exp_p(V);
    std::vector<float> s_f(kStageHalf ? V : 0), t_f(kStageHalf ? V : 0), g_f(kStageHalf && WITH_GRAD ? V : 0);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* grad_row = WITH_GRAD ? grad + i * V : nullptr;
      if (scale[i] == acc_t(0)) {
        loss[i] = 0;
        if constexpr (WITH_GRAD) std::memset(static_cast<void*>(grad_row), 0, sizeof(scalar_t) * V);
        continue;
      }
      if constexpr (kStageHalf) {
        half_to_float(student + i * V, s_f.data(), V);
        half_to_float(teacher + i * V, t_f.data(), V);
        loss[i] = skew_kl_row<REVERSE, WITH_GRAD>(s_f.data(), t_f.data(), g_f.data(), exp_q.data(), exp_p.data(), a,
                                                  scale[i]);
        if constexpr (WITH_GRAD) float_to_half(g_f.data(), grad_row, V);
      } else {
        loss[i] = skew_kl_row<REVERSE, WITH_GRAD>(student + i * V, teacher + i * V, grad_row, exp_q.data(),
                                                  exp_p.data(), a, scale[i]);
      }
    }
  });
}

void check_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& scale) {
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "student_logits must be contiguous [N, V]");
  TORCH_CHECK(teacher.sizes() == student.sizes() && teacher.is_contiguous(),
              "teacher_logits must be contiguous with the shape of student_logits");
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "student_logits and teacher_logits dtypes differ");
  const auto acc = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.scalar_type() == acc && scale.is_contiguous() && scale.dim() == 1 &&
                  scale.size(0) == student.size(0) && scale.device() == student.device(),
              "scale must be contiguous [N] float32 (float64 for float64 logits) on the logits' device");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> skew_kl_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                       const at::Tensor& scale, double alpha, double inv_temperature,
                                                       bool reverse, bool detach_mixture, bool with_grad) {
  check_inputs(student, teacher, scale);
  TORCH_CHECK(student.device().is_cpu() && teacher.device().is_cpu(), "skew_kl_forward_cpu needs CPU tensors");
  const int64_t rows = student.size(0), vocab = student.size(1);
  const auto loss_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor loss = at::empty({rows}, student.options().dtype(loss_dtype));
  at::Tensor grad = with_grad ? at::empty_like(student) : at::empty({0}, student.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "skew_kl_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const RowArgs<acc_t> a{vocab, static_cast<acc_t>(alpha), static_cast<acc_t>(inv_temperature),
                           detach_mixture ? acc_t(0) : static_cast<acc_t>(alpha)};
    const acc_t* sc = scale.data_ptr<acc_t>();
    const scalar_t* s = student.data_ptr<scalar_t>();
    const scalar_t* t = teacher.data_ptr<scalar_t>();
    acc_t* l = loss.data_ptr<acc_t>();
    scalar_t* g = with_grad ? grad.data_ptr<scalar_t>() : nullptr;
    if (reverse) {
      if (with_grad) skew_kl_rows<true, true>(s, t, sc, rows, a, l, g);
      else skew_kl_rows<true, false>(s, t, sc, rows, a, l, g);
    } else {
      if (with_grad) skew_kl_rows<false, true>(s, t, sc, rows, a, l, g);
      else skew_kl_rows<false, false>(s, t, sc, rows, a, l, g);
    }
  });
  return {loss, grad};
}

// The vectorised exp and log on a float32 tensor, exposed so that the tests measure their accuracy.
std::tuple<at::Tensor, at::Tensor> skew_kl_exp_log_cpu(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), "x must be a float32 CPU tensor");
  const at::Tensor xc = x.contiguous();
  at::Tensor e = at::empty_like(xc), l = at::empty_like(xc);
  const float* px = xc.data_ptr<float>();
  float *pe = e.data_ptr<float>(), *pl = l.data_ptr<float>();
  const int64_t n = xc.numel();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    pe[i] = vexp(px[i]);
    pl[i] = vlog(px[i]);
  }
  return {e, l};
}

void bind_skew_kl(pybind11::module_& m) {
  namespace py = pybind11;
  const char* doc =
      "(student [N,V], teacher [N,V] same dtype, scale [N] float32 (float64 for float64), alpha, inv_temperature, "
      "reverse, detach_mixture, with_grad) -> (loss [N] in scale's dtype (0 where scale == 0), "
      "d(sum_i scale_i loss_i)/dstudent [N,V] or an empty tensor)";
  m.def("skew_kl_forward_cpu", &skew_kl_forward_cpu, doc, py::arg("student"), py::arg("teacher"), py::arg("scale"),
        py::arg("alpha"), py::arg("inv_temperature"), py::arg("reverse"), py::arg("detach_mixture"),
        py::arg("with_grad"), py::call_guard<py::gil_scoped_release>());
  m.def("skew_kl_exp_log_cpu", &skew_kl_exp_log_cpu, "(x float32) -> (vexp(x), vlog(x)) of the CPU kernels",
        py::arg("x"), py::call_guard<py::gil_scoped_release>());
#ifdef DISTILLKIT_WITH_CUDA
  m.def("skew_kl_forward_cuda", &skew_kl_forward_cuda, doc, py::arg("student"), py::arg("teacher"),
        py::arg("scale"), py::arg("alpha"), py::arg("inv_temperature"), py::arg("reverse"), py::arg("detach_mixture"),
        py::arg("with_grad"), py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace distillkit
