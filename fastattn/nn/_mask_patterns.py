"""Recognising masks that the fused kernels can serve: causal/window patterns and 0/-inf float masks.

The kernels take a window ``(left, right)`` (bottom-right aligned, ``-1`` = unbounded, the rule of
``fastattn.masks``) and a bool key padding mask. A user's dense ``attn_mask`` is served fused only
when it is *exactly* such a window: the candidate window is inferred from the mask and then
checked element by element against ``masks.materialize``, so a mask that merely looks causal is
never mistaken for one. Everything here reads tensor values, so it runs only in eager mode;
under ``torch.compile`` callers take the dense path instead (``is_compiling``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import masks

Window = Tuple[int, int]
FULL_WINDOW: Window = (-1, -1)


def is_compiling() -> bool:
    """True while dynamo traces: value-dependent mask checks would break the graph then."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def intersect_windows(first: Window, second: Window) -> Window:
    """The window allowing exactly what both allow (each side: the tighter bound; -1 = unbounded)."""
    def tighter(a: int, b: int) -> int:
        if a < 0:
            return b
        if b < 0:
            return a
        return min(a, b)
    return tighter(first[0], second[0]), tighter(first[1], second[1])


def window_of_allowed(allowed: torch.Tensor) -> Optional[Window]:
    """The window ``(left, right)`` whose ``masks.materialize`` equals `allowed` (bool ``(Nq, Nk)``,
    True = may attend), or None when `allowed` is no such window."""
    seqlen_q, seqlen_k = allowed.shape
    if seqlen_q == 0 or seqlen_k == 0:
        return FULL_WINDOW
    rows_with_keys = allowed.any(dim=1)
    if not bool(rows_with_keys.any()):
        return None
    device = allowed.device
    position = torch.arange(seqlen_q, device=device) + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=device)
    first = torch.where(allowed, cols, seqlen_k).amin(dim=1)
    last = torch.where(allowed, cols, -1).amax(dim=1)
    left = int((position - first)[rows_with_keys].max())
    right = int((last - position)[rows_with_keys].max())
    if left < 0 or right < 0:  # a row that sees only keys strictly on one side of its position
        return None
    # A side that reaches the edge for every row is unbounded: report it as -1 so that a causal
    # mask is recognised as causal (window (-1, 0)), not as a window that happens to be wide.
    if left >= seqlen_k - 1:
        left = -1
    if right >= seqlen_q - 1:
        right = -1
    expected = masks.materialize(seqlen_q, seqlen_k, (left, right), device=device)
    return (left, right) if torch.equal(expected, allowed) else None


def bool_mask_of_additive(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """A bool mask (True = masked out) equivalent to `mask`: bool masks are returned as they are;
    a float mask only when every entry is exactly 0 or -inf (adding it then just removes keys),
    else None."""
    if mask.dtype == torch.bool:
        return mask
    blocked = torch.isneginf(mask)
    if bool(((mask == 0) | blocked).all()):
        return blocked
    return None


def additive_of(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """torch's convention: a bool mask (True = masked out) becomes 0 / -inf of `dtype`; a float
    mask is already additive."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
