"""The benchmark's correctness gate: a float64 oracle whose cost follows the window, and the
relative-error limits a contestant must meet before it is timed.

``fastattn.testing.attention_ref`` builds the dense ``(Nq, Nk)`` scores, which at N = 64k is far
too large. The oracle here computes one block of query rows at a time over only the keys that
block may see (``fastattn.masks.visible_key_range``), so its cost is O(N * window) for windowed
cases. Each block's output depends only on its own queries and its visible keys, so its gradients
are obtained exactly by autograd of that block alone (dq for its rows; dk, dv accumulated over its
key range): the blockwise result equals the dense float64 one up to float64 rounding.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from .. import masks

__all__ = ["REL_ERROR_LIMIT", "chunked_oracle", "relative_error"]

#: Largest relative error ``||x - oracle||_F / ||oracle||_F`` a contestant's output and gradients
#: may have to pass the gate. Correct kernels accumulating in float32 show ~5e-7 in float32 and
#: 3e-3 to 5e-3 in bfloat16 (measured: fastattn, SDPA, naive PyTorch at N = 1024); a mask wrong by
#: one key at window (256, 256) gives 4e-2 in both. The limits sit between: ~1000 units of
#: roundoff for float32/float64, about 1.3 for bfloat16 (8-bit mantissa), 5 for float16.
REL_ERROR_LIMIT: Dict[torch.dtype, float] = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 5e-3,
    torch.bfloat16: 1e-2,
}

#: Elements of one block's (B, Hq, rows, keys) score matrix; bounds the oracle's memory.
_SCORE_BUDGET = 1 << 24


def _rows_per_block(batch: int, heads: int, key_span: int) -> int:
    return max(1, min(256, _SCORE_BUDGET // max(1, batch * heads * key_span)))


def chunked_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window_left: int, window_right: int,
                   dout: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                   rows_per_block: Optional[int] = None
                   ) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """float64 ``out`` of ``softmax(scale * q k^T + mask) v`` and, if `dout` is given, float64
    ``(dq, dk, dv)``, on q's device, with fastattn's window rule (bottom-right aligned, -1 =
    unbounded side) and GQA. Rows that see no key get output and gradients 0."""
    batch, heads_q, seqlen_q, _ = q.shape
    seqlen_k = k.shape[2]
    group = heads_q // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    as_f64 = dict(dtype=torch.float64, device=q.device)
    out = torch.zeros(batch, heads_q, seqlen_q, v.shape[-1], **as_f64)
    grads = None
    if dout is not None:
        grads = (torch.zeros(q.shape, **as_f64), torch.zeros(k.shape, **as_f64), torch.zeros(v.shape, **as_f64))
    bounded = window_left >= 0 and window_right >= 0
    key_span = min(seqlen_k, window_left + window_right + 1) if bounded else seqlen_k
    rows = rows_per_block or _rows_per_block(batch, heads_q, key_span)

    for row0 in range(0, seqlen_q, rows):
        row1 = min(seqlen_q, row0 + rows)
        ranges = [masks.visible_key_range(i, seqlen_q, seqlen_k, window_left, window_right) for i in range(row0, row1)]
        first = min(r[0] for r in ranges)
        end = max(r[1] for r in ranges)
        if end <= first:
            continue  # no row of this block sees a key: output and gradients stay 0
        bounds = torch.tensor(ranges, device=q.device)
        cols = torch.arange(first, end, device=q.device)
        visible = (cols >= bounds[:, :1]) & (cols < bounds[:, 1:])
        sees_a_key = visible.any(-1, keepdim=True)
        with torch.enable_grad():
            leaves = [t.detach().to(torch.float64).requires_grad_(dout is not None)
                      for t in (q[:, :, row0:row1], k[:, :, first:end], v[:, :, first:end])]
            q_block, k_block, v_block = leaves
            if group > 1:
                k_block, v_block = (t.repeat_interleave(group, dim=1) for t in (k_block, v_block))
            scores = (q_block * scale) @ k_block.transpose(-1, -2)
            if bool(visible.all()):
                out_block = torch.softmax(scores, dim=-1) @ v_block
            else:
                # Finite scores in rows that see nothing, so softmax has no NaN to propagate; the
                # visibility product then zeroes those rows.
                scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~sees_a_key, 0.0)
                out_block = (torch.softmax(scores, dim=-1) * visible) @ v_block
            if grads is not None:
                dq, dk, dv = torch.autograd.grad(out_block, leaves, dout[:, :, row0:row1].to(torch.float64))
                grads[0][:, :, row0:row1] = dq
                grads[1][:, :, first:end] += dk
                grads[2][:, :, first:end] += dv
        out[:, :, row0:row1] = out_block.detach()
    return out, grads


def relative_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    """``||actual - oracle||_F / ||oracle||_F`` in float64 (the absolute error when the oracle is
    all zeros); ``inf`` for a NaN/inf anywhere or a shape mismatch."""
    if actual.shape != oracle.shape:
        return float("inf")
    diff = (actual.detach().to(oracle.device, torch.float64) - oracle).norm().item()
    norm = oracle.norm().item()
    error = diff / norm if norm > 0 else diff
    return error if error == error else float("inf")
