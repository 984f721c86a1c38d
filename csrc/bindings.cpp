// The one PYBIND11_MODULE of distillkit._C. Kernel families bind themselves (bind_* in their own
// files) so that each family's host code, GIL release and argument checks stay beside its kernels.
#include "distillkit.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "distillkit compiled kernels (CPU always; CUDA when built with it)";
  m.def("with_cuda", []() {
#ifdef DISTILLKIT_WITH_CUDA
    return true;
#else
    return false;
#endif
  }, "True when the extension was compiled with its CUDA kernels");
  distillkit::bind_merge(m);
  distillkit::bind_skew_kl(m);
  distillkit::bind_scoring(m);
  distillkit::bind_validity(m);
}
