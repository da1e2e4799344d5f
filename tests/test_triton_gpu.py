"""The compiled Triton kernels on a CUDA GPU: long sequences, fp16/bf16 against PyTorch's SDPA,
non-default streams, CUDA-graph capture, determinism and torch.compile with inductor.

Every test is marked ``gpu`` (skipped without one); ``benchmarks/gpu_check.sh`` runs them. The
DESIGN grid itself runs on the GPU through tests/test_triton.py, whose tensors live on the GPU
when there is one.
"""

import pytest
import torch
import torch.nn.functional as F

import fastattn
from fastattn import masks
from fastattn.testing import assert_close_to_oracle, attention_ref, make_qkv, random_padding_mask

from oracle_checks import check_against_oracle

pytestmark = pytest.mark.gpu
BACKEND = "triton"


def cuda_qkv(*shape, dtype=torch.bfloat16, **kwargs):
    return make_qkv(*shape, dtype=dtype, device="cuda", **kwargs)


@pytest.mark.parametrize("seqlen, kwargs", [
    (8192, dict(causal=True)),
    (16384, dict(window=(256, 0))),
    (16384, dict(window=(511, 512))),
    (4099, dict()),
], ids=["causal_8k", "window_256_0_16k", "window_511_512_16k", "full_4099"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_long_sequences_against_oracle(seqlen, kwargs, dtype):
    """Long sequences (the dense float64 oracle still fits: B = H = 1)."""
    q, k, v = cuda_qkv(1, 1, 1, seqlen, seqlen, 128, dtype=dtype, seed=seqlen)
    check_against_oracle(q, k, v, backend=BACKEND, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["full", "causal", "gqa_causal", "window", "padding"])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_against_sdpa(dtype, case, head_dim):
    """fastattn's error against the float64 oracle is at most 2x that of PyTorch's SDPA on the
    same inputs (plus the rounding floor), for the output and every gradient."""
    heads_kv = 2 if case == "gqa_causal" else 8
    q, k, v = cuda_qkv(2, 8, heads_kv, 1000, 1000, head_dim, dtype=dtype, seed=head_dim)
    padding = random_padding_mask(2, 1000, fraction=0.4, seed=1).cuda() if case == "padding" else None
    window = (100, 50) if case == "window" else None
    causal = "causal" in case
    left, right = masks.normalise_window(window, causal)
    dense = masks.materialize(1000, 1000, (left, right), key_padding_mask=padding, device="cuda")
    if padding is None:
        dense = dense[None, None]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=heads_kv != 8)

    def ours(q, k, v):
        return fastattn.attention(q, k, v, causal=causal, window=window, key_padding_mask=padding, backend=BACKEND)

    dout = torch.randn(2, 8, 1000, head_dim, device="cuda", dtype=dtype)
    results = {}
    for name, fn, inputs in (("ours", ours, (q, k, v)), ("sdpa", sdpa, (q, k, v)),
                             ("oracle", lambda *t: attention_ref(*t, causal=causal, window=window,
                                                                   key_padding_mask=padding)[0],
                              (q.double(), k.double(), v.double()))):
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        results[name] = (out,) + torch.autograd.grad(out, leaves, dout.to(out.dtype))
    for index, name in enumerate(("out", "dq", "dk", "dv")):
        assert_close_to_oracle(results["ours"][index], results["oracle"][index], results["sdpa"][index],
                               factor=2.0, name=name)


def test_non_default_stream():
    """Kernels run on the current stream: results on a side stream equal the default stream's,
    and the side stream's work is ordered after the producer of the inputs on that stream."""
    q, k, v = cuda_qkv(2, 4, 2, 2048, 2048, 64, seed=1)
    expected = fastattn.attention(q, k, v, causal=True, backend=BACKEND)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q2 = q * 1  # produced on the side stream, so a kernel on the wrong stream could race it
        out = fastattn.attention(q2, k, v, causal=True, backend=BACKEND)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


def test_cuda_graph_capture():
    """A warmed-up forward + backward captures into a CUDA graph and replays on new inputs."""
    shape = (2, 4, 1024, 64)
    static = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    static_dout = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def step():
        out = fastattn.attention(*static, window=(128, 0), backend=BACKEND)
        return (out,) + torch.autograd.grad(out, static, static_dout)

    warmup = torch.cuda.Stream()
    warmup.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warmup):
        for _ in range(2):  # autotunes and compiles before capture
            step()
    torch.cuda.current_stream().wait_stream(warmup)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()

    fresh = [torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    with torch.no_grad():
        for target, source in zip(static + [static_dout], fresh):
            target.copy_(source)
    graph.replay()
    torch.cuda.synchronize()
    expected = step()
    for replayed, eager in zip(captured, expected):
        assert torch.equal(replayed, eager)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_bitwise_deterministic_on_gpu(dtype):
    q, k, v = cuda_qkv(2, 8, 2, 3000, 3000, 128, dtype=dtype, requires_grad=True, seed=4)
    dout = torch.randn(2, 8, 3000, 128, device="cuda", dtype=dtype)

    def run():
        out = fastattn.attention(q, k, v, window=(700, 0), backend=BACKEND)
        return (out,) + torch.autograd.grad(out, (q, k, v), dout)

    first = run()
    for _ in range(2):
        for a, b in zip(first, run()):
            assert torch.equal(a, b)


def test_torch_compile_inductor_fullgraph():
    q, k, v = cuda_qkv(2, 4, 2, 512, 512, 64, requires_grad=True, seed=6)

    def fn(q, k, v):
        return fastattn.attention(q, k, v, window=(64, 0), backend=BACKEND).float().square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    eager_grads = torch.autograd.grad(fn(q, k, v), (q, k, v))
    assert torch.allclose(loss, fn(q, k, v), rtol=1e-3)
    for compiled_grad, eager_grad in zip(grads, eager_grads):
        assert torch.equal(compiled_grad, eager_grad)


def test_auto_dispatch_on_cuda():
    """Long rows go to Triton; rows that see at most CUDA_CPP_MAX_SPAN keys to the CUDA kernels
    when they are compiled (fastattn.backends.auto_priority)."""
    from fastattn.backends import AttentionProblem, get_backend, select_backend

    q, k, v = cuda_qkv(1, 2, 2, 4096, 4096, 64)
    assert select_backend(AttentionProblem.from_tensors(q, k, v, None, -1, 0)).name == "triton"
    windowed = AttentionProblem.from_tensors(q, k, v, None, 256, 256)
    expected = "cpp" if not get_backend("cpp").not_supported_reasons(windowed) else "triton"
    assert select_backend(windowed).name == expected


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    q, k, v = make_qkv(1, 2, 2, 300, 300, 64, dtype=torch.float16, device="cuda:1", seed=2)
    check_against_oracle(q, k, v, backend=BACKEND, causal=True)

