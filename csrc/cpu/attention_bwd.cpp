// fastattn::bwd on the CPU: fused softmax attention, backward.
//
// Given dout, q, k, v, out and lse (from fastattn::fwd), computes dq, dk, dv for the same
// contract as the forward (full / causal / sliding window, GQA/MQA, key padding, Nq != Nk,
// fp32 / fp64 / bf16 / fp16, head dims 1..256, strided inputs). Scores are recomputed from lse
// (P = 2^(scale * log2(e) * S - lse * log2(e))), never stored:
//
//   parallel over (batch, kv head, chunk of query rows); the chunk's query blocks are taken up to
//   4 at a time, each with its q^T, dout^T and delta = rowsum(dout * out) packed once, each key
//   block j loaded once for them, and for every query block i of the group that key block j's
//   window reaches:
//     dq_i += dS_ij k_j,   dk_j += dS_ij^T q_i,   dv_j += P_ij^T dout_i
//   with dS = P * (dP - delta), dP = dout v^T: five tile products per (i, j);
//   reduction: a key block that only one chunk reaches is written to dk, dv by that chunk once
//   its query groups are past it; the others are the chunks' partial sums, added in chunk order.
//
// Tiles are computed transposed (S^T = k q^T, dP^T = v dout^T), as in the forward. A chunk owns
// its dq rows outright, the dk/dv rows of its exclusive key blocks and its own dk/dv partial
// buffers, so there are no atomics. With a sliding window a chunk's live dk/dv sums are a ring of
// a few key blocks that stays in L2 (ChunkAccumulator). The number of chunks is a function of the
// shape alone (enough work items for 16 threads, chunks of at least 256 rows, partial buffers
// within a memory budget), so results are bitwise identical run after run and for any thread
// count. Only blocks inside the window are visited (cost ~ N * window).
//
// bf16 inputs run on bf16 pair products (AMX tiles, or AVX512-BF16 vectors without AMX; see
// amx.h) when the CPU allows it (attention_backward_bf16_pairs below): the same chunks, tiles and
// fp32 softmax statistics, with the five products as bf16 x bf16 -> fp32 multiplies.
//
// Not supported: a gradient flowing into lse (it is returned as non-differentiable).
#include "cpu/attention_tiles.h"  // first: selects at::vec's ISA
#include "cpu/amx.h"

#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "attention_api.h"

namespace fastattn::cpu {
namespace {

// dst rows = multiplier * src rows, converted to the output dtype.
template <typename acc_t, typename scalar_t>
inline void unpack_rows(acc_t* src, int64_t ld, int64_t rows, int64_t cols, acc_t multiplier,
                        scalar_t* dst, int64_t dst_row_stride) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  for (int64_t r = 0; r < rows; ++r) {
    acc_t* row = src + r * ld;
    if constexpr (std::is_same_v<acc_t, scalar_t>) {  // one pass: scaled straight into the output row
      for (int64_t c = 0; c < cols; c += L) {
        const int count = static_cast<int>(std::min(L, cols - c));
        (Vec::loadu(row + c) * Vec(multiplier)).store(dst + r * dst_row_stride + c, count);
      }
    } else {
      for (int64_t c = 0; c < ld; c += L) (Vec::loadu(row + c) * Vec(multiplier)).store(row + c);
      at::vec::convert(row, dst + r * dst_row_stride, cols);
    }
  }
}

// reusable_storage slots of the backward's fp32 / fp64 dk / dv partial sums.
constexpr int kBackwardSlots = 2;

// The buffers of one thread: packed rows of q, dout (per query block of a group), k, v where the
// inputs cannot be used in place, the S^T / P^T and dP^T / dS^T tiles, the group's dq
// accumulators, the ring of dk / dv sums of a sliding window (ChunkAccumulator), and what every
// tile of a query block reads: q^T and dout^T (one panel per block, [D x kBlockQueries] and
// [Dv x kBlockQueries], the B operands of S^T = k q^T and dP^T = v dout^T), delta and
// lse * log2(e). Queries past a block's rows are padding: q^T = dout^T = 0, delta = 0
// and lse_log2 = +inf, so their P is 0; lse_log2 is +inf also for rows that saw no key in the
// forward (lse = -inf). Packed by the item that owns the block, where the main pass needs them:
// a pre-pass into buffers for the whole problem cost a round trip through memory and, past the
// caches' size, page faults on fresh buffers (fp32 window backward, N = 64k, 2-core Xeon).
// Every buffer is written before it is read (the row copies' padding columns by rows_operand),
// so none is zeroed here (B=1, H=8, N=16, 1 thread: 64-79 us a call zeroed, 53-62 us not).
template <typename acc_t>
struct Workspace {
  int64_t d_pad, dv_pad;
  UninitializedBuffer<acc_t> q, dout, k, v, probs_t, dscores_t, dq, q_t, dout_t, delta, lse_log2;
  UninitializedBuffer<acc_t> ring_dk, ring_dv;  // ChunkAccumulator's ring (zeroed block by block)

  Workspace(int64_t D, int64_t Dv, int64_t ring_blocks)
      : d_pad(round_up(D, Vectorized<acc_t>::size())), dv_pad(round_up(Dv, Vectorized<acc_t>::size())),
        q(kMaxGroupBlocks * kBlockQueries * d_pad), dout(kMaxGroupBlocks * kBlockQueries * dv_pad),
        k(kBlockKeys * d_pad), v(kBlockKeys * dv_pad),
        probs_t(kBlockKeys * kBlockQueries), dscores_t(kBlockKeys * kBlockQueries),
        dq(kMaxGroupBlocks * kBlockQueries * d_pad), q_t(kMaxGroupBlocks * D * kBlockQueries),
        dout_t(kMaxGroupBlocks * Dv * kBlockQueries), delta(kMaxGroupBlocks * kBlockQueries),
        lse_log2(kMaxGroupBlocks * kBlockQueries), ring_dk(ring_blocks * kBlockKeys * d_pad),
        ring_dv(ring_blocks * kBlockKeys * dv_pad) {}

  // Member g's panels and row statistics.
  acc_t* q_t_of(int64_t g, int64_t D) { return q_t.data() + g * D * kBlockQueries; }
  acc_t* dout_t_of(int64_t g, int64_t Dv) { return dout_t.data() + g * Dv * kBlockQueries; }
  acc_t* delta_of(int64_t g) { return delta.data() + g * kBlockQueries; }
  acc_t* lse_log2_of(int64_t g) { return lse_log2.data() + g * kBlockQueries; }
};

// How the query rows of every (batch, kv head) are cut into chunks, the key range each chunk
// reaches (whole key blocks), where its dk/dv partial sums live, the key blocks that no other
// chunk reaches (their sums are final once the chunk is done with them), and the ring size of a
// sliding window (see ChunkAccumulator).
struct ChunkPlan {
  static constexpr int64_t kGroupRows = kMaxGroupBlocks * kBlockQueries;  // query rows of one group
  int64_t count = 0, rows = 0;                    // chunks, query rows per chunk (whole blocks)
  std::vector<int64_t> key_begin, key_end;        // per chunk, whole key blocks (may pass Nk)
  std::vector<int64_t> exclusive_begin, exclusive_end;  // per chunk, the key rows no other chunk reaches
  std::vector<int64_t> offset;                    // per chunk: first key row of its partial buffer
  int64_t partial_rows = 0;                       // sum of the chunks' key ranges
  int64_t ring_blocks = 0;                        // 0: chunks sum in their partial rows

  // The key blocks [first, end) that the query rows [row0, row_end) reach; end >= first. Both
  // ends only move up with row0 and row_end (the window is the same for every row).
  static std::pair<int64_t, int64_t> key_blocks(const AttentionParams& p, int64_t row0, int64_t row_end) {
    const int64_t first = p.first_visible_key(row0) / kBlockKeys;
    return {first, std::max(first, ceil_div(p.end_visible_key(row_end - 1), kBlockKeys))};
  }

  ChunkPlan(const AttentionParams& p, int64_t row_bytes) {
    constexpr int64_t kTargetItems = 16;             // work items to aim for: threads of a large CPU
    constexpr int64_t kMinChunkRows = 4 * kBlockQueries;
    constexpr int64_t kPartialBudgetBytes = int64_t(512) << 20;
    if (p.seqlen_q == 0) return;
    const int64_t pairs = p.batch * p.heads_kv;
    int64_t wanted = std::min(ceil_div(kTargetItems, pairs), ceil_div(p.seqlen_q, kMinChunkRows));
    // Full attention gives every chunk a partial buffer of all Nk keys: keep those within budget.
    const int64_t full_width_bytes = pairs * p.seqlen_k * row_bytes;
    if (full_width_bytes > 0) wanted = std::min(wanted, std::max<int64_t>(1, kPartialBudgetBytes / full_width_bytes));
    wanted = std::max<int64_t>(1, wanted);
    rows = round_up(ceil_div(p.seqlen_q, wanted), kBlockQueries);
    count = ceil_div(p.seqlen_q, rows);
    int64_t widest_group = 0, widest_chunk = 0;  // in key blocks
    for (int64_t c = 0; c < count; ++c) {
      const int64_t row_begin = c * rows, row_end = std::min(p.seqlen_q, row_begin + rows);
      // Whole blocks: a tile product writes all rows of the key block it covers.
      const auto [first, end] = key_blocks(p, row_begin, row_end);
      key_begin.push_back(first * kBlockKeys);
      key_end.push_back(end * kBlockKeys);
      offset.push_back(partial_rows);
      partial_rows += (end - first) * kBlockKeys;
      widest_chunk = std::max(widest_chunk, end - first);
      for (int64_t group0 = row_begin; group0 < row_end; group0 += kGroupRows) {
        const auto [group_first, group_end] = key_blocks(p, group0, std::min(row_end, group0 + kGroupRows));
        widest_group = std::max(widest_group, group_end - group_first);
      }
    }
    // A key is exclusive to chunk c when no other chunk's range holds it: past the ranges of the
    // chunks before c and before those of the chunks after it (ranges only move up with c).
    exclusive_begin.resize(count);
    exclusive_end.resize(count);
    int64_t reached_before = 0, reached_after = std::numeric_limits<int64_t>::max();
    for (int64_t c = 0; c < count; ++c) {
      exclusive_begin[c] = std::min(std::max(key_begin[c], reached_before), key_end[c]);
      reached_before = std::max(reached_before, key_end[c]);
    }
    for (int64_t c = count - 1; c >= 0; --c) {
      exclusive_end[c] = std::max(exclusive_begin[c], std::min(key_end[c], reached_after));
      reached_after = std::min(reached_after, key_begin[c]);
    }
    ring_blocks = widest_group < widest_chunk ? widest_group : 0;
  }

  // True when the key block at key0 is exclusive to `chunk`, or to any one chunk.
  bool exclusive_to(int64_t chunk, int64_t key0) const {
    return key0 >= exclusive_begin[chunk] && key0 < exclusive_end[chunk];
  }
  bool exclusive(int64_t key0) const {
    for (int64_t c = 0; c < count; ++c) {
      if (exclusive_to(c, key0)) return true;
    }
    return false;
  }
};

// For one tile (keys [key0, key0 + keys) given as operand rows k and v; query rows
// [row0, row0 + rows) with their q^T / dout^T panels, lse_log2 and delta, see Workspace) recomputes
// P^T = 2^(S^T * scale * log2(e) - lse_log2) and dS^T = P^T * (dP^T - delta) into the workspace.
template <typename acc_t>
inline void probabilities_and_dscores(const AttentionParams& p, int64_t batch, int64_t key0, int64_t keys,
                                      const acc_t* k, int64_t k_ld, const acc_t* v, int64_t v_ld,
                                      const acc_t* q_t, const acc_t* dout_t, const acc_t* lse_log2,
                                      const acc_t* delta, int64_t row0, int64_t rows, acc_t scale_log2,
                                      Workspace<acc_t>& w) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t L = Vec::size();
  constexpr int64_t BM = kBlockQueries;
  const int64_t row_width = round_up(rows, L);
  acc_t* probs_t = w.probs_t.data();
  acc_t* dscores_t = w.dscores_t.data();
  gemm<acc_t, Accumulate::kOverwrite>(keys, row_width, p.head_dim, k, k_ld, 1, q_t, BM, probs_t, BM);
  mask_scores(p, batch, key0, keys, row0, rows, BM, probs_t);
  gemm<acc_t, Accumulate::kOverwrite>(keys, row_width, p.head_dim_v, v, v_ld, 1, dout_t, BM, dscores_t, BM);
  const Vec scale_vec(scale_log2);
  for (int64_t c = 0; c < row_width; c += L) {
    const Vec shift = Vec::loadu(lse_log2 + c);
    const Vec row_delta = Vec::loadu(delta + c);
    for (int64_t j = 0; j < keys; ++j) {
      const Vec prob = exp2(multiply_subtract(Vec::loadu(probs_t + j * BM + c), scale_vec, shift));
      prob.store(probs_t + j * BM + c);
      (prob * (Vec::loadu(dscores_t + j * BM + c) - row_delta)).store(dscores_t + j * BM + c);
    }
  }
}

// delta = rowsum(dout * out) and lse * log2(e) (+inf where lse = -inf, so that P = 0) for the
// query rows [row0, row0 + rows) of (batch, head).
template <typename scalar_t, typename acc_t>
inline void row_statistics(const AttentionParams& p, int64_t batch, int64_t head, int64_t row0, int64_t rows,
                           acc_t* delta, acc_t* lse_log2) {
  constexpr acc_t kLog2e = acc_t(1.4426950408889634);
  const auto* out_base = static_cast<const scalar_t*>(p.out);
  const auto* dout_base = static_cast<const scalar_t*>(p.dout);
  const auto* lse = static_cast<const acc_t*>(p.lse) + (batch * p.heads_q + head) * p.seqlen_q + row0;
  for (int64_t i = 0; i < rows; ++i) {
    const scalar_t* o = out_base + p.out_strides.offset(batch, head, row0 + i);
    const scalar_t* d_o = dout_base + p.dout_strides.offset(batch, head, row0 + i);
    acc_t dot = 0;
    for (int64_t d = 0; d < p.head_dim_v; ++d) dot += static_cast<acc_t>(o[d]) * static_cast<acc_t>(d_o[d]);
    delta[i] = dot;
    lse_log2[i] = lse[i] == -std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::infinity()
                                                                     : lse[i] * kLog2e;
  }
}

// Member g's q^T and dout^T panels, delta and lse_log2 (see Workspace) for the query rows
// [row0, row0 + rows) of (batch, head); columns [rows, kBlockQueries) are the padding queries.
template <typename scalar_t, typename acc_t>
inline void pack_query_block(const AttentionParams& p, int64_t batch, int64_t head, int64_t row0, int64_t rows,
                             acc_t* q_t, acc_t* dout_t, acc_t* delta, acc_t* lse_log2) {
  constexpr int64_t BM = kBlockQueries;
  pack_rows_transposed(static_cast<const scalar_t*>(p.q) + p.q_strides.offset(batch, head, row0), p.q_strides.row,
                       rows, BM, p.head_dim, q_t, BM);
  pack_rows_transposed(static_cast<const scalar_t*>(p.dout) + p.dout_strides.offset(batch, head, row0),
                       p.dout_strides.row, rows, BM, p.head_dim_v, dout_t, BM);
  row_statistics<scalar_t>(p, batch, head, row0, rows, delta, lse_log2);
  std::fill(delta + rows, delta + BM, acc_t(0));
  std::fill(lse_log2 + rows, lse_log2 + BM, std::numeric_limits<acc_t>::infinity());
}

// The dk/dv partial sums of every chunk (fp32/fp64 rows of d_pad / dv_pad, per (batch, kv head)
// the chunks' key ranges in order) and their reduction into dk = scale * sum, dv = sum, added in
// chunk order, written in the output dtype, for the keys that no chunk wrote out itself
// (ChunkAccumulator writes its exclusive key blocks straight to dk / dv).
//
// The storage is kept between calls (reusable_storage), so it is not zero to start with: the
// item that owns a chunk's rows zeroes each key block as it starts on it (ChunkAccumulator), in
// parallel rather than one thread zeroing everything. Rows that no item touches (the exclusive
// blocks of a chunk that sums in a ring) are never read either, and a fresh buffer's pages of
// them are never faulted in.
template <typename acc_t>
struct Partials {
  const ChunkPlan& chunks;
  int64_t d_pad, dv_pad;
  UninitializedBuffer<acc_t> dk_local, dv_local;
  acc_t *dk, *dv;

  Partials(const AttentionParams& p, const ChunkPlan& plan, int64_t d_pad_, int64_t dv_pad_)
      : chunks(plan), d_pad(d_pad_), dv_pad(dv_pad_) {
    const int64_t rows = p.batch * p.heads_kv * plan.partial_rows;
    dk = reusable_storage<acc_t, kBackwardSlots>(0, rows * d_pad, dk_local);
    dv = reusable_storage<acc_t, kBackwardSlots>(1, rows * dv_pad, dv_local);
  }

  // First row of the chunk's buffers, shifted so that they can be indexed by absolute key row.
  int64_t row_origin(int64_t kv_batch_head, int64_t chunk) const {
    return kv_batch_head * chunks.partial_rows + chunks.offset[chunk] - chunks.key_begin[chunk];
  }
  acc_t* dk_rows(int64_t kv_batch_head, int64_t chunk) { return dk + row_origin(kv_batch_head, chunk) * d_pad; }
  acc_t* dv_rows(int64_t kv_batch_head, int64_t chunk) { return dv + row_origin(kv_batch_head, chunk) * dv_pad; }

  template <typename scalar_t>
  void reduce_into(const AttentionParams& p, acc_t scale) const {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t BN = kBlockKeys;
    const int64_t key_blocks = ceil_div(p.seqlen_k, BN);
    auto no_workspace = [] { return 0; };
    parallel_over_blocks(p.batch * p.heads_kv * key_blocks, no_workspace, [&](int64_t item, int) {
      const int64_t key_block = item % key_blocks, kv_batch_head = item / key_blocks;
      const int64_t kv_head = kv_batch_head % p.heads_kv, batch = kv_batch_head / p.heads_kv;
      const int64_t key0 = key_block * BN, keys = std::min(BN, p.seqlen_k - key0);
      if (chunks.exclusive(key0)) return;  // written by the chunk that owns it
      Buffer<acc_t> dk_sum(keys * d_pad, acc_t(0)), dv_sum(keys * dv_pad, acc_t(0));
      for (int64_t chunk = 0; chunk < chunks.count; ++chunk) {
        const int64_t first = std::max(key0, chunks.key_begin[chunk]);
        const int64_t end = std::min(key0 + keys, chunks.key_end[chunk]);
        const int64_t origin = row_origin(kv_batch_head, chunk);
        for (int64_t key = first; key < end; ++key) {
          acc_t* dk_row = dk_sum.data() + (key - key0) * d_pad;
          acc_t* dv_row = dv_sum.data() + (key - key0) * dv_pad;
          const acc_t* dk_part = dk + (origin + key) * d_pad;
          const acc_t* dv_part = dv + (origin + key) * dv_pad;
          for (int64_t d = 0; d < d_pad; d += Vec::size()) (Vec::loadu(dk_row + d) + Vec::loadu(dk_part + d)).store(dk_row + d);
          for (int64_t d = 0; d < dv_pad; d += Vec::size()) (Vec::loadu(dv_row + d) + Vec::loadu(dv_part + d)).store(dv_row + d);
        }
      }
      unpack_rows(dk_sum.data(), d_pad, keys, p.head_dim, scale,
                  static_cast<scalar_t*>(p.dk) + p.dk_strides.offset(batch, kv_head, key0), p.dk_strides.row);
      unpack_rows(dv_sum.data(), dv_pad, keys, p.head_dim_v, acc_t(1),
                  static_cast<scalar_t*>(p.dv) + p.dv_strides.offset(batch, kv_head, key0), p.dv_strides.row);
    });
  }
};

// The dk / dv sums of one chunk while its query groups run in order. A group reaches the key
// blocks [first, end) of ChunkPlan::key_blocks, and both ends only move up from one group to the
// next, so the blocks below a group's first are final for this chunk (cover() retires them).
// With a sliding window, ChunkPlan::ring_blocks of them are live at a time: the chunk then sums
// in a ring of that many blocks in the thread's workspace (~400 KiB for fp32, D = 64, window
// (256, 256): it stays in L2), and a retired block goes to dk / dv if it is exclusive to the chunk
// and to the chunk's partial rows if another chunk reaches it too. Without a ring (full and
// causal attention, where the chunk's widest group reaches all of its keys) the chunk sums in its
// partial rows; its exclusive blocks are still written out when retired, so that
// Partials::reduce_into adds up only the keys that chunks share. Before the ring every chunk kept partial rows for its
// whole key range: at N = 64k (fp32, 8 heads, D = 64) 270 MB of fresh pages per call, page-faulted
// in, written and read back from memory by a separate reduction.
template <typename acc_t, typename scalar_t>
class ChunkAccumulator {
 public:
  // ring_dk / ring_dv: ChunkPlan::ring_blocks key blocks of rows each, or null to sum in place.
  ChunkAccumulator(const AttentionParams& p, Partials<acc_t>& partials, int64_t kv_batch_head, int64_t chunk,
                   acc_t* ring_dk, acc_t* ring_dv)
      : p_(p), partials_(partials), kv_batch_head_(kv_batch_head), chunk_(chunk), ring_dk_(ring_dk),
        ring_dv_(ring_dv), ring_blocks_(ring_dk == nullptr ? 0 : partials.chunks.ring_blocks),
        chunk_end_(partials.chunks.key_end[chunk] / kBlockKeys),
        live_begin_(partials.chunks.key_begin[chunk] / kBlockKeys), live_end_(live_begin_) {}

  // The next group reaches key blocks [first, end): retires the blocks below first and zeroes those
  // up to end as they start.
  void cover(int64_t first, int64_t end) {
    first = std::min(first, chunk_end_);
    for (end = std::min(end, chunk_end_); live_end_ < end; ++live_end_) {
      retire_below(std::min(first, live_end_));  // frees the ring slot before it is reused
      std::fill(dk_block(live_end_ * kBlockKeys), dk_block(live_end_ * kBlockKeys) + kBlockKeys * partials_.d_pad,
                acc_t(0));
      std::fill(dv_block(live_end_ * kBlockKeys), dv_block(live_end_ * kBlockKeys) + kBlockKeys * partials_.dv_pad,
                acc_t(0));
    }
    retire_below(std::min(first, live_end_));
  }
  void finish() { retire_below(live_end_); }

  // The rows of the live key block at key0.
  acc_t* dk_block(int64_t key0) {
    return block_rows(ring_dk_, partials_.dk_rows(kv_batch_head_, chunk_), key0, partials_.d_pad);
  }
  acc_t* dv_block(int64_t key0) {
    return block_rows(ring_dv_, partials_.dv_rows(kv_batch_head_, chunk_), key0, partials_.dv_pad);
  }

 private:
  acc_t* block_rows(acc_t* ring, acc_t* chunk_rows, int64_t key0, int64_t ld) const {
    if (ring_blocks_ == 0) return chunk_rows + key0 * ld;  // indexed by absolute key row
    return ring + (key0 / kBlockKeys % ring_blocks_) * kBlockKeys * ld;
  }

  void retire_below(int64_t block) {
    for (; live_begin_ < block; ++live_begin_) retire(live_begin_ * kBlockKeys);
  }

  void retire(int64_t key0) {
    const int64_t d_pad = partials_.d_pad, dv_pad = partials_.dv_pad;
    if (partials_.chunks.exclusive_to(chunk_, key0)) {
      const int64_t keys = std::min(kBlockKeys, p_.seqlen_k - key0);
      if (keys <= 0) return;
      const int64_t batch = kv_batch_head_ / p_.heads_kv, kv_head = kv_batch_head_ % p_.heads_kv;
      unpack_rows(dk_block(key0), d_pad, keys, p_.head_dim, static_cast<acc_t>(p_.scale),
                  static_cast<scalar_t*>(p_.dk) + p_.dk_strides.offset(batch, kv_head, key0), p_.dk_strides.row);
      unpack_rows(dv_block(key0), dv_pad, keys, p_.head_dim_v, acc_t(1),
                  static_cast<scalar_t*>(p_.dv) + p_.dv_strides.offset(batch, kv_head, key0), p_.dv_strides.row);
    } else if (ring_blocks_ > 0) {
      std::copy_n(dk_block(key0), kBlockKeys * d_pad, partials_.dk_rows(kv_batch_head_, chunk_) + key0 * d_pad);
      std::copy_n(dv_block(key0), kBlockKeys * dv_pad, partials_.dv_rows(kv_batch_head_, chunk_) + key0 * dv_pad);
    }
  }

  const AttentionParams& p_;
  Partials<acc_t>& partials_;
  const int64_t kv_batch_head_, chunk_;
  acc_t *const ring_dk_, *const ring_dv_;
  const int64_t ring_blocks_, chunk_end_;
  int64_t live_begin_, live_end_;  // the live key blocks
};

template <typename scalar_t>
void attention_backward_kernel(const AttentionParams& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t BM = kBlockQueries;
  constexpr int64_t BN = kBlockKeys;
  constexpr acc_t kLog2e = acc_t(1.4426950408889634);
  const int64_t D = p.head_dim;
  const int64_t Dv = p.head_dim_v;
  const acc_t scale = static_cast<acc_t>(p.scale);
  const acc_t scale_log2 = scale * kLog2e;

  const auto* q_base = static_cast<const scalar_t*>(p.q);
  const auto* k_base = static_cast<const scalar_t*>(p.k);
  const auto* v_base = static_cast<const scalar_t*>(p.v);
  const auto* dout_base = static_cast<const scalar_t*>(p.dout);
  auto* dq_base = static_cast<scalar_t*>(p.dq);

  const int64_t D_pad = round_up(D, Vectorized<acc_t>::size());
  const int64_t Dv_pad = round_up(Dv, Vectorized<acc_t>::size());
  const ChunkPlan chunks(p, (D_pad + Dv_pad) * int64_t(sizeof(acc_t)));
  Partials<acc_t> partials(p, chunks, D_pad, Dv_pad);
  auto make_workspace = [&] { return Workspace<acc_t>(D, Dv, chunks.ring_blocks); };

  // Main pass: each item is one chunk of query rows of one (batch, kv head), for every query head
  // of its GQA group.
  parallel_over_blocks(p.batch * p.heads_kv * chunks.count, make_workspace, [&](int64_t item, Workspace<acc_t>& w) {
    const int64_t chunk = item % chunks.count;
    const int64_t kv_batch_head = item / chunks.count;
    const int64_t kv_head = kv_batch_head % p.heads_kv, batch = kv_batch_head / p.heads_kv;
    const int64_t row_begin = chunk * chunks.rows, row_end = std::min(p.seqlen_q, row_begin + chunks.rows);
    ChunkAccumulator<acc_t, scalar_t> key_sums(p, partials, kv_batch_head, chunk,
                                               chunks.ring_blocks > 0 ? w.ring_dk.data() : nullptr,
                                               chunks.ring_blocks > 0 ? w.ring_dv.data() : nullptr);
    // Up to kMaxGroupBlocks query blocks at a time share each key block, so that its k and v rows
    // and its dk/dv rows are read once per group, not once per query block (as in the forward's
    // QueryGroups). The GQA group's heads run inside the loop over query groups, so that a key
    // block is final for all of them once the groups are past it. Every accumulator sums its tiles
    // in an order fixed by the shape (dq over key blocks; the chunk's dk/dv over query groups, then
    // heads, then query blocks), so the results do not depend on the thread count.
    for (int64_t group0 = row_begin; group0 < row_end; group0 += ChunkPlan::kGroupRows) {
      const int64_t group_end = std::min(row_end, group0 + ChunkPlan::kGroupRows);
      const int64_t members = ceil_div(group_end - group0, BM);
      int64_t first_key[kMaxGroupBlocks], end_key[kMaxGroupBlocks];
      for (int64_t g = 0; g < members; ++g) {
        const int64_t row0 = group0 + g * BM, rows = std::min(BM, row_end - row0);
        // Whole key blocks, so that each lands on the same rows of the dk/dv sums.
        first_key[g] = p.first_visible_key(row0) / BN * BN;
        end_key[g] = p.end_visible_key(row0 + rows - 1);
      }
      const auto [first_block, end_block] = ChunkPlan::key_blocks(p, group0, group_end);
      key_sums.cover(first_block, end_block);
      for (int64_t head = kv_head * p.kv_group(); head < (kv_head + 1) * p.kv_group(); ++head) {
        const acc_t* q[kMaxGroupBlocks];
        const acc_t* dout[kMaxGroupBlocks];
        int64_t q_ld[kMaxGroupBlocks], dout_ld[kMaxGroupBlocks];
        for (int64_t g = 0; g < members; ++g) {
          const int64_t row0 = group0 + g * BM, rows = std::min(BM, row_end - row0);
          dout[g] = rows_operand(dout_base + p.dout_strides.offset(batch, head, row0), p.dout_strides.row, rows, Dv,
                                 /*b_operand=*/true, w.dout.data() + g * BM * Dv_pad, Dv_pad, &dout_ld[g]);
          q[g] = rows_operand(q_base + p.q_strides.offset(batch, head, row0), p.q_strides.row, rows, D,
                              /*b_operand=*/true, w.q.data() + g * BM * D_pad, D_pad, &q_ld[g]);
          pack_query_block<scalar_t>(p, batch, head, row0, rows, w.q_t_of(g, D), w.dout_t_of(g, Dv), w.delta_of(g),
                                     w.lse_log2_of(g));
        }
        std::fill_n(w.dq.begin(), members * BM * D_pad, acc_t(0));
        for (int64_t key0 = first_block * BN; key0 < end_block * BN; key0 += BN) {
          const int64_t keys = std::min(BN, p.seqlen_k - key0);
          if (all_keys_padded(p, batch, key0, keys)) continue;
          int64_t k_ld, v_ld;
          // k is both the A operand of S^T and the B operand of dq.
          const acc_t* k = rows_operand(k_base + p.k_strides.offset(batch, kv_head, key0), p.k_strides.row, keys, D,
                                        /*b_operand=*/true, w.k.data(), D_pad, &k_ld);
          const acc_t* v = rows_operand(v_base + p.v_strides.offset(batch, kv_head, key0), p.v_strides.row, keys, Dv,
                                        /*b_operand=*/false, w.v.data(), Dv_pad, &v_ld);
          for (int64_t g = 0; g < members; ++g) {
            if (key0 < first_key[g] || key0 >= end_key[g]) continue;
            const int64_t row0 = group0 + g * BM, rows = std::min(BM, row_end - row0);
            acc_t* dq = w.dq.data() + g * BM * D_pad;
            probabilities_and_dscores(p, batch, key0, keys, k, k_ld, v, v_ld, w.q_t_of(g, D), w.dout_t_of(g, Dv),
                                      w.lse_log2_of(g), w.delta_of(g), row0, rows, scale_log2, w);
            // dv += P^T dout and dk += dS^T q (rows of the transposed tiles as A); dq += dS k, with
            // dS[i][j] = dS^T[j][i] read through strides.
            gemm<acc_t, Accumulate::kAdd>(keys, Dv_pad, rows, w.probs_t.data(), BM, 1, dout[g], dout_ld[g],
                                          key_sums.dv_block(key0), Dv_pad);
            gemm<acc_t, Accumulate::kAdd>(keys, D_pad, rows, w.dscores_t.data(), BM, 1, q[g], q_ld[g],
                                          key_sums.dk_block(key0), D_pad);
            gemm<acc_t, Accumulate::kAdd>(rows, D_pad, keys, w.dscores_t.data(), 1, BM, k, k_ld, dq, D_pad);
          }
        }
        for (int64_t g = 0; g < members; ++g) {
          const int64_t row0 = group0 + g * BM, rows = std::min(BM, row_end - row0);
          unpack_rows(w.dq.data() + g * BM * D_pad, D_pad, rows, D, scale,
                      dq_base + p.dq_strides.offset(batch, head, row0), p.dq_strides.row);
        }
      }
    }
    key_sums.finish();
  });

  partials.template reduce_into<scalar_t>(p, scale);
}

#if defined(FASTATTN_HAS_BF16_PAIRS)
// The B operands of one query block for the bf16 pair backward, in VNNI bf16 form: q^T and dout^T
// (k = head dim, for S^T = k q^T and dP^T = v dout^T) and q, dout by pairs of rows (k = queries,
// for dk += dS^T q and dv += P^T dout). Padding queries and head-dim columns are zero.
struct PairQueryPanels {
  int64_t d_pad, dv_pad, blocks;
  Buffer<BFloat16> q_t, dout_t, q_pairs, dout_pairs;
  PairQueryPanels(int64_t batch_heads, int64_t blocks_, int64_t d_pad_, int64_t dv_pad_)
      : d_pad(d_pad_), dv_pad(dv_pad_), blocks(blocks_), q_t(batch_heads * blocks * d_pad * kBlockQueries),
        dout_t(batch_heads * blocks * dv_pad * kBlockQueries), q_pairs(q_t.size()), dout_pairs(dout_t.size()) {}
  int64_t index(int64_t batch_head, int64_t row0) const { return batch_head * blocks + row0 / kBlockQueries; }
  BFloat16* q_t_at(int64_t batch_head, int64_t row0) { return q_t.data() + index(batch_head, row0) * d_pad * kBlockQueries; }
  BFloat16* dout_t_at(int64_t batch_head, int64_t row0) {
    return dout_t.data() + index(batch_head, row0) * dv_pad * kBlockQueries;
  }
  BFloat16* q_pairs_at(int64_t batch_head, int64_t row0) {
    return q_pairs.data() + index(batch_head, row0) * d_pad * kBlockQueries;
  }
  BFloat16* dout_pairs_at(int64_t batch_head, int64_t row0) {
    return dout_pairs.data() + index(batch_head, row0) * dv_pad * kBlockQueries;
  }
};

// For one tile: P^T = 2^(S^T * scale * log2(e) - lse_log2) and dS^T = P^T * (dP^T - delta) on
// rows [0, keys) (rows past them are zero), written as bf16 rows (the A operands of
// dv += P^T dout and dk += dS^T q) and dS^T also by pairs of rows in VNNI form (the B operand of
// dq^T += k^T dS^T).
inline void pair_probabilities_and_dscores(const float* scores_t, const float* dprobs_t, int64_t keys,
                                          const float* lse_log2, const float* delta, float scale_log2,
                                          BFloat16* probs, BFloat16* dscores, BFloat16* dscores_vnni) {
  constexpr int64_t BM = kBlockQueries;
  const __m512 scale = _mm512_set1_ps(scale_log2);
  for (int64_t pair = 0; 2 * pair < kBlockKeys; ++pair) {
    for (int64_t c = 0; c < BM; c += 16) {
      const __m512 shift = _mm512_loadu_ps(lse_log2 + c), row_delta = _mm512_loadu_ps(delta + c);
      __m512 dscore[2];
      for (int half = 0; half < 2; ++half) {
        const int64_t j = 2 * pair + half;
        __m512 prob = _mm512_setzero_ps();
        dscore[half] = _mm512_setzero_ps();
        if (j < keys) {
          prob = exp2(Vectorized<float>(_mm512_fmsub_ps(_mm512_loadu_ps(scores_t + j * BM + c), scale, shift)));
          dscore[half] = _mm512_mul_ps(prob, _mm512_sub_ps(_mm512_loadu_ps(dprobs_t + j * BM + c), row_delta));
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + j * BM + c), (__m256i)_mm512_cvtneps_pbh(prob));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dscores + j * BM + c), (__m256i)_mm512_cvtneps_pbh(dscore[half]));
      }
      _mm512_storeu_si512(dscores_vnni + pair * 2 * BM + 2 * c, interleave_bf16(dscore[0], dscore[1]));
    }
  }
}

// The bf16 backward on pair products (AMX or AVX512-BF16, pair_gemm): attention_backward_kernel's chunks and tiles, with q^T, dout^T and
// the pairs of q / dout rows packed once per query block, k, v and k^T once per (batch, kv head)
// (zero-padded to whole blocks, so tiles never read past the inputs), and the five products
//   S^T = k q^T,  dP^T = v dout^T,  dv += P^T dout,  dk += dS^T q,  dq^T += k^T dS^T
// as pair products accumulating in fp32.
void attention_backward_bf16_pairs(const AttentionParams& p) {
  constexpr int64_t BM = kBlockQueries;
  constexpr int64_t BN = kBlockKeys;
  static_assert(BM % 32 == 0 && BN % 32 == 0, "pair-product blocks are multiples of 32");
  constexpr float kLog2e = 1.4426950408889634f;
  const int64_t D = p.head_dim, Dv = p.head_dim_v;
  const int64_t D_pad = round_up(D, 32), Dv_pad = round_up(Dv, 32);
  const float scale = static_cast<float>(p.scale);
  const float scale_log2 = scale * kLog2e;
  const int64_t query_blocks = ceil_div(p.seqlen_q, BM);
  const int64_t Nq_pad = query_blocks * BM;
  const int64_t key_blocks = ceil_div(p.seqlen_k, BN);
  const int64_t key_rows = key_blocks * BN;

  const auto* q_base = static_cast<const BFloat16*>(p.q);
  const auto* k_base = static_cast<const BFloat16*>(p.k);
  const auto* v_base = static_cast<const BFloat16*>(p.v);
  const auto* dout_base = static_cast<const BFloat16*>(p.dout);
  auto* dq_base = static_cast<BFloat16*>(p.dq);

  // Per pass of kv heads (kv_heads_per_pass): the four B panels, delta and lse * log2(e) of their
  // query heads' blocks, and the zero-padded k and v rows and k^T of the kv heads, copied a block
  // of keys at a time. Every pass writes the same parts of each slot, so the padding stays zero.
  const int64_t kv_heads = p.batch * p.heads_kv, group = p.kv_group();
  const int64_t items_per_kv_head = group * query_blocks;
  const int64_t bytes_per_kv_head =
      int64_t(sizeof(BFloat16)) * (group * Nq_pad * 2 * (D_pad + Dv_pad) + key_rows * (2 * D_pad + Dv_pad)) +
      int64_t(sizeof(float)) * group * Nq_pad * 2;
  const int64_t heads_per_pass = kv_heads_per_pass(p, bytes_per_kv_head);
  PairQueryPanels panels(heads_per_pass * group, query_blocks, D_pad, Dv_pad);
  Buffer<float> delta(heads_per_pass * group * Nq_pad, 0.0f);
  Buffer<float> lse_log2(heads_per_pass * group * Nq_pad, std::numeric_limits<float>::infinity());
  Buffer<BFloat16> k_rows(heads_per_pass * key_rows * D_pad, BFloat16(0.0f));
  Buffer<BFloat16> v_rows(heads_per_pass * key_rows * Dv_pad, BFloat16(0.0f));
  Buffer<BFloat16> k_t(heads_per_pass * D_pad * key_rows, BFloat16(0.0f));
  auto no_workspace = [] { return 0; };

  const ChunkPlan chunks(p, (D_pad + Dv_pad) * int64_t(sizeof(float)));
  Partials<float> partials(p, chunks, D_pad, Dv_pad);
  struct Workspace {
    PairProductScope products;
    Buffer<float> scores_t, dprobs_t, dq_t;
    Buffer<BFloat16> probs, dscores, dscores_vnni;
    explicit Workspace(int64_t D_pad)
        : scores_t(BN * BM), dprobs_t(BN * BM), dq_t(D_pad * BM), probs(BN * BM), dscores(BN * BM),
          dscores_vnni(BN * BM) {}
  };
  auto make_workspace = [&] { return Workspace(D_pad); };
  const Buffer<float> dq_scale(BM, scale);  // the row scales of store_transposed_scaled: dq = scale * (dq^T)^T

  for (int64_t first_head = 0; first_head < kv_heads; first_head += heads_per_pass) {
    const int64_t pass_heads = std::min(heads_per_pass, kv_heads - first_head);
    const int64_t first_q_head = first_head * group;  // batch * heads_q + head of the pass's first query head
    parallel_over_blocks(pass_heads * items_per_kv_head, no_workspace, [&](int64_t pass_item, int) {
      const QueryBlock block(p, first_head * items_per_kv_head + pass_item);
      const int64_t slot = block.batch_head(p) - first_q_head, row0 = block.row0, rows = block.rows;
      const BFloat16* q = q_base + p.q_strides.offset(block.batch, block.head, row0);
      const BFloat16* dout = dout_base + p.dout_strides.offset(block.batch, block.head, row0);
      pack_transposed_vnni(q, p.q_strides.row, rows, BM, D, D_pad, panels.q_t_at(slot, row0), 2 * BM);
      pack_transposed_vnni(dout, p.dout_strides.row, rows, BM, Dv, Dv_pad, panels.dout_t_at(slot, row0), 2 * BM);
      pack_row_pairs_vnni(q, p.q_strides.row, rows, BM, D, D_pad, panels.q_pairs_at(slot, row0), 2 * D_pad);
      pack_row_pairs_vnni(dout, p.dout_strides.row, rows, BM, Dv, Dv_pad, panels.dout_pairs_at(slot, row0),
                          2 * Dv_pad);
      row_statistics<BFloat16>(p, block.batch, block.head, row0, rows, delta.data() + slot * Nq_pad + row0,
                               lse_log2.data() + slot * Nq_pad + row0);
    });
    parallel_over_blocks(pass_heads * key_blocks, no_workspace, [&](int64_t item, int) {
      const int64_t slot = item / key_blocks, key0 = (item % key_blocks) * BN;
      const int64_t batch = (first_head + slot) / p.heads_kv, kv_head = (first_head + slot) % p.heads_kv;
      const int64_t keys = std::min(BN, p.seqlen_k - key0);
      const BFloat16* k = k_base + p.k_strides.offset(batch, kv_head, key0);
      pack_rows(k, p.k_strides.row, keys, D, k_rows.data() + (slot * key_rows + key0) * D_pad, D_pad);
      pack_rows(v_base + p.v_strides.offset(batch, kv_head, key0), p.v_strides.row, keys, Dv,
                v_rows.data() + (slot * key_rows + key0) * Dv_pad, Dv_pad);
      transpose_rows(k, p.k_strides.row, keys, D, k_t.data() + slot * D_pad * key_rows + key0, key_rows);
    });

    parallel_over_blocks(pass_heads * chunks.count, make_workspace, [&](int64_t pass_item, Workspace& w) {
      const int64_t chunk = pass_item % chunks.count, slot = pass_item / chunks.count;
      const int64_t kv_batch_head = first_head + slot;
      const int64_t kv_head = kv_batch_head % p.heads_kv, batch = kv_batch_head / p.heads_kv;
      const int64_t row_begin = chunk * chunks.rows, row_end = std::min(p.seqlen_q, row_begin + chunks.rows);
      // Sums in place (no ring): its query blocks run head by head, each over the whole chunk.
      ChunkAccumulator<float, BFloat16> key_sums(p, partials, kv_batch_head, chunk, nullptr, nullptr);
      key_sums.cover(chunks.key_begin[chunk] / BN, chunks.key_end[chunk] / BN);
      const BFloat16* k_head = k_rows.data() + slot * key_rows * D_pad;
      const BFloat16* v_head = v_rows.data() + slot * key_rows * Dv_pad;
      const BFloat16* k_t_head = k_t.data() + slot * D_pad * key_rows;
      for (int64_t head = kv_head * group; head < (kv_head + 1) * group; ++head) {
        const int64_t q_slot = batch * p.heads_q + head - first_q_head;
        for (int64_t row0 = row_begin; row0 < row_end; row0 += BM) {
          const int64_t rows = std::min(BM, row_end - row0);
          std::fill(w.dq_t.begin(), w.dq_t.end(), 0.0f);
          const int64_t key_end = p.end_visible_key(row0 + rows - 1);
          for (int64_t key0 = p.first_visible_key(row0) / BN * BN; key0 < key_end; key0 += BN) {
            const int64_t keys = std::min(BN, p.seqlen_k - key0);
            if (all_keys_padded(p, batch, key0, keys)) continue;
            float* s_t = w.scores_t.data();
            pair_gemm<false>(BN, BM, D_pad, k_head + key0 * D_pad, D_pad, panels.q_t_at(q_slot, row0), 2 * BM, s_t,
                            BM);
            mask_scores(p, batch, key0, keys, row0, rows, BM, s_t);
            pair_gemm<false>(BN, BM, Dv_pad, v_head + key0 * Dv_pad, Dv_pad, panels.dout_t_at(q_slot, row0), 2 * BM,
                            w.dprobs_t.data(), BM);
            pair_probabilities_and_dscores(s_t, w.dprobs_t.data(), keys, lse_log2.data() + q_slot * Nq_pad + row0,
                                          delta.data() + q_slot * Nq_pad + row0, scale_log2, w.probs.data(),
                                          w.dscores.data(), w.dscores_vnni.data());
            pair_gemm<true>(BN, Dv_pad, BM, w.probs.data(), BM, panels.dout_pairs_at(q_slot, row0), 2 * Dv_pad,
                           key_sums.dv_block(key0), Dv_pad);
            pair_gemm<true>(BN, D_pad, BM, w.dscores.data(), BM, panels.q_pairs_at(q_slot, row0), 2 * D_pad,
                           key_sums.dk_block(key0), D_pad);
            pair_gemm<true>(D_pad, BM, BN, k_t_head + key0, key_rows, w.dscores_vnni.data(), 2 * BM, w.dq_t.data(),
                           BM);
          }
          store_transposed_scaled(w.dq_t.data(), BM, rows, D, dq_scale.data(),
                                  dq_base + p.dq_strides.offset(batch, head, row0), p.dq_strides.row);
        }
      }
      key_sums.finish();
    });
  }
  partials.reduce_into<BFloat16>(p, scale);
}
#endif  // FASTATTN_HAS_BF16_PAIRS

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    double scale, int64_t window_left, int64_t window_right) {
  check_backward_inputs(dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right);
  at::Tensor dq = empty_in_layout_of(q, q.size(3));
  at::Tensor dk = empty_in_layout_of(k, k.size(3));
  at::Tensor dv = empty_in_layout_of(v, v.size(3));
  const AttentionParams params = make_backward_params(dout, q, k, v, out, lse, key_padding_mask, dq, dk,
                                                      dv, scale, window_left, window_right);
#if defined(FASTATTN_HAS_BF16_PAIRS)
  if (q.scalar_type() == at::kBFloat16 && bf16_pairs_available()) {
    attention_backward_bf16_pairs(params);
    return {dq, dk, dv};
  }
#endif
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "fastattn::bwd (CPU)",
                                  [&] { attention_backward_kernel<scalar_t>(params); });
  return {dq, dk, dv};
}

}  // namespace
}  // namespace fastattn::cpu

TORCH_LIBRARY_IMPL(fastattn, CPU, m) {
  m.impl("bwd", &fastattn::cpu::attention_backward_cpu);
}
