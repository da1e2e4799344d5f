"""``python -m fastattn.info``: versions, and what each backend was built with and supports."""

from __future__ import annotations

import json
import platform
import sys

import torch

from . import __version__
from .backends import CUDA_CPP_MAX_SPAN, PRIORITY, all_backends


def collect() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "fastattn": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "platform": platform.platform(),
        "cpu_threads": torch.get_num_threads(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available() else [],
        "auto_priority": PRIORITY,
        "backends": [backend.describe() for backend in all_backends()],
    }


def format_report(info: dict) -> str:
    lines = [f"fastattn {info['fastattn']}  python {info['python']}  torch {info['torch']} "
             f"(CUDA {info['torch_cuda'] or 'none'})  triton {info['triton'] or 'not installed'}",
             f"platform {info['platform']}, {info['cpu_threads']} CPU threads, "
             f"GPUs: {', '.join(info['cuda_devices']) or 'none'}",
             "auto tries: " + "; ".join(f"{dev}: {' > '.join(names)}" for dev, names in info["auto_priority"].items())
             + f" (cuda fp16/bf16 rows seeing <= {CUDA_CPP_MAX_SPAN} keys: cpp first)",
             ""]
    for backend in info["backends"]:
        status = "available" if backend["available"] else "UNAVAILABLE: " + "; ".join(backend["unavailable_because"])
        lines.append(f"[{backend['name']}] {backend['description']}")
        lines.append(f"    status:   {status}")
        for device, dtypes in backend["dtypes"].items():
            lines.append(f"    {device + ':':9} {', '.join(dtypes)}")
        if backend["available"]:
            lines.append(f"    head dim: 1..{backend['max_head_dim']}")
            lines.append(f"    features: {', '.join(backend['features'])}")
        for key, value in backend.get("build", {}).items():
            lines.append(f"    {key + ':':9} {value}")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    info = collect()
    print(json.dumps(info, indent=2, default=str) if "--json" in argv else format_report(info))


if __name__ == "__main__":
    main()
