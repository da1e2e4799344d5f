// CPU stand-ins for the CUDA built-ins and the inline PTX of csrc/cuda/ptx.cuh, so that the real
// kernel code compiles with a host C++ compiler (FASTATTN_CUDA_EMULATION, tests only) and runs on
// emulated threads (emulator.cpp: one fiber per CUDA thread, a CTA at a time).
//
// Each stand-in follows the PTX ISA's definition: the fragment layouts of ldmatrix (.x4, with and
// without .trans) and of mma.sync.m16n8k16 (f16/bf16 inputs, f32 accumulators), cp.async's
// zero fill, and full-warp shuffles. Warp-collective operations exchange values through per-lane
// slots and a warp barrier, so every lane must take part (as on the GPU with a full mask), and
// the harness checks what the hardware would require: 16-byte aligned shared addresses inside the
// CTA's shared memory, full-warp masks. A cp.async destination is poisoned with NaN bytes until
// the issuing thread waits for it, so reading it early shows up as NaN in the results.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

// cuda_runtime_api.h's host_defines.h gives these attribute spellings a host compiler rejects.
#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace fastattn::cuda::emulation {

struct Index3 {
  unsigned x, y, z;
};

const Index3& thread_index();
const Index3& block_index();
void sync_block();
unsigned char* shared_memory();
// Fails the emulated launch with `message` unless `condition` holds.
void require(bool condition, const char* message);
void require_shared(const void* pointer, int bytes, const char* what);
// The warp-collective operations (emulator.cpp).
uint32_t shuffle_word(unsigned mask, uint32_t word, int lane_or_xor, bool xor_mode);
void ldmatrix(uint32_t (&r)[4], const void* smem, bool transposed);
void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bfloat16);
// cp.async: poisons dst now, copies (or zero-fills) it when the thread waits.
void defer_copy(void* dst, const void* src, bool valid);
void complete_copies();

}  // namespace fastattn::cuda::emulation

#define threadIdx (::fastattn::cuda::emulation::thread_index())
#define blockIdx (::fastattn::cuda::emulation::block_index())

inline void __syncthreads() { ::fastattn::cuda::emulation::sync_block(); }

template <typename T>
inline T __ldg(const T* pointer) {
  return *pointer;
}

template <typename T>
inline T emulated_shuffle(unsigned mask, T value, int lane_or_xor, bool xor_mode) {
  static_assert(sizeof(T) == sizeof(uint32_t), "32-bit shuffles only");
  uint32_t word;
  std::memcpy(&word, &value, sizeof(T));
  word = ::fastattn::cuda::emulation::shuffle_word(mask, word, lane_or_xor, xor_mode);
  T result;
  std::memcpy(&result, &word, sizeof(T));
  return result;
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return emulated_shuffle(mask, value, lane_mask, true);
}
template <typename T>
inline T __shfl_sync(unsigned mask, T value, int source_lane) {
  return emulated_shuffle(mask, value, source_lane, false);
}

namespace fastattn::cuda {

template <typename T>
inline T* dynamic_shared_memory() {
  return reinterpret_cast<T*>(emulation::shared_memory());
}

inline float fast_exp2(float x) { return std::exp2(x); }
inline float fast_reciprocal(float x) { return 1.f / x; }

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  emulation::require_shared(smem, 16, "cp.async destination");
  emulation::require(reinterpret_cast<uintptr_t>(gmem) % 16 == 0, "cp.async source not 16-byte aligned");
  emulation::defer_copy(smem, gmem, valid);
}
inline void cp_async_commit() {}
inline void cp_async_wait_all() { emulation::complete_copies(); }

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { emulation::ldmatrix(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { emulation::ldmatrix(r, smem, true); }

template <typename T>
inline void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emulation::mma_16x8x16(d, a, b0, b1, std::is_same_v<T, __nv_bfloat16>);
}

}  // namespace fastattn::cuda
