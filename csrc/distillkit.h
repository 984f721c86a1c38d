// Declarations shared by the bindings and the kernel files. Each cpu/*.cpp and cuda/*_host.cpp file
// exports its host functions here; csrc/bindings.cpp is the one PYBIND11_MODULE. The *_cuda functions
// exist only in CUDA builds (DISTILLKIT_WITH_CUDA); their raw-pointer launchers are in cuda/launch.h.
#pragma once
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

namespace distillkit {

// ---- merge (csrc/cpu/merge.cpp, csrc/cuda/merge.cu) ----
// targets[i] <- sum_k weights[k] * sources[k][i]; all tensors contiguous, same dtype within a group.
void merge_average_cpu(std::vector<at::Tensor> targets, std::vector<std::vector<at::Tensor>> sources,
                       std::vector<double> weights);
#ifdef DISTILLKIT_WITH_CUDA
void merge_average_cuda(std::vector<at::Tensor> targets, std::vector<std::vector<at::Tensor>> sources,
                        std::vector<double> weights);
#endif

#ifdef DISTILLKIT_WITH_CUDA
// ---- skew KL (csrc/cuda/skew_kl_host.cpp; bound in csrc/cpu/skew_kl.cpp) ----
// student, teacher [N, V] contiguous, one dtype; scale [N] float32 (float64 for float64 logits).
// Returns (loss [N] in scale's dtype, scale_i dloss_i/dstudent [N, V] or an empty tensor).
std::tuple<at::Tensor, at::Tensor> skew_kl_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                        const at::Tensor& scale, double alpha, double inv_temperature,
                                                        bool reverse, bool detach_mixture, bool with_grad);

// ---- scoring (csrc/cuda/scoring_host.cpp; bound in csrc/cpu/scoring.cpp) ----
// hidden [M, H], weight [V, H] float32/bfloat16/float16, answer_ids [M] int64, bias [V] float32 or None.
// Returns float32 [M] answer log-probs.
at::Tensor answer_logprobs_cuda(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& answer_ids,
                                const std::optional<at::Tensor>& bias, int64_t vocab_splits);

// ---- validity (csrc/cuda/validity_host.cpp; bound in csrc/cpu/validity.cpp) ----
// teacher_logits, student_logits [N, V]. Returns float32 [N] weights (NaN for an undefined row).
at::Tensor teacher_likelihood_validity_cuda(const at::Tensor& teacher_logits, const at::Tensor& student_logits,
                                            int64_t top_k, double gamma, double log_lo, double log_hi, double eps);
#endif

// Each kernel family registers its functions on the module in its own file (keeps merges of
// independent work conflict-free); bindings.cpp calls them in order.
void bind_merge(pybind11::module_& m);
void bind_skew_kl(pybind11::module_& m);
void bind_scoring(pybind11::module_& m);
void bind_validity(pybind11::module_& m);

}  // namespace distillkit
