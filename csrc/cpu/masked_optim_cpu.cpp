// CPU kernels of masked_optim, registered as torch.library ops under the `masked_optim` namespace.
// This file defines every op schema once (TORCH_LIBRARY) and the module entry point; kernels register
// their implementations per device (masked_sgd_cpu.cpp, cuda/). The Philox uniform generator here must
// be bit-identical to the pure-PyTorch reference (masked_optim/rng.py) and to Triton's tl.rand4x.
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/headeronly/version.h>
#include <torch/library.h>

#include <string>

#include "../philox.h"

namespace masked_optim {
namespace {

#define MASKED_OPTIM_STR2(x) #x
#define MASKED_OPTIM_STR(x) MASKED_OPTIM_STR2(x)

at::Tensor& philox_uniform_cpu(at::Tensor& out, int64_t key) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, "philox_uniform_: out must be float32, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "philox_uniform_: out must be contiguous");
  TORCH_CHECK(key >= 0, "philox_uniform_: key must be >= 0, got ", key);
  const int64_t n = out.numel();
  float* data = out.data_ptr<float>();
  const uint64_t k = static_cast<uint64_t>(key);
  const int64_t blocks = (n + 3) / 4;
  at::parallel_for(0, blocks, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const Philox4x32 r = philox_block(k, static_cast<uint64_t>(b));
      const int64_t base = 4 * b;
      for (int w = 0; w < 4 && base + w < n; ++w) data[base + w] = uint32_to_uniform(r.v[w]);
    }
  });
  return out;
}

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
  m.def("build_info() -> str", &build_info);
}

TORCH_LIBRARY_IMPL(masked_optim, CPU, m) { m.impl("philox_uniform_", &philox_uniform_cpu); }

}  // namespace masked_optim

// `import masked_optim._C` loads this library, which registers the ops above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "masked_optim compiled kernels", -1, nullptr};
  return PyModule_Create(&module);
}
