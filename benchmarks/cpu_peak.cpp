// One core's peak multiply-add rate: _mm512_fmadd_ps (fp32) against _mm512_dpbf16_ps (bf16 pairs
// into fp32, AVX512-BF16). The loop keeps 12 independent accumulators in registers so that the
// rate is bounded by the FMA ports, not by latency or memory; it is the ceiling RESULTS.md quotes
// for a CPU without AMX. Needs a CPU and compiler with AVX512-BF16:
//   g++ -O2 -march=native benchmarks/cpu_peak.cpp -o /tmp/cpu_peak && /tmp/cpu_peak
#include <immintrin.h>

#include <chrono>
#include <cstdio>

enum class Product { kFp32Fma, kBf16DotProduct };

template <Product kProduct>
void measure(long iterations) {
  constexpr int kAccumulators = 12;
  __m512 accumulators[kAccumulators];
  for (auto& accumulator : accumulators) accumulator = _mm512_setzero_ps();
  __m512 a = _mm512_set1_ps(1e-8f), b = _mm512_set1_ps(1e-8f);
  __m512bh a_pairs = (__m512bh)_mm512_set1_epi16(0x3f80);  // bf16 1.0
  __m512bh b_pairs = (__m512bh)_mm512_set1_epi16(0x3f80);
  const auto start = std::chrono::steady_clock::now();
  for (long iteration = 0; iteration < iterations; ++iteration) {
#pragma GCC unroll 12
    for (auto& accumulator : accumulators) {
      if constexpr (kProduct == Product::kFp32Fma) {
        accumulator = _mm512_fmadd_ps(a, b, accumulator);
      } else {
        accumulator = _mm512_dpbf16_ps(accumulator, a_pairs, b_pairs);
      }
    }
    // Keeps the compiler from hoisting the products out of the loop.
    asm volatile("" : "+v"(a), "+v"(b));
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  float sum = 0.f;
  for (auto& accumulator : accumulators) sum += _mm512_reduce_add_ps(accumulator);
  const int flops_per_lane = kProduct == Product::kFp32Fma ? 2 : 4;  // a bf16 lane holds 2 products
  const double flops = double(iterations) * kAccumulators * 16 * flops_per_lane;
  std::printf("%s: %.1f GFLOP/s (checksum %g)\n",
              kProduct == Product::kFp32Fma ? "fp32 _mm512_fmadd_ps" : "bf16 _mm512_dpbf16_ps",
              flops / seconds / 1e9, sum);
}

int main() {
  constexpr long kIterations = 200000000 / 6;
  for (int round = 0; round < 2; ++round) {
    measure<Product::kFp32Fma>(kIterations);
    measure<Product::kBf16DotProduct>(kIterations);
  }
}
