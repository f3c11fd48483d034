// CUDA implementations of masked_optim::masked_sgd_ and masked_optim::masked_adamw_ (the schemas are
// declared once, in masked_optim/backends/_ops.py; this file only registers the CUDA kernels).
// Validates the tensors, allocates the outputs and workspaces on the param's device and launches the
// kernels of masked_sgd_cuda.cu on the current stream. Nothing here synchronises with the host: the kept count and [alpha, beta]
// are returned as device tensors.
#include <ATen/ATen.h>
// c10/cuda/CUDAStream.h rather than ATen/cuda/CUDAContext.h: the latter includes cuBLAS, cuSPARSE and
// cuSOLVER headers, which a bare CUDA toolkit (nvcc + cudart) lacks. at::cuda aliases c10::cuda.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "masked_sgd_cuda.h"

namespace masked_optim {
namespace {

#define MASKED_OPTIM_CUDA_CHECK(op, expr, what)                                                              \
  do {                                                                                                       \
    const cudaError_t masked_optim_err_ = (expr);                                                            \
    TORCH_CHECK(masked_optim_err_ == cudaSuccess, op, " (CUDA): ", what, " failed: ",                       \
                cudaGetErrorName(masked_optim_err_), " (", cudaGetErrorString(masked_optim_err_), ")");     \
  } while (0)

cuda::DType kernel_dtype(const char* op, at::ScalarType t) {
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
  TORCH_CHECK(false, op, ": param dtype must be float32, float64, float16 or bfloat16, got ", t);
}

// The checks every masked step makes (op: the op's name, for the messages): param a CUDA tensor of a
// supported dtype, grad like it, both contiguous, and the sampling arguments in range.
cuda::DType check_step_args(const char* op, const at::Tensor& param, const at::Tensor& grad, double rate,
                            double smoothing, int64_t max_iter, int64_t key) {
  TORCH_CHECK(param.is_cuda(), op, ": param must be a CUDA tensor for the CUDA kernel, got device ", param.device());
  const cuda::DType dtype = kernel_dtype(op, param.scalar_type());
  TORCH_CHECK(grad.device() == param.device(), op, ": grad must be on param's device ", param.device(), ", got ",
              grad.device());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), op, ": grad dtype must match param dtype ",
              param.scalar_type(), ", got ", grad.scalar_type());
  TORCH_CHECK(grad.sizes() == param.sizes(), op, ": grad shape must match param shape ", param.sizes(), ", got ",
              grad.sizes());
  TORCH_CHECK(param.is_contiguous(), op, ": param must be contiguous, got strides ", param.strides());
  TORCH_CHECK(grad.is_contiguous(), op, ": grad must be contiguous, got strides ", grad.strides());
  TORCH_CHECK(rate > 0 && rate <= 1, op, ": rate must be in (0, 1], got ", rate);
  TORCH_CHECK(smoothing >= 0 && smoothing <= 1, op, ": smoothing must be in [0, 1], got ", smoothing);
  TORCH_CHECK(max_iter >= 0, op, ": max_iter must be >= 0, got ", max_iter);
  TORCH_CHECK(key >= 0, op, ": key must be >= 0, got ", key);
  return dtype;
}

// A state tensor of the step (momentum buffer, Adam moments): a contiguous tensor like param.
void check_state(const char* op, const char* name, const at::Tensor& t, const at::Tensor& param,
                 const std::string& when) {
  TORCH_CHECK(t.device() == param.device() && t.scalar_type() == param.scalar_type() && t.sizes() == param.sizes() &&
                  t.is_contiguous(),
              op, ": ", name, " must be a contiguous tensor like param (", param.scalar_type(), " ", param.sizes(),
              " on ", param.device(), ")", when, "; got ", t.scalar_type(), " ", t.sizes(), " on ", t.device(),
              t.is_contiguous() ? "" : ", non-contiguous");
}

// Stage 1 of a masked step, shared by masked_sgd_ and masked_adamw_ so that both draw the same masks:
// the kept counter (0 when sampled, else every unit), [alpha, beta] (given, filled, or from the
// water-filling kernels) and the unit scores the later stages read (defined when some stage reads them).
struct Stage1 {
  bool sampled = false;
  at::Tensor kept;         // int64 0-d: the device counter the update kernels increment
  at::Tensor out_scalars;  // acc, [alpha, beta]
  at::Tensor scores;       // acc, n_units, or undefined
};

Stage1 run_stage1(const char* op, cuda::DType dtype, const at::Tensor& param, const at::Tensor& grad,
                  const std::optional<at::Tensor>& scores, const std::optional<at::Tensor>& scalars, double rate,
                  double smoothing, int64_t max_iter, int64_t mode, bool channel, int64_t n_units, int64_t inner,
                  cudaStream_t stream) {
  const at::ScalarType acc_type = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  if (scores.has_value()) {
    TORCH_CHECK(scores->device() == param.device(), op, ": scores must be on param's device ", param.device(),
                ", got ", scores->device());
    TORCH_CHECK(at::isFloatingType(scores->scalar_type()), op, ": scores must be a floating tensor, got ",
                scores->scalar_type());
    TORCH_CHECK(scores->dim() == 1 && scores->size(0) == n_units, op, ": scores must be 1-D with ", n_units,
                " units (", channel ? "channel" : "element", " granularity), got shape ", scores->sizes());
  }
  if (scalars.has_value()) {
    TORCH_CHECK(scalars->device() == param.device(), op, ": scalars must be on param's device ", param.device(),
                ", got ", scalars->device());
    TORCH_CHECK(at::isFloatingType(scalars->scalar_type()), op, ": scalars must be a floating tensor, got ",
                scalars->scalar_type());
    TORCH_CHECK(scalars->numel() == 2, op, ": scalars must hold [alpha, beta], got ", scalars->numel(), " values");
  }

  // ---- outputs (fills are device kernels: no host synchronisation)
  // Mode scale samples nothing: like dense ([alpha, beta] = [0, 1], every unit kept), with g~ = rate * g.
  Stage1 out;
  out.sampled = step_sampled(mode, rate, n_units);
  const bool uniform = mode_uniform(mode);
  const auto long_opts = param.options().dtype(at::kLong);
  out.kept = at::scalar_tensor(out.sampled ? int64_t{0} : n_units, long_opts);
  out.out_scalars = at::empty({2}, param.options().dtype(acc_type));

  // ---- unit scores (channel) and [alpha, beta]
  if (out.sampled && !uniform) {
    if (scores.has_value()) {
      out.scores = scores->to(acc_type).contiguous();
    } else if (channel) {
      out.scores = at::empty({n_units}, param.options().dtype(acc_type));
      MASKED_OPTIM_CUDA_CHECK(op, cuda::launch_channel_scores(dtype, grad.const_data_ptr(), n_units, inner,
                                                              out.scores.mutable_data_ptr(), stream),
                              "channel score kernel");
    }
  }
  if (!out.sampled) {
    MASKED_OPTIM_CUDA_CHECK(op, cuda::launch_fill_scalars(dtype, 0.0, 1.0, out.out_scalars.mutable_data_ptr(), stream),
                            "scalar fill kernel");
  } else if (scalars.has_value()) {
    out.out_scalars.copy_(scalars->reshape({2}));  // device-to-device, converted to the compute dtype
  } else if (uniform) {
    MASKED_OPTIM_CUDA_CHECK(op, cuda::launch_fill_scalars(dtype, 0.0, rate, out.out_scalars.mutable_data_ptr(), stream),
                            "scalar fill kernel");
  } else {
    at::Tensor workspace =
        at::empty({static_cast<int64_t>(cuda::inclusion_workspace_bytes(dtype))}, param.options().dtype(at::kByte));
    MASKED_OPTIM_CUDA_CHECK(
        op,
        cuda::launch_inclusion_scalars(dtype, grad.const_data_ptr(),
                                       out.scores.defined() ? out.scores.const_data_ptr() : nullptr, n_units, rate,
                                       smoothing, max_iter, workspace.mutable_data_ptr(),
                                       out.out_scalars.mutable_data_ptr(), stream),
        "inclusion scalar (water-filling) kernels");
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_sgd_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& buf,
                                                   const std::optional<at::Tensor>& scores,
                                                   const std::optional<at::Tensor>& scalars, int64_t key, double rate,
                                                   double smoothing, int64_t max_iter, int64_t mode, bool channel,
                                                   double lr, double momentum, double dampening, double weight_decay,
                                                   bool nesterov, bool maximize, bool first_step) {
  constexpr const char* op = "masked_sgd_";
  // ---- validation
  const cuda::DType dtype = check_step_args(op, param, grad, rate, smoothing, max_iter, key);
  TORCH_CHECK(mode_valid(mode),
              "masked_sgd_: mode must be in 0..5 (0 dense, 1 uniform, 2 uniform unbiased, 3 amss, 4 amss+, 5 scale), got ",
              mode);
  const bool has_momentum = momentum != 0;
  if (has_momentum) {
    check_state(op, "momentum_buffer", buf, param, c10::str(" when momentum != 0 (momentum=", momentum, ")"));
  }

  const int64_t numel = param.numel();
  const int64_t n_units = channel ? (param.dim() > 0 ? param.size(0) : 1) : numel;
  const int64_t inner = n_units > 0 ? numel / n_units : 0;
  const at::ScalarType acc_type = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  const c10::cuda::CUDAGuard device_guard(param.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // ---- stage 1: unit scores (channel) and [alpha, beta]
  const Stage1 s1 =
      run_stage1(op, dtype, param, grad, scores, scalars, rate, smoothing, max_iter, mode, channel, n_units, inner, stream);
  at::Tensor kept = s1.kept;
  at::Tensor out_scalars = s1.out_scalars;
  const bool sampled = s1.sampled;

  // ---- stage 2: fused sample and update
  at::Tensor unit_factor;
  if (sampled && channel) unit_factor = at::empty({n_units}, param.options().dtype(acc_type));
  cuda::MaskedSgdArgs args;
  args.dtype = dtype;
  args.param = param.mutable_data_ptr();
  args.grad = grad.const_data_ptr();
  args.momentum_buffer = has_momentum ? buf.mutable_data_ptr() : nullptr;
  args.scores = channel && s1.scores.defined() ? s1.scores.const_data_ptr() : nullptr;
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
  MASKED_OPTIM_CUDA_CHECK(op, cuda::launch_masked_sgd_update(args, stream), "masked SGD update kernel");
  return {kept, out_scalars};
}

// The lazy AdamW step (docs/algorithm.md §2.8): stage 1 is masked_sgd_'s (run_stage1), so the masks are
// the SGD step's for the same key; stage 2 updates the kept units' param, exp_avg, exp_avg_sq and (amsgrad)
// max_exp_avg_sq. `step` is the tensor's step count after this step's increment.
std::tuple<at::Tensor, at::Tensor> masked_adamw_cuda(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                                                     at::Tensor& exp_avg_sq, at::Tensor& max_exp_avg_sq,
                                                     const std::optional<at::Tensor>& scores,
                                                     const std::optional<at::Tensor>& scalars, int64_t key,
                                                     double rate, double smoothing, int64_t max_iter, int64_t mode,
                                                     bool channel, double lr, double beta1, double beta2, double eps,
                                                     double weight_decay, double step, bool amsgrad, bool maximize) {
  constexpr const char* op = "masked_adamw_";
  // ---- validation
  const cuda::DType dtype = check_step_args(op, param, grad, rate, smoothing, max_iter, key);
  TORCH_CHECK(mode >= kUniform && mode <= kAmssPlus,
              "masked_adamw_: kernel_mode must be in 1..4 (1 uniform, 2 uniform unbiased, 3 amss, 4 amss+), got ", mode);
  check_state(op, "exp_avg", exp_avg, param, "");
  check_state(op, "exp_avg_sq", exp_avg_sq, param, "");
  if (amsgrad) check_state(op, "max_exp_avg_sq", max_exp_avg_sq, param, " when amsgrad");
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, "masked_adamw_: beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, "masked_adamw_: beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(eps >= 0, "masked_adamw_: eps must be >= 0, got ", eps);
  TORCH_CHECK(step >= 1, "masked_adamw_: step must be >= 1 (the step count after the increment), got ", step);

  const int64_t numel = param.numel();
  const int64_t n_units = channel ? (param.dim() > 0 ? param.size(0) : 1) : numel;
  const int64_t inner = n_units > 0 ? numel / n_units : 0;
  const at::ScalarType acc_type = param.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  const c10::cuda::CUDAGuard device_guard(param.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  // ---- stage 1: masked_sgd_'s
  const Stage1 s1 =
      run_stage1(op, dtype, param, grad, scores, scalars, rate, smoothing, max_iter, mode, channel, n_units, inner, stream);
  at::Tensor kept = s1.kept;
  at::Tensor out_scalars = s1.out_scalars;

  // ---- stage 2: sample (masked_sgd_'s masks) and update the kept units
  at::Tensor unit_factor;
  if (s1.sampled && channel) unit_factor = at::empty({n_units}, param.options().dtype(acc_type));
  cuda::MaskedAdamwArgs args;
  args.dtype = dtype;
  args.param = param.mutable_data_ptr();
  args.grad = grad.const_data_ptr();
  args.exp_avg = exp_avg.mutable_data_ptr();
  args.exp_avg_sq = exp_avg_sq.mutable_data_ptr();
  args.max_exp_avg_sq = amsgrad ? max_exp_avg_sq.mutable_data_ptr() : nullptr;
  args.scores = channel && s1.scores.defined() ? s1.scores.const_data_ptr() : nullptr;
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
  args.sampled = s1.sampled;
  args.lr = lr;
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.step = step;
  args.amsgrad = amsgrad;
  args.maximize = maximize;
  MASKED_OPTIM_CUDA_CHECK(op, cuda::launch_masked_adamw_update(args, stream), "masked AdamW update kernel");
  return {kept, out_scalars};
}

}  // namespace

TORCH_LIBRARY_IMPL(masked_optim, CUDA, m) {
  m.impl("masked_sgd_", &masked_sgd_cuda);
  m.impl("masked_adamw_", &masked_adamw_cuda);
}

}  // namespace masked_optim
