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
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_params.h"

namespace fastattn::cpu {

// Queries per block (columns of an S^T tile, a multiple of the vector length) and keys per
// block (its rows). At D = 64 in fp32 the operands of one tile (q^T, S^T, the output
// accumulator: 16 KiB each) stay in L1/L2 while k and v stream past.
constexpr int64_t kBlockQueries = 64;
constexpr int64_t kBlockKeys = 64;
constexpr int64_t kPairBlockKeys = 256;  // keys per block of the bf16 pair-product forward (see amx.h)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Allocates on 64-byte (cache line) boundaries. malloc aligns to 16 bytes only, and a 64-byte
// vector or tile row that straddles two lines costs two accesses: on the 2-core Xeon with AMX the
// bf16 forward's inner loop per 64 x 64 block took 2.15 us with std::vector workspaces and 1.30 us
// with aligned ones (tile stores of the score tile and vector loads of it both split).
// VALUE_INITIALIZE false leaves the elements that a resize adds uninitialized (std::vector zeroes
// them), for storage whose every element the kernel writes before it reads it. Fresh memory is
// often zero, so a read of an unwritten element would mostly pass unseen: with the environment
// variable FASTATTN_CPU_POISON_WORKSPACES=1 (for tests) such storage starts as all-ones bytes,
// NaN in every floating-point type, which then reaches the results.
inline bool poison_uninitialized_storage() {
  static const bool poison = [] {
    const char* value = std::getenv("FASTATTN_CPU_POISON_WORKSPACES");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return poison;
}

template <typename T, bool VALUE_INITIALIZE = true>
struct CacheLineAllocator {
  using value_type = T;
  template <typename U>
  struct rebind {
    using other = CacheLineAllocator<U, VALUE_INITIALIZE>;
  };
  static constexpr std::align_val_t kAlignment{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U, VALUE_INITIALIZE>&) {}
  T* allocate(std::size_t count) {
    T* storage = static_cast<T*>(::operator new(count * sizeof(T), kAlignment));
    if (!VALUE_INITIALIZE && poison_uninitialized_storage()) std::memset(storage, 0xff, count * sizeof(T));
    return storage;
  }
  void deallocate(T* pointer, std::size_t) { ::operator delete(pointer, kAlignment); }
  template <typename U>
  void construct(U* pointer) {
    if constexpr (VALUE_INITIALIZE) {
      ::new (static_cast<void*>(pointer)) U();
    } else {
      ::new (static_cast<void*>(pointer)) U;
    }
  }
  template <typename U, typename... Args>
  void construct(U* pointer, Args&&... args) {
    ::new (static_cast<void*>(pointer)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const CacheLineAllocator<U, VALUE_INITIALIZE>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U, VALUE_INITIALIZE>&) const { return false; }
};

// The kernels' workspaces and operand copies: a std::vector whose data starts on a cache line.
template <typename T>
using Buffer = std::vector<T, CacheLineAllocator<T>>;
// The same, with the elements a resize adds left uninitialized: reusable_storage's buffers. Their
// zeroing was a pass of its own by one thread, page-faulting fresh memory, before the kernel wrote
// every element anyway (~4% of an fp32 window backward at N = 64k, perf, 2-core Xeon).
template <typename T>
using UninitializedBuffer = std::vector<T, CacheLineAllocator<T, false>>;

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
  int64_t whole_rows = 0, whole_cols = 0;  // the part done in register transposes
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<src_t, float> && std::is_same_v<dst_t, float>) {
    constexpr int64_t kSize = kRegisterTransposeSize;
    whole_rows = rows / kSize * kSize;
    whole_cols = cols / kSize * kSize;
    for (int64_t r0 = 0; r0 < whole_rows; r0 += kSize) {
      for (int64_t c0 = 0; c0 < whole_cols; c0 += kSize) {
        transpose_in_registers(src + r0 * src_row_stride + c0, src_row_stride, dst + c0 * dst_ld + r0, dst_ld);
      }
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const src_t* row = src + r * src_row_stride;
    for (int64_t c = r < whole_rows ? whole_cols : 0; c < cols; ++c) dst[c * dst_ld + r] = static_cast<dst_t>(row[c]);
  }
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * dst_ld + rows, dst + c * dst_ld + padded_rows, dst_t(0));
}

// dst[c * dst_ld + r] = src[r * src_row_stride + c] for r < rows, c < cols, in 16 x 16 blocks so
// that both sides touch few cache lines at a time (a plain loop writes one line per element).
template <typename T>
inline void transpose_rows(const T* src, int64_t src_row_stride, int64_t rows, int64_t cols, T* dst,
                           int64_t dst_ld) {
  constexpr int64_t kBlock = 16;
  for (int64_t r0 = 0; r0 < rows; r0 += kBlock) {
    for (int64_t c0 = 0; c0 < cols; c0 += kBlock) {
      const int64_t r1 = std::min(rows, r0 + kBlock), c1 = std::min(cols, c0 + kBlock);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) dst[c * dst_ld + r] = src[r * src_row_stride + c];
      }
    }
  }
}

// `rows` rows of `cols` elements as a micro-kernel operand of type acc_t. The input is used in
// place when it already is acc_t and either is an A operand (`b_operand` false: read one scalar
// per row per step) or is a B operand whose rows are dense and a whole number of vectors. A B
// operand's rows are re-read by every row tile, so strided rows (e.g. the (B, N, H, D) layout,
// rows H * D apart, often a multiple of 1 KiB) would fall into few L1 sets; those, and other
// dtypes, are converted into `buffer` (row stride buffer_ld, padding columns [cols, buffer_ld)
// zeroed, so that callers' workspaces need no zeroing). Returns the operand and sets *ld to its
// row stride.
template <typename scalar_t, typename acc_t>
inline const acc_t* rows_operand(const scalar_t* src, int64_t src_row_stride, int64_t rows, int64_t cols,
                                 bool b_operand, acc_t* buffer, int64_t buffer_ld, int64_t* ld) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (!b_operand || (src_row_stride == cols && cols % Vectorized<acc_t>::size() == 0)) {
      *ld = src_row_stride;
      return src;
    }
  }
  pack_rows(src, src_row_stride, rows, cols, buffer, buffer_ld);
  for (int64_t r = 0; r < rows; ++r) std::fill(buffer + r * buffer_ld + cols, buffer + (r + 1) * buffer_ld, acc_t(0));
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
  // Most tiles of full and wide-window attention: nothing to mask, and no pass over the rows.
  if (!straddles && padding == nullptr) return;
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

// One key block of the forward's online softmax, in the exp2 domain, on an S^T tile
// (row j = key, kBlockQueries query columns, row stride kBlockQueries), with b the block's
// largest S_j * scale * log2(e):
//   m' = b if b > m + kMaxGrowthLog2, else m,  P_j = 2^(S_j * scale * log2(e) - m'),
//   l' = l * 2^(m - m') + sum_j P_j,           rescale = 2^(m - m')
// row_max = m, row_sum = l, rescale are per query. m is a lagging maximum: it moves only when a
// block's scores exceed it by more than 2^8, so the rescale is exactly 1 for almost every block
// after a query's first, which lets the products skip their rescale multiplies (the fp32 forward
// ran 0.5% faster, the bf16 AMX one 2-4%, paired A/B, 2-core Xeon); out = acc / l and
// lse = m + log2(l) hold for any such m. Once every query has a max, both forwards try each
// block without the max pass (online_softmax_step_at_lagging_max). Either way P <= 2^16, and l
// grows by at most 2^16 per key block: no overflow. A query with nothing visible yet keeps
// m = -inf and uses shift 0, so its P is 2^-inf = 0 rather than NaN.
// The loops run over all query columns at once: independent max and sum chains rather than one
// dependency chain per column (columns past the block's queries hold finite junk never used).
//
// online_softmax_shift does the first half (the max, m', rescale) and returns the shifts m' (0
// for empty queries) that P_j = 2^(S_j * scale * log2(e) - shift) uses; online_softmax_step does
// it all, writing P^T over the tile's rows [0, keys).
constexpr int kMaxGrowthLog2 = 8;

template <typename T>
inline void online_softmax_shift(const T* scores_t, int64_t keys, Vectorized<T> scale_log2, T* row_max,
                                 T* rescale, Vectorized<T>* shift) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  constexpr int kVectors = kBlockQueries / L;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  Vec block_max[kVectors];
  for (int v = 0; v < kVectors; ++v) block_max[v] = Vec(kNegInf);
  // clamp_min is one max instruction that passes over a NaN score; at::vec::maximum propagates NaN
  // with three (measured: the max pass took 2.8 cycles per vector, as much as a third of the
  // exp2 pass). A NaN score still gives a NaN probability, sum and output below.
  for (int64_t j = 0; j < keys; ++j) {
    for (int v = 0; v < kVectors; ++v) {
      block_max[v] = at::vec::clamp_min(block_max[v], Vec::loadu(scores_t + j * kBlockQueries + v * L));
    }
  }
  for (int v = 0; v < kVectors; ++v) {
    const Vec old_max = Vec::loadu(row_max + v * L);
    const Vec candidate = block_max[v] * scale_log2;
    const Vec new_max = Vec::blendv(old_max, candidate, candidate > old_max + Vec(T(kMaxGrowthLog2)));
    shift[v] = Vec::blendv(new_max, Vec(T(0)), new_max == Vec(kNegInf));
    exp2(old_max - shift[v]).store(rescale + v * L);
    new_max.store(row_max + v * L);
  }
}

// P^T = 2^(S^T * scale * log2(e) - shift) over the tile's rows [0, keys), in place, and sum[v]
// += the P of query columns [v * L, (v + 1) * L).
template <typename T>
inline void exponentiate_scores(T* scores_t, int64_t keys, Vectorized<T> scale_log2, const Vectorized<T>* shift,
                                Vectorized<T>* sum) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  constexpr int kVectors = kBlockQueries / L;
  constexpr int kInterleave = kExp2Interleave<T>;  // vectors per exp2_each call (see there)
  static_assert(kVectors % kInterleave == 0, "query blocks must be whole interleaved groups");
  for (int64_t j = 0; j < keys; ++j) {
    for (int v0 = 0; v0 < kVectors; v0 += kInterleave) {
      T* s = scores_t + j * kBlockQueries + v0 * L;
      Vec prob[kInterleave];
      for (int g = 0; g < kInterleave; ++g) {
        prob[g] = multiply_subtract(Vec::loadu(s + g * L), scale_log2, shift[v0 + g]);
      }
      exp2_each<kInterleave>(prob);
      for (int g = 0; g < kInterleave; ++g) {
        prob[g].store(s + g * L);
        sum[v0 + g] = sum[v0 + g] + prob[g];
      }
    }
  }
}

template <typename T>
inline void online_softmax_step(T* scores_t, int64_t keys, Vectorized<T> scale_log2, T* row_max, T* row_sum,
                                T* rescale) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  constexpr int kVectors = kBlockQueries / L;
  Vec shift[kVectors], sum[kVectors];
  online_softmax_shift(scores_t, keys, scale_log2, row_max, rescale, shift);
  for (int v = 0; v < kVectors; ++v) sum[v] = Vec(T(0));
  exponentiate_scores(scores_t, keys, scale_log2, shift, sum);
  for (int v = 0; v < kVectors; ++v) {
    at::vec::fmadd(Vec::loadu(row_sum + v * L), Vec::loadu(rescale + v * L), sum[v]).store(row_sum + v * L);
  }
}

// True when every query column of the tile has a running max (m > -inf): the tile may then try
// online_softmax_step_at_lagging_max.
template <typename T>
inline bool every_query_has_max(const T* row_max) {
  using Vec = Vectorized<T>;
  Vec lowest(std::numeric_limits<T>::infinity());
  for (int64_t v = 0; v < kBlockQueries; v += Vec::size()) lowest = at::vec::minimum(lowest, Vec::loadu(row_max + v));
  return at::vec::vec_reduce_all<T>([](const Vec& x, const Vec& y) { return at::vec::minimum(x, y); }, lowest) >
         -std::numeric_limits<T>::infinity();
}

// online_softmax_step without the max pass, for a tile whose queries all have a max: P with m as
// it stands, accepted when every query's sum of the block's P is at most 2^16 (so no P
// overflowed or is NaN, and l grows by at most 2^16 per key block), with rescale = 1 and m
// unchanged. Almost every block after a query's first passes (its scores would have to exceed
// m by 2^16 to fail), and skips a load and a max per score vector (paired A/B, 2-core Xeon: fp32
// forward 1-2% faster; the bf16 AMX forward's version, online_softmax_step_vnni, 8-11%).
// Returns false otherwise, with the tile overwritten: the caller recomputes the scores and takes
// online_softmax_step.
constexpr int kMaxLaggingSumLog2 = 16;

// The end of a block tried at the lagging max, given the sums of its P per query (sum[v] for query
// columns [v * L, (v + 1) * L)): false if one is above 2^16 or NaN, else l += sum, rescale = 1.
template <typename T>
inline bool accept_lagging_step(const Vectorized<T>* sum, T* row_sum, T* rescale) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  constexpr int kVectors = kBlockQueries / L;
  Vec rejected(T(0));  // "not <=" also catches a NaN sum
  for (int v = 0; v < kVectors; ++v) rejected = rejected | ~(sum[v] <= Vec(T(1 << kMaxLaggingSumLog2)));
  if (at::vec::vec_reduce_all<T>([](const Vec& x, const Vec& y) { return x | y; }, rejected) != T(0)) return false;
  for (int v = 0; v < kVectors; ++v) {
    (Vec::loadu(row_sum + v * L) + sum[v]).store(row_sum + v * L);
    Vec(T(1)).store(rescale + v * L);
  }
  return true;
}

template <typename T>
inline bool online_softmax_step_at_lagging_max(T* scores_t, int64_t keys, Vectorized<T> scale_log2,
                                               const T* row_max, T* row_sum, T* rescale) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  constexpr int kVectors = kBlockQueries / L;
  Vec shift[kVectors], sum[kVectors];
  for (int v = 0; v < kVectors; ++v) {
    shift[v] = Vec::loadu(row_max + v * L);
    sum[v] = Vec(T(0));
  }
  exponentiate_scores(scores_t, keys, scale_log2, shift, sum);
  return accept_lagging_step(sum, row_sum, rescale);
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

// The memory the bf16 pair kernels' per-pass copies may take, and the most that a calling thread
// keeps in one reusable_storage buffer.
constexpr int64_t kPassBudgetBytes = 16 << 20;

// How many (batch, kv head) pairs the bf16 pair kernels copy and then attend per pass, given the bytes
// their per-pass buffers take per pair: as many as fit in 16 MiB, at least one. Buffers for every
// head at once (2 x 8 heads x 64k keys x 64 x 2 bytes = 134 MB of k / v^T copies in the forward)
// are past glibc's 32 MiB mmap threshold, so each call got fresh pages, zeroed by the kernel and
// page-faulted in, and they left the caches before the blocks that read them ran (the bf16
// forward's cost per token doubled from 16k to 64k keys). A pass's query blocks are the
// contiguous item range [first * per_kv_head, (first + count) * per_kv_head) of QueryBlock, with
// per_kv_head = kv_group * ceil(Nq / kBlockQueries).
inline int64_t kv_heads_per_pass(const AttentionParams& p, int64_t bytes_per_kv_head) {
  return std::clamp<int64_t>(kPassBudgetBytes / std::max<int64_t>(bytes_per_kv_head, 1), 1, p.batch * p.heads_kv);
}

// Storage for `count` elements that the calling thread keeps from one call to the next, one
// buffer per `slot` (the bf16 pair forward's k / v copies; the backward's dk / dv partial sums).
// Allocated anew per call, buffers of a few MiB came fresh from mmap every time, and faulting in
// and zeroing their pages was ~13% of a bf16 forward at N = 1024 (perf, 2-core Xeon). Requests
// past kPassBudgetBytes (long sequences) are not kept: `local` holds them for this call only.
// The contents are uninitialized or whatever the last call left: the caller writes every
// element it reads.
template <typename T, int SLOTS>
inline T* reusable_storage(int slot, int64_t count, UninitializedBuffer<T>& local) {
  thread_local UninitializedBuffer<T> kept[SLOTS];
  UninitializedBuffer<T>& buffer = count * int64_t(sizeof(T)) <= kPassBudgetBytes ? kept[slot] : local;
  if (int64_t(buffer.size()) < count) {
    buffer = UninitializedBuffer<T>();  // frees the old buffer first rather than copying it over
    buffer.resize(count);
  }
  return buffer.data();
}

// One block of kBlockQueries query rows of one (batch, query head), item number `item` in
// batch-major order: the unit of work of the forward and of the backward's dq pass, with the
// key range its window reaches (the first row has the lowest window start and the last row the
// highest window end).
struct QueryBlock {
  int64_t batch = 0, head = 0, kv_head = 0, row0 = 0, rows = 0, key_begin = 0, key_end = 0;

  QueryBlock() = default;
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
  // True when some row of the block may see a key of [key0, key0 + keys).
  bool reaches(int64_t key0, int64_t keys) const {
    return key_begin < key_end && key0 < key_end && key0 + keys > key_begin;
  }
  static int64_t count(const AttentionParams& p) {
    return p.batch * p.heads_q * ceil_div(p.seqlen_q, kBlockQueries);
  }
};

// The forward's unit of work: up to kMaxGroupBlocks consecutive query blocks of one (batch,
// query head), which share every key block: its k and v rows are read (and converted, for 16-bit
// inputs) once for the whole group rather than once per query block. One head's k and v at
// N = 8192 (4 MiB in fp32) do not fit in L2, so with one block per item they came from L3 for
// every 64 queries: on a 2-core AMD EPYC the two tile products ran ~30% slower on key blocks
// streamed from L3 than on cached ones (single-thread micro-benchmark), and the fp32 forward at
// N = 8192 ran 5-10% faster with groups of 4. The group's key blocks start at the first key any
// of its queries sees; a block that reaches only some of a member's rows is masked as usual.
constexpr int64_t kMaxGroupBlocks = 4;

struct QueryGroup {
  int64_t size = 0;
  QueryBlock blocks[kMaxGroupBlocks];
  int64_t key_begin = 0, key_end = 0;  // union of the members' key ranges
};

// How the query blocks of every (batch, query head) are cut into groups. The group size depends
// on the shape alone (the largest of 4, 2, 1 that leaves enough items for a many-core CPU), never
// on the thread count, so the key blocks each query meets, and hence the results, are the same
// for any number of threads. Enough items: 32, a thread each on a 32-thread CPU (the backward
// aims at 16); with 64, B = 1, H = 8, N = 1024 got groups of 2, and groups of 4 ran its fp32
// forward 1-1.5% faster, N = 512 and the (256, 256) window at N = 1024 1-1.6% (paired A/B,
// 2-core Xeon).
struct QueryGroups {
  static constexpr int64_t kTargetItems = 32;
  int64_t blocks_per_head = 0, group_blocks = 1, groups_per_head = 0, batch_heads = 0;

  explicit QueryGroups(const AttentionParams& p)
      : blocks_per_head(ceil_div(p.seqlen_q, kBlockQueries)), batch_heads(p.batch * p.heads_q) {
    group_blocks = kMaxGroupBlocks;
    while (group_blocks > 1 && batch_heads * ceil_div(blocks_per_head, group_blocks) < kTargetItems) {
      group_blocks /= 2;
    }
    groups_per_head = ceil_div(blocks_per_head, group_blocks);
  }

  int64_t count() const { return batch_heads * groups_per_head; }

  QueryGroup group(const AttentionParams& p, int64_t item) const {
    QueryGroup group;
    const int64_t batch_head = item / groups_per_head;
    const int64_t first_block = (item % groups_per_head) * group_blocks;
    group.size = std::min(group_blocks, blocks_per_head - first_block);
    bool any_keys = false;
    for (int64_t g = 0; g < group.size; ++g) {
      const QueryBlock block(p, batch_head * blocks_per_head + first_block + g);
      group.blocks[g] = block;
      if (block.key_begin >= block.key_end) continue;
      group.key_begin = any_keys ? std::min(group.key_begin, block.key_begin) : block.key_begin;
      group.key_end = any_keys ? std::max(group.key_end, block.key_end) : block.key_end;
      any_keys = true;
    }
    return group;
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
