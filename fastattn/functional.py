"""fastattn's public functions: argument checks, backend dispatch and the autograd wrapper."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from . import masks
from .backends import BACKEND_NAMES, MAX_HEAD_DIM, AttentionProblem, get_backend, select_backend

__all__ = ["attention", "flash_attn_func"]

Tensor = torch.Tensor


class _FusedAttention(torch.autograd.Function):
    """Runs one backend's forward, saves what its backward needs (never the N x N scores)."""

    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale, window_left, window_right, backend_name):
        backend = get_backend(backend_name)
        out, lse = backend.forward(q, k, v, key_padding_mask, scale, window_left, window_right)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask)
        ctx.attention_args = (scale, window_left, window_right, backend_name)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, key_padding_mask = ctx.saved_tensors
        scale, window_left, window_right, backend_name = ctx.attention_args
        if dout.stride(-1) != 1:  # e.g. the expanded ones of out.sum(); kernels read rows
            dout = dout.contiguous()
        dq, dk, dv = get_backend(backend_name).backward(
            dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right)
        return dq, dk, dv, None, None, None, None, None


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _check_tensor(t, name: str, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D tensor {layout}, got {t.dim()}-D with shape {_shape(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_scale(scale, head_dim: int, name: str) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{name} must be a positive float or None, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {scale}")
    return scale


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor]) -> None:
    """Checks the (B, H, N, D) inputs; raises ValueError/TypeError naming the argument."""
    _check_tensor(q, "q", "(B, Hq, Nq, D)")
    _check_tensor(k, "k", "(B, Hkv, Nk, D)")
    _check_tensor(v, "v", "(B, Hkv, Nk, Dv)")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    B, Hq, Nq, D = q.shape
    _, Hkv, Nk, _ = k.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k and v must have the same batch size, got q {_shape(q)}, k {_shape(k)}, v {_shape(v)}")
    if k.shape[3] != D:
        raise ValueError(f"k must have the head dim of q ({D}), got k {_shape(k)}")
    if v.shape[1] != Hkv or v.shape[2] != Nk:
        raise ValueError(f"v must have the heads and length of k (Hkv={Hkv}, Nk={Nk}), got v {_shape(v)}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads (q.shape[1] = {Hq}) must be a multiple of the number "
                         f"of key/value heads (k.shape[1] = {Hkv})")
    for name, dim in (("q/k", D), ("v", v.shape[3])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"head dim of {name} must be in 1..{MAX_HEAD_DIM}, got {dim}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor):
            raise TypeError(f"key_padding_mask must be a bool tensor or None, got {type(key_padding_mask).__name__}")
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got dtype {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = ({B}, {Nk}), got {_shape(key_padding_mask)}")
        if key_padding_mask.device != q.device:
            raise ValueError(f"key_padding_mask must be on the device of q ({q.device}), got {key_padding_mask.device}")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    # Kernels take any strides for B, H and N but read each row of D contiguously.
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
              window: Union[None, int, Tuple[int, int]] = None, scale: Optional[float] = None,
              key_padding_mask: Optional[Tensor] = None, return_lse: bool = False,
              backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Fused softmax attention, ``softmax(scale * q k^T + mask) v``, never storing the scores.

    Shapes follow :func:`torch.nn.functional.scaled_dot_product_attention`::

        q (B, Hq, Nq, D), k (B, Hkv, Nk, D), v (B, Hkv, Nk, Dv)  ->  out (B, Hq, Nq, Dv)

    Only the last dimension needs to be contiguous; other strides (e.g. transposed views of a
    ``(B, N, H, D)`` tensor) are read in place and ``out`` follows q's layout.

    Args:
        causal: each query sees only keys at or before its position (sets ``right = 0``).
        window: ``None`` (full), ``w`` (= ``(w, w)``) or ``(left, right)``; ``-1`` = unbounded.
            Query ``i`` sits at position ``p = i + Nk - Nq`` (bottom-right aligned, as
            FlashAttention >= 2.1) and sees key ``j`` iff ``p - left <= j <= p + right``.
            ``window=(Nk - 1, 0)`` equals ``causal=True``. ``Nq = 2, Nk = 5``::

                causal=True          window=(1, 0)
                1 1 1 1 0            0 0 1 1 0
                1 1 1 1 1            0 0 0 1 1

        scale: multiplies ``q k^T``; default ``1 / sqrt(D)``.
        key_padding_mask: bool ``(B, Nk)``, ``True`` = padding, ignored (the
            ``nn.MultiheadAttention`` convention).
        return_lse: also return ``lse`` ``(B, Hq, Nq)``, the natural-log log-sum-exp of the
            scaled, masked scores (float32; float64 for float64 inputs). It carries no gradient.
        backend: ``"auto"`` (the first capable of ``triton``, ``cpp``, ``reference`` for the
            device; on CUDA ``cpp`` first for fp16/bf16 rows that see at most 1024 keys, where
            it measured faster), or one of them by name (an error lists why it cannot serve the
            call).

    GQA/MQA: ``Hq`` must be a multiple of ``Hkv``; query head ``h`` reads kv head
    ``h // (Hq // Hkv)``. A query that sees no key at all (fully masked) gets ``out = 0``,
    ``lse = -inf`` and zero gradients, never NaN.

    Example::

        >>> q = torch.randn(2, 8, 1024, 64)
        >>> k, v = torch.randn(2, 2, 1024, 64), torch.randn(2, 2, 1024, 64)   # GQA, 2 kv heads
        >>> out = fastattn.attention(q, k, v, window=(256, 0))                # causal sliding window
        >>> out.shape
        torch.Size([2, 8, 1024, 64])
    """
    return _attention(q, k, v, causal, window, scale, key_padding_mask, return_lse, backend)


def _attention(q, k, v, causal, window, scale, key_padding_mask, return_lse, backend,
               window_name="window", scale_name="scale"):
    if not isinstance(backend, str) or backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {backend!r}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    _check_inputs(q, k, v, key_padding_mask)
    window_left, window_right = masks.normalise_window(window, causal, window_name)
    scale = _check_scale(scale, q.shape[-1], scale_name)
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    problem = AttentionProblem.from_tensors(q, k, v, key_padding_mask, window_left, window_right)
    chosen = select_backend(problem, backend)
    out, lse = _FusedAttention.apply(q, k, v, key_padding_mask, scale, window_left, window_right, chosen.name)
    return (out, lse) if return_lse else out


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0,
                    softmax_scale: Optional[float] = None, causal: bool = False,
                    window_size: Tuple[int, int] = (-1, -1), return_lse: bool = False, *,
                    backend: str = "auto") -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """FlashAttention's ``flash_attn_func`` in its ``(B, N, H, D)`` layout.

    ``q (B, Nq, Hq, D)``, ``k (B, Nk, Hkv, D)``, ``v (B, Nk, Hkv, Dv)`` -> ``out (B, Nq, Hq, Dv)``;
    with ``return_lse=True`` also ``lse (B, Hq, Nq)``. The inputs are passed to the kernels as
    transposed views (no copy) and ``out`` is allocated in the ``(B, N, H, D)`` layout.
    ``window_size=(left, right)`` with ``-1`` unbounded and ``causal`` follow FlashAttention >= 2.1
    (bottom-right alignment); see :func:`attention` for the exact rule.

    ``dropout_p`` sits where FlashAttention has it so positional calls keep their meaning;
    fastattn has no attention dropout, so it must be 0.
    """
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0:
        raise ValueError(f"dropout_p must be 0.0: fastattn's kernels have no attention dropout, got {dropout_p}")
    for name, t, layout in (("q", q, "(B, Nq, Hq, D)"), ("k", k, "(B, Nk, Hkv, D)"), ("v", v, "(B, Nk, Hkv, Dv)")):
        _check_tensor(t, name, layout)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"window_size must be a pair (left, right), -1 = unbounded, got {window_size!r}")
    out, lse = _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, tuple(window_size),
                          softmax_scale, None, True, backend, window_name="window_size",
                          scale_name="softmax_scale")
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
