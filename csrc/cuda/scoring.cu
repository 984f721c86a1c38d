// CUDA answer log-probs for CoRD's meta-prover: out[m] = logit[m, ids[m]] - logsumexp_v logit[m, v],
// logit = hidden @ weight.T + bias, never holding [M, V] logits.
//
// Two launches (raw pointers; csrc/cuda/scoring_host.cpp makes the at::Tensor side):
//   partial  grid (ceil(M / 64) row blocks, S vocabulary splits), 256 threads. A block owns 64 rows
//            and one contiguous vocabulary range [v_start, v_end) (a multiple of the tile width).
//            Per vocabulary tile it stages hidden and weight slices of BK columns in shared memory
//            (each W tile is loaded from global memory once per block and reused by all 64 rows),
//            accumulates the [64, BV] logit tile in fp32, writes it to shared memory, then each warp
//            folds 8 rows into running (max, sum exp) with warp shuffles and picks the answer logit.
//            Writes partials [3, S, M] (max, sum, answer-or-0).
//   combine  one thread per row: lse = max + log(sum_s sum_s * e^(max_s - max)); out = answer - lse.
// Tile producers:
//   bf16/fp16: WMMA 16x16x16 tensor-core fragments, fp32 accumulators; BV = 128, 8 warps as 2 x 4,
//              each warp 32 x 32 of the tile; BK = 64 hidden columns per stage (24 KB of operands in
//              flight per block per sync). Operand rows padded to 72 elements (144 B) so fragment
//              loads stay 32-byte aligned and rows start on different banks. The fp32 logit tile
//              aliases the operand buffers (written only after the tile's last mma): 33.8 KB static
//              smem; __launch_bounds__(256, 2) keeps 2 blocks (16 warps) per SM (<= 128 registers).
//   fp32:      SIMT register tiling (4 x 4 outputs per thread, BV = 64, BK = 16): exact fp32 FMAs
//              (no TF32: scores are compared across candidates, 1e-3 logit errors would reorder them).
// Splits: S = enough blocks for ~4 waves over the SMs given the row blocks. Row blocks of the same
// split are adjacent in launch order (blockIdx.x fastest), so a W tile read by several row blocks
// (M > 64) comes from L2 after the first.
//
// Bandwidth on paper (H100 SXM, ~3.0 TB/s measured copy rate class): llama3-8b lm_head bf16
// V=128256, H=4096 is 1.05 GB -> ~0.35 ms to read once. M=64: 67 GFLOP, ~0.1 ms on tensor cores
// -> memory bound, goal <= 1.5x the W read. M=1024: 1.07 TFLOP -> compute bound (~2 ms with WMMA at
// ~50% of dense peak). fp32 weights (2.1 GB, SIMT ~30-40 TFLOP/s) are compute bound at both M.
//
// History:
//   v1 (this): WMMA/SIMT producers, single-buffered smem staging (load, sync, mma, sync); latency is
//      hidden by 2 resident blocks per SM. BK 32 -> 64 halved the syncs per byte and removed most
//      register spills (ptxas: bf16 192 B -> 24 B spilled, fp16 none). Not yet measured on a GPU (the sessions that wrote it
//      had none). Next: cp.async double buffering of the W slices, and 16-byte loads on the SIMT path.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>

#include "cuda/launch.h"

namespace distillkit {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int BM = 64;                 // rows per block
constexpr int kRowsPerWarp = BM / kWarps;
constexpr int kWmmaBV = 128, kWmmaBK = 64, kWmmaLDK = kWmmaBK + 8, kWmmaLDC = kWmmaBV + 4;
constexpr int kSimtBV = 64, kSimtBK = 16;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float to_f32(float v) { return v; }

// Per-row running state of one warp's rows (identical in every lane after the shuffles).
struct RowState {
  float run_max[kRowsPerWarp];
  float run_sum[kRowsPerWarp];
  float answer[kRowsPerWarp];  // set only in the lane that saw the answer column; summed at the end
  __device__ __forceinline__ void init() {
#pragma unroll
    for (int i = 0; i < kRowsPerWarp; ++i) { run_max[i] = neg_inf(); run_sum[i] = 0.f; answer[i] = 0.f; }
  }
};

// Folds the [BM, BV] fp32 logit tile sC (columns v0 .. v0+n_valid valid) into the warp's rows.
template <int BV>
__device__ __forceinline__ void fold_tile(const float* sC, int ldc, int64_t v0, int n_valid,
                                          const float* __restrict__ bias, const int64_t* sIds, RowState& st) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  constexpr int kPer = BV / 32;
  float b[kPer];
#pragma unroll
  for (int j = 0; j < kPer; ++j) {
    const int c = lane + 32 * j;
    b[j] = (bias != nullptr && c < n_valid) ? bias[v0 + c] : 0.f;
  }
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    const int64_t target = sIds[r] - v0;  // answer column in this tile when 0 <= target < n_valid
    float x[kPer];
    float mx = neg_inf();
#pragma unroll
    for (int j = 0; j < kPer; ++j) {
      const int c = lane + 32 * j;
      x[j] = c < n_valid ? sC[r * ldc + c] + b[j] : neg_inf();
      mx = fmaxf(mx, x[j]);
      if (c == target && c < n_valid) st.answer[i] = x[j];
    }
    mx = warp_max(mx);
    const float new_max = fmaxf(st.run_max[i], mx);  // finite: every tile has >= 1 valid column
    float s = 0.f;
#pragma unroll
    for (int j = 0; j < kPer; ++j) s += __expf(x[j] - new_max);  // exp(-inf) = 0 for padding
    s = warp_sum(s);
    st.run_sum[i] = st.run_sum[i] * __expf(st.run_max[i] - new_max) + s;  // first tile: 0 * 0
    st.run_max[i] = new_max;
  }
}

__device__ __forceinline__ void load_ids(const int64_t* __restrict__ ids, int64_t row0, int64_t M, int64_t* sIds) {
  for (int i = threadIdx.x; i < BM; i += kThreads) sIds[i] = row0 + i < M ? ids[row0 + i] : -1;
}

__device__ __forceinline__ void store_partials(const RowState& st, int64_t row0, int64_t M, float* __restrict__ pmax,
                                               float* __restrict__ psum, float* __restrict__ pans) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t base = static_cast<int64_t>(blockIdx.y) * M;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const float a = warp_sum(st.answer[i]);
    const int64_t row = row0 + warp * kRowsPerWarp + i;
    if (lane == 0 && row < M) {
      pmax[base + row] = st.run_max[i];
      psum[base + row] = st.run_sum[i];
      pans[base + row] = a;
    }
  }
}

// Tensor-core producer for 16-bit inputs.
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) partial_wmma_kernel(
    const T* __restrict__ hidden,      // [M, H]
    const T* __restrict__ weight,      // [V, H]
    const float* __restrict__ bias,    // [V] or nullptr
    const int64_t* __restrict__ ids,   // [M]
    float* __restrict__ pmax, float* __restrict__ psum, float* __restrict__ pans,  // [S, M] each
    int64_t M, int64_t V, int64_t H, int64_t v_per_split, bool vec16) {
  using namespace nvcuda;
  constexpr int kOperandBytes = (BM + kWmmaBV) * kWmmaLDK * static_cast<int>(sizeof(T));
  constexpr int kTileBytes = BM * kWmmaLDC * static_cast<int>(sizeof(float));
  constexpr int kSmemBytes = kOperandBytes > kTileBytes ? kOperandBytes : kTileBytes;
  __shared__ __align__(128) unsigned char smem[kSmemBytes];
  __shared__ int64_t sIds[BM];
  T* sH = reinterpret_cast<T*>(smem);   // [BM][LDK]
  T* sW = sH + BM * kWmmaLDK;           // [BV][LDK]
  float* sC = reinterpret_cast<float*>(smem);  // [BM][LDC], aliases sH/sW after the mma loop

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t v_start = static_cast<int64_t>(blockIdx.y) * v_per_split;
  const int64_t v_end = min(v_start + v_per_split, V);
  const int warp = threadIdx.x / 32;
  const int wr = warp / 4, wc = warp % 4;  // warp's 32 x 32 sub-tile: rows wr*32, cols wc*32
  load_ids(ids, row0, M, sIds);
  RowState st;
  st.init();
  constexpr int kVec = 8;  // 16-bit elements per 16-byte load
  const T zero = T(0.f);

  for (int64_t v0 = v_start; v0 < v_end; v0 += kWmmaBV) {
    const int n_valid = static_cast<int>(min(static_cast<int64_t>(kWmmaBV), v_end - v0));
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

    for (int64_t k0 = 0; k0 < H; k0 += kWmmaBK) {
      if (vec16) {  // H % 8 == 0 and 16-byte aligned bases: a vector is wholly in or out of range
        for (int e = threadIdx.x * kVec; e < BM * kWmmaBK; e += kThreads * kVec) {
          const int r = e / kWmmaBK, kk = e % kWmmaBK;
          const int64_t gr = row0 + r, gk = k0 + kk;
          uint4 v = make_uint4(0, 0, 0, 0);
          if (gr < M && gk < H) v = *reinterpret_cast<const uint4*>(hidden + gr * H + gk);
          *reinterpret_cast<uint4*>(sH + r * kWmmaLDK + kk) = v;
        }
        for (int e = threadIdx.x * kVec; e < kWmmaBV * kWmmaBK; e += kThreads * kVec) {
          const int c = e / kWmmaBK, kk = e % kWmmaBK;
          const int64_t gv = v0 + c, gk = k0 + kk;
          uint4 v = make_uint4(0, 0, 0, 0);
          if (gv < v_end && gk < H) v = *reinterpret_cast<const uint4*>(weight + gv * H + gk);
          *reinterpret_cast<uint4*>(sW + c * kWmmaLDK + kk) = v;
        }
      } else {
        for (int e = threadIdx.x; e < BM * kWmmaBK; e += kThreads) {
          const int r = e / kWmmaBK, kk = e % kWmmaBK;
          const int64_t gr = row0 + r, gk = k0 + kk;
          sH[r * kWmmaLDK + kk] = (gr < M && gk < H) ? hidden[gr * H + gk] : zero;
        }
        for (int e = threadIdx.x; e < kWmmaBV * kWmmaBK; e += kThreads) {
          const int c = e / kWmmaBK, kk = e % kWmmaBK;
          const int64_t gv = v0 + c, gk = k0 + kk;
          sW[c * kWmmaLDK + kk] = (gv < v_end && gk < H) ? weight[gv * H + gk] : zero;
        }
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kWmmaBK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b[2];  // B[k][n] = W[n][k]
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], sH + (wr * 32 + i * 16) * kWmmaLDK + kk, kWmmaLDK);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], sW + (wc * 32 + j * 16) * kWmmaLDK + kk, kWmmaLDK);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
      __syncthreads();  // operands consumed: the next slice (or sC) may overwrite them
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(sC + (wr * 32 + i * 16) * kWmmaLDC + wc * 32 + j * 16, acc[i][j], kWmmaLDC,
                                wmma::mem_row_major);
    __syncthreads();
    fold_tile<kWmmaBV>(sC, kWmmaLDC, v0, n_valid, bias, sIds, st);
    __syncthreads();  // sC is read before the next tile's operands overwrite it
  }
  store_partials(st, row0, M, pmax, psum, pans);
}

// SIMT producer (fp32 inputs): exact fp32 FMAs, 4 x 4 outputs per thread.
template <typename T>
__global__ void __launch_bounds__(kThreads) partial_simt_kernel(
    const T* __restrict__ hidden, const T* __restrict__ weight, const float* __restrict__ bias,
    const int64_t* __restrict__ ids, float* __restrict__ pmax, float* __restrict__ psum, float* __restrict__ pans,
    int64_t M, int64_t V, int64_t H, int64_t v_per_split) {
  __shared__ float sH[kSimtBK][BM + 4];       // k-major: a thread's rows ty + 16 i are read as broadcasts
  __shared__ float sW[kSimtBK][kSimtBV + 4];
  __shared__ float sC[BM][kSimtBV + 1];
  __shared__ int64_t sIds[BM];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int64_t v_start = static_cast<int64_t>(blockIdx.y) * v_per_split;
  const int64_t v_end = min(v_start + v_per_split, V);
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  load_ids(ids, row0, M, sIds);
  RowState st;
  st.init();

  for (int64_t v0 = v_start; v0 < v_end; v0 += kSimtBV) {
    const int n_valid = static_cast<int>(min(static_cast<int64_t>(kSimtBV), v_end - v0));
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int64_t k0 = 0; k0 < H; k0 += kSimtBK) {
      // 16 consecutive threads read 16 consecutive k of one row: 64-byte coalesced segments
#pragma unroll
      for (int q = 0; q < (BM * kSimtBK) / kThreads; ++q) {
        const int e = threadIdx.x + q * kThreads, r = e / kSimtBK, kk = e % kSimtBK;
        const int64_t gr = row0 + r, gk = k0 + kk;
        sH[kk][r] = (gr < M && gk < H) ? to_f32(hidden[gr * H + gk]) : 0.f;
      }
#pragma unroll
      for (int q = 0; q < (kSimtBV * kSimtBK) / kThreads; ++q) {
        const int e = threadIdx.x + q * kThreads, c = e / kSimtBK, kk = e % kSimtBK;
        const int64_t gv = v0 + c, gk = k0 + kk;
        sW[kk][c] = (gv < v_end && gk < H) ? to_f32(weight[gv * H + gk]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kSimtBK; ++kk) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = sH[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = sW[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sC[ty + 16 * i][tx + 16 * j] = acc[i][j];
    __syncthreads();
    fold_tile<kSimtBV>(&sC[0][0], kSimtBV + 1, v0, n_valid, bias, sIds, st);
    __syncthreads();
  }
  store_partials(st, row0, M, pmax, psum, pans);
}

__global__ void combine_kernel(const float* __restrict__ pmax, const float* __restrict__ psum,
                               const float* __restrict__ pans, float* __restrict__ out, int64_t M, int64_t S) {
  const int64_t m = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (m >= M) return;
  float g = neg_inf();
  for (int64_t s = 0; s < S; ++s) g = fmaxf(g, pmax[s * M + m]);
  float total = 0.f, answer = 0.f;
  for (int64_t s = 0; s < S; ++s) {
    total += psum[s * M + m] * __expf(pmax[s * M + m] - g);
    answer += pans[s * M + m];
  }
  out[m] = answer - g - logf(total);
}

int tile_width(DType dtype) { return dtype == DType::kFloat32 ? kSimtBV : kWmmaBV; }

}  // namespace

void plan_answer_logprobs(DType dtype, int64_t M, int64_t V, int64_t requested_splits, int device, int64_t* splits,
                          int64_t* v_per_split) {
  const int64_t bv = tile_width(dtype);
  const int64_t tiles = (V + bv - 1) / bv;
  const int64_t row_blocks = (M + BM - 1) / BM;
  int64_t want = requested_splits;
  if (want <= 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) sms = 108;
    want = (4 * static_cast<int64_t>(sms) + row_blocks - 1) / row_blocks;
  }
  want = want < 1 ? 1 : (want > tiles ? tiles : want);
  if (want > 65535) want = 65535;  // gridDim.y limit
  const int64_t tiles_per_split = (tiles + want - 1) / want;
  *v_per_split = tiles_per_split * bv;
  *splits = (V + *v_per_split - 1) / *v_per_split;  // every split owns >= 1 valid column
}

void launch_answer_logprobs(DType dtype, const void* hidden, const void* weight, const float* bias,
                            const int64_t* ids, float* partials, float* out, int64_t M, int64_t V, int64_t H,
                            int64_t splits, int64_t v_per_split, cudaStream_t stream) {
  float* pmax = partials;
  float* psum = partials + splits * M;
  float* pans = partials + 2 * splits * M;
  const dim3 grid(static_cast<unsigned>((M + BM - 1) / BM), static_cast<unsigned>(splits));
  const bool vec16 = H % 8 == 0 && reinterpret_cast<uintptr_t>(hidden) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(weight) % 16 == 0;
  const bool known = dispatch_dtype<float, __nv_bfloat16, __half>(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* h = static_cast<const T*>(hidden);
    const T* w = static_cast<const T*>(weight);
    if constexpr (std::is_same_v<T, float>)  // exact fp32 FMAs (no TF32): see the header
      partial_simt_kernel<T><<<grid, kThreads, 0, stream>>>(h, w, bias, ids, pmax, psum, pans, M, V, H, v_per_split);
    else
      partial_wmma_kernel<T><<<grid, kThreads, 0, stream>>>(h, w, bias, ids, pmax, psum, pans, M, V, H, v_per_split,
                                                            vec16);
  });
  if (!known) return;
  const int threads = 128;
  combine_kernel<<<static_cast<unsigned>((M + threads - 1) / threads), threads, 0, stream>>>(pmax, psum, pans, out, M,
                                                                                            splits);
}

}  // namespace distillkit
