// The CUDA implementations of fastattn::fwd and fastattn::bwd, registered for the CUDA dispatch key
// so that backend="cpp" serves CUDA tensors: argument checks (the Python layer's messages, from
// attention_api.cpp), a compute-capability check, the device guard and the current stream, then
// the shared glue (attention_glue.h) that allocates outputs and launches the kernels.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "attention_api.h"
#include "cuda/attention_glue.h"

namespace fastattn::cuda {
namespace {

// The kernels use sm_80 instructions (cp.async, ldmatrix, bf16 mma); older GPUs get a clear error.
void check_device(const at::Tensor& q) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()));
  TORCH_CHECK(major >= 8, "fastattn: the CUDA kernels need compute capability 8.0 or newer (Ampere, Hopper), but ",
              q.device(), " has ", major, ".", minor);
}

std::tuple<at::Tensor, at::Tensor> attention_forward_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v,
                                                          const std::optional<at::Tensor>& key_padding_mask,
                                                          double scale, int64_t window_left, int64_t window_right) {
  check_forward_inputs(q, k, v, key_padding_mask, scale, window_left, window_right);
  element_type(q.scalar_type());  // float64 is a TypeError naming the dtypes, before any device work
  check_device(q);
  const c10::cuda::CUDAGuard device_guard(q.device());
  return run_forward(q, k, v, key_padding_mask, scale, window_left, window_right,
                     c10::cuda::getCurrentCUDAStream());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask, double scale, int64_t window_left,
    int64_t window_right) {
  check_backward_inputs(dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right);
  element_type(q.scalar_type());
  check_device(q);
  const c10::cuda::CUDAGuard device_guard(q.device());
  return run_backward(dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right,
                      c10::cuda::getCurrentCUDAStream());
}

}  // namespace
}  // namespace fastattn::cuda

TORCH_LIBRARY_IMPL(fastattn, CUDA, m) {
  m.impl("fwd", &fastattn::cuda::attention_forward_cuda);
  m.impl("bwd", &fastattn::cuda::attention_backward_cuda);
}
