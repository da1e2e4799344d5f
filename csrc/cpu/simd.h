// SIMD building blocks of the CPU kernels: a register-tiled matrix-multiply micro-kernel and a
// vectorised exp2, both written once on at::vec::Vectorized<T> so that the same source compiles
// to AVX-512, AVX2, NEON or at::vec's portable scalar fallback.
//
// at::vec picks its implementation from the CPU_CAPABILITY_* macros, which torch defines per
// translation unit in its own build. An extension has to define them itself; this header maps
// the compiler's target flags (setup.py passes -march=native unless FASTATTN_CPU_ARCH says
// otherwise) to those macros, so it must be included before any other ATen header.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY_AVX512 1
#define CPU_CAPABILITY AVX512
#define FASTATTN_CPU_CAPABILITY "AVX512"
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#define CPU_CAPABILITY AVX2
#define FASTATTN_CPU_CAPABILITY "AVX2"
#else
#define CPU_CAPABILITY DEFAULT
#define FASTATTN_CPU_CAPABILITY "DEFAULT"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastattn::cpu {

using at::vec::Vectorized;

// The register tile of the micro-kernel: ROWS x VECTORS accumulators, plus VECTORS for a row of B
// and one broadcast of A, must fit the register file (32 vector registers with AVX-512, 16 else).
// float64 keeps a compensation register per accumulator (see micro_gemm), so its tile is half.
template <typename T>
struct MicroTile {
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr int kRows = std::is_same_v<T, double> ? 3 : 6;
  static constexpr int kVectors = 4;
#else
  static constexpr int kRows = std::is_same_v<T, double> ? 3 : 6;
  static constexpr int kVectors = std::is_same_v<T, double> ? 1 : 2;
#endif
};

// What the micro-kernel does with C.
enum class Accumulate {
  kOverwrite,   // C  = A B
  kAdd,         // C += (A B): the product is summed on its own and added at the end (see below)
  kScaleRows,   // C  = diag(row_scale) C + A B   (the online-softmax rescale, fused)
};
// kAdd sums in two levels, so a gradient summed over n tiles of 64 rounds like a sum of n + 64
// terms rather than one chain of 64 n (the chain cost float64 an order of magnitude of accuracy
// at Nq = 1024, measured against the oracle).

// C[ROWS x VECTORS*L] op= A[ROWS x K] * B[K x VECTORS*L], L = Vectorized<T>::size().
// A(i, kk) = a[i * a_row_stride + kk * a_k_stride] is broadcast, so A may be read transposed
// at no cost; B's rows are contiguous vectors, ldb elements apart.
//
// float64 sums its products compensated (the rounding error of each product, by an FMA, and of
// each addition, by TwoSum, go to a second accumulator): the result is about as accurate as the
// exact sum rounded once, whatever the order. float64 is the precision users check other results
// against, and a plain chain of FMAs is not: with one component of q . k far above the rest (a
// score of ~500 among terms of ~1), each of the D additions rounds at the large score's ulp, and
// the chain's scores made out 2.5x less accurate than PyTorch's float64 math on a Zen 4 CPU
// (tests' rising-scores case: max error 6.7e-14 vs PyTorch's 2.6e-14); compensated, 9.1e-15.
// It costs ~10 vector operations per product instead of one; float64 is not a speed target.
// Without a fused multiply-add (at::vec's portable fallback) the product's error reads as 0 and
// only the additions are compensated.
template <typename T, int ROWS, int VECTORS, Accumulate MODE>
inline void micro_gemm(int64_t depth, const T* a, int64_t a_row_stride, int64_t a_k_stride,
                       const T* b, int64_t ldb, T* c, int64_t ldc, const T* row_scale) {
  using Vec = Vectorized<T>;
  constexpr int L = Vec::size();
  constexpr bool kCompensated = std::is_same_v<T, double>;
  Vec acc[ROWS][VECTORS];
  Vec compensation[kCompensated ? ROWS : 1][kCompensated ? VECTORS : 1];
  // kScaleRows: when every scale of the tile is exactly 1 (the forward's lagging maxima did not
  // move, see online_softmax_shift: almost every key block after a query's first), C is loaded as
  // is; x * 1 == x, so the ROWS * VECTORS multiplies are skipped without changing a bit.
  bool scale_rows = false;
  if constexpr (MODE == Accumulate::kScaleRows) {
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) scale_rows |= row_scale[i] != T(1);
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < VECTORS; ++j) {
      if constexpr (kCompensated) compensation[i][j] = Vec(T(0));
      if constexpr (MODE == Accumulate::kOverwrite || MODE == Accumulate::kAdd) {
        acc[i][j] = Vec(T(0));
      } else {
        acc[i][j] = Vec::loadu(c + i * ldc + j * L);
        if (scale_rows) acc[i][j] = acc[i][j] * Vec(row_scale[i]);
      }
    }
  }
  // Unrolled: a call of depth 64 (D, or a key block) takes 8 loop branches rather than 64. The
  // fp32 forward ran 2% faster at N = 4096 (paired A/B, 2-core Xeon with AMX), forward+backward
  // at N = 2048 2%; the results are bitwise the same.
#pragma GCC unroll 8
  for (int64_t kk = 0; kk < depth; ++kk) {
    Vec b_row[VECTORS];
#pragma GCC unroll 8
    for (int j = 0; j < VECTORS; ++j) b_row[j] = Vec::loadu(b + kk * ldb + j * L);
#pragma GCC unroll 8
    for (int i = 0; i < ROWS; ++i) {
      const Vec a_value(a[i * a_row_stride + kk * a_k_stride]);
#pragma GCC unroll 8
      for (int j = 0; j < VECTORS; ++j) {
        if constexpr (kCompensated) {
          const Vec product = a_value * b_row[j];
          const Vec product_error = at::vec::fmsub(a_value, b_row[j], product);
          const Vec sum = acc[i][j] + product;
          const Vec product_part = sum - acc[i][j];
          const Vec sum_error = (acc[i][j] - (sum - product_part)) + (product - product_part);
          compensation[i][j] = compensation[i][j] + (sum_error + product_error);
          acc[i][j] = sum;
        } else {
          acc[i][j] = at::vec::fmadd(a_value, b_row[j], acc[i][j]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < ROWS; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < VECTORS; ++j) {
      if constexpr (kCompensated) acc[i][j] = acc[i][j] + compensation[i][j];
      if constexpr (MODE == Accumulate::kAdd) acc[i][j] = Vec::loadu(c + i * ldc + j * L) + acc[i][j];
      acc[i][j].store(c + i * ldc + j * L);
    }
  }
}

// Calls micro_gemm<ROWS, VECTORS> for the remainder shape (rows <= ROWS, vectors <= VECTORS),
// instantiating every smaller tile once.
template <typename T, int ROWS, int VECTORS, Accumulate MODE>
inline void micro_gemm_remainder(int rows, int vectors, int64_t depth, const T* a,
                                 int64_t a_row_stride, int64_t a_k_stride, const T* b,
                                 int64_t ldb, T* c, int64_t ldc, const T* row_scale) {
  if constexpr (ROWS > 1) {
    if (rows < ROWS) {
      return micro_gemm_remainder<T, ROWS - 1, VECTORS, MODE>(
          rows, vectors, depth, a, a_row_stride, a_k_stride, b, ldb, c, ldc, row_scale);
    }
  }
  if constexpr (VECTORS > 1) {
    if (vectors < VECTORS) {
      return micro_gemm_remainder<T, ROWS, VECTORS - 1, MODE>(
          rows, vectors, depth, a, a_row_stride, a_k_stride, b, ldb, c, ldc, row_scale);
    }
  }
  micro_gemm<T, ROWS, VECTORS, MODE>(depth, a, a_row_stride, a_k_stride, b, ldb, c, ldc,
                                     row_scale);
}

// C[M x N] op= A[M x K] * B[K x N] for the small tiles of one attention block.
// N must be a multiple of Vectorized<T>::size() (callers pad their buffers with zeros).
// Column panels outside, rows inside: the K x (VECTORS*L) panel of B stays in L1 while every
// row block streams past it.
template <typename T, Accumulate MODE>
inline void gemm(int64_t m, int64_t n, int64_t depth, const T* a, int64_t a_row_stride,
                 int64_t a_k_stride, const T* b, int64_t ldb, T* c, int64_t ldc,
                 const T* row_scale = nullptr) {
  constexpr int L = Vectorized<T>::size();
  const int64_t n_vectors = n / L;
  constexpr int kRows = MicroTile<T>::kRows, kVectors = MicroTile<T>::kVectors;
  for (int64_t j0 = 0; j0 < n_vectors; j0 += kVectors) {
    const int vectors = static_cast<int>(std::min<int64_t>(kVectors, n_vectors - j0));
    for (int64_t i0 = 0; i0 < m; i0 += kRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kRows, m - i0));
      micro_gemm_remainder<T, kRows, kVectors, MODE>(
          rows, vectors, depth, a + i0 * a_row_stride, a_row_stride, a_k_stride, b + j0 * L, ldb,
          c + i0 * ldc + j0 * L, ldc, row_scale == nullptr ? nullptr : row_scale + i0);
    }
  }
}

// 2^x for softmax arguments (x <= 8, see online_softmax_shift); exactly 0 for x = -inf, exactly 1
// for x = 0 (the online softmax's rescale relies on it), NaN stays NaN. Inlined, unlike at::vec's
// exp2 (a Sleef call): 2^x = 2^n * 2^f with 2^f by a near-minimax polynomial whose constant term
// is 1. With AVX-512 it has degree 5, within 2.3 ulp (0.7 on average) in float arithmetic over
// f in [0, 1): one FMA per score fewer than degree 6 (~1 ulp), for an fp32 forward 0.6% faster
// (paired A/B, 2-core Xeon), at an accuracy against the float64 oracle unchanged in the tests and
// like SDPA's; the portable version keeps degree 6.
//
// Masked scores never give a subnormal: on Intel CPUs an instruction whose result is (or
// underflows through) a subnormal takes a microcode assist costing ~100 normal ones, and every
// masked score (-inf) took one (measured on a Xeon with AMX: a bf16 (256, 256) window forward at
// N = 4096 ran 17 ms with subnormal results, 12 ms with the CPU flushing them). The AVX-512
// version returns 2^x below 2^-125 (~1e-38 of the row's largest probability) as 0 and no
// subnormal at all; the AVX2 and portable ones give 0 * poly below -127 and can still give a
// subnormal for x in (-127, -125.5), an argument a softmax rarely sees.
#if defined(CPU_CAPABILITY_AVX512)
// 2^f on [0, 1), for n = floor(x): coefficients of 1, f, f^2, ... (fitted for relative error
// with the constant term held at 1).
constexpr float kExp2Coefficients[6] = {1.0f, 0.6931512951850891f, 0.24016445875167847f, 0.05579989030957222f,
                                        0.00901706237345934f, 0.0018671146826818585f};
// Degree 4, 2.7e-6 relative: for probabilities that are rounded to bf16 (2^-9) before they are
// multiplied, an FMA fewer than kExp2Coefficients (two fewer than the degree-6 polynomial it was
// measured against: the bf16 AMX forward ~10% faster).
constexpr float kExp2Bf16Coefficients[5] = {1.0000026226043701f, 0.6930038332939148f, 0.2414427548646927f,
                                            0.052011460065841675f, 0.013534167781472206f};

// VREDUCEPS gives f = x - floor(x) in one instruction and VSCALEFPS multiplies by 2^floor(x) by
// itself, so the range reduction costs one instruction. Lanes below -125 are zeroed by the mask
// (their computed values are never used); NaN is "not less than", so it stays NaN.
template <size_t COEFFICIENTS>
inline Vectorized<float> exp2_avx512(Vectorized<float> x, const float (&coefficients)[COEFFICIENTS]) {
  const __mmask16 representable = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-125.0f), _CMP_NLT_UQ);
  const __m512 f = _mm512_reduce_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 poly = _mm512_set1_ps(coefficients[COEFFICIENTS - 1]);
#pragma GCC unroll 8
  for (int k = int(COEFFICIENTS) - 2; k >= 0; --k) poly = _mm512_fmadd_ps(poly, f, _mm512_set1_ps(coefficients[k]));
  return _mm512_maskz_scalef_ps(representable, poly, x);
}

inline Vectorized<float> exp2(Vectorized<float> x) { return exp2_avx512(x, kExp2Coefficients); }
inline Vectorized<float> exp2_for_bf16(Vectorized<float> x) { return exp2_avx512(x, kExp2Bf16Coefficients); }
#elif defined(CPU_CAPABILITY_AVX2)
// 2^f on [-1/2, 1/2], for n = round(x): degree 5, within 2.0 ulp (0.7 on average) in float
// arithmetic, like the AVX-512 polynomial; fitted for relative error with the constant term 1.
constexpr float kExp2Coefficients[6] = {1.0f, 0.6931470036506653f, 0.24022231996059418f, 0.05550685152411461f,
                                        0.009671973995864391f, 0.0013277654070407152f};

// 12 instructions per 8 scores where the portable version below, on at::vec, takes 18: the clamps
// are one max / min each with the bound as the first operand (VMAXPS returns its second operand
// when either is NaN, so NaN passes through, where at::vec::maximum spends three instructions to
// propagate it), and n = round(x) comes from adding 1.5 * 2^23 + 127 (the sum's ulp is 1, so the
// float addition rounds x to nearest even and leaves n + 127 in the low mantissa bits, which one
// shift moves into the exponent field of 2^n) instead of round, convert and add. The fp32 forward
// of an AVX2 build ran 2.7% faster than with the portable version (paired A/B, 1 thread, N = 1024,
// Zen 4 with torch capped to AVX2; RESULTS.md).
// The clamps give exactly +0.0 for x <= -127 and +inf for x >= 128, as below.
//
// exp2_each computes COUNT of them stage by stage, each step for all COUNT vectors before the
// next. One exp2 is a chain of ~40 cycles of latency (clamps, range reduction, five FMAs, the
// 2^n multiply), and written one vector after another the chains fill the CPU's scheduler with
// operations that wait on their predecessors: the exponentiation pass of a 64 x 64 tile ran
// ~6.6 cycles per vector on Zen 3, where its 14 vector operations on four FP pipes need ~3.5.
// Stand-alone, that pass ran ~10% faster with 2 or 4 vectors interleaved and slower with 8 (out
// of registers); the fp32 forward (1 thread, N = 2048, paired A/B on a Zen 3 guest) 1.6% faster
// with 4, 0.9% with 2. The results are bitwise the same. The backward's exponentiation, a
// smaller share of its time, showed no difference and keeps one vector at a time.
template <int COUNT>
inline void exp2_each(Vectorized<float>* x) {
  const __m256 round_and_bias = _mm256_set1_ps(12582912.0f + 127.0f);
  __m256 clamped[COUNT], biased[COUNT], f[COUNT], poly[COUNT];
#pragma GCC unroll 8
  for (int g = 0; g < COUNT; ++g) {
    clamped[g] = _mm256_min_ps(_mm256_set1_ps(128.0f), _mm256_max_ps(_mm256_set1_ps(-127.0f), x[g]));
  }
#pragma GCC unroll 8
  for (int g = 0; g < COUNT; ++g) biased[g] = _mm256_add_ps(clamped[g], round_and_bias);
#pragma GCC unroll 8
  for (int g = 0; g < COUNT; ++g) f[g] = _mm256_sub_ps(clamped[g], _mm256_sub_ps(biased[g], round_and_bias));
#pragma GCC unroll 8
  for (int g = 0; g < COUNT; ++g) poly[g] = _mm256_set1_ps(kExp2Coefficients[5]);
#pragma GCC unroll 5
  for (int k = 4; k >= 0; --k) {
#pragma GCC unroll 8
    for (int g = 0; g < COUNT; ++g) poly[g] = _mm256_fmadd_ps(poly[g], f[g], _mm256_set1_ps(kExp2Coefficients[k]));
  }
#pragma GCC unroll 8
  for (int g = 0; g < COUNT; ++g) {
    x[g] = _mm256_mul_ps(poly[g], _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(biased[g]), 23)));
  }
}

inline Vectorized<float> exp2(Vectorized<float> x) {
  exp2_each<1>(&x);
  return x;
}
#else
// 2^f on [-1/2, 1/2], for n = round(x).
constexpr float kExp2Coefficients[7] = {1.0000000005539997f,   0.6931472057293504f,
                                        0.2402264689119614f,   0.05550328793931532f,
                                        0.009618488964144162f, 0.001339992443631255f,
                                        0.00015345792616857086f};

inline Vectorized<float> exp2(Vectorized<float> x) {
  using Vec = Vectorized<float>;
  // 2^n below is then +0.0 exactly for x <= -127 (poly * 0, no subnormal) and +inf for x >= 128
  // (exponent field 255): larger n would wrap into the sign bit, and the forward's try at its
  // lagging max relies on an overflowing P being inf (online_softmax_step_at_lagging_max).
  x = at::vec::minimum(at::vec::maximum(x, Vec(-127.0f)), Vec(128.0f));
  const Vec n = x.round();
  const Vec f = x - n;
  Vec poly = Vec(kExp2Coefficients[6]);
#pragma GCC unroll 6
  for (int k = 5; k >= 0; --k) poly = at::vec::fmadd(poly, f, Vec(kExp2Coefficients[k]));
  const Vectorized<int32_t> exponent = at::vec::convert_to_int_of_same_size(n) + Vectorized<int32_t>(127);
  return poly * at::vec::cast<float>(exponent << Vectorized<int32_t>(23));
}
#endif

inline Vectorized<double> exp2(Vectorized<double> x) {
  using Vec = Vectorized<double>;
  // ln(2)^k / k!, k = 0..13: truncation error at |f| = 1/2 is 4e-18, below double's rounding.
  constexpr double coefficients[14] = {
      1.0,                    0.69314718055994531,    0.24022650695910071,
      0.055504108664821580,   0.0096181291076284772,  0.0013333558146428443,
      0.00015403530393381609, 1.5252733804059840e-05, 1.3215486790144307e-06,
      1.0178086009239699e-07, 7.0549116208011233e-09, 4.4455382718708114e-10,
      2.5678435993488203e-11, 1.3691488853904124e-12};
  x = at::vec::minimum(at::vec::maximum(x, Vec(-1023.0)), Vec(1024.0));  // 0 and +inf at the ends, as above
  const Vec n = x.round();
  const Vec f = x - n;
  Vec poly = Vec(coefficients[13]);
#pragma GCC unroll 13
  for (int k = 12; k >= 0; --k) poly = at::vec::fmadd(poly, f, Vec(coefficients[k]));
  const Vectorized<int64_t> exponent = at::vec::convert_to_int_of_same_size(n) + Vectorized<int64_t>(1023);
  return poly * at::vec::cast<double>(exponent << Vectorized<int64_t>(52));
}

// exp2 of COUNT vectors, one after another: double, and float where no interleaved version
// exists (the AVX2 float overload above is the more specialized one and wins). Callers pass
// kExp2Interleave<T> vectors at a time, the count measured best for their type and build.
template <int COUNT, typename T>
inline void exp2_each(Vectorized<T>* x) {
  for (int g = 0; g < COUNT; ++g) x[g] = exp2(x[g]);
}
template <typename T>
constexpr int kExp2Interleave = 1;
#if defined(CPU_CAPABILITY_AVX2)
template <>
constexpr int kExp2Interleave<float> = 4;
#endif

// transpose_in_registers: dst[c * dst_ld + r] = src[r * src_ld + c] for one square block of
// kRegisterTransposeSize floats a side (16 with AVX-512, 8 with AVX2; the portable build has none
// and pack_rows_transposed's scalar loop does it all). The scalar transpose of the fp32 forward's
// q blocks was ~2% of its time (perf, 2-core Xeon, and an AVX2 build on Zen 4, whose forward the
// 8 x 8 version made 0.5% faster): a load and a store per element against a quarter (AVX-512)
// or three eighths (AVX2) of a shuffle here.
#if defined(CPU_CAPABILITY_AVX512)
constexpr int64_t kRegisterTransposeSize = 16;

// 16 row loads, 64 shuffles, 16 row stores.
inline void transpose_in_registers(const float* src, int64_t src_ld, float* dst, int64_t dst_ld) {
  // Each 512-bit register is four 128-bit lanes; lane l of an input row holds columns 4l..4l+3.
  __m512 rows[16], pairs[16];
#pragma GCC unroll 16
  for (int r = 0; r < 16; ++r) rows[r] = _mm512_loadu_ps(src + r * src_ld);
  // Interleave rows 2k and 2k + 1: lane l of pairs[2k] holds columns 4l, 4l + 1 of both rows,
  // lane l of pairs[2k + 1] columns 4l + 2, 4l + 3.
#pragma GCC unroll 8
  for (int r = 0; r < 16; r += 2) {
    pairs[r] = _mm512_unpacklo_ps(rows[r], rows[r + 1]);
    pairs[r + 1] = _mm512_unpackhi_ps(rows[r], rows[r + 1]);
  }
  // Interleave those 64-bit pairs across rows 4k.. 4k + 3: lane l of rows[4k + m] is then
  // column 4l + m of the four rows 4k..4k+3 (call them group k).
#pragma GCC unroll 4
  for (int r = 0; r < 16; r += 4) {
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(pairs[r + h]), b = _mm512_castps_pd(pairs[r + 2 + h]);
      rows[r + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      rows[r + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  }
  // Output row 4l + m is lane l of rows[m], rows[4 + m], rows[8 + m], rows[12 + m] (groups 0-3).
  // Two rounds of 128-bit lane shuffles (0x88 takes lanes 0, 2 of each source, 0xdd lanes 1, 3):
  // first the even and odd lanes of groups (0, 1) and of (2, 3), then those of the results.
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {
    const __m512 even01 = _mm512_shuffle_f32x4(rows[m], rows[4 + m], 0x88);  // g0.l0 g0.l2 g1.l0 g1.l2
    const __m512 odd01 = _mm512_shuffle_f32x4(rows[m], rows[4 + m], 0xdd);   // g0.l1 g0.l3 g1.l1 g1.l3
    const __m512 even23 = _mm512_shuffle_f32x4(rows[8 + m], rows[12 + m], 0x88);
    const __m512 odd23 = _mm512_shuffle_f32x4(rows[8 + m], rows[12 + m], 0xdd);
    _mm512_storeu_ps(dst + m * dst_ld, _mm512_shuffle_f32x4(even01, even23, 0x88));         // lane 0 of each
    _mm512_storeu_ps(dst + (4 + m) * dst_ld, _mm512_shuffle_f32x4(odd01, odd23, 0x88));     // lane 1
    _mm512_storeu_ps(dst + (8 + m) * dst_ld, _mm512_shuffle_f32x4(even01, even23, 0xdd));   // lane 2
    _mm512_storeu_ps(dst + (12 + m) * dst_ld, _mm512_shuffle_f32x4(odd01, odd23, 0xdd));    // lane 3
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
constexpr int64_t kRegisterTransposeSize = 8;

// 8 row loads, 24 shuffles, 8 row stores. Each 256-bit register is two 128-bit lanes; lane l of
// an input row holds columns 4l..4l+3, and the first two rounds shuffle within lanes only.
inline void transpose_in_registers(const float* src, int64_t src_ld, float* dst, int64_t dst_ld) {
  __m256 rows[8], pairs[8];
#pragma GCC unroll 8
  for (int r = 0; r < 8; ++r) rows[r] = _mm256_loadu_ps(src + r * src_ld);
  // Lane l of pairs[2k] holds columns 4l, 4l + 1 of rows 2k and 2k + 1, of pairs[2k + 1] columns
  // 4l + 2, 4l + 3.
#pragma GCC unroll 4
  for (int r = 0; r < 8; r += 2) {
    pairs[r] = _mm256_unpacklo_ps(rows[r], rows[r + 1]);
    pairs[r + 1] = _mm256_unpackhi_ps(rows[r], rows[r + 1]);
  }
  // Lane l of rows[g + m] (g = 0, 4) is then column 4l + m of the four rows g..g+3 (0x44 takes
  // the low 64-bit halves of both sources, 0xee the high ones).
#pragma GCC unroll 2
  for (int g = 0; g < 8; g += 4) {
    for (int h = 0; h < 2; ++h) {
      rows[g + 2 * h] = _mm256_shuffle_ps(pairs[g + h], pairs[g + 2 + h], 0x44);
      rows[g + 2 * h + 1] = _mm256_shuffle_ps(pairs[g + h], pairs[g + 2 + h], 0xee);
    }
  }
  // Output row 4l + m is lane l of rows[m] followed by lane l of rows[4 + m].
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) {
    _mm256_storeu_ps(dst + m * dst_ld, _mm256_permute2f128_ps(rows[m], rows[4 + m], 0x20));
    _mm256_storeu_ps(dst + (4 + m) * dst_ld, _mm256_permute2f128_ps(rows[m], rows[4 + m], 0x31));
  }
}
#endif

// a * b - c rounded once, as the SIMD builds' at::vec::fmsub does; at::vec's portable fallback
// rounds the product first. In a softmax argument s * scale - max, both terms ~100 for sharp
// attention, that extra rounding costs ~1e-5 of each probability: the portable build's dk was
// 3.2x PyTorch's error on scores rising to ~140 (test_scores_rising_through_the_key_blocks).
template <typename T>
inline Vectorized<T> multiply_subtract(const Vectorized<T>& a, const Vectorized<T>& b, const Vectorized<T>& c) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return at::vec::fmsub(a, b, c);
#else
  constexpr int L = Vectorized<T>::size();
  T x[L], y[L], z[L];
  a.store(x);
  b.store(y);
  c.store(z);
  for (int i = 0; i < L; ++i) x[i] = std::fma(x[i], y[i], -z[i]);
  return Vectorized<T>::loadu(x);
#endif
}

// True when values[0, count) are all exactly 1 (count a multiple of the vector length).
template <typename T>
inline bool all_ones(const T* values, int64_t count) {
  using Vec = Vectorized<T>;
  Vec any_other(T(0));
  for (int64_t j = 0; j < count; j += Vec::size()) any_other = any_other | (Vec::loadu(values + j) != Vec(T(1)));
  return at::vec::vec_reduce_all<T>([](const Vec& x, const Vec& y) { return x | y; }, any_other) == T(0);
}

template <typename T>
inline T reduce_max(const T* values, int64_t count) {
  using Vec = Vectorized<T>;
  Vec best(-std::numeric_limits<T>::infinity());
  for (int64_t j = 0; j < count; j += Vec::size()) best = at::vec::maximum(best, Vec::loadu(values + j));
  return at::vec::vec_reduce_all<T>([](const Vec& x, const Vec& y) { return at::vec::maximum(x, y); }, best);
}

inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

}  // namespace fastattn::cpu
