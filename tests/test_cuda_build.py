"""The CUDA extension as built on this (CPU-only) machine: compiled, linked, importable, registered
for the CUDA dispatch key, listed by fastattn.info, and its kernels' resource report (no local
memory / spills; tensor-core instructions in every fp16/bf16 kernel for sm_80 and sm_90).

Runs without a GPU: nothing here launches a kernel (tests/test_cuda_kernels.py does, on a GPU;
tests/test_cuda_emulated.py runs the kernels' code on the CPU).
"""

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from fastattn import _ops
from fastattn import info as fastattn_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import cuda_resources  # noqa: E402

_built_with_cuda = _ops.load_cpp_library() and bool(importlib.import_module("fastattn._C").with_cuda)
needs_cuda_build = pytest.mark.skipif(
    not _built_with_cuda,
    reason="fastattn._C was built without CUDA (torch without CUDA, no nvcc, or FASTATTN_BUILD_CUDA=0)")

HALF_KERNELS = ("attention_forward_kernel", "attention_backward_prepass_kernel", "attention_backward_dq_kernel",
                "attention_backward_dkdv_kernel")
FP32_KERNELS = ("attention_forward_fp32_kernel", "attention_backward_dq_fp32_kernel",
                "attention_backward_dkdv_fp32_kernel")
ARCHS = ("sm_80", "sm_90")
BUCKETS = (64, 128, 256)


@needs_cuda_build
def test_cuda_kernels_registered_for_both_ops():
    for op in ("fastattn::fwd", "fastattn::bwd"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), op
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU"), op


@needs_cuda_build
def test_info_lists_cpp_for_cuda_as_compiled():
    info = fastattn_info.collect()
    cpp = next(b for b in info["backends"] if b["name"] == "cpp")
    assert cpp["available"]
    assert cpp["dtypes"]["cuda"] == ["float16", "bfloat16", "float32"]
    assert cpp["build"]["cuda_compiled"] is True
    # And the command-line report, as CI prints it.
    report = subprocess.run([sys.executable, "-m", "fastattn.info"], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": ROOT}).stdout
    assert "cuda:     float16, bfloat16, float32" in report
    assert "cuda_compiled: True" in report


@pytest.fixture(scope="module")
def kernels():
    cuobjdump = cuda_resources.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("cuobjdump not found (neither the CUDA toolkit's nor triton's bundled copy)")
    library = importlib.util.find_spec("fastattn._C").origin
    return cuda_resources.read_resources(library, cuobjdump)


@needs_cuda_build
def test_every_kernel_is_compiled_for_sm80_and_sm90(kernels):
    present = {(k.kernel, k.dtype, k.head_dim, k.arch) for k in kernels}
    expected = {(name, dtype, hd, arch) for name in HALF_KERNELS for dtype in ("fp16", "bf16")
                for hd in BUCKETS for arch in ARCHS}
    expected |= {(name, "fp32", hd, arch) for name in FP32_KERNELS for hd in BUCKETS for arch in ARCHS}
    expected |= {("attention_backward_prepass_fp32_kernel", "fp32", None, arch) for arch in ARCHS}
    assert expected <= present, sorted(expected - present)
    assert {k.arch for k in kernels} == set(ARCHS)


@needs_cuda_build
def test_no_local_memory_and_tensor_cores_everywhere(kernels):
    assert cuda_resources.problems(kernels) == []
    half = [k for k in kernels if k.tensor_core]
    assert len(half) == len(HALF_KERNELS) * 2 * len(BUCKETS) * len(ARCHS)
    assert all(k.counts["HMMA"] > 0 for k in half)
    # The fp32 path is exact fp32 on the CUDA cores: no tensor-core (TF32) instruction.
    assert all(k.counts["HMMA"] == 0 for k in kernels if k.dtype == "fp32")


def test_problems_detects_spills_and_missing_tensor_cores():
    """The checker itself can fail: a kernel with local memory or without HMMA is reported."""
    spilling = cuda_resources.KernelResources(arch="sm_80", mangled="x", kernel="attention_forward_kernel",
                                              dtype="bf16", head_dim=128, local=16)
    spilling.counts["HMMA"] = 4
    no_tensor_cores = cuda_resources.KernelResources(arch="sm_90", mangled="y", kernel="attention_forward_kernel",
                                                     dtype="fp16", head_dim=64)
    found = cuda_resources.problems([spilling, no_tensor_cores])
    assert len(found) == 2 and "local memory" in found[0] and "no HMMA" in found[1]
