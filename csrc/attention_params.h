// The plain-data description of one attention call, shared by the CPU and CUDA kernels.
//
// It carries pointers, shapes and element strides (the last dimension of every tensor is
// contiguous), the softmax scale and the window. The visibility rule lives here once, as
// host/device functions, so every kernel family skips and masks exactly the same keys:
//
//   query row i sits at key position p = i + seqlen_k - seqlen_q (bottom-right alignment)
//   and may see key j iff  p - window_left <= j <= p + window_right  (-1 = unbounded side),
//   unless key_padding_mask[b][j] is true.
//
// No ATen types appear here so that nvcc device code can include it cheaply.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FASTATTN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTATTN_HOST_DEVICE inline
#endif

namespace fastattn {

// Element strides of a (B, H, N, D) tensor whose last dimension is contiguous.
struct Strides {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t row = 0;

  FASTATTN_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t n) const {
    return b * batch + h * head + n * row;
  }
};

struct AttentionParams {
  int64_t batch = 0;
  int64_t heads_q = 0;
  int64_t heads_kv = 0;
  int64_t seqlen_q = 0;
  int64_t seqlen_k = 0;
  int64_t head_dim = 0;    // D, of q and k
  int64_t head_dim_v = 0;  // Dv, of v and out

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  void* lse = nullptr;  // (B, Hq, Nq) contiguous; float32, or float64 for float64 inputs
  Strides q_strides, k_strides, v_strides, out_strides;

  const bool* key_padding_mask = nullptr;  // (B, Nk), true = padding; may be null
  int64_t key_padding_stride_batch = 0;
  int64_t key_padding_stride_key = 0;

  double scale = 1.0;
  int64_t window_left = -1;
  int64_t window_right = -1;

  // Backward only.
  const void* dout = nullptr;
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  Strides dout_strides, dq_strides, dk_strides, dv_strides;

  // Query heads per key/value head (GQA/MQA); query head h reads kv head h / kv_group().
  FASTATTN_HOST_DEVICE int64_t kv_group() const { return heads_q / heads_kv; }

  FASTATTN_HOST_DEVICE int64_t key_position(int64_t query_row) const {
    return query_row + seqlen_k - seqlen_q;
  }

  // First key query_row may see (before padding).
  FASTATTN_HOST_DEVICE int64_t first_visible_key(int64_t query_row) const {
    const int64_t p = key_position(query_row);
    if (window_left < 0) return 0;
    return p - window_left > 0 ? p - window_left : 0;
  }

  // One past the last key query_row may see; the range is empty when it is <= first_visible_key.
  FASTATTN_HOST_DEVICE int64_t end_visible_key(int64_t query_row) const {
    const int64_t p = key_position(query_row);
    if (window_right < 0) return seqlen_k;
    return p + window_right + 1 < seqlen_k ? p + window_right + 1 : seqlen_k;
  }

  // First query row that may see key (the transposed rule, for the backward pass over keys).
  FASTATTN_HOST_DEVICE int64_t first_visible_query(int64_t key) const {
    if (window_right < 0) return 0;
    const int64_t row = key - window_right - (seqlen_k - seqlen_q);
    return row > 0 ? row : 0;
  }

  // One past the last query row that may see key.
  FASTATTN_HOST_DEVICE int64_t end_visible_query(int64_t key) const {
    if (window_left < 0) return seqlen_q;
    const int64_t end = key + window_left - (seqlen_k - seqlen_q) + 1;
    return end < seqlen_q ? end : seqlen_q;
  }

  // True when every query row in [row_begin, row_end) sees every key in [key_begin, key_end)
  // (before padding), so the tile needs no element mask. Both ranges are non-empty.
  FASTATTN_HOST_DEVICE bool tile_fully_visible(int64_t row_begin, int64_t row_end,
                                               int64_t key_begin, int64_t key_end) const {
    // The window's lower edge rises with the row and its upper edge too, so the binding rows are
    // the last one (for the left edge) and the first one (for the right edge).
    return first_visible_key(row_end - 1) <= key_begin && end_visible_key(row_begin) >= key_end;
  }
};

}  // namespace fastattn
