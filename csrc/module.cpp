// The Python module masked_optim._C and the device-neutral parts of the extension.
// The op schemas (masked_sgd_, tensor_scalars, philox_uniform_) are declared once, in Python, with
// their fake kernels beside them (masked_optim/backends/_ops.py, imported before this library loads);
// the C++ sources only register implementations per device (TORCH_LIBRARY_IMPL in
// csrc/cpu/masked_sgd_cpu.cpp and csrc/cuda/masked_sgd_cuda_binding.cpp). build_info, which no other
// language implements, is declared and implemented here, in a fragment of the same namespace.
#include <Python.h>

// TORCH_VERSION_*: torch/headeronly/version.h since torch 2.9 or so, torch/version.h before.
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif
#include <torch/library.h>

#include <string>


namespace masked_optim {

const char* cpu_kernel_isa();     // csrc/cpu/masked_sgd_cpu.cpp
const char* cpu_philox_low();     // csrc/cpu/masked_sgd_cpu.cpp
int64_t cpu_prefetch_bytes();     // csrc/cpu/masked_sgd_cpu.cpp

namespace {

#define MASKED_OPTIM_STR2(x) #x
#define MASKED_OPTIM_STR(x) MASKED_OPTIM_STR2(x)

std::string build_info() {
  std::string info = "compiler=";
#if defined(__clang__)
  info += "clang " __clang_version__;
#elif defined(__GNUC__)
  info += "gcc " __VERSION__;
#else
  info += "unknown";
#endif
  info += ";torch=" MASKED_OPTIM_STR(TORCH_VERSION_MAJOR) "." MASKED_OPTIM_STR(TORCH_VERSION_MINOR) "." MASKED_OPTIM_STR(
      TORCH_VERSION_PATCH);
#if defined(_OPENMP)
  info += ";openmp=" MASKED_OPTIM_STR(_OPENMP);
#else
  info += ";openmp=no";
#endif
  info += ";kernels=philox_uniform,masked_sgd,masked_adamw,multi_tensor";
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  // The clone of the vectorised loops that runtime dispatch picks on this CPU (target_clones).
  __builtin_cpu_init();
  info += __builtin_cpu_supports("x86-64-v4")   ? ";cpu_dispatch=x86-64-v4"
          : __builtin_cpu_supports("x86-64-v3") ? ";cpu_dispatch=x86-64-v3"
                                                : ";cpu_dispatch=default";
#else
  info += ";cpu_dispatch=none";
#endif
  // The hand-written paths (AVX-512 or AVX2 intrinsics, or none), lowered by MASKED_OPTIM_CPU_ISA.
  info += ";cpu_isa=";
  info += cpu_kernel_isa();
  // How the AVX-512 Philox forms the low words of its products (MASKED_OPTIM_PHILOX_LOW).
  info += ";philox_low=";
  info += cpu_philox_low();
  // The software prefetch distance of the streaming CPU passes (MASKED_OPTIM_PREFETCH).
  info += ";prefetch=" + std::to_string(cpu_prefetch_bytes());
#if defined(MASKED_OPTIM_WITH_CUDA)
  info += ";cuda=yes";
#else
  info += ";cuda=no";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(masked_optim, m) { m.def("build_info() -> str", &build_info); }


}  // namespace masked_optim

// `import masked_optim._C` loads this library, which registers build_info and the kernels.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "masked_optim compiled kernels", -1, nullptr};
  return PyModule_Create(&module);
}
