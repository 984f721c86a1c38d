// Answer log-probs for CoRD's meta-prover: out[m] = logit[m, ids[m]] - logsumexp_v logit[m, v],
// logit = hidden @ weight.T + bias, without ever holding [M, V] logits.
//
// Work on paper (M answer rows, V vocabulary, H hidden): 2*M*V*H FLOPs, V*H weight bytes read once,
// M*V exps. For the CPU shape M=1024, V=32000, H=512 fp32 that is 33.5 GFLOP (~0.21 s at the
// ~156 GFLOP/s fp32 GEMM rate of this 2-core machine) against a 65.5 MB weight read (~4 ms at
// memcpy speed) and 33M exps: the op is a GEMM with a fused row reduction, compute bound for M >= ~64.
//
// Design: the vocabulary is cut into chunks of `chunk` rows of W; at::parallel_for hands each thread
// a contiguous range of chunks (split-vocab), so every W tile is read from memory exactly once and
// reused across all M rows. Per chunk a thread
//   1. computes the [M, chunk] float32 logit tile with at::mm_out into a thread-local buffer (MKL
//      sgemm; called inside the parallel region it runs on this thread only),
//   2. adds the bias and folds the tile into its per-row online (max, sum exp) and picks the answer
//      logit of rows whose id falls in this chunk (exactly one chunk owns each row's id).
// A final combine merges the threads' partial (max, sum) pairs per row. bf16/fp16 weights are
// upcast tile by tile into a [chunk, H] float32 buffer (fp32 accumulation; the tile is hot in L2).
// Memory: threads * (M*chunk + chunk*H) floats plus M*H floats for the upcast hidden -- O(M + H).
//
// Why at::mm on bounded tiles instead of a hand-written dot loop (measured on this 2-core machine
// while other builds ran, load average ~9, so absolute numbers are ~4x slower than FACTS.md's):
//   v0 (rejected) blocked dot products, a 4 hidden rows x 4 W rows micro-tile, `#pragma omp simd`
//      reduction over H (vectorised to zmm): 0.7-0.9 GFLOP/s single-thread, against 17-23 GFLOP/s for
//      MKL sgemm on the same shapes in the same minute. A competitive register-blocked microkernel
//      is a BLAS project of its own; MKL already is one.
//   v1 (this) at::mm_out on [M, chunk] tiles + fused online LSE: V=32000, H=512 fp32, 2 threads,
//      bench/bench_scoring.py, three runs on the loaded machine: M=64 100-144 ms = 0.51-0.66x eager's
//      time at 76-98% of the rate of a 1024^3 matmul measured in the same run, peak 3.3 MiB vs
//      eager's 16 MiB; M=1024 1.48-1.88 s = 0.86-1.09x eager (both are the same GEMM: 82-104% of
//      that floor), peak 1.5 MiB vs eager's 250 MiB. Cost of the fused LSE pass, probed with
//      H=1 (no GEMM work) at M=1024 in one loaded minute: kernel 380 ms, bare [M,V] mm 189 ms, a
//      torch.exp over the same 32.8M floats 166 ms -> the fold costs about one vectorised exp pass,
//      (estimated at a few % of the H=512 time on an unloaded machine).
//   v2 (rejected) bf16 weights through at::native::cpublas::brgemm (bf16 x bf16 -> fp32; this CPU
//      has avx512_bf16 but no AMX, so could_pack() is false and the non-VNNI path needs each W tile
//      transposed to [H, n] first). Correct to 1e-6, but M=64 took 196 ms vs 82 ms for v1's
//      upcast-to-fp32 tiles (the strided transpose dominates) and M=1024 was within the noise of v1
//      (1.70 s vs 1.46 s, loaded machine). Eager bf16 (bf16 logits, rounded) was 88 ms / 1.10 s:
//      v1 is 0.9x eager at M=64 and ~1.5-1.7x at M=1024 in bf16. A VNNI-packed brgemm on AMX
//      machines is the way to close that gap.
// Chunk size: the [M, chunk] tile should stay in L2 (1 MB/core) so the exp pass reads it hot, and
// chunks should be fat enough for sgemm to reach its rate: chunk = clamp(128K floats / M, 64, 512).
// Chunk sweep (same loaded machine, noisy): M=64 best at 256-512 (64: +40%); M=1024 within noise
// for 128-512.
// exp: -ffast-math is off, so std::exp does not vectorise; exp_nonpositive (vec_math.h) (Cephes expf range
// reduction + degree-6 polynomial; max relative error 8.5e-8 = 1.4 ulp over every float in [-87, 0],
// checked exhaustively against double exp) is a plain
// arithmetic function that `#pragma omp simd` vectorises. Its accuracy is covered by the float64
// comparison in tests/ops/test_scoring.py.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "distillkit.h"
#include "vec_math.h"

namespace distillkit {

#ifdef DISTILLKIT_WITH_CUDA
// csrc/cuda/scoring_host.cpp
at::Tensor answer_logprobs_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& answer_ids,
                                const std::optional<at::Tensor>& bias, int64_t vocab_splits);
#endif

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

int64_t auto_chunk(int64_t M) {
  int64_t c = (int64_t{1} << 17) / std::max<int64_t>(M, 1);
  c = std::min<int64_t>(512, std::max<int64_t>(64, c));
  return c / 16 * 16;
}

// Folds one [M, n] float32 logit tile (vocabulary rows v0..v0+n) into per-row (max, sum) and picks
// answer logits. `tile` is modified in place (bias added).
void fold_tile(float* tile, int64_t M, int64_t n, int64_t v0, const float* bias, const int64_t* ids,
               float* run_max, float* run_sum, float* answer_logit) {
  for (int64_t m = 0; m < M; ++m) {
    float* row = tile + m * n;
    float mx = kNegInf;
    if (bias != nullptr) {
      const float* b = bias + v0;
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < n; ++j) {
        row[j] += b[j];
        mx = std::max(mx, row[j]);
      }
    } else {
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < n; ++j) mx = std::max(mx, row[j]);
    }
    const float new_max = std::max(run_max[m], mx);
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < n; ++j) s += exp_nonpositive(row[j] - new_max);
    // run_max is -inf before the first tile; its sum is 0 then, so skip the (-inf) - x rescale.
    const float old = run_max[m] == kNegInf ? 0.0f : run_sum[m] * std::exp(run_max[m] - new_max);
    run_sum[m] = old + s;
    run_max[m] = new_max;
    const int64_t id = ids[m];
    if (id >= v0 && id < v0 + n) answer_logit[m] = row[id - v0];
  }
}

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& answer_ids,
                  const std::optional<at::Tensor>& bias, c10::DeviceType device) {
  TORCH_CHECK(hidden.device().type() == device && weight.device().type() == device &&
                  answer_ids.device().type() == device,
              "answer_logprobs: hidden, weight and answer_ids must be on ", device);
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "answer_logprobs: expected hidden [M, H] and weight [V, H]");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "answer_logprobs: hidden and weight dtypes differ");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "answer_logprobs: hidden/weight must be contiguous");
  TORCH_CHECK(answer_ids.scalar_type() == at::kLong && answer_ids.dim() == 1 && answer_ids.size(0) == hidden.size(0)
                  && answer_ids.is_contiguous(),
              "answer_logprobs: answer_ids must be contiguous int64 [M]");
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().type() == device && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0) && bias->is_contiguous(),
                "answer_logprobs: bias must be contiguous float32 [V]");
  }
}

}  // namespace

// hidden [M, H], weight [V, H] (same floating dtype), answer_ids [M] int64 in [0, V) (checked by the
// Python API), bias [V] float32 or None; chunk = vocabulary rows per tile (0: automatic).
// Returns float32 [M].
at::Tensor answer_logprobs_cpu(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& answer_ids,
                               const std::optional<at::Tensor>& bias, int64_t chunk) {
  check_inputs(hidden, weight, answer_ids, bias, c10::DeviceType::CPU);
  at::NoGradGuard no_grad;
  const int64_t M = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor out = at::empty({M}, f32);
  if (M == 0) return out;
  if (chunk <= 0) chunk = auto_chunk(M);
  chunk = std::min(chunk, V);
  const bool upcast = weight.scalar_type() != at::kFloat;
  const at::Tensor h32 = hidden.to(at::kFloat).contiguous();
  const int64_t n_chunks = (V + chunk - 1) / chunk;
  const int64_t n_threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
  std::vector<float> part_max(n_threads * M, kNegInf), part_sum(n_threads * M, 0.0f), answer_logit(M, 0.0f);
  const float* bias_ptr = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t* ids = answer_ids.data_ptr<int64_t>();

  // One work item per partial slot; a slot owns a contiguous range of chunks, so each slot's
  // (max, sum) is written by exactly one thread whatever way parallel_for groups the items.
  at::parallel_for(0, n_threads, 1, [&](int64_t slot_begin, int64_t slot_end) {
    at::Tensor tile = at::empty({M * chunk}, f32);
    at::Tensor wbuf = upcast ? at::empty({chunk, H}, f32) : at::Tensor();
    for (int64_t slot = slot_begin; slot < slot_end; ++slot) {
      float* run_max = part_max.data() + slot * M;
      float* run_sum = part_sum.data() + slot * M;
      const int64_t c_begin = slot * n_chunks / n_threads, c_end = (slot + 1) * n_chunks / n_threads;
      for (int64_t c = c_begin; c < c_end; ++c) {
        const int64_t v0 = c * chunk, n = std::min(chunk, V - v0);
        at::Tensor w = weight.narrow(0, v0, n);
        if (upcast) w = wbuf.narrow(0, 0, n).copy_(w);
        at::Tensor logits = tile.narrow(0, 0, M * n).view({M, n});
        at::mm_out(logits, h32, w.t());
        fold_tile(logits.data_ptr<float>(), M, n, v0, bias_ptr, ids, run_max, run_sum, answer_logit.data());
      }
    }
  });

  float* o = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    float gmax = kNegInf;
    for (int64_t t = 0; t < n_threads; ++t) gmax = std::max(gmax, part_max[t * M + m]);
    double s = 0.0;
    for (int64_t t = 0; t < n_threads; ++t) {
      const float pm = part_max[t * M + m];
      if (pm != kNegInf) s += static_cast<double>(part_sum[t * M + m]) * std::exp(static_cast<double>(pm - gmax));
    }
    o[m] = answer_logit[m] - (gmax + static_cast<float>(std::log(s)));
  }
  return out;
}

void bind_scoring(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("answer_logprobs_cpu", &answer_logprobs_cpu,
        "answer_logprobs_cpu(hidden [M,H], weight [V,H], answer_ids [M] int64, bias [V] float32 | None, chunk=0)"
        " -> float32 [M]: log softmax(hidden @ weight.T + bias)[m, answer_ids[m]], vocabulary-chunked",
        py::arg("hidden"), py::arg("weight"), py::arg("answer_ids"), py::arg("bias") = py::none(),
        py::arg("chunk") = 0, py::call_guard<py::gil_scoped_release>());
#ifdef DISTILLKIT_WITH_CUDA
  m.def("answer_logprobs_cuda", &answer_logprobs_cuda,
        "answer_logprobs_cuda(hidden [M,H], weight [V,H], answer_ids [M] int64, bias [V] float32 | None,"
        " vocab_splits=0) -> float32 [M]",
        py::arg("hidden"), py::arg("weight"), py::arg("answer_ids"), py::arg("bias") = py::none(),
        py::arg("vocab_splits") = 0, py::call_guard<py::gil_scoped_release>());
#endif
}

}  // namespace distillkit
