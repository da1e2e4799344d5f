"""The ``triton`` backend: fastattn's Triton kernels (``fwd.py``, ``bwd.py``, ``configs.py``).

The default backend for CUDA tensors. Importing this package never fails: when triton is missing
or too old, :class:`TritonBackend` reports why in ``availability_reasons()`` and registers no ops.
Otherwise the custom ops ``fastattn::triton_fwd`` / ``fastattn::triton_bwd`` are registered here,
when ``fastattn`` is imported. Under ``TRITON_INTERPRET=1`` (set before triton is imported) the
kernels also run on CPU tensors, through Triton's interpreter: that is how the tests run them on a
machine without a GPU.
"""

from __future__ import annotations

import os
from typing import List, Optional

import torch

from ..base import Backend

MIN_TRITON_VERSION = (3, 2)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _import_kernels() -> Optional[str]:
    """Imports triton and registers the ops; returns why that failed, or None."""
    try:
        import triton
    except Exception as exc:  # an ImportError, or a broken install raising anything else
        return f"triton is not importable ({type(exc).__name__}: {exc}); install it with `pip install triton`"
    version = tuple(int(part) for part in triton.__version__.split("+")[0].split(".")[:2] if part.isdigit())
    if version < MIN_TRITON_VERSION:
        return f"triton {triton.__version__} is too old; the Triton backend needs triton >= 3.2"
    try:
        from . import ops  # noqa: F401  (registers fastattn::triton_fwd / triton_bwd)
    except Exception as exc:  # e.g. a triton whose API changed: fastattn itself must still import
        return f"the Triton kernels failed to load with triton {triton.__version__} ({type(exc).__name__}: {exc})"
    return None


def interpreter_active() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (triton reads it when imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_UNAVAILABLE = _import_kernels()


class TritonBackend(Backend):
    name = "triton"
    description = "fastattn's Triton kernels (GPU; CPU only through TRITON_INTERPRET=1, for tests)"

    def __init__(self):
        # Fixed at import: dispatch inside torch.compile reads only this plain data.
        self.dtypes = {"cuda": _DTYPES}
        if interpreter_active():
            self.dtypes["cpu"] = _DTYPES
        self._unavailable: List[str] = [] if _UNAVAILABLE is None else [_UNAVAILABLE]

    def availability_reasons(self) -> List[str]:
        return list(self._unavailable)

    def forward(self, q, k, v, key_padding_mask, scale, window_left, window_right):
        return torch.ops.fastattn.triton_fwd(q, k, v, key_padding_mask, scale, window_left, window_right)

    def backward(self, dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right):
        return torch.ops.fastattn.triton_bwd(dout, q, k, v, out, lse, key_padding_mask, scale,
                                             window_left, window_right)

    def describe(self):
        info = super().describe()
        if not self.availability_reasons():
            import triton
            info["build"] = {"triton": triton.__version__, "interpreter": interpreter_active()}
        return info
