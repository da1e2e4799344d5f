// Tensor-core building blocks of the fp16/bf16 kernels (sm_80 instructions; sm_90 runs them too):
// tile copies between global and shared memory (cp.async), and the two warp-level products every
// pass is made of (ldmatrix + mma.sync m16n8k16 with fp32 accumulators; ptx.cuh).
//
// Conventions. A shared tile holds ROWS rows of HD elements with a row stride of HD + 8 elements:
// the 16 padding bytes put the 8 rows one ldmatrix reads in 8 different bank groups (no
// conflicts) and keep every row 16-byte aligned. A warp owns 16 rows of a score or accumulator
// tile, held as acc[N/8][4] in the mma C-fragment layout: for lane = 4g + t, acc[n][0..1] are
// row g, columns 8n + 2t + {0,1}, and acc[n][2..3] are row g + 8, same columns.
#pragma once

#include "cuda/device_common.cuh"

namespace fastattn::cuda {

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return x;
  }
}

// Two floats rounded to T and packed in one register, the lower column in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

template <int HD>
constexpr int shared_row_stride() {
  return HD + 8;
}

// Starts copying rows [0, rows) x columns [0, cols) of a global tile (row stride `row_stride`
// elements) into a ROWS x HD shared tile; rows and columns outside are zero-filled, so padding
// adds nothing to any product and never holds stale NaNs. Vectorized: 16-byte cp.async (the
// caller commits and waits); otherwise element by element (complete on return).
template <typename T, int ROWS, int HD, int THREADS>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, int64_t row_stride, int rows, int cols,
                                          bool vectorized) {
  constexpr int LD = shared_row_stride<HD>();
  constexpr int kChunksPerRow = HD / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
  if (vectorized) {
#pragma unroll
    for (int step = 0; step < (kChunks + THREADS - 1) / THREADS; ++step) {
      const int i = step * THREADS + static_cast<int>(threadIdx.x);
      if (kChunks % THREADS != 0 && i >= kChunks) break;
      const int r = i / kChunksPerRow, c = (i % kChunksPerRow) * 8;
      const bool valid = r < rows && c < cols;  // cols is a multiple of 8 here
      cp_async_16(smem + r * LD + c, valid ? gmem + r * row_stride + c : gmem, valid);
    }
  } else {
    for (int i = threadIdx.x; i < kChunks; i += THREADS) {
      const int r = i / kChunksPerRow, c = (i % kChunksPerRow) * 8;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        smem[r * LD + c + e] = r < rows && c + e < cols ? gmem[r * row_stride + c + e] : from_float<T>(0.f);
      }
    }
  }
}

// Writes rows [0, rows) x columns [0, cols) of a shared tile (COLS wide, row stride LD) to global
// memory; 16 bytes at a time when vectorized.
template <typename T, int ROWS, int COLS, int LD, int THREADS>
__device__ __forceinline__ void store_tile(T* gmem, int64_t row_stride, int rows, int cols, const T* smem,
                                           bool vectorized) {
  constexpr int kChunksPerRow = COLS / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
  for (int i = threadIdx.x; i < kChunks; i += THREADS) {
    const int r = i / kChunksPerRow, c = (i % kChunksPerRow) * 8;
    if (r >= rows || c >= cols) continue;
    if (vectorized) {
      *reinterpret_cast<uint4*>(gmem + r * row_stride + c) = *reinterpret_cast<const uint4*>(smem + r * LD + c);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (c + e < cols) gmem[r * row_stride + c + e] = smem[r * LD + c + e];
      }
    }
  }
}

// acc (16 x N) += A B^T, with A the warp's 16 rows of a shared tile (a_smem points at its first
// row) and B the N rows of another, both K columns wide (row stride LD). Steps of 16 columns at
// or past `k_limit` hold only zero padding and are skipped.
template <typename T, int N, int K, int LD>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[N / 8][4], const T* a_smem, const T* b_smem, int k_limit,
                                             int lane) {
  static_assert(N % 16 == 0 && K % 16 == 0, "tiles are whole 16 x 16 steps");
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    if (kk * 16 >= k_limit) break;
    uint32_t a[4];  // rows 0-7 / 8-15 x columns 0-7 / 8-15 of the step, in a0..a3 order
    ldmatrix_x4(a, a_smem + (lane & 15) * LD + kk * 16 + (lane >> 4) * 8);
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      uint32_t b[4];  // {b0, b1} of B rows nn*16 + 0-7, then of rows nn*16 + 8-15
      ldmatrix_x4(b, b_smem + (nn * 16 + (lane & 7) + ((lane >> 4) << 3)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
      mma_16x8x16<T>(acc[2 * nn], a, b[0], b[1]);
      mma_16x8x16<T>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x N) += P B, with P a 16 x K tile in registers (a C-fragment tile, rounded to T: the
// C layout of two adjacent 8-column tiles is the A layout of one 16-wide step) and B the K rows
// of a shared tile, read from column 0 of b_smem (row stride LD). Output steps of 16 columns at
// or past `n_limit` would only multiply padding and are skipped.
template <typename T, int K, int N, int LD>
__device__ __forceinline__ void warp_mma_pb(float (&acc)[N / 8][4], const float (&p)[K / 8][4], const T* b_smem,
                                            int n_limit, int lane) {
  static_assert(N % 16 == 0 && K % 16 == 0, "tiles are whole 16 x 16 steps");
#pragma unroll
  for (int kt = 0; kt < K / 16; ++kt) {
    const uint32_t a[4] = {pack2<T>(p[2 * kt][0], p[2 * kt][1]), pack2<T>(p[2 * kt][2], p[2 * kt][3]),
                           pack2<T>(p[2 * kt + 1][0], p[2 * kt + 1][1]),
                           pack2<T>(p[2 * kt + 1][2], p[2 * kt + 1][3])};
#pragma unroll
    for (int nn = 0; nn < N / 16; ++nn) {
      if (nn * 16 >= n_limit) break;
      uint32_t b[4];  // transposed: {b0, b1} of columns nn*16 + 0-7, then of columns nn*16 + 8-15
      ldmatrix_x4_trans(b, b_smem + (kt * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * LD + nn * 16 + (lane >> 4) * 8);
      mma_16x8x16<T>(acc[2 * nn], a, b[0], b[1]);
      mma_16x8x16<T>(acc[2 * nn + 1], a, b[2], b[3]);
    }
  }
}

// The two tile rows (of the warp's 16) that this lane holds in the C-fragment layout.
__device__ __forceinline__ int fragment_row(int lane, int half) { return (lane >> 2) + 8 * half; }
// The tile column of accumulator element e of 8-column tile n.
__device__ __forceinline__ int fragment_column(int lane, int n, int e) { return n * 8 + (lane & 3) * 2 + (e & 1); }

// Sets to -inf every score of a warp's 16 x N tile whose column col0 + c is outside the range of
// its row (ranges[0]: row g, ranges[1]: row g + 8) or is a padded key (column_padding non-null).
template <int N>
__device__ __forceinline__ void mask_tile(float (&s)[N / 8][4], int64_t col0, const VisibleRange (&ranges)[2],
                                          const bool* column_padding, int64_t padding_stride, int lane) {
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (!ranges[e >> 1].sees(col0 + fragment_column(lane, n, e), column_padding, padding_stride)) s[n][e] = -kInf;
    }
  }
}

// Writes a warp's 16 x N accumulator tile times `row_scale[half]` to its rows of a shared tile.
template <typename T, int N, int LD>
__device__ __forceinline__ void stage_rows(T* smem_rows, const float (&acc)[N / 8][4], const float (&row_scale)[2],
                                           int lane) {
#pragma unroll
  for (int n = 0; n < N / 8; ++n) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      *reinterpret_cast<uint32_t*>(smem_rows + fragment_row(lane, half) * LD + fragment_column(lane, n, 0)) =
          pack2<T>(acc[n][2 * half] * row_scale[half], acc[n][2 * half + 1] * row_scale[half]);
    }
  }
}

// Host side: calls f(tag) with tag::type = __half or __nv_bfloat16 for a 2-byte element type.
template <typename T>
struct TypeTag {
  using type = T;
};
template <typename F>
inline void with_half_type(ElementType type, F&& f) {
  if (type == ElementType::kHalf) {
    f(TypeTag<__half>{});
  } else {
    f(TypeTag<__nv_bfloat16>{});
  }
}

}  // namespace fastattn::cuda
