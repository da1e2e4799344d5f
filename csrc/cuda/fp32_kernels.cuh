// The float32 kernels of fastattn::fwd and fastattn::bwd on CUDA: fused attention on the CUDA cores.
//
// Same contract and algorithm as the tensor-core kernels (forward_kernel.cuh, backward_kernels.cuh):
// full / causal / sliding window with the key-block range per CTA, GQA/MQA, key padding,
// Nq != Nk, lse, head dims 1..256 in the buckets 64, 128, 256, strided inputs, fully masked rows
// giving 0 / -inf / zero gradients; online softmax in the exp2 domain; backward as the shared
// pre-pass, a dk/dv kernel over key blocks and a dq kernel over query blocks, no atomics.
//
// The products are plain fp32 FMAs (no TF32), so results keep float32 accuracy; this path is
// meant to be correct and memory-lean, not fast (use fp16/bf16 for speed). Layout: 4 warps per
// CTA; tiles of 32 keys (or queries) sit in shared memory with a row stride of HD + 1 floats, so
// that lane j reading row j, or lanes reading one row, never collide on a bank. A lane computes the
// score of one key (query) against each of its warp's rows; output columns d = lane + 32 c are
// accumulated in registers, with the probabilities broadcast by warp shuffles.
//
// Not supported: dropout, other attention biases.
#pragma once

#include "cuda/device_common.cuh"

namespace fastattn::cuda {
namespace fp32 {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kTile = 32;  // keys per tile (forward, dq) and queries per tile (dk/dv): one per lane
// Every kernel declares __launch_bounds__(kThreads, 1): without the minimum-blocks hint ptxas
// aims at a higher occupancy and spilled registers to local memory in some instantiations.

// Query rows per warp (forward, dq) and keys per warp (dk/dv) per head-dim bucket: 8, or 4 where
// two such blocks plus two 32-row tiles would pass 99 KiB of shared memory.
template <int HD>
struct Config {
  static constexpr int kForwardRowsPerWarp = 8;
  static constexpr int kBackwardRowsPerWarp = HD == 256 ? 4 : 8;
  static constexpr int kForwardSharedBytes = (kWarps * kForwardRowsPerWarp + 2 * kTile) * (HD + 1) * 4;
  static constexpr int kBackwardSharedBytes = (2 * kWarps * kBackwardRowsPerWarp + 2 * kTile) * (HD + 1) * 4;
};

template <int HD>
constexpr int fp32_row_stride() {
  return HD + 1;
}

// Fills a ROWS x HD shared tile from rows [0, rows) x columns [0, cols) of a global tile, and
// zeros elsewhere (so padding adds nothing to any product).
template <int ROWS, int HD>
__device__ __forceinline__ void load_tile_fp32(float* smem, const float* gmem, int64_t row_stride, int rows, int cols) {
  const int lane = threadIdx.x % 32;
  for (int r = threadIdx.x / 32; r < ROWS; r += kWarps) {
    const bool valid_row = r < rows;
#pragma unroll
    for (int c = lane; c < HD; c += 32) {
      smem[r * fp32_row_stride<HD>() + c] = valid_row && c < cols ? gmem[r * row_stride + c] : 0.f;
    }
  }
}

// Fills the shared k and v tiles with keys [key0, key0 + keys) of (batch, kv_head).
template <int HD>
__device__ __forceinline__ void load_key_value_tile(float* k_s, float* v_s, const AttentionParams& p, int64_t batch,
                                                    int64_t kv_head, int64_t key0, int keys) {
  load_tile_fp32<kTile, HD>(k_s, static_cast<const float*>(p.k) + p.k_strides.offset(batch, kv_head, key0),
                            p.k_strides.row, keys, static_cast<int>(p.head_dim));
  load_tile_fp32<kTile, HD>(v_s, static_cast<const float*>(p.v) + p.v_strides.offset(batch, kv_head, key0),
                            p.v_strides.row, keys, static_cast<int>(p.head_dim_v));
}

// row[d] = multiplier * acc[c] for this lane's columns d = lane + 32 c < cols.
template <int COLS>
__device__ __forceinline__ void store_row_fp32(float* row, const float (&acc)[COLS], float multiplier, int cols,
                                               int lane) {
#pragma unroll
  for (int c = 0; c < COLS; ++c) {
    if (lane + 32 * c < cols) row[lane + 32 * c] = acc[c] * multiplier;
  }
}

// dot(a[0..n), b[0..n)) of two shared rows.
__device__ __forceinline__ float dot_fp32(const float* a, const float* b, int n) {
  float sum = 0.f;
  for (int d = 0; d < n; ++d) sum = fmaf(a[d], b[d], sum);
  return sum;
}

// ---------------------------------------------------------------------------------------------
// acc[r][c] += sum over the tile's kTile rows j of weight_j(r) * tile[j][lane + 32 c], where lane j
// holds weight_j(r) in weight[r] (broadcast by warp shuffles). Rows past the tile's extent must have
// weight 0 and zero-filled tile rows, so the trip count is fixed and unrolls fully. The tile's
// products are summed apart and then added to acc: one FMA chain over every key of a row would
// round once per key in sequence, blocked sums ~(32 + N / 32) times, as accurate as the blocked
// matrix products of the reference the tests hold us to.
template <int RPW, int COLS, int LD>
__device__ __forceinline__ void add_tile_product(float (&acc)[RPW][COLS], const float (&weight)[RPW],
                                                 const float* tile, int lane) {
  float tile_sum[RPW][COLS] = {};
#pragma unroll
  for (int j = 0; j < kTile; ++j) {
    float row[COLS];
#pragma unroll
    for (int c = 0; c < COLS; ++c) row[c] = tile[j * LD + lane + 32 * c];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const float wj = __shfl_sync(kFullMask, weight[r], j);
#pragma unroll
      for (int c = 0; c < COLS; ++c) tile_sum[r][c] = fmaf(wj, row[c], tile_sum[r][c]);
    }
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc[r][c] += tile_sum[r][c];
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: a CTA per (block of 4 * RPW query rows, batch * head); a warp owns RPW rows.
template <int HD>
__global__ void __launch_bounds__(kThreads, 1) attention_forward_fp32_kernel(const AttentionParams p) {
  constexpr int RPW = Config<HD>::kForwardRowsPerWarp;
  constexpr int BM = kWarps * RPW, LD = fp32_row_stride<HD>(), COLS = HD / 32;
  float* q_s = dynamic_shared_memory<float>();
  float* k_s = q_s + BM * LD;
  float* v_s = k_s + kTile * LD;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const QueryBlock block(p, BM);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const bool* padding = padding_row(p, block.batch);
  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  const int64_t warp_row0 = block.row0 + warp * RPW;
  const float* q_rows = q_s + warp * RPW * LD;

  load_tile_fp32<BM, HD>(q_s, static_cast<const float*>(p.q) + p.q_strides.offset(block.batch, block.head, block.row0),
                         p.q_strides.row, block.rows, D);
  float o[RPW][COLS] = {};
  float row_max[RPW], row_sum[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) row_max[r] = -kInf, row_sum[r] = 0.f;

  for (int64_t key0 = block.key_begin; key0 < block.key_end; key0 += kTile) {
    const int keys = tile_extent(p.seqlen_k, key0, kTile);
    __syncthreads();  // every warp is done with the previous tiles
    load_key_value_tile<HD>(k_s, v_s, p, block.batch, block.kv_head, key0, keys);
    __syncthreads();

    const int64_t key = key0 + lane;
    const bool masked_tile = block.tile_needs_mask(p, key0, kTile);
    float s[RPW] = {};
    for (int d = 0; d < D; ++d) {
      const float kd = k_s[lane * LD + d];
#pragma unroll
      for (int r = 0; r < RPW; ++r) s[r] = fmaf(q_rows[r * LD + d], kd, s[r]);
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      if (masked_tile && !VisibleRange::keys_of_query(p, warp_row0 + r).sees(key, padding, p.key_padding_stride_key)) {
        s[r] = -kInf;
      }
      // Online softmax; see online_softmax() in forward_kernel.cuh for the -inf handling. Scores
      // go to the log2 domain before the max is taken, so the max element's P is exactly 2^0 = 1
      // (a row that sees one key then gets out = v bitwise, which the backward's exactness needs).
      s[r] *= scale_log2;
      const float new_max = fmaxf(row_max[r], warp_max(s[r]));
      const float shift = new_max == -kInf ? 0.f : new_max;
      const float rescale = exp2f(row_max[r] - shift);
      row_max[r] = new_max;
      s[r] = exp2f(s[r] - shift);
      row_sum[r] = row_sum[r] * rescale + s[r];  // this lane's partial sum
#pragma unroll
      for (int c = 0; c < COLS; ++c) o[r][c] *= rescale;
    }
    // Keys past `keys` have P = 0 and zero-filled v rows.
    add_tile_product<RPW, COLS, LD>(o, s, v_s, lane);
  }

  float* lse = static_cast<float*>(p.lse) + block.batch_head * p.seqlen_q;
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const float sum = warp_sum(row_sum[r]);
    const int64_t row = warp_row0 + r;
    if (row >= p.seqlen_q) continue;
    if (lane == 0) lse[row] = row_lse(row_max[r], sum);
    const float inverse = inverse_row_sum(sum);
    store_row_fp32(static_cast<float*>(p.out) + p.out_strides.offset(block.batch, block.head, row), o[r], inverse,
                   Dv, lane);
  }
}

// ---------------------------------------------------------------------------------------------
// Pre-pass: a thread per query row. delta = dout . out by sequential FMAs, in the order of
// dot_fp32, which makes dP = dout . v in the other kernels: where dP - delta is exactly 0 in exact
// arithmetic (a row that sees a single key has out = v), it is exactly 0 here too.
__global__ void __launch_bounds__(kThreads, 1)
    attention_backward_prepass_fp32_kernel(const AttentionParams p, const BackwardScratch scratch) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;  // flat (batch, head, query)
  if (row >= p.batch * p.heads_q * p.seqlen_q) return;
  const int64_t query = row % p.seqlen_q, batch_head = row / p.seqlen_q;
  const int64_t batch = batch_head / p.heads_q, head = batch_head % p.heads_q;
  const float* dout = static_cast<const float*>(p.dout) + p.dout_strides.offset(batch, head, query);
  const float* out = static_cast<const float*>(p.out) + p.out_strides.offset(batch, head, query);
  float delta = 0.f;
  for (int64_t d = 0; d < p.head_dim_v; ++d) delta = fmaf(dout[d], out[d], delta);
  scratch.delta[row] = delta;
  scratch.lse_log2[row] = lse_to_log2(static_cast<const float*>(p.lse)[row]);
}

// ---------------------------------------------------------------------------------------------
// dq: a CTA per (block of 4 * RPW query rows, batch * head); a warp owns RPW rows.
template <int HD>
__global__ void __launch_bounds__(kThreads, 1)
    attention_backward_dq_fp32_kernel(const AttentionParams p, const BackwardScratch scratch) {
  constexpr int RPW = Config<HD>::kBackwardRowsPerWarp;
  constexpr int BM = kWarps * RPW, LD = fp32_row_stride<HD>(), COLS = HD / 32;
  float* q_s = dynamic_shared_memory<float>();
  float* dout_s = q_s + BM * LD;
  float* k_s = dout_s + BM * LD;
  float* v_s = k_s + kTile * LD;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const QueryBlock block(p, BM);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const bool* padding = padding_row(p, block.batch);
  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  const int64_t warp_row0 = block.row0 + warp * RPW;

  load_tile_fp32<BM, HD>(q_s, static_cast<const float*>(p.q) + p.q_strides.offset(block.batch, block.head, block.row0),
                         p.q_strides.row, block.rows, D);
  load_tile_fp32<BM, HD>(dout_s,
                         static_cast<const float*>(p.dout) + p.dout_strides.offset(block.batch, block.head, block.row0),
                         p.dout_strides.row, block.rows, Dv);
  float lse_log2[RPW], delta[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const RowStats stats(p, scratch, block.batch_head, warp_row0 + r);
    lse_log2[r] = stats.lse_log2;
    delta[r] = stats.delta;
  }
  float dq[RPW][COLS] = {};

  for (int64_t key0 = block.key_begin; key0 < block.key_end; key0 += kTile) {
    const int keys = tile_extent(p.seqlen_k, key0, kTile);
    __syncthreads();
    load_key_value_tile<HD>(k_s, v_s, p, block.batch, block.kv_head, key0, keys);
    __syncthreads();

    const int64_t key = key0 + lane;
    const bool masked_tile = block.tile_needs_mask(p, key0, kTile);
    float ds[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      float s = dot_fp32(q_s + (warp * RPW + r) * LD, k_s + lane * LD, D);
      if (masked_tile && !VisibleRange::keys_of_query(p, warp_row0 + r).sees(key, padding, p.key_padding_stride_key)) {
        s = -kInf;
      }
      const float dp = dot_fp32(dout_s + (warp * RPW + r) * LD, v_s + lane * LD, Dv);
      ds[r] = exp2f(fmaf(s, scale_log2, -lse_log2[r])) * (dp - delta[r]);
    }
    add_tile_product<RPW, COLS, LD>(dq, ds, k_s, lane);  // keys past `keys`: dS = 0, zero-filled k rows
  }

  const float scale = static_cast<float>(p.scale);
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int64_t row = warp_row0 + r;
    if (row >= p.seqlen_q) continue;
    store_row_fp32(static_cast<float*>(p.dq) + p.dq_strides.offset(block.batch, block.head, row), dq[r], scale, D,
                   lane);
  }
}

// ---------------------------------------------------------------------------------------------
// dk/dv: a CTA per (block of 4 * KPW keys, batch * kv head); a warp owns KPW keys, a lane one
// query of each 32-query tile.
template <int HD>
__global__ void __launch_bounds__(kThreads, 1)
    attention_backward_dkdv_fp32_kernel(const AttentionParams p, const BackwardScratch scratch) {
  constexpr int KPW = Config<HD>::kBackwardRowsPerWarp;
  constexpr int BK = kWarps * KPW, LD = fp32_row_stride<HD>(), COLS = HD / 32;
  float* k_s = dynamic_shared_memory<float>();
  float* v_s = k_s + BK * LD;
  float* q_s = v_s + BK * LD;
  float* dout_s = q_s + kTile * LD;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const KeyBlock block(p, BK, 1);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int64_t group = p.kv_group();
  const int64_t tiles = query_tile_count(block, group, kTile);
  const bool* padding = padding_row(p, block.batch);
  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);
  const int64_t warp_key0 = block.key0 + warp * KPW;

  load_tile_fp32<BK, HD>(k_s, static_cast<const float*>(p.k) + p.k_strides.offset(block.batch, block.kv_head, block.key0),
                         p.k_strides.row, block.keys, D);
  load_tile_fp32<BK, HD>(v_s, static_cast<const float*>(p.v) + p.v_strides.offset(block.batch, block.kv_head, block.key0),
                         p.v_strides.row, block.keys, Dv);
  VisibleRange ranges[KPW];
#pragma unroll
  for (int r = 0; r < KPW; ++r) ranges[r] = VisibleRange::queries_of_key(p, padding, warp_key0 + r);
  float dk[KPW][COLS] = {}, dv[KPW][COLS] = {};

  QueryTileCursor cursor(block, group);
  for (int64_t tile = 0; tile < tiles; ++tile, cursor.advance(block, kTile)) {
    const int64_t head = cursor.head, row0 = cursor.row0;
    const int rows = tile_extent(p.seqlen_q, row0, kTile);
    __syncthreads();  // every warp is done with the previous tile (and k_s, v_s are complete)
    load_tile_fp32<kTile, HD>(q_s, static_cast<const float*>(p.q) + p.q_strides.offset(block.batch, head, row0),
                              p.q_strides.row, rows, D);
    load_tile_fp32<kTile, HD>(dout_s,
                              static_cast<const float*>(p.dout) + p.dout_strides.offset(block.batch, head, row0),
                              p.dout_strides.row, rows, Dv);
    __syncthreads();

    const int64_t query = row0 + lane;
    const RowStats stats(p, scratch, block.batch * p.heads_q + head, query);
    const bool masked_tile = block.tile_needs_mask(p, row0, rows, BK);
    float prob[KPW], ds[KPW];
#pragma unroll
    for (int r = 0; r < KPW; ++r) {
      float s = dot_fp32(k_s + (warp * KPW + r) * LD, q_s + lane * LD, D);
      if (masked_tile && !ranges[r].sees(query, nullptr, 0)) s = -kInf;
      const float dp = dot_fp32(v_s + (warp * KPW + r) * LD, dout_s + lane * LD, Dv);
      prob[r] = exp2f(fmaf(s, scale_log2, -stats.lse_log2));
      ds[r] = prob[r] * (dp - stats.delta);
    }
#pragma unroll
    for (int j = 0; j < kTile; ++j) {  // queries past `rows`: P = dS = 0 and zero-filled rows
      float qj[COLS], doutj[COLS];
#pragma unroll
      for (int c = 0; c < COLS; ++c) {
        qj[c] = q_s[j * LD + lane + 32 * c];
        doutj[c] = dout_s[j * LD + lane + 32 * c];
      }
#pragma unroll
      for (int r = 0; r < KPW; ++r) {
        const float pj = __shfl_sync(kFullMask, prob[r], j);
        const float dsj = __shfl_sync(kFullMask, ds[r], j);
#pragma unroll
        for (int c = 0; c < COLS; ++c) {
          dv[r][c] = fmaf(pj, doutj[c], dv[r][c]);
          dk[r][c] = fmaf(dsj, qj[c], dk[r][c]);
        }
      }
    }
  }

  const float scale = static_cast<float>(p.scale);
#pragma unroll
  for (int r = 0; r < KPW; ++r) {
    const int64_t key = warp_key0 + r;
    if (key >= p.seqlen_k) continue;
    store_row_fp32(static_cast<float*>(p.dk) + p.dk_strides.offset(block.batch, block.kv_head, key), dk[r], scale,
                   D, lane);
    store_row_fp32(static_cast<float*>(p.dv) + p.dv_strides.offset(block.batch, block.kv_head, key), dv[r], 1.f,
                   Dv, lane);
  }
}

}  // namespace fp32
}  // namespace fastattn::cuda
