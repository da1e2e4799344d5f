"""The contestants of ``python -m fastattn.bench``: fastattn's backends and their peers.

Every contestant computes ``softmax(scale * q k^T + mask) v`` on ``(B, H, N, D)`` tensors, with
the case's window expressed the way its library allows (written in the result's ``note``):

* ``fastattn[<backend>]``: ``fastattn.attention(q, k, v, window=(left, right), backend=...)``.
* ``sdpa-math``, ``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``: PyTorch's
  ``scaled_dot_product_attention`` restricted to one backend by ``sdpa_kernel``; causal through
  ``is_causal=True`` (Nq = Nk), windows through the equivalent dense boolean mask.
* ``flex``: FlexAttention compiled by ``torch.compile(dynamic=False)`` with a block mask made from
  fastattn's window rule; building the mask and compiling are reported as ``compile_s``.
* ``naive``: the explicit ``softmax(q k^T * scale + mask) v`` in PyTorch (dense mask).
* ``flash-attn`` (``flash_attn_func`` with ``window_size``) and ``xformers``
  (``memory_efficient_attention`` with the bottom-right-aligned bias), when importable.

A contestant that cannot run here at all is *unavailable*; one that cannot run a setting is
*unsupported*; one whose dense ``N x N`` intermediates would exceed ``--max-dense-gib`` is
*skipped* (so a 64k-token sweep does not exhaust a shared machine). Each says why.
"""

from __future__ import annotations

import dataclasses
import importlib
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import fastattn
from .. import masks
from ..backends import AttentionProblem, BackendNotSupportedError, FastAttnFallbackWarning, get_backend, \
    select_backend
from .cases import Case

__all__ = ["Setting", "Contestant", "Unsupported", "Skipped", "DenseMasks", "PEER_NAMES", "make_fastattn",
           "make_peers"]


class Unsupported(Exception):
    """The contestant cannot run this setting; the message says why."""


class Skipped(Unsupported):
    """The contestant could run this setting but would need more dense memory than allowed."""


@dataclasses.dataclass
class Setting:
    """One measured configuration: the inputs every contestant shares, the case and the mode."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    case: Case
    mode: str

    @property
    def needs_grad(self) -> bool:
        return self.mode != "fwd"

    @property
    def gqa(self) -> bool:
        return self.q.shape[1] != self.k.shape[1]

    def dense_score_bytes(self, copies: int) -> int:
        """Bytes of `copies` dense (B, Hq, Nq, Nk) tensors in the input dtype."""
        batch, heads, seqlen_q, _ = self.q.shape
        return copies * batch * heads * seqlen_q * self.k.shape[2] * self.q.element_size()

    def mask_bytes(self) -> int:
        return 0 if self.case.is_full else self.q.shape[2] * self.k.shape[2]


class DenseMasks:
    """The dense boolean mask (``fastattn.masks.materialize``) of the current setting, built once
    and shared by the peers that need it."""

    def __init__(self):
        self._key = None
        self._mask: Optional[torch.Tensor] = None

    def get(self, setting: Setting) -> torch.Tensor:
        key = (setting.q.shape[2], setting.k.shape[2], setting.case.window, setting.q.device)
        if key != self._key:
            self.clear()
            self._mask = masks.materialize(key[0], key[1], setting.case.window, device=setting.q.device)
            self._key = key
        return self._mask

    def clear(self) -> None:
        self._key, self._mask = None, None


class Contestant:
    """Something timed on a `Setting`: ``prepare(setting)`` once, then ``contestant(q, k, v)``."""

    name: str = ""
    is_fastattn: bool = False
    #: Its first call compiles; that time (plus `setup_s`) is reported apart, never as kernel time.
    compiles: bool = False
    #: One-off work of the last `prepare` that belongs to the compile time (FlexAttention's block mask).
    setup_s: float = 0.0

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
        """Why this contestant cannot run at all on this device and dtype (None: it can)."""
        return None

    def prepare(self, setting: Setting) -> str:
        """Readies a setting; returns a note on how the case is expressed. Raises `Unsupported`."""
        return ""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def release(self) -> None:
        """Drops what `prepare` built."""


def _check_dense_memory(needed: int, limit: int, what: str) -> None:
    if needed > limit:
        raise Skipped(f"{what} needs ~{needed / 2**30:.1f} GiB > --max-dense-gib {limit / 2**30:g}")


# Dense (B, Hq, Nq, Nk) tensors alive at the peak of an explicit softmax(q k^T) v: scores,
# masked scores, probabilities; the backward adds their gradients.
_DENSE_COPIES_FORWARD = 3
_DENSE_COPIES_BACKWARD = 6


def _dense_copies(setting: Setting) -> int:
    return _DENSE_COPIES_BACKWARD if setting.needs_grad else _DENSE_COPIES_FORWARD


class FastattnContestant(Contestant):
    is_fastattn = True

    def __init__(self, backend: str, max_dense_bytes: int):
        self.backend = backend
        self.name = f"fastattn[{backend}]"
        self.max_dense_bytes = max_dense_bytes
        self.window = (-1, -1)

    def unavailable_reason(self, device, dtype, head_dim):
        if self.backend == "auto":
            return None
        reasons = get_backend(self.backend).availability_reasons()
        return "; ".join(reasons) if reasons else None

    def prepare(self, setting):
        self.window = setting.case.window
        problem = dataclasses.replace(
            AttentionProblem.from_tensors(setting.q, setting.k, setting.v, None, *self.window),
            needs_grad=setting.needs_grad)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FastAttnFallbackWarning)  # reported in the note instead
            try:
                chosen = select_backend(problem, self.backend)
            except BackendNotSupportedError as exc:
                raise Unsupported(str(exc)) from None
        if chosen.name == "reference":
            _check_dense_memory(setting.dense_score_bytes(_dense_copies(setting)) + setting.mask_bytes(),
                                self.max_dense_bytes, "the O(N^2) reference backend")
        if self.backend == "auto":
            return f"auto -> {chosen.name}" + (" (O(N^2) fallback)" if chosen.name == "reference" else "")
        return ""

    def __call__(self, q, k, v):
        return fastattn.attention(q, k, v, window=self.window, backend=self.backend)


class SdpaPeer(Contestant):
    """``scaled_dot_product_attention`` restricted to one SDPA backend."""

    def __init__(self, name: str, backend_name: str, dense_masks: DenseMasks, max_dense_bytes: int):
        self.name = name
        self.backend_name = backend_name
        self.dense_masks = dense_masks
        self.max_dense_bytes = max_dense_bytes
        self.kwargs: Dict[str, object] = {}

    def _backend(self):
        from torch.nn.attention import SDPBackend
        return getattr(SDPBackend, self.backend_name, None)

    def _sdpa(self, q, k, v, **kwargs):
        from torch.nn.attention import sdpa_kernel
        with sdpa_kernel([self._backend()]):
            return F.scaled_dot_product_attention(q, k, v, **kwargs)

    def _why_not(self, q, k, v, kwargs, exc: Exception) -> str:
        """SDPA says why a backend refused only in warnings: run once more to collect them."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                self._sdpa(q, k, v, **kwargs)
            except RuntimeError:
                pass
        reasons = [str(w.message).strip().splitlines()[0] for w in caught]
        return "; ".join(reasons) or str(exc).strip().splitlines()[0]

    def unavailable_reason(self, device, dtype, head_dim):
        try:
            from torch.nn.attention import sdpa_kernel  # noqa: F401 (torch >= 2.3)
        except ImportError:
            return f"torch {torch.__version__} has no torch.nn.attention.sdpa_kernel"
        if self._backend() is None:
            return f"torch {torch.__version__} has no SDPBackend.{self.backend_name}"
        # 128 tokens: a length every backend's alignment rules accept (cuDNN's included).
        probe = torch.zeros(1, 1, 128, head_dim, device=device, dtype=dtype)
        try:
            self._sdpa(probe, probe, probe)
        except RuntimeError as exc:
            return (f"torch {torch.__version__} has no {self.backend_name} kernel for {device.type} "
                    f"{str(dtype).replace('torch.', '')}, D={head_dim} ({self._why_not(probe, probe, probe, {}, exc)})")
        return None

    def prepare(self, setting):
        case = setting.case
        seqlen_q, seqlen_k = setting.q.shape[2], setting.k.shape[2]
        self.kwargs = {"enable_gqa": True} if setting.gqa else {}
        needed = setting.dense_score_bytes(_dense_copies(setting)) if self.backend_name == "MATH" else 0
        needs_mask = not case.is_full and not (case.is_causal and seqlen_q == seqlen_k)
        if needs_mask:
            # The backends turn a boolean mask into an additive one in the input dtype.
            needed += setting.mask_bytes() * (1 + setting.q.element_size())
        _check_dense_memory(needed, self.max_dense_bytes,
                            "the math backend's N x N scores" if self.backend_name == "MATH" else "the dense mask")
        if needs_mask:
            self.kwargs["attn_mask"] = self.dense_masks.get(setting)
            return "dense bool mask"
        if case.is_causal:
            self.kwargs["is_causal"] = True
            return "is_causal"
        return ""

    def __call__(self, q, k, v):
        try:
            return self._sdpa(q, k, v, **self.kwargs)
        except RuntimeError as exc:
            if "No viable backend" in str(exc) or "No available kernel" in str(exc):
                raise Unsupported(self._why_not(q, k, v, self.kwargs, exc)) from None
            raise

    def release(self):
        self.kwargs = {}


def _window_mask_mod(seqlen_q: int, seqlen_k: int, left: int, right: int) -> Callable:
    """FlexAttention's ``mask_mod`` for fastattn's rule (``fastattn.masks``): query ``i`` sits at
    ``p = i + Nk - Nq`` and sees key ``j`` iff ``p - left <= j <= p + right`` (-1: unbounded)."""
    offset = seqlen_k - seqlen_q

    def mask_mod(batch, head, q_idx, kv_idx):
        position = q_idx + offset
        if left >= 0 and right >= 0:
            return (kv_idx >= position - left) & (kv_idx <= position + right)
        if left >= 0:
            return kv_idx >= position - left
        return kv_idx <= position + right

    return mask_mod


#: Nq * Nk from which FlexAttention's block mask is built by a compiled function (N >= 16k).
_COMPILED_BLOCK_MASK_FROM = 1 << 28


class FlexPeer(Contestant):
    name = "flex"
    compiles = True

    def __init__(self):
        self.compiled: Optional[Callable] = None
        self.block_mask = None
        self.gqa = False
        self._caches_setting: Optional[bool] = None

    def unavailable_reason(self, device, dtype, head_dim):
        try:
            from torch.nn.attention import flex_attention  # noqa: F401 (torch >= 2.5)
        except ImportError as exc:
            return f"torch {torch.__version__} has no FlexAttention: {exc}"
        return None

    def prepare(self, setting):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        # A fresh, cold compilation per setting: its compile time is its own (not shortened by
        # inductor's on-disk caches from an earlier run), and dynamo's recompile limit (after which
        # it would silently run FlexAttention eagerly, densely) is never reached.
        torch._dynamo.reset()
        import torch._inductor.config as inductor_config
        if hasattr(inductor_config, "force_disable_caches") and self._caches_setting is None:
            self._caches_setting = inductor_config.force_disable_caches  # restored by release()
            inductor_config.force_disable_caches = True
        start = time.perf_counter()
        case = setting.case
        seqlen_q, seqlen_k = setting.q.shape[2], setting.k.shape[2]
        self.block_mask = None
        if not case.is_full:
            # Built eagerly, create_block_mask evaluates the mask densely (N = 64k: a 32 GiB
            # allocation); compiled, as FlexAttention advises for long sequences, it does not.
            compile_mask = seqlen_q * seqlen_k >= _COMPILED_BLOCK_MASK_FROM
            self.block_mask = create_block_mask(_window_mask_mod(seqlen_q, seqlen_k, *case.window), None, None,
                                                seqlen_q, seqlen_k, device=str(setting.q.device),
                                                _compile=compile_mask)
        self.compiled = torch.compile(flex_attention, dynamic=False)
        self.gqa = setting.gqa
        self.setup_s = time.perf_counter() - start
        return "no mask" if self.block_mask is None else "block mask"

    def __call__(self, q, k, v):
        kwargs = {"enable_gqa": True} if self.gqa else {}
        return self.compiled(q, k, v, block_mask=self.block_mask, **kwargs)

    def release(self):
        self.compiled, self.block_mask = None, None
        if self._caches_setting is not None:
            import torch._inductor.config as inductor_config
            inductor_config.force_disable_caches = self._caches_setting
            self._caches_setting = None


class NaivePeer(Contestant):
    name = "naive"

    def __init__(self, dense_masks: DenseMasks, max_dense_bytes: int):
        self.dense_masks = dense_masks
        self.max_dense_bytes = max_dense_bytes
        self.mask: Optional[torch.Tensor] = None

    def prepare(self, setting):
        _check_dense_memory(setting.dense_score_bytes(_dense_copies(setting)) + setting.mask_bytes(),
                            self.max_dense_bytes, "its N x N scores")
        self.mask = None if setting.case.is_full else self.dense_masks.get(setting)
        return "" if self.mask is None else "dense bool mask"

    def __call__(self, q, k, v):
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        if self.mask is not None:
            scores = scores.masked_fill(~self.mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def release(self):
        self.mask = None


def _cuda_package_missing(device: torch.device, module: str, package: str) -> Optional[str]:
    """Why a CUDA-only third-party peer cannot run here (None: it can)."""
    if device.type != "cuda":
        return f"{package} runs on CUDA only"
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{package} is not installed ({exc})"
    return None


class FlashAttnPeer(Contestant):
    """``flash_attn.flash_attn_func`` (Dao-AILab), (B, N, H, D) views of the same tensors."""

    name = "flash-attn"

    def __init__(self):
        self.window = (-1, -1)

    def unavailable_reason(self, device, dtype, head_dim):
        missing = _cuda_package_missing(device, "flash_attn", "flash-attn")
        if missing is None and dtype not in (torch.float16, torch.bfloat16):
            return "flash-attn supports fp16 and bf16 only"
        return missing

    def prepare(self, setting):
        self.window = setting.case.window
        return "window_size"

    def __call__(self, q, k, v):
        from flash_attn import flash_attn_func
        left, right = self.window
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=right == 0,
                              window_size=(left, right))
        return out.transpose(1, 2)


class XformersPeer(Contestant):
    """``xformers.ops.memory_efficient_attention`` with the bottom-right-aligned bias of the case."""

    name = "xformers"

    def __init__(self):
        self.bias = None

    def unavailable_reason(self, device, dtype, head_dim):
        return _cuda_package_missing(device, "xformers.ops", "xformers")

    def prepare(self, setting):
        from xformers.ops import fmha
        left, right = setting.case.window
        seqlen_k = setting.k.shape[2]
        if setting.case.is_full:
            self.bias = None
        elif setting.case.is_causal:
            self.bias = fmha.attn_bias.LowerTriangularFromBottomRightMask()
        else:  # an unbounded side reaches at most every key
            self.bias = fmha.attn_bias.LocalAttentionFromBottomRightMask(
                window_left=left if left >= 0 else seqlen_k, window_right=right if right >= 0 else seqlen_k)
        return "attn_bias"

    def __call__(self, q, k, v):
        import xformers.ops as xops
        batch, heads_q, seqlen_q, head_dim = q.shape
        heads_kv, seqlen_k = k.shape[1], k.shape[2]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, N, H, D)
        if heads_q != heads_kv:  # GQA: xformers' (B, N, G, H, D) form, kv broadcast over H
            group = heads_q // heads_kv
            q = q.reshape(batch, seqlen_q, heads_kv, group, head_dim)
            k, v = (t.unsqueeze(3).expand(batch, seqlen_k, heads_kv, group, t.shape[-1]) for t in (k, v))
        out = xops.memory_efficient_attention(q, k, v, attn_bias=self.bias)
        return out.reshape(batch, seqlen_q, heads_q, -1).transpose(1, 2)

    def release(self):
        self.bias = None


#: Peer names for ``--peers``, in the order they are run.
PEER_NAMES = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "flex", "naive", "flash-attn", "xformers")
_SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-efficient": "EFFICIENT_ATTENTION",
                  "sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-math": "MATH"}


def make_fastattn(backends: Sequence[str], max_dense_bytes: int) -> List[Contestant]:
    return [FastattnContestant(name, max_dense_bytes) for name in backends]


def make_peers(names: Sequence[str], dense_masks: DenseMasks, max_dense_bytes: int) -> List[Contestant]:
    peers: List[Contestant] = []
    for name in names:
        if name in _SDPA_BACKENDS:
            peers.append(SdpaPeer(name, _SDPA_BACKENDS[name], dense_masks, max_dense_bytes))
        elif name == "flex":
            peers.append(FlexPeer())
        elif name == "naive":
            peers.append(NaivePeer(dense_masks, max_dense_bytes))
        elif name == "flash-attn":
            peers.append(FlashAttnPeer())
        elif name == "xformers":
            peers.append(XformersPeer())
        else:
            raise ValueError(f"unknown peer {name!r}; choose from {', '.join(PEER_NAMES)}")
    return peers
