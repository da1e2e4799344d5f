"""Which keys a query may see: the one window/causal/padding rule every backend implements.

A query row ``i`` of ``Nq`` sits at key position ``p = i + Nk - Nq`` (bottom-right alignment, as
FlashAttention >= 2.1 and a KV cache with new queries at the end). With a window ``(left, right)``
it may see key ``j`` iff::

    p - left <= j <= p + right          (a side of -1 is unbounded)

``causal=True`` is ``right = 0``, so ``window=(Nk - 1, 0)`` equals ``causal=True``. A key whose
``key_padding_mask`` entry is True is never visible. Example, ``Nq = 2, Nk = 5``::

    causal               window=(1, 0)        window=(1, 1), Nq = Nk = 5
    1 1 1 1 0            0 0 1 1 0            1 1 0 0 0
    1 1 1 1 1            0 0 0 1 1            1 1 1 0 0
                                              0 1 1 1 0
                                              0 0 1 1 1
                                              0 0 0 1 1

The kernels never build this matrix: they turn the same rule into a key-block range per query block
(``visible_key_range``) and apply the element mask only on blocks that straddle a boundary.
``materialize`` builds it densely for the reference backend and the tests.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple, Union

import torch

__all__ = ["normalise_window", "materialize", "visible_key_range", "visible_query_range",
           "visible_key_count"]

WindowArg = Union[None, int, Tuple[int, int]]


def _window_side(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int (-1 for unbounded), got {type(value).__name__} {value!r}")
    value = int(value)
    if value < -1:
        raise ValueError(f"{name} must be >= 0, or -1 for unbounded, got {value}")
    return value


def normalise_window(window: WindowArg = None, causal: bool = False, name: str = "window") -> Tuple[int, int]:
    """Turns the user's ``window`` and ``causal`` into ``(left, right)``, ``-1`` meaning unbounded.

    ``None`` -> ``(-1, -1)``; an int ``w`` -> ``(w, w)``; a pair is taken as ``(left, right)``.
    ``causal=True`` then sets ``right = 0``. `name` is the argument named in error messages.

    >>> normalise_window(None, causal=True)
    (-1, 0)
    >>> normalise_window(4)
    (4, 4)
    >>> normalise_window((128, -1), causal=True)
    (128, 0)
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    if window is None:
        left, right = -1, -1
    elif isinstance(window, (tuple, list)):
        if len(window) != 2:
            raise ValueError(f"{name} must be None, an int or a pair (left, right), got {window!r}")
        left = _window_side(window[0], f"{name}[0] (left)")
        right = _window_side(window[1], f"{name}[1] (right)")
    else:
        left = right = _window_side(window, name)
    if causal:
        right = 0
    return left, right


def visible_key_range(query_row: int, seqlen_q: int, seqlen_k: int, left: int, right: int) -> Tuple[int, int]:
    """The half-open range ``[first, end)`` of keys query ``query_row`` may see (empty if
    ``end <= first``), before key padding."""
    position = query_row + seqlen_k - seqlen_q
    first = 0 if left < 0 else max(0, position - left)
    end = seqlen_k if right < 0 else min(seqlen_k, position + right + 1)
    return first, end


def visible_query_range(key: int, seqlen_q: int, seqlen_k: int, left: int, right: int) -> Tuple[int, int]:
    """The half-open range ``[first, end)`` of query rows that may see ``key`` (the transpose of
    ``visible_key_range``, used by the backward pass over key blocks)."""
    offset = seqlen_k - seqlen_q
    first = 0 if right < 0 else max(0, key - right - offset)
    end = seqlen_q if left < 0 else min(seqlen_q, key + left - offset + 1)
    return first, end


def visible_key_count(seqlen_q: int, seqlen_k: int, left: int, right: int) -> int:
    """Sum over query rows of the number of visible keys (no padding): the FLOP count's basis."""
    position = torch.arange(seqlen_q, dtype=torch.int64) + (seqlen_k - seqlen_q)
    first = torch.zeros_like(position) if left < 0 else (position - left).clamp(min=0)
    end = torch.full_like(position, seqlen_k) if right < 0 else (position + right + 1).clamp(max=seqlen_k)
    return int((end - first).clamp(min=0).sum())


def materialize(seqlen_q: int, seqlen_k: int, window: WindowArg = None, causal: bool = False,
                key_padding_mask: Optional[torch.Tensor] = None,
                device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """The dense boolean mask, ``True`` where a query may see a key.

    Returns ``(Nq, Nk)``, or ``(B, 1, Nq, Nk)`` when ``key_padding_mask`` (bool ``(B, Nk)``,
    ``True`` = padding) is given, ready to broadcast against ``(B, H, Nq, Nk)`` scores. This is
    ``O(Nq * Nk)`` memory: it is for the reference backend and tests, never the kernels.
    """
    left, right = normalise_window(window, causal)
    if key_padding_mask is not None and device is None:
        device = key_padding_mask.device
    rows = torch.arange(seqlen_q, device=device).unsqueeze(1) + (seqlen_k - seqlen_q)
    cols = torch.arange(seqlen_k, device=device).unsqueeze(0)
    visible = torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= cols >= rows - left
    if right >= 0:
        visible &= cols <= rows + right
    if key_padding_mask is not None:
        visible = visible.unsqueeze(0).unsqueeze(0) & ~key_padding_mask[:, None, None, :]
    return visible
