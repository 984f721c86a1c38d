// The one numbering of element types shared by the CUDA host wrappers (*_host.cpp) and the raw-pointer
// launchers (*.cu). No torch headers (nvcc would spend minutes on them): the at::ScalarType mapping is in
// dtype_aten.h, host side only. Under nvcc this header also gives the launchers dispatch_dtype.
#pragma once

namespace distillkit {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kBFloat16 = 2, kFloat16 = 3 };

#ifdef __CUDACC__
}  // namespace distillkit

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace distillkit {

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> { static constexpr DType value = DType::kFloat32; };
template <>
struct DTypeOf<double> { static constexpr DType value = DType::kFloat64; };
template <>
struct DTypeOf<__nv_bfloat16> { static constexpr DType value = DType::kBFloat16; };
template <>
struct DTypeOf<__half> { static constexpr DType value = DType::kFloat16; };

template <typename T>
struct TypeTag { using type = T; };

// Calls f(TypeTag<T>{}) for the T among Ts whose DType is `dtype` (in f: `using T = typename
// decltype(tag)::type;`). Returns false, calling nothing, when `dtype` is none of Ts.
template <typename... Ts, typename F>
bool dispatch_dtype(DType dtype, F&& f) {
  return ((dtype == DTypeOf<Ts>::value ? (f(TypeTag<Ts>{}), true) : false) || ...);
}
#endif  // __CUDACC__

}  // namespace distillkit
