"""The reference backend: plain PyTorch with the dense mask from ``fastattn.masks``.

It materialises the ``(B, Hq, Nq, Nk)`` scores, so it costs O(N^2) memory: it is the oracle of the
tests (run in float64 by ``fastattn.testing.attention_ref``) and the last resort of ``auto``
dispatch, which warns before using it. It accepts any floating dtype on any device.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import masks
from .base import Backend


def _probabilities(q, k, scale, visible, plain_math):
    """softmax(scale * q k^T) over the visible keys, and its log-sum-exp. Rows that see no key
    get probabilities 0 and lse = -inf (exp(s - lse) alone would be NaN there); a row whose
    scores hold a NaN (a NaN input) stays NaN, as in the kernels."""
    if plain_math:
        scores = torch.matmul(q * scale, k.transpose(-1, -2))
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    seen = (lse != float("-inf")).unsqueeze(-1)
    if plain_math:
        probs = torch.softmax(torch.where(seen, scores, torch.zeros_like(scores)), dim=-1)
    else:
        probs = torch.exp(scores - torch.where(seen, lse.unsqueeze(-1), torch.zeros_like(scores[..., :1])))
    return torch.where(seen, probs, torch.zeros_like(probs)), lse


def _prepare(q, k, v, key_padding_mask, window_left, window_right, compute_dtype, extra=()):
    """Casts to `compute_dtype`, repeats kv heads for GQA, builds the dense visibility mask."""
    group = q.shape[1] // k.shape[1]
    q, k, v, *extra = (t.to(compute_dtype) for t in (q, k, v, *extra))
    k, v = (t.repeat_interleave(group, dim=1) if group > 1 else t for t in (k, v))
    visible = masks.materialize(q.shape[2], k.shape[2], (window_left, window_right),
                                key_padding_mask=key_padding_mask, device=q.device)
    return q, k, v, visible, extra


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    key_padding_mask: Optional[torch.Tensor], scale: float, window_left: int,
                    window_right: int, compute_dtype: Optional[torch.dtype] = None,
                    plain_math: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale * q k^T + mask) v and its log-sum-exp, computed in `compute_dtype`
    (default: the input dtype) and differentiable by autograd.

    `plain_math` computes the same function the way a user would write it,
    ``softmax((scale * q) k^T + mask) v``, instead of ``exp(s - lse) v``: a different rounding
    path, so that its error against the float64 oracle is a fair yardstick even in float64.

    Returns ``out`` and ``lse`` in `compute_dtype`. Rows with no visible key give ``out = 0`` and
    ``lse = -inf``, with zero gradients.
    """
    q, k, v, visible, _ = _prepare(q, k, v, key_padding_mask, window_left, window_right, compute_dtype or q.dtype)
    probs, lse = _probabilities(q, k, scale, visible, plain_math)
    return torch.matmul(probs, v), lse


def dense_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             key_padding_mask: Optional[torch.Tensor], scale: float, window_left: int,
                             window_right: int, compute_dtype: Optional[torch.dtype] = None
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of `dense_attention` (plain-math path) by the formulas every fused kernel
    implements, computed densely in `compute_dtype` (default: the input dtype)::

        delta = rowsum(dout * out),  dS = P * (dout v^T - delta)
        dq = scale dS k,   dk = scale dS^T q,   dv = P^T dout

    (dk, dv summed over the query heads of a GQA group). Returned in `compute_dtype`.
    """
    heads_kv, group = k.shape[1], q.shape[1] // k.shape[1]
    q, k, v, visible, (dout,) = _prepare(q, k, v, key_padding_mask, window_left, window_right,
                                         compute_dtype or q.dtype, extra=(dout,))
    probs, _ = _probabilities(q, k, scale, visible, plain_math=True)
    out = torch.matmul(probs, v)
    delta = (dout * out).sum(-1, keepdim=True)
    dscores = probs * (torch.matmul(dout, v.transpose(-1, -2)) - delta)
    dq = torch.matmul(dscores, k) * scale
    dk = torch.matmul(dscores.transpose(-1, -2), q) * scale
    dv = torch.matmul(probs.transpose(-1, -2), dout)
    return dq, dk.unflatten(1, (heads_kv, group)).sum(2), dv.unflatten(1, (heads_kv, group)).sum(2)


class ReferenceBackend(Backend):
    name = "reference"
    description = "pure PyTorch, dense O(N^2) mask: the oracle and the warned last resort"
    dtypes = {
        "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
        "cuda": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    }

    def not_supported_reasons(self, problem):
        # Any device PyTorch runs on works: only report what the base class checks beyond it.
        if problem.device_type not in self.dtypes:
            return []
        return super().not_supported_reasons(problem)

    @staticmethod
    def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.float32

    def forward(self, q, k, v, key_padding_mask, scale, window_left, window_right):
        # Softmax statistics in at least float32, as the fused kernels keep them.
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = dense_attention(q, k, v, key_padding_mask, scale, window_left, window_right, compute)
        return out.to(q.dtype), lse.to(self._lse_dtype(q.dtype))

    def backward(self, dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right):
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        grads = dense_attention_backward(dout, q, k, v, key_padding_mask, scale, window_left, window_right,
                                         compute)
        return tuple(g.to(t.dtype) for g, t in zip(grads, (q, k, v)))
