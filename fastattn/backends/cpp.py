"""The ``cpp`` backend: fastattn's compiled kernels, ``torch.ops.fastattn.fwd/bwd``.

CPU kernels (``csrc/cpu``) are always built; CUDA kernels (``csrc/cuda``) when the extension was
built with CUDA. Which devices this backend serves is read from the dispatcher, so it reports
exactly what the installed library registered.
"""

from __future__ import annotations

import torch

from .. import _ops
from .base import Backend

_CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _has_kernel(device_key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::fwd", device_key)


class CppBackend(Backend):
    name = "cpp"
    description = "fastattn's C++ kernels: CPU (OpenMP + SIMD) and, when built, CUDA"

    def __init__(self):
        # Read once: dispatch then only looks at plain Python data, which torch.compile traces.
        self.dtypes = {}
        if _ops.load_cpp_library():
            if _has_kernel("CPU"):
                self.dtypes["cpu"] = _CPU_DTYPES
            if _has_kernel("CUDA"):
                self.dtypes["cuda"] = _CUDA_DTYPES
        self._unavailable = [] if _ops.cpp_library_error() is None else [_ops.cpp_library_error()]

    def availability_reasons(self):
        return list(self._unavailable)

    def forward(self, q, k, v, key_padding_mask, scale, window_left, window_right):
        return torch.ops.fastattn.fwd(q, k, v, key_padding_mask, scale, window_left, window_right)

    def backward(self, dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right):
        return torch.ops.fastattn.bwd(dout, q, k, v, out, lse, key_padding_mask, scale,
                                      window_left, window_right)

    def describe(self):
        info = super().describe()
        if not self.availability_reasons():
            from .. import _C
            info["build"] = {"cpu_simd": _C.cpu_capability, "cpu_bf16_products": _C.cpu_bf16_products,
                             "openmp": bool(_C.openmp),
                             "cuda_compiled": bool(_C.with_cuda)}
        return info
