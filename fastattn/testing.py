"""Test helpers shared by fastattn's tests and benchmarks: the float64 oracle, input generators
and the tolerance rule.

Tolerance rule (as FlashAttention's tests): a kernel's max error against the float64 oracle must
be at most ``factor`` times the error of plain PyTorch math at the input precision (2 for
outputs, 3 for gradients), plus a floor.

* "Plain PyTorch math" computes the same function densely in the input dtype along a different
  rounding path than the oracle: ``softmax((scale * q) k^T + mask) v`` for the output
  (``attention_ref(upcast=False, reorder_ops=True)``), and for the gradients the formulas every
  fused kernel implements, ``dS = P * (dout v^T - rowsum(dout * out))``
  (``attention_ref_grads(upcast=False)``), so that its error is a fair yardstick even in float64
  or where autograd's softmax backward would be exact by cancellation.
* The floor is twice the error of merely rounding the oracle to the output dtype, plus 4 ulps of
  the accumulation dtype (float32, or float64 for float64 inputs) of the problem's magnitude: the
  oracle's largest value, and for a gradient the largest of all three oracle gradients (dq, dk
  and dv come from the same products dout v^T and P^T dout). Without the latter, a gradient that
  is exactly 0 (dq of a row that sees a single key: dS = P (dP - delta) cancels) would have to
  come out exactly 0, which only a kernel summing dP and delta in the same order achieves.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from . import masks
from .backends.reference import dense_attention, dense_attention_backward

__all__ = ["attention_ref", "make_qkv", "random_padding_mask", "error_floor", "assert_close_to_oracle",
           "attention_ref_grads",
           "OUTPUT_FACTOR", "GRAD_FACTOR"]

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                  window=None, scale: Optional[float] = None,
                  key_padding_mask: Optional[torch.Tensor] = None, upcast: bool = True,
                  reorder_ops: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with the mask of ``fastattn.masks.materialize``, differentiable.

    ``upcast=True`` (the oracle) computes and returns float64. ``upcast=False`` computes in the
    input dtype; with ``reorder_ops=True`` (``softmax((scale * q) k^T) v``) it is the "plain
    PyTorch math" whose error sets the tolerance. Returns ``(out, lse)``.
    """
    left, right = masks.normalise_window(window, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return dense_attention(q, k, v, key_padding_mask, scale, left, right,
                           torch.float64 if upcast else q.dtype, plain_math=reorder_ops)


def attention_ref_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, *,
                        causal: bool = False, window=None, scale: Optional[float] = None,
                        key_padding_mask: Optional[torch.Tensor] = None, upcast: bool = True
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of ``attention_ref`` by the fused kernels' formulas, in float64 (``upcast``) or
    in the input dtype (the tolerance's "plain PyTorch math")."""
    left, right = masks.normalise_window(window, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return dense_attention_backward(dout, q, k, v, key_padding_mask, scale, left, right,
                                    torch.float64 if upcast else q.dtype)


def make_qkv(batch: int, heads_q: int, heads_kv: int, seqlen_q: int, seqlen_k: int, head_dim: int,
             head_dim_v: Optional[int] = None, *, dtype=torch.float32, device="cpu",
             layout: str = "bhnd", requires_grad: bool = False, seed: int = 0
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q, k, v in the ``(B, H, N, D)`` shape. `layout` chooses their storage:

    * ``"bhnd"``: contiguous;
    * ``"bnhd"``: transposed views of contiguous ``(B, N, H, D)`` tensors (FlashAttention's);
    * ``"strided"``: views into wider tensors (as q, k, v split from a packed projection), so
      no dimension but the last is dense.
    """
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    generator = torch.Generator().manual_seed(seed)

    def make(heads, seqlen, dim):
        if layout == "bhnd":
            t = torch.randn(batch, heads, seqlen, dim, generator=generator)
        elif layout == "bnhd":
            t = torch.randn(batch, seqlen, heads, dim, generator=generator).transpose(1, 2)
        elif layout == "strided":
            t = torch.randn(batch, seqlen, 2, heads, dim + 3, generator=generator)[:, :, 1, :, 1:dim + 1].transpose(1, 2)
        else:
            raise ValueError(f"layout must be 'bhnd', 'bnhd' or 'strided', got {layout!r}")
        t = t.to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad) if requires_grad else t

    return make(heads_q, seqlen_q, head_dim), make(heads_kv, seqlen_k, head_dim), make(heads_kv, seqlen_k, head_dim_v)


def random_padding_mask(batch: int, seqlen_k: int, *, fraction: float = 0.3, fully_padded_batch: bool = False,
                        device="cpu", seed: int = 0) -> torch.Tensor:
    """A bool ``(B, Nk)`` key_padding_mask (True = padding) padding about `fraction` of the keys,
    right-aligned as in a padded batch; with `fully_padded_batch`, batch 0 is all padding."""
    generator = torch.Generator().manual_seed(seed)
    lengths = (torch.rand(batch, generator=generator) * fraction * seqlen_k).long()
    mask = torch.arange(seqlen_k).unsqueeze(0) >= (seqlen_k - lengths).unsqueeze(1)
    if fully_padded_batch:
        mask[0] = True
    return mask.to(device)


def error_floor(oracle: torch.Tensor, dtype: torch.dtype, magnitude: float = 0.0) -> float:
    """The part of the tolerance no kernel can beat: rounding the exact answer to `dtype`, and a
    few ulps of accumulation at the problem's magnitude (at least the oracle's largest value)."""
    finite = oracle[torch.isfinite(oracle)]
    rounding = 0.0 if finite.numel() == 0 else (finite.to(dtype).double() - finite.double()).abs().max().item()
    largest = max(magnitude, 0.0 if finite.numel() == 0 else finite.abs().max().item())
    accumulation_eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return 2.0 * rounding + 4.0 * accumulation_eps * largest


def max_error(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    """Max |actual - oracle|; -inf entries must match exactly (they count as 0 error then)."""
    actual, oracle = actual.double(), oracle.double()
    same_inf = (actual == oracle) & torch.isinf(oracle)
    diff = torch.where(same_inf, torch.zeros_like(actual), actual - oracle).abs()
    if diff.numel() == 0:
        return 0.0
    return float("inf") if torch.isnan(diff).any() else diff.max().item()


def assert_close_to_oracle(actual: torch.Tensor, oracle: torch.Tensor, baseline: torch.Tensor, *,
                           factor: float, name: str = "output", magnitude: float = 0.0) -> Dict[str, float]:
    """Asserts ``err(actual) <= factor * err(baseline) + error_floor`` against the oracle.

    `actual` is the kernel's result, `baseline` plain PyTorch math at the same precision,
    `oracle` the float64 result, `magnitude` the problem's scale if larger than the oracle's (see
    the module docstring). Returns the numbers for reporting.
    """
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    assert not torch.isnan(actual).any(), f"{name}: contains NaN"
    err = max_error(actual, oracle)
    base = max_error(baseline, oracle)
    floor = error_floor(oracle, actual.dtype, magnitude)
    bound = factor * base + floor
    assert err <= bound, (f"{name}: max error {err:.3g} > {factor} x PyTorch's {base:.3g} + floor {floor:.3g}"
                          f" (dtype {actual.dtype})")
    return {"error": err, "baseline_error": base, "bound": bound}
