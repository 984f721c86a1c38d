// Raw-pointer launchers of the CUDA kernels (defined in csrc/cuda/*.cu, called by the *_host.cpp
// wrappers): one declaration that both sides compile against. No torch headers (nvcc time).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/dtype.h"

namespace distillkit {

// ---- merge.cu: float32, float64, bfloat16, float16 ----
// targets[t] <- sum_k weights[k] sources[k][t] over tables built by merge_host.cpp (layout: merge.cu's header).
void launch_merge_average(DType dtype, const int64_t* ptrs, const int64_t* numels, const int32_t* chunk_tensor,
                          const int64_t* chunk_start, const uint8_t* aligned, const double* weights, int K,
                          int64_t num_chunks, int64_t chunk_elems, cudaStream_t stream);

// ---- scoring.cu: float32, bfloat16, float16 ----
// requested_splits <= 0: automatic. Writes the number of vocabulary splits S and the vocabulary rows per split.
void plan_answer_logprobs(DType dtype, int64_t M, int64_t V, int64_t requested_splits, int device, int64_t* splits,
                          int64_t* v_per_split);
// partials: [3, S, M] float32 scratch (max, sum, answer). bias may be nullptr. Launches nothing for another dtype.
void launch_answer_logprobs(DType dtype, const void* hidden, const void* weight, const float* bias,
                            const int64_t* ids, float* partials, float* out, int64_t M, int64_t V, int64_t H,
                            int64_t splits, int64_t v_per_split, cudaStream_t stream);

// ---- skew_kl.cu: float32, float64, bfloat16, float16 ----
// scale and loss are float32 (float64 for float64); grad (nullptr unless with_grad) has the logits' dtype.
cudaError_t launch_skew_kl_forward(DType dtype, const void* student, const void* teacher, const void* scale,
                                   void* loss, void* grad, int64_t rows, int64_t vocab, double alpha,
                                   double inv_temperature, bool detach_mixture, bool reverse, bool with_grad,
                                   cudaStream_t stream);

// ---- validity.cu: float32, bfloat16, float16 (both inputs the same) ----
// Returns a cudaError_t.
int launch_teacher_likelihood_validity(const void* zt, const void* zs, float* out, int64_t rows, int64_t vocab,
                                       DType dtype, int top_k, float gamma, float log_lo, float log_hi, float eps,
                                       cudaStream_t stream);

}  // namespace distillkit
