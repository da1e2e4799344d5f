"""The Triton kernels as custom ops, ``fastattn::triton_fwd`` and ``fastattn::triton_bwd``.

Their schemas are those of ``fastattn::fwd`` / ``fastattn::bwd`` (``csrc/ops.cpp``) and their fakes
are ``fastattn._ops.fake_forward`` / ``fake_backward``, so every backend promises the same output
metadata and ``torch.compile(fullgraph=True)`` traces through them without a graph break. Outputs
follow the inputs' layout (``_ops.empty_in_layout_of``); inputs are read through their strides.
Registered when ``fastattn`` is imported (never lazily during a trace).
"""

from __future__ import annotations

import torch

from ... import _ops, masks
from .bwd import attention_backward
from .fwd import attention_forward
from .launch import clamp_window, is_interpreter

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

FWD_SCHEMA = ("(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, float scale, int window_left, "
              "int window_right) -> (Tensor out, Tensor lse)")
BWD_SCHEMA = ("(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? key_padding_mask, "
              "float scale, int window_left, int window_right) -> (Tensor dq, Tensor dk, Tensor dv)")


def _check_call(q, k, v, key_padding_mask, scale, window_left, window_right):
    """The checks of ``fastattn.attention`` (the op may be called directly), plus what the Triton
    kernels need: a CUDA device (or the interpreter) and fp16/bf16/fp32."""
    from ...functional import _check_inputs, _check_scale  # functional imports the backends

    _check_inputs(q, k, v, key_padding_mask)
    _check_scale(scale, q.shape[-1], "scale")
    masks.normalise_window((window_left, window_right))
    if q.dtype not in DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 for the Triton kernels, got {q.dtype}")
    if q.device.type != "cuda" and not (q.device.type == "cpu" and is_interpreter()):
        raise ValueError(f"q must be a CUDA tensor for the Triton kernels (CPU only under TRITON_INTERPRET=1), "
                         f"got device {q.device}")


def _check_saved(t, name, shape, dtype, device):
    """Checks a tensor the backward receives besides q, k, v (dout, out, lse)."""
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} must have shape {tuple(shape)}, dtype {dtype} and device {device}, "
                         f"got {tuple(t.shape)}, {t.dtype}, {t.device}")


def _rows_contiguous(*tensors):
    # The kernels read each row of D contiguously; every other stride is taken as it is.
    from ...functional import _last_dim_contiguous

    return [_last_dim_contiguous(t) for t in tensors]


@torch.library.custom_op("fastattn::triton_fwd", mutates_args=(), schema=FWD_SCHEMA)
def triton_fwd(q, k, v, key_padding_mask, scale, window_left, window_right):
    _check_call(q, k, v, key_padding_mask, scale, window_left, window_right)
    q, k, v = _rows_contiguous(q, k, v)
    out, lse = _ops.fake_forward(q, k, v, key_padding_mask, scale, window_left, window_right)
    if out.numel() == 0:
        return out, lse
    if k.shape[2] == 0:  # no keys: every row is fully masked
        return out.zero_(), lse.fill_(float("-inf"))
    left, right = clamp_window(window_left, window_right, q.shape[2], k.shape[2])
    attention_forward(q, k, v, key_padding_mask, scale, left, right, out, lse)
    return out, lse


@torch.library.custom_op("fastattn::triton_bwd", mutates_args=(), schema=BWD_SCHEMA)
def triton_bwd(dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right):
    _check_call(q, k, v, key_padding_mask, scale, window_left, window_right)
    out_shape = q.shape[:3] + (v.shape[3],)
    _check_saved(dout, "dout", out_shape, q.dtype, q.device)
    _check_saved(out, "out", out_shape, q.dtype, q.device)
    _check_saved(lse, "lse", q.shape[:3], _ops.lse_dtype(q.dtype), q.device)
    dout, q, k, v, out = _rows_contiguous(dout, q, k, v, out)
    dq, dk, dv = _ops.fake_backward(dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right)
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    left, right = clamp_window(window_left, window_right, q.shape[2], k.shape[2])
    attention_backward(dout, q, k, v, out, lse.contiguous(), key_padding_mask, scale, left, right, dq, dk, dv)
    return dq, dk, dv


triton_fwd.register_fake(_ops.fake_forward)
triton_bwd.register_fake(_ops.fake_backward)
