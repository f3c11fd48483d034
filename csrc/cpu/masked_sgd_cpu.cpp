// Fused masked SGD step for CPU tensors: the op masked_optim::masked_sgd_ (schema in ops.cpp).
//
// Two passes over one tensor (SPEC §2):
//   1. a reduction over the gradient: sum and max of the unit scores s_j = g_j^2 (per element or
//      per slice), and the water-filling constant when some unit saturates (rare: extra passes);
//   2. one fused pass that draws the Philox uniforms of a chunk, forms q = min(1, alpha s + beta),
//      masks and rescales the gradient and applies weight decay, momentum and the update.
// Arithmetic is in float32 (float64 for float64 tensors); half types are converted on load/store.
//
// Performance notes (2-core AMD EPYC, AVX-512, 10M fp32 elements): Philox4x32-10 is ~40 integer
// multiplies per 4 units; the uniforms of a chunk are drawn in a separate loop over counters so the
// compiler vectorises it (vpmuludq on 8 lanes). Runtime ISA dispatch (target_clones) keeps that
// vectorisation in a portable build; without it the loop stays scalar and is several times slower.
// The update loop is a plain elementwise loop over the chunk. Chunks of 4096 elements keep the
// uniforms in L1 while the gradient, parameter and buffer stream through once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MASKED_OPTIM_NO_CLONES)
#define MASKED_OPTIM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MASKED_OPTIM_CLONES
#endif

namespace masked_optim {
namespace {

constexpr int64_t kChunk = 4096;  // elements (or units) per chunk; a multiple of 4

enum Mode : int64_t { kDense = 0, kUniform = 1, kUniformUnbiased = 2, kAmss = 3, kAmssPlus = 4 };

// Uniforms of units [4 * first_block, 4 * (first_block + nblocks)) into out[0 .. 4 * nblocks).
MASKED_OPTIM_CLONES void fill_uniforms(uint64_t key, int64_t first_block, int64_t nblocks, float* __restrict out) {
  const uint32_t k0 = static_cast<uint32_t>(key);
  const uint32_t k1 = static_cast<uint32_t>(key >> 32);
  for (int64_t b = 0; b < nblocks; ++b) {
    const uint64_t ctr = static_cast<uint64_t>(first_block + b);
    const Philox4x32 r = philox4x32_10(static_cast<uint32_t>(ctr), static_cast<uint32_t>(ctr >> 32), 0u, 0u, k0, k1);
    out[4 * b + 0] = uint32_to_uniform(r.v[0]);
    out[4 * b + 1] = uint32_to_uniform(r.v[1]);
    out[4 * b + 2] = uint32_to_uniform(r.v[2]);
    out[4 * b + 3] = uint32_to_uniform(r.v[3]);
  }
}

template <typename acc_t>
struct Hyper {
  acc_t alpha, beta, lr, momentum, one_minus_dampening, weight_decay;
  bool sampled, unbiased, has_momentum, first_step, nesterov, maximize;
};

template <typename scalar_t, typename acc_t>
inline acc_t load(const scalar_t* p, int64_t i) {
  return static_cast<acc_t>(p[i]);
}

// The SGD update of one element from its masked gradient gm (torch.optim.SGD's order).
template <typename scalar_t, typename acc_t>
inline void sgd_update(const Hyper<acc_t>& h, acc_t gm, scalar_t* __restrict p, scalar_t* __restrict b, int64_t i) {
  const acc_t pv = static_cast<acc_t>(p[i]);
  acc_t d = gm;
  if (h.weight_decay != acc_t(0)) d = d + h.weight_decay * pv;
  if (h.has_momentum) {
    const acc_t bv = h.first_step ? d : h.momentum * static_cast<acc_t>(b[i]) + h.one_minus_dampening * d;
    b[i] = static_cast<scalar_t>(bv);
    d = h.nesterov ? d + h.momentum * bv : bv;
  }
  p[i] = static_cast<scalar_t>(pv - h.lr * d);
}

// Element granularity: elements [begin, end) of a chunk whose uniforms are u[0 .. end - begin).
template <typename scalar_t, typename acc_t>
MASKED_OPTIM_CLONES int64_t update_elements(const Hyper<acc_t> h, const scalar_t* __restrict g, scalar_t* __restrict p,
                                            scalar_t* __restrict b, int64_t begin, int64_t end,
                                            const float* __restrict u) {
  int64_t kept = 0;
  for (int64_t i = begin; i < end; ++i) {
    acc_t gv = static_cast<acc_t>(g[i]);
    if (h.maximize) gv = -gv;
    acc_t gm = gv;
    if (h.sampled) {
      const acc_t s = gv * gv;
      const acc_t q = std::min(acc_t(1), h.alpha * s + h.beta);
      const bool keep = static_cast<acc_t>(u[i - begin]) < q;
      kept += keep;
      gm = keep ? (h.unbiased ? gv * (acc_t(1) / q) : gv) : acc_t(0);
    }
    sgd_update<scalar_t, acc_t>(h, gm, p, b, i);
  }
  return kept;
}

// Channel granularity: units [ubegin, uend), each `inner` contiguous elements.
template <typename scalar_t, typename acc_t>
int64_t update_channels(const Hyper<acc_t>& h, const scalar_t* __restrict g, scalar_t* __restrict p,
                        scalar_t* __restrict b, const acc_t* __restrict scores, int64_t inner, int64_t ubegin,
                        int64_t uend, const float* __restrict u) {
  int64_t kept = 0;
  for (int64_t j = ubegin; j < uend; ++j) {
    bool keep = true;
    acc_t w = acc_t(1);
    if (h.sampled) {
      const acc_t q = std::min(acc_t(1), h.alpha * scores[j] + h.beta);
      keep = static_cast<acc_t>(u[j - ubegin]) < q;
      if (h.unbiased) w = acc_t(1) / q;
    }
    kept += keep;
    for (int64_t i = j * inner; i < (j + 1) * inner; ++i) {
      acc_t gv = static_cast<acc_t>(g[i]);
      if (h.maximize) gv = -gv;
      const acc_t gm = keep ? (h.unbiased && h.sampled ? gv * w : gv) : acc_t(0);
      sgd_update<scalar_t, acc_t>(h, gm, p, b, i);
    }
  }
  return kept;
}

// Per-thread partial results, combined after at::parallel_for.
struct Partials {
  explicit Partials(int n) : sum(n, 0.0), max(n, 0.0), count(n, 0) {}
  std::vector<double> sum, max;
  std::vector<int64_t> count;
};

template <typename scalar_t, typename acc_t>
MASKED_OPTIM_CLONES void square_sum_max(const scalar_t* __restrict g, int64_t begin, int64_t end, double* sum,
                                        double* mx) {
  acc_t s = 0, m = 0;
  for (int64_t i = begin; i < end; ++i) {
    const acc_t v = static_cast<acc_t>(g[i]);
    const acc_t sq = v * v;
    s += sq;
    m = std::max(m, sq);
  }
  *sum += static_cast<double>(s);
  *mx = std::max(*mx, static_cast<double>(m));
}

template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> masked_sgd_impl(at::Tensor& param, const at::Tensor& grad, at::Tensor& buf,
                                                   const c10::optional<at::Tensor>& scores_in,
                                                   const c10::optional<at::Tensor>& scalars_in, int64_t key,
                                                   double rate, double smoothing, int64_t max_iter, int64_t mode,
                                                   bool channel, double lr, double momentum, double dampening,
                                                   double weight_decay, bool nesterov, bool maximize, bool first_step) {
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t numel = param.numel();
  const int64_t n_units = channel ? (param.dim() > 0 ? param.size(0) : 1) : numel;
  const int64_t inner = n_units > 0 ? numel / n_units : 0;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* p = param.mutable_data_ptr<scalar_t>();
  scalar_t* b = momentum != 0 ? buf.mutable_data_ptr<scalar_t>() : nullptr;
  const int nthreads = at::get_num_threads();

  // ---- stage 1: per-tensor scalars alpha, beta (q_j = min(1, alpha s_j + beta))
  acc_t alpha = 0, beta = 1;
  at::Tensor scores_buf;
  const acc_t* scores = nullptr;
  const bool sampled = mode != kDense && rate < 1.0 && n_units > 0;
  if (sampled && channel) {
    if (scores_in.has_value()) {
      scores_buf = scores_in->to(acc_type).contiguous();
    } else {
      scores_buf = at::empty({n_units}, param.options().dtype(acc_type));
      acc_t* out = scores_buf.mutable_data_ptr<acc_t>();
      at::parallel_for(0, n_units, std::max<int64_t>(1, kChunk / std::max<int64_t>(inner, 1)), [&](int64_t u0, int64_t u1) {
        for (int64_t j = u0; j < u1; ++j) {
          acc_t s = 0;
          for (int64_t i = j * inner; i < (j + 1) * inner; ++i) {
            const acc_t v = static_cast<acc_t>(g[i]);
            s += v * v;
          }
          out[j] = s;
        }
      });
    }
    scores = scores_buf.const_data_ptr<acc_t>();
  }
  if (sampled && scalars_in.has_value()) {
    const at::Tensor sc = scalars_in->to(at::kCPU, acc_type).contiguous();
    alpha = sc.const_data_ptr<acc_t>()[0];
    beta = sc.const_data_ptr<acc_t>()[1];
  } else if (sampled && (mode == kUniform || mode == kUniformUnbiased)) {
    alpha = 0;
    beta = static_cast<acc_t>(rate);
  } else if (sampled) {
    Partials part(nthreads);
    if (channel) {
      at::parallel_for(0, n_units, kChunk, [&](int64_t u0, int64_t u1) {
        const int t = at::get_thread_num();
        double s = 0, m = 0;
        for (int64_t j = u0; j < u1; ++j) {
          s += static_cast<double>(scores[j]);
          m = std::max(m, static_cast<double>(scores[j]));
        }
        part.sum[t] += s;
        part.max[t] = std::max(part.max[t], m);
      });
    } else {
      at::parallel_for(0, numel, kChunk, [&](int64_t i0, int64_t i1) {
        const int t = at::get_thread_num();
        for (int64_t c = i0; c < i1; c += kChunk) {
          square_sum_max<scalar_t, acc_t>(g, c, std::min(i1, c + kChunk), &part.sum[t], &part.max[t]);
        }
      });
    }
    double total_d = 0, max_d = 0;
    for (int t = 0; t < nthreads; ++t) {
      total_d += part.sum[t];
      max_d = std::max(max_d, part.max[t]);
    }
    const acc_t total = static_cast<acc_t>(total_d);
    const acc_t gamma = static_cast<acc_t>(smoothing);
    const acc_t budget = static_cast<acc_t>(rate * static_cast<double>(n_units));
    const acc_t uniform_share = static_cast<acc_t>(smoothing / static_cast<double>(n_units));
    acc_t c = budget;
    if (!(total > 0)) {
      alpha = 0;
      beta = c / static_cast<acc_t>(n_units);
    } else {
      const acc_t one_minus_gamma = static_cast<acc_t>(1.0 - smoothing);
      const acc_t max_pt = (static_cast<acc_t>(max_d) / total) * one_minus_gamma + uniform_share;
      if (!(max_pt * budget <= acc_t(1))) {
        // Water-filling (SPEC §2.3): a fixed number of rounds, as the reference.
        for (int64_t it = 0; it < max_iter; ++it) {
          Partials round(nthreads);
          const acc_t c_now = c;
          auto visit = [&](int t, acc_t s) {
            const acc_t pt = (s / total) * one_minus_gamma + uniform_share;
            if (pt * c_now >= acc_t(1)) {
              round.count[t] += 1;
            } else {
              round.sum[t] += static_cast<double>(pt);
            }
          };
          if (channel) {
            at::parallel_for(0, n_units, kChunk, [&](int64_t u0, int64_t u1) {
              const int t = at::get_thread_num();
              for (int64_t j = u0; j < u1; ++j) visit(t, scores[j]);
            });
          } else {
            at::parallel_for(0, numel, kChunk, [&](int64_t i0, int64_t i1) {
              const int t = at::get_thread_num();
              for (int64_t i = i0; i < i1; ++i) {
                const acc_t v = static_cast<acc_t>(g[i]);
                visit(t, v * v);
              }
            });
          }
          int64_t saturated = 0;
          double rest = 0;
          for (int t = 0; t < nthreads; ++t) {
            saturated += round.count[t];
            rest += round.sum[t];
          }
          const acc_t rest_a = static_cast<acc_t>(rest);
          c = rest_a > 0 ? (budget - static_cast<acc_t>(saturated)) / rest_a : std::numeric_limits<acc_t>::infinity();
        }
      }
      alpha = c * one_minus_gamma / total;
      beta = c * gamma / static_cast<acc_t>(n_units);
    }
  }

  // ---- stage 2: fused sample, mask, rescale and SGD update
  Hyper<acc_t> h;
  h.alpha = alpha;
  h.beta = beta;
  h.lr = static_cast<acc_t>(lr);
  h.momentum = static_cast<acc_t>(momentum);
  h.one_minus_dampening = static_cast<acc_t>(1.0 - dampening);
  h.weight_decay = static_cast<acc_t>(weight_decay);
  h.sampled = sampled;
  h.unbiased = mode == kUniformUnbiased || mode == kAmssPlus;
  h.has_momentum = momentum != 0;
  h.first_step = first_step;
  h.nesterov = nesterov;
  h.maximize = maximize;
  const uint64_t ukey = static_cast<uint64_t>(key);

  std::vector<int64_t> kept_per_thread(nthreads, 0);
  if (!channel || !sampled) {
    at::parallel_for(0, (numel + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
      alignas(64) float u[kChunk];
      int64_t kept = 0;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t begin = c * kChunk;
        const int64_t end = std::min(numel, begin + kChunk);
        if (sampled) fill_uniforms(ukey, begin / 4, (end - begin + 3) / 4, u);
        kept += update_elements<scalar_t, acc_t>(h, g, p, b, begin, end, u);
      }
      kept_per_thread[at::get_thread_num()] += kept;
    });
  } else {
    const int64_t chunks = (n_units + kChunk - 1) / kChunk;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      alignas(64) float u[kChunk];
      int64_t kept = 0;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t ubegin = c * kChunk;
        const int64_t uend = std::min(n_units, ubegin + kChunk);
        fill_uniforms(ukey, ubegin / 4, (uend - ubegin + 3) / 4, u);
        kept += update_channels<scalar_t, acc_t>(h, g, p, b, scores, inner, ubegin, uend, u);
      }
      kept_per_thread[at::get_thread_num()] += kept;
    });
  }
  int64_t kept = 0;
  for (int64_t k : kept_per_thread) kept += k;
  if (!sampled) kept = n_units;

  at::Tensor kept_t = at::scalar_tensor(kept, param.options().dtype(at::kLong));
  at::Tensor scalars = at::empty({2}, param.options().dtype(acc_type));
  scalars.mutable_data_ptr<acc_t>()[0] = alpha;
  scalars.mutable_data_ptr<acc_t>()[1] = beta;
  return {kept_t, scalars};
}

std::tuple<at::Tensor, at::Tensor> masked_sgd_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& buf,
                                                  const c10::optional<at::Tensor>& scores,
                                                  const c10::optional<at::Tensor>& scalars, int64_t key, double rate,
                                                  double smoothing, int64_t max_iter, int64_t mode, bool channel,
                                                  double lr, double momentum, double dampening, double weight_decay,
                                                  bool nesterov, bool maximize, bool first_step) {
  TORCH_CHECK(param.device().is_cpu(), "masked_sgd_: param must be a CPU tensor, got ", param.device());
  TORCH_CHECK(grad.device() == param.device() && grad.scalar_type() == param.scalar_type() &&
                  grad.sizes() == param.sizes(),
              "masked_sgd_: grad must match param in device, dtype and shape; got ", grad.device(), " ",
              grad.scalar_type(), " ", grad.sizes(), " for param ", param.device(), " ", param.scalar_type(), " ",
              param.sizes());
  TORCH_CHECK(param.is_contiguous() && grad.is_contiguous(), "masked_sgd_: param and grad must be contiguous");
  TORCH_CHECK(mode >= 0 && mode <= 4, "masked_sgd_: mode must be in 0..4 (dense, uniform, uniform unbiased, amss, amss+), got ",
              mode);
  TORCH_CHECK(rate > 0 && rate <= 1, "masked_sgd_: rate must be in (0, 1], got ", rate);
  TORCH_CHECK(key >= 0, "masked_sgd_: key must be >= 0, got ", key);
  if (momentum != 0) {
    TORCH_CHECK(buf.scalar_type() == param.scalar_type() && buf.sizes() == param.sizes() && buf.is_contiguous() &&
                    buf.device() == param.device(),
                "masked_sgd_: momentum_buffer must be a contiguous tensor like param when momentum != 0; got ",
                buf.scalar_type(), " ", buf.sizes());
  }
  const int64_t n_units = channel ? (param.dim() > 0 ? param.size(0) : 1) : param.numel();
  if (scores.has_value()) {
    TORCH_CHECK(scores->dim() == 1 && scores->size(0) == n_units, "masked_sgd_: scores must be 1-D with ", n_units,
                " units, got ", scores->sizes());
  }
  if (scalars.has_value()) {
    TORCH_CHECK(scalars->numel() == 2, "masked_sgd_: scalars must hold [alpha, beta], got ", scalars->numel(), " values");
  }
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "masked_sgd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    out = masked_sgd_impl<scalar_t, acc_t>(param, grad, buf, scores, scalars, key, rate, smoothing, max_iter, mode,
                                           channel, lr, momentum, dampening, weight_decay, nesterov, maximize,
                                           first_step);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(masked_optim, CPU, m) { m.impl("masked_sgd_", &masked_sgd_cpu); }

}  // namespace masked_optim
