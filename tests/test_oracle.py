"""The extended-precision oracle that float64 kernels are checked against (fastattn.testing)."""

from fractions import Fraction

import numpy as np
import pytest
import torch

from fastattn.testing import (_extended_matmul, attention_ref, attention_ref_extended, extended_precision_available,
                              make_qkv, random_padding_mask)

pytestmark = pytest.mark.skipif(not extended_precision_available(),
                                reason="numpy.longdouble is float64 on this platform: float64 kernels use the float64 oracle")


def test_extended_matmul_is_exact_to_longdouble_precision():
    """Against exact rational sums: error within a few longdouble ulps of the result's scale,
    where a float64 matmul of the same (cancelling, widely scaled) inputs is off by far more."""
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(3, 1500, generator=generator, dtype=torch.float64) * torch.logspace(-8, 8, 1500, dtype=torch.float64)
    b = torch.randn(1500, 4, generator=generator, dtype=torch.float64)
    a_x, b_x = (t.numpy().astype(np.longdouble) for t in (a, b))
    result = _extended_matmul(a_x, b_x)
    exact = [[sum(Fraction(x) * Fraction(y) for x, y in zip(a[i].tolist(), b[:, j].tolist())) for j in range(4)]
             for i in range(3)]
    scale = (a.abs() @ b.abs()).max().item()
    ulp = float(np.finfo(np.longdouble).eps)
    extended_error = max(abs(Fraction(*result[i, j].as_integer_ratio()) - exact[i][j]) for i in range(3) for j in range(4))
    float64_error = max(abs(Fraction((a @ b)[i, j].item()) - exact[i][j]) for i in range(3) for j in range(4))
    assert extended_error <= 4 * ulp * scale
    assert float64_error > 100 * extended_error


def test_extended_oracle_agrees_with_float64_oracle():
    """Same function as attention_ref (GQA, window, padding, a fully padded batch, Nq != Nk):
    the two agree to float64 accuracy, and fully masked rows give out 0, lse -inf, zero grads."""
    q, k, v = make_qkv(2, 4, 2, 37, 29, 24, 20, dtype=torch.float64, seed=5)
    padding = random_padding_mask(2, 29, fully_padded_batch=True)
    kwargs = dict(window=(5, 2), key_padding_mask=padding)
    dout = torch.randn(2, 4, 37, 20, dtype=torch.float64)
    out, lse, grads = attention_ref_extended(q, k, v, dout, **kwargs)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = attention_ref(*leaves, **kwargs)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-13)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=1e-13)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=0, atol=1e-13)
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all() and (grads[0][0] == 0).all()
    assert torch.isfinite(lse[1]).any()


def test_extended_oracle_without_keys_or_gradients():
    q, k, v = make_qkv(1, 2, 1, 5, 0, 8, dtype=torch.float64)
    out, lse = attention_ref_extended(q, k, v)
    assert out.shape == (1, 2, 5, 8) and (out == 0).all() and torch.isneginf(lse).all()
