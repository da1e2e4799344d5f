"""The public API: argument checking, flash_attn_func's layout, and backend dispatch."""

import math
import warnings

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.testing import attention_ref, make_qkv


def qkv(B=2, Hq=4, Hkv=2, Nq=16, Nk=16, D=32, Dv=None, dtype=torch.float32):
    return make_qkv(B, Hq, Hkv, Nq, Nk, D, Dv, dtype=dtype)


BAD_INPUTS = [
    # (description, call, error type, text the message must contain)
    ("3-D q", lambda q, k, v: fastattn.attention(q[0], k, v), ValueError, "q must be a 4-D tensor"),
    ("3-D k", lambda q, k, v: fastattn.attention(q, k[0], v), ValueError, "k must be a 4-D tensor"),
    ("batch mismatch", lambda q, k, v: fastattn.attention(q, k[:1], v[:1]), ValueError, "same batch size"),
    ("head dim mismatch", lambda q, k, v: fastattn.attention(q, k[..., :16], v), ValueError, "head dim of q"),
    ("kv length mismatch", lambda q, k, v: fastattn.attention(q, k, v[:, :, :8]), ValueError, "v must have the heads and length of k"),
    ("kv heads mismatch", lambda q, k, v: fastattn.attention(q, k, v[:, :1]), ValueError, "v must have the heads and length of k"),
    ("Hq % Hkv", lambda q, k, v: fastattn.attention(q[:, :3], k, v), ValueError, "multiple of the number of key/value heads"),
    ("padding shape", lambda q, k, v: fastattn.attention(q, k, v, key_padding_mask=torch.zeros(2, 15, dtype=torch.bool)),
     ValueError, "key_padding_mask must have shape (B, Nk) = (2, 16)"),
    ("padding dtype", lambda q, k, v: fastattn.attention(q, k, v, key_padding_mask=torch.zeros(2, 16)), TypeError,
     "key_padding_mask must be a bool tensor"),
    ("padding type", lambda q, k, v: fastattn.attention(q, k, v, key_padding_mask=[[True] * 16] * 2), TypeError,
     "key_padding_mask must be a bool tensor"),
    ("mixed dtypes", lambda q, k, v: fastattn.attention(q, k.double(), v), TypeError, "k must have the dtype of q"),
    ("mixed devices", lambda q, k, v: fastattn.attention(q, k.to("meta"), v), ValueError, "k must be on the device of q"),
    ("padding device", lambda q, k, v: fastattn.attention(q, k, v, key_padding_mask=torch.zeros(2, 16, dtype=torch.bool, device="meta")),
     ValueError, "key_padding_mask must be on the device of q"),
    ("integer q", lambda q, k, v: fastattn.attention(q.long(), k.long(), v.long()), TypeError, "q must be a floating-point tensor"),
    ("not a tensor", lambda q, k, v: fastattn.attention(q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
    ("window -2", lambda q, k, v: fastattn.attention(q, k, v, window=-2), ValueError, "window must be >= 0, or -1"),
    ("window (3, -4)", lambda q, k, v: fastattn.attention(q, k, v, window=(3, -4)), ValueError, "window[1] (right) must be >= 0"),
    ("window float", lambda q, k, v: fastattn.attention(q, k, v, window=2.5), TypeError, "window must be an int"),
    ("window triple", lambda q, k, v: fastattn.attention(q, k, v, window=(1, 2, 3)), ValueError, "pair (left, right)"),
    ("scale 0", lambda q, k, v: fastattn.attention(q, k, v, scale=0.0), ValueError, "scale must be a finite number > 0"),
    ("scale < 0", lambda q, k, v: fastattn.attention(q, k, v, scale=-1.0), ValueError, "scale must be a finite number > 0"),
    ("scale NaN", lambda q, k, v: fastattn.attention(q, k, v, scale=math.nan), ValueError, "scale must be a finite number > 0"),
    ("scale inf", lambda q, k, v: fastattn.attention(q, k, v, scale=math.inf), ValueError, "scale must be a finite number > 0"),
    ("scale tensor", lambda q, k, v: fastattn.attention(q, k, v, scale=torch.tensor(0.1)), TypeError, "scale must be a positive float"),
    ("causal int", lambda q, k, v: fastattn.attention(q, k, v, causal=1), TypeError, "causal must be a bool"),
    ("head dim 257", lambda q, k, v: fastattn.attention(*qkv(D=257)), ValueError, "head dim of q/k must be in 1..256, got 257"),
    ("head dim v 300", lambda q, k, v: fastattn.attention(*qkv(Dv=300)), ValueError, "head dim of v must be in 1..256, got 300"),
    ("unknown backend", lambda q, k, v: fastattn.attention(q, k, v, backend="cuDNN"), ValueError, "backend must be one of"),
    ("flash dropout", lambda q, k, v: fastattn.flash_attn_func(q, k, v, 0.1), ValueError, "dropout_p must be 0.0"),
    ("flash window_size", lambda q, k, v: fastattn.flash_attn_func(q, k, v, window_size=(-3, 0)), ValueError,
     "window_size[0] (left) must be >= 0"),
    ("flash softmax_scale", lambda q, k, v: fastattn.flash_attn_func(q, k, v, softmax_scale=-2.0), ValueError,
     "softmax_scale must be a finite number > 0"),
    ("flash 3-D", lambda q, k, v: fastattn.flash_attn_func(q[0], k, v), ValueError, "q must be a 4-D tensor (B, Nq, Hq, D)"),
]


@pytest.mark.parametrize("description, call, error, text", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_raises_clear_error(description, call, error, text):
    q, k, v = qkv()
    with pytest.raises(error) as info:
        call(q, k, v)
    assert text in str(info.value)


@pytest.mark.parametrize("call", [
    lambda q, k, v: torch.ops.fastattn.fwd(q[0], k, v, None, 0.1, -1, -1),
    lambda q, k, v: torch.ops.fastattn.fwd(q, k[:1], v[:1], None, 0.1, -1, -1),
    lambda q, k, v: torch.ops.fastattn.fwd(q[:, :3], k, v, None, 0.1, -1, -1),
    lambda q, k, v: torch.ops.fastattn.fwd(q, k, v, torch.zeros(2, 3, dtype=torch.bool), 0.1, -1, -1),
    lambda q, k, v: torch.ops.fastattn.fwd(q, k, v, torch.zeros(2, 16), 0.1, -1, -1),
    lambda q, k, v: torch.ops.fastattn.fwd(q, k, v, None, -0.1, -1, -1),
    lambda q, k, v: torch.ops.fastattn.fwd(q, k, v, None, float("nan"), -1, -1),
    lambda q, k, v: torch.ops.fastattn.fwd(q, k, v, None, 0.1, -5, 0),
    lambda q, k, v: torch.ops.fastattn.fwd(q, k.double(), v, None, 0.1, -1, -1),
    lambda q, k, v: torch.ops.fastattn.fwd(q.transpose(2, 3), k, v, None, 0.1, -1, -1),
    lambda q, k, v: torch.ops.fastattn.bwd(q, q, k, v, q, torch.zeros(2, 4, 15), None, 0.1, -1, -1),
    lambda q, k, v: torch.ops.fastattn.bwd(q[:, :, :3], q, k, v, q, torch.zeros(2, 4, 16), None, 0.1, -1, -1),
])
def test_ops_validate_their_inputs(call):
    """Direct calls of the C++ ops raise Python errors instead of crashing."""
    q, k, v = qkv()
    with pytest.raises((ValueError, TypeError), match="fastattn: "):
        call(q, k, v)


@pytest.mark.parametrize("window_size, causal", [((-1, -1), False), ((-1, -1), True), ((4, 2), False), ((6, 0), True)])
def test_flash_attn_func_layout(window_size, causal):
    """(B, N, H, D) in, (B, N, H, D) out, through views: no copies of q, k, v."""
    q, k, v = make_qkv(2, 4, 2, 33, 40, 32, layout="bnhd", seed=1)
    q_bnhd, k_bnhd, v_bnhd = (t.transpose(1, 2) for t in (q, k, v))
    assert q_bnhd.is_contiguous()
    out, lse = fastattn.flash_attn_func(q_bnhd, k_bnhd, v_bnhd, causal=causal, window_size=window_size,
                                        return_lse=True)
    assert out.shape == (2, 33, 4, 32) and out.is_contiguous()
    assert lse.shape == (2, 4, 33)
    ref, ref_lse = attention_ref(q, k, v, causal=causal, window=window_size)
    torch.testing.assert_close(out.transpose(1, 2).double(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=0, atol=1e-5)


def test_flash_attn_func_positional_scale_and_default_return():
    q, k, v = make_qkv(1, 2, 2, 9, 9, 16, layout="bnhd", seed=2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = fastattn.flash_attn_func(q, k, v, 0.0, 0.5)
    expected = fastattn.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=0.5)
    assert torch.equal(out, expected.transpose(1, 2))


def test_bhnd_outputs_are_contiguous():
    q, k, v = qkv()
    assert fastattn.attention(q, k, v).is_contiguous()


def test_last_dim_not_contiguous_is_accepted():
    q, k, v = qkv()
    q_strided = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # last dim stride != 1
    assert q_strided.stride(-1) != 1
    assert torch.equal(fastattn.attention(q_strided, k, v), fastattn.attention(q, k, v))


def test_return_lse_is_not_differentiable():
    q, k, v = make_qkv(1, 2, 2, 8, 8, 16, requires_grad=True)
    out, lse = fastattn.attention(q, k, v, return_lse=True)
    assert out.requires_grad and not lse.requires_grad


def test_auto_picks_cpp_on_cpu():
    problem = backends.AttentionProblem.from_tensors(*qkv(), None, -1, -1)
    assert backends.select_backend(problem).name == "cpp"


@pytest.mark.parametrize("dtype, seqlen, window, first", [
    (torch.bfloat16, 16384, (-1, -1), "triton"),
    (torch.bfloat16, 16384, (256, 256), "cpp"),
    (torch.float16, 16384, (1023, 0), "cpp"),
    (torch.float16, 16384, (1024, 0), "triton"),
    (torch.bfloat16, 1024, (-1, 0), "cpp"),
    (torch.float32, 16384, (256, 256), "triton"),
])
def test_auto_priority_on_cuda_follows_the_span(dtype, seqlen, window, first):
    """On CUDA, fp16/bf16 rows seeing at most CUDA_CPP_MAX_SPAN keys try the C++ kernels first
    (faster there on an H100, benchmarks/RESULTS.md); long rows and fp32 try Triton first."""
    problem = backends.AttentionProblem(
        device_type="cuda", dtype=dtype, batch=1, heads_q=16, heads_kv=16, seqlen_q=seqlen, seqlen_k=seqlen,
        head_dim=128, head_dim_v=128, window_left=window[0], window_right=window[1],
        has_key_padding_mask=False, needs_grad=True)
    order = backends.auto_priority(problem)
    assert order[0] == first and sorted(order) == sorted(backends.PRIORITY["cuda"]) and order[-1] == "reference"


def test_named_backend_that_cannot_serve_lists_reasons():
    q, k, v = (t.double() for t in qkv())  # no Triton kernel takes float64, on any device
    with pytest.raises(fastattn.BackendNotSupportedError, match="backend='triton' cannot serve this call"):
        fastattn.attention(q, k, v, backend="triton")


def test_reference_backend_matches_cpp():
    q, k, v = qkv()
    torch.testing.assert_close(fastattn.attention(q, k, v, causal=True, backend="reference"),
                               fastattn.attention(q, k, v, causal=True, backend="cpp"))


def test_fallback_to_reference_warns_once(monkeypatch):
    cpp = backends.get_backend("cpp")
    monkeypatch.setitem(cpp.dtypes, "cpu", (torch.float64,))  # pretend the kernels lack fp32
    monkeypatch.setattr(backends, "_warned", set())
    q, k, v = qkv()
    with pytest.warns(fastattn.FastAttnFallbackWarning, match="using the O\\(N\\^2\\)-memory reference backend"):
        out = fastattn.attention(q, k, v)
    torch.testing.assert_close(out.double(), attention_ref(q, k, v)[0], rtol=0, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastattn.attention(q, k, v)  # the same situation again: no second warning


def test_public_names():
    for name in ("attention", "flash_attn_func", "masks", "FastAttnFallbackWarning", "__version__"):
        assert name in fastattn.__all__ and hasattr(fastattn, name)
    assert callable(fastattn.testing.attention_ref)
