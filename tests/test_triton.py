"""The Triton kernels (backend="triton") against the float64 oracle, on the CPU through Triton's
interpreter (tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is present; on a GPU the same
tests run the compiled kernels).

Mirrors tests/test_cpu_kernels.py at sizes the interpreter can afford; the interpreter's tiles
(configs.INTERPRETER_CONFIGS) are small, so even short sequences span many blocks, and
test_shipped_block_shapes runs the tiles that ship.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl

import fastattn
from fastattn import masks
from fastattn.backends import BackendNotSupportedError, get_backend
from fastattn.backends.triton import blocks, configs, interpreter_active
from fastattn.backends.triton.launch import clamp_window
from fastattn.testing import make_qkv, random_padding_mask

from oracle_checks import FULLY_MASKED_CASES, check_against_oracle, check_fully_masked_rows
from test_cpu_kernels import HEAD_DIMS, WINDOWS, window_kwargs

BACKEND = "triton"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEQLENS = [(1, 1), (17, 17), (113, 113), (17, 113), (113, 17), (1, 1025), (1025, 1025)]
#: Windows whose cost grows with N^2; at 1025 x 1025 the interpreter runs them in fp32 only.
WIDE_WINDOWS = {"full", "causal", "nk-1,0", "wider"}

pytestmark = [
    # Only a missing triton skips; a triton backend that fails to load fails test_backend_is_available.
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(DEVICE == "cpu" and not interpreter_active(),
                       reason="no GPU and TRITON_INTERPRET is off (tests/conftest.py sets it unless told otherwise)"),
]


def test_backend_is_available():
    assert get_backend(BACKEND).availability_reasons() == []


def qkv(*shape, dtype=torch.float32, **kwargs):
    """make_qkv on the device the kernels run on (a GPU, or the CPU through the interpreter)."""
    return make_qkv(*shape, dtype=dtype, device=DEVICE, **kwargs)


#: Interpreter tiles for the 1025-long cases: shipped shapes, large enough to keep them quick.
LARGE_TILES = dict(fwd=triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}), dkdv=triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}),
                   dq=triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_grid(seqlens, window, dtype):
    seqlen_q, seqlen_k = seqlens
    if seqlen_q * seqlen_k > 100_000 and window in WIDE_WINDOWS and dtype != torch.float32 and DEVICE == "cpu":
        pytest.skip("interpreter time: the N^2 windows at 1025 x 1025 run in fp32 (and in every dtype on a GPU)")
    head_dim = HEAD_DIMS[(SEQLENS.index(seqlens) + WINDOWS.index(window)) % len(HEAD_DIMS)]
    long = max(seqlens) > 1000
    batch, heads, heads_kv = (1, 1, 1) if long else (2, 2, 1)
    q, k, v = qkv(batch, heads, heads_kv, seqlen_q, seqlen_k, head_dim, dtype=dtype, seed=seqlen_q + head_dim)
    with configs.use_configs(**(LARGE_TILES if long else {})):
        check_against_oracle(q, k, v, backend=BACKEND, **window_kwargs(window, seqlen_k))


@pytest.mark.parametrize("head_dim, head_dim_v", [(d, d) for d in HEAD_DIMS] + [(40, 24), (80, 128), (1, 3), (256, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(head_dim, head_dim_v, causal):
    q, k, v = qkv(1, 2, 2, 49, 67, head_dim, head_dim_v, seed=head_dim)
    check_against_oracle(q, k, v, backend=BACKEND, causal=causal)


@pytest.mark.parametrize("heads_kv", [1, 2, 3, 6])
@pytest.mark.parametrize("window", [None, (5, 2)])
def test_gqa_mqa(heads_kv, window):
    q, k, v = qkv(2, 6, heads_kv, 40, 57, 32, seed=heads_kv)
    check_against_oracle(q, k, v, backend=BACKEND, window=window)


@pytest.mark.parametrize("seqlens", [(70, 70), (17, 130), (130, 17)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("window", ["full", "causal", (3, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_padding(seqlens, window, dtype):
    seqlen_q, seqlen_k = seqlens
    q, k, v = qkv(3, 2, 1, seqlen_q, seqlen_k, 64, dtype=dtype, seed=seqlen_k)
    padding = random_padding_mask(3, seqlen_k, fraction=0.6, fully_padded_batch=True, seed=seqlen_q).to(DEVICE)
    check_against_oracle(q, k, v, backend=BACKEND, key_padding_mask=padding, **window_kwargs(window, seqlen_k))


@pytest.mark.parametrize("case", FULLY_MASKED_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fully_masked_rows(case, dtype):
    check_fully_masked_rows(case, dtype, DEVICE, BACKEND)


@pytest.mark.parametrize("layout", ["bnhd", "strided"])
@pytest.mark.parametrize("window", ["full", (3, 7)], ids=str)
def test_non_contiguous_inputs_and_dout(layout, window):
    q, k, v = qkv(2, 4, 2, 45, 45, 48, layout=layout, seed=11)
    assert not q.is_contiguous()
    dout = torch.randn(2, 45, 4, 96, device=DEVICE).transpose(1, 2)[..., ::2]
    assert dout.stride(-1) == 2
    check_against_oracle(q, k, v, backend=BACKEND, dout=dout, **window_kwargs(window, 45))


def test_flash_attn_layout_is_read_in_place():
    """(B, N, H, D) inputs reach the kernels as views, and out comes back in that layout."""
    q, k, v = qkv(2, 3, 3, 33, 33, 16, layout="bnhd", seed=2)
    out = fastattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                   backend=BACKEND)
    assert out.shape == (2, 33, 3, 16) and out.is_contiguous()
    reference = fastattn.attention(q, k, v, causal=True, backend="reference")
    torch.testing.assert_close(out.transpose(1, 2), reference, rtol=1e-5, atol=1e-5)


def test_scale_argument():
    q, k, v = qkv(1, 2, 1, 33, 47, 32, seed=6)
    check_against_oracle(q, k, v, backend=BACKEND, scale=0.37, causal=True)


@pytest.mark.parametrize("index", range(max(len(configs.shipped_block_shapes(k)) for k in configs.KERNELS)))
@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the autotuner picks the shipped configs")
def test_shipped_block_shapes(index):
    """Every (BLOCK_M, BLOCK_N) that ships, run by the interpreter on a windowed GQA problem whose
    lengths are not block multiples."""
    chosen = {kernel: (lambda shapes: shapes[index % len(shapes)])(configs.shipped_block_shapes(kernel))
              for kernel in configs.KERNELS}
    q, k, v = qkv(1, 2, 1, 150, 201, 64, seed=index)
    padding = random_padding_mask(1, 201, fraction=0.3, seed=index)
    with configs.use_configs(**chosen):
        check_against_oracle(q, k, v, backend=BACKEND, window=(70, 20), key_padding_mask=padding)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic(dtype):
    """No atomics: the same inputs give bitwise-identical outputs and gradients."""
    q, k, v = qkv(2, 4, 2, 70, 83, 32, dtype=dtype, requires_grad=True, seed=5)
    padding = random_padding_mask(2, 83, seed=4).to(DEVICE)
    dout = torch.randn(2, 4, 70, 32, dtype=dtype, device=DEVICE)

    def run():
        out, lse = fastattn.attention(q, k, v, window=(9, 3), key_padding_mask=padding, return_lse=True,
                                      backend=BACKEND)
        return (out, lse) + torch.autograd.grad(out, (q, k, v), dout)

    for first, second in zip(run(), run()):
        assert torch.equal(first, second)


@pytest.mark.parametrize("kernel", configs.KERNELS)
def test_autotune_candidates_follow_precision_head_dim_and_gpu(kernel, monkeypatch):
    """Autotuning is keyed on buckets and picks among the configs of the launch's precision,
    head-dim bucket and GPU generation; every such list is non-empty (and is what the offline
    compile test checks); FASTATTN_TRITON_AUTOTUNE=0 keeps only the first."""
    monkeypatch.delenv("FASTATTN_TRITON_AUTOTUNE", raising=False)  # gpu_check.sh runs the tests with it
    prune = configs.prune_configs(kernel)
    candidates = configs.all_configs(kernel)
    for target in configs.TARGETS:
        monkeypatch.setattr(configs, "_target_of", lambda device, target=target: target)
        for dtype in DTYPES:
            for bucket in configs.HEAD_DIM_BUCKETS:
                expected = configs.configs_for(kernel, dtype == torch.float32, bucket, target)
                assert expected, (kernel, dtype, bucket, target)
                args = {"Q": torch.empty(1, dtype=dtype), "BLOCK_D": bucket, "BLOCK_DV": 16}
                assert prune(candidates, args) == expected
                monkeypatch.setenv("FASTATTN_TRITON_AUTOTUNE", "0")
                assert prune(candidates, args) == expected[:1]
                monkeypatch.delenv("FASTATTN_TRITON_AUTOTUNE")
    assert configs.length_bucket(1000) == configs.length_bucket(1024) == 1024 < configs.length_bucket(1025)
    assert configs.buckets(16384, 16384, 256, 256) == (16384, 16384, 1024)
    assert configs.head_dim_block(40) == 64 and configs.head_dim_block(1) == 16


# --- the block ranges: only blocks that can hold a visible key are visited, only straddling ones
# --- are masked. A kernel writes the bounds each program computes; they are checked against the
# --- dense mask of fastattn.masks.


@triton.jit
def _bounds_kernel(Out, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   OVER_KEYS: tl.constexpr):
    block = tl.program_id(0)
    if OVER_KEYS:  # the forward / dQ view: a query block's key-block bounds
        row_end = tl.minimum(block * BLOCK_M + BLOCK_M, seqlen_q)
        bounds = blocks.key_block_bounds(block * BLOCK_M, row_end, seqlen_q, seqlen_k, window_left, window_right,
                                         BLOCK_N)
    else:  # the dK/dV view: a key block's query-block bounds
        key_end = tl.minimum(block * BLOCK_N + BLOCK_N, seqlen_k)
        bounds = blocks.query_block_bounds(block * BLOCK_N, key_end, seqlen_q, seqlen_k, window_left, window_right,
                                           BLOCK_M)
    for i in tl.static_range(4):
        tl.store(Out + block * 4 + i, bounds[i])


def _block_bounds(seqlen_q, seqlen_k, left, right, block_m, block_n, over_keys):
    n_blocks = triton.cdiv(seqlen_q if over_keys else seqlen_k, block_m if over_keys else block_n)
    out = torch.empty(n_blocks * 4, dtype=torch.int32, device=DEVICE)
    _bounds_kernel[(n_blocks,)](out, seqlen_q, seqlen_k, *clamp_window(left, right, seqlen_q, seqlen_k),
                                BLOCK_M=block_m, BLOCK_N=block_n, OVER_KEYS=over_keys)
    return out.view(n_blocks, 4).tolist()


@pytest.mark.parametrize("seqlens", [(100, 100), (37, 150), (150, 37), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("window", [(-1, -1), (-1, 0), (0, 0), (5, 9), (40, 0), (0, 33), (200, 300)], ids=str)
@pytest.mark.parametrize("over_keys", [True, False], ids=["key_blocks", "query_blocks"])
def test_block_bounds_visit_only_visible_blocks(seqlens, window, over_keys):
    block_m, block_n = 16, 8
    visible = masks.materialize(*seqlens, window)
    # Over keys: query blocks of BLOCK_M rows walk key blocks of BLOCK_N; otherwise (dK/dV) key
    # blocks of BLOCK_N walk query blocks of BLOCK_M: the same rule, transposed.
    grid, outer_size, step = (visible, block_m, block_n) if over_keys else (visible.T, block_n, block_m)
    for outer, (start, full_start, full_end, end) in enumerate(
            _block_bounds(*seqlens, *window, block_m, block_n, over_keys)):
        rows = grid[outer * outer_size:(outer + 1) * outer_size]
        assert start % step == 0 and full_start % step == 0 and full_end % step == 0 and end % step == 0
        assert start <= full_start <= full_end <= end
        for inner in range(0, triton.cdiv(grid.shape[1], step) * step, step):
            tile = rows[:, inner:inner + step]
            if tile.any():  # a block holding a visible key is visited
                assert start <= inner < end, (outer, inner)
            if full_start <= inner < full_end:  # a block visited unmasked is entirely visible
                assert tile.shape[1] == step and tile.all(), (outer, inner)
        if not rows.any():
            assert end == start, "a block that sees nothing visits nothing"
        if window[0] >= 0 and window[1] >= 0:  # a window visits O(window) blocks, not O(N)
            assert end - start <= window[0] + window[1] + outer_size + 2 * step


# --- bad input, dispatch and operator registration


@pytest.mark.parametrize("call, error, text", [
    (lambda q, k, v: torch.ops.fastattn.triton_fwd(q[0], k, v, None, 0.1, -1, -1), ValueError, "q must be a 4-D tensor"),
    (lambda q, k, v: torch.ops.fastattn.triton_fwd(q, k[:1], v[:1], None, 0.1, -1, -1), ValueError, "same batch size"),
    (lambda q, k, v: torch.ops.fastattn.triton_fwd(q[:, :3], k, v, None, 0.1, -1, -1), ValueError,
     "multiple of the number of key/value heads"),
    (lambda q, k, v: torch.ops.fastattn.triton_fwd(q, k, v, torch.zeros(2, 3, dtype=torch.bool), 0.1, -1, -1),
     ValueError, "key_padding_mask must have shape"),
    (lambda q, k, v: torch.ops.fastattn.triton_fwd(q, k, v, None, -0.1, -1, -1), ValueError, "scale must be a finite"),
    (lambda q, k, v: torch.ops.fastattn.triton_fwd(q, k, v, None, 0.1, -5, 0), ValueError, "must be >= 0, or -1"),
    (lambda q, k, v: torch.ops.fastattn.triton_fwd(q, k.double(), v, None, 0.1, -1, -1), TypeError,
     "k must have the dtype of q"),
    (lambda q, k, v: torch.ops.fastattn.triton_fwd(q.double(), k.double(), v.double(), None, 0.1, -1, -1),
     TypeError, "float16, bfloat16 or float32"),
    (lambda q, k, v: torch.ops.fastattn.triton_bwd(q, q, k, v, q, torch.zeros(2, 4, 15), None, 0.1, -1, -1),
     ValueError, "lse must have shape (2, 4, 16)"),
    (lambda q, k, v: torch.ops.fastattn.triton_bwd(q[..., :8], q, k, v, q, torch.zeros(2, 4, 16), None, 0.1, -1, -1),
     ValueError, "dout must have shape (2, 4, 16, 32)"),
])
def test_bad_input_raises_clear_error(call, error, text):
    q, k, v = qkv(2, 4, 2, 16, 16, 32)
    with pytest.raises(error) as info:
        call(q, k, v)
    assert text in str(info.value)


def test_explicit_triton_backend_rejects_float64():
    q, k, v = qkv(1, 2, 2, 8, 8, 16, dtype=torch.float64)
    with pytest.raises(BackendNotSupportedError, match="dtype float64 not supported"):
        fastattn.attention(q, k, v, backend=BACKEND)


def test_cpu_tensors_need_the_interpreter():
    """Without TRITON_INTERPRET the backend does not claim CPU tensors, and auto picks cpp there."""
    code = ("import torch, fastattn\n"
            "from fastattn.backends import BackendNotSupportedError, AttentionProblem, select_backend\n"
            "q = torch.randn(1, 2, 8, 16)\n"
            "assert select_backend(AttentionProblem.from_tensors(q, q, q, None, -1, -1)).name == 'cpp'\n"
            "try:\n    fastattn.attention(q, q, q, backend='triton')\nexcept BackendNotSupportedError as e:\n"
            "    assert \"device 'cpu' not supported\" in str(e), e\n    print('rejected')\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "rejected" in result.stdout, result.stderr[-2000:]


OPCHECK_CASES = {
    "causal_gqa": dict(window=(-1, 0), heads_kv=1),
    "window_padding_nq_ne_nk": dict(window=(3, 5), padding=True, seqlen_q=9),
    "bnhd_layout_bf16": dict(window=(-1, -1), layout="bnhd", dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_forward_and_backward(case):
    options = dict(OPCHECK_CASES[case])
    window = options.pop("window")
    padding = options.pop("padding", False)
    q, k, v = make_qkv(2, 4, options.pop("heads_kv", 2), options.pop("seqlen_q", 20), 20, 32, 24,
                       device=DEVICE, seed=7, **options)
    mask = random_padding_mask(2, 20, fraction=0.5, seed=1).to(DEVICE) if padding else None
    args = (q, k, v, mask, 0.2, *window)
    torch.library.opcheck(torch.ops.fastattn.triton_fwd.default, args)
    out, lse = torch.ops.fastattn.triton_fwd(*args)
    dout = torch.randn_like(out)
    torch.library.opcheck(torch.ops.fastattn.triton_bwd.default, (dout, q, k, v, out, lse, *args[3:]))


@pytest.mark.parametrize("kwargs", [dict(causal=True), dict(window=(4, 2), padding=True)], ids=["causal", "window_pad"])
def test_torch_compile_fullgraph_matches_eager(kwargs):
    kwargs = dict(kwargs)
    padding = random_padding_mask(2, 37, seed=2).to(DEVICE) if kwargs.pop("padding", False) else None
    q, k, v = qkv(2, 4, 2, 37, 37, 32, requires_grad=True, seed=3)
    dout = torch.randn(2, 4, 37, 32, device=DEVICE)

    def forward(q, k, v, mask):
        return fastattn.attention(q, k, v, key_padding_mask=mask, backend=BACKEND, **kwargs)

    torch._dynamo.reset()
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    eager_leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out_compiled = compiled(q, k, v, padding)
    out_eager = forward(*eager_leaves, padding)
    out_compiled.backward(dout)
    out_eager.backward(dout)
    assert torch.equal(out_compiled, out_eager)
    for compiled_leaf, eager_leaf in zip((q, k, v), eager_leaves):
        assert torch.equal(compiled_leaf.grad, eager_leaf.grad)
