// The kernels of fastattn::bwd on CUDA for fp16 / bf16: fused softmax attention, backward, on
// tensor cores.
//
// Given dout, q, k, v, out and lse (from fastattn::fwd), computes dq, dk, dv for the forward's
// whole contract (full / causal / sliding window, GQA/MQA, key padding, Nq != Nk, head dims 1..256
// in the buckets 64, 128, 256, strided inputs). Scores are recomputed from lse,
// P = 2^(scale * log2(e) * S - lse * log2(e)), never stored:
//
//   pre-pass, a CTA per 64 query rows: delta = rowsum(dout * out), lse_log2 = lse * log2(e)
//   dk/dv kernel, a CTA per (key block, batch * kv head, column chunk), each warp owns 16 keys:
//     for the query heads of the GQA group in order, for the query tiles that see the block:
//       S^T = k q^T, P^T, dP^T = v dout^T, dS^T = P^T * (dP^T - delta)
//       dv += P^T dout,  dk += dS^T q          (dk scaled by `scale` at the end)
//   dq kernel, a CTA per (query block, batch * head), each warp owns 16 query rows:
//     for the key tiles the block sees: S = q k^T, P, dP = dout v^T, dS, dq += dS k
//
// Each CTA writes only the rows it owns, so there are no atomics and results are bitwise
// deterministic. Both kernels visit only the tiles inside the window (cost ~ N * window). Query /
// key tiles are double-buffered in shared memory (cp.async for tile t+1 while tile t computes).
// For head dims > 128 the dk/dv accumulators do not fit in registers, so dk/dv columns are split
// into chunks of 128 computed by separate CTAs (each recomputes S and dP).
//
// Not supported: a gradient flowing into lse (it is returned as non-differentiable).
#pragma once

#include "cuda/tensor_core.cuh"

namespace fastattn::cuda {

// ---------------------------------------------------------------------------------------------
// Pre-pass: one CTA per block of 64 query rows of one (batch, head); each warp owns 16 rows.
//
// delta_i = dout_i . out_i is taken from the diagonal of the 16 x 16 tensor-core product
// dout_rows out_rows^T, made by the same warp_mma_abt steps that make dP = dout v^T in the other
// kernels. So where dP - delta is exactly 0 in exact arithmetic (a row that sees a single key has
// out = v), it is exactly 0 here too: dq is 0, not a rounding residue of two summation orders.
struct PrepassConfig {
  static constexpr int kWarps = 4;
  static constexpr int kBlockRows = 16 * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  template <int HD>
  static constexpr int shared_bytes() {
    return 2 * kBlockRows * shared_row_stride<HD>() * 2;  // dout and out tiles
  }
};

template <typename T, int HD>
__global__ void __launch_bounds__(PrepassConfig::kThreads, 1)
    attention_backward_prepass_kernel(const AttentionParams p, const BackwardScratch scratch, const bool vectorized) {
  constexpr int BM = PrepassConfig::kBlockRows, LD = shared_row_stride<HD>(), THREADS = PrepassConfig::kThreads;
  T* dout_s = dynamic_shared_memory<T>();
  T* out_s = dout_s + BM * LD;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const QueryBlock block(p, BM);
  const int Dv = static_cast<int>(p.head_dim_v);
  load_tile<T, BM, HD, THREADS>(
      dout_s, static_cast<const T*>(p.dout) + p.dout_strides.offset(block.batch, block.head, block.row0),
      p.dout_strides.row, block.rows, Dv, vectorized);
  load_tile<T, BM, HD, THREADS>(out_s,
                                static_cast<const T*>(p.out) + p.out_strides.offset(block.batch, block.head, block.row0),
                                p.out_strides.row, block.rows, Dv, vectorized);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  float products[2][4] = {};  // (dout_r . out_c) for the warp's rows r and columns c
  warp_mma_abt<T, 16, HD, LD>(products, dout_s + warp * 16 * LD, out_s + warp * 16 * LD, Dv, lane);
  // Diagonal element (r, r), r = g + 8 half, sits in products[half][2 half + g % 2] of lane 4g + g / 2
  // (selected with constant indices: a run-time index would put the array in local memory).
  const int g = lane / 4;
  if (lane % 4 != g / 2) return;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = block.row0 + warp * 16 + g + 8 * half;
    if (row >= p.seqlen_q) continue;
    const int64_t index = block.batch_head * p.seqlen_q + row;
    scratch.delta[index] = g % 2 == 0 ? products[half][2 * half] : products[half][2 * half + 1];
    scratch.lse_log2[index] = lse_to_log2(static_cast<const float*>(p.lse)[index]);
  }
}

// ---------------------------------------------------------------------------------------------
// dq: one CTA per (query block, batch * head); k and v tiles double-buffered.
// Tile shapes per head-dim bucket: kWarps warps of 16 query rows, key tiles of kBlockKeys; each
// within 99 KiB of shared memory and without register spills (docs/cuda.md).
template <int HD>
struct DqConfig {
  static constexpr int kWarps = HD == 256 ? 2 : 4;
  static constexpr int kBlockKeys = HD == 64 ? 64 : 32;
  static constexpr int kBlockRows = 16 * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = shared_row_stride<HD>();
  // q, dout, then two stages of (k, v).
  static constexpr int kSharedBytes = (2 * kBlockRows + 4 * kBlockKeys) * kLd * 2;
};

template <typename T, int HD>
__global__ void __launch_bounds__(DqConfig<HD>::kThreads, 1)
    attention_backward_dq_kernel(const AttentionParams p, const BackwardScratch scratch, const bool vectorized) {
  using Config = DqConfig<HD>;
  constexpr int BM = Config::kBlockRows, BN = Config::kBlockKeys, LD = Config::kLd, THREADS = Config::kThreads;
  T* q_s = dynamic_shared_memory<T>();
  T* dout_s = q_s + BM * LD;
  T* kv_stages = dout_s + BM * LD;  // stage i: k at kv_stages + 2 i BN LD, v right after

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const QueryBlock block(p, BM);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const T* k = static_cast<const T*>(p.k) + p.k_strides.offset(block.batch, block.kv_head, 0);
  const T* v = static_cast<const T*>(p.v) + p.v_strides.offset(block.batch, block.kv_head, 0);
  const bool* padding = padding_row(p, block.batch);
  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);

  auto load_key_tile = [&](int64_t key0, int stage) {
    const int keys = tile_extent(p.seqlen_k, key0, BN);
    T* k_stage = kv_stages + 2 * stage * BN * LD;
    load_tile<T, BN, HD, THREADS>(k_stage, k + key0 * p.k_strides.row, p.k_strides.row, keys, D, vectorized);
    load_tile<T, BN, HD, THREADS>(k_stage + BN * LD, v + key0 * p.v_strides.row, p.v_strides.row, keys, Dv,
                                  vectorized);
  };
  load_tile<T, BM, HD, THREADS>(q_s, static_cast<const T*>(p.q) + p.q_strides.offset(block.batch, block.head, block.row0),
                                p.q_strides.row, block.rows, D, vectorized);
  load_tile<T, BM, HD, THREADS>(
      dout_s, static_cast<const T*>(p.dout) + p.dout_strides.offset(block.batch, block.head, block.row0),
      p.dout_strides.row, block.rows, Dv, vectorized);
  if (block.key_begin < block.key_end) load_key_tile(block.key_begin, 0);
  cp_async_commit();

  VisibleRange ranges[2];
  float lse_log2[2], delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = block.row0 + warp * 16 + fragment_row(lane, half);
    ranges[half] = VisibleRange::keys_of_query(p, row);
    const RowStats stats(p, scratch, block.batch_head, row);
    lse_log2[half] = stats.lse_log2;
    delta[half] = stats.delta;
  }
  float dq[HD / 8][4] = {};

  int stage = 0;
  for (int64_t key0 = block.key_begin; key0 < block.key_end; key0 += BN, stage ^= 1) {
    cp_async_wait_all();
    __syncthreads();  // this stage has landed; every warp is done with the other one
    if (key0 + BN < block.key_end) {
      load_key_tile(key0 + BN, stage ^ 1);
      cp_async_commit();
    }
    const T* k_s = kv_stages + 2 * stage * BN * LD;
    const T* v_s = k_s + BN * LD;

    float s[BN / 8][4] = {};
    warp_mma_abt<T, BN, HD, LD>(s, q_s + warp * 16 * LD, k_s, D, lane);
    if (block.tile_needs_mask(p, key0, BN)) {
      mask_tile<BN>(s, key0, ranges, padding, p.key_padding_stride_key, lane);
    }
    float ds[BN / 8][4] = {};  // dP first, then dS in place
    warp_mma_abt<T, BN, HD, LD>(ds, dout_s + warp * 16 * LD, v_s, Dv, lane);
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float prob = fast_exp2(fmaf(s[n][e], scale_log2, -lse_log2[e >> 1]));
        ds[n][e] = prob * (ds[n][e] - delta[e >> 1]);
      }
    }
    warp_mma_pb<T, BN, HD, LD>(dq, ds, k_s, D, lane);
  }
  cp_async_wait_all();
  __syncthreads();  // q_s becomes the staging tile of dq

  const float scale[2] = {static_cast<float>(p.scale), static_cast<float>(p.scale)};
  stage_rows<T, HD, LD>(q_s + warp * 16 * LD, dq, scale, lane);
  __syncthreads();
  T* dq_out = static_cast<T*>(p.dq) + p.dq_strides.offset(block.batch, block.head, block.row0);
  store_tile<T, BM, HD, LD, THREADS>(dq_out, p.dq_strides.row, block.rows, D, q_s, vectorized);
}

// ---------------------------------------------------------------------------------------------
// dk/dv: one CTA per (key block, batch * kv head, column chunk); q and dout tiles double-buffered.
// Tile shapes per head-dim bucket: 4 warps of 16 keys, query tiles of kBlockQueries, dk/dv
// columns in chunks of kChunkColumns (one CTA per chunk: 128 columns of dk and dv accumulators
// are all the registers hold); each within 99 KiB of shared memory and without spills.
template <int HD>
struct DkDvConfig {
  static constexpr int kWarps = 4;
  static constexpr int kBlockQueries = HD == 256 ? 16 : 32;
  static constexpr int kChunkColumns = HD < 128 ? HD : 128;
  static constexpr int kChunks = HD / kChunkColumns;
  static constexpr int kBlockKeys = 16 * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = shared_row_stride<HD>();
  // k, v, then two stages of (q, dout).
  static constexpr int kSharedBytes = (2 * kBlockKeys + 4 * kBlockQueries) * kLd * 2;
};

template <typename T, int HD>
__global__ void __launch_bounds__(DkDvConfig<HD>::kThreads, 1)
    attention_backward_dkdv_kernel(const AttentionParams p, const BackwardScratch scratch, const bool vectorized) {
  using Config = DkDvConfig<HD>;
  constexpr int BK = Config::kBlockKeys, BQ = Config::kBlockQueries, CHUNK = Config::kChunkColumns;
  constexpr int LD = Config::kLd, THREADS = Config::kThreads;
  T* k_s = dynamic_shared_memory<T>();
  T* v_s = k_s + BK * LD;
  T* q_stages = v_s + BK * LD;  // stage i: q at q_stages + 2 i BQ LD, dout right after

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const KeyBlock block(p, BK, Config::kChunks);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const int64_t group = p.kv_group();
  const int64_t tiles = query_tile_count(block, group, BQ);
  const bool* padding = padding_row(p, block.batch);
  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);

  auto load_query_tile = [&](const QueryTileCursor& tile, int stage) {
    const int64_t head = tile.head, row0 = tile.row0;
    const int rows = tile_extent(p.seqlen_q, row0, BQ);
    T* q_stage = q_stages + 2 * stage * BQ * LD;
    load_tile<T, BQ, HD, THREADS>(q_stage, static_cast<const T*>(p.q) + p.q_strides.offset(block.batch, head, row0),
                                  p.q_strides.row, rows, D, vectorized);
    load_tile<T, BQ, HD, THREADS>(q_stage + BQ * LD,
                                  static_cast<const T*>(p.dout) + p.dout_strides.offset(block.batch, head, row0),
                                  p.dout_strides.row, rows, Dv, vectorized);
  };
  load_tile<T, BK, HD, THREADS>(k_s, static_cast<const T*>(p.k) + p.k_strides.offset(block.batch, block.kv_head, block.key0),
                                p.k_strides.row, block.keys, D, vectorized);
  load_tile<T, BK, HD, THREADS>(v_s, static_cast<const T*>(p.v) + p.v_strides.offset(block.batch, block.kv_head, block.key0),
                                p.v_strides.row, block.keys, Dv, vectorized);
  QueryTileCursor next_tile(block, group);
  if (tiles > 0) load_query_tile(next_tile, 0);
  cp_async_commit();

  VisibleRange ranges[2];  // the queries that see this lane's two keys
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    ranges[half] = VisibleRange::queries_of_key(p, padding, block.key0 + warp * 16 + fragment_row(lane, half));
  }
  const int c0 = block.chunk * CHUNK;  // first dk/dv column of this CTA
  float dk[CHUNK / 8][4] = {}, dv[CHUNK / 8][4] = {};

  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int stage = static_cast<int>(tile & 1);
    const int64_t head = next_tile.head, row0 = next_tile.row0;
    next_tile.advance(block, BQ);
    cp_async_wait_all();
    __syncthreads();  // this stage has landed; every warp is done with the other one
    if (tile + 1 < tiles) {
      load_query_tile(next_tile, stage ^ 1);
      cp_async_commit();
    }
    const T* q_s = q_stages + 2 * stage * BQ * LD;
    const T* dout_s = q_s + BQ * LD;
    const int64_t batch_head = block.batch * p.heads_q + head;

    float s[BQ / 8][4] = {};  // S^T: rows are this warp's keys, columns the tile's queries
    warp_mma_abt<T, BQ, HD, LD>(s, k_s + warp * 16 * LD, q_s, D, lane);
    const int rows = tile_extent(p.seqlen_q, row0, BQ);
    if (block.tile_needs_mask(p, row0, rows, BK)) {
      mask_tile<BQ>(s, row0, ranges, nullptr, 0, lane);
    }
    float ds[BQ / 8][4] = {};  // dP^T first, then dS^T in place
    warp_mma_abt<T, BQ, HD, LD>(ds, v_s + warp * 16 * LD, dout_s, Dv, lane);
#pragma unroll
    for (int n = 0; n < BQ / 8; ++n) {
#pragma unroll
      for (int column = 0; column < 2; ++column) {  // elements column and column + 2 share a query
        const RowStats stats(p, scratch, batch_head, row0 + fragment_column(lane, n, column));
#pragma unroll
        for (int e = column; e < 4; e += 2) {
          s[n][e] = fast_exp2(fmaf(s[n][e], scale_log2, -stats.lse_log2));
          ds[n][e] = s[n][e] * (ds[n][e] - stats.delta);
        }
      }
    }
    warp_mma_pb<T, BQ, CHUNK, LD>(dv, s, dout_s + c0, Dv - c0, lane);
    warp_mma_pb<T, BQ, CHUNK, LD>(dk, ds, q_s + c0, D - c0, lane);
  }
  cp_async_wait_all();
  __syncthreads();  // k_s and v_s become the staging tiles of dk and dv

  const float scale[2] = {static_cast<float>(p.scale), static_cast<float>(p.scale)};
  const float one[2] = {1.f, 1.f};
  stage_rows<T, CHUNK, LD>(k_s + warp * 16 * LD + c0, dk, scale, lane);
  stage_rows<T, CHUNK, LD>(v_s + warp * 16 * LD + c0, dv, one, lane);
  __syncthreads();
  T* dk_out = static_cast<T*>(p.dk) + p.dk_strides.offset(block.batch, block.kv_head, block.key0) + c0;
  T* dv_out = static_cast<T*>(p.dv) + p.dv_strides.offset(block.batch, block.kv_head, block.key0) + c0;
  store_tile<T, BK, CHUNK, LD, THREADS>(dk_out, p.dk_strides.row, block.keys, D - c0, k_s + c0, vectorized);
  store_tile<T, BK, CHUNK, LD, THREADS>(dv_out, p.dv_strides.row, block.keys, Dv - c0, v_s + c0, vectorized);
}

}  // namespace fastattn::cuda
