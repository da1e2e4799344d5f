"""What a backend is: the capabilities it declares, and the two calls it implements.

A backend serves an :class:`AttentionProblem` (shapes, dtype, device, window; no data) when
:meth:`Backend.not_supported_reasons` returns an empty list. Dispatch (``fastattn.backends``)
never guesses from the backend's name: it asks every candidate for its reasons.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, FrozenSet, List, Optional, Tuple

import torch

MAX_HEAD_DIM = 256

#: Everything in fastattn's contract; a backend lists the subset it implements.
ALL_FEATURES = frozenset({"causal", "window", "gqa", "key_padding_mask", "seqlen_q != seqlen_k",
                          "backward", "lse"})


@dataclasses.dataclass(frozen=True)
class AttentionProblem:
    """The shape of one attention call: what a backend needs to decide if it can serve it."""

    device_type: str
    dtype: torch.dtype
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    window_left: int
    window_right: int
    has_key_padding_mask: bool
    needs_grad: bool

    @classmethod
    def from_tensors(cls, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     key_padding_mask: Optional[torch.Tensor], window_left: int, window_right: int
                     ) -> "AttentionProblem":
        return cls(
            device_type=q.device.type, dtype=q.dtype, batch=q.shape[0], heads_q=q.shape[1],
            heads_kv=k.shape[1], seqlen_q=q.shape[2], seqlen_k=k.shape[2], head_dim=q.shape[3],
            head_dim_v=v.shape[3], window_left=window_left, window_right=window_right,
            has_key_padding_mask=key_padding_mask is not None,
            needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)))

    @property
    def features(self) -> FrozenSet[str]:
        """The contract features this call uses."""
        used = set()
        if self.window_right == 0 and self.window_left < 0:
            used.add("causal")
        elif self.window_left >= 0 or self.window_right >= 0:
            used.add("window")
        if self.heads_q != self.heads_kv:
            used.add("gqa")
        if self.has_key_padding_mask:
            used.add("key_padding_mask")
        if self.seqlen_q != self.seqlen_k:
            used.add("seqlen_q != seqlen_k")
        if self.needs_grad:
            used.add("backward")
        return frozenset(used)


class Backend:
    """Base class: declare capabilities as class attributes, implement forward and backward."""

    name: str = ""
    description: str = ""
    #: dtypes served, per device type ("cpu", "cuda").
    dtypes: Dict[str, Tuple[torch.dtype, ...]] = {}
    max_head_dim: int = MAX_HEAD_DIM
    features: FrozenSet[str] = ALL_FEATURES

    def availability_reasons(self) -> List[str]:
        """Why this backend cannot run at all in this process (not built, package missing)."""
        return []

    def not_supported_reasons(self, problem: AttentionProblem) -> List[str]:
        """Every reason this backend cannot serve `problem`; empty when it can."""
        reasons = list(self.availability_reasons())
        if problem.device_type not in self.dtypes:
            reasons.append(f"device {problem.device_type!r} not supported "
                           f"(supported: {', '.join(self.dtypes) or 'none'})")
        elif problem.dtype not in self.dtypes[problem.device_type]:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes[problem.device_type])
            reasons.append(f"dtype {str(problem.dtype).replace('torch.', '')} not supported on "
                           f"{problem.device_type} (supported: {names})")
        if max(problem.head_dim, problem.head_dim_v) > self.max_head_dim:
            reasons.append(f"head dim {max(problem.head_dim, problem.head_dim_v)} > {self.max_head_dim}")
        missing = problem.features - self.features
        if missing:
            reasons.append(f"features not supported: {', '.join(sorted(missing))}")
        return reasons

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                key_padding_mask: Optional[torch.Tensor], scale: float, window_left: int,
                window_right: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(out, lse)``: out ``(B, Hq, Nq, Dv)`` in q's dtype, lse ``(B, Hq, Nq)``
        float32 (float64 for float64 inputs), ``-inf`` for rows that see no key."""
        raise NotImplementedError

    def backward(self, dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 out: torch.Tensor, lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                 scale: float, window_left: int, window_right: int
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(dq, dk, dv)`` shaped like q, k, v."""
        raise NotImplementedError

    def describe(self) -> Dict[str, object]:
        """A summary for ``python -m fastattn.info``."""
        unavailable = self.availability_reasons()
        return {
            "name": self.name,
            "description": self.description,
            "available": not unavailable,
            "unavailable_because": unavailable,
            "dtypes": {dev: [str(d).replace("torch.", "") for d in dts] for dev, dts in self.dtypes.items()},
            "max_head_dim": self.max_head_dim,
            "features": sorted(self.features),
        }
