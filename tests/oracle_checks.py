"""Runs a backend against the float64 oracle with the tolerance rule of fastattn.testing.

Shared by the CPU, Triton and CUDA kernel tests so every backend is held to the same check.
"""

import torch

import fastattn
from fastattn.testing import (GRAD_FACTOR, OUTPUT_FACTOR, assert_close_to_oracle, attention_ref, attention_ref_extended,
                              attention_ref_grads, extended_precision_available, make_qkv)


def check_against_oracle(q, k, v, *, backend, causal=False, window=None, scale=None, key_padding_mask=None,
                         dout=None, grads=True):
    """Checks out, lse and (if `grads`) dq, dk, dv of `backend` against the oracle (float64, or
    extended precision for float64 inputs).

    q, k, v may be any views (their layout is what the kernel sees); `dout` defaults to a random
    tensor shaped like the output. Returns (out, lse, grads) of the kernel.
    """
    kwargs = dict(causal=causal, window=window, scale=scale, key_padding_mask=key_padding_mask)
    leaves = [t.detach().requires_grad_(grads) for t in (q, k, v)]
    # Keep each leaf's strides: the views below are what the kernel reads.
    inputs = [leaf.view_as(leaf) if grads else leaf for leaf in leaves]
    out, lse = fastattn.attention(*inputs, return_lse=True, backend=backend, **kwargs)

    if grads and dout is None:
        dout = torch.randn(out.shape, dtype=out.dtype, device=out.device)
    # float64 kernels need an oracle more precise than float64 (fastattn.testing's docstring).
    extended = q.dtype == torch.float64 and extended_precision_available()
    if extended:
        oracle_out, oracle_lse, *oracle_grads = attention_ref_extended(q, k, v, dout if grads else None, **kwargs)
    else:
        oracle_leaves = [t.detach().double().requires_grad_(grads) for t in (q, k, v)]
        oracle_out, oracle_lse = attention_ref(*oracle_leaves, upcast=True, **kwargs)
    base_out, base_lse = attention_ref(q.detach(), k.detach(), v.detach(), upcast=False, reorder_ops=True, **kwargs)

    assert out.dtype == q.dtype and out.shape == oracle_out.shape
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert_close_to_oracle(out, oracle_out, base_out, factor=OUTPUT_FACTOR, name="out")
    assert_close_to_oracle(lse, oracle_lse, base_lse, factor=OUTPUT_FACTOR, name="lse")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(oracle_lse)), "lse: -inf rows differ"
    if not grads:
        return out, lse, None

    kernel_grads = torch.autograd.grad(out, leaves, dout)
    # The float64 oracle's gradients by autograd through its dense math; the yardstick's by the
    # fused kernels' formulas in the input dtype.
    if extended:
        (oracle_grads,) = oracle_grads
    else:
        oracle_grads = torch.autograd.grad(oracle_out, oracle_leaves, dout.double())
    base_grads = attention_ref_grads(q.detach(), k.detach(), v.detach(), dout, upcast=False, **kwargs)
    magnitude = max(g.abs().max().item() if g.numel() else 0.0 for g in oracle_grads)
    for name, actual, oracle, base in zip(("dq", "dk", "dv"), kernel_grads, oracle_grads, base_grads):
        assert actual.shape == oracle.shape and actual.dtype == q.dtype, name
        assert_close_to_oracle(actual, oracle, base, factor=GRAD_FACTOR, name=name, magnitude=magnitude)
    return out, lse, kernel_grads


FULLY_MASKED_CASES = ["causal_nq_gt_nk", "window_0_0_nq_gt_nk", "all_padding", "empty_keys"]


def check_fully_masked_rows(case, dtype, device, backend):
    """Rows that see no key (`case`: causal or window (0, 0) with Nq > Nk, every key padded, or no
    keys at all) get out = 0, lse = -inf and zero gradients, with no NaN anywhere."""
    kwargs, seqlen_q, seqlen_k = {}, 90, 20
    if case == "causal_nq_gt_nk":
        kwargs["causal"] = True  # rows 0..69 sit before key 0
    elif case == "window_0_0_nq_gt_nk":
        kwargs["window"] = (0, 0)
    elif case == "all_padding":
        kwargs["key_padding_mask"] = torch.ones(2, seqlen_k, dtype=torch.bool, device=device)
    elif case == "empty_keys":
        seqlen_k = 0
    else:
        raise ValueError(f"unknown case {case!r}")
    q, k, v = make_qkv(2, 2, 1, seqlen_q, seqlen_k, 32, dtype=dtype, device=device, seed=3)
    out, lse, grads = check_against_oracle(q, k, v, backend=backend, **kwargs)
    masked_rows = torch.isneginf(lse)
    assert masked_rows.any()
    assert (out[masked_rows] == 0).all()
    assert (grads[0][masked_rows] == 0).all()
    for t in (out, lse, *grads):
        assert not torch.isnan(t).any()
