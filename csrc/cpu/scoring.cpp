// Answer log-probs for CoRD's meta-prover: out[m] = logit[m, ids[m]] - logsumexp_v logit[m, v],
// logit = hidden @ weight.T + bias, without ever holding [M, V] logits.
//
// Work on paper (M answer rows, V vocabulary, H hidden): 2*M*V*H FLOPs, V*H weight bytes read once,
// M*V exps. For the CPU shape M=1024, V=32000, H=512 fp32 that is 33.5 GFLOP (~0.21 s at the
// ~156 GFLOP/s fp32 GEMM rate of this 2-core machine) against a 65.5 MB weight read (~4 ms at
// memcpy speed) and 33M exps: the op is a GEMM with a fused row reduction, compute bound for M >= ~64.
//
// Design: the vocabulary is cut into chunks of `chunk` rows of W. at::parallel_for starts one worker per
// thread; each worker claims chunks from a shared atomic counter (v3; v1 gave each thread a fixed
// contiguous range), so every W tile is read from memory exactly once and reused across all M rows.
// Per chunk a worker
//   1. computes the [M, chunk] float32 logit tile with at::mm_out into a worker-local buffer (MKL
//      sgemm; called inside the parallel region it runs on this thread only),
//   2. adds the bias and folds the tile into its per-row online (max, sum exp) and picks the answer
//      logit of rows whose id falls in this chunk (exactly one chunk owns each row's id).
// A final combine merges the workers' partial (max, sum) pairs per row (sums kept in double).
// bf16/fp16/fp64 weights are converted tile by tile into a [chunk, H] float32 buffer (fp32 accumulation;
// the tile is hot in L2); CPU ATen has no bf16 x bf16 -> fp32-out mm (aten::mm.dtype is not registered
// for CPU in torch 2.13), and bf16 logits would round.
// Memory: workers * (M*chunk [+ chunk*H when upcast]) floats plus M*H floats for an upcast hidden -- O(M + H).
// Per tile: M=64 -> chunk 512, 128 KiB; M=1024 -> chunk 128, 512 KiB (fp32; 2 workers hold two).
//
// Why at::mm on bounded tiles instead of a hand-written dot loop (measured on this 2-core machine
// while other builds ran, load average ~9, so absolute numbers are ~4x slower than FACTS.md's):
//   v0 (rejected) blocked dot products, a 4 hidden rows x 4 W rows micro-tile, `#pragma omp simd`
//      reduction over H (vectorised to zmm): 0.7-0.9 GFLOP/s single-thread, against 17-23 GFLOP/s for
//      MKL sgemm on the same shapes in the same minute. A competitive register-blocked microkernel
//      is a BLAS project of its own; MKL already is one.
//   v1 at::mm_out on [M, chunk] tiles + fused online LSE: V=32000, H=512 fp32, 2 threads,
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
//   v3 (this) workers claim chunks dynamically (atomic counter) instead of a static split; running sums
//      in double; chunk also capped at V / (20 * workers) so all tiles stay under 0.05x eager's logits
//      on many-core machines. Same tile shapes as v1 at V=32000 on 2 threads. AMD EPYC (AVX2, 2 cores),
//      shared machine at load average 10-13, medians of 9 (M=64) / 5 (M=1024) interleaved rounds:
//      M=64: v3 0.55x eager's time, v1 0.53x, the bare [M, V] GEMM (h @ W.T alone) 0.90x;
//      M=1024: v3 0.71x, v1 0.87x, the bare GEMM 0.74x (v3 on par with the GEMM floor; the rest of
//      eager is the [M, V] log_softmax pass and its 250 MiB of fresh pages).
//   v3a (rejected; issue 19's proposal) one tile at a time over the vocabulary, each at::mm_out threaded
//      by the BLAS itself, then at::parallel_for over rows for the fold. Same run, same load: M=64 with
//      Vt=512/1024/2048: 5.8x/4.1x/2.7x eager; M=1024 with Vt=256/512/1024/2048: 2.9x/2.0x/1.5x/1.15x.
//      Two thread barriers per tile (the BLAS's and the fold's): on a shared machine every barrier waits
//      for whichever thread the OS descheduled, so the cost grows with the tile count; the memory goal
//      (all tiles <= 0.05x eager's) keeps at least ~10 tiles. The split-vocab design has one barrier.
// Chunk size: the [M, chunk] tile should stay in L2 (1 MB/core) so the exp pass reads it hot, and
// chunks should be fat enough for sgemm to reach its rate: chunk = clamp(128K floats / M, 64, 512)
// (v3: 128K / (M + H) when W is upcast, and at most V / (20 * workers)).
// Chunk sweep (same loaded machine, noisy): M=64 best at 256-512 (64: +40%); M=1024 within noise
// for 128-512.
// exp: -ffast-math is off, so std::exp does not vectorise; exp_nonpositive (vec_math.h) (Cephes expf range
// reduction + degree-6 polynomial; max relative error 8.5e-8 = 1.4 ulp over every float in [-87, 0],
// checked exhaustively against double exp) is a plain
// arithmetic function that `#pragma omp simd` vectorises. Its accuracy is covered by the float64
// comparison in tests/ops/test_scoring.py.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#include "distillkit.h"
#include "vec_math.h"

namespace distillkit {

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Folds one [M, n] float32 logit tile (vocabulary rows v0..v0+n) into per-row running (max, sum exp)
// and picks answer logits. `tile` is modified in place (bias added).
void fold_tile(float* tile, int64_t M, int64_t n, int64_t v0, const float* bias, const int64_t* ids,
               float* run_max, double* run_sum, float* answer_logit) {
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
    const double old = run_max[m] == kNegInf ? 0.0 : run_sum[m] * std::exp(static_cast<double>(run_max[m] - new_max));
    run_sum[m] = old + s;
    run_max[m] = new_max;
    const int64_t id = ids[m];
    if (id >= v0 && id < v0 + n) answer_logit[m] = row[id - v0];
  }
}

// Vocabulary rows per tile. A worker's [M, chunk] logit tile (plus its [chunk, H] fp32 copy of W when
// the weight is upcast) should fit in ~512 KB of its L2 so the fold reads it hot, sgemm wants chunk >= 64,
// and all workers' tiles together stay under 1/20 of eager's [M, V] logits (the memory goal).
int64_t auto_tile_rows(int64_t M, int64_t V, int64_t upcast_H, int64_t workers) {
  int64_t c = (int64_t{1} << 17) / std::max<int64_t>(M + upcast_H, 1);
  c = std::min<int64_t>({512, c, V / (20 * workers)});
  return std::max<int64_t>(64, c / 16 * 16);
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
  const bool upcast = weight.scalar_type() != at::kFloat;
  const int64_t max_workers = std::max<int64_t>(1, at::get_num_threads());
  if (chunk <= 0) chunk = auto_tile_rows(M, V, upcast ? H : 0, max_workers);
  chunk = std::min(chunk, V);
  const at::Tensor h32 = hidden.to(at::kFloat).contiguous();
  const int64_t n_chunks = (V + chunk - 1) / chunk;
  const int64_t n_workers = std::min(max_workers, n_chunks);
  std::vector<float> part_max(n_workers * M, kNegInf), answer_logit(M, 0.0f);
  std::vector<double> part_sum(n_workers * M, 0.0);
  const float* bias_ptr = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t* ids = answer_ids.data_ptr<int64_t>();
  std::atomic<int64_t> next_chunk{0};

  // One work item per worker slot; a worker claims chunks from a shared counter until none are left,
  // so a thread the OS delays (shared machine) takes fewer chunks instead of stalling the others.
  at::parallel_for(0, n_workers, 1, [&](int64_t w_begin, int64_t w_end) {
    at::Tensor tile = at::empty({M * chunk}, f32);                           // [M, chunk] logits
    at::Tensor wbuf = upcast ? at::empty({chunk, H}, f32) : at::Tensor();   // [chunk, H] fp32 W tile
    for (int64_t slot = w_begin; slot < w_end; ++slot) {
      float* run_max = part_max.data() + slot * M;
      double* run_sum = part_sum.data() + slot * M;
      for (int64_t c = next_chunk.fetch_add(1); c < n_chunks; c = next_chunk.fetch_add(1)) {
        const int64_t v0 = c * chunk, n = std::min(chunk, V - v0);
        at::Tensor w = weight.narrow(0, v0, n);
        if (upcast) w = wbuf.narrow(0, 0, n).copy_(w);
        at::Tensor logits = tile.narrow(0, 0, M * n).view({M, n});
        at::mm_out(logits, h32, w.t());  // inside the parallel region the BLAS runs on this thread only
        fold_tile(logits.data_ptr<float>(), M, n, v0, bias_ptr, ids, run_max, run_sum, answer_logit.data());
      }
    }
  });

  float* o = out.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    float gmax = kNegInf;
    for (int64_t t = 0; t < n_workers; ++t) gmax = std::max(gmax, part_max[t * M + m]);
    double s = 0.0;
    for (int64_t t = 0; t < n_workers; ++t) {
      const float pm = part_max[t * M + m];
      if (pm != kNegInf) s += part_sum[t * M + m] * std::exp(static_cast<double>(pm - gmax));
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
