// CUDA multi-tensor weighted average: targets[i] <- sum_k w_k * sources[k][i], one launch per
// dtype group however many tensors it holds.
//
// Tables in device memory (built by merge_host.cpp, one H2D copy per group):
//   ptrs   [T * (K + 1)] int64: target address, then the K source addresses, per tensor
//   numels [T] int64
//   chunk_tensor [C] int32, chunk_start [C] int64: one thread block per kChunk elements of a tensor
//   weights [K] float64 (cast to the accumulator type)
// Each block streams its chunk with 16-byte vector loads when every pointer of its tensor is
// 16-byte aligned (flag in the low bit of chunk_tensor's companion `aligned` table), scalar
// otherwise. Accumulation in float32 (double for fp64).
//
// Bandwidth on paper: (K + 1) * numel * sizeof(T) bytes; at K = 4 bf16 and 1.5B parameters that is
// 15 GB, ~5 ms at H100's ~3 TB/s copy rate. Blocks of 256 threads x 8 vectors keep enough bytes
// in flight per SM (16 KB per source per block) to approach it.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"

namespace distillkit {
namespace {

constexpr int kThreads = 256;

template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

template <typename T> __device__ __forceinline__ typename AccT<T>::type to_acc(T v) { return static_cast<typename AccT<T>::type>(v); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_acc<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_acc(typename AccT<T>::type v) { return static_cast<T>(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__global__ void __launch_bounds__(kThreads) merge_average_kernel(
    const int64_t* __restrict__ ptrs, const int64_t* __restrict__ numels, const int32_t* __restrict__ chunk_tensor,
    const int64_t* __restrict__ chunk_start, const uint8_t* __restrict__ aligned, const double* __restrict__ weights,
    int K, int64_t chunk_elems) {
  using A = typename AccT<T>::type;
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte vector
  const int t = chunk_tensor[blockIdx.x];
  const int64_t start = chunk_start[blockIdx.x];
  const int64_t stop = min(start + chunk_elems, numels[t]);
  const int64_t* tp = ptrs + static_cast<int64_t>(t) * (K + 1);
  T* dst = reinterpret_cast<T*>(tp[0]);

  if (aligned[t]) {
    // vector body: start is a multiple of chunk_elems (a multiple of kVec), so vectors stay aligned
    const int64_t vec_stop = start + ((stop - start) / kVec) * kVec;
    for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_stop;
         i += static_cast<int64_t>(kThreads) * kVec) {
      A acc[kVec];
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = A(0);
      for (int k = 0; k < K; ++k) {
        const A w = static_cast<A>(weights[k]);
        const uint4 raw = *reinterpret_cast<const uint4*>(reinterpret_cast<const T*>(tp[1 + k]) + i);
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < kVec; ++j) acc[j] += w * to_acc<T>(v[j]);
      }
      uint4 out;
      T* o = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int j = 0; j < kVec; ++j) o[j] = from_acc<T>(acc[j]);
      *reinterpret_cast<uint4*>(dst + i) = out;
    }
    for (int64_t i = vec_stop + threadIdx.x; i < stop; i += kThreads) {  // tail
      A acc = A(0);
      for (int k = 0; k < K; ++k) acc += static_cast<A>(weights[k]) * to_acc<T>(reinterpret_cast<const T*>(tp[1 + k])[i]);
      dst[i] = from_acc<T>(acc);
    }
  } else {
    for (int64_t i = start + threadIdx.x; i < stop; i += kThreads) {
      A acc = A(0);
      for (int k = 0; k < K; ++k) acc += static_cast<A>(weights[k]) * to_acc<T>(reinterpret_cast<const T*>(tp[1 + k])[i]);
      dst[i] = from_acc<T>(acc);
    }
  }
}

}  // namespace

void launch_merge_average(DType dtype, const int64_t* ptrs, const int64_t* numels, const int32_t* chunk_tensor,
                          const int64_t* chunk_start, const uint8_t* aligned, const double* weights, int K,
                          int64_t num_chunks, int64_t chunk_elems, cudaStream_t stream) {
  if (num_chunks == 0) return;
  const dim3 grid(static_cast<unsigned>(num_chunks));
  dispatch_dtype<float, double, __nv_bfloat16, __half>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    merge_average_kernel<T><<<grid, kThreads, 0, stream>>>(ptrs, numels, chunk_tensor, chunk_start, aligned, weights,
                                                           K, chunk_elems);
  });
}

}  // namespace distillkit
