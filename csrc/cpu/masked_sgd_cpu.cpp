// Fused masked SGD step for CPU tensors: the op masked_optim::masked_sgd_ (schema in
// masked_optim/backends/_ops.py; the per-element math in csrc/masked_sgd_math.h). The lazy AdamW step
// masked_optim::masked_adamw_ (docs/algorithm.md §2.8) is here too, on the same stage 1 and uniform
// loops, with its own element update: one pass over p, g, exp_avg, exp_avg_sq (and max_exp_avg_sq).
//
// Two passes over one tensor (docs/algorithm.md §2; mode 5, scale, skips stage 1 and samples nothing):
//   1. a reduction over the gradient: sum and max of the unit scores s_j = g_j^2 (per element or
//      per slice) and, in the same read, the scores that may saturate (the water-filling
//      candidates), whose rounds then scan only those (docs/backends.md, "The cpp stage 1");
//   2. one fused pass that draws the Philox uniforms of a piece, forms q = min(1, alpha s + beta),
//      masks and rescales the gradient and applies weight decay, momentum and the update.
// Arithmetic is in float32 (float64 for float64 tensors); half types are converted on load/store.
//
// Performance notes (2-core AMD EPYC, Zen 4, AVX-512): Philox4x32-10 is ~40 integer multiplies per
// 4 units, hand-written for AVX-512 (four independent groups of 16 blocks); elsewhere a loop over
// counters that the compiler vectorises in the target_clones (x86-64-v4/v3/default), without which
// it stays scalar and is several times slower. The uniforms of 256 elements are drawn just before
// they are applied, so they stay in L1 while the gradient, parameter and buffer stream through
// once. Parallel regions use torch's grain (kGrain). docs/backends.md has the measurements.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <string>
#include <limits>
#include <tuple>
#include <vector>

#include "../masked_sgd_math.h"
#include "../philox.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(MASKED_OPTIM_NO_CLONES)
#define MASKED_OPTIM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MASKED_OPTIM_CLONES
#endif

namespace masked_optim {

enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

namespace {

constexpr int64_t kChunk = 4096;  // elements (or units) per chunk; a multiple of 4
// Work per thread below which a loop runs on the calling thread alone: torch's own grain for
// elementwise ops. A parallel region costs a fork-join, and on a busy machine (data-loader workers,
// other tenants) a region waits for its slowest thread: with a grain of one chunk, a 0.2M-parameter
// step took 90 ms instead of 0.5 ms while another process kept one of two cores busy.
constexpr int64_t kGrain = at::internal::GRAIN_SIZE;
constexpr int64_t kGrainChunks = kGrain / kChunk;
// The fused element pass draws and applies 128 elements at a time, within the update function (one
// call per chunk): small enough that the out-of-order core overlaps the loads and stores of one piece
// with the Philox arithmetic of the next. Measured: on the Zen 5 VM, 10M fp32, Philox + update
// 3.3-3.4 ms at 256 against 4.1-4.9 ms when drawing 4096 at once; on the Intel VM (Xeon, KVM, family 6
// model 167, 2 threads), the amss update at 100M 65-66 -> 56 ms and at 10M 6.3 -> 5.4 ms from 256
// pieces drawn outside the update function (one call per piece) to 128 drawn inside it; 64 (one
// Philox group, a single dependence chain) was slower than either.
constexpr int64_t kSubChunk = 128;
// Reductions keep kLanes independent partial results so that they vectorise without -ffast-math
// (a scalar float accumulator is a loop-carried dependence the compiler may not reassociate).
// 32, not 16: with 16 lanes GCC 12 leaves the sum-and-max loop of square_sum_max mostly scalar
// (measured on the development machine, 2M fp32 in cache: 0.65-0.81 ms at 16 lanes against
// 0.09-0.14 ms at 32, at every ISA level of the clones).
constexpr int kLanes = 32;

// The hand-written paths: AVX-512 (Philox and the stage-1 pass), AVX2 (the stage-1 pass) or none
// (portable loops, vectorised by the compiler in the target_clones). The best the CPU supports,
// lowered by MASKED_OPTIM_CPU_ISA=avx2|generic (read once, when the library loads) so that tests can
// run every path on one machine; cpu_kernel_isa() reports it (build_info). Values are checked in
// Python (masked_optim/backends/_cpp_lib.py) before the library loads.
CpuIsa detect_isa() {
  CpuIsa best = CpuIsa::kGeneric;
#if defined(__GNUC__) && defined(__x86_64__) && !defined(MASKED_OPTIM_NO_AVX512)
  __builtin_cpu_init();  // called from a static initialiser
  if (__builtin_cpu_supports("avx512f")) {
    best = CpuIsa::kAvx512;
  } else if (__builtin_cpu_supports("avx2")) {
    best = CpuIsa::kAvx2;
  }
#endif
  const char* env = std::getenv("MASKED_OPTIM_CPU_ISA");
  if (env != nullptr) {
    const std::string want(env);
    if (want == "generic") return CpuIsa::kGeneric;
    if (want == "avx2" && best != CpuIsa::kGeneric) return CpuIsa::kAvx2;
  }
  return best;
}
const CpuIsa kIsa = detect_isa();

// How the AVX-512 Philox forms the low words of its 32 x 32 -> 64-bit products: one vpmulld, or
// from the two vpmuludq products it forms for the high words anyway, by one masked vpshufd. vpmulld
// is one fast instruction on AMD Zen 4/5 (the shuffle was 5-7% slower there) and two slow uops on
// Intel's AVX-512 cores, where the shuffle is faster (Xeon, KVM, family 6 model 167, one thread,
// 64K uniforms in L2: 0.46 -> 0.41 ns per uniform with four groups, 0.42 -> 0.38 with two; the
// 10M-parameter update 5.3-5.4 -> 4.9-5.1 ms in amss). Intel CPUs take the shuffle;
// MASKED_OPTIM_PHILOX_LOW=mullo|shuffle overrides it (read once, when the library loads; checked in
// masked_optim/backends/_cpp_lib.py), so that tests run both on one machine.
bool detect_low_by_shuffle() {
  bool shuffle = false;
#if defined(__GNUC__) && defined(__x86_64__) && !defined(MASKED_OPTIM_NO_AVX512)
  __builtin_cpu_init();
  shuffle = __builtin_cpu_is("intel");
#endif
  const char* env = std::getenv("MASKED_OPTIM_PHILOX_LOW");
  if (env != nullptr && std::string(env) == "mullo") return false;
  if (env != nullptr && std::string(env) == "shuffle") return true;
  return shuffle;
}
const bool kLowByShuffle = detect_low_by_shuffle();

// Software prefetch distance, in bytes ahead, of the streaming passes over a tensor (the element
// update, the stage-1 pass and the sum of squares), 0 for none. On the Intel VM (Xeon, KVM, family 6
// model 167, 2 threads, 100M fp32) the hardware prefetchers left each core far below the memory's
// bandwidth on these loops: with 2048 bytes, the sum of squares 22 -> 17 ms, the stage-1 pass of
// amss 32 -> 22-23 ms, the amss update 54 -> 44-46 ms (10M: 5.1 -> 3.9 ms). On the Zen 5 VM, a
// prefetch of the next pieces of the update made it slower (amss+ at 10M 3.7-3.9 -> 4.2-4.4 ms):
// AMD CPUs take none. MASKED_OPTIM_PREFETCH=<bytes> overrides it (0: none; read once, when the
// library loads; checked in masked_optim/backends/_cpp_lib.py). A prefetch never changes a result.
int64_t detect_prefetch() {
  int64_t bytes = 0;
#if defined(__GNUC__) && defined(__x86_64__)
  __builtin_cpu_init();
  if (__builtin_cpu_is("intel")) bytes = 2048;
#endif
  const char* env = std::getenv("MASKED_OPTIM_PREFETCH");
  if (env != nullptr && *env != '\0') bytes = std::max<int64_t>(0, std::atoll(env));
  return bytes;
}
const int64_t kPrefetch = detect_prefetch();

// Uniforms of units [4 * first_block, 4 * (first_block + nblocks)) into out[0 .. 4 * nblocks).
// Portable version: the compiler vectorises it across counters in the x86-64-v3/v4 clones.
MASKED_OPTIM_CLONES void fill_uniforms_generic(uint64_t key, int64_t first_block, int64_t nblocks, float* __restrict out) {
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

#if defined(__GNUC__) && defined(__x86_64__) && !defined(MASKED_OPTIM_NO_AVX512)
// AVX-512 version, four independent groups of 16 Philox blocks (256 uniforms; a piece of kSubChunk
// takes two) per iteration: the rounds of one group are a dependence chain, and the other groups
// fill its latency (2-core AMD EPYC, one thread, 10M uniforms into L1: 5.4 ms with one group and the blended low half,
// 3.9 ms with two groups and vpmulld, on Zen 4; on Zen 5, 256K uniforms in L2, 0.256 ns per uniform
// with two groups, 0.218 with three, 0.205 with four, and 5-7% slower with the blended low half).
// The high half of a 32 x 32 -> 64-bit product comes from two vpmuludq (even and odd lanes) and one
// masked vpshufd that moves the even lanes' high words down (a shift and a blend were 9% slower:
// Zen 5, one thread, 64K uniforms in L1, 0.166 against 0.182 ns per uniform; two-source vpermt2d
// for either half, 10-20% slower), the low half from one vpmulld or one more masked vpshufd
// (kLowByShuffle); the three-way xor is one vpternlogd.
template <bool kShuffleLow>
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i a, __m512i x, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, a);                         // 64-bit products of lanes 0, 2, ...
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), a);   // ... of lanes 1, 3, ...
  hi = _mm512_mask_shuffle_epi32(odd, 0x5555, even, _MM_PERM_DDBB);  // even lanes: the words above them
  if constexpr (kShuffleLow) {
    lo = _mm512_mask_shuffle_epi32(even, 0xAAAA, odd, _MM_PERM_CCAA);  // odd lanes: the words below them
  } else {
    lo = _mm512_mullo_epi32(x, a);
  }
}

__attribute__((target("avx512f"))) inline __m512 to_uniform16(__m512i x) {
  const __m512i folded = _mm512_mask_xor_epi32(x, _mm512_cmplt_epi32_mask(x, _mm512_setzero_si512()), x,
                                               _mm512_set1_epi32(-1));  // ~x where x < 0 (as int32)
  return _mm512_mul_ps(_mm512_cvtepi32_ps(folded), _mm512_set1_ps(kUniformScale));
}

// Philox4x32-10 of kGroups groups of 16 consecutive counters starting at `base`, written as
// 64 * kGroups consecutive uniforms [b0w0 b0w1 b0w2 b0w3 b1w0 ...] at `dst`.
template <int kGroups, bool kShuffleLow>
__attribute__((target("avx512f"))) inline void philox_groups(const __m512i* k0, const __m512i* k1, uint64_t base,
                                                             float* __restrict dst) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxM1));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i c0[kGroups], c1[kGroups], c2[kGroups], c3[kGroups];
  for (int j = 0; j < kGroups; ++j) {
    const uint64_t b = base + 16 * static_cast<uint64_t>(j);
    // Counter words: (b + lane) mod 2^32 and its carry into the high word.
    c0[j] = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(b))), lane);
    const __mmask16 carry = _mm512_cmplt_epu32_mask(c0[j], lane);
    const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(b >> 32));
    c1[j] = _mm512_mask_add_epi32(high, carry, high, _mm512_set1_epi32(1));
    c2[j] = _mm512_setzero_si512();
    c3[j] = _mm512_setzero_si512();
  }
  for (int r = 0; r < 10; ++r) {
    for (int j = 0; j < kGroups; ++j) {
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16<kShuffleLow>(m0, c0[j], hi0, lo0);
      mulhilo16<kShuffleLow>(m1, c2[j], hi1, lo1);
      c0[j] = _mm512_ternarylogic_epi32(hi1, c1[j], k0[r], 0x96);  // hi1 ^ c1 ^ k0
      c2[j] = _mm512_ternarylogic_epi32(hi0, c3[j], k1[r], 0x96);  // hi0 ^ c3 ^ k1
      c1[j] = lo1;
      c3[j] = lo0;
    }
  }
  // Interleave four vectors of 16 words into 64 consecutive uniforms: (w0, w1) and (w2, w3)
  // interleaved per block, then the two pairs interleaved per 64 bits.
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i pair_lo = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
  const __m512i pair_hi = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
  for (int j = 0; j < kGroups; ++j) {
    const __m512 u0 = to_uniform16(c0[j]), u1 = to_uniform16(c1[j]), u2 = to_uniform16(c2[j]), u3 = to_uniform16(c3[j]);
    const __m512 a_lo = _mm512_permutex2var_ps(u0, lo_idx, u1), a_hi = _mm512_permutex2var_ps(u0, hi_idx, u1);
    const __m512 b_lo = _mm512_permutex2var_ps(u2, lo_idx, u3), b_hi = _mm512_permutex2var_ps(u2, hi_idx, u3);
    float* d = dst + 64 * j;
    _mm512_storeu_pd(reinterpret_cast<double*>(d), _mm512_permutex2var_pd(_mm512_castps_pd(a_lo), pair_lo, _mm512_castps_pd(b_lo)));
    _mm512_storeu_pd(reinterpret_cast<double*>(d + 16), _mm512_permutex2var_pd(_mm512_castps_pd(a_lo), pair_hi, _mm512_castps_pd(b_lo)));
    _mm512_storeu_pd(reinterpret_cast<double*>(d + 32), _mm512_permutex2var_pd(_mm512_castps_pd(a_hi), pair_lo, _mm512_castps_pd(b_hi)));
    _mm512_storeu_pd(reinterpret_cast<double*>(d + 48), _mm512_permutex2var_pd(_mm512_castps_pd(a_hi), pair_hi, _mm512_castps_pd(b_hi)));
  }
}

template <bool kShuffleLow>
__attribute__((target("avx512f"))) void fill_uniforms_avx512(uint64_t key, int64_t first_block, int64_t nblocks,
                                                             float* __restrict out) {
  __m512i k0[10], k1[10];
  uint32_t a = static_cast<uint32_t>(key), b = static_cast<uint32_t>(key >> 32);
  for (int r = 0; r < 10; ++r, a += kPhiloxW0, b += kPhiloxW1) {
    k0[r] = _mm512_set1_epi32(static_cast<int32_t>(a));
    k1[r] = _mm512_set1_epi32(static_cast<int32_t>(b));
  }
  int64_t blk = 0;
  for (; blk + 64 <= nblocks; blk += 64) {
    philox_groups<4, kShuffleLow>(k0, k1, static_cast<uint64_t>(first_block + blk), out + 4 * blk);
  }
  for (; blk + 32 <= nblocks; blk += 32) {
    philox_groups<2, kShuffleLow>(k0, k1, static_cast<uint64_t>(first_block + blk), out + 4 * blk);
  }
  for (; blk + 16 <= nblocks; blk += 16) {
    philox_groups<1, kShuffleLow>(k0, k1, static_cast<uint64_t>(first_block + blk), out + 4 * blk);
  }
  if (blk < nblocks) fill_uniforms_generic(key, first_block + blk, nblocks - blk, out + 4 * blk);
}

#else
template <bool kShuffleLow>
inline void fill_uniforms_avx512(uint64_t, int64_t, int64_t, float*) {}
#endif

inline void fill_uniforms(uint64_t key, int64_t first_block, int64_t nblocks, float* __restrict out) {
  if (kIsa == CpuIsa::kAvx512) {
    if (kLowByShuffle) {
      fill_uniforms_avx512<true>(key, first_block, nblocks, out);
    } else {
      fill_uniforms_avx512<false>(key, first_block, nblocks, out);
    }
  } else {
    fill_uniforms_generic(key, first_block, nblocks, out);
  }
}


// keep_unit(u, q) and masked_value(g, keep, w) of the element loop, on bit patterns. u is in [0, 1);
// q is first mapped to q > 0 ? q : 0 (NaN, -0 and negative q keep nothing, as u < q), and for
// non-negative floats the order of the bit patterns is the order of the values, so the sign of
// bits(u) - bits(q) (u widened to acc_t) is the keep decision, as a mask of all ones or zeros. The
// masked value is bits(g * w) & mask: +0 for a unit not kept, exactly masked_value's. Why not the
// bool: GCC 12 then turned `keep ? g * w : 0` into a masked load of g (a load of its own where g
// is otherwise unused, the uniform and scale modes; a second, masked, load in amss), with which the
// uniform update ran at half the memory bandwidth (Zen 5, 100M fp32, 2 threads: uniform 54 ms,
// scale 25 ms; with this, 19 ms and 17 ms). A select on a bool that GCC can see through gives the
// masked load back. tests/test_backends.py checks the edge values of q against the reference.
template <typename acc_t>
struct KeepBits {
  using U = std::conditional_t<sizeof(acc_t) == 4, uint32_t, uint64_t>;
  using S = std::make_signed_t<U>;
  static U mask(float u, acc_t q) {
    const acc_t q_pos = q > acc_t(0) ? q : acc_t(0);  // NaN, -0 and below: 0, which keeps nothing
    const S diff = static_cast<S>(__builtin_bit_cast(U, static_cast<acc_t>(u)) - __builtin_bit_cast(U, q_pos));
    return static_cast<U>(diff >> (8 * sizeof(U) - 1));  // arithmetic shift: all ones iff u < q
  }
  static acc_t apply(U mask, acc_t x) { return __builtin_bit_cast(acc_t, __builtin_bit_cast(U, x) & mask); }
};

// The lines of the kSubChunk elements kPrefetch bytes after x (nothing when kPrefetch is 0), to read,
// or to write (kWrite). A prefetch past the end of the tensor is harmless (it never faults).
template <bool kWrite, typename scalar_t>
inline void prefetch_piece(const scalar_t* x) {
  if (kPrefetch <= 0) return;
  const char* a = reinterpret_cast<const char*>(x) + kPrefetch;
  for (size_t off = 0; off < kSubChunk * sizeof(scalar_t); off += 64) __builtin_prefetch(a + off, kWrite ? 1 : 0, 3);
}

// Element granularity: elements [begin, end) of a chunk, drawn and updated kSubChunk at a time (a
// piece's uniforms just before its update, keyed by h.key). Unsampled steps (dense, scale) use
// u = 0 with q = 1 (h.fixed_q), so every element is kept with
// weight grad_scale: 1 exactly, or the rate in mode scale (g~ = g * rate, one rounded product).
// The math is csrc/masked_sgd_math.h; the presence of a momentum buffer and h.fixed_q are template
// parameters (with either one a run-time select, the loop does not vectorise: ~4x slower).
template <bool kMomentum, bool kFixedQ, bool kUnbiased, typename scalar_t, typename acc_t>
MASKED_OPTIM_CLONES int64_t update_elements(const Hyper<acc_t> h, const scalar_t* __restrict g, scalar_t* __restrict p,
                                            scalar_t* __restrict b, int64_t begin, int64_t end, bool sampled) {
  alignas(64) float u[kSubChunk];
  if (!sampled) std::fill(u, u + kSubChunk, 0.0f);
  int32_t kept = 0;  // a chunk holds at most kChunk elements
  for (int64_t piece = begin; piece < end; piece += kSubChunk) {
    const int64_t n = std::min(end - piece, kSubChunk);
    prefetch_piece<false>(g + piece);  // the piece kPrefetch bytes ahead, p and b to be written
    prefetch_piece<true>(p + piece);
    if (kMomentum) prefetch_piece<true>(b + piece);
    if (sampled) fill_uniforms(h.key, piece / 4, (n + 3) / 4, u);
    const scalar_t* __restrict gc = g + piece;
    scalar_t* __restrict pc = p + piece;
    scalar_t* __restrict bc = kMomentum ? b + piece : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t gv = signed_grad(h, static_cast<acc_t>(gc[i]));
      const acc_t q = unit_probability<kFixedQ>(h, mul_rn(gv, gv));
      const auto keep = KeepBits<acc_t>::mask(u[i], q);
      kept += static_cast<int32_t>(keep & 1);
      // With a fixed q the weight is loop-invariant either way; otherwise kUnbiased spares the biased
      // modes a division per element (100M fp32 in 15 tensors, amss: the update 22.1 -> 21.6 ms).
      const acc_t w = kFixedQ ? unit_weight(h, q) : unit_weight<kUnbiased>(h, q);
      const acc_t gm = KeepBits<acc_t>::apply(keep, mul_rn(gv, w));
      acc_t pv = static_cast<acc_t>(pc[i]);
      acc_t bv = kMomentum ? static_cast<acc_t>(bc[i]) : acc_t(0);
      sgd_update<kMomentum>(h, gm, pv, bv);
      pc[i] = static_cast<scalar_t>(pv);
      if (kMomentum) bc[i] = static_cast<scalar_t>(bv);
    }
  }
  return kept;
}

// Channel granularity: units [ubegin, uend), each `inner` contiguous elements. The unit's weight
// (kept: 1 or 1/q) is formed first; the element loop is then a plain scaled update.
template <bool kMomentum, typename scalar_t, typename acc_t>
MASKED_OPTIM_CLONES int64_t update_channels(const Hyper<acc_t> h, const scalar_t* __restrict g, scalar_t* __restrict p,
                                            scalar_t* __restrict b, const acc_t* __restrict scores, int64_t inner,
                                            int64_t ubegin, int64_t uend, const float* __restrict u) {
  int64_t kept = 0;
  for (int64_t j = ubegin; j < uend; ++j) {
    const acc_t q = unit_probability(h, scores != nullptr ? scores[j] : acc_t(0));
    const auto keep = KeepBits<acc_t>::mask(u[j - ubegin], q);
    kept += static_cast<int64_t>(keep & 1);
    const acc_t w = unit_weight(h, q);
    const scalar_t* __restrict gj = g + j * inner;
    scalar_t* __restrict pj = p + j * inner;
    scalar_t* __restrict bj = kMomentum ? b + j * inner : nullptr;
    for (int64_t i = 0; i < inner; ++i) {
      acc_t pv = static_cast<acc_t>(pj[i]);
      acc_t bv = kMomentum ? static_cast<acc_t>(bj[i]) : acc_t(0);
      sgd_update<kMomentum>(h, KeepBits<acc_t>::apply(keep, mul_rn(signed_grad(h, static_cast<acc_t>(gj[i])), w)), pv, bv);
      pj[i] = static_cast<scalar_t>(pv);
      if (kMomentum) bj[i] = static_cast<scalar_t>(bv);
    }
  }
  return kept;
}

// Per-unit scores of channel granularity: the sum of g^2 over each slice.
template <typename scalar_t, typename acc_t>
MASKED_OPTIM_CLONES void channel_scores(const scalar_t* __restrict g, int64_t inner, int64_t u0, int64_t u1,
                                        acc_t* __restrict out) {
  for (int64_t j = u0; j < u1; ++j) {
    acc_t s[kLanes] = {};
    const scalar_t* __restrict gj = g + j * inner;
    int64_t i = 0;
    for (; i + kLanes <= inner; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const acc_t v = static_cast<acc_t>(gj[i + l]);
        s[l] += v * v;
      }
    }
    for (; i < inner; ++i) {
      const acc_t v = static_cast<acc_t>(gj[i]);
      s[0] += v * v;
    }
    acc_t total = 0;
    for (int l = 0; l < kLanes; ++l) total += s[l];
    out[j] = total;
  }
}

// One value per thread of a parallel region, each on its own cache line. The reductions add into
// their thread's slot once per chunk; with plain adjacent slots both cores wrote the same line every
// 4096 elements, and the line's traffic between them cost more than the reduction itself (Zen 5,
// 100M fp32, 2 threads: a sum of squares took 8.7 ms, against 4.7 ms for torch's g.sum()).
template <typename T>
class PerThread {
 public:
  explicit PerThread(int n, T init = T()) : slots_(static_cast<size_t>(n), Slot{init}) {}
  T& operator[](int64_t t) { return slots_[static_cast<size_t>(t)].value; }
  const T& operator[](int64_t t) const { return slots_[static_cast<size_t>(t)].value; }
  void fill(T value) {
    for (Slot& s : slots_) s.value = value;
  }
  T total() const {
    T out = T();
    for (const Slot& s : slots_) out += s.value;
    return out;
  }

 private:
  struct alignas(64) Slot {
    T value;
  };
  std::vector<Slot> slots_;
};

// Per-thread partial results, combined after at::parallel_for.
struct Partials {
  explicit Partials(int n) : sum(n, 0.0), max(n, 0.0), count(n, 0) {}
  PerThread<double> sum, max;
  PerThread<int64_t> count;
};


// Sum and max of g^2 over elements [begin, end).
template <typename scalar_t, typename acc_t>
MASKED_OPTIM_CLONES void square_sum_max(const scalar_t* __restrict g, int64_t begin, int64_t end, double* sum,
                                        double* mx) {
  acc_t s[kLanes] = {}, m[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    if (kPrefetch > 0) {
      for (size_t off = 0; off < kLanes * sizeof(scalar_t); off += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(g + i) + kPrefetch + off, 0, 3);
      }
    }
    for (int k = 0; k < kLanes; ++k) {
      const acc_t v = static_cast<acc_t>(g[i + k]);
      const acc_t sq = v * v;
      s[k] += sq;
      m[k] = m[k] > sq ? m[k] : sq;
    }
  }
  for (; i < end; ++i) {
    const acc_t v = static_cast<acc_t>(g[i]);
    s[0] += v * v;
    m[0] = m[0] > v * v ? m[0] : v * v;
  }
  for (int k = 0; k < kLanes; ++k) {
    *sum += static_cast<double>(s[k]);
    *mx = std::max(*mx, static_cast<double>(m[k]));
  }
}

// One water-filling round over elements [begin, end): the number of units with pt * c >= 1 and the
// sum of pt over the others, pt = (s / total) * (1 - gamma) + gamma / N as in the reference.
template <typename scalar_t, typename acc_t>
MASKED_OPTIM_CLONES void waterfill_round(const scalar_t* __restrict g, int64_t begin, int64_t end, acc_t total,
                                         acc_t one_minus_gamma, acc_t uniform_share, acc_t c, int64_t* count,
                                         double* rest) {
  acc_t r[kLanes] = {};
  int32_t n[kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int k = 0; k < kLanes; ++k) {
      const acc_t v = static_cast<acc_t>(g[i + k]);
      const acc_t pt = ((v * v) / total) * one_minus_gamma + uniform_share;
      const bool sat = pt * c >= acc_t(1);
      n[k] += sat ? 1 : 0;
      r[k] += sat ? acc_t(0) : pt;
    }
  }
  for (; i < end; ++i) {
    const acc_t v = static_cast<acc_t>(g[i]);
    const acc_t pt = ((v * v) / total) * one_minus_gamma + uniform_share;
    const bool sat = pt * c >= acc_t(1);
    n[0] += sat ? 1 : 0;
    r[0] += sat ? acc_t(0) : pt;
  }
  for (int k = 0; k < kLanes; ++k) {
    *count += n[k];
    *rest += static_cast<double>(r[k]);
  }
}

// Water-filling candidates. A round at c needs the count of units with pt * c >= 1 and the sum of
// pt over the others. c only grows, so for every c <= c_cand a unit whose score lies below the
// threshold of c_cand is unsaturated, and one above the threshold of the first round's c is
// saturated in every round. The stage-1 pass, which reads the gradient anyway, sums the scores below
// a lower bound and counts those above an upper one, both set from a small sample of the gradient,
// and stores the scores between; once the true sum is known both bounds are checked, and the rounds
// scan only the stored scores. Without that, each round is another pass over the gradient: on the development
// machine (2-core AMD EPYC, 10M fp32 Gaussian gradients, rate 0.5) four rounds with ~10% of units
// saturated, about as long as the fused update itself.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(MASKED_OPTIM_NO_AVX512)
// The stage-1 pass of float32 element granularity: sum and max of s = g^2 and, in the same read of
// the gradient, three classes of units: s < threshold (low: counted in *n_low, summed in *sum_low),
// s >= high (high: counted in *n_high; none when high is NaN), and the candidates between (stored).
// Returns the number stored, or -1 when they would not fit (the sums and counts are complete either
// way). NaN scores are low.
__attribute__((target("avx512f"))) int64_t stage1_collect_f32(const float* __restrict g, int64_t begin, int64_t end,
                                                              float threshold, float high, float* __restrict out,
                                                              int64_t capacity, double* sum, double* mx,
                                                              double* sum_low, int64_t* n_low, int64_t* n_high) {
  // Scores are >= 0 (or NaN), and non-negative floats order as their bit patterns: threshold <= s <
  // high is one unsigned compare, bits(s) - bits(threshold) < bits(high) - bits(threshold) (NaN
  // patterns lie above +inf; no high is +inf's pattern + 1, so that +inf is stored).
  const float t0 = std::isnan(threshold) || threshold > 0.0f ? threshold : 0.0f;  // -0.0 has the sign bit
  uint32_t t_bits, h_bits;
  std::memcpy(&t_bits, &t0, 4);
  std::memcpy(&h_bits, &high, 4);
  if (std::isnan(high)) h_bits = 0x7f800001u;
  if (!(high > 0.0f) && !std::isnan(high)) h_bits = 0;  // every unit >= threshold is high
  const uint32_t span = std::isnan(t0) || h_bits <= t_bits ? 0u : h_bits - t_bits;
  const __m512 vt = _mm512_set1_ps(threshold);
  const __m512i vtb = _mm512_set1_epi32(static_cast<int32_t>(t_bits)), vspan = _mm512_set1_epi32(static_cast<int32_t>(span));
  __m512 acc = _mm512_setzero_ps(), acc_low = _mm512_setzero_ps(), vmax = _mm512_setzero_ps();
  int64_t m = 0, low = 0, stored = 0;
  bool fits = true;
  int64_t i = begin;
  // Two vectors per iteration, each with its own accumulators (the adds are latency-bound).
  __m512 acc1 = _mm512_setzero_ps(), acc_low1 = _mm512_setzero_ps(), vmax1 = _mm512_setzero_ps();
  double sum_d = 0, low_d = 0;  // the float32 lanes are flushed here every kChunk elements
  while (i + 32 <= end) {
    const int64_t stop = std::min(end, i + kChunk);
    for (; i + 32 <= stop; i += 32) {
      if (kPrefetch > 0) {
        __builtin_prefetch(reinterpret_cast<const char*>(g + i) + kPrefetch, 0, 3);
        __builtin_prefetch(reinterpret_cast<const char*>(g + i + 16) + kPrefetch, 0, 3);
      }
      const __m512 v0 = _mm512_loadu_ps(g + i), v1 = _mm512_loadu_ps(g + i + 16);
      const __m512 sq0 = _mm512_mul_ps(v0, v0), sq1 = _mm512_mul_ps(v1, v1);
      acc = _mm512_add_ps(acc, sq0);
      acc1 = _mm512_add_ps(acc1, sq1);
      vmax = _mm512_max_ps(vmax, sq0);
      vmax1 = _mm512_max_ps(vmax1, sq1);
      const __mmask16 low0 = _mm512_cmp_ps_mask(sq0, vt, _CMP_NGE_UQ), low1 = _mm512_cmp_ps_mask(sq1, vt, _CMP_NGE_UQ);
      const __mmask16 st0 = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(_mm512_castps_si512(sq0), vtb), vspan);
      const __mmask16 st1 = _mm512_cmplt_epu32_mask(_mm512_sub_epi32(_mm512_castps_si512(sq1), vtb), vspan);
      acc_low = _mm512_mask_add_ps(acc_low, low0, acc_low, sq0);
      acc_low1 = _mm512_mask_add_ps(acc_low1, low1, acc_low1, sq1);
      low += __builtin_popcount(static_cast<unsigned>(low0) | (static_cast<unsigned>(low1) << 16));
      const int k0 = __builtin_popcount(static_cast<unsigned>(st0)), k1 = __builtin_popcount(static_cast<unsigned>(st1));
      stored += k0 + k1;
      if (fits && m + 32 <= capacity) {
        // Compress in a register, then one full-width store: the memory form of vcompressps is
        // microcoded on AMD Zen 4 (this pass was ~4x slower there) and slower on Zen 5 as well.
        _mm512_storeu_ps(out + m, _mm512_maskz_compress_ps(st0, sq0));
        m += k0;
        _mm512_storeu_ps(out + m, _mm512_maskz_compress_ps(st1, sq1));
        m += k1;
      } else {
        fits = false;
      }
    }
    sum_d += _mm512_reduce_add_ps(_mm512_add_ps(acc, acc1));
    low_d += _mm512_reduce_add_ps(_mm512_add_ps(acc_low, acc_low1));
    acc = acc1 = acc_low = acc_low1 = _mm512_setzero_ps();
  }
  *sum += sum_d;
  *sum_low += low_d;
  acc = _mm512_add_ps(acc, acc1);
  acc_low = _mm512_add_ps(acc_low, acc_low1);
  vmax = _mm512_max_ps(vmax, vmax1);
  double tail = 0, tail_low = 0, tail_max = 0;
  for (; i < end; ++i) {
    const float sq = g[i] * g[i];
    tail += sq;
    tail_max = std::max(tail_max, static_cast<double>(sq));
    if (!(sq >= threshold)) {
      tail_low += sq;
      ++low;
    } else if (!(sq >= high)) {
      ++stored;
      if (fits && m < capacity) out[m++] = sq; else fits = false;
    }
  }
  alignas(64) float a[16], b[16], c[16];
  _mm512_store_ps(a, acc);
  _mm512_store_ps(b, acc_low);
  _mm512_store_ps(c, vmax);
  for (int l = 0; l < 16; ++l) {
    *sum += a[l];
    *sum_low += b[l];
    *mx = std::max(*mx, static_cast<double>(c[l]));
  }
  *sum += tail;
  *sum_low += tail_low;
  *mx = std::max(*mx, tail_max);
  *n_low += low;
  *n_high += (end - begin) - low - stored;
  return fits ? m : -1;
}

// The same pass on AVX2 (no compress instruction): a candidate mask of 8 lanes indexes a table of
// the permutations that pack its set lanes first.
struct PackTable {
  alignas(32) int32_t idx[256][8];
  PackTable() {
    for (int mask = 0; mask < 256; ++mask) {
      int k = 0;
      for (int l = 0; l < 8; ++l) {
        if (mask & (1 << l)) idx[mask][k++] = l;
      }
      for (; k < 8; ++k) idx[mask][k] = 0;
    }
  }
};
const PackTable kPack;

__attribute__((target("avx2,popcnt"))) int64_t stage1_collect_avx2_f32(const float* __restrict g, int64_t begin,
                                                                       int64_t end, float threshold, float high,
                                                                       float* __restrict out, int64_t capacity,
                                                                       double* sum, double* mx, double* sum_low,
                                                                       int64_t* n_low, int64_t* n_high) {
  const __m256 vt = _mm256_set1_ps(threshold), vh = _mm256_set1_ps(high);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, low0 = acc0, low1 = acc0, max0 = acc0, max1 = acc0;
  int64_t m = 0, low = 0, stored = 0;
  bool fits = true;
  int64_t i = begin;
  double sum_d = 0, low_d = 0;  // the float32 lanes are flushed here every kChunk elements
  while (i + 16 <= end) {
    const int64_t stop = std::min(end, i + kChunk);
    for (; i + 16 <= stop; i += 16) {
      if (kPrefetch > 0) __builtin_prefetch(reinterpret_cast<const char*>(g + i) + kPrefetch, 0, 3);
      const __m256 v0 = _mm256_loadu_ps(g + i), v1 = _mm256_loadu_ps(g + i + 8);
      const __m256 sq0 = _mm256_mul_ps(v0, v0), sq1 = _mm256_mul_ps(v1, v1);
      acc0 = _mm256_add_ps(acc0, sq0);
      acc1 = _mm256_add_ps(acc1, sq1);
      max0 = _mm256_max_ps(max0, sq0);
      max1 = _mm256_max_ps(max1, sq1);
      const __m256 c0 = _mm256_cmp_ps(sq0, vt, _CMP_GE_OQ), c1 = _mm256_cmp_ps(sq1, vt, _CMP_GE_OQ);
      const __m256 h0 = _mm256_and_ps(c0, _mm256_cmp_ps(sq0, vh, _CMP_GE_OQ));
      const __m256 h1 = _mm256_and_ps(c1, _mm256_cmp_ps(sq1, vh, _CMP_GE_OQ));
      low0 = _mm256_add_ps(low0, _mm256_andnot_ps(c0, sq0));
      low1 = _mm256_add_ps(low1, _mm256_andnot_ps(c1, sq1));
      low += 16 - __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(c0))) -
             __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(c1)));
      const int b0 = _mm256_movemask_ps(_mm256_andnot_ps(h0, c0)), b1 = _mm256_movemask_ps(_mm256_andnot_ps(h1, c1));
      const int k0 = __builtin_popcount(static_cast<unsigned>(b0)), k1 = __builtin_popcount(static_cast<unsigned>(b1));
      stored += k0 + k1;
      if (fits && m + 16 <= capacity) {
        const __m256i p0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.idx[b0]));
        const __m256i p1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPack.idx[b1]));
        _mm256_storeu_ps(out + m, _mm256_permutevar8x32_ps(sq0, p0));
        m += k0;
        _mm256_storeu_ps(out + m, _mm256_permutevar8x32_ps(sq1, p1));
        m += k1;
      } else {
        fits = false;
      }
    }
    alignas(32) float a[8], b[8];
    _mm256_store_ps(a, _mm256_add_ps(acc0, acc1));
    _mm256_store_ps(b, _mm256_add_ps(low0, low1));
    for (int l = 0; l < 8; ++l) {
      sum_d += a[l];
      low_d += b[l];
    }
    acc0 = acc1 = low0 = low1 = _mm256_setzero_ps();
  }
  *sum += sum_d;
  *sum_low += low_d;
  alignas(32) float a[8], b[8], c[8];
  _mm256_store_ps(a, _mm256_add_ps(acc0, acc1));
  _mm256_store_ps(b, _mm256_add_ps(low0, low1));
  _mm256_store_ps(c, _mm256_max_ps(max0, max1));
  for (int l = 0; l < 8; ++l) {
    *sum += a[l];
    *sum_low += b[l];
    *mx = std::max(*mx, static_cast<double>(c[l]));
  }
  for (; i < end; ++i) {
    const float sq = g[i] * g[i];
    *sum += sq;
    *mx = std::max(*mx, static_cast<double>(sq));
    if (!(sq >= threshold)) {
      *sum_low += sq;
      ++low;
    } else if (!(sq >= high)) {
      ++stored;
      if (fits && m < capacity) out[m++] = sq; else fits = false;
    }
  }
  *n_low += low;
  *n_high += (end - begin) - low - stored;
  return fits ? m : -1;
}
#endif

// The same pass, portable, for every floating type scored in float32 (float32, float16, bfloat16):
// per chunk, a lane-parallel loop for the sums (vectorised in the clones), then a branchless
// scalar compaction of the candidates through a chunk buffer (2-core AMD EPYC, 2M fp32 in cache,
// one thread: ~1.3 ms against ~0.2 ms for the AVX-512 pass; each water-filling round it saves
// costs a full read of the gradient).
template <typename scalar_t>
MASKED_OPTIM_CLONES int64_t stage1_collect_generic(const scalar_t* __restrict g, int64_t begin, int64_t end,
                                                   float threshold, float high, float* __restrict out,
                                                   int64_t capacity, double* sum, double* mx, double* sum_low,
                                                   int64_t* n_low, int64_t* n_high) {
  alignas(64) float buf[kChunk];
  int64_t m = 0;
  bool fits = true;
  for (int64_t c = begin; c < end; c += kChunk) {
    const int64_t e = std::min(end, c + kChunk);
    float s[kLanes] = {}, mm[kLanes] = {}, sl[kLanes] = {};
    int32_t nl[kLanes] = {}, nh[kLanes] = {};
    int64_t i = c;
    for (; i + kLanes <= e; i += kLanes) {
      if (kPrefetch > 0) {
        for (size_t off = 0; off < kLanes * sizeof(scalar_t); off += 64) {
          __builtin_prefetch(reinterpret_cast<const char*>(g + i) + kPrefetch + off, 0, 3);
        }
      }
      for (int k = 0; k < kLanes; ++k) {
        const float v = static_cast<float>(g[i + k]);
        const float sq = v * v;
        s[k] += sq;
        mm[k] = mm[k] > sq ? mm[k] : sq;
        const bool lo = !(sq >= threshold), hi = !lo && sq >= high;
        sl[k] += lo ? sq : 0.0f;
        nl[k] += lo ? 1 : 0;
        nh[k] += hi ? 1 : 0;
      }
    }
    for (; i < e; ++i) {
      const float v = static_cast<float>(g[i]);
      const float sq = v * v;
      s[0] += sq;
      mm[0] = mm[0] > sq ? mm[0] : sq;
      const bool lo = !(sq >= threshold), hi = !lo && sq >= high;
      sl[0] += lo ? sq : 0.0f;
      nl[0] += lo ? 1 : 0;
      nh[0] += hi ? 1 : 0;
    }
    int64_t low = 0, hig = 0;
    for (int k = 0; k < kLanes; ++k) {
      *sum += s[k];
      *mx = std::max(*mx, static_cast<double>(mm[k]));
      *sum_low += sl[k];
      low += nl[k];
      hig += nh[k];
    }
    *n_low += low;
    *n_high += hig;
    const int64_t k = (e - c) - low - hig;  // candidates in this chunk
    if (!fits || m + k > capacity) {
      fits = false;
      continue;
    }
    int64_t w = 0;
    for (int64_t j = c; j < e; ++j) {
      const float v = static_cast<float>(g[j]);
      const float sq = v * v;
      buf[w] = sq;
      w += sq >= threshold && !(sq >= high) ? 1 : 0;
    }
    std::memcpy(out + m, buf, static_cast<size_t>(w) * sizeof(float));
    m += w;
  }
  return fits ? m : -1;
}

// The stage-1 pass with candidates, on the best path for this CPU and type.
template <typename scalar_t>
int64_t stage1_collect(const scalar_t* __restrict g, int64_t begin, int64_t end, float threshold, float high,
                       float* __restrict out, int64_t capacity, double* sum, double* mx, double* sum_low,
                       int64_t* n_low, int64_t* n_high) {
#if defined(__GNUC__) && defined(__x86_64__) && !defined(MASKED_OPTIM_NO_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (kIsa == CpuIsa::kAvx512) {
      return stage1_collect_f32(g, begin, end, threshold, high, out, capacity, sum, mx, sum_low, n_low, n_high);
    }
    if (kIsa == CpuIsa::kAvx2) {
      return stage1_collect_avx2_f32(g, begin, end, threshold, high, out, capacity, sum, mx, sum_low, n_low, n_high);
    }
  }
#endif
  return stage1_collect_generic<scalar_t>(g, begin, end, threshold, high, out, capacity, sum, mx, sum_low, n_low,
                                          n_high);
}

// Candidate scores to pt = (s / total) * (1 - gamma) + gamma / N, in place, as the reference rounds it.
MASKED_OPTIM_CLONES void scores_to_pt(float* __restrict x, int64_t n, float total, float one_minus_gamma,
                                      float uniform_share) {
  for (int64_t i = 0; i < n; ++i) x[i] = (x[i] / total) * one_minus_gamma + uniform_share;
}

// The candidates of one thread, as the rounds need them (float32 element granularity): scores to
// pt as scores_to_pt rounds them, then split by what the rounds can still decide. c only grows from
// the first round's c_lo up, and the rounds scan the candidates only while c <= c_hi, so a unit
// with pt * c_lo >= 1 is saturated in every such round (float products are monotone in c), and
// one with pt * c_hi < 1 in none: the first are counted (*n_sat), the second summed (*rest_never),
// and only the others are kept, compacted in place at x[0 .. returned count). Each later round then
// scans those (8.3M-element Gaussian fp32 tensors, rate 0.5: ~19% of the units stored, ~8.5% left,
// 43% of the candidates). The caller falls back to full passes for a round with c outside
// [c_lo, c_hi].
// The same sets as scanning every candidate; the sums in another order.
#if defined(__GNUC__) && defined(__x86_64__) && !defined(MASKED_OPTIM_NO_AVX512)
__attribute__((target("avx512f"))) int64_t partition_candidates(float* __restrict x, int64_t n, float total,
                                                                float one_minus_gamma, float uniform_share,
                                                                float c_lo, float c_hi, int64_t* n_sat,
                                                                double* rest_never) {
  const __m512 vt = _mm512_set1_ps(total), vg = _mm512_set1_ps(one_minus_gamma), vs = _mm512_set1_ps(uniform_share);
  const __m512 vlo = _mm512_set1_ps(c_lo), vhi = _mm512_set1_ps(c_hi), one = _mm512_set1_ps(1.0f);
  __m512 never = _mm512_setzero_ps();
  int64_t m = 0, sat = 0, i = 0;
  double rest = 0;
  for (; i + 16 <= n; i += 16) {
    if ((i & (kChunk - 1)) == 0) {  // float32 lanes, flushed to float64 every kChunk values
      rest += _mm512_reduce_add_ps(never);
      never = _mm512_setzero_ps();
    }
    const __m512 pt = _mm512_add_ps(_mm512_mul_ps(_mm512_div_ps(_mm512_loadu_ps(x + i), vt), vg), vs);
    const __mmask16 always = _mm512_cmp_ps_mask(_mm512_mul_ps(pt, vlo), one, _CMP_GE_OQ);
    const __mmask16 none = _mm512_cmp_ps_mask(_mm512_mul_ps(pt, vhi), one, _CMP_LT_OQ);
    const __mmask16 open = static_cast<__mmask16>(~(always | none));
    never = _mm512_mask_add_ps(never, none, never, pt);
    sat += __builtin_popcount(static_cast<unsigned>(always));
    _mm512_storeu_ps(x + m, _mm512_maskz_compress_ps(open, pt));  // m <= i: behind what is read
    m += __builtin_popcount(static_cast<unsigned>(open));
  }
  rest += _mm512_reduce_add_ps(never);
  for (; i < n; ++i) {
    const float pt = (x[i] / total) * one_minus_gamma + uniform_share;
    if (pt * c_lo >= 1.0f) {
      ++sat;
    } else if (pt * c_hi < 1.0f) {
      rest += pt;
    } else {
      x[m++] = pt;
    }
  }
  *n_sat += sat;
  *rest_never += rest;
  return m;
}
#endif

// One water-filling round over stored candidate pt values.
MASKED_OPTIM_CLONES void candidate_round(const float* __restrict pt, int64_t n, float c, int64_t* count, double* rest) {
  int64_t sat = 0;
  double sum = 0;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {  // float32 lanes, flushed to float64 every kChunk values
    const int64_t e = std::min(n, c0 + kChunk);
    float r[kLanes] = {};
    int32_t k[kLanes] = {};
    int64_t i = c0;
    for (; i + kLanes <= e; i += kLanes) {
      for (int l = 0; l < kLanes; ++l) {
        const bool s = pt[i + l] * c >= 1.0f;
        k[l] += s ? 1 : 0;
        r[l] += s ? 0.0f : pt[i + l];
      }
    }
    for (; i < e; ++i) {
      const bool s = pt[i] * c >= 1.0f;
      k[0] += s ? 1 : 0;
      r[0] += s ? 0.0f : pt[i];
    }
    for (int l = 0; l < kLanes; ++l) {
      sat += k[l];
      sum += r[l];
    }
  }
  *count += sat;
  *rest += sum;
}

// The sample that sets the thresholds of the stage-1 pass: `runs` runs of `run` elements (a multiple
// of 16), one every `stride` elements from the first. Adds their scores s = g^2 and s^2 to *sum and
// *sumsq and writes the first 16 scores of each run to head[0 .. 16 runs). Every run's lines are
// prefetched first, so that their loads overlap (one after another, each run waited for memory).
template <typename scalar_t, typename acc_t>
MASKED_OPTIM_CLONES void sample_scores(const scalar_t* __restrict g, int64_t runs, int64_t stride, int64_t run,
                                       double* sum, double* sumsq, double* __restrict head) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t r = 0; r < runs; ++r) {
    for (int64_t i = 0; i < run; i += kLine) __builtin_prefetch(g + r * stride + i, 0, 0);
  }
  double s[16] = {}, q[16] = {};
  for (int64_t r = 0; r < runs; ++r) {
    const scalar_t* __restrict x = g + r * stride;
    for (int l = 0; l < 16; ++l) {
      const double v = static_cast<double>(static_cast<acc_t>(x[l]));
      head[16 * r + l] = v * v;
    }
    for (int64_t i = 0; i < run; i += 16) {
      for (int l = 0; l < 16; ++l) {
        const double v = static_cast<double>(static_cast<acc_t>(x[i + l]));
        const double sq = v * v;
        s[l] += sq;
        q[l] += sq * sq;
      }
    }
  }
  for (int l = 0; l < 16; ++l) {
    *sum += s[l];
    *sumsq += q[l];
  }
}

// Per-thread scratch for the candidates, kept across calls so a step allocates nothing.
std::vector<float>& candidate_scratch(int64_t capacity) {
  static thread_local std::vector<float> scratch;
  if (static_cast<int64_t>(scratch.size()) < capacity) scratch.resize(capacity);
  return scratch;
}

// Stage 1 of one tensor: [alpha, beta], the unit scores (channel granularity) and, for the
// optimizer's non-finite check, the sum of g^2 (NaN when not computed). Shared by the fused step
// and by tensor_scalars, which lets the optimizer run every stage 1 (and its check) before any update.
template <typename acc_t>
struct Stage1 {
  acc_t alpha, beta;
  at::Tensor scores;  // defined for sampled channel granularity
  double sumsq;
};

// One unit per slice of one element (1-D tensors, or trailing dims of size 1) is element
// granularity: same units, same scores, same uniforms. Route it to the vectorised element path.
inline bool per_slice(const at::Tensor& t, bool channel) {
  return channel && t.dim() > 0 && t.size(0) > 0 && t.numel() / t.size(0) != 1;
}

template <typename scalar_t, typename acc_t>
Stage1<acc_t> stage1(const at::Tensor& grad, const c10::optional<at::Tensor>& scores_in, const double* scalars_in,
                     double rate, double smoothing, int64_t max_iter, int64_t mode, bool channel_requested) {
  const bool channel = per_slice(grad, channel_requested);
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t numel = grad.numel();
  const int64_t n_units = channel ? (grad.dim() > 0 ? grad.size(0) : 1) : numel;
  const int64_t inner = n_units > 0 ? numel / n_units : 0;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const int nthreads = at::get_num_threads();
  // ---- stage 1: per-tensor scalars alpha, beta (q_j = min(1, alpha s_j + beta))
  acc_t alpha = 0, beta = 1;
  at::Tensor scores_buf;
  const acc_t* scores = nullptr;
  double sumsq = std::numeric_limits<double>::quiet_NaN();
  const bool sampled = step_sampled(mode, rate, n_units);
  if (sampled && channel) {
    if (scores_in.has_value()) {
      scores_buf = scores_in->to(acc_type).contiguous();
    } else {
      scores_buf = at::empty({n_units}, grad.options().dtype(acc_type));
      acc_t* out = scores_buf.mutable_data_ptr<acc_t>();
      at::parallel_for(0, n_units, std::max<int64_t>(1, kGrain / std::max<int64_t>(inner, 1)), [&](int64_t u0, int64_t u1) {
        channel_scores<scalar_t, acc_t>(g, inner, u0, u1, out);
      });
    }
    scores = scores_buf.const_data_ptr<acc_t>();
  }
  if (sampled && scalars_in != nullptr) {
    alpha = static_cast<acc_t>(scalars_in[0]);
    beta = static_cast<acc_t>(scalars_in[1]);
  } else if (sampled && mode_uniform(mode)) {
    alpha = 0;
    beta = static_cast<acc_t>(rate);
  } else if (sampled) {
    Partials part(nthreads);
    // Element granularity scored in float32: the stage-1 pass also collects water-filling candidates.
    const double budget_d = rate * static_cast<double>(n_units);
    double c_cand_d = 2.0 * budget_d;
    const double share_d = smoothing / static_cast<double>(n_units);
    // The rounds' smallest c (the budget, less room for a first quotient that rounds below it: such a
    // round reads g instead), as the rounds compute it.
    const acc_t budget = static_cast<acc_t>(rate * static_cast<double>(n_units));
    const acc_t c_lo = budget * acc_t(1.0 - 1.0 / 65536);
    std::vector<float*> cand_ptr(nthreads, nullptr);
    std::vector<int64_t> cand_n(nthreads, 0);
    PerThread<int64_t> n_low(nthreads, 0), n_high(nthreads, 0);
    PerThread<double> sum_low(nthreads, 0.0);
    double threshold_used = -1;
    float high_used = std::numeric_limits<float>::quiet_NaN();  // the pass's `high`, as it compared
    bool collected = false;
    bool try_collect = false;
    // Candidates are stored as float32 scores: every type but float64.
    if constexpr (std::is_same_v<acc_t, float>) {
      try_collect = !channel && max_iter > 0 && smoothing < 1.0 && numel >= 4 * kChunk;
    }
    // The stage-1 pass with candidates stored: sums into `into`, candidates threshold <= s < high into
    // each thread's scratch, the units s >= high counted (none when high is NaN). False when some
    // thread's candidates did not fit (more than half).
    auto collect = [&](double threshold, double high, Partials& into) {
      std::vector<char> ok(nthreads, 1);
      std::fill(cand_ptr.begin(), cand_ptr.end(), nullptr);
      sum_low.fill(0.0);
      n_low.fill(0);
      n_high.fill(0);
      high_used = static_cast<float>(high);
      at::parallel_for(0, numel, kGrain, [&](int64_t i0, int64_t i1) {
        const int t = at::get_thread_num();
        const int64_t capacity = (i1 - i0) / 2 + 64;
        std::vector<float>& scratch = candidate_scratch(capacity);
        if (cand_ptr[t] != nullptr) ok[t] = 0;  // one range per thread expected
        const int64_t m = stage1_collect<scalar_t>(g, i0, i1, static_cast<float>(threshold), static_cast<float>(high),
                                                   scratch.data(), capacity, &into.sum[t], &into.max[t], &sum_low[t],
                                                   &n_low[t], &n_high[t]);
        if (m < 0) ok[t] = 0;
        cand_ptr[t] = scratch.data();
        cand_n[t] = std::max<int64_t>(m, 0);
      });
      return std::all_of(ok.begin(), ok.end(), [](char x) { return x != 0; });
    };
    if (try_collect) {
      // The thresholds of the pass, guessed from a sample of the gradient: 64 evenly spaced runs of
      // 16 to 256 elements (1.6% of the tensor, at most 16384 elements). The sample's mean score
      // estimates the sum S within a margin of 5 standard errors (at least 2%, at most 50%); its
      // water-filling (on the first 16 elements of each run) gives c_cand, 1 + margin times its
      // constant (at least 1.05 x the budget). Stored: the units whose score may cross a threshold
      // in some round, s from the threshold of c_cand at the low S up to that of c_lo at the high S.
      // Below, summed; above, counted (saturated in every round). A guess the true S contradicts is
      // detected below and costs one more pass, never accuracy.
      const int64_t runs = 64, run = std::min<int64_t>(256, std::max<int64_t>(16, numel / 4096)) / 16 * 16;
      double sample_sum = 0, sample_sq = 0;
      std::vector<double> small(runs * 16);  // the water-filling subsample
      sample_scores<scalar_t, acc_t>(g, runs, numel / runs, run, &sample_sum, &sample_sq, small.data());
      const double n_all = static_cast<double>(runs * run);
      const double mean = sample_sum / n_all;
      const double rel_err = std::sqrt(std::max(0.0, sample_sq / n_all - mean * mean) / n_all) / mean;
      const double margin = std::isfinite(rel_err) ? std::min(0.5, std::max(0.02, 5.0 * rel_err)) : 0.5;
      double small_sum = 0;
      for (double x : small) small_sum += x;
      const double n_s = static_cast<double>(small.size());
      double c_s = rate * n_s;  // water-filling on the subsample, in its own units
      if (small_sum > 0) {
        const double scale_s = (1.0 - smoothing) / small_sum, share_s = smoothing / n_s;
        for (double& x : small) x = x * scale_s + share_s;  // pt (a guess: no need to round as the rounds do)
        double last_sat = -1;
        for (int64_t it = 0; it < max_iter; ++it) {
          double sat_l[8] = {}, rest_l[8] = {};  // independent lanes: the adds do not wait on each other
          for (size_t i = 0; i < small.size(); i += 8) {
            for (int l = 0; l < 8; ++l) {
              const double pt = small[i + l];
              const bool saturated = pt * c_s >= 1.0;
              sat_l[l] += saturated ? 1.0 : 0.0;
              rest_l[l] += saturated ? 0.0 : pt;
            }
          }
          double sat = 0, rest = 0;
          for (int l = 0; l < 8; ++l) {
            sat += sat_l[l];
            rest += rest_l[l];
          }
          // The same saturated set gives the same c_s: a fixed point (every later round was a
          // scalar pass over the 1024 samples for nothing: ~7% of stage 1 at 0.8M elements).
          if (rest <= 0 || sat == last_sat) break;
          last_sat = sat;
          c_s = (rate * n_s - sat) / rest;
        }
      }
      c_cand_d = budget_d * std::min(4.0, std::max(1.05, (1.0 + margin) * c_s / (rate * n_s)));
      const double s_est = mean * static_cast<double>(numel);
      threshold_used = (1.0 / c_cand_d - share_d) / (1.0 - smoothing) * s_est * (1.0 - margin);
      if (!(1.0 / c_cand_d > share_d)) threshold_used = 0;  // every unit may saturate: store all (or fall back)
      // Saturated at c_lo (hence in every round) if S <= s_est (1 + margin); checked once S is known.
      const double k_lo = (1.0 / static_cast<double>(c_lo) - share_d) / (1.0 - smoothing);
      double high = k_lo > 0 ? k_lo * s_est * (1.0 + margin) * (1.0 + 1e-4) : 0.0;
      if (!(s_est > 0) || !std::isfinite(high)) high = std::numeric_limits<double>::quiet_NaN();  // none
      collected = collect(threshold_used, high, part);
    } else if (channel) {
      at::parallel_for(0, n_units, kGrain, [&](int64_t u0, int64_t u1) {
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
      at::parallel_for(0, numel, kGrain, [&](int64_t i0, int64_t i1) {
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
    if (!channel) sumsq = total_d;
    const acc_t total = static_cast<acc_t>(total_d);
    const acc_t gamma = static_cast<acc_t>(smoothing);
    const acc_t uniform_share = static_cast<acc_t>(smoothing / static_cast<double>(n_units));
    acc_t c = budget;
    if (!(total > 0)) {
      alpha = 0;
      beta = c / static_cast<acc_t>(n_units);
    } else {
      const acc_t one_minus_gamma = static_cast<acc_t>(1.0 - smoothing);
      const acc_t max_pt = (static_cast<acc_t>(max_d) / total) * one_minus_gamma + uniform_share;
      if (!(max_pt * budget <= acc_t(1))) {
        // Water-filling (docs/algorithm.md §2.3), at most max_iter rounds.
        int64_t last_saturated = -1;
        acc_t c_one_ago = 0, c_two_ago = 0;  // the c of the last two rounds
        // The stored candidates serve every round with c <= c_cand if the threshold used was no
        // higher than the one the true sum gives (with a margin for rounding).
        const acc_t c_cand = static_cast<acc_t>(c_cand_d);
        if (try_collect) {
          const double threshold_true = (1.0 / c_cand_d - share_d) / (1.0 - smoothing) * total_d;
          // Every unit counted above `high` is saturated at c_lo if a score of `high` is, with pt and
          // the product rounded as the rounds round them (both are monotone in s).
          int64_t highs = 0;
          for (int t = 0; t < nthreads; ++t) highs += n_high[t];
          const bool high_ok = highs == 0 ||
                               ((static_cast<acc_t>(high_used) / total) * one_minus_gamma + uniform_share) * c_lo >= acc_t(1);
          if (!collected || !high_ok || threshold_used > threshold_true * (1.0 - 1e-4)) {
            // The sample misjudged the sum (a heavy-tailed or sparse gradient): it overestimated it,
            // so that some candidates were missed, or underestimated it, so that some units counted
            // as saturated are not, or that the candidates did not fit. One more pass at the
            // threshold of the true sum, counting none, costs less than a pass per round.
            Partials again(nthreads);
            threshold_used = 1.0 / c_cand_d > share_d ? threshold_true * (1.0 - 1e-3) : 0.0;
            collected = collect(threshold_used, std::numeric_limits<double>::quiet_NaN(), again);
          }
        }
        std::vector<double> rest_low(nthreads, 0.0);
        // Each thread's stored candidates are visited by that thread's slot; a few of them are
        // visited on this thread alone (a parallel region costs more than the scan: at 1M
        // parameters in 15 tensors, 4 rounds of fork-join were a third of stage 1).
        int64_t n_cand = 0;
        for (int t = 0; t < nthreads; ++t) n_cand += cand_n[t];
        // The partition runs on every thread from 4096 candidates: it reads each thread's candidates
        // where they were written (on the calling thread alone, the other core's lines moved over:
        // 0.83M-element Gaussian fp32 tensors, rate 0.5, 2-core Zen 5: ~7.5 against ~4 us per tensor).
        constexpr int64_t kParallelPartition = 4096;
        auto over_slots = [&](auto&& fn, int64_t parallel_from = (int64_t{1} << 16)) {
          if (n_cand < parallel_from) {
            fn(int64_t{0}, static_cast<int64_t>(nthreads));
          } else {
            at::parallel_for(0, nthreads, 1, fn);
          }
        };
        // The candidates serve the rounds with c in [c_lo, c_cand]; c starts at the budget and grows.
        // The units counted above the pass's `high` are saturated in each of them.
        std::vector<int64_t> sat_base(nthreads, 0);
        for (int t = 0; t < nthreads; ++t) sat_base[t] = n_high[t];
        if (collected) {
          over_slots([&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; ++t) {
              rest_low[t] = sum_low[t] / total_d * (1.0 - smoothing) + static_cast<double>(n_low[t]) * share_d;
#if defined(__GNUC__) && defined(__x86_64__) && !defined(MASKED_OPTIM_NO_AVX512)
              if (kIsa == CpuIsa::kAvx512) {
                cand_n[t] = partition_candidates(cand_ptr[t], cand_n[t], static_cast<float>(total),
                                                 static_cast<float>(one_minus_gamma), static_cast<float>(uniform_share),
                                                 static_cast<float>(c_lo), static_cast<float>(c_cand), &sat_base[t],
                                                 &rest_low[t]);
                continue;
              }
#endif
              scores_to_pt(cand_ptr[t], cand_n[t], static_cast<float>(total), static_cast<float>(one_minus_gamma),
                           static_cast<float>(uniform_share));
            }
          }, kParallelPartition);
        }
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
          if (collected && c_now <= c_cand && c_now >= c_lo) {
            over_slots([&](int64_t t0, int64_t t1) {
              for (int64_t t = t0; t < t1; ++t) {
                candidate_round(cand_ptr[t], cand_n[t], static_cast<float>(c_now), &round.count[t], &round.sum[t]);
                round.count[t] += sat_base[t];
                round.sum[t] += rest_low[t];
              }
            });
          } else if (channel) {
            at::parallel_for(0, n_units, kGrain, [&](int64_t u0, int64_t u1) {
              const int t = at::get_thread_num();
              for (int64_t j = u0; j < u1; ++j) visit(t, scores[j]);
            });
          } else {
            at::parallel_for(0, numel, kGrain, [&](int64_t i0, int64_t i1) {
              const int t = at::get_thread_num();
              for (int64_t i = i0; i < i1; i += kChunk) {
                waterfill_round<scalar_t, acc_t>(g, i, std::min(i1, i + kChunk), total, one_minus_gamma, uniform_share,
                                                 c_now, &round.count[t], &round.sum[t]);
              }
            });
          }
          int64_t saturated = 0;
          double rest = 0;
          for (int t = 0; t < nthreads; ++t) {
            saturated += round.count[t];
            rest += round.sum[t];
          }
          // Same saturated set as the previous round: c would be recomputed from the same set and
          // stay put, so the remaining rounds change nothing (the reference runs them anyway).
          if (saturated == last_saturated) break;
          // The same c as two rounds ago: c is a function of the previous c alone, so the rounds
          // alternate between two values from here on, and the last one is known by parity. In
          // float32 that happens on large tensors (ulps of budget - saturated): a 30M-element
          // Gaussian gradient at rate 0.7 alternates from round 4 on (tests/test_backends.py); before
          // the float64 flushes, a 100M-element one at rate 0.5 did too, to round max_iter.
          if (it >= 2 && c_now == c_two_ago) {
            c = (max_iter - it) % 2 == 0 ? c_now : c_one_ago;
            break;
          }
          c_two_ago = c_one_ago;
          c_one_ago = c_now;
          last_saturated = saturated;
          const acc_t rest_a = static_cast<acc_t>(rest);
          c = rest_a > 0 ? (budget - static_cast<acc_t>(saturated)) / rest_a : std::numeric_limits<acc_t>::infinity();
        }
      }
      alpha = c * one_minus_gamma / total;
      beta = c * gamma / static_cast<acc_t>(n_units);
    }
  }

  return Stage1<acc_t>{alpha, beta, scores_buf, sumsq};
}

// ---- The pieces of a fused step that masked_sgd_ and masked_adamw_ share: the units, stage 1 and the
// mask's fields of Hyper, the loops that draw the Philox uniforms of a piece just before updating it,
// the input checks and the outputs. The two steps differ only in their element update, so for the
// same (grad, rate, key, mode, granularity) they keep the same units.

// The units of one tensor: elements, or slices along dim 0 (one element per slice is element
// granularity, per_slice).
struct Units {
  bool channel;
  int64_t numel, n_units, inner;  // inner: elements per unit
};

inline Units units_of(const at::Tensor& param, bool channel_requested) {
  Units un;
  un.channel = per_slice(param, channel_requested);
  un.numel = param.numel();
  un.n_units = un.channel ? (param.dim() > 0 ? param.size(0) : 1) : un.numel;
  un.inner = un.n_units > 0 ? un.numel / un.n_units : 0;
  return un;
}

// Stage 1 of a sampled step (nothing when !h.sampled): the per-tensor scalars into h (amss, amss+;
// the uniform modes keep q = rate) and into st, whose alpha and beta are the op's output ([0, 1]
// when nothing is sampled). Returns the unit scores of channel granularity (kept alive by st), else
// nullptr.
template <typename scalar_t, typename acc_t>
const acc_t* mask_stage1(Hyper<acc_t>& h, Stage1<acc_t>& st, const at::Tensor& grad,
                         const c10::optional<at::Tensor>& scores_in, const double* scalars_in, double rate,
                         double smoothing, int64_t max_iter, int64_t mode, bool channel) {
  st = Stage1<acc_t>{0, 1, at::Tensor(), 0.0};
  if (!h.sampled) return nullptr;
  st = stage1<scalar_t, acc_t>(grad, scores_in, scalars_in, rate, smoothing, max_iter, mode, channel);
  if (!h.fixed_q) {
    h.alpha = st.alpha;
    h.beta = st.beta;
  }
  return st.scores.defined() ? st.scores.template const_data_ptr<acc_t>() : nullptr;
}

// Element granularity, or nothing sampled: fn(begin, end, u) updates elements [begin, end) (at most
// kSubChunk) whose uniforms are u[0 .. end - begin) (zeros when nothing is sampled: with q = 1 every
// element is kept) and returns how many it kept. Returns the total.
template <typename Fn>
int64_t for_each_element_chunk(int64_t numel, const Fn& fn) {
  PerThread<int64_t> kept_per_thread(at::get_num_threads(), 0);
  at::parallel_for(0, (numel + kChunk - 1) / kChunk, kGrainChunks, [&](int64_t c0, int64_t c1) {
    int64_t kept = 0;
    for (int64_t c = c0; c < c1; ++c) kept += fn(c * kChunk, std::min(numel, (c + 1) * kChunk));
    kept_per_thread[at::get_thread_num()] += kept;
  });
  return kept_per_thread.total();
}

// Channel granularity of a sampled step: fn(ubegin, uend, u) updates units [ubegin, uend) (`inner`
// elements each) whose uniforms are u[0 .. uend - ubegin) and returns how many it kept. Split by
// quads of units (one Philox evaluation each) with about kGrain elements per thread at least: a
// tensor of a few hundred large rows runs on every thread (split by chunks of kChunk units, it ran
// on one: at 100M parameters in such tensors the SGD update took 1.8x scale's).
template <typename Fn>
int64_t for_each_unit_block(int64_t n_units, int64_t inner, uint64_t key, const Fn& fn) {
  PerThread<int64_t> kept_per_thread(at::get_num_threads(), 0);
  const int64_t quads = (n_units + 3) / 4;
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(4 * inner, 1));
  at::parallel_for(0, quads, grain, [&](int64_t q0, int64_t q1) {
    alignas(64) float u[kChunk];
    int64_t kept = 0;
    for (int64_t q = q0; q < q1; q += kChunk / 4) {
      const int64_t ubegin = 4 * q;
      const int64_t uend = std::min(n_units, 4 * std::min(q1, q + kChunk / 4));
      fill_uniforms(key, ubegin / 4, (uend - ubegin + 3) / 4, u);
      kept += fn(ubegin, uend, static_cast<const float*>(u));
    }
    kept_per_thread[at::get_thread_num()] += kept;
  });
  return kept_per_thread.total();
}

// The op's outputs: (kept units, int64 0-d; [alpha, beta] in the compute dtype).
template <typename acc_t>
std::tuple<at::Tensor, at::Tensor> step_outputs(const at::Tensor& param, int64_t kept, acc_t alpha, acc_t beta) {
  at::Tensor kept_t = at::scalar_tensor(kept, param.options().dtype(at::kLong));
  at::Tensor scalars = at::empty({2}, param.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  scalars.mutable_data_ptr<acc_t>()[0] = alpha;
  scalars.mutable_data_ptr<acc_t>()[1] = beta;
  return {kept_t, scalars};
}

// An op's optional [alpha, beta] as float64 (exact for every compute dtype; the kernels round them to
// theirs as a .to(compute dtype) would).
struct GivenScalars {
  explicit GivenScalars(const c10::optional<at::Tensor>& scalars) {
    if (scalars.has_value()) {
      const at::Tensor sc = scalars->to(at::kCPU, at::kDouble).contiguous();
      v[0] = sc.const_data_ptr<double>()[0];
      v[1] = sc.const_data_ptr<double>()[1];
      has = true;
    }
  }
  const double* get() const { return has ? v : nullptr; }
  double v[2] = {0, 0};
  bool has = false;
};

// The checks both fused steps make on param, grad, the given scores and scalars, key and rate (`op`
// names the op in the messages).
void check_step_inputs(const char* op, const at::Tensor& param, const at::Tensor& grad,
                       const c10::optional<at::Tensor>& scores, const c10::optional<at::Tensor>& scalars, int64_t key,
                       double rate, bool channel) {
  TORCH_CHECK(param.device().is_cpu(), op, ": param must be a CPU tensor, got ", param.device());
  TORCH_CHECK(grad.device() == param.device() && grad.scalar_type() == param.scalar_type() &&
                  grad.sizes() == param.sizes(),
              op, ": grad must match param in device, dtype and shape; got ", grad.device(), " ", grad.scalar_type(),
              " ", grad.sizes(), " for param ", param.device(), " ", param.scalar_type(), " ", param.sizes());
  TORCH_CHECK(param.is_contiguous() && grad.is_contiguous(), op, ": param and grad must be contiguous");
  TORCH_CHECK(rate > 0 && rate <= 1, op, ": rate must be in (0, 1], got ", rate);
  TORCH_CHECK(key >= 0, op, ": key must be >= 0, got ", key);
  const int64_t n_units = channel ? (param.dim() > 0 ? param.size(0) : 1) : param.numel();
  if (scores.has_value()) {
    TORCH_CHECK(scores->dim() == 1 && scores->size(0) == n_units, op, ": scores must be 1-D with ", n_units,
                " units, got ", scores->sizes());
  }
  if (scalars.has_value()) {
    TORCH_CHECK(scalars->numel() == 2, op, ": scalars must hold [alpha, beta], got ", scalars->numel(), " values");
  }
}

// ---- masked_sgd_

// One tensor's step (inputs checked): updates param and buf in place, returns the kept-unit count and
// leaves stage 1's [alpha, beta] in st. scalars_in: the given [alpha, beta] (float64) or nullptr.
template <typename scalar_t, typename acc_t>
int64_t masked_sgd_impl(at::Tensor& param, const at::Tensor& grad, at::Tensor& buf,
                        const c10::optional<at::Tensor>& scores_in, const double* scalars_in, int64_t key, double rate,
                        double smoothing, int64_t max_iter, int64_t mode, bool channel, double lr, double momentum,
                        double dampening, double weight_decay, bool nesterov, bool maximize, bool first_step,
                        Stage1<acc_t>& st) {
  const Units un = units_of(param, channel);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* p = param.mutable_data_ptr<scalar_t>();
  scalar_t* b = momentum != 0 ? buf.mutable_data_ptr<scalar_t>() : nullptr;

  // ---- stage 1: per-tensor scalars alpha, beta (q_j = min(1, alpha s_j + beta)); none for scale
  const bool sampled = step_sampled(mode, rate, un.n_units);
  Hyper<acc_t> h = make_hyper<acc_t>(mode, sampled, rate, static_cast<uint64_t>(key), lr, momentum, dampening,
                                     weight_decay, nesterov, maximize, first_step);
  const acc_t* scores =
      mask_stage1<scalar_t, acc_t>(h, st, grad, scores_in, scalars_in, rate, smoothing, max_iter, mode, un.channel);

  // ---- stage 2: fused sample, mask, rescale and SGD update (csrc/masked_sgd_math.h)
  int64_t kept = 0;
  if (!un.channel || !sampled) {
    kept = for_each_element_chunk(un.numel, [&](int64_t begin, int64_t end) -> int64_t {
      if (h.fixed_q) {
        return h.has_momentum ? update_elements<true, true, false, scalar_t, acc_t>(h, g, p, b, begin, end, sampled)
                              : update_elements<false, true, false, scalar_t, acc_t>(h, g, p, b, begin, end, sampled);
      }
      if (h.unbiased) {
        return h.has_momentum ? update_elements<true, false, true, scalar_t, acc_t>(h, g, p, b, begin, end, sampled)
                              : update_elements<false, false, true, scalar_t, acc_t>(h, g, p, b, begin, end, sampled);
      }
      return h.has_momentum ? update_elements<true, false, false, scalar_t, acc_t>(h, g, p, b, begin, end, sampled)
                            : update_elements<false, false, false, scalar_t, acc_t>(h, g, p, b, begin, end, sampled);
    });
  } else {
    kept = for_each_unit_block(un.n_units, un.inner, h.key, [&](int64_t ubegin, int64_t uend, const float* u) -> int64_t {
      return h.has_momentum ? update_channels<true, scalar_t, acc_t>(h, g, p, b, scores, un.inner, ubegin, uend, u)
                            : update_channels<false, scalar_t, acc_t>(h, g, p, b, scores, un.inner, ubegin, uend, u);
    });
  }
  return sampled ? kept : un.n_units;
}

std::tuple<at::Tensor, at::Tensor> masked_sgd_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& buf,
                                                  const c10::optional<at::Tensor>& scores,
                                                  const c10::optional<at::Tensor>& scalars, int64_t key, double rate,
                                                  double smoothing, int64_t max_iter, int64_t mode, bool channel,
                                                  double lr, double momentum, double dampening, double weight_decay,
                                                  bool nesterov, bool maximize, bool first_step) {
  TORCH_CHECK(mode_valid(mode), "masked_sgd_: mode must be in 0..5 (dense, uniform, uniform unbiased, amss, amss+, scale), got ",
              mode);
  check_step_inputs("masked_sgd_", param, grad, scores, scalars, key, rate, channel);
  if (momentum != 0) {
    TORCH_CHECK(buf.scalar_type() == param.scalar_type() && buf.sizes() == param.sizes() && buf.is_contiguous() &&
                    buf.device() == param.device(),
                "masked_sgd_: momentum_buffer must be a contiguous tensor like param when momentum != 0; got ",
                buf.scalar_type(), " ", buf.sizes());
  }
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "masked_sgd_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const GivenScalars given(scalars);
    Stage1<acc_t> st;
    const int64_t kept = masked_sgd_impl<scalar_t, acc_t>(param, grad, buf, scores, given.get(), key, rate, smoothing,
                                                          max_iter, mode, channel, lr, momentum, dampening,
                                                          weight_decay, nesterov, maximize, first_step, st);
    out = step_outputs<acc_t>(param, kept, st.alpha, st.beta);
  });
  return out;
}

// ---- masked_adamw_: the lazy AdamW step (docs/algorithm.md §2.8), modes 1..4. The mask is
// masked_sgd_'s (stage 1, uniforms, q, keep test and unit weight through the same functions); a
// kept unit takes adamw_update (csrc/masked_sgd_math.h) with weight 1/q (unbiased) or 1, a unit
// not kept is untouched. One pass over p, g, m, v (and vmax) after stage 1.

// Element granularity (or nothing sampled: u = 0, q = 1). maximize is a product by -1 (the value of
// signed_grad's negation): with signed_grad's select on the run-time flag GCC 12 does not vectorise
// this loop (it does the SGD one). kFixedQ and kAmsgrad: as update_elements' template flags.
template <bool kFixedQ, bool kAmsgrad, typename scalar_t, typename acc_t>
MASKED_OPTIM_CLONES int64_t adamw_elements(const Hyper<acc_t> h, const AdamHyper<acc_t> a, const scalar_t* __restrict g,
                                           scalar_t* __restrict p, scalar_t* __restrict m, scalar_t* __restrict v,
                                           scalar_t* __restrict vmax, int64_t begin, int64_t end, bool sampled) {
  alignas(64) float u[kSubChunk];
  if (!sampled) std::fill(u, u + kSubChunk, 0.0f);
  int32_t kept = 0;  // a chunk holds at most kChunk elements
  const acc_t sign = h.maximize ? acc_t(-1) : acc_t(1);
  for (int64_t piece = begin; piece < end; piece += kSubChunk) {
    const int64_t n = std::min(end - piece, kSubChunk);
    prefetch_piece<false>(g + piece);  // as update_elements'
    prefetch_piece<true>(p + piece);
    prefetch_piece<true>(m + piece);
    prefetch_piece<true>(v + piece);
    if (kAmsgrad) prefetch_piece<true>(vmax + piece);
    if (sampled) fill_uniforms(h.key, piece / 4, (n + 3) / 4, u);
    const scalar_t* __restrict gc = g + piece;
    scalar_t* __restrict pc = p + piece;
    scalar_t* __restrict mc = m + piece;
    scalar_t* __restrict vc = v + piece;
    scalar_t* __restrict xc = kAmsgrad ? vmax + piece : nullptr;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t gv = static_cast<acc_t>(gc[i]) * sign;
      const acc_t q = unit_probability<kFixedQ>(h, mul_rn(gv, gv));
      const bool keep = keep_unit(u[i], q);
      kept += keep ? 1 : 0;
      acc_t pv = static_cast<acc_t>(pc[i]), mv = static_cast<acc_t>(mc[i]), vv = static_cast<acc_t>(vc[i]);
      acc_t xv = kAmsgrad ? static_cast<acc_t>(xc[i]) : acc_t(0);
      adamw_update(a, gv, keep, unit_weight(h, q), pv, mv, vv, xv);
      pc[i] = static_cast<scalar_t>(pv);
      mc[i] = static_cast<scalar_t>(mv);
      vc[i] = static_cast<scalar_t>(vv);
      if (kAmsgrad) xc[i] = static_cast<scalar_t>(xv);
    }
  }
  return kept;
}

// The AdamW step of one kept slice of n elements, unit weight w.
template <bool kAmsgrad, typename scalar_t, typename acc_t>
MASKED_OPTIM_CLONES void adamw_slice(const AdamHyper<acc_t> a, acc_t sign, acc_t w, const scalar_t* __restrict g,
                                     scalar_t* __restrict p, scalar_t* __restrict m, scalar_t* __restrict v,
                                     scalar_t* __restrict vmax, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    acc_t pv = static_cast<acc_t>(p[i]), mv = static_cast<acc_t>(m[i]), vv = static_cast<acc_t>(v[i]);
    acc_t xv = kAmsgrad ? static_cast<acc_t>(vmax[i]) : acc_t(0);
    adamw_update(a, static_cast<acc_t>(g[i]) * sign, true, w, pv, mv, vv, xv);
    p[i] = static_cast<scalar_t>(pv);
    m[i] = static_cast<scalar_t>(mv);
    v[i] = static_cast<scalar_t>(vv);
    if (kAmsgrad) vmax[i] = static_cast<scalar_t>(xv);
  }
}

// Channel granularity of a sampled step: units [ubegin, uend), `inner` contiguous elements each. The
// keep test and weight are per unit (as update_channels'); a slice that is not kept is not read.
template <bool kAmsgrad, typename scalar_t, typename acc_t>
int64_t adamw_channels(const Hyper<acc_t>& h, const AdamHyper<acc_t>& a, const scalar_t* g, scalar_t* p, scalar_t* m,
                       scalar_t* v, scalar_t* vmax, const acc_t* scores, int64_t inner, int64_t ubegin, int64_t uend,
                       const float* u) {
  int64_t kept = 0;
  const acc_t sign = h.maximize ? acc_t(-1) : acc_t(1);
  for (int64_t j = ubegin; j < uend; ++j) {
    const acc_t q = unit_probability(h, scores != nullptr ? scores[j] : acc_t(0));
    if (!keep_unit(u[j - ubegin], q)) continue;
    ++kept;
    const int64_t off = j * inner;
    adamw_slice<kAmsgrad, scalar_t, acc_t>(a, sign, unit_weight(h, q), g + off, p + off, m + off, v + off,
                                           kAmsgrad ? vmax + off : nullptr, inner);
  }
  return kept;
}

template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor> masked_adamw_impl(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                                                     at::Tensor& exp_avg_sq, at::Tensor& max_exp_avg_sq,
                                                     const c10::optional<at::Tensor>& scores_in,
                                                     const double* scalars_in, int64_t key,
                                                     double rate, double smoothing, int64_t max_iter, int64_t mode,
                                                     bool channel, double lr, double beta1, double beta2, double eps,
                                                     double weight_decay, double step, bool amsgrad, bool maximize) {
  const Units un = units_of(param, channel);
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  scalar_t* p = param.mutable_data_ptr<scalar_t>();
  scalar_t* m = exp_avg.mutable_data_ptr<scalar_t>();
  scalar_t* v = exp_avg_sq.mutable_data_ptr<scalar_t>();
  scalar_t* vmax = amsgrad ? max_exp_avg_sq.mutable_data_ptr<scalar_t>() : nullptr;

  // The mask's fields of Hyper (q, the keep test, the unit weight: 1/q when unbiased, else 1 for modes
  // 1..4; maximize); its SGD fields are unused. rate >= 1 samples nothing: every unit takes AdamW's step.
  const bool sampled = step_sampled(mode, rate, un.n_units);
  Hyper<acc_t> h = make_hyper<acc_t>(mode, sampled, rate, static_cast<uint64_t>(key), 0.0, 0.0, 0.0, 0.0, false,
                                     maximize, false);
  const AdamHyper<acc_t> a = make_adam_hyper<acc_t>(lr, beta1, beta2, eps, weight_decay, step, amsgrad, maximize);
  Stage1<acc_t> st;
  const acc_t* scores =
      mask_stage1<scalar_t, acc_t>(h, st, grad, scores_in, scalars_in, rate, smoothing, max_iter, mode, un.channel);

  int64_t kept = 0;
  if (!un.channel || !sampled) {
    kept = for_each_element_chunk(un.numel, [&](int64_t begin, int64_t end) -> int64_t {
      if (h.fixed_q) {
        return amsgrad ? adamw_elements<true, true, scalar_t, acc_t>(h, a, g, p, m, v, vmax, begin, end, sampled)
                       : adamw_elements<true, false, scalar_t, acc_t>(h, a, g, p, m, v, vmax, begin, end, sampled);
      }
      return amsgrad ? adamw_elements<false, true, scalar_t, acc_t>(h, a, g, p, m, v, vmax, begin, end, sampled)
                     : adamw_elements<false, false, scalar_t, acc_t>(h, a, g, p, m, v, vmax, begin, end, sampled);
    });
  } else {
    kept = for_each_unit_block(un.n_units, un.inner, h.key, [&](int64_t ubegin, int64_t uend, const float* u) -> int64_t {
      return amsgrad ? adamw_channels<true, scalar_t, acc_t>(h, a, g, p, m, v, vmax, scores, un.inner, ubegin, uend, u)
                     : adamw_channels<false, scalar_t, acc_t>(h, a, g, p, m, v, vmax, scores, un.inner, ubegin, uend, u);
    });
  }
  if (!sampled) kept = un.n_units;
  return step_outputs<acc_t>(param, kept, st.alpha, st.beta);
}

std::tuple<at::Tensor, at::Tensor> masked_adamw_cpu(at::Tensor& param, const at::Tensor& grad, at::Tensor& exp_avg,
                                                    at::Tensor& exp_avg_sq, at::Tensor& max_exp_avg_sq,
                                                    const c10::optional<at::Tensor>& scores,
                                                    const c10::optional<at::Tensor>& scalars, int64_t key, double rate,
                                                    double smoothing, int64_t max_iter, int64_t mode, bool channel,
                                                    double lr, double beta1, double beta2, double eps,
                                                    double weight_decay, double step, bool amsgrad, bool maximize) {
  TORCH_CHECK(mode >= kUniform && mode <= kAmssPlus,
              "masked_adamw_: mode must be in 1..4 (uniform, uniform unbiased, amss, amss+; the dense and scale "
              "steps are torch.optim.AdamW's own), got ", mode);
  check_step_inputs("masked_adamw_", param, grad, scores, scalars, key, rate, channel);
  auto check_state = [&](const at::Tensor& t, const char* name, const char* when) {
    TORCH_CHECK(t.device() == param.device() && t.scalar_type() == param.scalar_type() && t.sizes() == param.sizes() &&
                    t.is_contiguous(),
                "masked_adamw_: ", name, " must be a contiguous tensor like param", when, "; got ", t.device(), " ",
                t.scalar_type(), " ", t.sizes(), t.is_contiguous() ? "" : " (not contiguous)", " for param ",
                param.device(), " ", param.scalar_type(), " ", param.sizes());
  };
  check_state(exp_avg, "exp_avg", "");
  check_state(exp_avg_sq, "exp_avg_sq", "");
  if (amsgrad) check_state(max_exp_avg_sq, "max_exp_avg_sq", " when amsgrad");
  TORCH_CHECK(beta1 >= 0 && beta1 < 1, "masked_adamw_: beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 < 1, "masked_adamw_: beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK(step >= 1, "masked_adamw_: step must be >= 1 (the tensor's step count after this step's increment), got ",
              step);
  std::tuple<at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "masked_adamw_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const GivenScalars given(scalars);
    out = masked_adamw_impl<scalar_t, acc_t>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, scores, given.get(), key,
                                             rate, smoothing, max_iter, mode, channel, lr, beta1, beta2, eps,
                                             weight_decay, step, amsgrad, maximize);
  });
  return out;
}

// Stage 1 of one contiguous gradient, as tensor_scalars returns it: [alpha, beta] ([0, 1] for scale or
// nothing sampled), the unit scores (sampled channel granularity) and the sum of g^2 (always computed).
template <typename scalar_t, typename acc_t>
Stage1<acc_t> scalars_and_sumsq(const at::Tensor& grad, double rate, double smoothing, int64_t max_iter, int64_t mode,
                                bool channel) {
  const int64_t numel = grad.numel();
  const int64_t n_units = per_slice(grad, channel) ? grad.size(0) : numel;
  Stage1<acc_t> st{0, 1, at::Tensor(), std::numeric_limits<double>::quiet_NaN()};  // NaN: sum g^2 below
  if (mode != kScale && rate < 1.0 && n_units > 0) {
    st = stage1<scalar_t, acc_t>(grad, c10::nullopt, nullptr, rate, smoothing, max_iter, mode, channel);
  }
  if (std::isnan(st.sumsq)) {
    if (st.scores.defined()) {
      st.sumsq = st.scores.sum().template item<double>();
    } else {
      const scalar_t* g = grad.const_data_ptr<scalar_t>();
      const int nthreads = at::get_num_threads();
      Partials part(nthreads);
      at::parallel_for(0, numel, kGrain, [&](int64_t i0, int64_t i1) {
        const int t = at::get_thread_num();
        for (int64_t c = i0; c < i1; c += kChunk) {
          square_sum_max<scalar_t, acc_t>(g, c, std::min(i1, c + kChunk), &part.sum[t], &part.max[t]);
        }
      });
      st.sumsq = part.sum.total();
    }
  }
  return st;
}

void check_scalars_args(const char* op, double rate, int64_t mode) {
  TORCH_CHECK(mode_valid(mode) && mode != kDense, op, ": mode must be in 1..5, got ", mode);
  TORCH_CHECK(rate > 0 && rate <= 1, op, ": rate must be in (0, 1], got ", rate);
}

// Stage 1 alone: ([alpha, beta], unit scores or an empty tensor, sum of g^2 as a float64 scalar).
// Mode 5 (scale) has no stage 1: [0, 1], no scores, and the sum of g^2 from one reduction pass.
// The optimizer runs it for every tensor first: a non-finite sum flags a non-finite gradient before
// anything is updated, without a separate pass over the gradients; then it passes the scalars (and
// scores) to masked_sgd_, which skips its own stage 1.
std::tuple<at::Tensor, at::Tensor, at::Tensor> tensor_scalars_cpu(const at::Tensor& grad_in, double rate,
                                                                   double smoothing, int64_t max_iter, int64_t mode,
                                                                   bool channel) {
  TORCH_CHECK(grad_in.device().is_cpu(), "tensor_scalars: grad must be a CPU tensor, got ", grad_in.device());
  check_scalars_args("tensor_scalars", rate, mode);
  const at::Tensor grad = grad_in.contiguous();
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "tensor_scalars_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
    const Stage1<acc_t> st = scalars_and_sumsq<scalar_t, acc_t>(grad, rate, smoothing, max_iter, mode, channel);
    at::Tensor scalars = at::empty({2}, grad.options().dtype(acc_type));
    scalars.mutable_data_ptr<acc_t>()[0] = st.alpha;
    scalars.mutable_data_ptr<acc_t>()[1] = st.beta;
    at::Tensor scores = st.scores.defined() ? st.scores : at::empty({0}, grad.options().dtype(acc_type));
    out = {scalars, scores, at::scalar_tensor(st.sumsq, grad.options().dtype(at::kDouble))};
  });
  return out;
}

// ---- The multi-tensor ops: one call for a list of tensors (one param group), as torch._foreach_*.
// Each tensor runs the loops of the one-tensor op (scheduled by for_each_tensor). What they save is
// the per-tensor cost outside the loops: a Python call, a dispatch and the output tensors per tensor
// and op (at 10M parameters in 15 tensors, the step with one-tensor ops ran ~1.3 ms above the sum
// of its ops on the Intel VM, the interpreter's data evicted from cache by each tensor's passes).

// fn(i) for every tensor i of a list of `sizes` (elements): each tensor on one thread, the threads taking
// the largest tensors first, when that keeps the threads within 5% of an even share (the serial parts
// of one tensor's stage 1 then overlap the other threads' passes, and no tensor waits at a fork or a
// join); else one tensor after the other, each over every thread (a group of a few large tensors).
// Either way a tensor's results are those of its one-tensor op at that op's thread count (1 or all).
template <typename Fn>
void for_each_tensor(const std::vector<int64_t>& sizes, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(sizes.size());
  const int nthreads = at::get_num_threads();
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  bool whole = n > 1 && nthreads > 1 && !at::in_parallel_region();
  if (whole) {
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return sizes[a] > sizes[b]; });
    std::vector<int64_t> load(nthreads, 0);  // the largest first, each on the least loaded thread
    for (int64_t i : order) *std::min_element(load.begin(), load.end()) += sizes[i];
    const int64_t total = std::accumulate(load.begin(), load.end(), int64_t{0});
    whole = static_cast<double>(*std::max_element(load.begin(), load.end())) <= 1.05 * total / nthreads;
  }
  if (!whole) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  const at::ThreadLocalState state;  // the caller's (grad mode, dispatch keys) for the ATen calls in fn
  at::parallel_for(0, nthreads, 1, [&](int64_t, int64_t) {
    at::ThreadLocalStateGuard guard(state);
    for (int64_t k = next.fetch_add(1); k < n; k = next.fetch_add(1)) fn(order[k]);
  });
}

// tensor_scalars of every gradient: ([n, 2] float64 [alpha, beta] per tensor (exact in every compute
// dtype), the unit scores of each (empty unless sampled channel granularity), [n] float64 sums of g^2).
std::tuple<at::Tensor, std::vector<at::Tensor>, at::Tensor> tensor_scalars_multi_cpu(at::TensorList grads, double rate,
                                                                                      double smoothing, int64_t max_iter,
                                                                                      int64_t mode, bool channel) {
  check_scalars_args("tensor_scalars_multi", rate, mode);
  const int64_t n = static_cast<int64_t>(grads.size());
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  at::Tensor scalars = at::empty({n, 2}, f64);
  at::Tensor sumsq = at::empty({n}, f64);
  double* sc = scalars.mutable_data_ptr<double>();
  double* sq = sumsq.mutable_data_ptr<double>();
  std::vector<at::Tensor> scores(n), contiguous(n);
  std::vector<int64_t> sizes(n);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(grads[i].device().is_cpu(), "tensor_scalars_multi: grads[", i, "] must be a CPU tensor, got ",
                grads[i].device());
    contiguous[i] = grads[i].contiguous();
    sizes[i] = grads[i].numel();
  }
  for_each_tensor(sizes, [&](int64_t i) {
    const at::Tensor& grad = contiguous[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "tensor_scalars_multi_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      const Stage1<acc_t> st = scalars_and_sumsq<scalar_t, acc_t>(grad, rate, smoothing, max_iter, mode, channel);
      sc[2 * i] = static_cast<double>(st.alpha);
      sc[2 * i + 1] = static_cast<double>(st.beta);
      sq[i] = st.sumsq;
      scores[i] = st.scores.defined() ? st.scores
                                      : at::empty({0}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    });
  });
  return {scalars, scores, sumsq};
}

// masked_sgd_ of every tensor of a list, with the shared hyper-parameters; scalars: none, or [n, 2]
// ([alpha, beta] per tensor, e.g. tensor_scalars_multi's); first_steps: one flag per tensor. Returns
// the [n] int64 kept-unit counts. Every tensor is checked before any is updated.
at::Tensor masked_sgd_multi_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs,
                                const c10::List<c10::optional<at::Tensor>>& scores,
                                const c10::optional<at::Tensor>& scalars, at::IntArrayRef keys, double rate,
                                double smoothing, int64_t max_iter, int64_t mode, bool channel, double lr,
                                double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                                const c10::List<bool>& first_steps) {
  constexpr const char* op = "masked_sgd_multi_";
  TORCH_CHECK(mode_valid(mode), op, ": mode must be in 0..5 (dense, uniform, uniform unbiased, amss, amss+, scale), got ",
              mode);
  const int64_t n = static_cast<int64_t>(params.size());
  auto check_len = [&](const char* name, int64_t len) {
    TORCH_CHECK(len == n, op, ": ", name, " must have one entry per param (", n, "), got ", len);
  };
  check_len("grads", static_cast<int64_t>(grads.size()));
  check_len("momentum_buffers", static_cast<int64_t>(bufs.size()));
  check_len("scores", static_cast<int64_t>(scores.size()));
  check_len("keys", static_cast<int64_t>(keys.size()));
  check_len("first_steps", static_cast<int64_t>(first_steps.size()));
  at::Tensor given;
  if (scalars.has_value()) {
    TORCH_CHECK(scalars->dim() == 2 && scalars->size(0) == n && scalars->size(1) == 2, op,
                ": scalars must be [n, 2] ([alpha, beta] per param, n = ", n, "), got ", scalars->sizes());
    given = scalars->to(at::kCPU, at::kDouble).contiguous();
  }
  std::vector<c10::optional<at::Tensor>> score(n);
  for (int64_t i = 0; i < n; ++i) {
    score[i] = scores.get(i);
    const c10::optional<at::Tensor> no_scalars;  // checked above, as a whole
    check_step_inputs(op, params[i], grads[i], score[i], no_scalars, keys[i], rate, channel);
    if (momentum != 0) {
      const at::Tensor& b = bufs[i];
      TORCH_CHECK(b.scalar_type() == params[i].scalar_type() && b.sizes() == params[i].sizes() && b.is_contiguous() &&
                      b.device() == params[i].device(),
                  op, ": momentum_buffers[", i, "] must be a contiguous tensor like params[", i,
                  "] when momentum != 0; got ", b.scalar_type(), " ", b.sizes());
    }
  }
  at::Tensor kept = at::empty({n}, at::TensorOptions().dtype(at::kLong));
  int64_t* k = kept.mutable_data_ptr<int64_t>();
  const double* sc = given.defined() ? given.const_data_ptr<double>() : nullptr;
  std::vector<int64_t> sizes(n);
  for (int64_t i = 0; i < n; ++i) sizes[i] = params[i].numel();
  for_each_tensor(sizes, [&](int64_t i) {
    at::Tensor p = params[i], b = bufs[i];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.scalar_type(), "masked_sgd_multi_cpu", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      Stage1<acc_t> st;
      k[i] = masked_sgd_impl<scalar_t, acc_t>(p, grads[i], b, score[i], sc != nullptr ? sc + 2 * i : nullptr, keys[i],
                                              rate, smoothing, max_iter, mode, channel, lr, momentum, dampening,
                                              weight_decay, nesterov, maximize, first_steps.get(i), st);
    });
  });
  return kept;
}

// The uniforms of units 0 .. n-1 under key, through the same code path as the fused step.
void philox_uniform_cpu(at::Tensor& out, int64_t key) {
  TORCH_CHECK(out.scalar_type() == at::kFloat, "philox_uniform_: out must be float32, got ", out.scalar_type());
  TORCH_CHECK(out.is_contiguous(), "philox_uniform_: out must be contiguous");
  TORCH_CHECK(key >= 0, "philox_uniform_: key must be >= 0, got ", key);
  const int64_t n = out.numel();
  float* data = out.mutable_data_ptr<float>();
  at::parallel_for(0, (n + kChunk - 1) / kChunk, kGrainChunks, [&](int64_t c0, int64_t c1) {
    alignas(64) float u[kChunk];
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t begin = c * kChunk;
      const int64_t len = std::min(n - begin, kChunk);
      fill_uniforms(static_cast<uint64_t>(key), begin / 4, (len + 3) / 4, u);
      std::copy(u, u + len, data + begin);
    }
  });
}

}  // namespace

// The hand-written CPU path in use (build_info, csrc/module.cpp).
const char* cpu_kernel_isa() {
  switch (kIsa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "generic";
  }
}

// The low words of the AVX-512 Philox products in use (build_info): "mullo" or "shuffle".
const char* cpu_philox_low() { return kLowByShuffle ? "shuffle" : "mullo"; }

// The software prefetch distance in use, in bytes (build_info).
int64_t cpu_prefetch_bytes() { return kPrefetch; }

TORCH_LIBRARY_IMPL(masked_optim, CPU, m) {
  m.impl("masked_sgd_", &masked_sgd_cpu);
  m.impl("masked_adamw_", &masked_adamw_cpu);
  m.impl("philox_uniform_", &philox_uniform_cpu);
  m.impl("tensor_scalars", &tensor_scalars_cpu);
  m.impl("tensor_scalars_multi", &tensor_scalars_multi_cpu);
  m.impl("masked_sgd_multi_", &masked_sgd_multi_cpu);
}

}  // namespace masked_optim
