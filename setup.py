"""Builds distillkit._C from csrc/ and ships the top-level kernels/ folder as distillkit.kernels.

Build switches (environment variables):
  DISTILLKIT_BUILD_CUDA=0|1   force the CUDA kernels off/on (default: on when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0")
  DISTILLKIT_CPU_ARCH         value for -march= on the CPU kernels (default "native"; "" for portable wheels)
  MAX_JOBS                    parallel compile jobs (default: sized to cores and free memory)
"""
import glob
import os
import platform

import setuptools
from setuptools import find_packages, setup

# pip does not check [build-system] requires under --no-build-isolation: say it here, not as a schema error
if int(setuptools.__version__.split(".")[0]) < 77:
    raise RuntimeError(
        f"distillkit needs setuptools >= 77 (pyproject.toml's SPDX `license` and `license-files`); this is "
        f"setuptools {setuptools.__version__}: `pip install 'setuptools>=77'`, then build again"
    )

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pip's isolated build env has no torch: say how to build instead
    raise RuntimeError(
        "distillkit builds against an installed torch. Install torch first (e.g. `pip install torch==2.13.0`), "
        "then `pip install --no-build-isolation -e .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    flag = os.environ.get("DISTILLKIT_BUILD_CUDA", "").strip()
    have = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not have:
            raise RuntimeError(
                f"DISTILLKIT_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda} and CUDA_HOME={CUDA_HOME}"
            )
        return True
    return have


def _default_max_jobs() -> None:
    if "MAX_JOBS" in os.environ:
        return
    try:  # ~1.5 GB per translation unit against torch headers
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError):
        free_gb = 8.0
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(free_gb // 1.5))))


def _extension():
    with_cuda = _want_cuda()
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    arch = os.environ.get("DISTILLKIT_CPU_ARCH", "native" if platform.machine() in ("x86_64", "AMD64") else "")
    if arch:
        cxx.append(f"-march={arch}")
    define_macros = []
    if not with_cuda:
        return CppExtension(
            "distillkit._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
            define_macros=define_macros, include_dirs=[os.path.join(HERE, "csrc")],
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*_host.cpp"))
    define_macros.append(("DISTILLKIT_WITH_CUDA", "1"))
    nvcc = ["-O3", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "distillkit._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"],
        define_macros=define_macros, include_dirs=[os.path.join(HERE, "csrc")],
    )


_default_max_jobs()
packages = find_packages(include=["distillkit", "distillkit.*"]) + ["distillkit.kernels"]
setup(
    packages=packages,
    package_dir={"distillkit.kernels": "kernels"},
    package_data={"distillkit.world": ["assets/**/*"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
