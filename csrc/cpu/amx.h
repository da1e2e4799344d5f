// bf16 pair products for the bf16 CPU kernels: Intel AMX tiles, or AVX512-BF16 vectors.
//
// An AMX tile multiply (TDPBF16PS) takes a 16 x 32 bf16 tile A, a 16-row tile B in "VNNI" form
// (rows of k-pairs: B[k][n] at row k / 2, element 2n + k % 2) and accumulates the 16 x 16 product
// into an fp32 tile, about ten times the bf16 rate of AVX-512 FMAs. VDPBF16PS (AVX512-BF16: AMD
// Zen 4 and later, Intel Cooper Lake) does the same per vector, one pair of an A row broadcast
// against 16 columns of a B row pair; it runs at twice the rate of fp32 FMAs on the converted
// values (one Zen 4 core: 234 against 117 GFLOP/s, benchmarks/cpu_peak.cpp). Both read the
// same operands, so one set of bf16 kernels (attention_forward_bf16_pairs,
// attention_backward_bf16_pairs) runs on either through pair_gemm. The kernels keep softmax and
// every accumulation in fp32 and feed the pair products only products of bf16 values, as
// PyTorch's own bf16 CPU attention does.
//
// The pair path exists when the compiler targets AVX512-BF16 (-march=native on such a machine
// sets __AVX512BF16__); it uses AMX when the compiler also targets AMX (__AMX_TILE__ /
// __AMX_BF16__) and the kernel lets this process use the tile registers (asked once with
// arch_prctl). Otherwise bf16_pairs_available() is false and callers use the fp32 AVX-512 /
// at::vec path on converted values. FASTATTN_CPU_BF16_PRODUCTS=avx512-bf16 or fp32 caps the choice
// at that path (the environment of the process, read once), so every path this CPU can run is
// tested and measured on it.
#pragma once

#include "cpu/simd.h"  // must precede other ATen headers: it selects at::vec's ISA

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>

#if defined(__AVX512BF16__) && defined(CPU_CAPABILITY_AVX512)
#define FASTATTN_HAS_BF16_PAIRS 1
#include <immintrin.h>
#endif

#if defined(FASTATTN_HAS_BF16_PAIRS) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define FASTATTN_HAS_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace fastattn::cpu {

using BFloat16 = c10::BFloat16;

#if defined(FASTATTN_HAS_AMX)

// Asks Linux for permission to use the AMX tile data (ARCH_REQ_XCOMP_PERM for
// XFEATURE_XTILEDATA); true when granted. Called once, by bf16_products().
inline bool request_amx_tiles() {
  constexpr long kArchRequestPermission = 0x1023;
  constexpr long kXFeatureTileData = 18;
  return syscall(SYS_arch_prctl, kArchRequestPermission, kXFeatureTileData) == 0;
}

// Loads the tile configuration on this thread for its lifetime: the eight tiles all 16 rows of
// 64 bytes (16 x 16 fp32 or 16 x 32 bf16). Tiles 0-3 hold C, 4-5 A, 6-7 B in amx_gemm.
class AmxTileScope {
 public:
  AmxTileScope() {
    struct alignas(64) Config {
      uint8_t palette = 1;
      uint8_t start_row = 0;
      uint8_t reserved[14] = {};
      uint16_t bytes_per_row[16] = {};
      uint8_t rows[16] = {};
    } config;
    for (int tile = 0; tile < 8; ++tile) {
      config.bytes_per_row[tile] = 64;
      config.rows[tile] = 16;
    }
    _tile_loadconfig(&config);
  }
  ~AmxTileScope() { _tile_release(); }
  AmxTileScope(const AmxTileScope&) = delete;
  AmxTileScope& operator=(const AmxTileScope&) = delete;
};

// C[M x N] (fp32, row stride ldc) = (ACCUMULATE: +=) A[M x K] (bf16, row stride lda) * B, with B
// in VNNI form: b_vnni[(k / 2) * ldb + 2 * n + k % 2] = B[k][n]. M, N and K are multiples of 32.
// 2 x 2 blocks of C tiles, each k step loading two A and two B tiles for four multiplies. Needs an
// AmxTileScope on the calling thread.
template <bool ACCUMULATE>
inline void amx_gemm(int64_t M, int64_t N, int64_t K, const BFloat16* a, int64_t lda, const BFloat16* b_vnni,
                     int64_t ldb, float* c, int64_t ldc) {
  const int64_t a_stride = lda * int64_t(sizeof(BFloat16)), b_stride = ldb * int64_t(sizeof(BFloat16));
  const int64_t c_stride = ldc * int64_t(sizeof(float));
  for (int64_t m0 = 0; m0 < M; m0 += 32) {
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
      float* c00 = c + m0 * ldc + n0;
      float* c10 = c00 + 16 * ldc;
      if constexpr (ACCUMULATE) {
        _tile_loadd(0, c00, c_stride);
        _tile_loadd(1, c00 + 16, c_stride);
        _tile_loadd(2, c10, c_stride);
        _tile_loadd(3, c10 + 16, c_stride);
      } else {
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
      }
      for (int64_t k0 = 0; k0 < K; k0 += 32) {
        const BFloat16* a0 = a + m0 * lda + k0;
        const BFloat16* b0 = b_vnni + (k0 / 2) * ldb + 2 * n0;
        _tile_loadd(4, a0, a_stride);
        _tile_loadd(5, a0 + 16 * lda, a_stride);
        _tile_loadd(6, b0, b_stride);
        _tile_loadd(7, b0 + 32, b_stride);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
      _tile_stored(0, c00, c_stride);
      _tile_stored(1, c00 + 16, c_stride);
      _tile_stored(2, c10, c_stride);
      _tile_stored(3, c10 + 16, c_stride);
    }
  }
}

#endif  // FASTATTN_HAS_AMX

// How the bf16 kernels multiply, from the slowest to the fastest.
enum class Bf16Products { kFp32Fma, kAvx512Bf16, kAmx };

inline const char* bf16_products_name(Bf16Products products) {
  switch (products) {
    case Bf16Products::kAmx: return "AMX";
    case Bf16Products::kAvx512Bf16: return "AVX512-BF16";
    default: return "fp32 FMA";
  }
}

// The fastest path that this build and this process can use, at most the cap named by
// FASTATTN_CPU_BF16_PRODUCTS ("amx", "avx512-bf16", "fp32"; unset or any other value: no cap,
// fastattn's Python side rejects other values before the library loads). Decided once per process.
inline Bf16Products bf16_products() {
  static const Bf16Products chosen = [] {
    const char* cap_name = std::getenv("FASTATTN_CPU_BF16_PRODUCTS");
    const std::string cap_value = cap_name == nullptr ? "" : cap_name;
    const Bf16Products cap = cap_value == "fp32"          ? Bf16Products::kFp32Fma
                             : cap_value == "avx512-bf16" ? Bf16Products::kAvx512Bf16
                                                          : Bf16Products::kAmx;
    Bf16Products best = Bf16Products::kFp32Fma;
#if defined(FASTATTN_HAS_BF16_PAIRS)
    best = Bf16Products::kAvx512Bf16;
#endif
#if defined(FASTATTN_HAS_AMX)
    // Asked for only when it may be used: a capped process leaves the tile state off.
    if (cap == Bf16Products::kAmx && request_amx_tiles()) best = Bf16Products::kAmx;
#endif
    return std::min(best, cap);
  }();
  return chosen;
}

inline bool amx_bf16_available() { return bf16_products() == Bf16Products::kAmx; }

inline bool bf16_pairs_available() { return bf16_products() != Bf16Products::kFp32Fma; }

#if defined(FASTATTN_HAS_BF16_PAIRS)

// amx_gemm's product by VDPBF16PS (same operands, same contract): C tiles of 8 rows x 32 columns
// in 16 vector accumulators; per pair of k, two 64-byte loads of a B row pair and eight 32-bit
// broadcasts of A pairs feed 16 multiplies. Column panels outside, rows inside: the K x 32 panel of
// B stays in L1 while A streams past.
template <bool ACCUMULATE>
inline void dpbf16_gemm(int64_t M, int64_t N, int64_t K, const BFloat16* a, int64_t lda, const BFloat16* b_vnni,
                        int64_t ldb, float* c, int64_t ldc) {
  constexpr int kRows = 8, kVectors = 2;
  for (int64_t n0 = 0; n0 < N; n0 += 16 * kVectors) {
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      __m512 acc[kRows][kVectors];
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 2
        for (int j = 0; j < kVectors; ++j) {
          acc[i][j] = ACCUMULATE ? _mm512_loadu_ps(c + (m0 + i) * ldc + n0 + 16 * j) : _mm512_setzero_ps();
        }
      }
      const BFloat16* a_rows = a + m0 * lda;
#pragma GCC unroll 4
      for (int64_t pair = 0; pair < K / 2; ++pair) {
        const BFloat16* b_row = b_vnni + pair * ldb + 2 * n0;
        __m512bh b[kVectors];
#pragma GCC unroll 2
        for (int j = 0; j < kVectors; ++j) b[j] = (__m512bh)_mm512_loadu_si512(b_row + 32 * j);
#pragma GCC unroll 8
        for (int i = 0; i < kRows; ++i) {
          int32_t a_pair;
          std::memcpy(&a_pair, a_rows + i * lda + 2 * pair, sizeof(a_pair));
          const __m512bh a_value = (__m512bh)_mm512_set1_epi32(a_pair);
#pragma GCC unroll 2
          for (int j = 0; j < kVectors; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], a_value, b[j]);
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
#pragma GCC unroll 2
        for (int j = 0; j < kVectors; ++j) _mm512_storeu_ps(c + (m0 + i) * ldc + n0 + 16 * j, acc[i][j]);
      }
    }
  }
}

// What a thread of a bf16 pair kernel holds for its lifetime: the AMX tile configuration where
// AMX is used, nothing otherwise.
class PairProductScope {
 public:
  PairProductScope() {
#if defined(FASTATTN_HAS_AMX)
    if (amx_bf16_available()) tiles_.emplace();
#endif
  }

 private:
#if defined(FASTATTN_HAS_AMX)
  std::optional<AmxTileScope> tiles_;
#endif
};

// C[M x N] (fp32) = (ACCUMULATE: +=) A[M x K] (bf16 rows) * B (VNNI bf16, see amx_gemm), M, N and
// K multiples of 32: AMX tiles where the process may use them, VDPBF16PS otherwise. Needs a
// PairProductScope on the calling thread.
template <bool ACCUMULATE>
inline void pair_gemm(int64_t M, int64_t N, int64_t K, const BFloat16* a, int64_t lda, const BFloat16* b_vnni,
                      int64_t ldb, float* c, int64_t ldc) {
#if defined(FASTATTN_HAS_AMX)
  if (amx_bf16_available()) return amx_gemm<ACCUMULATE>(M, N, K, a, lda, b_vnni, ldb, c, ldc);
#endif
  dpbf16_gemm<ACCUMULATE>(M, N, K, a, lda, b_vnni, ldb, c, ldc);
}

// The 16 values of `even` and the 16 of `odd` rounded to bf16 and interleaved, even first: one
// 64-byte row of a VNNI B operand (pair of k rows, 16 columns).
inline __m512i interleave_bf16(__m512 even, __m512 odd) {
  // cvtne2ps puts `even` in the low 16 lanes and `odd` in the high ones; the permutation then
  // takes lanes 0, 16, 1, 17, ...
  const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                         6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
}

// Lane l holds l * stride: the offsets of a 16-lane gather down a column (stride elements apart).
inline __m512i lane_strides(int64_t stride) {
  return _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                            _mm512_set1_epi32(static_cast<int32_t>(stride)));
}

// The mask of the first min(count, 16) lanes.
inline __mmask16 first_lanes(int64_t count) {
  return static_cast<__mmask16>((1u << std::min<int64_t>(16, count)) - 1);
}

// dst[i][d] = bf16(src_t[d * ld + i] * row_scale[i]) for i < rows, d < cols (dst rows
// dst_row_stride apart): out = (out^T)^T / l, 16 values of d per gather, converted and stored at once.
inline void store_transposed_scaled(const float* src_t, int64_t ld, int64_t rows, int64_t cols, const float* row_scale,
                                    BFloat16* dst, int64_t dst_row_stride) {
  const __m512i d_offsets = lane_strides(ld);
  for (int64_t i = 0; i < rows; ++i) {
    const __m512 scale = _mm512_set1_ps(row_scale[i]);
    for (int64_t d0 = 0; d0 < cols; d0 += 16) {
      const __mmask16 valid = first_lanes(cols - d0);
      const __m512 values = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), valid, d_offsets, src_t + d0 * ld + i, 4);
      _mm256_mask_storeu_epi16(dst + i * dst_row_stride + d0, valid, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(values, scale)));
    }
  }
}

#endif  // FASTATTN_HAS_BF16_PAIRS

// B = src^T in VNNI bf16 form (src: `rows` rows of `cols` elements, row stride src_row_stride):
// dst[(c / 2) * dst_ld + 2 * r + c % 2] = src[r][c], i.e. a transpose of 32-bit pairs. Rows
// [rows, padded_rows) and columns [cols, padded_cols) are zero. Used for q^T and dout^T.
template <typename src_t>
inline void pack_transposed_vnni(const src_t* src, int64_t src_row_stride, int64_t rows, int64_t padded_rows,
                                 int64_t cols, int64_t padded_cols, BFloat16* dst, int64_t dst_ld) {
  for (int64_t pair = 0; 2 * pair < padded_cols; ++pair) std::memset(dst + pair * dst_ld, 0, 2 * padded_rows * sizeof(BFloat16));
  int64_t vector_pairs = 0;  // column pairs already packed by 32-bit gathers
#if defined(FASTATTN_HAS_BF16_PAIRS)
  // bf16 sources: a column pair is one 32-bit unit, so 16 rows of it are one gather and one
  // 64-byte store (the scalar loop below costs ~4 instructions per element, as much as the
  // block's tile multiplies at short key ranges).
  if constexpr (std::is_same_v<src_t, BFloat16>) {
    if (src_row_stride <= std::numeric_limits<int32_t>::max() / 16) {
      vector_pairs = cols / 2;
      const __m512i row_offsets = lane_strides(src_row_stride);
      for (int64_t r0 = 0; r0 < rows; r0 += 16) {
        const __mmask16 valid = first_lanes(rows - r0);
        for (int64_t pair = 0; pair < vector_pairs; ++pair) {
          // Offsets in bf16 elements, scale 2: each lane reads the pair (2 * pair, 2 * pair + 1) of its row.
          const __m512i units = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, row_offsets,
                                                            src + r0 * src_row_stride + 2 * pair, 2);
          _mm512_mask_storeu_epi32(dst + pair * dst_ld + 2 * r0, valid, units);
        }
      }
    }
  }
#endif
  for (int64_t r = 0; r < rows; ++r) {
    const src_t* row = src + r * src_row_stride;
    for (int64_t c = 2 * vector_pairs; c < cols; ++c) dst[(c / 2) * dst_ld + 2 * r + c % 2] = static_cast<BFloat16>(row[c]);
  }
}

// The same VNNI form from any element type (bf16 q or dout rows, row stride src_row_stride):
// dst[(r / 2) * dst_ld + 2 * c + r % 2] = src[r][c], zero for r in [rows, padded_rows) and c in
// [cols, padded_cols). Used for the B operands of dk += dS^T q and dv += P^T dout (k = queries).
template <typename src_t>
inline void pack_row_pairs_vnni(const src_t* src, int64_t src_row_stride, int64_t rows, int64_t padded_rows,
                                int64_t cols, int64_t padded_cols, BFloat16* dst, int64_t dst_ld) {
  for (int64_t pair = 0; 2 * pair < padded_rows; ++pair) std::memset(dst + pair * dst_ld, 0, 2 * padded_cols * sizeof(BFloat16));
  for (int64_t r = 0; r < rows; ++r) {
    const src_t* row = src + r * src_row_stride;
    for (int64_t c = 0; c < cols; ++c) dst[(r / 2) * dst_ld + 2 * c + r % 2] = static_cast<BFloat16>(row[c]);
  }
}

}  // namespace fastattn::cpu
