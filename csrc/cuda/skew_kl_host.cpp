// at::Tensor wrapper of the CUDA skew KL kernels (csrc/cuda/skew_kl.cu), bound in csrc/cpu/skew_kl.cpp.
// Compiled only in CUDA builds (DISTILLKIT_WITH_CUDA).
#include "distillkit.h"

#include "cuda/dtype_aten.h"
#include "cuda/launch.h"

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <tuple>

namespace distillkit {

std::tuple<at::Tensor, at::Tensor> skew_kl_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                        const at::Tensor& scale, double alpha, double inv_temperature,
                                                        bool reverse, bool detach_mixture, bool with_grad) {
  TORCH_CHECK(student.is_cuda() && teacher.is_cuda(), "skew_kl_forward_cuda needs CUDA tensors");
  TORCH_CHECK(student.dim() == 2 && student.is_contiguous(), "student_logits must be contiguous [N, V]");
  TORCH_CHECK(teacher.sizes() == student.sizes() && teacher.is_contiguous(),
              "teacher_logits must be contiguous with the shape of student_logits");
  TORCH_CHECK(teacher.scalar_type() == student.scalar_type(), "student_logits and teacher_logits dtypes differ");
  TORCH_CHECK(teacher.device() == student.device(), "student_logits and teacher_logits are on different devices");
  const int64_t rows = student.size(0), vocab = student.size(1);
  TORCH_CHECK(rows <= 2147483647LL, "skew_kl_forward_cuda: at most 2^31 - 1 rows, got ", rows);
  const auto loss_dtype = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(scale.scalar_type() == loss_dtype && scale.is_contiguous() && scale.dim() == 1 && scale.size(0) == rows &&
                  scale.device() == student.device(),
              "scale must be contiguous [N] float32 (float64 for float64 logits) on the logits' device");
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor loss = at::empty({rows}, student.options().dtype(loss_dtype));
  at::Tensor grad = with_grad ? at::empty_like(student) : at::empty({0}, student.options());
  const cudaError_t err = launch_skew_kl_forward(
      dtype_code(student.scalar_type(), "skew_kl_forward_cuda"), student.data_ptr(), teacher.data_ptr(),
      scale.data_ptr(), loss.data_ptr(), with_grad ? grad.data_ptr() : nullptr, rows, vocab, alpha, inv_temperature,
      detach_mixture, reverse, with_grad,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "skew_kl_forward_cuda: kernel launch failed: ", cudaGetErrorString(err));
  return {loss, grad};
}

}  // namespace distillkit
