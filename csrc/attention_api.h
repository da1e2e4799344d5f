// Host-side helpers shared by the CPU and CUDA implementations of the fastattn ops: argument
// checks (same messages as the Python layer), output allocation and AttentionParams filling.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "attention_params.h"

namespace fastattn {

// Raises ValueError/TypeError naming the offending argument, as fastattn.functional does.
void check_forward_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_padding_mask, double scale,
                          int64_t window_left, int64_t window_right);

void check_backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           const std::optional<at::Tensor>& key_padding_mask, double scale,
                           int64_t window_left, int64_t window_right);

// A new tensor shaped like `like` with last dimension `last_dim`, laid out (B, N, H, D) when
// `like` is a transposed (B, N, H, D) view and (B, H, N, D) otherwise, so that outputs and
// gradients follow the caller's layout. fastattn/_ops.py applies the same rule in the fakes.
at::Tensor empty_in_layout_of(const at::Tensor& like, int64_t last_dim);

// The dtype of the log-sum-exp: float32, or float64 for float64 inputs.
at::ScalarType lse_dtype(at::ScalarType input_dtype);

AttentionParams make_forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& key_padding_mask,
                                    const at::Tensor& out, const at::Tensor& lse, double scale,
                                    int64_t window_left, int64_t window_right);

AttentionParams make_backward_params(const at::Tensor& dout, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& out, const at::Tensor& lse,
                                     const std::optional<at::Tensor>& key_padding_mask,
                                     const at::Tensor& dq, const at::Tensor& dk,
                                     const at::Tensor& dv, double scale, int64_t window_left,
                                     int64_t window_right);

}  // namespace fastattn
