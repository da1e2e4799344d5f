// The interface between the host side of the CUDA ops (attention_cuda.cpp: checks, allocation,
// dispatch registration) and the kernels (*.cu). No ATen types appear here, so the .cu files
// compile without the ATen headers and stay quick to build.
//
// Every launch_* function launches on `stream` (the caller's current stream, under its device
// guard), checks each launch with C10_CUDA_KERNEL_LAUNCH_CHECK() and launches nothing for an
// empty problem.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <type_traits>

#include "attention_params.h"

namespace fastattn::cuda {

enum class ElementType { kHalf, kBFloat16, kFloat };

// One float per query row, (B, Hq, Nq) contiguous, written by the backward's pre-pass (the first
// kernel each launch_backward_* function launches).
struct BackwardScratch {
  float* delta = nullptr;     // rowsum(dout * out)
  float* lse_log2 = nullptr;  // lse * log2(e); +inf for rows that saw no key, so that their P is 0
};

// The head-dim bucket a problem is compiled for: the smallest of 64, 128, 256 that holds both
// D and Dv. Smaller dims are zero-padded inside the kernels (the padding adds 0 to every dot
// product and is never stored).
inline int head_dim_bucket(int64_t head_dim, int64_t head_dim_v) {
  const int64_t widest = head_dim > head_dim_v ? head_dim : head_dim_v;
  return widest <= 64 ? 64 : widest <= 128 ? 128 : 256;
}

// Calls f(std::integral_constant<int, HD>) for the head-dim bucket HD of p.
template <typename F>
inline void with_head_dim_bucket(const AttentionParams& p, F&& f) {
  switch (head_dim_bucket(p.head_dim, p.head_dim_v)) {
    case 64:
      return f(std::integral_constant<int, 64>{});
    case 128:
      return f(std::integral_constant<int, 128>{});
    default:
      return f(std::integral_constant<int, 256>{});
  }
}

// fp16 / bf16 on tensor cores (mma.sync m16n8k16). `vectorized`: every row of q, k, v, out (and
// dout, dq, dk, dv) starts on a 16-byte boundary and D, Dv are multiples of 8, so tiles move by
// 16-byte cp.async; otherwise element by element.
void launch_forward_tensor_core(const AttentionParams& p, ElementType type, bool vectorized,
                                cudaStream_t stream);
void launch_backward_tensor_core(const AttentionParams& p, const BackwardScratch& scratch,
                                 ElementType type, bool vectorized, cudaStream_t stream);

// float32 on the CUDA cores (exact fp32 products, no TF32).
void launch_forward_fp32(const AttentionParams& p, cudaStream_t stream);
void launch_backward_fp32(const AttentionParams& p, const BackwardScratch& scratch, cudaStream_t stream);

}  // namespace fastattn::cuda
