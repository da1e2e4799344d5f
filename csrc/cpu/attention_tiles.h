// Tile-level pieces shared by the CPU forward and backward kernels: block sizes, operand
// packing, the score mask and the parallel loop.
//
// Tiles are computed transposed, S^T = k q^T (a row per key, a column per query): k and v rows
// are then the broadcast operand of the micro-kernel and are read in place (fp32/fp64), q^T is
// packed once per query block, and the softmax statistics of a query are a vertical reduction
// over the tile's rows, so max, exp2 and sum all run on whole vectors of queries.
#pragma once

#include "cpu/simd.h"  // must precede other ATen headers: it selects at::vec's ISA

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention_params.h"

namespace fastattn::cpu {

// Queries per block (columns of an S^T tile, a multiple of the vector length) and keys per
// block (its rows). At D = 64 in fp32 the operands of one tile (q^T, S^T, the output
// accumulator: 16 KiB each) stay in L1/L2 while k and v stream past.
constexpr int64_t kBlockQueries = 64;
constexpr int64_t kBlockKeys = 64;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// dst[r * dst_ld + c] = src[r * src_row_stride + c] for r < rows, c < cols, converted to dst_t.
template <typename src_t, typename dst_t>
inline void pack_rows(const src_t* src, int64_t src_row_stride, int64_t rows, int64_t cols,
                      dst_t* dst, int64_t dst_ld) {
  for (int64_t r = 0; r < rows; ++r) at::vec::convert(src + r * src_row_stride, dst + r * dst_ld, cols);
}

// dst[c * dst_ld + r] = src[r * src_row_stride + c]: q (rows = queries) to q^T. Columns
// [rows, padded_rows) are zeroed, so queries past the end score 0 (finite) and are never written.
template <typename src_t, typename dst_t>
inline void pack_rows_transposed(const src_t* src, int64_t src_row_stride, int64_t rows,
                                 int64_t padded_rows, int64_t cols, dst_t* dst, int64_t dst_ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const src_t* row = src + r * src_row_stride;
    for (int64_t c = 0; c < cols; ++c) dst[c * dst_ld + r] = static_cast<dst_t>(row[c]);
  }
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * dst_ld + rows, dst + c * dst_ld + padded_rows, dst_t(0));
}

// `rows` rows of `cols` elements as a micro-kernel operand of type acc_t. The input is used in
// place when it already is acc_t and, for a B operand (`whole_vectors`), its rows are a whole
// number of vectors; otherwise it is converted into `buffer` (row stride buffer_ld, whose padding
// columns the caller keeps zero). Returns the operand and sets *ld to its row stride.
template <typename scalar_t, typename acc_t>
inline const acc_t* rows_operand(const scalar_t* src, int64_t src_row_stride, int64_t rows,
                                 int64_t cols, bool whole_vectors, acc_t* buffer,
                                 int64_t buffer_ld, int64_t* ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!whole_vectors || cols % Vectorized<acc_t>::size() == 0) {
      *ld = src_row_stride;
      return src;
    }
  }
  pack_rows(src, src_row_stride, rows, cols, buffer, buffer_ld);
  *ld = buffer_ld;
  return buffer;
}

// Sets to -inf every score of an S^T tile (row j = key key0 + j for j < keys, column i = query
// row0 + i for i < queries, row stride ld) that its query may not see: padded keys, and keys
// outside the window on tiles that straddle a window edge (the only ones tested per element).
// Columns past `queries` belong to no query of this tile and are left alone.
template <typename T>
inline void mask_scores(const AttentionParams& p, int64_t batch, int64_t key0, int64_t keys,
                        int64_t row0, int64_t queries, int64_t ld, T* scores_t) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const bool straddles = !p.tile_fully_visible(row0, row0 + queries, key0, key0 + keys);
  const bool* padding =
      p.key_padding_mask == nullptr ? nullptr : p.key_padding_mask + batch * p.key_padding_stride_batch;
  for (int64_t j = 0; j < keys; ++j) {
    T* row = scores_t + j * ld;
    if (padding != nullptr && padding[(key0 + j) * p.key_padding_stride_key]) {
      std::fill(row, row + queries, kNegInf);
    } else if (straddles) {
      const int64_t first = std::clamp<int64_t>(p.first_visible_query(key0 + j) - row0, 0, queries);
      const int64_t end = std::clamp<int64_t>(p.end_visible_query(key0 + j) - row0, first, queries);
      std::fill(row, row + first, kNegInf);
      std::fill(row + end, row + queries, kNegInf);
    }
  }
}

// True when every key in [key0, key0 + keys) of this batch is padding: the tile can be skipped.
inline bool all_keys_padded(const AttentionParams& p, int64_t batch, int64_t key0, int64_t keys) {
  if (p.key_padding_mask == nullptr) return false;
  const bool* padding = p.key_padding_mask + batch * p.key_padding_stride_batch;
  for (int64_t j = 0; j < keys; ++j) {
    if (!padding[(key0 + j) * p.key_padding_stride_key]) return false;
  }
  return true;
}

// One block of kBlockQueries query rows of one (batch, query head), item number `item` in
// batch-major order: the unit of work of the forward and of the backward's dq pass, with the
// key range its window reaches (the first row has the lowest window start and the last row the
// highest window end).
struct QueryBlock {
  int64_t batch, head, kv_head, row0, rows, key_begin, key_end;

  QueryBlock(const AttentionParams& p, int64_t item) {
    const int64_t blocks = ceil_div(p.seqlen_q, kBlockQueries);
    const int64_t batch_head = item / blocks;
    head = batch_head % p.heads_q;
    batch = batch_head / p.heads_q;
    kv_head = head / p.kv_group();
    row0 = (item % blocks) * kBlockQueries;
    rows = std::min(kBlockQueries, p.seqlen_q - row0);
    key_begin = p.first_visible_key(row0);
    key_end = p.end_visible_key(row0 + rows - 1);
  }

  int64_t batch_head(const AttentionParams& p) const { return batch * p.heads_q + head; }
  static int64_t count(const AttentionParams& p) {
    return p.batch * p.heads_q * ceil_div(p.seqlen_q, kBlockQueries);
  }
};

// Runs body(item, workspace) for item in [0, count) on at::get_num_threads() OpenMP threads,
// each with its own workspace from make_workspace(). Items are independent and each writes its
// own outputs, so the result does not depend on the schedule (bitwise deterministic); dynamic
// scheduling balances the uneven blocks of causal and windowed attention.
template <typename MakeWorkspace, typename Body>
inline void parallel_over_blocks(int64_t count, const MakeWorkspace& make_workspace, const Body& body) {
  if (count <= 0) return;
  const int threads =
      at::in_parallel_region() ? 1 : static_cast<int>(std::min<int64_t>(at::get_num_threads(), count));
#pragma omp parallel num_threads(threads)
  {
    auto workspace = make_workspace();
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < count; ++item) body(item, workspace);
  }
}

}  // namespace fastattn::cpu
