// The CPU emulation harness of fastattn's CUDA kernels (tests only; see tests/test_cuda_emulated.py).
//
// The real kernel sources (csrc/cuda/attention_*.cu, compiled as C++ with FASTATTN_CUDA_EMULATION)
// run here on emulated CUDA threads: every thread of a CTA is a fiber with its own stack, switched
// cooperatively at barriers (__syncthreads, and a warp barrier inside each warp-collective
// operation), one CTA after the other. Shared memory is one buffer per CTA, poisoned with NaN
// bytes before each CTA. The module's fwd / bwd take CPU tensors and go through the same host glue
// as the CUDA ops (attention_glue.h), so the test can hold them to the float64 oracle exactly as it
// holds the CUDA backend on a GPU.
//
// It checks correctness of the kernels' logic (indexing, fragment layouts as the PTX ISA defines
// them, masking, pipelining order, barriers); it says nothing about speed, and races that need
// truly concurrent warps to show are out of its reach. x86-64 only (the fiber switch is 14 lines
// of assembly, 100x cheaper than swapcontext's signal-mask system calls).
#if !defined(__x86_64__)
#error "the fastattn CUDA emulation harness needs x86-64"
#endif

#include <torch/extension.h>

#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/attention_glue.h"
#include "cuda/emulation/emulated_launch.h"
#include "cuda/emulation/emulated_ptx.h"

extern "C" void fastattn_emulation_switch(void** save_stack_pointer, void* load_stack_pointer);
// Saves the callee-saved registers on the current stack and its pointer in *save, then resumes the
// stack at `load` (which was saved the same way, or prepared by start_fiber).
asm(R"(
    .text
    .globl fastattn_emulation_switch
    .type fastattn_emulation_switch, @function
fastattn_emulation_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size fastattn_emulation_switch, .-fastattn_emulation_switch
)");

namespace fastattn::cuda::emulation {
namespace {

constexpr size_t kStackBytes = 256 * 1024;
constexpr int kMaxWarps = 32;

struct PendingCopy {
  void* dst;
  const void* src;
  bool valid;
};

// One lane's contribution to a warp-collective operation.
struct LaneSlot {
  uint32_t words[6];
  const void* pointer;
};

// What a fiber waits for: a barrier whose generation must move past `generation`.
enum class Wait { kNothing, kWarp, kBlock };

struct Fiber {
  std::unique_ptr<char[]> stack{new char[kStackBytes]};
  void* stack_pointer = nullptr;
  Index3 index{};
  bool finished = false;
  Wait wait = Wait::kNothing;
  uint64_t wait_generation = 0;
  uint64_t collectives = 0;  // picks the slot buffer of the next warp-collective operation
  std::vector<PendingCopy> copies;
};

// The CTA being emulated. Emulation is single-threaded (run_grid holds a lock), so it is global.
struct Block {
  std::vector<Fiber> fibers;
  int threads = 0;
  Index3 index{};
  int current = -1;
  void* scheduler_stack_pointer = nullptr;
  const std::function<void()>* body = nullptr;
  std::unique_ptr<unsigned char[]> shared_storage;
  unsigned char* shared = nullptr;  // 128-byte aligned start of shared_storage
  int shared_bytes = 0;
  int block_arrived = 0;
  uint64_t block_generation = 0;
  int warp_arrived[kMaxWarps] = {};
  uint64_t warp_generation[kMaxWarps] = {};
  // Two buffers per warp: a lane cannot reuse one before every lane has read it, because that
  // needs the whole warp to reach the collective in between.
  LaneSlot slots[kMaxWarps][2][32] = {};
  std::string error;
};

Block block;

Fiber& self() { return block.fibers[block.current]; }

// Blocks the calling fiber until the barrier `wait` moves past `generation`.
void wait_for(Wait wait, uint64_t generation, const uint64_t& current_generation) {
  Fiber& fiber = self();
  while (current_generation == generation) {
    fiber.wait = wait;
    fiber.wait_generation = generation;
    fastattn_emulation_switch(&fiber.stack_pointer, block.scheduler_stack_pointer);
  }
  fiber.wait = Wait::kNothing;
}

bool ready(const Fiber& fiber) {
  switch (fiber.wait) {
    case Wait::kWarp:
      return block.warp_generation[fiber.index.x / 32] != fiber.wait_generation;
    case Wait::kBlock:
      return block.block_generation != fiber.wait_generation;
    default:
      return !fiber.finished;
  }
}

[[noreturn]] void stop_fiber() {
  Fiber& fiber = self();
  fiber.finished = true;
  fastattn_emulation_switch(&fiber.stack_pointer, block.scheduler_stack_pointer);
  __builtin_unreachable();
}

[[noreturn]] void fail(const std::string& message) {
  if (block.error.empty()) {
    block.error = message + " (thread " + std::to_string(self().index.x) + " of block " +
                  std::to_string(block.index.x) + ")";
  }
  stop_fiber();
}

void fiber_entry() {
  (*block.body)();
  if (!self().copies.empty()) fail("a thread exited with cp.async copies it never waited for");
  stop_fiber();
}

void start_fiber(Fiber& fiber) {
  // The first switch pops six zero registers and "returns" into fiber_entry with the stack
  // aligned as after a call (rsp = 8 mod 16).
  char* top = fiber.stack.get() + kStackBytes;
  top -= reinterpret_cast<uintptr_t>(top) % 16;
  void** stack = reinterpret_cast<void**>(top - 64);
  for (int i = 0; i < 6; ++i) stack[i] = nullptr;
  stack[6] = reinterpret_cast<void*>(&fiber_entry);
  stack[7] = nullptr;
  fiber.stack_pointer = stack;
}

// Runs one round of the ready lanes of `warp`; returns whether any ran.
bool run_warp_round(int warp) {
  bool ran = false;
  for (int i = 32 * warp; i < 32 * warp + 32; ++i) {
    if (!ready(block.fibers[i])) continue;
    block.current = i;
    fastattn_emulation_switch(&block.scheduler_stack_pointer, block.fibers[i].stack_pointer);
    if (!block.error.empty()) throw std::runtime_error("fastattn CUDA emulation: " + block.error);
    ran = true;
  }
  return ran;
}

// Runs the CTA's threads to completion. Warps do not advance in step: the first warp in priority
// order runs as far as it can (to a __syncthreads or its end) before the next one starts, and
// after every __syncthreads the order starts over, so a missing barrier lets one warp overwrite
// (or read) shared memory that others have not finished with, and the results show it. Even
// blocks favour low warps, odd blocks high warps.
void run_block() {
  for (int i = 0; i < block.threads; ++i) {
    Fiber& fiber = block.fibers[i];
    fiber.index = {static_cast<unsigned>(i), 0, 0};
    fiber.finished = false;
    fiber.wait = Wait::kNothing;
    fiber.collectives = 0;
    fiber.copies.clear();
    start_fiber(fiber);
  }
  block.block_arrived = 0;
  for (int w = 0; w < kMaxWarps; ++w) block.warp_arrived[w] = 0;
  std::memset(block.shared, 0xff, block.shared_bytes);  // NaN in every float and half
  const int warps = block.threads / 32;
  const bool high_warps_first = block.index.x % 2 == 1;
  for (;;) {
    bool ran = false;
    for (int position = 0; position < warps; ++position) {
      const int warp = high_warps_first ? warps - 1 - position : position;
      const uint64_t block_generation = block.block_generation;
      while (run_warp_round(warp)) {
        ran = true;
        if (block.block_generation != block_generation) break;  // a __syncthreads opened: start over
      }
      if (ran) break;
    }
    if (ran) continue;
    for (int i = 0; i < block.threads; ++i) {
      if (!block.fibers[i].finished) {
        throw std::runtime_error("fastattn CUDA emulation: deadlock in block " + std::to_string(block.index.x) +
                                 " (a thread left while others wait at a barrier, or lanes of a warp diverged)");
      }
    }
    return;
  }
}

const LaneSlot* warp_exchange(const LaneSlot& slot) {
  Fiber& fiber = self();
  const int lane = fiber.index.x % 32, warp = fiber.index.x / 32;
  const int buffer = static_cast<int>(fiber.collectives++ & 1);
  block.slots[warp][buffer][lane] = slot;
  const uint64_t generation = block.warp_generation[warp];
  if (++block.warp_arrived[warp] == 32) {
    block.warp_arrived[warp] = 0;
    ++block.warp_generation[warp];
  } else {
    wait_for(Wait::kWarp, generation, block.warp_generation[warp]);
  }
  return block.slots[warp][buffer];
}

uint32_t load_b16(const void* row, int column) {
  uint16_t bits;
  std::memcpy(&bits, static_cast<const unsigned char*>(row) + 2 * column, 2);
  return bits;
}

float b16_to_float(uint32_t bits, bool bfloat16) {
  if (bfloat16) {
    const uint32_t word = bits << 16;
    float value;
    std::memcpy(&value, &word, 4);
    return value;
  }
  __half_raw raw;
  raw.x = static_cast<unsigned short>(bits);
  return __half2float(__half(raw));
}

}  // namespace

const Index3& thread_index() { return self().index; }
const Index3& block_index() { return block.index; }
unsigned char* shared_memory() { return block.shared; }

void require(bool condition, const char* message) {
  if (!condition) fail(message);
}

void require_shared(const void* pointer, int bytes, const char* what) {
  const auto* p = static_cast<const unsigned char*>(pointer);
  if (p < block.shared || p + bytes > block.shared + block.shared_bytes) fail(std::string(what) + " outside shared memory");
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fail(std::string(what) + " not 16-byte aligned");
}

void sync_block() {
  const uint64_t generation = block.block_generation;
  if (++block.block_arrived == block.threads) {
    block.block_arrived = 0;
    ++block.block_generation;
    return;
  }
  wait_for(Wait::kBlock, generation, block.block_generation);
}

uint32_t shuffle_word(unsigned mask, uint32_t word, int lane_or_xor, bool xor_mode) {
  require(mask == 0xffffffffu, "shuffle with a partial mask");
  LaneSlot slot{};
  slot.words[0] = word;
  const LaneSlot* slots = warp_exchange(slot);
  const int lane = static_cast<int>(self().index.x % 32);
  return slots[(xor_mode ? lane ^ lane_or_xor : lane_or_xor) & 31].words[0];
}

void ldmatrix(uint32_t (&r)[4], const void* smem, bool transposed) {
  require_shared(smem, 16, "ldmatrix row address");
  LaneSlot slot{};
  slot.pointer = smem;
  const LaneSlot* slots = warp_exchange(slot);
  const int lane = static_cast<int>(self().index.x % 32), g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    // Lanes 8i..8i+7 address the rows of matrix i; lane 4g + t receives its elements (g, 2t) and
    // (g, 2t + 1), or with .trans (2t, g) and (2t + 1, g).
    if (transposed) {
      r[i] = load_b16(slots[8 * i + 2 * t].pointer, g) | load_b16(slots[8 * i + 2 * t + 1].pointer, g) << 16;
    } else {
      r[i] = load_b16(slots[8 * i + g].pointer, 2 * t) | load_b16(slots[8 * i + g].pointer, 2 * t + 1) << 16;
    }
  }
}

void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bfloat16) {
  LaneSlot slot{};
  for (int i = 0; i < 4; ++i) slot.words[i] = a[i];
  slot.words[4] = b0;
  slot.words[5] = b1;
  const LaneSlot* slots = warp_exchange(slot);
  // The PTX ISA's m16n8k16 fragments: lane 4g + t holds A (g | g+8, 2t | 2t+1 | 2t+8 | 2t+9) in
  // a[0..3] (row + 8 in a[1], a[3]; column + 8 in a[2], a[3]), B (k 2t, 2t+1 | 2t+8, 2t+9; n g)
  // in b0, b1, and D (g | g+8, 2t | 2t+1) in d[0..3].
  auto element = [&](int lane, int word, int k) {
    return b16_to_float(slots[lane].words[word] >> (16 * (k % 2)) & 0xffff, bfloat16);
  };
  const int lane = static_cast<int>(self().index.x % 32), g = lane / 4, t = lane % 4;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), column = 2 * t + e % 2;
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) {
      sum += element(4 * (row % 8) + (k % 8) / 2, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), k) *
             element(4 * column + (k % 8) / 2, k >= 8 ? 5 : 4, k);
    }
    d[e] += sum;
  }
}

void defer_copy(void* dst, const void* src, bool valid) {
  std::memset(dst, 0xff, 16);
  self().copies.push_back({dst, src, valid});
}

void complete_copies() {
  for (const PendingCopy& copy : self().copies) {
    if (copy.valid) {
      std::memcpy(copy.dst, copy.src, 16);
    } else {
      std::memset(copy.dst, 0, 16);
    }
  }
  self().copies.clear();
}

void run_grid(int64_t blocks, int threads, int shared_bytes, const std::function<void()>& kernel_body) {
  static std::mutex running;
  const std::lock_guard<std::mutex> lock(running);
  while (static_cast<int>(block.fibers.size()) < threads) block.fibers.emplace_back();
  block.threads = threads;
  block.body = &kernel_body;
  block.shared_bytes = shared_bytes;
  block.shared_storage.reset(new unsigned char[shared_bytes + 128]);
  block.shared = block.shared_storage.get() + (128 - reinterpret_cast<uintptr_t>(block.shared_storage.get()) % 128);
  block.error.clear();
  for (int64_t b = 0; b < blocks; ++b) {
    block.index = {static_cast<unsigned>(b), 0, 0};
    run_block();
  }
}

}  // namespace fastattn::cuda::emulation

namespace fastattn::cuda {

std::tuple<at::Tensor, at::Tensor> emulated_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const std::optional<at::Tensor>& key_padding_mask, double scale,
                                                    int64_t window_left, int64_t window_right) {
  check_forward_inputs(q, k, v, key_padding_mask, scale, window_left, window_right);
  return run_forward(q, k, v, key_padding_mask, scale, window_left, window_right, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulated_backward(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask, double scale, int64_t window_left,
    int64_t window_right) {
  check_backward_inputs(dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right);
  return run_backward(dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right, nullptr);
}

}  // namespace fastattn::cuda

// fwd / bwd with the signatures of fastattn::fwd / fastattn::bwd (csrc/ops.cpp), for CPU tensors.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("fwd", &fastattn::cuda::emulated_forward);
  m.def("bwd", &fastattn::cuda::emulated_backward);
}
