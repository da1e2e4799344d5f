"""Resource report of fastattn's compiled CUDA kernels, read from the built library with cuobjdump.

For every kernel and architecture in ``fastattn/_C*.so``: registers, stack frame and local memory
(``cuobjdump --dump-resource-usage``), local-memory instructions (``LDL``/``STL``: spills) and
tensor-core instructions (``HMMA``/``HGMMA``) counted in the SASS (``cuobjdump -sass``). Shared
memory is dynamic (sized per launch, see docs/cuda.md), so the binary reports 0 static bytes.

    python benchmarks/cuda_resources.py [--library PATH] [--check]

``--check`` exits with status 1 when a kernel uses local memory or a fp16/bf16 kernel has no
tensor-core instruction on some architecture. tests/test_cuda_build.py asserts the same.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

TYPE_CODES = {"6__half": "fp16", "13__nv_bfloat16": "bf16", "f": "fp32"}
SASS_OPCODES = ("HMMA", "HGMMA", "LDL", "STL")


@dataclasses.dataclass
class KernelResources:
    arch: str          # "sm_80"
    mangled: str
    kernel: str        # "attention_forward_kernel"
    dtype: str         # fp16 / bf16 / fp32
    head_dim: Optional[int]
    registers: int = 0
    stack: int = 0
    local: int = 0
    counts: Dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(SASS_OPCODES, 0))

    @property
    def tensor_core(self) -> bool:
        """Whether this kernel is meant to run on tensor cores (fp16 / bf16 attention kernels)."""
        return self.dtype in ("fp16", "bf16") and self.kernel.startswith("attention_")

    @property
    def spills(self) -> bool:
        return self.stack > 0 or self.local > 0 or self.counts["LDL"] > 0 or self.counts["STL"] > 0


def find_library() -> str:
    spec = importlib.util.find_spec("fastattn._C")
    if spec is not None and spec.origin:
        return spec.origin
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    found = glob.glob(os.path.join(root, "fastattn", "_C*.so"))
    if not found:
        raise FileNotFoundError("fastattn/_C*.so not found: build it with `python setup.py build_ext --inplace`")
    return found[0]


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from PATH, the CUDA toolkit, or the copy bundled with Triton's NVIDIA backend."""
    candidates = [shutil.which("cuobjdump")]
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))):
        if home:
            candidates.append(os.path.join(home, "bin", "cuobjdump"))
    triton_spec = importlib.util.find_spec("triton")
    if triton_spec is not None and triton_spec.submodule_search_locations:
        for location in triton_spec.submodule_search_locations:
            candidates.append(os.path.join(location, "backends", "nvidia", "bin", "cuobjdump"))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def describe(mangled: str) -> Tuple[str, str, Optional[int]]:
    """(kernel name, dtype, head-dim bucket) of a mangled fastattn kernel name:
    _ZN <length><name>... then, for a template, I <arguments> E."""
    names, position = [], 3 if mangled.startswith("_ZN") else len(mangled)
    while position < len(mangled) and mangled[position].isdigit():
        digits = re.match(r"\d+", mangled[position:]).group()
        start = position + len(digits)
        names.append(mangled[start:start + int(digits)])
        position = start + int(digits)
    if not names:
        return mangled, "?", None
    kernel, args = names[-1], mangled[position + 1:] if mangled[position:position + 1] == "I" else ""
    head_dim = re.match(r"(?:6__half|13__nv_bfloat16)?Li(\d+)E", args)
    dtype = "fp32" if "fp32" in kernel else next((name for code, name in TYPE_CODES.items() if args.startswith(code)), "?")
    return kernel, dtype, int(head_dim.group(1)) if head_dim else None


def _run(cuobjdump: str, *args: str) -> str:
    return subprocess.run([cuobjdump, *args], check=True, capture_output=True, text=True).stdout


def read_resources(library: str, cuobjdump: str) -> List[KernelResources]:
    kernels: Dict[Tuple[str, str], KernelResources] = {}
    arch = "?"
    function = None
    for line in _run(cuobjdump, "--dump-resource-usage", library).splitlines():
        line = line.strip()
        if line.startswith("arch = "):
            arch = line.split("=", 1)[1].strip()
        elif line.startswith("Function ") and line.endswith(":"):
            function = line[len("Function "):-1]
        elif line.startswith("REG:") and function is not None:
            fields = dict(item.split(":", 1) for item in line.split())
            kernel, dtype, head_dim = describe(function)
            kernels[(arch, function)] = KernelResources(
                arch=arch, mangled=function, kernel=kernel, dtype=dtype, head_dim=head_dim,
                registers=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]))
            function = None

    arch = "?"
    current = None
    opcode = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
    for line in _run(cuobjdump, "-sass", library).splitlines():
        stripped = line.strip()
        if stripped.startswith("code for sm_"):
            arch = stripped.split()[-1]
        elif stripped.startswith("Function : "):
            current = kernels.get((arch, stripped[len("Function : "):]))
        elif current is not None:
            match = opcode.search(line)
            if match and match.group(1) in current.counts:
                current.counts[match.group(1)] += 1
    return sorted(kernels.values(), key=lambda k: (k.kernel, k.dtype, k.head_dim or 0, k.arch))


def problems(kernels: List[KernelResources]) -> List[str]:
    """Every violation of the rules: no local memory (spills), tensor-core instructions in each
    fp16/bf16 attention kernel on every architecture."""
    found = []
    for k in kernels:
        label = f"{k.kernel}<{k.dtype}, {k.head_dim}> {k.arch}"
        if k.spills:
            found.append(f"{label}: local memory (stack {k.stack}, local {k.local}, "
                         f"LDL {k.counts['LDL']}, STL {k.counts['STL']})")
        if k.tensor_core and k.counts["HMMA"] + k.counts["HGMMA"] == 0:
            found.append(f"{label}: no HMMA/HGMMA instruction")
    return found


def format_table(kernels: List[KernelResources]) -> str:
    header = f"{'kernel':38} {'dtype':5} {'HD':>4} {'arch':6} {'regs':>4} {'stack':>5} {'local':>5} " \
             f"{'LDL':>4} {'STL':>4} {'HMMA':>5} {'HGMMA':>5}"
    lines = [header, "-" * len(header)]
    for k in kernels:
        lines.append(f"{k.kernel:38} {k.dtype:5} {k.head_dim or '-':>4} {k.arch:6} {k.registers:>4} {k.stack:>5} "
                     f"{k.local:>5} {k.counts['LDL']:>4} {k.counts['STL']:>4} {k.counts['HMMA']:>5} "
                     f"{k.counts['HGMMA']:>5}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", help="path of fastattn/_C*.so (default: the importable one)")
    parser.add_argument("--check", action="store_true", help="exit 1 on spills or missing tensor-core code")
    args = parser.parse_args(argv)
    library = args.library or find_library()
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("cuobjdump not found (CUDA toolkit or triton's NVIDIA backend)", file=sys.stderr)
        return 2
    kernels = read_resources(library, cuobjdump)
    if not kernels:
        print(f"{library} holds no CUDA kernels (built without CUDA?)", file=sys.stderr)
        return 2
    print(f"{library}\n{cuobjdump}\n")
    print(format_table(kernels))
    found = problems(kernels)
    print("\n" + ("\n".join(found) if found else
                  f"{len(kernels)} kernels: no local memory; every fp16/bf16 kernel has tensor-core instructions"))
    return 1 if found and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
