// The fp16 / bf16 forward kernel of fastattn::fwd on CUDA: fused softmax attention on tensor cores.
//
// Computes out = softmax(scale * q k^T + mask) v and lse (natural log, fp32) per query row, for
// full, causal and sliding-window attention (any (left, right) window), GQA/MQA, key padding and
// Nq != Nk (bottom-right aligned), head dims 1..256 in three compiled buckets (64, 128, 256;
// smaller dims are zero-padded in shared memory), any strides with a contiguous last dim.
//
// Algorithm (FlashAttention-2): one CTA per (block of BM = 16 * WARPS query rows, batch * head);
// each warp owns 16 rows. The CTA walks only the key tiles its window reaches (cost ~ N * window,
// not N^2). Per key tile: S = q k^T with mma.sync m16n8k16 (fp32 accumulators), the element mask
// on tiles that straddle a window edge or use padding, online softmax in the exp2 domain in
// registers, then O += P v with P rounded to the input dtype. k and v tiles are single-buffered
// but overlapped: v_j loads while S_j is computed, k_{j+1} while P_j v_j is. Fully masked rows
// get out = 0 and lse = -inf, never NaN.
//
// Not supported: fp32 (see fp32_kernels.cuh), dropout, other attention biases, sm < 80.
// Registers and shared memory per bucket: docs/cuda.md.
#pragma once

#include "cuda/tensor_core.cuh"

namespace fastattn::cuda {

// Tile shapes per head-dim bucket: kWarps warps of 16 query rows, key tiles of kBlockKeys.
// 8 warps x 64 keys up to HD = 128 (FlashAttention-2's shape for sm_80/sm_90); 4 warps x 32 keys
// at 256, where the 128 output accumulators per lane leave room for a 32-key score tile only
// (64 keys spilled). Every shape needs at most 99 KiB of shared memory, so consumer sm_86/sm_89
// parts (which run the sm_80 code) can launch it too.
template <int HD>
struct ForwardConfig {
  static constexpr int kWarps = HD == 256 ? 4 : 8;
  static constexpr int kBlockKeys = HD == 256 ? 32 : 64;
  static constexpr int kBlockRows = 16 * kWarps;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLd = shared_row_stride<HD>();
  // q tile, one k tile, one v tile.
  static constexpr int kSharedBytes = (kBlockRows + 2 * kBlockKeys) * kLd * 2;
};

// One online-softmax step for the warp's two rows per lane: folds the new scores s into the
// running max m (log2 domain) and sum l, turns s into P = 2^(s * scale * log2(e) - m'), and
// rescales the output accumulator by 2^(m - m'). A row with nothing visible yet keeps m = -inf
// and uses shift 0, so its P is 2^-inf = 0 rather than NaN. l is this lane's partial sum; the
// 4 lanes of a row share m, so the partials are summed once at the end.
template <int BN, int HD>
__device__ __forceinline__ void online_softmax(float (&s)[BN / 8][4], float (&o)[HD / 8][4], float (&row_max)[2],
                                               float (&row_sum)[2], float scale_log2) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float block_max = -kInf;
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) block_max = fmaxf(block_max, fmaxf(s[n][2 * half], s[n][2 * half + 1]));
    const float new_max = fmaxf(row_max[half], quad_max(block_max) * scale_log2);
    const float shift = new_max == -kInf ? 0.f : new_max;
    const float rescale = fast_exp2(row_max[half] - shift);
    row_max[half] = new_max;
    float sum = 0.f;
#pragma unroll
    for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
      for (int e = 2 * half; e < 2 * half + 2; ++e) {
        s[n][e] = fast_exp2(fmaf(s[n][e], scale_log2, -shift));
        sum += s[n][e];
      }
    }
    row_sum[half] = row_sum[half] * rescale + sum;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
      o[n][2 * half] *= rescale;
      o[n][2 * half + 1] *= rescale;
    }
  }
}

template <typename T, int HD>
__global__ void __launch_bounds__(ForwardConfig<HD>::kThreads, 1)
    attention_forward_kernel(const AttentionParams p, const bool vectorized) {
  using Config = ForwardConfig<HD>;
  constexpr int BM = Config::kBlockRows, BN = Config::kBlockKeys, LD = Config::kLd, THREADS = Config::kThreads;
  T* q_s = dynamic_shared_memory<T>();
  T* k_s = q_s + BM * LD;
  T* v_s = k_s + BN * LD;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const QueryBlock block(p, BM);
  const int D = static_cast<int>(p.head_dim), Dv = static_cast<int>(p.head_dim_v);
  const T* q = static_cast<const T*>(p.q) + p.q_strides.offset(block.batch, block.head, block.row0);
  const T* k = static_cast<const T*>(p.k) + p.k_strides.offset(block.batch, block.kv_head, 0);
  const T* v = static_cast<const T*>(p.v) + p.v_strides.offset(block.batch, block.kv_head, 0);
  const bool* padding = padding_row(p, block.batch);
  const float scale_log2 = static_cast<float>(p.scale * 1.4426950408889634);

  load_tile<T, BM, HD, THREADS>(q_s, q, p.q_strides.row, block.rows, D, vectorized);
  if (block.key_begin < block.key_end) {
    load_tile<T, BN, HD, THREADS>(k_s, k + block.key_begin * p.k_strides.row, p.k_strides.row,
                                  tile_extent(p.seqlen_k, block.key_begin, BN), D, vectorized);
  }
  cp_async_commit();

  VisibleRange ranges[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    ranges[half] = VisibleRange::keys_of_query(p, block.row0 + warp * 16 + fragment_row(lane, half));
  }
  float o[HD / 8][4] = {};
  float row_max[2] = {-kInf, -kInf}, row_sum[2] = {0.f, 0.f};

  for (int64_t key0 = block.key_begin; key0 < block.key_end; key0 += BN) {
    cp_async_wait_all();
    __syncthreads();  // k_j has landed; every warp is done with v_{j-1}
    load_tile<T, BN, HD, THREADS>(v_s, v + key0 * p.v_strides.row, p.v_strides.row,
                                  tile_extent(p.seqlen_k, key0, BN), Dv, vectorized);
    cp_async_commit();

    float s[BN / 8][4] = {};
    warp_mma_abt<T, BN, HD, LD>(s, q_s + warp * 16 * LD, k_s, D, lane);
    if (block.tile_needs_mask(p, key0, BN)) {
      mask_tile<BN>(s, key0, ranges, padding, p.key_padding_stride_key, lane);
    }
    online_softmax<BN, HD>(s, o, row_max, row_sum, scale_log2);

    cp_async_wait_all();
    __syncthreads();  // v_j has landed; every warp is done with k_j
    if (key0 + BN < block.key_end) {
      load_tile<T, BN, HD, THREADS>(k_s, k + (key0 + BN) * p.k_strides.row, p.k_strides.row,
                                    tile_extent(p.seqlen_k, key0 + BN, BN), D, vectorized);
      cp_async_commit();
    }
    warp_mma_pb<T, BN, HD, LD>(o, s, v_s, Dv, lane);
  }
  cp_async_wait_all();
  __syncthreads();  // nothing in flight, every warp done: q_s becomes the output staging tile

  float inverse_sum[2];
  float* lse = static_cast<float*>(p.lse) + block.batch_head * p.seqlen_q;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float sum = quad_sum(row_sum[half]);
    inverse_sum[half] = inverse_row_sum(sum);
    const int64_t row = block.row0 + warp * 16 + fragment_row(lane, half);
    if ((lane & 3) == 0 && row < p.seqlen_q) lse[row] = row_lse(row_max[half], sum);
  }
  stage_rows<T, HD, LD>(q_s + warp * 16 * LD, o, inverse_sum, lane);
  __syncthreads();
  T* out = static_cast<T*>(p.out) + p.out_strides.offset(block.batch, block.head, block.row0);
  store_tile<T, BM, HD, LD, THREADS>(out, p.out_strides.row, block.rows, Dv, q_s, vectorized);
}

}  // namespace fastattn::cuda
