// Host glue of the CUDA ops, shared by attention_cuda.cpp (the fastattn::fwd / fastattn::bwd CUDA
// implementations) and the CPU emulation harness of the tests (csrc/cuda/emulation/): output
// allocation in the caller's layout, AttentionParams, the backward's scratch buffers, and the
// choice of kernel family by dtype. Inputs must already have passed check_forward_inputs /
// check_backward_inputs (attention_api.h).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>
#include <tuple>

#include "attention_api.h"
#include "cuda/launch.h"

namespace fastattn::cuda {

inline ElementType element_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return ElementType::kHalf;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    case at::kFloat:
      return ElementType::kFloat;
    default:
      TORCH_CHECK_TYPE(false, "fastattn: on CUDA, q, k and v must be float16, bfloat16 or float32, got ", dtype);
  }
}

// True when every row of every tensor starts on a 16-byte boundary and rows are whole 16-byte
// chunks, so the kernels may copy tiles 16 bytes at a time (asked only for 2-byte dtypes).
inline bool rows_are_16_byte_aligned(std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors) {
    const int64_t elements_per_chunk = 16 / t->element_size();
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0 || t->size(3) % elements_per_chunk != 0) return false;
    for (int dim = 0; dim < 3; ++dim) {
      if (t->size(dim) > 1 && t->stride(dim) % elements_per_chunk != 0) return false;
    }
  }
  return true;
}

inline std::tuple<at::Tensor, at::Tensor> run_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const std::optional<at::Tensor>& key_padding_mask, double scale,
                                                      int64_t window_left, int64_t window_right,
                                                      cudaStream_t stream) {
  const ElementType type = element_type(q.scalar_type());
  at::Tensor out = empty_in_layout_of(q, v.size(3));
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(lse_dtype(q.scalar_type())));
  if (out.numel() == 0) return {out, lse};
  const AttentionParams params =
      make_forward_params(q, k, v, key_padding_mask, out, lse, scale, window_left, window_right);
  if (type == ElementType::kFloat) {
    launch_forward_fp32(params, stream);
  } else {
    launch_forward_tensor_core(params, type, rows_are_16_byte_aligned({&q, &k, &v, &out}), stream);
  }
  return {out, lse};
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> run_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask, double scale, int64_t window_left,
    int64_t window_right, cudaStream_t stream) {
  const ElementType type = element_type(q.scalar_type());
  at::Tensor dq = empty_in_layout_of(q, q.size(3));
  at::Tensor dk = empty_in_layout_of(k, k.size(3));
  at::Tensor dv = empty_in_layout_of(v, v.size(3));
  if (dq.numel() == 0 && dk.numel() == 0) return {dq, dk, dv};
  // The kernels index lse as a contiguous (B, Hq, Nq) array.
  const at::Tensor lse_rows = lse.contiguous();
  const AttentionParams params = make_backward_params(dout, q, k, v, out, lse_rows, key_padding_mask, dq, dk, dv,
                                                      scale, window_left, window_right);
  at::Tensor delta = at::empty_like(lse_rows);
  at::Tensor lse_log2 = at::empty_like(lse_rows);
  const BackwardScratch scratch{delta.data_ptr<float>(), lse_log2.data_ptr<float>()};
  if (type == ElementType::kFloat) {
    launch_backward_fp32(params, scratch, stream);
  } else {
    launch_backward_tensor_core(params, scratch, type,
                                rows_are_16_byte_aligned({&dout, &q, &k, &v, &out, &dq, &dk, &dv}), stream);
  }
  return {dq, dk, dv};
}

}  // namespace fastattn::cuda
