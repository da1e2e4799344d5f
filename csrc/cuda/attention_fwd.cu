// fastattn::fwd on CUDA for fp16 / bf16: launches the tensor-core forward kernel
// (forward_kernel.cuh) with the tile shape of the problem's head-dim bucket.
//
// Registers, spills and shared memory of every instantiation are recorded in docs/cuda.md
// (python benchmarks/cuda_resources.py reads them from the built library).
#include "cuda/forward_kernel.cuh"
#include "cuda/launch_utils.h"

namespace fastattn::cuda {

void launch_forward_tensor_core(const AttentionParams& p, ElementType type, bool vectorized, cudaStream_t stream) {
  TORCH_CHECK(type != ElementType::kFloat, "fastattn: the tensor-core forward takes fp16 or bf16");
  with_half_type(type, [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    with_head_dim_bucket(p, [&](auto head_dim) {
      using Config = ForwardConfig<decltype(head_dim)::value>;
      launch_kernel(attention_forward_kernel<T, decltype(head_dim)::value>, QueryBlock::count(p, Config::kBlockRows),
                    Config::kThreads, Config::kSharedBytes, stream, p, vectorized);
    });
  });
}

}  // namespace fastattn::cuda
