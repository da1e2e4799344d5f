// launch_kernel() of csrc/cuda/launch_utils.h for the CPU emulation (FASTATTN_CUDA_EMULATION,
// tests only): runs every CTA of the grid on emulated threads (emulator.cpp), one CTA at a time,
// after the checks a GPU launch would make.
#pragma once

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <functional>

namespace fastattn::cuda {

namespace emulation {

// The smallest opt-in shared-memory limit of the GPUs that run the sm_80 code (sm_86 / sm_89):
// every kernel shape promises to fit in it.
constexpr int kSharedMemoryLimit = 101376;

void run_grid(int64_t blocks, int threads, int shared_bytes, const std::function<void()>& kernel_body);

}  // namespace emulation

template <typename Kernel, typename... Args>
inline void launch_kernel(Kernel kernel, int64_t blocks, int threads, int shared_bytes, cudaStream_t,
                          const Args&... args) {
  if (blocks == 0) return;
  TORCH_CHECK(shared_bytes <= emulation::kSharedMemoryLimit, "fastattn emulation: a kernel asks for ", shared_bytes,
              " bytes of shared memory, more than the ", emulation::kSharedMemoryLimit, " every target GPU allows");
  TORCH_CHECK(threads % 32 == 0 && threads <= 1024, "fastattn emulation: bad block size ", threads);
  emulation::run_grid(blocks, threads, shared_bytes, [&] { kernel(args...); });
}

}  // namespace fastattn::cuda
