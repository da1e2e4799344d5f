"""The CUDA kernels (backend="cpp" on CUDA tensors) against the float64 oracle on DESIGN.md's
edge-case grid, plus determinism, a non-default stream and CUDA-graph capture. Needs a GPU
(compute capability >= 8.0); run by benchmarks/gpu_check.sh. Without one, tests/test_cuda_emulated.py
runs the same kernel code on the CPU."""

import pytest
import torch

import fastattn
from fastattn.testing import make_qkv, random_padding_mask

from oracle_checks import FULLY_MASKED_CASES, check_against_oracle, check_fully_masked_rows
from test_cpu_kernels import HEAD_DIMS, SEQLENS, WINDOWS, window_kwargs

pytestmark = pytest.mark.gpu

BACKEND = "cpp"
DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::fwd", "CUDA"):
        pytest.fail("fastattn._C was built without its CUDA kernels on a machine with a GPU")
    if torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("the CUDA kernels need compute capability 8.0 or newer")


def qkv(*args, **kwargs):
    return make_qkv(*args, device="cuda", **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_grid(seqlens, window, dtype):
    seqlen_q, seqlen_k = seqlens
    head_dim = HEAD_DIMS[(SEQLENS.index(seqlens) + WINDOWS.index(window)) % len(HEAD_DIMS)]
    q, k, v = qkv(2, 4, 2, seqlen_q, seqlen_k, head_dim, dtype=dtype, seed=seqlen_q + head_dim)
    check_against_oracle(q, k, v, backend=BACKEND, **window_kwargs(window, seqlen_k))


@pytest.mark.parametrize("head_dim, head_dim_v",
                         [(d, d) for d in HEAD_DIMS] + [(40, 24), (80, 128), (1, 3), (256, 1), (24, 130)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_head_dims(head_dim, head_dim_v, dtype):
    q, k, v = qkv(1, 2, 2, 113, 129, head_dim, head_dim_v, dtype=dtype, seed=head_dim)
    check_against_oracle(q, k, v, backend=BACKEND, causal=True)


@pytest.mark.parametrize("heads_kv", [1, 2, 3, 6])
@pytest.mark.parametrize("window", [None, (5, 2)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gqa_mqa(heads_kv, window, dtype):
    q, k, v = qkv(2, 6, heads_kv, 70, 90, 64, dtype=dtype, seed=heads_kv)
    check_against_oracle(q, k, v, backend=BACKEND, window=window)


@pytest.mark.parametrize("seqlens", [(113, 113), (17, 200), (200, 17)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("window", ["full", "causal", (3, 7)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding(seqlens, window, dtype):
    seqlen_q, seqlen_k = seqlens
    q, k, v = qkv(3, 4, 2, seqlen_q, seqlen_k, 64, dtype=dtype, seed=seqlen_k)
    padding = random_padding_mask(3, seqlen_k, fraction=0.6, fully_padded_batch=True, seed=seqlen_q, device="cuda")
    check_against_oracle(q, k, v, backend=BACKEND, key_padding_mask=padding, **window_kwargs(window, seqlen_k))


@pytest.mark.parametrize("case", FULLY_MASKED_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(case, dtype):
    check_fully_masked_rows(case, dtype, "cuda", BACKEND)


@pytest.mark.parametrize("layout", ["bnhd", "strided"])
@pytest.mark.parametrize("window", ["full", (3, 7)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_inputs_and_dout(layout, window, dtype):
    q, k, v = qkv(2, 4, 2, 77, 77, 48, layout=layout, dtype=dtype, seed=11)
    dout = torch.randn(2, 77, 4, 96, device="cuda").to(dtype).transpose(1, 2)[..., ::2]
    check_against_oracle(q, k, v, backend=BACKEND, dout=dout, **window_kwargs(window, 77))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_long_sequences(dtype):
    """Many tiles per CTA: the pipelines' steady state, causal and sliding window."""
    q, k, v = qkv(1, 4, 2, 3000, 4096, 128, dtype=dtype, seed=1)
    check_against_oracle(q, k, v, backend=BACKEND, causal=True)
    check_against_oracle(q, k, v, backend=BACKEND, window=(256, 64))


@pytest.mark.parametrize("head_dim", [3, 40, 128, 200])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_key_rows_give_exactly_zero_dq(head_dim, dtype):
    """A row that sees one key has out = v and dq = 0 exactly; with every row so (Nk = 1, or window
    (0, 0) with Nq = Nk) the oracle's bound is 0, so delta must be summed exactly as dP is."""
    for seqlen_q, seqlen_k, kwargs in ((5, 1, {}), (77, 77, {"window": (0, 0)})):
        q, k, v = qkv(2, 2, 1, seqlen_q, seqlen_k, head_dim, dtype=dtype, seed=head_dim)
        _, _, grads = check_against_oracle(q, k, v, backend=BACKEND, **kwargs)
        assert (grads[0] == 0).all()


def _forward_backward(q, k, v, dout, **kwargs):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fastattn.attention(*leaves, backend=BACKEND, return_lse=True, **kwargs)
    return (out, lse, *torch.autograd.grad(out, leaves, dout))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_deterministic(dtype):
    """Bitwise-identical outputs and gradients on every run (no float atomics)."""
    q, k, v = qkv(2, 8, 2, 1000, 1200, 128, dtype=dtype, seed=2)
    dout = torch.randn(2, 8, 1000, 128, device="cuda", dtype=dtype)
    padding = random_padding_mask(2, 1200, fraction=0.3, device="cuda", seed=2)
    first = _forward_backward(q, k, v, dout, window=(300, 20), key_padding_mask=padding)
    for _ in range(3):
        again = _forward_backward(q, k, v, dout, window=(300, 20), key_padding_mask=padding)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


def test_runs_on_the_current_stream():
    """The kernels launch on the caller's current stream: inputs that a side stream is still
    writing (behind a long sleep) are read only after they are written."""
    q, k, v = qkv(2, 4, 2, 500, 500, 64, dtype=torch.bfloat16, seed=4)
    dout = torch.randn(2, 4, 500, 64, device="cuda", dtype=torch.bfloat16)
    expected = _forward_backward(q, k, v, dout, causal=True)
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time before the inputs exist on `side`
        q2, k2, v2, dout2 = (t * 1 for t in (q, k, v, dout))
        result = _forward_backward(q2, k2, v2, dout2, causal=True)
    side.synchronize()
    for a, b in zip(expected, result):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cuda_graph_capture(dtype):
    """fwd and bwd capture into a CUDA graph and replay on new inputs copied into the static ones."""
    shape = dict(batch=2, heads_q=4, heads_kv=2, seqlen_q=300, seqlen_k=300, head_dim=64)
    static = qkv(*shape.values(), dtype=dtype, seed=5)
    static_dout = torch.randn(2, 4, 300, 64, device="cuda", dtype=dtype)
    args = (None, 0.125, 64, 0)

    def step():
        out, lse = torch.ops.fastattn.fwd(*static, *args)
        return (out, lse, *torch.ops.fastattn.bwd(static_dout, *static, out, lse, *args))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    fresh = qkv(*shape.values(), dtype=dtype, seed=6)
    fresh_dout = torch.randn_like(static_dout)
    for target, source in zip((*static, static_dout), (*fresh, fresh_dout)):
        target.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for a, b in zip(captured, eager):
        assert torch.equal(a, b)


def test_errors_name_the_argument():
    q, k, v = qkv(1, 4, 3, 16, 16, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        torch.ops.fastattn.fwd(q, k, v, None, 0.5, -1, -1)
    q, k, v = qkv(1, 2, 2, 16, 16, 32, dtype=torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        torch.ops.fastattn.fwd(q, k, v, None, 0.5, -1, -1)
    with pytest.raises(ValueError, match="cpp"):
        fastattn.attention(q, k, v, backend=BACKEND)  # float64 is not a CUDA dtype of the cpp backend
