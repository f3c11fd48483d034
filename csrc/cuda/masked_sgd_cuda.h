// CUDA kernels of masked_optim::masked_sgd_ (the masked SGD step of one tensor, docs/algorithm.md §2 and §4)
// and masked_optim::masked_adamw_ (the lazy AdamW step, §2.8).
// Plain C++ launchers on raw device pointers: no torch headers, so the .cu compiles with nvcc alone.
// The torch binding (masked_sgd_cuda_binding.cpp) validates the tensors, allocates outputs and
// workspaces and calls these on the current stream. No launcher synchronises with the host.
//
// Dtypes: the param/grad/buffer dtype is one of DType; the compute ("acc") dtype is float64 for
// kFloat64 and float32 otherwise. Every pointer documented "acc" points to compute-dtype values.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../masked_sgd_math.h"  // Mode, Hyper and the math of one element

namespace masked_optim {
namespace cuda {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline size_t acc_size(DType dtype) { return dtype == DType::kFloat64 ? sizeof(double) : sizeof(float); }

// Threads per block of the reductions, and the most blocks a reduction uses. The reduction grid is
// a function of the number of units only (never of the device), so stage-1 scalars are
// bit-reproducible run to run and across data-parallel ranks.
constexpr int kReduceThreads = 256;
constexpr int kMaxReduceBlocks = 1024;

// Bytes of device workspace that launch_inclusion_scalars (and its parts) need; 16-byte aligned
// memory (any torch allocation) of at least this size.
size_t inclusion_workspace_bytes(DType dtype);

// Channel importance: scores[j] = sum over the `inner` elements of unit j of g*g (acc, n_units).
cudaError_t launch_channel_scores(DType dtype, const void* grad, int64_t n_units, int64_t inner, void* scores,
                                  cudaStream_t stream);

// Stage 1 (modes amss/amss+), in pieces. The unit scores come from `scores` (acc, n_units) when it is
// not null, else from the gradient as g*g per element (element granularity: n_units == numel).
//  * launch_score_stats: sum S and max of the scores, the shortcut test, and the initial state
//    (c = rate * n_units) in the workspace; zero-fills nothing else.
//  * launch_waterfill_round: one water-filling round (count of saturated units, sum of the
//    unsaturated pt, then c <- (budget - count) / rest), a no-op once nothing changes any more.
//  * launch_finalize_scalars: out_scalars (acc, 2) = [alpha, beta] from the state.
//  * launch_inclusion_scalars: all of the above, max_iter rounds.
cudaError_t launch_score_stats(DType dtype, const void* grad, const void* scores, int64_t n_units, double rate,
                               double smoothing, void* workspace, cudaStream_t stream);
cudaError_t launch_waterfill_round(DType dtype, const void* grad, const void* scores, int64_t n_units, double rate,
                                   double smoothing, void* workspace, cudaStream_t stream);
cudaError_t launch_finalize_scalars(DType dtype, int64_t n_units, double smoothing, const void* workspace,
                                    void* out_scalars, cudaStream_t stream);
cudaError_t launch_inclusion_scalars(DType dtype, const void* grad, const void* scores, int64_t n_units, double rate,
                                     double smoothing, int64_t max_iter, void* workspace, void* out_scalars,
                                     cudaStream_t stream);

// out_scalars (acc, 2) = [alpha, beta], with a tiny kernel (no host-to-device copy).
cudaError_t launch_fill_scalars(DType dtype, double alpha, double beta, void* out_scalars, cudaStream_t stream);

// Stage 2: the fused sample-and-update pass.
struct MaskedSgdArgs {
  DType dtype = DType::kFloat32;
  void* param = nullptr;            // numel values of dtype, updated in place
  const void* grad = nullptr;       // numel values of dtype
  void* momentum_buffer = nullptr;  // numel values of dtype; used only when momentum != 0
  const void* scores = nullptr;     // acc, n_units: channel granularity with modes amss/amss+
  const void* scalars = nullptr;    // acc, [alpha, beta] (device): modes amss/amss+
  void* unit_factor = nullptr;      // acc, n_units workspace: channel granularity when sampled
  unsigned long long* kept = nullptr;  // device counter, zeroed by the caller; incremented when sampled
  int64_t numel = 0;
  int64_t n_units = 0;
  int64_t inner = 1;  // numel / n_units
  uint64_t key = 0;
  double rate = 1.0;
  int64_t mode = kDense;  // a masked_optim::Mode
  bool channel = false;
  bool sampled = false;  // false: plain SGD (g~ = g, or rate * g in mode scale), the counter is left alone
  double lr = 0.0, momentum = 0.0, dampening = 0.0, weight_decay = 0.0;
  bool nesterov = false, maximize = false, first_step = false;
};

cudaError_t launch_masked_sgd_update(const MaskedSgdArgs& args, cudaStream_t stream);

// The lazy AdamW step (masked_optim::masked_adamw_, docs/algorithm.md §2.8): stage 1 is the SGD step's
// (the launchers above, same scores and [alpha, beta]); this is stage 2. The mask is the SGD step's
// for the same key, mode, rate and granularity (element: the same fused Philox sample; channel: the same
// channel_sample_kernel factors). Kept units take adamw_update (masked_sgd_math.h), the others are
// left as they are.
struct MaskedAdamwArgs {
  DType dtype = DType::kFloat32;
  void* param = nullptr;           // numel values of dtype, updated in place
  const void* grad = nullptr;      // numel values of dtype
  void* exp_avg = nullptr;         // numel values of dtype, updated in place
  void* exp_avg_sq = nullptr;      // numel values of dtype, updated in place
  void* max_exp_avg_sq = nullptr;  // numel values of dtype, updated in place; used only when amsgrad
  const void* scores = nullptr;    // acc, n_units: channel granularity with modes amss/amss+
  const void* scalars = nullptr;   // acc, [alpha, beta] (device): modes amss/amss+
  void* unit_factor = nullptr;     // acc, n_units workspace: channel granularity when sampled
  unsigned long long* kept = nullptr;  // device counter, zeroed by the caller; incremented when sampled
  int64_t numel = 0;
  int64_t n_units = 0;
  int64_t inner = 1;  // numel / n_units
  uint64_t key = 0;
  double rate = 1.0;
  int64_t mode = kAmssPlus;  // a masked_optim::Mode in 1..4
  bool channel = false;
  bool sampled = false;  // false: every unit takes the AdamW step with weight 1, the counter is left alone
  double lr = 0.0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.0;
  double step = 1.0;  // the tensor's step count after this step's increment
  bool amsgrad = false, maximize = false;
};

cudaError_t launch_masked_adamw_update(const MaskedAdamwArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace masked_optim
