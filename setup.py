"""Build script for fastattn's compiled kernels (``fastattn._C``).

The C++ CPU kernels are always built. The CUDA kernels are built when torch was built with CUDA and
``nvcc`` is found, unless ``FASTATTN_BUILD_CUDA=0``; ``FASTATTN_BUILD_CUDA=1`` makes a missing CUDA
toolchain an error instead of a silent CPU-only build.

Environment variables:
    FASTATTN_BUILD_CUDA   unset (auto), 0 or 1.
    FASTATTN_CUDA_ARCHS   compute capabilities to build for, default "80;90".
    FASTATTN_CPU_ARCH     value for -march, default "native" (SIMD for the build machine); "none"
                          gives the portable build (at::vec's scalar fallback, or the compiler's
                          default ISA).
    MAX_JOBS              parallel compile jobs; default derived from free memory and core count.
    CUDA_HOME             the CUDA toolkit; default: the folder holding the real ``nvcc``.

Install for development with ``pip install -e ".[test]" --no-build-isolation`` (build isolation
would download and install a second copy of torch).
"""

import glob
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    """Returns True, False or None (unset/auto) for a 0/1 environment variable."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SystemExit(f"{name} must be 0, 1 or unset, got {value!r}")


def _find_cuda_home():
    """The CUDA toolkit folder. `nvcc` on PATH may be a wrapper script, so resolve it by asking
    nvcc itself where its binaries live rather than trusting the path of the wrapper."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    candidates = []
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        try:
            # `--dryrun --version` prints no paths; a dry-run preprocess of an empty file prints
            # `#$ TOP=<toolkit>/bin/..`, where the real nvcc lives.
            out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True,
                                 text=True).stderr
            for line in out.splitlines():
                if line.startswith("#$ TOP="):
                    candidates.insert(0, os.path.normpath(line.split("=", 1)[1].strip()))
        except OSError:
            pass
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for folder in candidates:
        # A toolkit has the compiler and the runtime headers (a wrapper's folder has only the first).
        if os.path.isfile(os.path.join(folder, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(folder, "include", "cuda_runtime_api.h")):
            return folder
    return None


def _pip_cuda_include_dirs():
    """Headers shipped by the pip `nvidia-*` packages that a pip-installed CUDA torch depends on
    (cusparse.h, cublas_v2.h, ...). torch's own CUDA headers include them, and a bare toolkit may
    not carry them, so they are searched wherever torch's dependencies were installed."""
    dirs = []
    for entry in sys.path:
        nvidia = os.path.join(entry, "nvidia")
        if os.path.isdir(nvidia):
            dirs += sorted(glob.glob(os.path.join(nvidia, "*", "include")))
            dirs += sorted(glob.glob(os.path.join(nvidia, "cu*", "include")))
    seen, unique = set(), []
    for d in dirs:
        if d not in seen and os.path.isdir(d):
            seen.add(d)
            unique.append(d)
    return unique


def _default_max_jobs():
    """One nvcc job can take ~3 GiB at -O3 with several architectures; keep headroom."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        free_gib = int(fields["MemAvailable"].split()[0]) / (1024 * 1024)
    except (OSError, KeyError, ValueError):
        free_gib = 8
    return str(max(1, min(os.cpu_count() or 1, int(free_gib // 3))))


def _compiler_accepts(flag):
    """True when the C++ compiler accepts `flag` (checked by compiling an empty file)."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "probe.cpp")
        with open(src, "w") as f:
            f.write("int main() { return 0; }\n")
        result = subprocess.run([cxx, flag, "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                capture_output=True)
    return result.returncode == 0


def _cpu_arch_flags():
    arch = os.environ.get("FASTATTN_CPU_ARCH", "native").strip()
    if arch in ("", "none"):
        return []
    flag = f"-march={arch}"
    if _compiler_accepts(flag):
        return [flag]
    print(f"fastattn: the compiler rejects {flag}; building the portable CPU kernels", file=sys.stderr)
    return []


def _extensions():
    import torch
    from torch.utils import cpp_extension

    want_cuda = _env_flag("FASTATTN_BUILD_CUDA")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    cuda_home = _find_cuda_home() if want_cuda is not False else None
    torch_has_cuda = torch.version.cuda is not None
    build_cuda = want_cuda is not False and torch_has_cuda and cuda_home is not None and bool(cuda_sources)
    if want_cuda and not build_cuda:
        raise SystemExit(
            "FASTATTN_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA toolkit={cuda_home!r}, "
            f"CUDA sources={cuda_sources}")

    cxx_flags = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas", "-Wno-maybe-uninitialized"] + _cpu_arch_flags()
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc")]
    define_macros = []
    link_args = ["-fopenmp"]

    if not build_cuda:
        return [cpp_extension.CppExtension(
            "fastattn._C", sources, include_dirs=include_dirs, define_macros=define_macros,
            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_args, py_limited_api=True)]

    # cpp_extension reads CUDA_HOME when it is imported, so both must agree on the toolkit.
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    archs = os.environ.get("FASTATTN_CUDA_ARCHS", "80;90").replace(",", ";").split(";")
    archs = [a.strip().replace(".", "") for a in archs if a.strip()]
    gencode = [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    # PTX of the newest one too, so that later GPUs (sm_100, sm_120) can JIT the kernels.
    gencode += [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"] if archs else []
    # No --use_fast_math: the tensor-core kernels call ex2.approx / rcp.approx explicitly where
    # they want them, and the fp32 kernels need IEEE exp2f/log2f to stay float32-accurate.
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                  "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
                  "-U__CUDA_NO_BFLOAT16_CONVERSIONS__", "-U__CUDA_NO_HALF2_OPERATORS__",
                  "--threads", "1"] + gencode
    sources += cuda_sources
    # The toolkit's own headers first: the pip folders (needed for cublas_v2.h, cusparse.h, ... that
    # torch's headers include) also carry partial copies of the runtime headers that would shadow
    # the toolkit's and fail (crt/host_defines.h missing).
    include_dirs += [os.path.join(cuda_home, "include")] + _pip_cuda_include_dirs()
    define_macros.append(("FASTATTN_WITH_CUDA", "1"))
    return [cpp_extension.CUDAExtension(
        "fastattn._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_args,
        py_limited_api=True)]


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension
    return {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


setup(
    packages=find_packages(include=["fastattn", "fastattn.*"]),
    ext_modules=_extensions(),
    cmdclass=_cmdclass(),
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
