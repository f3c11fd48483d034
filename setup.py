"""Build script for masked_optim's compiled kernels.

Install torch first, then build without isolation (an isolated build would download another,
multi-GB torch):

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

What is built:
    * the module entry point (csrc/module.cpp) and the C++ CPU kernels (csrc/cpu), always, unless
      MASKED_OPTIM_BUILD_EXT=0 (the per-element math they share with CUDA: csrc/masked_sgd_math.h);
    * the CUDA kernels (csrc/cuda) as well, only when torch is a CUDA build and nvcc is found
      (torch's CUDA_HOME). nvcc is never called otherwise.

Environment:
    MASKED_OPTIM_BUILD_EXT=0    no compiled extension (the package then runs its pure-PyTorch path)
    MASKED_OPTIM_BUILD_CUDA=0   CPU kernels only, even with a CUDA torch
    MASKED_OPTIM_BUILD_CUDA=1   require the CUDA kernels: fail with the reason if they cannot build
    TORCH_CUDA_ARCH_LIST        GPU architectures, e.g. "8.0;9.0" (needed where no GPU is visible)

Without torch importable at build time, the extension is skipped with a warning.
"""

import os
import shutil
import sys

from setuptools import setup

# The op schemas and their fake kernels live in masked_optim/backends/_ops.py (Python, device
# neutral); csrc/module.cpp is the module entry point, the rest only implement the ops per device.
COMMON_SOURCES = ["csrc/module.cpp"]
CPU_SOURCES = ["csrc/cpu/masked_sgd_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/masked_sgd_cuda.cu", "csrc/cuda/masked_sgd_cuda_binding.cpp"]
# -ffp-contract=off: q = alpha * s + beta must round twice, like the reference, or masks differ from
# it by an ulp. -fopenmp: at::parallel_for uses OpenMP; at run time libgomp resolves to the copy
# torch already loaded (same soname), so there is one thread pool. -fno-math-errno: sqrt may not set
# errno, so the AdamW element loop (a square root per element) vectorises; no result changes.
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--fmad=false"]


def _log(msg):
    print(f"masked_optim: {msg}", file=sys.stderr)


def _cuda_reason(torch):
    """None when the CUDA kernels can be built, else why not. Never runs nvcc."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc and include/)"
    if not (os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc")):
        return f"nvcc not found under CUDA_HOME={CUDA_HOME}"
    return None


ext_modules = []
cmdclass = {}
if os.environ.get("MASKED_OPTIM_BUILD_EXT", "1") == "0":
    _log("MASKED_OPTIM_BUILD_EXT=0, not building the C++ extension")
else:
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        _log(f"torch is not importable ({exc}); building without the C++ extension. "
             "Install torch first and use `pip install --no-build-isolation -e .`")
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        want_cuda = os.environ.get("MASKED_OPTIM_BUILD_CUDA", "auto")
        reason = "MASKED_OPTIM_BUILD_CUDA=0" if want_cuda == "0" else _cuda_reason(torch)
        if want_cuda == "1" and reason is not None:
            raise RuntimeError(f"MASKED_OPTIM_BUILD_CUDA=1 but the CUDA kernels cannot be built: {reason}")
        common = dict(include_dirs=[os.path.join(here, "csrc")], extra_link_args=["-fopenmp"])
        if reason is None:
            from torch.utils.cpp_extension import CUDAExtension

            _log(f"building the CPU and CUDA kernels (CUDA {torch.version.cuda})")
            ext = CUDAExtension(
                "masked_optim._C",
                sources=COMMON_SOURCES + CPU_SOURCES + CUDA_SOURCES,
                define_macros=[("MASKED_OPTIM_WITH_CUDA", "1")],
                extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
                **common,
            )
        else:
            _log(f"building the CPU kernels only ({reason})")
            ext = CppExtension("masked_optim._C", sources=COMMON_SOURCES + CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS}, **common)
        ext_modules.append(ext)
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
