// Compiles csrc/cuda/attention_fp32.cu as C++ for the CPU emulation harness (FASTATTN_CUDA_EMULATION;
// tests only: see emulator.cpp).
#include "cuda/attention_fp32.cu"
