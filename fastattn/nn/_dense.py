"""The dense attention path of the drop-in modules, for what the fused kernels cannot express.

Used for ``need_weights=True`` (the weights are the N x N matrix itself), attention dropout in
training, arbitrary float or bool ``attn_mask`` patterns, and float key padding masks with values
other than 0/-inf. It computes ``softmax(q k^T / sqrt(D) + mask)`` explicitly, as
``torch.nn.functional.multi_head_attention_forward`` does, so results (and, with the same RNG
state, the dropout pattern) match torch's module. One difference, kept on purpose so that both of
fastattn's paths agree: a query that sees no key gets a zero output and zero weights, never NaN.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..backends import FastAttnFallbackWarning
from ._mask_patterns import is_compiling

_warned_reasons: set = set()


def warn_dense_once(owner: str, reasons) -> None:
    """One FastAttnFallbackWarning per distinct set of reasons (as the backend dispatcher does)."""
    key = (owner, tuple(reasons))
    if key in _warned_reasons or is_compiling():
        return
    _warned_reasons.add(key)
    warnings.warn(f"{owner}: computing attention densely with PyTorch ops (O(Nq * Nk) memory) because "
                  f"{'; '.join(reasons)}. This is correct, only slower.", FastAttnFallbackWarning, stacklevel=5)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, additive_mask: Optional[torch.Tensor],
                    dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q k^T / sqrt(D) + additive_mask)``, dropout, times v.

    q ``(B, H, Nq, D)``, k/v ``(B, H, Nk, D)``; `additive_mask` broadcasts to ``(B, H, Nq, Nk)``.
    Returns ``(out (B, H, Nq, D), weights (B, H, Nq, Nk))``, the weights after dropout as torch's
    ``need_weights`` path returns them.
    """
    scores = torch.matmul(q * (1.0 / q.shape[-1]) ** 0.5, k.transpose(-2, -1))
    if additive_mask is not None:
        scores = scores + additive_mask
    # Rows with no visible key would be softmax(-inf, ..., -inf) = NaN: give them zero weights.
    sees_nothing = torch.isneginf(scores).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(sees_nothing, 0.0), dim=-1).masked_fill(sees_nothing, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, v), weights
