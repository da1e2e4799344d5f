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

A float64 oracle is no more precise than a float64 kernel: its own rounding (about as large as
the kernel's) would count as the kernel's error. For float64 inputs the oracle is therefore
``attention_ref_extended``, computed in the platform's extended precision (``numpy.longdouble``,
64-bit significand on x86) and rounded to float64.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from . import masks
from .backends.reference import dense_attention, dense_attention_backward

__all__ = ["attention_ref", "attention_ref_grads", "attention_ref_extended", "extended_precision_available",
           "make_qkv", "random_padding_mask", "error_floor", "assert_close_to_oracle",
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


def extended_precision_available() -> bool:
    """Whether ``numpy.longdouble`` carries more bits than float64 (x86 and most Linux
    platforms; not macOS on arm64 nor Windows, where it is float64 itself)."""
    import numpy as np
    return np.finfo(np.longdouble).nmant > np.finfo(np.float64).nmant


def _extended_matmul(a, b):
    """``a @ b`` of numpy ``longdouble`` arrays (batched over leading axes), accurate to the
    longdouble precision, from float64 matmuls that make no rounding error.

    Ozaki's error-free splitting: each row of `a` (column of `b`) is cut into slices of integers
    below ``2**bits`` times a power-of-two unit, with ``2 * bits + log2(K) <= 52`` so that the
    product of two slices sums exactly in float64 whatever BLAS's order. A naive longdouble
    matmul (no BLAS) would take minutes at the grid's sizes.
    """
    import numpy as np
    reduction = a.shape[-1]
    total = np.zeros(a.shape[:-1] + b.shape[-1:], dtype=np.longdouble)
    if reduction == 0 or total.size == 0:
        return total
    bits = (52 - max(reduction - 1, 1).bit_length()) // 2
    count = -(-72 // bits)  # enough slices for the 64-bit longdouble significand and then some

    def slices(x, axis):
        result = []
        for _ in range(count):
            _, exponent = np.frexp(np.abs(x).max(axis=axis, keepdims=True))
            unit = np.ldexp(np.longdouble(1), exponent - bits)
            integers = np.rint(x / unit)
            result.append((torch.from_numpy(integers.astype(np.float64)), unit))
            x = x - integers * unit
        return result

    a_slices, b_slices = slices(a, -1), slices(b, -2)
    for i, (a_int, a_unit) in enumerate(a_slices):
        for b_int, b_unit in b_slices[:count - i]:
            total += torch.matmul(a_int, b_int).numpy().astype(np.longdouble) * a_unit * b_unit
    return total


def attention_ref_extended(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: Optional[torch.Tensor] = None,
                           *, causal: bool = False, window=None, scale: Optional[float] = None,
                           key_padding_mask: Optional[torch.Tensor] = None):
    """The oracle for float64 inputs: ``out``, ``lse`` and, given `dout`, ``(dq, dk, dv)`` of
    the same function as ``attention_ref``, computed in ``numpy.longdouble`` (matmuls by
    ``_extended_matmul``) and rounded to float64 on q's device. Gradients follow the exact
    formulas ``dS = P * (dout v^T - rowsum(dout * out))``, ``dq = scale dS k``,
    ``dk = scale dS^T q``, ``dv = P^T dout`` (summed over each GQA group). Rows that see no key
    get ``out = 0``, ``lse = -inf`` and zero gradients.
    """
    import numpy as np
    left, right = masks.normalise_window(window, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    heads_kv, group = k.shape[1], q.shape[1] // k.shape[1]
    visible = masks.materialize(q.shape[2], k.shape[2], (left, right), key_padding_mask=key_padding_mask,
                                device="cpu").numpy()

    def extended(t):
        return t.detach().to("cpu", torch.float64).numpy().astype(np.longdouble)

    q_x, k_x, v_x = extended(q), extended(k), extended(v)
    k_x, v_x = (np.repeat(t, group, axis=1) for t in (k_x, v_x))
    scores = np.where(visible, _extended_matmul(q_x, np.swapaxes(k_x, -1, -2)) * np.longdouble(scale), -np.inf)
    row_max = scores.max(axis=-1, keepdims=True, initial=-np.inf)
    seen = np.isfinite(row_max)
    exps = np.where(visible & seen, np.exp(scores - np.where(seen, row_max, 0)), 0)
    sums = exps.sum(axis=-1, keepdims=True)
    probs = exps / np.where(seen, sums, 1)
    lse = np.where(seen, row_max + np.log(np.where(seen, sums, 1)), -np.inf)[..., 0]
    out = _extended_matmul(probs, v_x)

    def back(x):
        return torch.from_numpy(x.astype(np.float64)).to(q.device)

    if dout is None:
        return back(out), back(lse)
    dout_x = extended(dout)
    delta = (dout_x * out).sum(axis=-1, keepdims=True)
    dscores = probs * (_extended_matmul(dout_x, np.swapaxes(v_x, -1, -2)) - delta)
    dq = _extended_matmul(dscores, k_x) * np.longdouble(scale)
    dk = _extended_matmul(np.swapaxes(dscores, -1, -2), q_x) * np.longdouble(scale)
    dv = _extended_matmul(np.swapaxes(probs, -1, -2), dout_x)

    def group_sum(x):
        return x.reshape(x.shape[0], heads_kv, group, *x.shape[2:]).sum(axis=2)

    return back(out), back(lse), (back(dq), back(group_sum(dk)), back(group_sum(dv)))


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
