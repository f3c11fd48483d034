"""Build script for masked_optim's compiled kernels.

Install torch first, then build without isolation (an isolated build would download another,
multi-GB torch):

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

Environment:
    MASKED_OPTIM_BUILD_EXT=0   skip the C++ extension (the package then runs its pure-PyTorch path)

Without torch importable at build time, the extension is skipped with a warning.
"""

import os
import sys

from setuptools import setup

ext_modules = []
cmdclass = {}
if os.environ.get("MASKED_OPTIM_BUILD_EXT", "1") == "0":
    print("masked_optim: MASKED_OPTIM_BUILD_EXT=0, not building the C++ extension", file=sys.stderr)
else:
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as exc:
        print(
            f"masked_optim: torch is not importable ({exc}); building without the C++ extension. "
            "Install torch first and use `pip install --no-build-isolation -e .`",
            file=sys.stderr,
        )
    else:
        here = os.path.dirname(os.path.abspath(__file__))
        ext_modules.append(
            CppExtension(
                "masked_optim._C",
                sources=["csrc/cpu/masked_optim_cpu.cpp", "csrc/cpu/masked_sgd_cpu.cpp"],
                include_dirs=[os.path.join(here, "csrc")],
                # -ffp-contract=off: q = alpha * s + beta must round twice, like the reference, or
                # masks differ from it by an ulp. -fopenmp: at::parallel_for uses OpenMP; the
                # runtime resolves to the libgomp that torch already loaded (same soname).
                extra_compile_args={"cxx": ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]},
                extra_link_args=["-fopenmp"],
            )
        )
        cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
