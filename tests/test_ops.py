"""Operator-level guarantees of the cpp backend: torch.library registration (opcheck),
torch.compile without graph breaks, float64 gradcheck, and bitwise determinism."""

import pytest
import torch

import fastattn
from fastattn.testing import make_qkv, random_padding_mask

OPCHECK_CASES = {
    "full": dict(window=(-1, -1)),
    "causal": dict(window=(-1, 0)),
    "window_gqa": dict(window=(3, 5), heads_kv=1),
    "padding_nq_ne_nk": dict(window=(-1, -1), padding=True, seqlen_q=9),
    "bnhd_layout": dict(window=(-1, -1), layout="bnhd"),
    "bf16": dict(window=(2, 0), dtype=torch.bfloat16),
}


def _op_args(window, heads_kv=2, padding=False, seqlen_q=20, layout="bhnd", dtype=torch.float32):
    q, k, v = make_qkv(2, 4, heads_kv, seqlen_q, 20, 32, 24, dtype=dtype, layout=layout, seed=7)
    mask = random_padding_mask(2, 20, fraction=0.5, seed=1) if padding else None
    return q, k, v, mask, 0.2, window[0], window[1]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_forward_and_backward(case):
    args = _op_args(**OPCHECK_CASES[case])
    torch.library.opcheck(torch.ops.fastattn.fwd.default, args)
    out, lse = torch.ops.fastattn.fwd(*args)
    dout = torch.randn_like(out)
    q, k, v, mask, scale, left, right = args
    torch.library.opcheck(torch.ops.fastattn.bwd.default, (dout, q, k, v, out, lse, mask, scale, left, right))


def _attention_fwd_bwd(q, k, v, dout, mask, **kwargs):
    out = fastattn.attention(q, k, v, key_padding_mask=mask, **kwargs)
    return (out,) + torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("kwargs", [dict(), dict(causal=True), dict(window=(4, 4)), dict(window=(8, 0), padding=True)],
                         ids=["full", "causal", "window", "window_padding"])
def test_torch_compile_fullgraph_matches_eager(kwargs):
    kwargs = dict(kwargs)
    padding = kwargs.pop("padding", False)
    q, k, v = make_qkv(2, 4, 2, 37, 37, 32, requires_grad=True, seed=3)
    mask = random_padding_mask(2, 37, seed=2) if padding else None
    dout = torch.randn(2, 4, 37, 32)

    def forward(q, k, v, mask):
        return fastattn.attention(q, k, v, key_padding_mask=mask, **kwargs)

    torch._dynamo.reset()
    # aot_eager: AOTAutograd traces forward and backward graphs through the ops' fakes, so a graph
    # break or a wrong fake fails here; fullgraph=True makes any graph break an error.
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    eager_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_compiled = compiled(q, k, v, mask)
    out_eager = forward(*eager_leaves, mask)
    out_compiled.backward(dout)
    out_eager.backward(dout)
    assert torch.equal(out_compiled, out_eager)
    for compiled_leaf, eager_leaf in zip((q, k, v), eager_leaves):
        assert torch.equal(compiled_leaf.grad, eager_leaf.grad)


def test_torch_compile_inductor_fullgraph():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 16, seed=4)
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: fastattn.attention(q, k, v, window=(5, 0)) * 2, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), fastattn.attention(q, k, v, window=(5, 0)) * 2, rtol=0, atol=0)


GRADCHECK_CASES = {
    "full": dict(),
    "causal": dict(causal=True),
    "window": dict(window=(2, 1)),
    "gqa": dict(heads_kv=1, window=(3, 0)),
    "padding": dict(padding=True),
    "nq_ne_nk": dict(seqlen_q=4, causal=True),
}


@pytest.mark.parametrize("case", GRADCHECK_CASES)
def test_gradcheck_float64(case):
    options = dict(GRADCHECK_CASES[case])
    heads_kv = options.pop("heads_kv", 2)
    seqlen_q = options.pop("seqlen_q", 7)
    padding = options.pop("padding", False)
    q, k, v = make_qkv(2, 2, heads_kv, seqlen_q, 7, 5, 3, dtype=torch.float64, requires_grad=True, seed=9)
    mask = torch.tensor([[False] * 5 + [True] * 2, [True] + [False] * 6]) if padding else None

    def fn(q, k, v):
        return fastattn.attention(q, k, v, key_padding_mask=mask, backend="cpp", **options)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kwargs", [dict(), dict(window=(64, 16))], ids=["full", "window"])
def test_bitwise_deterministic(dtype, kwargs):
    """The same inputs give bitwise-identical results run after run, whatever the thread count."""
    q, k, v = make_qkv(2, 6, 3, 300, 300, 64, dtype=dtype, requires_grad=True, seed=5)
    dout = torch.randn(2, 6, 300, 64, dtype=dtype)
    first = _attention_fwd_bwd(q, k, v, dout, None, **kwargs)
    second = _attention_fwd_bwd(q, k, v, dout, None, **kwargs)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single_thread = _attention_fwd_bwd(q, k, v, dout, None, **kwargs)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single_thread):
        assert torch.equal(a, b) and torch.equal(a, c)
