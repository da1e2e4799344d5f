#include "attention_api.h"

#include <cmath>

namespace fastattn {
namespace {

void check_4d(const at::Tensor& t, const char* name, const char* shape) {
  TORCH_CHECK_VALUE(t.dim() == 4, "fastattn: ", name, " must be a 4-D tensor ", shape,
                    ", got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.size(-1) == 0 || t.stride(-1) == 1, "fastattn: the last dimension of ",
                    name, " must be contiguous (stride 1), got strides ", t.strides());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), "fastattn: ", name,
                   " must have the dtype of q (", q.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "fastattn: ", name,
                    " must be on the device of q (", q.device(), "), got ", t.device());
}

Strides strides_of(const at::Tensor& t) {
  return Strides{t.stride(0), t.stride(1), t.stride(2)};
}

}  // namespace

void check_forward_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const std::optional<at::Tensor>& key_padding_mask, double scale,
                          int64_t window_left, int64_t window_right) {
  check_4d(q, "q", "(B, Hq, Nq, D)");
  check_4d(k, "k", "(B, Hkv, Nk, D)");
  check_4d(v, "v", "(B, Hkv, Nk, Dv)");
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()),
                   "fastattn: q must have a floating dtype, got ", q.scalar_type());
  check_like(k, "k", q);
  check_like(v, "v", q);
  TORCH_CHECK_VALUE(k.size(0) == q.size(0) && v.size(0) == q.size(0),
                    "fastattn: q, k and v must have the same batch size, got q ", q.sizes(),
                    ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), "fastattn: k must have the head dim of q (",
                    q.size(3), "), got k ", k.sizes());
  TORCH_CHECK_VALUE(v.size(1) == k.size(1) && v.size(2) == k.size(2),
                    "fastattn: v must have the heads and length of k, got k ", k.sizes(), ", v ",
                    v.sizes());
  TORCH_CHECK_VALUE(k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
                    "fastattn: the number of query heads (", q.size(1),
                    ") must be a multiple of the number of key/value heads (", k.size(1), ")");
  TORCH_CHECK_VALUE(q.size(3) >= 1 && q.size(3) <= 256, "fastattn: head dim of q/k must be in 1..256, got ",
                    q.size(3));
  TORCH_CHECK_VALUE(v.size(3) >= 1 && v.size(3) <= 256, "fastattn: head dim of v must be in 1..256, got ",
                    v.size(3));
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK_TYPE(mask.scalar_type() == at::kBool,
                     "fastattn: key_padding_mask must be a bool tensor, got ", mask.scalar_type());
    TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == q.size(0) && mask.size(1) == k.size(2),
                      "fastattn: key_padding_mask must have shape (B, Nk) = (", q.size(0), ", ",
                      k.size(2), "), got ", mask.sizes());
    TORCH_CHECK_VALUE(mask.device() == q.device(), "fastattn: key_padding_mask must be on ",
                      q.device(), ", got ", mask.device());
  }
  TORCH_CHECK_VALUE(std::isfinite(scale) && scale > 0, "fastattn: scale must be a finite number > 0, got ",
                    scale);
  TORCH_CHECK_VALUE(window_left >= -1 && window_right >= -1,
                    "fastattn: window sides must be >= 0 or -1 (unbounded), got (", window_left,
                    ", ", window_right, ")");
}

void check_backward_inputs(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                           const std::optional<at::Tensor>& key_padding_mask, double scale,
                           int64_t window_left, int64_t window_right) {
  check_forward_inputs(q, k, v, key_padding_mask, scale, window_left, window_right);
  check_4d(out, "out", "(B, Hq, Nq, Dv)");
  check_4d(dout, "dout", "(B, Hq, Nq, Dv)");
  check_like(out, "out", q);
  check_like(dout, "dout", q);
  const std::vector<int64_t> out_shape{q.size(0), q.size(1), q.size(2), v.size(3)};
  TORCH_CHECK_VALUE(out.sizes() == at::IntArrayRef(out_shape), "fastattn: out must have shape ",
                    at::IntArrayRef(out_shape), ", got ", out.sizes());
  TORCH_CHECK_VALUE(dout.sizes() == at::IntArrayRef(out_shape), "fastattn: dout must have shape ",
                    at::IntArrayRef(out_shape), ", got ", dout.sizes());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) &&
                        lse.size(2) == q.size(2),
                    "fastattn: lse must have shape (B, Hq, Nq), got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == lse_dtype(q.scalar_type()), "fastattn: lse must be ",
                   lse_dtype(q.scalar_type()), ", got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q.device(), "fastattn: lse must be on ", q.device(), ", got ",
                    lse.device());
}

at::ScalarType lse_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor empty_in_layout_of(const at::Tensor& like, int64_t last_dim) {
  const bool seq_major = like.dim() == 4 && !like.is_contiguous() && like.transpose(1, 2).is_contiguous();
  if (seq_major) {
    return at::empty({like.size(0), like.size(2), like.size(1), last_dim}, like.options())
        .transpose(1, 2);
  }
  return at::empty({like.size(0), like.size(1), like.size(2), last_dim}, like.options());
}

AttentionParams make_forward_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const std::optional<at::Tensor>& key_padding_mask,
                                    const at::Tensor& out, const at::Tensor& lse, double scale,
                                    int64_t window_left, int64_t window_right) {
  AttentionParams p;
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.heads_kv = k.size(1);
  p.seqlen_q = q.size(2);
  p.seqlen_k = k.size(2);
  p.head_dim = q.size(3);
  p.head_dim_v = v.size(3);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  p.q_strides = strides_of(q);
  p.k_strides = strides_of(k);
  p.v_strides = strides_of(v);
  p.out_strides = strides_of(out);
  if (key_padding_mask.has_value()) {
    p.key_padding_mask = key_padding_mask->data_ptr<bool>();
    p.key_padding_stride_batch = key_padding_mask->stride(0);
    p.key_padding_stride_key = key_padding_mask->stride(1);
  }
  p.scale = scale;
  p.window_left = window_left;
  p.window_right = window_right;
  return p;
}

AttentionParams make_backward_params(const at::Tensor& dout, const at::Tensor& q,
                                     const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& out, const at::Tensor& lse,
                                     const std::optional<at::Tensor>& key_padding_mask,
                                     const at::Tensor& dq, const at::Tensor& dk,
                                     const at::Tensor& dv, double scale, int64_t window_left,
                                     int64_t window_right) {
  AttentionParams p =
      make_forward_params(q, k, v, key_padding_mask, out, lse, scale, window_left, window_right);
  p.dout = dout.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dout_strides = strides_of(dout);
  p.dq_strides = strides_of(dq);
  p.dk_strides = strides_of(dk);
  p.dv_strides = strides_of(dv);
  return p;
}

}  // namespace fastattn
