// CPU kernels of masked_optim, registered as torch.library ops under the `masked_optim` namespace.
// This file defines every op schema once (TORCH_LIBRARY) and the module entry point; kernels register
// their implementations per device (masked_sgd_cpu.cpp, cuda/). The Philox uniform generator here must
// be bit-identical to the pure-PyTorch reference (masked_optim/rng.py) and to Triton's tl.rand4x.
#include <Python.h>

#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <string>


namespace masked_optim {
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
  info += ";kernels=philox_uniform,masked_sgd";
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  // The clone of the vectorised loops that runtime dispatch picks on this CPU (target_clones).
  __builtin_cpu_init();
  info += __builtin_cpu_supports("x86-64-v4")   ? ";cpu_dispatch=x86-64-v4"
          : __builtin_cpu_supports("x86-64-v3") ? ";cpu_dispatch=x86-64-v3"
                                                : ";cpu_dispatch=default";
#else
  info += ";cpu_dispatch=none";
#endif
#if defined(MASKED_OPTIM_WITH_CUDA)
  info += ";cuda=yes";
#else
  info += ";cuda=no";
#endif
  return info;
}

}  // namespace

TORCH_LIBRARY(masked_optim, m) {
  m.def("philox_uniform_(Tensor(a!) out, int key) -> Tensor(a!)");
  // The masked SGD step of one tensor (kernel contract: see masked_optim/backends/__init__.py).
  m.def(
      "masked_sgd_(Tensor(a!) param, Tensor grad, Tensor(b!) momentum_buffer, Tensor? scores, Tensor? scalars, "
      "int key, float rate, float smoothing, int max_iter, int mode, bool channel, float lr, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step) -> (Tensor, Tensor)");
  // Its stage 1 alone: ([alpha, beta], unit scores or empty, sum of g^2), for all-or-nothing steps.
  m.def("tensor_scalars(Tensor grad, float rate, float smoothing, int max_iter, int mode, bool channel) -> (Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}


}  // namespace masked_optim

// `import masked_optim._C` loads this library, which registers the ops above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "masked_optim compiled kernels", -1, nullptr};
  return PyModule_Create(&module);
}
