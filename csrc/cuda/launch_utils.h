// Host-side launch of a fastattn CUDA kernel: launch_kernel(kernel, blocks, threads, shared bytes,
// stream, args...) checks the grid and the device's shared-memory limit, raises the kernel's
// dynamic shared-memory limit when it needs more than 48 KiB, launches on `stream` and checks the
// launch (C10_CUDA_KERNEL_LAUNCH_CHECK). An empty grid launches nothing.
//
// Under FASTATTN_CUDA_EMULATION (tests only) the same call runs the kernel on the CPU instead.
#pragma once

#include <cstdint>
#include <limits>

#if defined(FASTATTN_CUDA_EMULATION)
#include "cuda/emulation/emulated_launch.h"
#else

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace fastattn::cuda {

template <typename Kernel>
inline void prepare_shared_memory(Kernel kernel, int bytes) {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  TORCH_CHECK(bytes <= limit, "fastattn: this CUDA kernel needs ", bytes,
              " bytes of shared memory per block, but device ", device, " allows ", limit);
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

template <typename Kernel, typename... Args>
inline void launch_kernel(Kernel kernel, int64_t blocks, int threads, int shared_bytes, cudaStream_t stream,
                          const Args&... args) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), "fastattn: the problem needs ", blocks,
              " CUDA blocks, more than one launch allows; split the batch");
  prepare_shared_memory(kernel, shared_bytes);
  kernel<<<static_cast<unsigned>(blocks), threads, shared_bytes, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fastattn::cuda

#endif  // FASTATTN_CUDA_EMULATION
