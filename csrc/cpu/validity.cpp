// Placeholder: the validity kernels land in their own commit.
#include "distillkit.h"

namespace distillkit {
void bind_validity(pybind11::module_& m) {}
}  // namespace distillkit
