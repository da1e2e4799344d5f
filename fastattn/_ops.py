"""The custom ops behind the backends, and their fake (meta) implementations.

``fastattn::fwd`` and ``fastattn::bwd`` are declared in C++ (``csrc/ops.cpp``, one schema for
every device) and implemented per dispatch key (CPU in ``csrc/cpu``, CUDA in ``csrc/cuda``).
Their fakes are registered here so that ``torch.compile(fullgraph=True)`` traces through them
without a graph break. The Triton backend registers Python custom ops with the same fakes
(``fake_forward`` / ``fake_backward``), so every backend promises the same output metadata.

Output layout rule (shared with ``empty_in_layout_of`` in ``csrc/attention_api.cpp``): an output
follows its input's layout, (B, N, H, D) storage for a transposed (B, N, H, D) view (as
``flash_attn_func`` passes) and (B, H, N, D) otherwise; lse is a contiguous (B, H, Nq) tensor,
float32, or float64 for float64 inputs.
"""

from __future__ import annotations

import importlib
import os
from typing import Optional

import torch

__all__ = ["load_cpp_library", "cpp_library_error", "fake_forward", "fake_backward",
           "empty_in_layout_of", "lse_dtype"]


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_in_layout_of(like: torch.Tensor, last_dim: int) -> torch.Tensor:
    B, H, N = like.shape[:3]
    if not like.is_contiguous() and like.transpose(1, 2).is_contiguous():
        return like.new_empty((B, N, H, last_dim)).transpose(1, 2)
    return like.new_empty((B, H, N, last_dim))


def fake_forward(q, k, v, key_padding_mask, scale, window_left, window_right):
    out = empty_in_layout_of(q, v.shape[-1])
    lse = q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))
    return out, lse


def fake_backward(dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right):
    return (empty_in_layout_of(q, q.shape[-1]), empty_in_layout_of(k, k.shape[-1]),
            empty_in_layout_of(v, v.shape[-1]))


_cpp_error: Optional[str] = None
_cpp_loaded = False

# FASTATTN_CPU_BF16_PRODUCTS caps the product path of the bf16 CPU kernels (csrc/cpu/amx.h reads
# it once, when the library loads): every path a CPU can run is then tested and measured on it.
BF16_PRODUCTS_VARIABLE = "FASTATTN_CPU_BF16_PRODUCTS"
BF16_PRODUCTS_CAPS = ("amx", "avx512-bf16", "fp32")


def _check_bf16_products_cap() -> None:
    cap = os.environ.get(BF16_PRODUCTS_VARIABLE)
    if cap is not None and cap not in BF16_PRODUCTS_CAPS:
        raise ValueError(f"{BF16_PRODUCTS_VARIABLE}={cap!r}: expected one of {', '.join(BF16_PRODUCTS_CAPS)} "
                         "(or unset: the fastest path this CPU has)")


def load_cpp_library() -> bool:
    """Imports fastattn._C (registering torch.ops.fastattn.fwd/bwd) and their fakes, once.
    Returns whether the library is usable; ``cpp_library_error()`` says why not."""
    global _cpp_error, _cpp_loaded
    if _cpp_loaded or _cpp_error is not None:
        return _cpp_loaded
    _check_bf16_products_cap()
    try:
        importlib.import_module("fastattn._C")
    except ImportError as exc:
        _cpp_error = f"fastattn._C could not be imported ({exc}); reinstall with " \
                     "`pip install -e . --no-build-isolation`"
        return False
    torch.library.register_fake("fastattn::fwd")(fake_forward)
    torch.library.register_fake("fastattn::bwd")(fake_backward)
    _cpp_loaded = True
    return True


def cpp_library_error() -> Optional[str]:
    load_cpp_library()
    return _cpp_error
