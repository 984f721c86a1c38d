// Skew KL / skew reverse KL at the logits level (DistiLLM), CUDA kernels and a raw-pointer launcher.
// Formulas and gradient: csrc/cpu/skew_kl.cpp's header. No torch headers here (nvcc time); the
// at::Tensor wrapper is csrc/cuda/skew_kl_host.cpp.
//
// One 512-thread block per token row, three sweeps over the row (a 128k-entry row does not fit in
// shared memory twice):
//   1. per-thread online max / sum of exp for student and teacher, then block reductions
//   2. loss and the gradient's row sum (S for skew KL, A for skew reverse KL)
//   3. the gradient, written once in the logits' dtype (only when asked)
// Loads are 16-byte vectors when the row length allows it (every row then starts 16-byte aligned).
// Bytes per element: reads 2 x 3 (the re-reads of sweeps 2 and 3 mostly hit L2: a block's rows are
// 2 x V x sizeof(T), e.g. 0.5 MiB for V=128256 bf16) + 1 write. DRAM floor 2 reads + 1 write:
// N=8192, V=128256 bf16 -> 6.3 GB -> ~2.1 ms at 3 TB/s (H100). Math: 2 exp + 1 log + 1 div per
// element per sweep, with --use_fast_math far below the memory time.
//
// History:
//   v1  as above (not yet timed on a GPU: the project's CI has none).
//   v2  NaN / +inf / all -inf rows give a NaN loss and gradient (the probability guards used to drop every
//       term: a clean 0); elements whose mixture is below the smallest normal number (alpha = 0, far-apart
//       distributions) take a log-space slow path instead of log(0) = -inf. Compiled only, not yet run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstdint>

#include "cuda/launch.h"

namespace distillkit {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_acc(float x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <typename T>
__device__ __forceinline__ T from_acc(double x) { return x; }

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }
__device__ __forceinline__ float fast_log(float x) { return __logf(x); }
__device__ __forceinline__ double fast_log(double x) { return log(x); }

// probabilities below this count as 0: alpha * p must not be flushed to a zero mixture while p > 0
// (p * log(p / 0) = inf for a term worth < 1e-28); same constant as the CPU and Triton kernels
template <typename acc_t>
__device__ __forceinline__ acc_t tiny_prob() { return sizeof(acc_t) == 8 ? acc_t(1e-290) : acc_t(1e-30); }

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum (MAX=false) or max (MAX=true) over the block, returned to every thread. scratch: kWarps entries.
template <bool MAX, typename acc_t>
__device__ acc_t block_reduce(acc_t v, acc_t* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = MAX ? warp_max(v) : warp_sum(v);
  __syncthreads();  // scratch may still be read by a previous reduction
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kWarps ? scratch[lane] : (MAX ? -INFINITY : acc_t(0));
  return MAX ? warp_max(v) : warp_sum(v);
}

// (row max of x / T, log sum exp(x / T - max)) over one row, for every thread of the block.
template <typename scalar_t, int VEC, typename acc_t>
__device__ void row_log_sum_exp(const scalar_t* __restrict__ row, int64_t V, acc_t inv_t, acc_t* scratch,
                                acc_t& row_max, acc_t& log_sum) {
  acc_t run_max = -INFINITY, run_sum = 0;
  bool nan_seen = false;  // fmax drops a NaN (and a thread's first NaN would read as "only -inf so far")
  const int64_t packs = V / VEC;
  const Pack<scalar_t, VEC>* vrow = reinterpret_cast<const Pack<scalar_t, VEC>*>(row);
  for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
    const Pack<scalar_t, VEC> pk = vrow[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t x = to_acc(pk.v[k]) * inv_t;
      nan_seen = nan_seen || isnan(x);
      const acc_t new_max = fmax(run_max, x);
      // a thread that has seen only -inf keeps sum 0 (exp(-inf - -inf) would be NaN); a NaN x is
      // dropped by fmax but poisons run_sum, so the row's loss is NaN
      run_sum = new_max == -INFINITY ? acc_t(0)
                                     : run_sum * fast_exp(run_max - new_max) + fast_exp(x - new_max);
      run_max = new_max;
    }
  }
  row_max = block_reduce<true>(run_max, scratch);
  const acc_t scaled = nan_seen ? acc_t(NAN) : (run_max == -INFINITY ? acc_t(0) : run_sum * fast_exp(run_max - row_max));
  log_sum = fast_log(block_reduce<false>(scaled, scratch));
}

// log(w_p p + w_q q) in log space from log p, log q and the weights' logs (-inf for a zero weight): the
// slow path for the rare elements whose probability-space mixture is below the smallest normal number
// (alpha near 0 or 1 with far-apart distributions), where log m would be -inf and the term inf.
template <typename acc_t>
__device__ __forceinline__ acc_t log_mix(acc_t log_p, acc_t log_q, acc_t log_wp, acc_t log_wq) {
  const acc_t x = log_wp + log_p, y = log_wq + log_q;
  const acc_t hi = fmax(x, y), lo = fmin(x, y);
  return hi == -INFINITY ? hi : hi + log1p(exp(lo - hi));
}

template <typename acc_t>
__device__ __forceinline__ acc_t min_normal() { return sizeof(acc_t) == 8 ? acc_t(DBL_MIN) : acc_t(FLT_MIN); }

// What one row's elements need: the softmax statistics and the mixture weights.
template <typename acc_t>
struct RowStats {
  acc_t inv_t, max_s, log_sum_s, max_t, log_sum_t;
  acc_t alpha, beta, alpha_in_grad, log_alpha, log_beta;  // log weights: -inf for a zero weight
};

// One element's (q, loss term, ratio term), both 0 where the distribution the KL is taken over (p for the
// skew KL, q for the reverse one) is below tiny. ratio = q p / m (skew KL) or q^2 / m (reverse; only used
// times alpha_in_grad and unbounded when that is 0, where m = p: then 0). The mixture m takes the log-space
// slow path below the smallest normal number. Both sweeps call this, so they use the same numbers.
template <bool REVERSE, typename acc_t>
__device__ __forceinline__ void element_terms(acc_t x_s, acc_t x_t, const RowStats<acc_t>& r, acc_t& q, acc_t& term,
                                              acc_t& ratio) {
  // (x / T - max) - log_sum: the max is subtracted first so that large logits keep their low bits
  const acc_t log_q = (x_s * r.inv_t - r.max_s) - r.log_sum_s;
  const acc_t log_p = (x_t * r.inv_t - r.max_t) - r.log_sum_t;
  q = fast_exp(log_q);
  const acc_t p = fast_exp(log_p);
  term = 0;
  ratio = 0;
  const acc_t w = REVERSE ? q : p, log_w = REVERSE ? log_q : log_p;
  if (!(w > tiny_prob<acc_t>())) return;
  const acc_t m = REVERSE ? r.beta * p + r.alpha * q : r.alpha * p + r.beta * q;
  const bool fast = m >= min_normal<acc_t>();
  const acc_t lm = fast ? fast_log(m)
                        : (REVERSE ? log_mix(log_p, log_q, r.log_beta, r.log_alpha)
                                   : log_mix(log_p, log_q, r.log_alpha, r.log_beta));
  term = w * (log_w - lm);
  if (REVERSE) {
    if (r.alpha_in_grad > acc_t(0)) ratio = fast ? q * (q / m) : fast_exp(2 * log_q - lm);
  } else {
    ratio = fast ? q * (p / m) : fast_exp(log_q + log_p - lm);
  }
}

template <typename scalar_t, int VEC, bool REVERSE, bool WITH_GRAD>
__global__ void __launch_bounds__(kThreads)
    skew_kl_fwd_kernel(const scalar_t* __restrict__ student,  // [N, V]
                       const scalar_t* __restrict__ teacher,  // [N, V]
                       const typename AccOf<scalar_t>::type* __restrict__ scale,  // [N]; 0 skips the row
                       typename AccOf<scalar_t>::type* __restrict__ loss,         // [N]
                       scalar_t* __restrict__ grad,  // [N, V]: scale_i dloss_i/ds_i, or nullptr
                       int64_t V, typename AccOf<scalar_t>::type alpha, typename AccOf<scalar_t>::type inv_t,
                       typename AccOf<scalar_t>::type alpha_in_grad,  // alpha, or 0: detached mixture
                       typename AccOf<scalar_t>::type log_alpha,      // log(alpha), -inf for 0
                       typename AccOf<scalar_t>::type log_beta) {     // log(1 - alpha), -inf for 0
  using acc_t = typename AccOf<scalar_t>::type;
  __shared__ acc_t scratch[kWarps];
  const int64_t row = blockIdx.x;
  const int64_t packs = V / VEC;
  using P = Pack<scalar_t, VEC>;
  const P* s_row = reinterpret_cast<const P*>(student + row * V);
  const P* t_row = reinterpret_cast<const P*>(teacher + row * V);
  P* g_row = WITH_GRAD ? reinterpret_cast<P*>(grad + row * V) : nullptr;

  const acc_t row_scale = scale[row];
  if (row_scale == acc_t(0)) {  // uniform across the block
    if (threadIdx.x == 0) loss[row] = 0;
    if (WITH_GRAD) {
      P zero;
#pragma unroll
      for (int k = 0; k < VEC; ++k) zero.v[k] = from_acc<scalar_t>(acc_t(0));
      for (int64_t i = threadIdx.x; i < packs; i += kThreads) g_row[i] = zero;
    }
    return;
  }

  acc_t max_s, log_sum_s, max_t, log_sum_t;
  row_log_sum_exp<scalar_t, VEC>(student + row * V, V, inv_t, scratch, max_s, log_sum_s);
  row_log_sum_exp<scalar_t, VEC>(teacher + row * V, V, inv_t, scratch, max_t, log_sum_t);
  const RowStats<acc_t> r{inv_t, max_s, log_sum_s, max_t, log_sum_t, alpha, acc_t(1) - alpha, alpha_in_grad,
                          log_alpha, log_beta};
  if (!(isfinite(max_s) && isfinite(max_t) && isfinite(log_sum_s) && isfinite(log_sum_t))) {
    // NaN or +inf in the row, or a row of -inf: no defined loss. NaN, rather than the clean 0 the
    // probability guards below would give (the values are the same in every thread: uniform exit).
    if (threadIdx.x == 0) loss[row] = acc_t(NAN);
    if (WITH_GRAD) {
      P nan;
#pragma unroll
      for (int k = 0; k < VEC; ++k) nan.v[k] = from_acc<scalar_t>(acc_t(NAN));
      for (int64_t i = threadIdx.x; i < packs; i += kThreads) g_row[i] = nan;
    }
    return;
  }

  acc_t part_loss = 0, part_sum = 0;
  for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
    const P sp = s_row[i], tp = t_row[i];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t q, term, ratio;
      element_terms<REVERSE>(to_acc(sp.v[k]), to_acc(tp.v[k]), r, q, term, ratio);
      part_loss += term;
      part_sum += ratio;
    }
  }
  const acc_t row_loss = block_reduce<false>(part_loss, scratch);
  if (threadIdx.x == 0) loss[row] = row_loss;
  if (!WITH_GRAD) return;
  const acc_t row_sum = block_reduce<false>(part_sum, scratch);
  const acc_t k_rev = row_loss - alpha_in_grad * row_sum;  // skew reverse KL: sum_j q_j h_j
  for (int64_t i = threadIdx.x; i < packs; i += kThreads) {
    const P sp = s_row[i], tp = t_row[i];
    P out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      acc_t q, term, ratio;
      element_terms<REVERSE>(to_acc(sp.v[k]), to_acc(tp.v[k]), r, q, term, ratio);
      const acc_t g = REVERSE ? row_scale * inv_t * ((term - alpha_in_grad * ratio) - q * k_rev)  // h - q k
                              : row_scale * r.beta * inv_t * (q * row_sum - ratio);
      out.v[k] = from_acc<scalar_t>(g);
    }
    g_row[i] = out;
  }
}

template <typename scalar_t, int VEC>
cudaError_t launch_typed(const void* student, const void* teacher, const void* scale, void* loss, void* grad,
                         int64_t rows, int64_t vocab, double alpha, double inv_temperature, bool detach_mixture,
                         bool reverse, bool with_grad, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  const auto* s = static_cast<const scalar_t*>(student);
  const auto* t = static_cast<const scalar_t*>(teacher);
  const auto* sc = static_cast<const acc_t*>(scale);
  auto* l = static_cast<acc_t*>(loss);
  auto* g = static_cast<scalar_t*>(grad);
  const dim3 grid(static_cast<unsigned>(rows)), block(kThreads);
  const acc_t a = static_cast<acc_t>(alpha), it = static_cast<acc_t>(inv_temperature);
  const acc_t ag = detach_mixture ? acc_t(0) : a;
  const acc_t la = alpha > 0 ? static_cast<acc_t>(std::log(alpha)) : acc_t(-INFINITY);
  const acc_t lb = alpha < 1 ? static_cast<acc_t>(std::log1p(-alpha)) : acc_t(-INFINITY);
  if (reverse) {
    if (with_grad)
      skew_kl_fwd_kernel<scalar_t, VEC, true, true><<<grid, block, 0, stream>>>(s, t, sc, l, g, vocab, a, it,
                                                                                 ag, la, lb);
    else
      skew_kl_fwd_kernel<scalar_t, VEC, true, false><<<grid, block, 0, stream>>>(s, t, sc, l, g, vocab, a, it,
                                                                                  ag, la, lb);
  } else {
    if (with_grad)
      skew_kl_fwd_kernel<scalar_t, VEC, false, true><<<grid, block, 0, stream>>>(s, t, sc, l, g, vocab, a, it,
                                                                                  ag, la, lb);
    else
      skew_kl_fwd_kernel<scalar_t, VEC, false, false><<<grid, block, 0, stream>>>(s, t, sc, l, g, vocab, a, it,
                                                                                   ag, la, lb);
  }
  return cudaGetLastError();
}

template <typename scalar_t>
cudaError_t launch_vec(const void* student, const void* teacher, const void* scale, void* loss, void* grad,
                       int64_t rows, int64_t vocab, double alpha, double inv_temperature, bool detach_mixture,
                       bool reverse, bool with_grad, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(scalar_t);
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  // 16-byte packs need every row to start on a 16-byte boundary: aligned bases and V % kVec == 0
  if (vocab % kVec == 0 && aligned(student) && aligned(teacher) && (grad == nullptr || aligned(grad)))
    return launch_typed<scalar_t, kVec>(student, teacher, scale, loss, grad, rows, vocab, alpha, inv_temperature,
                                        detach_mixture, reverse, with_grad, stream);
  return launch_typed<scalar_t, 1>(student, teacher, scale, loss, grad, rows, vocab, alpha, inv_temperature,
                                   detach_mixture, reverse, with_grad, stream);
}

}  // namespace

cudaError_t launch_skew_kl_forward(DType dtype, const void* student, const void* teacher, const void* scale,
                                   void* loss, void* grad, int64_t rows, int64_t vocab, double alpha,
                                   double inv_temperature, bool detach_mixture, bool reverse, bool with_grad,
                                   cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  cudaError_t err = cudaErrorInvalidValue;  // left as is for a dtype outside the list
  dispatch_dtype<float, __half, __nv_bfloat16, double>(dtype, [&](auto tag) {
    err = launch_vec<typename decltype(tag)::type>(student, teacher, scale, loss, grad, rows, vocab, alpha,
                                                   inv_temperature, detach_mixture, reverse, with_grad, stream);
  });
  return err;
}

}  // namespace distillkit
