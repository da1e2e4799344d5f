// fastattn::bwd on CUDA for fp16 / bf16: launches the tensor-core pre-pass, dk/dv and dq kernels
// (backward_kernels.cuh) with the tile shapes of the head-dim bucket.
//
// Registers, spills and shared memory of every instantiation are recorded in docs/cuda.md
// (python benchmarks/cuda_resources.py reads them from the built library).
#include "cuda/backward_kernels.cuh"
#include "cuda/launch_utils.h"

namespace fastattn::cuda {

void launch_backward_tensor_core(const AttentionParams& p, const BackwardScratch& scratch, ElementType type,
                                 bool vectorized, cudaStream_t stream) {
  TORCH_CHECK(type != ElementType::kFloat, "fastattn: the tensor-core backward takes fp16 or bf16");
  with_half_type(type, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    with_head_dim_bucket(p, [&](auto head_dim) {
      constexpr int HD = decltype(head_dim)::value;
      using DkDv = DkDvConfig<HD>;
      using Dq = DqConfig<HD>;
      launch_kernel(attention_backward_prepass_kernel<T, HD>, QueryBlock::count(p, PrepassConfig::kBlockRows),
                    PrepassConfig::kThreads, PrepassConfig::shared_bytes<HD>(), stream, p, scratch, vectorized);
      launch_kernel(attention_backward_dkdv_kernel<T, HD>, KeyBlock::count(p, DkDv::kBlockKeys, DkDv::kChunks),
                    DkDv::kThreads, DkDv::kSharedBytes, stream, p, scratch, vectorized);
      launch_kernel(attention_backward_dq_kernel<T, HD>, QueryBlock::count(p, Dq::kBlockRows), Dq::kThreads,
                    Dq::kSharedBytes, stream, p, scratch, vectorized);
    });
  });
}

}  // namespace fastattn::cuda
