// Device-side pieces shared by every fastattn CUDA kernel (tensor-core and fp32): which block of
// the problem a CTA owns, the visible ranges behind the element mask, warp reductions.
//
// The visibility rule itself is AttentionParams' (attention_params.h): a CTA turns it into a
// key range (query blocks) or a query range (key blocks) and, for the few tiles that straddle a
// window edge or use key padding, into per-row [first, end) ranges tested element by element.
#pragma once

#include <cstdint>
#include <limits>

#include "attention_params.h"
#include "cuda/launch.h"
#include "cuda/ptx.cuh"

namespace fastattn::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr unsigned kFullMask = 0xffffffffu;

FASTATTN_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Valid rows of a tile of `tile` rows that starts at `start` of a sequence of `length` rows.
FASTATTN_HOST_DEVICE int tile_extent(int64_t length, int64_t start, int tile) {
  return static_cast<int>(length - start < tile ? length - start : tile);
}

// The block of `block_rows` query rows of one (batch, query head) that this CTA owns, and the
// key range its window reaches. blockIdx.x enumerates (batch, head) major and query blocks in
// reverse, so that the longest causal rows start first and consecutive CTAs share k and v in L2.
struct QueryBlock {
  int64_t batch, head, kv_head, batch_head, row0, key_begin, key_end;
  int rows;  // valid rows, 1..block_rows

  __device__ QueryBlock(const AttentionParams& p, int block_rows) {
    // The grid is below 2^31 CTAs (grid_size), so 32-bit divisions suffice: 64-bit ones are calls.
    const unsigned blocks = static_cast<unsigned>(ceil_div(p.seqlen_q, block_rows));
    const unsigned heads = static_cast<unsigned>(p.heads_q), group = heads / static_cast<unsigned>(p.heads_kv);
    const unsigned item = blockIdx.x, bh = item / blocks;
    batch_head = bh;
    row0 = static_cast<int64_t>(blocks - 1 - item % blocks) * block_rows;
    batch = bh / heads;
    head = bh % heads;
    kv_head = static_cast<unsigned>(head) / group;
    rows = tile_extent(p.seqlen_q, row0, block_rows);
    // The first row has the lowest window start and the last row the highest window end.
    key_begin = p.first_visible_key(row0);
    key_end = p.end_visible_key(row0 + rows - 1);
  }

  // Whether the key tile [key0, key0 + tile_keys) needs the element mask: it straddles a window
  // edge or the end of the keys, or keys may be padded. Other tiles are seen whole by every row.
  __device__ __forceinline__ bool tile_needs_mask(const AttentionParams& p, int64_t key0, int tile_keys) const {
    return p.key_padding_mask != nullptr || !p.tile_fully_visible(row0, row0 + rows, key0, key0 + tile_keys);
  }

  static int64_t count(const AttentionParams& p, int block_rows) {
    return p.batch * p.heads_q * ceil_div(p.seqlen_q, block_rows);
  }
};

// The block of `block_keys` keys of one (batch, key/value head) that this CTA owns in the
// backward's dk/dv pass, the query range that sees it, and which column chunk of dk/dv it writes.
struct KeyBlock {
  int64_t batch, kv_head, key0, query_begin, query_end;
  int keys;   // valid keys, 1..block_keys
  int chunk;  // column chunk of dk and dv

  __device__ KeyBlock(const AttentionParams& p, int block_keys, int chunks) {
    const unsigned blocks = static_cast<unsigned>(ceil_div(p.seqlen_k, block_keys));
    const unsigned heads = static_cast<unsigned>(p.heads_kv);
    chunk = static_cast<int>(blockIdx.x % static_cast<unsigned>(chunks));
    const unsigned item = blockIdx.x / static_cast<unsigned>(chunks);
    const unsigned batch_head = item / blocks;
    key0 = static_cast<int64_t>(item % blocks) * block_keys;
    batch = batch_head / heads;
    kv_head = batch_head % heads;
    keys = tile_extent(p.seqlen_k, key0, block_keys);
    // The first key has the lowest query start and the last key the highest query end.
    query_begin = p.first_visible_query(key0);
    query_end = p.end_visible_query(key0 + keys - 1);
  }

  // Whether the query tile [row0, row0 + rows) needs the element mask against this block of
  // `block_keys` keys (see QueryBlock::tile_needs_mask).
  __device__ __forceinline__ bool tile_needs_mask(const AttentionParams& p, int64_t row0, int rows,
                                                  int block_keys) const {
    return p.key_padding_mask != nullptr || !p.tile_fully_visible(row0, row0 + rows, key0, key0 + block_keys);
  }

  static int64_t count(const AttentionParams& p, int block_keys, int chunks) {
    return p.batch * p.heads_kv * ceil_div(p.seqlen_k, block_keys) * chunks;
  }
};

// Walks the (query head of the GQA group, query tile) pairs whose queries see a key block, in
// head-major order (a fixed order: the dk/dv sums are deterministic).
struct QueryTileCursor {
  int64_t head, row0;

  __device__ QueryTileCursor(const KeyBlock& block, int64_t group) : head(block.kv_head * group), row0(block.query_begin) {}
  __device__ void advance(const KeyBlock& block, int tile_rows) {
    row0 += tile_rows;
    if (row0 >= block.query_end) {
      row0 = block.query_begin;
      ++head;
    }
  }
};

// The count of such pairs.
__device__ __forceinline__ int64_t query_tile_count(const KeyBlock& block, int64_t group, int tile_rows) {
  return block.query_end > block.query_begin ? group * ceil_div(block.query_end - block.query_begin, tile_rows) : 0;
}

// 1 / sum of a finished softmax row, or 0 for a row that saw no key (so its output is 0). The
// sum is at least ~1 (the row's max contributes 2^0), so the hardware reciprocal refined by one
// Newton step is within an ulp; IEEE division would add an out-of-line slow path (a call that
// makes ptxas save registers on the stack).
__device__ __forceinline__ float inverse_row_sum(float sum) {
  if (!(sum > 0.f)) return 0.f;
  const float r = fast_reciprocal(sum);
  return fmaf(r, fmaf(-sum, r, 1.f), r);
}

// The key padding row of `batch`, or null without a mask.
__device__ __forceinline__ const bool* padding_row(const AttentionParams& p, int64_t batch) {
  return p.key_padding_mask == nullptr ? nullptr : p.key_padding_mask + batch * p.key_padding_stride_batch;
}

// Visible-column range [first, end) of a score-tile row: the keys query `row` sees, or (rows are
// keys, for dk/dv) the queries that see `key`. A padded key, or one past the end, sees nothing.
struct VisibleRange {
  int64_t first, end;

  __device__ __forceinline__ static VisibleRange keys_of_query(const AttentionParams& p, int64_t row) {
    return {p.first_visible_key(row), p.end_visible_key(row)};
  }
  __device__ __forceinline__ static VisibleRange queries_of_key(const AttentionParams& p, const bool* padding,
                                                                 int64_t key) {
    if (key >= p.seqlen_k || (padding != nullptr && padding[key * p.key_padding_stride_key])) return {0, 0};
    return {p.first_visible_query(key), p.end_visible_query(key)};
  }
  // `column_padding`: the key padding row when columns are keys (null when rows are keys,
  // whose padding is already folded into their range).
  __device__ __forceinline__ bool sees(int64_t column, const bool* column_padding, int64_t padding_stride) const {
    return column >= first && column < end &&
           (column_padding == nullptr || !column_padding[column * padding_stride]);
  }
};

// lse_log2 and delta of query `row` of (batch, head) = batch_head; rows past Nq get +inf and 0,
// so that their P (and hence dS) is 0.
// (Written by the backward pre-pass of each kernel family.)
struct RowStats {
  float lse_log2, delta;
  __device__ __forceinline__ RowStats(const AttentionParams& p, const BackwardScratch& scratch,
                                      int64_t batch_head, int64_t row) {
    const bool valid = row < p.seqlen_q;
    lse_log2 = valid ? __ldg(scratch.lse_log2 + batch_head * p.seqlen_q + row) : kInf;
    delta = valid ? __ldg(scratch.delta + batch_head * p.seqlen_q + row) : 0.f;
  }
};

// Reductions over the 4 lanes that share an mma row (lanes 4g .. 4g+3) and over a whole warp.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}
__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// lse * log2(e) for the backward's P = 2^(S * scale * log2(e) - lse * log2(e)); +inf for a row
// that saw no key (lse = -inf), so that its P is 2^-inf = 0 rather than NaN.
__device__ __forceinline__ float lse_to_log2(float lse) { return lse == -kInf ? kInf : lse * kLog2e; }

// lse of a finished row in the natural log, from its running max m (log2 domain) and sum l:
// -inf for a row that saw no key.
__device__ __forceinline__ float row_lse(float row_max_log2, float row_sum) {
  return row_sum > 0.f ? (row_max_log2 + log2f(row_sum)) * kLn2 : -kInf;
}

}  // namespace fastattn::cuda
