// Placeholder: the scoring kernels land in their own commit.
#include "distillkit.h"

namespace distillkit {
void bind_scoring(pybind11::module_& m) {}
}  // namespace distillkit
