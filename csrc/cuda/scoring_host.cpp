// at::Tensor side of the CUDA answer log-probs (csrc/cuda/scoring.cu): checks, plan, scratch, launch.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <optional>

#include "cuda/dtype_aten.h"
#include "cuda/launch.h"
#include "distillkit.h"

namespace distillkit {

// hidden [M, H], weight [V, H] contiguous CUDA tensors of one dtype (float32/bfloat16/float16),
// answer_ids [M] int64 in [0, V) (range checked by the Python API), bias [V] float32 or None.
// vocab_splits <= 0 picks the split count from the SM count. Returns float32 [M].
at::Tensor answer_logprobs_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& answer_ids,
                                const std::optional<at::Tensor>& bias, int64_t vocab_splits) {
  TORCH_CHECK(hidden.is_cuda() && weight.device() == hidden.device() && answer_ids.device() == hidden.device(),
              "answer_logprobs_cuda: hidden, weight and answer_ids must be on one CUDA device");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "answer_logprobs_cuda: expected hidden [M, H] and weight [V, H]");
  TORCH_CHECK(hidden.scalar_type() == weight.scalar_type(), "answer_logprobs_cuda: hidden and weight dtypes differ");
  TORCH_CHECK(hidden.is_contiguous() && weight.is_contiguous(), "answer_logprobs_cuda: hidden/weight must be contiguous");
  TORCH_CHECK(answer_ids.scalar_type() == at::kLong && answer_ids.dim() == 1 && answer_ids.size(0) == hidden.size(0) &&
                  answer_ids.is_contiguous(),
              "answer_logprobs_cuda: answer_ids must be contiguous int64 [M]");
  const DType dtype = dtype_code(hidden.scalar_type(), "answer_logprobs_cuda",
                                 {DType::kFloat32, DType::kBFloat16, DType::kFloat16});
  const float* bias_ptr = nullptr;
  if (bias.has_value()) {
    TORCH_CHECK(bias->device() == hidden.device() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0) && bias->is_contiguous(),
                "answer_logprobs_cuda: bias must be contiguous float32 [V] on the device of hidden");
    bias_ptr = bias->data_ptr<float>();
  }
  const int64_t M = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor out = at::empty({M}, hidden.options().dtype(at::kFloat));
  if (M == 0) return out;
  int64_t splits = 0, v_per_split = 0;
  plan_answer_logprobs(dtype, M, V, vocab_splits, hidden.get_device(), &splits, &v_per_split);
  at::Tensor partials = at::empty({3, splits, M}, hidden.options().dtype(at::kFloat));
  launch_answer_logprobs(dtype, hidden.data_ptr(), weight.data_ptr(), bias_ptr, answer_ids.data_ptr<int64_t>(),
                         partials.data_ptr<float>(), out.data_ptr<float>(), M, V, H, splits, v_per_split,
                         c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace distillkit
