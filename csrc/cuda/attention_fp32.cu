// fastattn::fwd and fastattn::bwd on CUDA for float32: launches the CUDA-core kernels
// (fp32_kernels.cuh) for the problem's head-dim bucket: forward; backward as pre-pass, dk/dv, dq.
#include "cuda/fp32_kernels.cuh"
#include "cuda/launch_utils.h"

namespace fastattn::cuda {

void launch_forward_fp32(const AttentionParams& p, cudaStream_t stream) {
  with_head_dim_bucket(p, [&](auto head_dim) {
    constexpr int HD = decltype(head_dim)::value;
    using Config = fp32::Config<HD>;
    launch_kernel(fp32::attention_forward_fp32_kernel<HD>,
                  QueryBlock::count(p, fp32::kWarps * Config::kForwardRowsPerWarp), fp32::kThreads,
                  Config::kForwardSharedBytes, stream, p);
  });
}

void launch_backward_fp32(const AttentionParams& p, const BackwardScratch& scratch, cudaStream_t stream) {
  with_head_dim_bucket(p, [&](auto head_dim) {
    constexpr int HD = decltype(head_dim)::value;
    using Config = fp32::Config<HD>;
    constexpr int kBlock = fp32::kWarps * Config::kBackwardRowsPerWarp;  // keys of dk/dv, rows of dq
    launch_kernel(fp32::attention_backward_prepass_fp32_kernel, ceil_div(p.batch * p.heads_q * p.seqlen_q, fp32::kThreads),
                  fp32::kThreads, 0, stream, p, scratch);
    launch_kernel(fp32::attention_backward_dkdv_fp32_kernel<HD>, KeyBlock::count(p, kBlock, 1), fp32::kThreads,
                  Config::kBackwardSharedBytes, stream, p, scratch);
    launch_kernel(fp32::attention_backward_dq_fp32_kernel<HD>, QueryBlock::count(p, kBlock), fp32::kThreads,
                  Config::kBackwardSharedBytes, stream, p, scratch);
  });
}

}  // namespace fastattn::cuda
