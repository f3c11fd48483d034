// The math of one masked SGD step, stated once for C++ (docs/algorithm.md §2, §2.5): the mode codes,
// the inclusion probability q = min(1, alpha s + beta), the weight of a kept unit and torch.optim.SGD's
// update of one element. Host/device functions in plain C++ (no torch headers), included by the CPU
// kernels (csrc/cpu/masked_sgd_cpu.cpp) and the CUDA kernels (csrc/cuda/masked_sgd_cuda.cu).
// The Python statement of the same rule is masked_optim/functional.py (inclusion_probability,
// masked_gradient_given_scalars and the SGD tail of _single_tensor_masked_sgd); the Triton one is
// _masked_sgd_kernel in masked_optim/backends/triton_kernels.py.
//
// Bit parity of the mask with the reference needs q rounded as torch rounds `scores * alpha + beta`:
// a product, then a sum, never a fused multiply-add. On the device mul_rn/add_rn are the explicitly
// rounded intrinsics; on the host they are plain operators and the build passes -ffp-contract=off
// (setup.py). Everything is a select on loop-invariant flags (or a template
// parameter where GCC would not vectorise the select), so the CPU element loop vectorises.
#pragma once

#include <cmath>
#include <cstdint>

#include "philox.h"

namespace masked_optim {

// The kernel mode codes; the values of masked_optim/modes.py `Mode` (tests/test_ops.py checks them).
enum Mode : int64_t {
  kDense = 0,            // g~ = g
  kUniform = 1,          // q = rate, g~ = M g
  kUniformUnbiased = 2,  // q = rate, g~ = M g / q
  kAmss = 3,             // q = min(1, alpha s + beta), g~ = M g
  kAmssPlus = 4,         // q = min(1, alpha s + beta), g~ = M g / q
  kScale = 5,            // g~ = rate * g: no sampling, no random numbers
};
constexpr int64_t kNumModes = 6;

MASKED_OPTIM_HD bool mode_valid(int64_t mode) { return mode >= kDense && mode <= kScale; }
// Whether q is the rate itself (no stage 1: no scores, no water-filling).
MASKED_OPTIM_HD bool mode_uniform(int64_t mode) { return mode == kUniform || mode == kUniformUnbiased; }
// Whether kept units are divided by q.
MASKED_OPTIM_HD bool mode_unbiased(int64_t mode) { return mode == kUniformUnbiased || mode == kAmssPlus; }
// Whether a step of this tensor draws a mask: a sampling mode, rate < 1 and at least one unit.
MASKED_OPTIM_HD bool step_sampled(int64_t mode, double rate, int64_t n_units) {
  return mode != kDense && mode != kScale && rate < 1.0 && n_units > 0;
}

// ---- explicitly rounded arithmetic (no contraction into FMA on either side)
MASKED_OPTIM_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MASKED_OPTIM_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
MASKED_OPTIM_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MASKED_OPTIM_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
// 1 / x, IEEE round-to-nearest (torch's reciprocal and 1.0 / q).
MASKED_OPTIM_HD float rcp_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __frcp_rn(a);
#else
  return 1.0f / a;
#endif
}
MASKED_OPTIM_HD double rcp_rn(double a) {
#if defined(__CUDA_ARCH__)
  return __drcp_rn(a);
#else
  return 1.0 / a;
#endif
}

// sqrt, IEEE round-to-nearest. On the host std::sqrt, the float overload for float: an unqualified
// sqrt(float) resolves to ::sqrt(double) there (correctly rounded after the conversion back, but a
// double square root per element), and with errno handling (the build passes -fno-math-errno) it is
// a call in the loop, which then does not vectorise.
MASKED_OPTIM_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
MASKED_OPTIM_HD double sqrt_rn(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// The per-tensor hyper-parameters of one step in the compute dtype acc_t (float32, or float64 for
// float64 tensors), shared by the CPU and CUDA kernels. Build it with make_hyper; the kernels that
// read [alpha, beta] from device memory overwrite alpha and beta when !fixed_q.
template <typename acc_t>
struct Hyper {
  acc_t alpha, beta;  // q = min(1, alpha s + beta); when fixed_q, q = beta for every unit
  acc_t lr, momentum, one_minus_dampening, weight_decay;
  acc_t grad_scale;  // weight of a kept unit when !unbiased: rate for mode scale (rate < 1), else 1
  uint64_t key;      // Philox key of the tensor at this step
  bool sampled;      // a mask is drawn (step_sampled); false: every unit is kept
  bool fixed_q;      // q does not depend on the scores: uniform modes (q = rate), or nothing sampled (q = 1)
  bool unbiased;     // g~ = M g / q
  bool has_weight_decay, has_momentum, first_step, nesterov, maximize;
};

// The op's arguments as a Hyper. alpha and beta are [0, rate] for the uniform modes and [0, 1] when
// nothing is sampled; for amss/amss+ the caller sets them from stage 1 (0, 1 until then).
template <typename acc_t>
inline Hyper<acc_t> make_hyper(int64_t mode, bool sampled, double rate, uint64_t key, double lr, double momentum,
                               double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step) {
  Hyper<acc_t> h;
  h.sampled = sampled;
  h.fixed_q = !sampled || mode_uniform(mode);
  h.alpha = acc_t(0);
  h.beta = sampled && mode_uniform(mode) ? static_cast<acc_t>(rate) : acc_t(1);
  h.lr = static_cast<acc_t>(lr);
  h.momentum = static_cast<acc_t>(momentum);
  h.one_minus_dampening = static_cast<acc_t>(1.0 - dampening);
  h.weight_decay = static_cast<acc_t>(weight_decay);
  // Rounded to the compute dtype as torch rounds a Python scalar; exactly 1 for every other mode.
  h.grad_scale = mode == kScale && rate < 1.0 ? static_cast<acc_t>(rate) : acc_t(1);
  h.key = key;
  h.unbiased = sampled && mode_unbiased(mode);
  h.has_weight_decay = weight_decay != 0.0;
  h.has_momentum = momentum != 0.0;
  h.first_step = first_step;
  h.nesterov = nesterov;
  h.maximize = maximize;
  return h;
}

// The gradient the step descends: -g with maximize.
template <typename acc_t>
MASKED_OPTIM_HD acc_t signed_grad(const Hyper<acc_t>& h, acc_t g) {
  return h.maximize ? -g : g;
}

// q = min(1, alpha * s + beta), each operation rounded; NaN propagates like torch.clamp_max (NaN > 1 is
// false), so a NaN q keeps nothing.
template <typename acc_t>
MASKED_OPTIM_HD acc_t inclusion_probability(acc_t alpha, acc_t s, acc_t beta) {
  const acc_t x = add_rn(mul_rn(alpha, s), beta);
  return x > acc_t(1) ? acc_t(1) : x;
}

// The inclusion probability of a unit of score s under h: beta itself for the uniform modes (q = rate,
// whatever the score) and when nothing is sampled (q = 1). kFixedQ must equal h.fixed_q: a template
// parameter for the CPU element loop, which GCC does not vectorise with a select on it at run time.
template <bool kFixedQ, typename acc_t>
MASKED_OPTIM_HD acc_t unit_probability(const Hyper<acc_t>& h, acc_t s) {
  return kFixedQ ? h.beta : inclusion_probability(h.alpha, s, h.beta);
}

// The same with h.fixed_q read at run time.
template <typename acc_t>
MASKED_OPTIM_HD acc_t unit_probability(const Hyper<acc_t>& h, acc_t s) {
  return h.fixed_q ? unit_probability<true>(h, s) : unit_probability<false>(h, s);
}

// M = u < q, u the unit's Philox uniform (float32, converted exactly). Unsampled steps pass u = 0.
template <typename acc_t>
MASKED_OPTIM_HD bool keep_unit(float u, acc_t q) {
  return static_cast<acc_t>(u) < q;
}

// The weight of a kept unit: 1/q when unbiased, else grad_scale (1, or the rate in mode scale).
// kUnbiased must equal h.unbiased: a template parameter for the CPU element loop, where the select
// on it at run time computes the division for the biased modes too.
template <bool kUnbiased, typename acc_t>
MASKED_OPTIM_HD acc_t unit_weight(const Hyper<acc_t>& h, acc_t q) {
  return kUnbiased ? rcp_rn(q) : h.grad_scale;
}

// The same with h.unbiased read at run time.
template <typename acc_t>
MASKED_OPTIM_HD acc_t unit_weight(const Hyper<acc_t>& h, acc_t q) {
  return h.unbiased ? unit_weight<true>(h, q) : unit_weight<false>(h, q);
}

// g~ of one element of a unit: g * weight when kept, else 0 (weight 1 is exact: g * 1 == g).
template <typename acc_t>
MASKED_OPTIM_HD acc_t masked_value(acc_t g, bool keep, acc_t weight) {
  return keep ? mul_rn(g, weight) : acc_t(0);
}

// torch.optim.SGD's update of one element from its masked gradient gm, in its order: weight decay,
// momentum (b = d on the first step, else b = momentum * b + (1 - dampening) * d), nesterov, then
// p -= lr * d. p and b are read and written in the compute dtype; b is untouched without momentum
// (kMomentum: whether the step has momentum, a template parameter so the CPU loop stays branch-free).
template <bool kMomentum, typename acc_t>
MASKED_OPTIM_HD void sgd_update(const Hyper<acc_t>& h, acc_t gm, acc_t& p, acc_t& b) {
  const acc_t decayed = gm + h.weight_decay * p;  // computed unconditionally: a select, no branch
  acc_t d = h.has_weight_decay ? decayed : gm;
  if (kMomentum) {
    // b.mul_(momentum) is rounded on its own, then add_(d, alpha=1 - dampening).
    b = h.first_step ? d : mul_rn(h.momentum, b) + h.one_minus_dampening * d;
    d = h.nesterov ? d + h.momentum * b : b;
  }
  p = p - h.lr * d;
}

// The same with the momentum flag read at run time (the CUDA kernels).
template <typename acc_t>
MASKED_OPTIM_HD void sgd_update(const Hyper<acc_t>& h, acc_t gm, acc_t& p, acc_t& b) {
  if (h.has_momentum) {
    sgd_update<true>(h, gm, p, b);
  } else {
    sgd_update<false>(h, gm, p, b);
  }
}

// ---- the lazy AdamW step (docs/algorithm.md §2.8; Python statement: masked_optim/functional.py,
// masked_adamw). The mask (q, M, the unit weight 1/q when unbiased, else 1) is the SGD step's above.

// The per-tensor hyper-parameters of one AdamW step in the compute dtype acc_t. `step` is the tensor's
// step count after this step's increment; bias corrections are computed in double and rounded once.
template <typename acc_t>
struct AdamHyper {
  acc_t one_minus_beta1, beta2, one_minus_beta2;
  acc_t step_size;  // lr / (1 - beta1^step)
  acc_t bc2_sqrt;   // sqrt(1 - beta2^step)
  acc_t eps;
  acc_t lr_wd;      // lr * weight_decay (decoupled weight decay)
  bool has_weight_decay, amsgrad, maximize;
};

template <typename acc_t>
inline AdamHyper<acc_t> make_adam_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                                        double step, bool amsgrad, bool maximize) {
  AdamHyper<acc_t> h;
  h.one_minus_beta1 = static_cast<acc_t>(1.0 - beta1);
  h.beta2 = static_cast<acc_t>(beta2);
  h.one_minus_beta2 = static_cast<acc_t>(1.0 - beta2);
  h.step_size = static_cast<acc_t>(lr / (1.0 - std::pow(beta1, step)));
  h.bc2_sqrt = static_cast<acc_t>(std::sqrt(1.0 - std::pow(beta2, step)));
  h.eps = static_cast<acc_t>(eps);
  h.lr_wd = static_cast<acc_t>(lr * weight_decay);
  h.has_weight_decay = weight_decay != 0.0;
  h.amsgrad = amsgrad;
  h.maximize = maximize;
  return h;
}

// One element's AdamW step from its gradient g (already negated for maximize), in torch's order:
// m = lerp(m, g, 1 - beta1), v = beta2 v + (1 - beta2) g^2, vmax = max(vmax, v) (amsgrad),
// denom = sqrt(v or vmax) / sqrt(bc2) + eps, p -= weight * (lr wd p + step_size m / denom).
// Writes the new values only when `keep` (a unit that is not kept is untouched: a select, no branch).
// `weight`: 1/q when unbiased, else 1. vmax is ignored without amsgrad.
template <typename acc_t>
MASKED_OPTIM_HD void adamw_update(const AdamHyper<acc_t>& h, acc_t g, bool keep, acc_t weight, acc_t& p, acc_t& m,
                                  acc_t& v, acc_t& vmax) {
  const acc_t m_new = m + h.one_minus_beta1 * (g - m);
  const acc_t v_new = mul_rn(h.beta2, v) + h.one_minus_beta2 * (g * g);
  const acc_t vmax_new = h.amsgrad && vmax > v_new ? vmax : v_new;
  const acc_t denom = sqrt_rn(h.amsgrad ? vmax_new : v_new) / h.bc2_sqrt + h.eps;
  acc_t delta = h.step_size * (m_new / denom);
  delta = h.has_weight_decay ? delta + h.lr_wd * p : delta;
  const acc_t p_new = p - weight * delta;
  p = keep ? p_new : p;
  m = keep ? m_new : m;
  v = keep ? v_new : v;
  vmax = keep && h.amsgrad ? vmax_new : vmax;
}

}  // namespace masked_optim
