"""The CUDA kernels' own code, run on the CPU by the emulation harness of csrc/cuda/emulation/, held
to the float64 oracle with the same check as every backend.

The harness compiles csrc/cuda/attention_*.cu as C++ (FASTATTN_CUDA_EMULATION) with CPU stand-ins
for the PTX of csrc/cuda/ptx.cuh (ldmatrix, mma.sync m16n8k16, cp.async, shuffles: the PTX ISA's
fragment layouts) and runs each CTA's threads as fibers. It exercises the kernels' indexing,
masking, pipelining order and barriers here, where no GPU exists; it proves nothing about speed,
and tests/test_cuda_kernels.py still runs the real thing on a GPU. The emulated ops are swapped in
as the "cpp" backend for CPU tensors (fp16, bf16, fp32), so the checks go through
fastattn.attention and autograd exactly as on a GPU.

Emulation is slow (every warp-collective operation is a fiber barrier), so the grid here is the
DESIGN §5 edge-case grid at small sizes: lengths that are not tile multiples, Nq != Nk, every
head-dim bucket and odd dims, windows (0,0) (1,0) (3,7) (Nk-1,0) and wider, GQA, padding, fully
masked rows, non-contiguous inputs (the element-wise copy path) and dout.
"""

import glob
import os
import platform
import shutil
import subprocess

import pytest
import torch

from fastattn import backends
from fastattn.backends.base import Backend
from fastattn.testing import make_qkv, random_padding_mask

from oracle_checks import FULLY_MASKED_CASES, check_against_oracle, check_fully_masked_rows
from test_cpu_kernels import window_kwargs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
EMULATION = os.path.join(CSRC, "cuda", "emulation")
HALF_DTYPES = [torch.float16, torch.bfloat16]


def _cuda_include_dir():
    """A CUDA toolkit's include folder (cuda_fp16.h and the runtime's crt/ headers), or None."""
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    nvcc = shutil.which("nvcc")
    if nvcc:
        dryrun = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True)
        homes += [line.split("=", 1)[1].strip() for line in dryrun.stderr.splitlines() if line.startswith("#$ TOP=")]
    for home in filter(None, homes):
        include = os.path.join(home, "include")
        if os.path.isfile(os.path.join(include, "cuda_fp16.h")) and \
                os.path.isfile(os.path.join(include, "crt", "host_defines.h")):
            return include
    return None


class EmulatedCudaBackend(Backend):
    """The CUDA ops' code on emulated threads, serving CPU tensors in place of the "cpp" backend."""

    name = "cpp"
    description = "fastattn's CUDA kernels under the CPU emulation harness (tests only)"
    dtypes = {"cpu": (torch.float16, torch.bfloat16, torch.float32)}

    def __init__(self, module):
        self.module = module

    def forward(self, q, k, v, key_padding_mask, scale, window_left, window_right):
        return self.module.fwd(q, k, v, key_padding_mask, scale, window_left, window_right)

    def backward(self, dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right):
        return self.module.bwd(dout, q, k, v, out, lse, key_padding_mask, scale, window_left, window_right)


@pytest.fixture(scope="session")
def emulated_backend(tmp_path_factory):
    if torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("fastattn::fwd", "CUDA"):
        pytest.skip("a GPU is present: tests/test_cuda_kernels.py runs the real kernels (and gpu_check.sh's "
                    "time budget has no room for the emulation)")
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the CUDA emulation harness switches fibers with x86-64 assembly")
    include = _cuda_include_dir()
    if include is None:
        pytest.skip("no CUDA toolkit headers (cuda_fp16.h) found for the emulation harness")
    from torch.utils import cpp_extension
    sources = [os.path.join(EMULATION, name) for name in
               ("emulator.cpp", "kernels_fwd.cpp", "kernels_bwd.cpp", "kernels_fp32.cpp")]
    module = cpp_extension.load(
        name="fastattn_cuda_emulation", sources=sources + [os.path.join(CSRC, "attention_api.cpp")],
        extra_include_paths=[CSRC, include], extra_cflags=["-O2", "-DFASTATTN_CUDA_EMULATION"],
        # Its launch_* functions share names with fastattn._C's CUDA ones: bind its own.
        extra_ldflags=["-Wl,-Bsymbolic"], build_directory=str(tmp_path_factory.mktemp("cuda_emulation")),
        verbose=False)
    return EmulatedCudaBackend(module)


@pytest.fixture(autouse=True)
def cuda_code_as_cpp(monkeypatch, emulated_backend):
    monkeypatch.setitem(backends._instances, "cpp", emulated_backend)


# Each case meets a different head-dim bucket (and D that is not one: padded inside the kernel).
GRID = [
    # (Nq, Nk, D, window)
    (17, 17, 64, "full"),
    (113, 113, 40, "causal"),
    (17, 113, 80, (0, 0)),
    (113, 17, 128, (1, 0)),
    (70, 150, 16, (3, 7)),
    (150, 70, 96, "nk-1,0"),
    (1, 1, 64, "full"),
    (1, 150, 256, "causal"),
    (65, 65, 200, "wider"),
]


@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("seqlen_q, seqlen_k, head_dim, window", GRID, ids=str)
def test_grid(seqlen_q, seqlen_k, head_dim, window, dtype):
    q, k, v = make_qkv(1, 2, 1, seqlen_q, seqlen_k, head_dim, dtype=dtype, seed=seqlen_q + head_dim)
    check_against_oracle(q, k, v, backend="cpp", **window_kwargs(window, seqlen_k))


@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32], ids=str)
def test_many_tiles_per_block(dtype):
    """Long rows: the double-buffered pipelines' steady state, key blocks skipped by the window."""
    q, k, v = make_qkv(1, 2, 1, 700, 650, 64, dtype=dtype, seed=9)
    check_against_oracle(q, k, v, backend="cpp", window=(150, 40))


@pytest.mark.parametrize("head_dim, head_dim_v", [(40, 24), (24, 130), (1, 3), (256, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_head_dims_q_and_v_differ(head_dim, head_dim_v, dtype):
    """D != Dv, odd dims (element-wise copies), and Dv past D's bucket."""
    q, k, v = make_qkv(1, 2, 2, 33, 47, head_dim, head_dim_v, dtype=dtype, seed=head_dim)
    check_against_oracle(q, k, v, backend="cpp", causal=True)


@pytest.mark.parametrize("heads_kv", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_gqa_mqa(heads_kv, dtype):
    q, k, v = make_qkv(2, 6, heads_kv, 40, 90, 32, dtype=dtype, seed=heads_kv)
    check_against_oracle(q, k, v, backend="cpp", window=(20, 5))


@pytest.mark.parametrize("window", ["full", (3, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_key_padding(window, dtype):
    q, k, v = make_qkv(3, 2, 1, 50, 90, 64, dtype=dtype, seed=7)
    padding = random_padding_mask(3, 90, fraction=0.6, fully_padded_batch=True, seed=4)
    check_against_oracle(q, k, v, backend="cpp", key_padding_mask=padding, **window_kwargs(window, 90))


@pytest.mark.parametrize("case", FULLY_MASKED_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_fully_masked_rows(case, dtype):
    check_fully_masked_rows(case, dtype, "cpu", "cpp")


@pytest.mark.parametrize("layout", ["bnhd", "strided"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_non_contiguous_inputs_and_dout(layout, dtype):
    """bnhd views keep 16-byte rows (cp.async path); strided views do not (element-wise path)."""
    q, k, v = make_qkv(2, 2, 1, 37, 45, 48, layout=layout, dtype=dtype, seed=11)
    dout = torch.randn(2, 37, 2, 96).to(dtype).transpose(1, 2)[..., ::2]
    check_against_oracle(q, k, v, backend="cpp", dout=dout, window=(3, 7))


@pytest.mark.parametrize("head_dim", [3, 40, 128, 200])
@pytest.mark.parametrize("dtype", HALF_DTYPES + [torch.float32], ids=str)
def test_single_key_rows_give_exactly_zero_dq(head_dim, dtype):
    """A row that sees one key has out = v and dq = 0 exactly; with every row so (Nk = 1, or window
    (0, 0) with Nq = Nk) the oracle's bound is 0, so delta must be summed exactly as dP is."""
    for seqlen_q, seqlen_k, kwargs in ((5, 1, {}), (77, 77, {"window": (0, 0)})):
        q, k, v = make_qkv(2, 2, 1, seqlen_q, seqlen_k, head_dim, dtype=dtype, seed=head_dim)
        _, _, grads = check_against_oracle(q, k, v, backend="cpp", **kwargs)
        assert (grads[0] == 0).all()


def test_scale_and_determinism():
    q, k, v = make_qkv(1, 2, 1, 33, 47, 64, dtype=torch.bfloat16, seed=6)
    first = check_against_oracle(q, k, v, backend="cpp", scale=0.37, causal=True, dout=torch.ones(1, 2, 33, 64,
                                                                                                   dtype=torch.bfloat16))
    second = check_against_oracle(q, k, v, backend="cpp", scale=0.37, causal=True, dout=torch.ones(1, 2, 33, 64,
                                                                                                    dtype=torch.bfloat16))
    assert torch.equal(first[0], second[0]) and all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


def test_float64_is_a_type_error(emulated_backend):
    q, k, v = make_qkv(1, 1, 1, 4, 4, 8, dtype=torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        emulated_backend.module.fwd(q, k, v, None, 0.5, -1, -1)


def test_bad_input_has_the_python_message(emulated_backend):
    q, k, v = make_qkv(1, 4, 3, 4, 4, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        emulated_backend.module.fwd(q, k, v, None, 0.5, -1, -1)
