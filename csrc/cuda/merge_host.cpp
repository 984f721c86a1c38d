// at::Tensor side of the CUDA merge: checks, metadata tables, one H2D copy, one launch per group.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>

#include "cuda/dtype_aten.h"
#include "cuda/launch.h"
#include "distillkit.h"

namespace distillkit {

namespace {
constexpr int64_t kChunkElems = 256 * 8 * 8;  // 256 threads x 8 iterations x up to 8 elements per vector
}

void merge_average_cuda(std::vector<at::Tensor> targets, std::vector<std::vector<at::Tensor>> sources,
                        std::vector<double> weights) {
  TORCH_CHECK(!sources.empty(), "merge_average: sources is empty");
  TORCH_CHECK(weights.size() == sources.size(), "merge_average: weights/sources length mismatch");
  if (targets.empty()) return;
  const auto dtype = targets[0].scalar_type();
  const auto device = targets[0].device();
  TORCH_CHECK(device.is_cuda(), "merge_average_cuda: targets must be CUDA tensors");
  const DType code = dtype_code(dtype, "merge_average");
  const int64_t T = static_cast<int64_t>(targets.size());
  const int64_t K = static_cast<int64_t>(sources.size());
  for (double w : weights) TORCH_CHECK(std::isfinite(w), "merge_average: non-finite weight ", w);

  auto cpu_i64 = at::TensorOptions().dtype(at::kLong).device(at::kCPU).pinned_memory(true);
  at::Tensor ptrs = at::empty({T * (K + 1)}, cpu_i64);
  at::Tensor numels = at::empty({T}, cpu_i64);
  at::Tensor aligned = at::empty({T}, cpu_i64.dtype(at::kByte));
  int64_t* p = ptrs.data_ptr<int64_t>();
  int64_t num_chunks = 0;
  for (int64_t t = 0; t < T; ++t) {
    const auto& tgt = targets[t];
    TORCH_CHECK(tgt.device() == device && tgt.scalar_type() == dtype && tgt.is_contiguous(),
                "merge_average: target ", t, " must be a contiguous ", dtype, " tensor on ", device);
    p[t * (K + 1)] = reinterpret_cast<int64_t>(tgt.data_ptr());
    bool al = reinterpret_cast<uintptr_t>(tgt.data_ptr()) % 16 == 0;
    TORCH_CHECK(static_cast<int64_t>(sources[0].size()) == T, "merge_average: source/target count mismatch");
    for (int64_t k = 0; k < K; ++k) {
      TORCH_CHECK(static_cast<int64_t>(sources[k].size()) == T, "merge_average: source ", k, " has ",
                  sources[k].size(), " tensors, target has ", T);
      const auto& s = sources[k][t];
      TORCH_CHECK(s.device() == device && s.scalar_type() == dtype && s.is_contiguous() && s.numel() == tgt.numel(),
                  "merge_average: source ", k, " tensor ", t, " does not match its target");
      p[t * (K + 1) + 1 + k] = reinterpret_cast<int64_t>(s.data_ptr());
      al = al && reinterpret_cast<uintptr_t>(s.data_ptr()) % 16 == 0;
    }
    numels.data_ptr<int64_t>()[t] = tgt.numel();
    aligned.data_ptr<uint8_t>()[t] = al ? 1 : 0;
    num_chunks += (tgt.numel() + kChunkElems - 1) / kChunkElems;
  }
  at::Tensor chunk_tensor = at::empty({num_chunks}, cpu_i64.dtype(at::kInt));
  at::Tensor chunk_start = at::empty({num_chunks}, cpu_i64);
  int64_t c = 0;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t s = 0; s < targets[t].numel(); s += kChunkElems, ++c) {
      chunk_tensor.data_ptr<int32_t>()[c] = static_cast<int32_t>(t);
      chunk_start.data_ptr<int64_t>()[c] = s;
    }
  at::Tensor w = at::empty({K}, cpu_i64.dtype(at::kDouble));
  for (int64_t k = 0; k < K; ++k) w.data_ptr<double>()[k] = weights[k];

  c10::cuda::CUDAGuard guard(device);
  auto stream = c10::cuda::getCurrentCUDAStream();
  // Pinned sources + non_blocking: the copies are stream-ordered before the launch.
  auto d_ptrs = ptrs.to(device, /*non_blocking=*/true);
  auto d_numels = numels.to(device, true);
  auto d_aligned = aligned.to(device, true);
  auto d_ct = chunk_tensor.to(device, true);
  auto d_cs = chunk_start.to(device, true);
  auto d_w = w.to(device, true);
  launch_merge_average(code, d_ptrs.data_ptr<int64_t>(), d_numels.data_ptr<int64_t>(), d_ct.data_ptr<int32_t>(),
                       d_cs.data_ptr<int64_t>(), d_aligned.data_ptr<uint8_t>(), d_w.data_ptr<double>(),
                       static_cast<int>(K), num_chunks, kChunkElems, stream.stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace distillkit
