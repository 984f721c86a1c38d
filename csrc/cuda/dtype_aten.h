// at::ScalarType -> DType (csrc/cuda/dtype.h) for the CUDA host wrappers; host-only (ATen headers).
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <initializer_list>

#include "cuda/dtype.h"

namespace distillkit {

// The DType of t; raises "<op>: unsupported dtype <t>" unless it is one of `supported`.
inline DType dtype_code(at::ScalarType t, const char* op,
                        std::initializer_list<DType> supported = {DType::kFloat32, DType::kFloat64,
                                                                  DType::kBFloat16, DType::kFloat16}) {
  DType d;
  bool known = true;
  switch (t) {
    case at::kFloat: d = DType::kFloat32; break;
    case at::kDouble: d = DType::kFloat64; break;
    case at::kBFloat16: d = DType::kBFloat16; break;
    case at::kHalf: d = DType::kFloat16; break;
    default: known = false; d = DType::kFloat32; break;
  }
  TORCH_CHECK(known && std::find(supported.begin(), supported.end(), d) != supported.end(), op,
              ": unsupported dtype ", t);
  return d;
}

}  // namespace distillkit
