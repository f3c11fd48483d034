// CUDA implementation of masked_optim::masked_sgd_ (the schema is declared once, in
// masked_optim/backends/_ops.py; this file only registers the CUDA kernel). Validates the tensors, allocates the
// outputs and workspaces on the param's device and launches the kernels of masked_sgd_cuda.cu on
// the current stream. Nothing here synchronises with the host: the kept count and [alpha, beta]
// are returned as device tensors.
#include <ATen/ATen.h>
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the latter includes cuBLAS, cuSPARSE and
// cuSOLVER headers, which a bare CUDA toolkit (nvcc + cudart) lacks. at::cuda aliases c10::cuda.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "masked_sgd_cuda.h"

namespace masked_optim {
namespace {

#define MASKED_OPTIM_CUDA_CHECK(expr, what)                                                                  \
  do {                                                                                                       \
    const cudaError_t masked_optim_err_ = (expr);                                                            \
    TORCH_CHECK(masked_optim_err_ == cudaSuccess, "masked_sgd_ (CUDA): ", what, " failed: ",                \
                cudaGetErrorName(masked_optim_err_), " (", cudaGetErrorString(masked_optim_err_), ")");     \
  } while (0)

cuda::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return cuda::DType::kFloat32;
    case at::kDouble:
      return cuda::DType::kFloat64;
    case at::kHalf:
      return cuda::DType::kFloat16;
    case at::kBFloat16:
      return cuda::DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, "masked_sgd_: param dtype must be float32, float64, float16 or bfloat16, got ", t);
}

std::tuple<at::Tensor, at::Tensor> masked_sgd_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& buf,
                                                   const std::optional<at::Tensor>& scores,
                                                   const std::optional<at::Tensor>& scalars, int64_t key, double rate,
                                                   double smoothing, int64_t max_iter, int64_t mode, bool channel,
                                                   double lr, double momentum, double dampening, double weight_decay,
                                                   bool nesterov, bool maximize, bool first_step) {
  // ---- validation
  TORCH_CHECK(param.is_cuda(), "masked_sgd_: param must be a CUDA tensor for the CUDA kernel, got device ",
              param.device());
  const cuda::DType dtype = kernel_dtype(param.scalar_type());
  TORCH_CHECK(grad.device() == param.device(), "masked_sgd_: grad must be on param's device ", param.device(),
              ", got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "masked_sgd_: grad dtype must match param dtype ",
              param.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == param.sizes(), "masked_sgd_: grad shape must match param shape ", param.sizes(),
              ", got ", grad.sizes());
  TORCH_CHECK(param.is_contiguous(), "masked_sgd_: param must be contiguous, got strides ", param.strides());
  TORCH_CHECK(grad.is_contiguous(), "masked_sgd_: grad must be contiguous, got strides ", grad.strides());
  TORCH_CHECK(mode_valid(mode),
              "masked_sgd_: mode must be in 0..5 (0 dense, 1 uniform, 2 uniform unbiased, 3 amss, 4 amss+, 5 scale), got ",
              mode);
  TORCH_CHECK(rate > 0 && rate <= 1, "masked_sgd_: rate must be in (0, 1], got ", rate);
  TORCH_CHECK(smoothing >= 0 && smoothing <= 1, "masked_sgd_: smoothing must be in [0, 1], got ", smoothing);
  TORCH_CHECK(max_iter >= 0, "masked_sgd_: max_iter must be >= 0, got ", max_iter);
  TORCH_CHECK(key >= 0, "masked_sgd_: key must be >= 0, got ", key);
  const bool has_momentum = momentum != 0;
  if (has_momentum) {
    TORCH_CHECK(buf.device() == param.device() && buf.scalar_type() == param.scalar_type() &&
                    buf.sizes() == param.sizes() && buf.is_contiguous(),
                "masked_sgd_: momentum_buffer must be a contiguous tensor like param (", param.scalar_type(), " ",
                param.sizes(), " on ", param.device(), ") when momentum != 0 (momentum=", momentum, "); got ",
                buf.scalar_type(), " ", buf.sizes(), " on ", buf.device(), buf.is_contiguous() ? "" : ", non-contiguous");
  }

  const int64_t numel = param.numel();
  const int64_t n_units = channel ? (param.dim() > 0 ? param.size(0) : 1) : numel;
  const int64_t inner = n_units > 0 ? numel / n_units : 0;
  const at::ScalarType acc_type = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  if (scores.has_value()) {
    TORCH_CHECK(scores->device() == param.device(), "masked_sgd_: scores must be on param's device ",
                param.device(), ", got ", scores->device());
    TORCH_CHECK(at::isFloatingType(scores->scalar_type()), "masked_sgd_: scores must be a floating tensor, got ",
                scores->scalar_type());
    TORCH_CHECK(scores->dim() == 1 && scores->size(0) == n_units, "masked_sgd_: scores must be 1-D with ", n_units,
                " units (", channel ? "channel" : "element", " granularity), got shape ", scores->sizes());
  }
  if (scalars.has_value()) {
    TORCH_CHECK(scalars->device() == param.device(), "masked_sgd_: scalars must be on param's device ",
                param.device(), ", got ", scalars->device());
    TORCH_CHECK(at::isFloatingType(scalars->scalar_type()), "masked_sgd_: scalars must be a floating tensor, got ",
                scalars->scalar_type());
    TORCH_CHECK(scalars->numel() == 2, "masked_sgd_: scalars must hold [alpha, beta], got ", scalars->numel(),
                " values");
  }

  const c10::cuda::CUDAGuard device_guard(param.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // ---- outputs (fills are device kernels: no host synchronisation)
  // Mode scale samples nothing: like dense ([alpha, beta] = [0, 1], every unit kept), with g~ = rate * g.
  const bool sampled = step_sampled(mode, rate, n_units);
  const bool uniform = mode_uniform(mode);
  const auto long_opts = param.options().dtype(at::kLong);
  at::Tensor kept = at::scalar_tensor(sampled ? int64_t{0} : n_units, long_opts);
  at::Tensor out_scalars = at::empty({2}, param.options().dtype(acc_type));

  // ---- stage 1: unit scores (channel) and [alpha, beta]
  at::Tensor scores_t;  // acc dtype, n_units; defined when some stage reads scores
  if (sampled && !uniform) {
    if (scores.has_value()) {
      scores_t = scores->to(acc_type).contiguous();
    } else if (channel) {
      scores_t = at::empty({n_units}, param.options().dtype(acc_type));
      MASKED_OPTIM_CUDA_CHECK(cuda::launch_channel_scores(dtype, grad.const_data_ptr(), n_units, inner,
                                                          scores_t.mutable_data_ptr(), stream),
                              "channel score kernel");
    }
  }
  if (!sampled) {
    MASKED_OPTIM_CUDA_CHECK(cuda::launch_fill_scalars(dtype, 0.0, 1.0, out_scalars.mutable_data_ptr(), stream),
                            "scalar fill kernel");
  } else if (scalars.has_value()) {
    out_scalars.copy_(scalars->reshape({2}));  // device-to-device, converted to the compute dtype
  } else if (uniform) {
    MASKED_OPTIM_CUDA_CHECK(cuda::launch_fill_scalars(dtype, 0.0, rate, out_scalars.mutable_data_ptr(), stream),
                            "scalar fill kernel");
  } else {
    at::Tensor workspace =
        at::empty({static_cast<int64_t>(cuda::inclusion_workspace_bytes(dtype))}, param.options().dtype(at::kByte));
    MASKED_OPTIM_CUDA_CHECK(
        cuda::launch_inclusion_scalars(dtype, grad.const_data_ptr(),
                                       scores_t.defined() ? scores_t.const_data_ptr() : nullptr, n_units, rate,
                                       smoothing, max_iter, workspace.mutable_data_ptr(),
                                       out_scalars.mutable_data_ptr(), stream),
        "inclusion scalar (water-filling) kernels");
  }

  // ---- stage 2: fused sample and update
  at::Tensor unit_factor;
  if (sampled && channel) unit_factor = at::empty({n_units}, param.options().dtype(acc_type));
  cuda::MaskedSgdArgs args;
  args.dtype = dtype;
  args.param = param.mutable_data_ptr();
  args.grad = grad.const_data_ptr();
  args.momentum_buffer = has_momentum ? buf.mutable_data_ptr() : nullptr;
  args.scores = channel && scores_t.defined() ? scores_t.const_data_ptr() : nullptr;
  args.scalars = out_scalars.const_data_ptr();
  args.unit_factor = unit_factor.defined() ? unit_factor.mutable_data_ptr() : nullptr;
  args.kept = reinterpret_cast<unsigned long long*>(kept.mutable_data_ptr<int64_t>());
  args.numel = numel;
  args.n_units = n_units;
  args.inner = inner;
  args.key = static_cast<uint64_t>(key);
  args.rate = rate;
  args.mode = mode;
  args.channel = channel;
  args.sampled = sampled;
  args.lr = lr;
  args.momentum = momentum;
  args.dampening = dampening;
  args.weight_decay = weight_decay;
  args.nesterov = nesterov;
  args.maximize = maximize;
  args.first_step = first_step;
  MASKED_OPTIM_CUDA_CHECK(cuda::launch_masked_sgd_update(args, stream), "masked SGD update kernel");
  return {kept, out_scalars};
}

}  // namespace

TORCH_LIBRARY_IMPL(masked_optim, CUDA, m) { m.impl("masked_sgd_", &masked_sgd_cuda); }

}  // namespace masked_optim
