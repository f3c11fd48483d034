// CUDA kernels of masked_optim::masked_sgd_, the masked SGD step of one tensor (docs/algorithm.md §2, §4; the
// exact math is the kernel contract shared with the CPU and Triton backends).
//
//   stage 1 (modes amss / amss+ only, when the caller gives no [alpha, beta]):
//     channel_scores_kernel     s_j = sum of g*g over unit j (channel granularity)
//     score_stats_kernel        per-block sum and max of s        -> workspace partials
//     score_stats_finalize      S, max, shortcut test, c = budget -> workspace state
//     waterfill_round_kernel    per-block #saturated, sum of unsaturated pt (a no-op when done)
//     waterfill_update_kernel   c <- (budget - #sat) / rest; marks done once the set stops growing
//     finalize_scalars_kernel   [alpha, beta] from the state
//   stage 2:
//     masked_sgd_element_kernel fused Philox sample (4 units per evaluation) + mask + SGD update
//     channel_sample_kernel     per-unit keep / 1/q factor (channel granularity) + kept count
//     sgd_factor_kernel         SGD update with the per-unit factor (channel), or dense (g~ = g),
//                               or mode scale (g~ = rate * g: no stage 1, no sampling)
//   stage 2 of masked_optim::masked_adamw_ (the lazy AdamW step, docs/algorithm.md §2.8; stage 1 and
//   channel_sample_kernel are the SGD step's, so the masks are the same):
//     masked_adamw_kernel       AdamW update of the kept units: element mask sampled in place
//                               (sample_element, as masked_sgd_element_kernel), or the per-unit factor
//                               (channel), or every unit (nothing sampled)
//
// Everything stays on the device: the water-filling rounds read c from the workspace, so the host
// never waits. The reductions are two-level with a grid that depends on the unit count only (no
// float atomics), so stage-1 scalars are deterministic. The kept count is an integer atomicAdd.
//
// Bit parity with the reference: the per-element math (q, the mask, the unit weight, the SGD update)
// is csrc/masked_sgd_math.h, shared with the CPU kernels: s = g*g and q = alpha*s + beta use
// __fmul_rn/__fadd_rn (no FMA contraction), 1/q uses __frcp_rn/__drcp_rn (IEEE reciprocal, as torch's
// reciprocal), the uniform is Triton's word-to-float map converted exactly to the compute dtype,
// keep = u < q, and q = min(1, .) propagates NaN as torch.clamp_max does. The SGD arithmetic after
// masking is plain; setup.py builds with --fmad=false, so it is not contracted either.
#include "masked_sgd_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../masked_sgd_math.h"
#include "../philox.h"

namespace masked_optim {
namespace cuda {
namespace {

constexpr int kUpdateThreads = 256;
constexpr int kMaxUpdateBlocksPerSm = 8;

// ---------------------------------------------------------------------------------------------
// Types and exact-rounding helpers

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  __device__ __forceinline__ static float cvt(float x) { return x; }
};
template <>
struct FromAcc<double> {
  __device__ __forceinline__ static double cvt(double x) { return x; }
};
template <>
struct FromAcc<__half> {
  __device__ __forceinline__ static __half cvt(float x) { return __float2half_rn(x); }
};
template <>
struct FromAcc<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 cvt(float x) { return __float2bfloat16_rn(x); }
};

// mul_rn, add_rn and rcp_rn (exactly rounded, never contracted) come from masked_sgd_math.h.
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float div_rn(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

template <typename T>
__device__ __forceinline__ T infinity();
template <>
__device__ __forceinline__ float infinity<float>() {
  return __int_as_float(0x7f800000);
}
template <>
__device__ __forceinline__ double infinity<double>() {
  return __longlong_as_double(0x7ff0000000000000LL);
}

// Four consecutive values, for one vector load/store when aligned.
template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

// ---------------------------------------------------------------------------------------------
// Reductions (deterministic: fixed shuffle trees, fixed partial order)

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return b > a ? b : a;
  }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  return v;
}

// Block-wide reduction; the result is valid in thread 0. blockDim.x must be a multiple of 32 and at
// most 1024. `shared` holds 32 values. Ends with a barrier, so `shared` can be reused at once.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  const int nwarps = blockDim.x >> 5;
  v = threadIdx.x < nwarps ? shared[threadIdx.x] : identity;
  if (warp == 0) v = warp_reduce(v, op);
  __syncthreads();
  return v;
}

// Sources of unit scores for the stage-1 reductions.
template <typename scalar_t>
struct GradSquareSource {  // element granularity: s_i = g_i * g_i (maximize's sign cancels)
  using acc_t = typename AccOf<scalar_t>::type;
  const scalar_t* __restrict__ g;
  __device__ __forceinline__ acc_t operator()(int64_t i) const {
    const acc_t v = to_acc(g[i]);
    return mul_rn(v, v);
  }
};
template <typename acc_type>
struct ScoreArraySource {  // given or precomputed per-unit scores
  using acc_t = acc_type;
  const acc_t* __restrict__ s;
  __device__ __forceinline__ acc_t operator()(int64_t j) const { return s[j]; }
};

// ---------------------------------------------------------------------------------------------
// Workspace of stage 1: [part_a: kMaxReduceBlocks acc][part_b: kMaxReduceBlocks acc]
// [state: kStateSlots acc][counts: kMaxReduceBlocks + 1 unsigned long long]

enum StateSlot : int { kStateSum = 0, kStateMax = 1, kStateHasSignal = 2, kStateC = 3, kStateDone = 4, kStateSlots = 8 };

template <typename acc_t>
struct Workspace {
  acc_t* part_a;
  acc_t* part_b;
  acc_t* state;
  unsigned long long* counts;  // per-block saturated counts; counts[kMaxReduceBlocks] = previous round's
  __host__ __device__ static Workspace at(void* base) {
    Workspace w;
    acc_t* a = static_cast<acc_t*>(base);
    w.part_a = a;
    w.part_b = a + kMaxReduceBlocks;
    w.state = a + 2 * kMaxReduceBlocks;
    w.counts = reinterpret_cast<unsigned long long*>(a + 2 * kMaxReduceBlocks + kStateSlots);
    return w;
  }
  static size_t bytes() {
    return (2 * kMaxReduceBlocks + kStateSlots) * sizeof(acc_t) + (kMaxReduceBlocks + 1) * sizeof(unsigned long long);
  }
};

// ---------------------------------------------------------------------------------------------
// Stage 1 kernels

// Channel scores, three shapes of work: a thread, a warp or a block per unit. Each unit's sum is
// computed by a fixed group in a fixed order, whatever the grid.
template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    channel_scores_thread_kernel(const scalar_t* __restrict__ grad, int64_t n_units, int64_t inner,
                                 typename AccOf<scalar_t>::type* __restrict__ scores) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n_units; j += stride) {
    const scalar_t* row = grad + j * inner;
    acc_t s = 0;
    for (int64_t k = 0; k < inner; ++k) {
      const acc_t v = to_acc(row[k]);
      s = s + mul_rn(v, v);
    }
    scores[j] = s;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    channel_scores_warp_kernel(const scalar_t* __restrict__ grad, int64_t n_units, int64_t inner,
                               typename AccOf<scalar_t>::type* __restrict__ scores) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int lane = threadIdx.x & 31;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t j = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; j < n_units; j += warps) {
    const scalar_t* row = grad + j * inner;
    acc_t s = 0;
    for (int64_t k = lane; k < inner; k += 32) {
      const acc_t v = to_acc(row[k]);
      s = s + mul_rn(v, v);
    }
    s = warp_reduce(s, SumOp());
    if (lane == 0) scores[j] = s;
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kReduceThreads)
    channel_scores_block_kernel(const scalar_t* __restrict__ grad, int64_t n_units, int64_t inner,
                                typename AccOf<scalar_t>::type* __restrict__ scores) {
  using acc_t = typename AccOf<scalar_t>::type;
  __shared__ acc_t shared[32];
  for (int64_t j = blockIdx.x; j < n_units; j += gridDim.x) {
    const scalar_t* row = grad + j * inner;
    acc_t s = 0;
    for (int64_t k = threadIdx.x; k < inner; k += blockDim.x) {
      const acc_t v = to_acc(row[k]);
      s = s + mul_rn(v, v);
    }
    s = block_reduce(s, SumOp(), acc_t(0), shared);
    if (threadIdx.x == 0) scores[j] = s;
  }
}

template <typename acc_t, typename Src>
__global__ void __launch_bounds__(kReduceThreads)
    score_stats_kernel(Src src, int64_t n, acc_t* __restrict__ part_sum, acc_t* __restrict__ part_max) {
  __shared__ acc_t shared[32];
  acc_t sum = 0;
  acc_t mx = -infinity<acc_t>();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const acc_t s = src(j);
    sum = sum + s;
    mx = s > mx ? s : mx;
  }
  sum = block_reduce(sum, SumOp(), acc_t(0), shared);
  mx = block_reduce(mx, MaxOp(), -infinity<acc_t>(), shared);
  if (threadIdx.x == 0) {
    part_sum[blockIdx.x] = sum;
    part_max[blockIdx.x] = mx;
  }
}

// One block of kReduceThreads: S, max, shortcut test (docs/algorithm.md §2.3) and the initial state.
template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    score_stats_finalize_kernel(Workspace<acc_t> ws, int nparts, int64_t n, double rate, double smoothing) {
  __shared__ acc_t shared[32];
  acc_t sum = 0;
  acc_t mx = -infinity<acc_t>();
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) {
    sum = sum + ws.part_a[i];
    mx = ws.part_b[i] > mx ? ws.part_b[i] : mx;
  }
  sum = block_reduce(sum, SumOp(), acc_t(0), shared);
  mx = block_reduce(mx, MaxOp(), -infinity<acc_t>(), shared);
  if (threadIdx.x != 0) return;
  const bool has_signal = sum > acc_t(0);
  const acc_t budget = static_cast<acc_t>(rate * static_cast<double>(n));
  const acc_t one_minus_gamma = static_cast<acc_t>(1.0 - smoothing);
  const acc_t uniform_share = static_cast<acc_t>(smoothing / static_cast<double>(n));
  // max_j pt_j: pt is a monotone function of s (every rounding step is monotone).
  const acc_t pi_max = has_signal ? div_rn(mx, sum) : static_cast<acc_t>(1.0 / static_cast<double>(n));
  const acc_t pt_max = add_rn(mul_rn(pi_max, one_minus_gamma), uniform_share);
  const bool nothing_saturates = mul_rn(pt_max, budget) <= acc_t(1);
  ws.state[kStateSum] = sum;
  ws.state[kStateMax] = mx;
  ws.state[kStateHasSignal] = has_signal ? acc_t(1) : acc_t(0);
  ws.state[kStateC] = budget;
  ws.state[kStateDone] = nothing_saturates ? acc_t(1) : acc_t(0);
  ws.counts[kMaxReduceBlocks] = ~0ull;  // no previous round
}

template <typename acc_t, typename Src>
__global__ void __launch_bounds__(kReduceThreads)
    waterfill_round_kernel(Src src, int64_t n, double smoothing, Workspace<acc_t> ws) {
  if (ws.state[kStateDone] != acc_t(0)) return;  // uniform across the grid
  __shared__ acc_t shared[32];
  __shared__ unsigned long long shared_count[32];
  const acc_t total = ws.state[kStateSum];
  const bool has_signal = ws.state[kStateHasSignal] != acc_t(0);
  const acc_t c = ws.state[kStateC];
  const acc_t one_minus_gamma = static_cast<acc_t>(1.0 - smoothing);
  const acc_t uniform_share = static_cast<acc_t>(smoothing / static_cast<double>(n));
  const acc_t inv_n = static_cast<acc_t>(1.0 / static_cast<double>(n));
  acc_t rest = 0;
  unsigned long long count = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < n; j += stride) {
    const acc_t pi = has_signal ? div_rn(src(j), total) : inv_n;
    const acc_t pt = add_rn(mul_rn(pi, one_minus_gamma), uniform_share);
    if (mul_rn(pt, c) >= acc_t(1)) {
      ++count;
    } else {
      rest = rest + pt;
    }
  }
  rest = block_reduce(rest, SumOp(), acc_t(0), shared);
  count = block_reduce(count, SumOp(), 0ull, shared_count);
  if (threadIdx.x == 0) {
    ws.part_a[blockIdx.x] = rest;
    ws.counts[blockIdx.x] = count;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kReduceThreads)
    waterfill_update_kernel(Workspace<acc_t> ws, int nparts, int64_t n, double rate) {
  if (ws.state[kStateDone] != acc_t(0)) return;
  __shared__ acc_t shared[32];
  __shared__ unsigned long long shared_count[32];
  acc_t rest = 0;
  unsigned long long count = 0;
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) {
    rest = rest + ws.part_a[i];
    count += ws.counts[i];
  }
  rest = block_reduce(rest, SumOp(), acc_t(0), shared);
  count = block_reduce(count, SumOp(), 0ull, shared_count);
  if (threadIdx.x != 0) return;
  // The saturated set only grows; the same count is the same set, whose rest (summed in the same
  // fixed order) gives the same c again: every further round would change nothing.
  if (count == ws.counts[kMaxReduceBlocks]) {
    ws.state[kStateDone] = acc_t(1);
    return;
  }
  ws.counts[kMaxReduceBlocks] = count;
  const acc_t budget = static_cast<acc_t>(rate * static_cast<double>(n));
  const acc_t free_budget = sub_rn(budget, static_cast<acc_t>(count));
  ws.state[kStateC] = rest > acc_t(0) ? div_rn(free_budget, rest) : infinity<acc_t>();
}

template <typename acc_t>
__global__ void finalize_scalars_kernel(Workspace<acc_t> ws, int64_t n, double smoothing, acc_t* __restrict__ out) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  const acc_t total = ws.state[kStateSum];
  const bool has_signal = ws.state[kStateHasSignal] != acc_t(0);
  const acc_t c = ws.state[kStateC];
  const acc_t n_acc = static_cast<acc_t>(n);
  if (has_signal) {
    out[0] = div_rn(mul_rn(c, static_cast<acc_t>(1.0 - smoothing)), total);
    out[1] = div_rn(mul_rn(c, static_cast<acc_t>(smoothing)), n_acc);
  } else {
    out[0] = acc_t(0);
    out[1] = div_rn(c, n_acc);
  }
}

template <typename acc_t>
__global__ void fill_scalars_kernel(acc_t alpha, acc_t beta, acc_t* __restrict__ out) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    out[0] = alpha;
    out[1] = beta;
  }
}

// ---------------------------------------------------------------------------------------------
// Stage 2 kernels

// The hyper-parameters (Hyper), the inclusion probability, the unit weight and the SGD update of one
// element are those of masked_sgd_math.h, shared with the CPU kernels.

// h with [alpha, beta] read from device memory when q depends on the scores (modes amss / amss+).
template <typename acc_t>
__device__ __forceinline__ Hyper<acc_t> with_scalars(Hyper<acc_t> h, const acc_t* __restrict__ scalars) {
  if (!h.fixed_q) {
    h.alpha = scalars[0];
    h.beta = scalars[1];
  }
  return h;
}

// Loads the up-to-4 elements [base, base + 4) of one array into x (0 past the end, or everywhere when
// !read): one vector load when kVec and the quad is whole.
template <typename scalar_t, bool kVec>
__device__ __forceinline__ void load_quad(const scalar_t* __restrict__ src, bool read, int64_t base, int64_t numel,
                                          typename AccOf<scalar_t>::type (&x)[4]) {
  using acc_t = typename AccOf<scalar_t>::type;
  if (kVec && base + 4 <= numel) {
    if (read) {
      const Pack4<scalar_t> v = *reinterpret_cast<const Pack4<scalar_t>*>(src + base);
#pragma unroll
      for (int w = 0; w < 4; ++w) x[w] = to_acc(v.v[w]);
    } else {
#pragma unroll
      for (int w = 0; w < 4; ++w) x[w] = acc_t(0);
    }
  } else {
#pragma unroll
    for (int w = 0; w < 4; ++w) x[w] = (read && base + w < numel) ? to_acc(src[base + w]) : acc_t(0);
  }
}

// Stores the up-to-4 elements [base, base + 4) of x to one array, rounded to its dtype.
template <typename scalar_t, bool kVec>
__device__ __forceinline__ void store_quad(scalar_t* __restrict__ dst, int64_t base, int64_t numel,
                                           const typename AccOf<scalar_t>::type (&x)[4]) {
  if (kVec && base + 4 <= numel) {
    Pack4<scalar_t> v;
#pragma unroll
    for (int w = 0; w < 4; ++w) v.v[w] = FromAcc<scalar_t>::cvt(x[w]);
    *reinterpret_cast<Pack4<scalar_t>*>(dst + base) = v;
  } else {
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if (base + w < numel) dst[base + w] = FromAcc<scalar_t>::cvt(x[w]);
    }
  }
}

// Loads the up-to-4 elements [base, base + 4) of grad, param and (when read) buffer.
template <typename scalar_t, bool kVec>
__device__ __forceinline__ void load4(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ param,
                                      const scalar_t* __restrict__ buf, bool read_buf, int64_t base, int64_t numel,
                                      typename AccOf<scalar_t>::type (&g)[4], typename AccOf<scalar_t>::type (&p)[4],
                                      typename AccOf<scalar_t>::type (&b)[4]) {
  load_quad<scalar_t, kVec>(grad, true, base, numel, g);
  load_quad<scalar_t, kVec>(param, true, base, numel, p);
  load_quad<scalar_t, kVec>(buf, read_buf, base, numel, b);
}

template <typename scalar_t, bool kVec>
__device__ __forceinline__ void store4(scalar_t* __restrict__ param, scalar_t* __restrict__ buf, bool write_buf,
                                       int64_t base, int64_t numel, const typename AccOf<scalar_t>::type (&p)[4],
                                       const typename AccOf<scalar_t>::type (&b)[4]) {
  store_quad<scalar_t, kVec>(param, base, numel, p);
  if (write_buf) store_quad<scalar_t, kVec>(buf, base, numel, b);
}

// Adds this thread's count to the device counter: warp shuffle reduction, one atomic per warp.
__device__ __forceinline__ void add_kept(unsigned long long count, unsigned long long* kept) {
  count = warp_reduce(count, SumOp());
  if ((threadIdx.x & 31) == 0 && count != 0) atomicAdd(kept, count);
}

// The mask of element granularity, shared by the SGD and AdamW element kernels: unit i = element i
// of (signed) gradient gv, Philox word `word` of block i / 4. Returns M_i = u_i < q_i and sets
// `weight` to the weight of a kept unit (1/q when unbiased, else grad_scale: 1 for modes 1..4).
template <typename acc_t>
__device__ __forceinline__ bool sample_element(const Hyper<acc_t>& hk, acc_t gv, uint32_t word, acc_t& weight) {
  const acc_t q = unit_probability(hk, mul_rn(gv, gv));  // s = g*g, rounded
  weight = unit_weight(hk, q);
  return keep_unit(uint32_to_uniform(word), q);
}

// Element granularity, sampled (modes 1..4): unit i = element i; one Philox evaluation per quad of
// elements (counter i / 4, word i % 4). Grid-stride over quads.
template <typename scalar_t, bool kVec>
__global__ void __launch_bounds__(kUpdateThreads)
    masked_sgd_element_kernel(scalar_t* __restrict__ param, const scalar_t* __restrict__ grad,
                              scalar_t* __restrict__ buf, const typename AccOf<scalar_t>::type* __restrict__ scalars,
                              unsigned long long* __restrict__ kept, int64_t numel,
                              const Hyper<typename AccOf<scalar_t>::type> h) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Hyper<acc_t> hk = with_scalars(h, scalars);
  const bool read_buf = h.has_momentum && !h.first_step;
  const int64_t nquads = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned long long count = 0;
  for (int64_t quad = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; quad < nquads; quad += stride) {
    const int64_t base = 4 * quad;
    const Philox4x32 r = philox_block(h.key, static_cast<uint64_t>(quad));
    acc_t g[4], p[4], b[4];
    load4<scalar_t, kVec>(grad, param, buf, read_buf, base, numel, g, p, b);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if (base + w < numel) {
        const acc_t gv = signed_grad(hk, g[w]);
        acc_t weight;
        const bool keep = sample_element(hk, gv, r.v[w], weight);
        count += keep ? 1ull : 0ull;
        sgd_update(hk, masked_value(gv, keep, weight), p[w], b[w]);
      }
    }
    store4<scalar_t, kVec>(param, buf, h.has_momentum, base, numel, p, b);
  }
  add_kept(count, kept);
}

// Channel granularity, sampled: per unit j, factor[j] = keep ? unit_weight (1/q or 1) : 0 (a kept
// factor is >= 1, never 0) and the kept count. One Philox evaluation per quad of units.
template <typename acc_t>
__global__ void __launch_bounds__(kUpdateThreads)
    channel_sample_kernel(const acc_t* __restrict__ scores, const acc_t* __restrict__ scalars,
                          acc_t* __restrict__ factor, unsigned long long* __restrict__ kept, int64_t n_units,
                          const Hyper<acc_t> h) {
  const Hyper<acc_t> hk = with_scalars(h, scalars);
  const int64_t nquads = (n_units + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned long long count = 0;
  for (int64_t quad = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; quad < nquads; quad += stride) {
    const int64_t base = 4 * quad;
    const Philox4x32 r = philox_block(h.key, static_cast<uint64_t>(quad));
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const int64_t j = base + w;
      if (j < n_units) {
        const acc_t q = unit_probability(hk, hk.fixed_q ? acc_t(0) : scores[j]);  // uniform: no scores
        const bool keep = keep_unit(uint32_to_uniform(r.v[w]), q);
        count += keep ? 1ull : 0ull;
        factor[j] = keep ? unit_weight(hk, q) : acc_t(0);
      }
    }
  }
  add_kept(count, kept);
}

// SGD update with a per-unit factor (kFactor: channel granularity, g~ = factor > 0 ? g * factor : 0)
// or unsampled (g~ = g * grad_scale: g exactly, or rate * g rounded on its own as torch.mul in mode
// scale). Grid-stride over
// quads of elements.
template <typename scalar_t, bool kVec, bool kFactor>
__global__ void __launch_bounds__(kUpdateThreads)
    sgd_factor_kernel(scalar_t* __restrict__ param, const scalar_t* __restrict__ grad, scalar_t* __restrict__ buf,
                      const typename AccOf<scalar_t>::type* __restrict__ factor, int64_t numel, int64_t inner,
                      const Hyper<typename AccOf<scalar_t>::type> h) {
  using acc_t = typename AccOf<scalar_t>::type;
  const bool read_buf = h.has_momentum && !h.first_step;
  const int64_t nquads = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t quad = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; quad < nquads; quad += stride) {
    const int64_t base = 4 * quad;
    acc_t g[4], p[4], b[4];
    load4<scalar_t, kVec>(grad, param, buf, read_buf, base, numel, g, p, b);
    int64_t j = 0, r = 0;
    if (kFactor) {
      j = base / inner;
      r = base - j * inner;
    }
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if (base + w < numel) {
        const acc_t gv = signed_grad(h, g[w]);
        acc_t gm = masked_value(gv, true, h.grad_scale);
        if (kFactor) {
          const acc_t f = factor[j];
          gm = masked_value(gv, f > acc_t(0), f);
          if (++r == inner) {
            r = 0;
            ++j;
          }
        }
        sgd_update(h, gm, p[w], b[w]);
      }
    }
    store4<scalar_t, kVec>(param, buf, h.has_momentum, base, numel, p, b);
  }
}

// The lazy AdamW step (docs/algorithm.md §2.8), grid-stride over quads of elements. kMask says where
// each unit's keep and weight come from: kAdamDense every unit is kept with weight 1 (nothing sampled),
// kAdamElement the element mask (sample_element, counting kept units), kAdamFactor the per-unit factor
// of channel_sample_kernel (kept iff factor > 0, weight = factor). The element update is adamw_update
// of masked_sgd_math.h; units that are not kept are written back unchanged.
enum AdamMask : int { kAdamDense = 0, kAdamElement = 1, kAdamFactor = 2 };

template <typename scalar_t, bool kVec, int kMask>
__global__ void __launch_bounds__(kUpdateThreads)
    masked_adamw_kernel(scalar_t* __restrict__ param, const scalar_t* __restrict__ grad, scalar_t* __restrict__ exp_avg,
                        scalar_t* __restrict__ exp_avg_sq, scalar_t* __restrict__ max_exp_avg_sq,
                        const typename AccOf<scalar_t>::type* __restrict__ scalars,
                        const typename AccOf<scalar_t>::type* __restrict__ factor,
                        unsigned long long* __restrict__ kept, int64_t numel, int64_t inner,
                        const Hyper<typename AccOf<scalar_t>::type> h,
                        const AdamHyper<typename AccOf<scalar_t>::type> ah) {
  using acc_t = typename AccOf<scalar_t>::type;
  const Hyper<acc_t> hk = kMask == kAdamElement ? with_scalars(h, scalars) : h;
  const int64_t nquads = (numel + 3) / 4;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  unsigned long long count = 0;
  for (int64_t quad = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; quad < nquads; quad += stride) {
    const int64_t base = 4 * quad;
    acc_t g[4], p[4], m[4], v[4], vmax[4];
    load_quad<scalar_t, kVec>(grad, true, base, numel, g);
    load_quad<scalar_t, kVec>(param, true, base, numel, p);
    load_quad<scalar_t, kVec>(exp_avg, true, base, numel, m);
    load_quad<scalar_t, kVec>(exp_avg_sq, true, base, numel, v);
    load_quad<scalar_t, kVec>(max_exp_avg_sq, ah.amsgrad, base, numel, vmax);
    Philox4x32 r{{0u, 0u, 0u, 0u}};
    if (kMask == kAdamElement) r = philox_block(h.key, static_cast<uint64_t>(quad));
    int64_t j = 0, k = 0;
    if (kMask == kAdamFactor) {
      j = base / inner;
      k = base - j * inner;
    }
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      if (base + w < numel) {
        const acc_t gv = signed_grad(hk, g[w]);
        bool keep = true;
        acc_t weight = acc_t(1);
        if (kMask == kAdamElement) {
          keep = sample_element(hk, gv, r.v[w], weight);
          count += keep ? 1ull : 0ull;
        } else if (kMask == kAdamFactor) {
          weight = factor[j];
          keep = weight > acc_t(0);
          if (++k == inner) {
            k = 0;
            ++j;
          }
        }
        adamw_update(ah, gv, keep, weight, p[w], m[w], v[w], vmax[w]);
      }
    }
    store_quad<scalar_t, kVec>(param, base, numel, p);
    store_quad<scalar_t, kVec>(exp_avg, base, numel, m);
    store_quad<scalar_t, kVec>(exp_avg_sq, base, numel, v);
    if (ah.amsgrad) store_quad<scalar_t, kVec>(max_exp_avg_sq, base, numel, vmax);
  }
  if (kMask == kAdamElement) add_kept(count, kept);
}

// ---------------------------------------------------------------------------------------------
// Host side

template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat64:
      return f(double{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

template <typename F>
cudaError_t dispatch_acc(DType dtype, F&& f) {
  return dtype == DType::kFloat64 ? f(double{}) : f(float{});
}

int reduce_blocks(int64_t n) {
  const int64_t blocks = (n + kReduceThreads - 1) / kReduceThreads;
  return static_cast<int>(blocks < kMaxReduceBlocks ? (blocks < 1 ? 1 : blocks) : kMaxReduceBlocks);
}

// Grid of a grid-stride elementwise kernel: enough blocks to fill the device, no more than needed.
cudaError_t update_blocks(int64_t work_items, int* blocks) {
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 1) * kMaxUpdateBlocksPerSm;
  const int64_t need = (work_items + kUpdateThreads - 1) / kUpdateThreads;
  *blocks = static_cast<int>(need < cap ? (need < 1 ? 1 : need) : cap);
  return cudaSuccess;
}

template <typename T>
bool aligned_for_pack(const void* p) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % sizeof(Pack4<T>) == 0;
}

// Calls f(source) with the stage-1 score source: the score array when given, else g*g.
template <typename F>
cudaError_t with_score_source(DType dtype, const void* grad, const void* scores, F&& f) {
  if (scores != nullptr) {
    return dispatch_acc(dtype, [&](auto acc_tag) {
      using acc_t = decltype(acc_tag);
      return f(ScoreArraySource<acc_t>{static_cast<const acc_t*>(scores)});
    });
  }
  if (grad == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    return f(GradSquareSource<scalar_t>{static_cast<const scalar_t*>(grad)});
  });
}

// Channel granularity, sampled: factor[j] (keep ? unit weight : 0) and the kept count of every unit,
// for the SGD and the AdamW updates alike.
template <typename acc_t>
cudaError_t launch_channel_sample(const Hyper<acc_t>& h, const acc_t* scores, const acc_t* scalars, acc_t* factor,
                                  unsigned long long* kept, int64_t n_units, cudaStream_t stream) {
  int blocks = 1;
  const cudaError_t err = update_blocks((n_units + 3) / 4, &blocks);
  if (err != cudaSuccess) return err;
  channel_sample_kernel<acc_t><<<blocks, kUpdateThreads, 0, stream>>>(scores, scalars, factor, kept, n_units, h);
  return cudaGetLastError();
}

}  // namespace

size_t inclusion_workspace_bytes(DType dtype) {
  return dtype == DType::kFloat64 ? Workspace<double>::bytes() : Workspace<float>::bytes();
}

cudaError_t launch_channel_scores(DType dtype, const void* grad, int64_t n_units, int64_t inner, void* scores,
                                  cudaStream_t stream) {
  if (n_units <= 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccOf<scalar_t>::type;
    const scalar_t* g = static_cast<const scalar_t*>(grad);
    acc_t* s = static_cast<acc_t*>(scores);
    if (inner < 32) {  // a thread per unit (inner may be 0: the scores are then 0)
      channel_scores_thread_kernel<scalar_t><<<reduce_blocks(n_units), kReduceThreads, 0, stream>>>(g, n_units, inner, s);
    } else if (inner < 8192) {  // a warp per unit
      const int64_t units_per_block = kReduceThreads / 32;
      int64_t blocks = (n_units + units_per_block - 1) / units_per_block;
      if (blocks > 65535) blocks = 65535;
      channel_scores_warp_kernel<scalar_t>
          <<<static_cast<int>(blocks), kReduceThreads, 0, stream>>>(g, n_units, inner, s);
    } else {  // a block per unit
      const int64_t blocks = n_units < 65535 ? n_units : 65535;
      channel_scores_block_kernel<scalar_t>
          <<<static_cast<int>(blocks), kReduceThreads, 0, stream>>>(g, n_units, inner, s);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_score_stats(DType dtype, const void* grad, const void* scores, int64_t n_units, double rate,
                               double smoothing, void* workspace, cudaStream_t stream) {
  if (n_units <= 0 || workspace == nullptr) return cudaErrorInvalidValue;
  const int blocks = reduce_blocks(n_units);
  return with_score_source(dtype, grad, scores, [&](auto src) {
    using acc_t = typename decltype(src)::acc_t;
    const Workspace<acc_t> ws = Workspace<acc_t>::at(workspace);
    score_stats_kernel<acc_t><<<blocks, kReduceThreads, 0, stream>>>(src, n_units, ws.part_a, ws.part_b);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    score_stats_finalize_kernel<acc_t><<<1, kReduceThreads, 0, stream>>>(ws, blocks, n_units, rate, smoothing);
    return cudaGetLastError();
  });
}

cudaError_t launch_waterfill_round(DType dtype, const void* grad, const void* scores, int64_t n_units, double rate,
                                   double smoothing, void* workspace, cudaStream_t stream) {
  if (n_units <= 0 || workspace == nullptr) return cudaErrorInvalidValue;
  const int blocks = reduce_blocks(n_units);
  return with_score_source(dtype, grad, scores, [&](auto src) {
    using acc_t = typename decltype(src)::acc_t;
    const Workspace<acc_t> ws = Workspace<acc_t>::at(workspace);
    waterfill_round_kernel<acc_t><<<blocks, kReduceThreads, 0, stream>>>(src, n_units, smoothing, ws);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    waterfill_update_kernel<acc_t><<<1, kReduceThreads, 0, stream>>>(ws, blocks, n_units, rate);
    return cudaGetLastError();
  });
}

cudaError_t launch_finalize_scalars(DType dtype, int64_t n_units, double smoothing, const void* workspace,
                                    void* out_scalars, cudaStream_t stream) {
  if (n_units <= 0 || workspace == nullptr || out_scalars == nullptr) return cudaErrorInvalidValue;
  return dispatch_acc(dtype, [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    const Workspace<acc_t> ws = Workspace<acc_t>::at(const_cast<void*>(workspace));
    finalize_scalars_kernel<acc_t><<<1, 32, 0, stream>>>(ws, n_units, smoothing, static_cast<acc_t*>(out_scalars));
    return cudaGetLastError();
  });
}

cudaError_t launch_inclusion_scalars(DType dtype, const void* grad, const void* scores, int64_t n_units, double rate,
                                     double smoothing, int64_t max_iter, void* workspace, void* out_scalars,
                                     cudaStream_t stream) {
  cudaError_t err = launch_score_stats(dtype, grad, scores, n_units, rate, smoothing, workspace, stream);
  for (int64_t it = 0; err == cudaSuccess && it < max_iter; ++it) {
    err = launch_waterfill_round(dtype, grad, scores, n_units, rate, smoothing, workspace, stream);
  }
  if (err != cudaSuccess) return err;
  return launch_finalize_scalars(dtype, n_units, smoothing, workspace, out_scalars, stream);
}

cudaError_t launch_fill_scalars(DType dtype, double alpha, double beta, void* out_scalars, cudaStream_t stream) {
  if (out_scalars == nullptr) return cudaErrorInvalidValue;
  return dispatch_acc(dtype, [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    fill_scalars_kernel<acc_t><<<1, 32, 0, stream>>>(static_cast<acc_t>(alpha), static_cast<acc_t>(beta),
                                                     static_cast<acc_t*>(out_scalars));
    return cudaGetLastError();
  });
}

cudaError_t launch_masked_sgd_update(const MaskedSgdArgs& a, cudaStream_t stream) {
  if (a.numel < 0 || a.n_units < 0) return cudaErrorInvalidValue;
  const bool has_momentum = a.momentum != 0.0;
  if (a.numel > 0 && (a.param == nullptr || a.grad == nullptr || (has_momentum && a.momentum_buffer == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const bool uniform = mode_uniform(a.mode);
  if (a.sampled) {
    if (a.kept == nullptr || (!uniform && a.scalars == nullptr)) return cudaErrorInvalidValue;
    if (a.channel && (a.unit_factor == nullptr || (!uniform && a.scores == nullptr))) return cudaErrorInvalidValue;
    if (a.channel && a.numel > 0 && a.inner <= 0) return cudaErrorInvalidValue;
  }
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccOf<scalar_t>::type;
    const Hyper<acc_t> h = make_hyper<acc_t>(a.mode, a.sampled, a.rate, a.key, a.lr, a.momentum, a.dampening,
                                             a.weight_decay, a.nesterov, a.maximize, a.first_step);

    scalar_t* param = static_cast<scalar_t*>(a.param);
    const scalar_t* grad = static_cast<const scalar_t*>(a.grad);
    scalar_t* buf = has_momentum ? static_cast<scalar_t*>(a.momentum_buffer) : nullptr;
    const acc_t* scalars = static_cast<const acc_t*>(a.scalars);
    const bool vec = aligned_for_pack<scalar_t>(param) && aligned_for_pack<scalar_t>(grad) &&
                     aligned_for_pack<scalar_t>(buf);
    const int64_t nquads = (a.numel + 3) / 4;
    int blocks = 1;
    cudaError_t err = cudaSuccess;

    if (a.sampled && !a.channel) {
      if (a.numel == 0) return cudaSuccess;
      err = update_blocks(nquads, &blocks);
      if (err != cudaSuccess) return err;
      if (vec) {
        masked_sgd_element_kernel<scalar_t, true>
            <<<blocks, kUpdateThreads, 0, stream>>>(param, grad, buf, scalars, a.kept, a.numel, h);
      } else {
        masked_sgd_element_kernel<scalar_t, false>
            <<<blocks, kUpdateThreads, 0, stream>>>(param, grad, buf, scalars, a.kept, a.numel, h);
      }
      return cudaGetLastError();
    }

    acc_t* factor = nullptr;
    if (a.sampled) {  // channel: sample the units first (also when they hold no element)
      if (a.n_units == 0) return cudaSuccess;
      factor = static_cast<acc_t*>(a.unit_factor);
      err = launch_channel_sample(h, static_cast<const acc_t*>(a.scores), scalars, factor, a.kept, a.n_units, stream);
      if (err != cudaSuccess) return err;
    }
    if (a.numel == 0) return cudaSuccess;
    err = update_blocks(nquads, &blocks);
    if (err != cudaSuccess) return err;
    const int64_t inner = a.inner > 0 ? a.inner : 1;
    if (factor != nullptr) {
      if (vec) {
        sgd_factor_kernel<scalar_t, true, true>
            <<<blocks, kUpdateThreads, 0, stream>>>(param, grad, buf, factor, a.numel, inner, h);
      } else {
        sgd_factor_kernel<scalar_t, false, true>
            <<<blocks, kUpdateThreads, 0, stream>>>(param, grad, buf, factor, a.numel, inner, h);
      }
    } else if (vec) {
      sgd_factor_kernel<scalar_t, true, false>
          <<<blocks, kUpdateThreads, 0, stream>>>(param, grad, buf, nullptr, a.numel, inner, h);
    } else {
      sgd_factor_kernel<scalar_t, false, false>
          <<<blocks, kUpdateThreads, 0, stream>>>(param, grad, buf, nullptr, a.numel, inner, h);
    }
    return cudaGetLastError();
  });
}

cudaError_t launch_masked_adamw_update(const MaskedAdamwArgs& a, cudaStream_t stream) {
  if (a.numel < 0 || a.n_units < 0) return cudaErrorInvalidValue;
  if (a.numel > 0 && (a.param == nullptr || a.grad == nullptr || a.exp_avg == nullptr || a.exp_avg_sq == nullptr ||
                      (a.amsgrad && a.max_exp_avg_sq == nullptr))) {
    return cudaErrorInvalidValue;
  }
  const bool uniform = mode_uniform(a.mode);
  if (a.sampled) {
    if (a.kept == nullptr || (!uniform && a.scalars == nullptr)) return cudaErrorInvalidValue;
    if (a.channel && (a.unit_factor == nullptr || (!uniform && a.scores == nullptr))) return cudaErrorInvalidValue;
    if (a.channel && a.numel > 0 && a.inner <= 0) return cudaErrorInvalidValue;
  }
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = typename AccOf<scalar_t>::type;
    // The mask's hyper-parameters (q, M, the unit weight) are the SGD step's; its SGD fields are unused.
    const Hyper<acc_t> h =
        make_hyper<acc_t>(a.mode, a.sampled, a.rate, a.key, 0.0, 0.0, 0.0, 0.0, false, a.maximize, false);
    const AdamHyper<acc_t> ah = make_adam_hyper<acc_t>(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.step,
                                                       a.amsgrad, a.maximize);

    scalar_t* param = static_cast<scalar_t*>(a.param);
    const scalar_t* grad = static_cast<const scalar_t*>(a.grad);
    scalar_t* exp_avg = static_cast<scalar_t*>(a.exp_avg);
    scalar_t* exp_avg_sq = static_cast<scalar_t*>(a.exp_avg_sq);
    scalar_t* max_exp_avg_sq = a.amsgrad ? static_cast<scalar_t*>(a.max_exp_avg_sq) : nullptr;
    const acc_t* scalars = static_cast<const acc_t*>(a.scalars);
    const bool vec = aligned_for_pack<scalar_t>(param) && aligned_for_pack<scalar_t>(grad) &&
                     aligned_for_pack<scalar_t>(exp_avg) && aligned_for_pack<scalar_t>(exp_avg_sq) &&
                     aligned_for_pack<scalar_t>(max_exp_avg_sq);
    const int64_t inner = a.inner > 0 ? a.inner : 1;
    cudaError_t err = cudaSuccess;

    acc_t* factor = nullptr;
    if (a.sampled && a.channel) {  // sample the units first (also when they hold no element)
      if (a.n_units == 0) return cudaSuccess;
      factor = static_cast<acc_t*>(a.unit_factor);
      err = launch_channel_sample(h, static_cast<const acc_t*>(a.scores), scalars, factor, a.kept, a.n_units, stream);
      if (err != cudaSuccess) return err;
    }
    if (a.numel == 0) return cudaSuccess;
    int blocks = 1;
    err = update_blocks((a.numel + 3) / 4, &blocks);
    if (err != cudaSuccess) return err;
    auto launch = [&](auto vec_tag, auto mask_tag) {
      masked_adamw_kernel<scalar_t, decltype(vec_tag)::value, decltype(mask_tag)::value>
          <<<blocks, kUpdateThreads, 0, stream>>>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scalars, factor,
                                                  a.kept, a.numel, inner, h, ah);
    };
    auto with_mask = [&](auto vec_tag) {
      if (!a.sampled) {
        launch(vec_tag, std::integral_constant<int, kAdamDense>{});
      } else if (a.channel) {
        launch(vec_tag, std::integral_constant<int, kAdamFactor>{});
      } else {
        launch(vec_tag, std::integral_constant<int, kAdamElement>{});
      }
    };
    if (vec) {
      with_mask(std::true_type{});
    } else {
      with_mask(std::false_type{});
    }
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace masked_optim
