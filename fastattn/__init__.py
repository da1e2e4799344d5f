"""fastattn: fused softmax and sliding-window attention for PyTorch.

    import fastattn
    out = fastattn.attention(q, k, v, causal=True)                  # (B, H, N, D), like SDPA
    out = fastattn.attention(q, k, v, window=(256, 0))              # causal sliding window
    out = fastattn.flash_attn_func(q, k, v, window_size=(128, 128)) # (B, N, H, D), like FlashAttention

Backends: ``cpp`` (compiled C++ kernels, CPU and CUDA), ``triton`` (GPU) and ``reference``
(dense PyTorch). ``python -m fastattn.info`` shows what this installation has.
"""

from . import _ops, masks
from .backends import BackendNotSupportedError, FastAttnFallbackWarning
from .functional import attention, flash_attn_func
from . import nn
from .nn import swap_attention

__version__ = "0.1.0"

# Registers torch.ops.fastattn.* (and their fakes) if the compiled library is present; if it is
# not, the cpp backend reports why and dispatch skips it.
_ops.load_cpp_library()

__all__ = ["attention", "flash_attn_func", "masks", "nn", "swap_attention", "FastAttnFallbackWarning",
           "BackendNotSupportedError", "__version__"]
