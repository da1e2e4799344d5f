"""The C++ CPU kernels (backend="cpp") against the float64 oracle on DESIGN.md's edge-case grid."""

import os
import subprocess
import sys

import pytest
import torch

import fastattn
from fastattn import _ops, masks
from fastattn.testing import make_qkv, random_padding_mask

from oracle_checks import FULLY_MASKED_CASES, check_against_oracle, check_fully_masked_rows

BACKEND = "cpp"
HEAD_DIMS = [16, 40, 64, 80, 96, 128, 256]
SEQLENS = [(1, 1), (17, 17), (113, 113), (17, 113), (113, 17), (1, 1025), (1025, 1025)]
WINDOWS = ["full", "causal", (0, 0), (1, 0), (3, 7), "nk-1,0", "wider"]


def window_kwargs(window, seqlen_k):
    """The attention() keywords for a named window of the grid."""
    if window == "full":
        return {}
    if window == "causal":
        return {"causal": True}
    if window == "nk-1,0":
        return {"window": (seqlen_k - 1, 0)}
    if window == "wider":  # wider than the sequence on both sides: same as full attention
        return {"window": (2 * seqlen_k + 5, 3 * seqlen_k + 1)}
    return {"window": window}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("window", WINDOWS, ids=str)
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_grid(seqlens, window, dtype):
    seqlen_q, seqlen_k = seqlens
    # Cycle the head dims through the grid so that each meets every length and window.
    head_dim = HEAD_DIMS[(SEQLENS.index(seqlens) + WINDOWS.index(window)) % len(HEAD_DIMS)]
    batch, heads = (1, 2) if seqlen_q * seqlen_k > 100_000 else (2, 4)
    q, k, v = make_qkv(batch, heads, 2, seqlen_q, seqlen_k, head_dim, dtype=dtype, seed=seqlen_q + head_dim)
    check_against_oracle(q, k, v, backend=BACKEND, **window_kwargs(window, seqlen_k))


@pytest.mark.parametrize("head_dim, head_dim_v", [(d, d) for d in HEAD_DIMS] + [(40, 24), (80, 128), (1, 3), (256, 1)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)  # bf16: odd dims pack apart on pair products
def test_head_dims(head_dim, head_dim_v, causal, dtype):
    q, k, v = make_qkv(1, 2, 2, 113, 129, head_dim, head_dim_v, dtype=dtype, seed=head_dim)
    check_against_oracle(q, k, v, backend=BACKEND, causal=causal)


@pytest.mark.parametrize("heads_kv", [1, 2, 3, 6])
@pytest.mark.parametrize("window", [None, (5, 2)])
def test_gqa_mqa(heads_kv, window):
    q, k, v = make_qkv(2, 6, heads_kv, 70, 90, 32, seed=heads_kv)
    check_against_oracle(q, k, v, backend=BACKEND, window=window)


@pytest.mark.parametrize("seqlens", [(113, 113), (17, 200), (200, 17)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("window", ["full", "causal", (3, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_key_padding(seqlens, window, dtype):
    seqlen_q, seqlen_k = seqlens
    q, k, v = make_qkv(3, 4, 2, seqlen_q, seqlen_k, 64, dtype=dtype, seed=seqlen_k)
    padding = random_padding_mask(3, seqlen_k, fraction=0.6, fully_padded_batch=True, seed=seqlen_q)
    check_against_oracle(q, k, v, backend=BACKEND, key_padding_mask=padding, **window_kwargs(window, seqlen_k))


@pytest.mark.parametrize("seqlens", [(320, 320), (150, 150), (300, 450), (450, 300)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("window", ["full", "causal", (3, 7), (70, 0)], ids=str)
@pytest.mark.parametrize("padded", [False, True], ids=["", "padded"])
def test_query_groups(seqlens, window, padded):
    """Enough (batch, head) pairs that the forward walks its query blocks in groups: of 4 (320,
    300 and 450 rows; the last group of 320 and 300 is a single block) or of 2 (150 rows), so that
    the members of a group meet key blocks that reach only some of their rows, or none
    (QueryGroups, csrc/cpu/attention_tiles.h); GQA and padding on top."""
    seqlen_q, seqlen_k = seqlens
    q, k, v = make_qkv(2, 16, 4, seqlen_q, seqlen_k, 32, seed=seqlen_q + seqlen_k)
    padding = random_padding_mask(2, seqlen_k, fraction=0.3, seed=seqlen_k) if padded else None
    check_against_oracle(q, k, v, backend=BACKEND, key_padding_mask=padding, **window_kwargs(window, seqlen_k))


@pytest.mark.parametrize("seqlens, window, padded", [
    ((1100, 1100), (40, 40), False),
    ((1100, 1100), (3, 7), True),
    ((1100, 1100), (600, 600), False),
    ((1000, 1300), (100, 0), False),
    ((1000, 1300), (0, 100), True),
    ((1300, 1000), (100, 0), True),
    ((1300, 1000), (0, 100), False),
], ids=str)
def test_backward_key_ring(seqlens, window, padded):
    """8 (batch, kv head) pairs cut the query rows into 2 chunks of 576 or 704 rows each: with a
    window narrower than a chunk, the backward sums dk / dv in a ring of key blocks, writes the
    keys only one chunk reaches straight to dk / dv and leaves the keys of both chunks to the
    reduction (ChunkAccumulator, csrc/cpu/attention_bwd.cpp); (600, 600) reaches the whole
    chunk, which then sums in place. GQA (2 query heads per kv head) runs inside the ring. The
    gradients are bitwise the same on one thread, which interleaves the chunks differently."""
    seqlen_q, seqlen_k = seqlens
    q, k, v = make_qkv(1, 16, 8, seqlen_q, seqlen_k, 32, seed=seqlen_q + window[0])
    padding = random_padding_mask(1, seqlen_k, fraction=0.3, seed=seqlen_k) if padded else None
    dout = torch.randn(1, 16, seqlen_q, 32)
    *_, grads = check_against_oracle(q, k, v, backend=BACKEND, key_padding_mask=padding, window=window, dout=dout)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        fastattn.attention(*leaves, backend=BACKEND, key_padding_mask=padding, window=window).backward(dout)
    finally:
        torch.set_num_threads(threads)
    for name, grad, single_thread in zip("qkv", grads, leaves):
        assert torch.equal(grad, single_thread.grad), f"d{name} depends on the thread count"


@pytest.mark.parametrize("backend", [BACKEND, "reference"])
@pytest.mark.parametrize("window", [None, (16, 16)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_nan_inputs_propagate(dtype, window, backend):
    """A NaN in q reaches exactly its own output row, a NaN in k exactly the rows that see that
    key, as with scaled_dot_product_attention: never turned into a finite answer (the kernels'
    exp2 zeroes tiny and masked probabilities and must not zero NaN ones) nor spread further."""
    q, k, v = make_qkv(1, 2, 2, 200, 200, 64, dtype=dtype, seed=7)
    q[0, 1, 70, 5] = float("nan")
    nan_rows = fastattn.attention(q, k, v, window=window, backend=backend).isnan().any(-1)
    expected = torch.zeros(1, 2, 200, dtype=torch.bool)
    expected[0, 1, 70] = True
    assert torch.equal(nan_rows, expected)

    q[0, 1, 70, 5] = 0.0
    k[0, 0, 100, 3] = float("nan")
    nan_rows = fastattn.attention(q, k, v, window=window, backend=backend).isnan().any(-1)
    expected = torch.zeros(1, 2, 200, dtype=torch.bool)
    expected[0, 0] = masks.materialize(200, 200, window)[:, 100]
    assert torch.equal(nan_rows, expected)


@pytest.mark.parametrize("slope", [-0.2, 0.02, 0.2, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_scores_rising_through_the_key_blocks(slope, dtype):
    """Scores that rise (or fall) key by key, ~1.0 * slope in exp2 units per key, so that each
    query's largest score moves through the key blocks by less than, about and far more than
    the forward's lagging maximum allows: 2^8 before it moves (online_softmax_shift), 2^16 before
    a block tried without the max pass is recomputed (online_softmax_step_at_lagging_max); at
    slope 3 the scores reach ~1500, which overflow unless every block that raises the max
    rescales."""
    q, k, v = make_qkv(1, 2, 2, 130, 700, 32, dtype=dtype, seed=31)
    q[..., 0] = 4.0
    k[..., 0] = slope * torch.arange(700, dtype=dtype)
    check_against_oracle(q, k, v, backend=BACKEND)
    check_against_oracle(q, k, v, backend=BACKEND, window=(200, 50))


@pytest.mark.parametrize("height", [200.0, 2000.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_one_key_far_above_the_lagging_max(height, dtype):
    """One key, in a later key block, whose score is ~200 or ~2000 above every other (exp2 units:
    past float's and double's exponent range), among keys that all score below the lagging max:
    the block's try without the max pass must see its P overflow and be rejected (an exp2 that
    wraps its exponent field there, rather than saturating to inf, hid it and dropped the key).
    Forward only: the backward recomputes P from lse, which at |lse| ~ 140-1400 carries an
    absolute rounding of ~ulp(lse), so dv there is ~40x PyTorch's dense error (as before the
    lagging max; docs/decisions.md, "lse")."""
    q, k, v = make_qkv(1, 2, 2, 70, 600, 32, dtype=dtype, seed=32)
    q[..., 0] = 4.0
    k[..., 0] = 0.0
    k[:, :, 450, 0] = height / 4.0 / 1.4426950408889634 * 32**0.5
    check_against_oracle(q, k, v, backend=BACKEND, grads=False)


@pytest.mark.parametrize("window", ["full", "causal"], ids=str)
def test_long_keys_copied_in_passes(window):
    """bf16 with 16.5k keys of head dim 256: one kv head's copies exceed the bf16 pair kernels'
    16 MiB budget (kv_heads_per_pass; AMX or AVX512-BF16), so forward and backward copy and attend
    one kv head per pass (6 passes here, across both batches and GQA groups); other CPUs run the
    same test without passes."""
    q, k, v = make_qkv(2, 6, 3, 17, 16500, 256, dtype=torch.bfloat16, seed=12)
    check_against_oracle(q, k, v, backend=BACKEND, **window_kwargs(window, 16500))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_buffers_kept_between_calls_are_rewritten(dtype):
    """The CPU kernels keep some buffers from call to call (reusable_storage: the bf16 pair forward's
    k / v copies, the backward's dk / dv partial sums). A first call fills them with NaN (NaN
    inputs and dout, head dim 64, 64 queries, 300 keys); the next, smaller one (head dim 40, 50 queries, 77 keys) must write every element it reads (padding
    columns and rows, partial sums zeroed), or those NaN reach its output or gradients."""
    q, k, v = make_qkv(1, 2, 2, 64, 300, 64, dtype=dtype, seed=21)
    nan_inputs = [t.detach().fill_(float("nan")).requires_grad_() for t in (q, k, v)]
    out = fastattn.attention(*nan_inputs, backend=BACKEND)
    out.backward(torch.full_like(out, float("nan")))
    q, k, v = make_qkv(1, 2, 2, 50, 77, 40, dtype=dtype, seed=22)
    check_against_oracle(q, k, v, backend=BACKEND)


@pytest.mark.parametrize("case", FULLY_MASKED_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_fully_masked_rows(case, dtype):
    check_fully_masked_rows(case, dtype, "cpu", BACKEND)


@pytest.mark.parametrize("layout", ["bnhd", "strided"])
@pytest.mark.parametrize("window", ["full", (3, 7)], ids=str)
def test_non_contiguous_inputs_and_dout(layout, window):
    q, k, v = make_qkv(2, 4, 2, 77, 77, 48, layout=layout, seed=11)
    assert not q.is_contiguous()
    # dout as a strided view too: every other element of a wider tensor.
    dout = torch.randn(2, 77, 4, 96).transpose(1, 2)[..., ::2]
    assert dout.stride(-1) == 2
    check_against_oracle(q, k, v, backend=BACKEND, dout=dout, **window_kwargs(window, 77))


def test_float16():
    q, k, v = make_qkv(1, 2, 2, 65, 65, 64, dtype=torch.float16, seed=5)
    check_against_oracle(q, k, v, backend=BACKEND, window=(8, 8))


def test_scale_argument():
    q, k, v = make_qkv(1, 2, 1, 33, 47, 32, seed=6)
    check_against_oracle(q, k, v, backend=BACKEND, scale=0.37, causal=True)


# The bf16 product paths, slowest first: FASTATTN_CPU_BF16_PRODUCTS value -> cpu_bf16_products.
BF16_PRODUCT_PATHS = {"fp32": "fp32 FMA", "avx512-bf16": "AVX512-BF16", "amx": "AMX"}
# This file's bf16 tests: the dtype id names bf16, and the long-keys test is bf16 only.
BF16_TESTS = "(bfloat16 or long_keys) and not product_path"


def _run_python(args, cap):
    env = {**os.environ, _ops.BF16_PRODUCTS_VARIABLE: cap}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("cap", ["fp32", "avx512-bf16"])
def test_bf16_tests_on_a_slower_product_path(cap):
    """The bf16 kernels take the fastest product path this CPU has (AMX, AVX512-BF16 or fp32 FMA
    on converted values), so the tests above check only that one. This runs them again in a process
    capped at each slower path the CPU also has (an AMX CPU runs all three, a Zen 4 two), and
    first checks that the cap took effect."""
    paths = list(BF16_PRODUCT_PATHS)
    own_path = paths[list(BF16_PRODUCT_PATHS.values()).index(fastattn._C.cpu_bf16_products)]
    if paths.index(cap) >= paths.index(own_path):
        pytest.skip(f"{BF16_PRODUCT_PATHS[cap]} is not slower than this CPU's own path "
                    f"({fastattn._C.cpu_bf16_products}), which the tests above run")
    reported = _run_python(["-c", "import fastattn; print(fastattn._C.cpu_bf16_products)"], cap)
    assert reported.returncode == 0, reported.stderr
    assert reported.stdout.strip() == BF16_PRODUCT_PATHS[cap]
    tests = _run_python(["-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                         "-k", BF16_TESTS], cap)
    assert tests.returncode == 0, tests.stdout[-6000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout


# The tests run again on poisoned workspaces: every shape class of the grid (lengths not whole
# blocks, partial query groups, padding head dims, strided rows, key padding, windows, GQA).
POISONED_TESTS = ("head_dims or query_groups or key_padding or non_contiguous or fully_masked or gqa "
                  "or backward_key_ring or (grid and (17x113 or 113x17 or 1x1025))")


def test_workspaces_are_written_before_they_are_read():
    """The kernels' workspaces start uninitialized (UninitializedBuffer), so every element that a
    call reads must be one it wrote. Fresh memory is mostly zero, which would hide a read of an
    unwritten accumulator (it is multiplied by a zero rescale first); this runs the oracle tests
    above in a process whose such storage starts as NaN (FASTATTN_CPU_POISON_WORKSPACES=1)."""
    env = {**os.environ, "FASTATTN_CPU_POISON_WORKSPACES": "1"}
    tests = subprocess.run([sys.executable, "-m", "pytest", os.path.abspath(__file__), "-q", "-p", "no:cacheprovider",
                            "-k", POISONED_TESTS], env=env, capture_output=True, text=True,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert tests.returncode == 0, tests.stdout[-6000:] + tests.stderr[-2000:]
    assert " passed" in tests.stdout


def test_unknown_bf16_product_path_is_refused():
    result = _run_python(["-c", "import fastattn"], "avx512")
    assert result.returncode != 0
    assert "ValueError" in result.stderr and "FASTATTN_CPU_BF16_PRODUCTS='avx512'" in result.stderr
