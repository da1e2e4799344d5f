"""Backend registry and capability-based dispatch.

Each backend declares what it serves (devices, dtypes, head dims, features) and answers
``not_supported_reasons(problem)``. ``backend="auto"`` takes the first backend in the device's
priority list with no reasons. A backend named explicitly that cannot serve the call raises
:class:`BackendNotSupportedError` listing its reasons. ``auto`` falls back to the O(N^2)
``reference`` backend only with a :class:`FastAttnFallbackWarning`, once per distinct reason.
"""

from __future__ import annotations

import warnings
from typing import Callable, Dict, List, Tuple

import torch

from .base import ALL_FEATURES, MAX_HEAD_DIM, AttentionProblem, Backend

__all__ = ["AttentionProblem", "Backend", "BackendNotSupportedError", "FastAttnFallbackWarning",
           "BACKEND_NAMES", "PRIORITY", "CUDA_CPP_MAX_SPAN", "auto_priority", "get_backend", "select_backend", "all_backends",
           "MAX_HEAD_DIM", "ALL_FEATURES"]


class FastAttnFallbackWarning(UserWarning):
    """``backend="auto"`` found no fused kernel for a call and used the O(N^2) reference."""


class BackendNotSupportedError(ValueError):
    """An explicitly requested backend cannot serve the call; the message lists why."""


class _UnavailableBackend(Backend):
    """Stands in for a backend whose module cannot be imported here (e.g. triton missing)."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.description = "not importable in this environment"
        self._reason = reason

    def availability_reasons(self) -> List[str]:
        return [self._reason]


def _make_cpp() -> Backend:
    from .cpp import CppBackend
    return CppBackend()


def _make_triton() -> Backend:
    try:
        from .triton import TritonBackend
    except ImportError as exc:
        return _UnavailableBackend("triton", f"the Triton backend cannot be imported: {exc}")
    return TritonBackend()


def _make_reference() -> Backend:
    from .reference import ReferenceBackend
    return ReferenceBackend()


_FACTORIES: Dict[str, Callable[[], Backend]] = {
    "cpp": _make_cpp,
    "triton": _make_triton,
    "reference": _make_reference,
}
BACKEND_NAMES: Tuple[str, ...] = ("auto",) + tuple(_FACTORIES)

#: The order ``auto`` tries backends in, per device type; any other device uses the reference.
#: On CUDA, fp16/bf16 calls whose rows see at most ``CUDA_CPP_MAX_SPAN`` keys go to the C++ CUDA
#: kernels first (see ``auto_priority``).
PRIORITY: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cpp", "reference"),
    "cpu": ("cpp", "reference"),
}
#: Measured on an H100 (benchmarks/RESULTS.md, bf16, D=128): the C++ CUDA kernels beat the Triton
#: ones by 1.1-1.5x when each row sees at most ~1k keys (sliding windows, short causal), and lose
#: by up to 2.3x on long full or causal rows.
CUDA_CPP_MAX_SPAN = 1024


def auto_priority(problem: AttentionProblem) -> Tuple[str, ...]:
    """The order ``auto`` tries backends in for `problem`."""
    order = PRIORITY.get(problem.device_type, ("reference",))
    if problem.device_type == "cuda" and problem.dtype in (torch.float16, torch.bfloat16):
        left = problem.seqlen_k if problem.window_left < 0 else problem.window_left
        right = problem.seqlen_k if problem.window_right < 0 else problem.window_right
        if min(problem.seqlen_k, left + right + 1) <= CUDA_CPP_MAX_SPAN:
            order = ("cpp",) + tuple(name for name in order if name != "cpp")
    return order

_instances: Dict[str, Backend] = {}
_warned: set = set()


def get_backend(name: str) -> Backend:
    """The backend instance called `name`."""
    if name not in _instances:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKEND_NAMES))}, got {name!r}")
    return _instances[name]


def all_backends() -> List[Backend]:
    return [get_backend(name) for name in _FACTORIES]


def select_backend(problem: AttentionProblem, requested: str = "auto") -> Backend:
    """The backend that serves `problem`: `requested` itself, or the first capable one for auto."""
    if requested != "auto":
        backend = get_backend(requested)
        reasons = backend.not_supported_reasons(problem)
        if reasons:
            raise BackendNotSupportedError(
                f"backend={requested!r} cannot serve this call: " + "; ".join(reasons))
        return backend
    rejected = []
    for name in auto_priority(problem):
        backend = get_backend(name)
        reasons = backend.not_supported_reasons(problem)
        if reasons:
            rejected.append(f"{name}: {'; '.join(reasons)}")
            continue
        if name == "reference" and rejected:
            _warn_fallback(problem, rejected)
        return backend
    raise BackendNotSupportedError("no fastattn backend can serve this call: " + " | ".join(rejected))


# Every backend is created here, at import, so that dispatch inside torch.compile only reads
# plain Python data (creating one queries the dispatcher, which dynamo cannot trace).
for _name, _factory in _FACTORIES.items():
    _instances[_name] = _factory()


def _warn_fallback(problem: AttentionProblem, rejected: List[str]) -> None:
    key = tuple(rejected)
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"fastattn: no fused kernel for this {problem.device_type} {problem.dtype} call, using the "
        f"O(N^2)-memory reference backend ({' | '.join(rejected)})",
        FastAttnFallbackWarning, stacklevel=4)
