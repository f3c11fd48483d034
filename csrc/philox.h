// Philox4x32-10 and Triton's word-to-uniform map, shared by the CPU and CUDA kernels (docs/algorithm.md §4).
// Plain C++: no torch headers, so .cu files can include it and compile with nvcc alone.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define MASKED_OPTIM_HD __host__ __device__ __forceinline__
#else
#define MASKED_OPTIM_HD inline
#endif

namespace masked_optim {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
// Largest float32 with (2^31 - 1) * scale < 1 after rounding: uniforms lie in [0, 1).
constexpr float kUniformScale = 4.6566127342e-10f;

struct Philox4x32 {
  uint32_t v[4];
};

MASKED_OPTIM_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                         uint32_t k1) {
#if defined(__CUDACC__) || defined(__HIPCC__)
#pragma unroll
#elif defined(__GNUC__)
#pragma GCC unroll 10
#endif
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  return Philox4x32{{c0, c1, c2, c3}};
}

// Unit j of a tensor: word j % 4 of the block at counter j / 4, key (lo, hi) of the 64-bit key.
MASKED_OPTIM_HD Philox4x32 philox_block(uint64_t key, uint64_t counter) {
  return philox4x32_10(static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32), 0u, 0u,
                       static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
}

// Triton's uint_to_uniform_float: reinterpret as int32, fold negatives with ~x, scale in float32.
MASKED_OPTIM_HD float uint32_to_uniform(uint32_t x) {
  const int32_t s = static_cast<int32_t>(x);
  const int32_t folded = s < 0 ? ~s : s;
  return static_cast<float>(folded) * kUniformScale;
}

}  // namespace masked_optim
