// The fastattn operator schemas (one definition for every device) and the Python module stub.
//
// Kernels register implementations per dispatch key: csrc/cpu/ for CPU, csrc/cuda/ for CUDA.
// Fake (meta) implementations for torch.compile live in fastattn/_ops.py. Python never calls
// into this library except through torch.ops.fastattn.*, so it needs no pybind11; importing
// fastattn._C only loads the library, which runs the registrations below.
#include <Python.h>

#include "cpu/simd.h"  // first ATen header: selects at::vec's ISA, names it FASTATTN_CPU_CAPABILITY
#include "cpu/amx.h"

#include <torch/library.h>

TORCH_LIBRARY(fastattn, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale, "
      "int window_left, int window_right) -> (Tensor out, Tensor lse)");
  m.def(
      "bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, float scale, int window_left, int window_right) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
}

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "fastattn's compiled kernels (ops under torch.ops.fastattn)",
      -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  const bool with_cuda =
#if defined(FASTATTN_WITH_CUDA)
      true;
#else
      false;
#endif
#if defined(_OPENMP)
  const long openmp = _OPENMP;
#else
  const long openmp = 0;
#endif
  // How the CPU kernels multiply bf16 tiles on this machine: benchmark results depend on it.
  const char* bf16_products = fastattn::cpu::bf16_products_name(fastattn::cpu::bf16_products());
  if (PyModule_AddStringConstant(module, "cpu_capability", FASTATTN_CPU_CAPABILITY) < 0 ||
      PyModule_AddStringConstant(module, "cpu_bf16_products", bf16_products) < 0 ||
      PyModule_AddIntConstant(module, "with_cuda", with_cuda ? 1 : 0) < 0 ||
      PyModule_AddIntConstant(module, "openmp", openmp) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
