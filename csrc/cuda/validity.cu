// VCRD's PRM-free validity weight on CUDA: one block per row, one read of each logits row.
//
//   a_S = argmax z_S (first maximum on ties), m / s = online max / sum exp(z_T - m),
//   top = the KP >= top_k largest teacher logits, w = exp(clamp(gamma * (z_T[a_S] - m - log s
//         - log(sum_{i<top_k} exp(2 (top_i - m)) / s^2 + eps)), log_lo, log_hi)).
//
// v1 (this file). The row is streamed in tiles of kTile = 2048 elements (8 per thread, coalesced).
// Each thread keeps its own online (max, sum-exp) of the teacher and (max, index) of the student; a
// teacher logit above the current admission bar (the KP-th largest logit so far, in shared memory) is
// appended to a shared candidate list (at most one tile's worth, so it cannot overflow). After a tile
// with candidates the block bitonic-sorts [top KP | candidates | -inf padding] descending, keeps the
// first KP and raises the bar. On random rows the bar climbs fast, so later tiles admit a handful of
// candidates and sort ~KP + few elements. Thread states are reduced with warp shuffles at the end.
// Bandwidth: 2 V itemsize bytes read per row (e.g. 8192 x 128256 bf16 x 2 = 4.2 GB, ~1.4 ms on an H100);
// the sorts run from shared memory and overlap with other blocks' loads.
// No torch headers here (they take minutes in nvcc): raw-pointer launcher only, see validity_host.cpp.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/launch.h"

namespace distillkit {
namespace {

constexpr int kThreads = 256;
constexpr int kPerThread = 8;
constexpr int kTile = kThreads * kPerThread;  // 2048
constexpr int kMaxKeep = 2048;                // largest KP (top_k rounded up to a power of two)

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

__device__ __forceinline__ int next_pow2(int x) {
  int p = 1;
  while (p < x) p <<= 1;
  return p;
}

// Descending bitonic sort of buf[0, np) (np a power of two) by the whole block.
__device__ void bitonic_sort_desc(float* buf, int np) {
  for (int k = 2; k <= np; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < np; i += blockDim.x) {
        const int partner = i ^ j;
        if (partner > i) {
          const float a = buf[i], b = buf[partner];
          const bool descending = (i & k) == 0;
          if (descending ? (a < b) : (a > b)) {
            buf[i] = b;
            buf[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) validity_kernel(const T* __restrict__ zt_all, const T* __restrict__ zs_all,
                                                            float* __restrict__ out, int64_t vocab, int top_k,
                                                            int keep, float gamma, float log_lo, float log_hi,
                                                            float eps) {
  __shared__ float buf[kMaxKeep + kTile];
  __shared__ int cand_count;
  __shared__ float bar;
  __shared__ float red_f[kThreads / 32];
  __shared__ float red_g[kThreads / 32];
  __shared__ int64_t red_i[kThreads / 32];
  __shared__ int red_n[kThreads / 32];

  const int64_t row = blockIdx.x;
  const T* zt = zt_all + row * vocab;
  const T* zs = zs_all + row * vocab;
  const float neg_inf = -INFINITY;
  const int tid = threadIdx.x;

  for (int i = tid; i < keep; i += kThreads) buf[i] = neg_inf;
  if (tid == 0) {
    cand_count = 0;
    bar = neg_inf;
  }
  __syncthreads();

  float m = neg_inf, s = 0.f, best = neg_inf;
  int64_t best_idx = INT64_MAX;
  int nans = 0;
  for (int64_t tile = 0; tile < vocab; tile += kTile) {
    const float admit = bar;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int64_t i = tile + j * kThreads + tid;
      if (i < vocab) {
        const float t = to_float(zt[i]);
        const float u = to_float(zs[i]);
        nans += (t != t) | (u != u);
        if (t > m) {
          s = s * __expf(m - t) + 1.f;  // m = -inf at first: exp(-inf) = 0
          m = t;
        } else if (t > neg_inf) {
          s += __expf(t - m);
        }
        if (u > best || (best_idx == INT64_MAX && u == neg_inf)) {  // each thread sees its indices in order
          best = u;
          best_idx = i;
        }
        if (t > admit) {
          const int pos = atomicAdd(&cand_count, 1);
          buf[keep + pos] = t;
        }
      }
    }
    __syncthreads();
    const int count = cand_count;  // uniform across the block
    if (count > 0) {
      const int np = next_pow2(keep + count);
      for (int i = keep + count + tid; i < np; i += kThreads) buf[i] = neg_inf;
      __syncthreads();
      bitonic_sort_desc(buf, np);
      if (tid == 0) {
        bar = buf[keep - 1];
        cand_count = 0;
      }
    }
    __syncthreads();
  }

  // block reduction: teacher (m, s), student (best, best_idx), NaN count
  const unsigned full = 0xffffffffu;
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(full, m, off);
    const float s2 = __shfl_xor_sync(full, s, off);
    const float b2 = __shfl_xor_sync(full, best, off);
    const int64_t i2 = __shfl_xor_sync(full, best_idx, off);
    nans += __shfl_xor_sync(full, nans, off);
    const float mm = fmaxf(m, m2);
    s = (mm == neg_inf) ? 0.f : s * __expf(m - mm) + s2 * __expf(m2 - mm);
    m = mm;
    if (b2 > best || (b2 == best && i2 < best_idx)) {
      best = b2;
      best_idx = i2;
    }
  }
  const int warp = tid / 32, lane = tid % 32;
  if (lane == 0) {
    red_f[warp] = m;
    red_g[warp] = s;
    red_n[warp] = nans;
  }
  __syncthreads();
  if (tid == 0) {
    float mm = neg_inf;
    for (int w = 0; w < kThreads / 32; ++w) mm = fmaxf(mm, red_f[w]);
    float ss = 0.f;
    int nn = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      if (red_f[w] > neg_inf) ss += red_g[w] * __expf(red_f[w] - mm);
      nn += red_n[w];
    }
    red_f[0] = mm;
    red_g[0] = ss;
    red_n[0] = nn;
  }
  __syncthreads();
  const float row_max = red_f[0], row_sum = red_g[0];
  const int row_nans = red_n[0];
  __syncthreads();
  if (lane == 0) {
    red_f[warp] = best;
    red_i[warp] = best_idx;
  }
  __syncthreads();
  if (tid == 0) {
    float bb = red_f[0];
    int64_t bi = red_i[0];
    for (int w = 1; w < kThreads / 32; ++w) {
      if (red_f[w] > bb || (red_f[w] == bb && red_i[w] < bi)) {
        bb = red_f[w];
        bi = red_i[w];
      }
    }
    red_i[0] = bi;
  }
  // sum of the top_k squared probabilities (unnormalised), buf[0, top_k) sorted descending
  float sq = 0.f;
  for (int i = tid; i < top_k; i += kThreads) sq += __expf(2.f * (buf[i] - row_max));
  for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(full, sq, off);
  __syncthreads();
  if (lane == 0) red_g[warp] = sq;
  __syncthreads();
  if (tid == 0) {
    float top_sq = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) top_sq += red_g[w];
    top_sq /= row_sum * row_sum;
    const int64_t greedy = red_i[0] < vocab ? red_i[0] : 0;
    const float log_p_greedy = to_float(zt[greedy]) - row_max - logf(row_sum);
    float scaled = gamma == 0.f ? 0.f : gamma * (log_p_greedy - logf(top_sq + eps));
    scaled = fminf(fmaxf(scaled, log_lo), log_hi);  // -inf (p_T(a_S) = 0) clamps to log_lo
    const bool bad = row_nans > 0 || !(row_max > neg_inf) || row_max == INFINITY;
    out[row] = bad ? __int_as_float(0x7fc00000) : __expf(scaled);
  }
}

}  // namespace

int launch_teacher_likelihood_validity(const void* zt, const void* zs, float* out, int64_t rows, int64_t vocab,
                                       DType dtype, int top_k, float gamma, float log_lo, float log_hi, float eps,
                                       cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (top_k < 1 || top_k > kMaxKeep) return cudaErrorInvalidValue;
  int keep = 1;
  while (keep < top_k) keep <<= 1;
  const dim3 grid(static_cast<unsigned>(rows));
  const bool known = dispatch_dtype<float, __nv_bfloat16, __half>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    validity_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(zt), static_cast<const T*>(zs), out, vocab,
                                                      top_k, keep, gamma, log_lo, log_hi, eps);
  });
  if (!known) return cudaErrorInvalidValue;
  return static_cast<int>(cudaGetLastError());
}

}  // namespace distillkit
