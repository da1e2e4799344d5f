"""How the Triton kernels are launched: autotuned on a GPU, with a fixed config under the interpreter.

On a GPU a launch goes through the kernel's ``triton.autotune`` wrapper (keyed on buckets, see
``configs``) on the current CUDA stream of the tensors' device. Under ``TRITON_INTERPRET=1`` the
kernels run on the CPU, where timing configs means nothing, so the underlying kernel is launched
with ``configs.interpreter_config(name)``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import configs
from . import interpreter_active as is_interpreter  # defined before this module is imported


def clamp_window(window_left: int, window_right: int, seqlen_q: int, seqlen_k: int) -> Tuple[int, int]:
    """The window as the kernels take it: ``-1`` (unbounded) and anything wider than the sequences
    become ``Nk`` (left) / ``Nq`` (right), which already cover every key, so the kernels need no
    sign tests and no value overflows 32 bits."""
    left = seqlen_k if window_left < 0 else min(window_left, seqlen_k)
    right = seqlen_q if window_right < 0 else min(window_right, seqlen_q)
    return left, right


def launch(name: Optional[str], kernel, grid, *args, **constexprs) -> None:
    """Launches `kernel` on the current stream of its tensors' device. `name` (``fwd``, ``dkdv``,
    ``dq``) marks an autotuned kernel, which the interpreter runs with its fixed config instead;
    ``None`` a plain kernel whose constexprs are all given."""
    if name is not None and is_interpreter():
        constexprs = {**constexprs, **configs.interpreter_config(name).kwargs}
        kernel, grid = kernel.fn, grid(constexprs)
    device = next(arg for arg in args if isinstance(arg, torch.Tensor)).device
    if device.type != "cuda":
        kernel[grid](*args, **constexprs)
        return
    with torch.cuda.device(device):
        kernel[grid](*args, **constexprs)
