// Declarations shared by the bindings and the kernel files. Each cpu/*.cpp (and cuda/*.cu) file
// exports its host functions here; csrc/bindings.cpp is the one PYBIND11_MODULE.
#pragma once
#include <torch/extension.h>

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

// Each kernel family registers its functions on the module in its own file (keeps merges of
// independent work conflict-free); bindings.cpp calls them in order.
void bind_merge(pybind11::module_& m);
void bind_skew_kl(pybind11::module_& m);
void bind_scoring(pybind11::module_& m);
void bind_validity(pybind11::module_& m);

}  // namespace distillkit
