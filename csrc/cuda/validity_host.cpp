// at::Tensor wrapper of the CUDA validity kernel (csrc/cuda/validity.cu); compiled with DISTILLKIT_WITH_CUDA.
#include "distillkit.h"

#include "cuda/dtype_aten.h"
#include "cuda/launch.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace distillkit {

// teacher_logits, student_logits: [N, V] CUDA, float32/bfloat16/float16. Returns float32 [N]; NaN marks a
// row with a NaN input or no finite teacher maximum.
at::Tensor teacher_likelihood_validity_cuda(const at::Tensor& teacher_logits, const at::Tensor& student_logits,
                                            int64_t top_k, double gamma, double log_lo, double log_hi, double eps) {
  TORCH_CHECK(teacher_logits.is_cuda() && student_logits.is_cuda(), "teacher_likelihood_validity_cuda: CUDA tensors expected");
  TORCH_CHECK(teacher_logits.dim() == 2 && teacher_logits.sizes() == student_logits.sizes(),
              "teacher_logits and student_logits must both be [N, V]");
  TORCH_CHECK(top_k >= 1 && top_k <= teacher_logits.size(1) && top_k <= 2048, "top_k must be in [1, min(V, 2048)]");
  c10::cuda::CUDAGuard guard(teacher_logits.device());
  at::Tensor zt = teacher_logits.contiguous();
  at::Tensor zs = student_logits.contiguous();
  if (zt.scalar_type() != zs.scalar_type() || zt.scalar_type() == at::kDouble) {
    // mixed dtypes are rare: both go to float32 (exact for half inputs, so the argmax is unchanged)
    zt = zt.to(at::kFloat);
    zs = zs.to(at::kFloat);
  }
  const DType dtype =
      dtype_code(zt.scalar_type(), "teacher_logits", {DType::kFloat32, DType::kBFloat16, DType::kFloat16});
  at::Tensor out = at::empty({zt.size(0)}, zt.options().dtype(at::kFloat));
  const int err = launch_teacher_likelihood_validity(
      zt.data_ptr(), zs.data_ptr(), out.data_ptr<float>(), zt.size(0), zt.size(1), dtype, static_cast<int>(top_k),
      static_cast<float>(gamma), static_cast<float>(log_lo), static_cast<float>(log_hi), static_cast<float>(eps),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == 0, "teacher_likelihood_validity_cuda: launch failed: ",
              cudaGetErrorString(static_cast<cudaError_t>(err)));
  return out;
}

}  // namespace distillkit
