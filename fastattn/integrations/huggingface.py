"""Hugging Face transformers: ``attn_implementation="fastattn"``.

    import fastattn.integrations.huggingface as fa_hf
    fa_hf.register()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastattn")

``register()`` installs two functions under one name, as transformers' own implementations do:

* a **mask function** (``AttentionMaskInterface``). transformers describes every mask by a
  ``mask_function`` (causal, sliding window, bidirectional, and overlays combined with
  ``and_masks``), query/key offsets (a KV cache) and the 2-D padding mask. When the pattern is one
  fastattn expresses, the mask function returns a small :class:`FastAttnMask` -- the window in
  fastattn's bottom-right-aligned convention and the ``(B, Nk)`` padding mask -- instead of a
  dense ``(B, 1, Nq, Nk)`` tensor. Any other pattern (packed sequences, chunked or block masks,
  custom ``or``/``and`` overlays, offsets that are tensors) gets transformers' own dense boolean
  mask, so no mask is ever dropped.
* an **attention function** (``AttentionInterface``), called by every attention layer with
  ``(B, H, N, D)`` query/key/value. GQA key/value heads are passed as they are (no repeat). It runs
  ``fastattn.attention`` for a :class:`FastAttnMask` (or no mask), and hands everything it cannot
  serve (a dense or custom mask, attention dropout in training, position biases, soft-capping,
  attention sinks) to transformers' own SDPA implementation with a one-time warning.

Rows that see no key at all (queries at left-padding positions) get a zero output here, while
eager/SDPA give an arbitrary finite value; those positions are padding and never read by others.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import functional, masks
from ..nn._dense import warn_dense_once
from ..nn._mask_patterns import FULL_WINDOW, Window, intersect_windows, is_compiling

__all__ = ["register", "FastAttnMask", "attention_forward", "mask_function", "pattern_of", "NAME"]

NAME = "fastattn"
_OWNER = "fastattn (transformers attn_implementation)"


@dataclasses.dataclass(frozen=True)
class FastAttnMask:
    """The mask of one attention call, in the form fastattn's kernels take.

    ``window``: ``(left, right)`` over ``kv_length`` keys, bottom-right aligned (query ``i`` sits at
    key position ``i + kv_length - q_length``), -1 = unbounded. ``key_padding_mask``: bool
    ``(B, kv_length)``, True = padding, or None.
    """

    window: Window
    key_padding_mask: Optional[torch.Tensor]
    q_length: int
    kv_length: int

    def materialize(self, device=None) -> torch.Tensor:
        """The equivalent dense boolean mask (True = attend), ``(B, 1, Nq, Nk)`` or ``(Nq, Nk)``."""
        return masks.materialize(self.q_length, self.kv_length, self.window,
                                 key_padding_mask=self.key_padding_mask, device=device)


def _transformers():
    try:
        from transformers import masking_utils
        from transformers.integrations import sdpa_attention
        from transformers.modeling_utils import AttentionInterface
    except ImportError as exc:  # transformers missing, or older than its mask-interface API
        raise ImportError("fastattn's Hugging Face integration needs transformers with AttentionInterface and "
                          "masking_utils.AttentionMaskInterface (tested with transformers==5.17.0; "
                          f"`pip install 'fastattn[hf]'`): {exc}") from exc
    return masking_utils, sdpa_attention, AttentionInterface


@functools.lru_cache(maxsize=None)
def _pattern_codes() -> Dict[str, object]:
    """The code objects of transformers' mask-function closures: every closure one of its factories
    returns shares its factory's inner code object, which identifies it exactly."""
    mu, _, _ = _transformers()
    factories = {"and": lambda: mu.and_masks(mu.causal_mask_function),
                 "sliding_causal_overlay": lambda: mu.sliding_window_overlay(1),
                 "sliding_bidirectional_overlay": lambda: mu.sliding_window_bidirectional_overlay(1)}
    codes = {}
    for name, make in factories.items():
        try:
            codes[name] = make().__code__
        except AttributeError:  # a transformers version without that factory: never matched
            codes[name] = None
    return codes


def _closure_values(fn) -> Dict[str, object]:
    cells = fn.__closure__ or ()
    return {name: cell.cell_contents for name, cell in zip(fn.__code__.co_freevars, cells)}


def _positive_int(value, minimum: int) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        return None
    return value


def pattern_of(fn: Callable) -> Optional[Window]:
    """``(L, R)`` such that `fn` allows exactly ``q - L <= kv <= q + R`` (absolute positions, -1 =
    unbounded), or None when `fn` is not a pattern made of transformers' causal, bidirectional and
    sliding-window functions combined with ``and_masks``."""
    mu, _, _ = _transformers()
    if fn is mu.causal_mask_function:
        return (-1, 0)
    if fn is mu.bidirectional_mask_function:
        return FULL_WINDOW
    code, codes = getattr(fn, "__code__", None), _pattern_codes()
    if code is None or getattr(fn, "__closure__", None) is None:
        return None
    values = _closure_values(fn)
    if code is codes["and"]:
        parts = values.get("mask_functions")
        if not isinstance(parts, tuple) or not parts:
            return None
        window = FULL_WINDOW
        for part in parts:
            part_window = pattern_of(part)
            if part_window is None:
                return None
            window = intersect_windows(window, part_window)
        return window
    if code is codes["sliding_causal_overlay"]:  # kv > q - w
        width = _positive_int(values.get("sliding_window"), 1)
        return None if width is None else (width - 1, -1)
    if code is codes["sliding_bidirectional_overlay"]:  # |q - kv| <= w
        width = _positive_int(values.get("sliding_window"), 0)
        return None if width is None else (width, width)
    return None


def mask_function(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                  mask_function: Optional[Callable] = None, attention_mask: Optional[torch.Tensor] = None,
                  **kwargs):
    """transformers' mask interface: a :class:`FastAttnMask` when the pattern is a window fastattn
    expresses, else transformers' own dense boolean mask (``sdpa_mask``)."""
    mu, _, _ = _transformers()
    if mask_function is None:
        mask_function = mu.causal_mask_function
    fast = _fast_mask(q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask)
    if fast is not None:
        return fast
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    # Never skip: a None mask would leave the pattern to the attention function's guess.
    return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)


def _fast_mask(q_length, kv_length, q_offset, kv_offset, mask_fn, attention_mask) -> Optional[FastAttnMask]:
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in (q_length, kv_length, q_offset, kv_offset)):
        return None  # e.g. a StaticCache's tensor offsets under torch.compile
    pattern = pattern_of(mask_fn)
    if pattern is None:
        return None
    # transformers: query i is at absolute position q_offset + i, key j at kv_offset + j. fastattn:
    # query i is at key index i + kv_length - q_length. `shift` moves one frame to the other.
    shift = (q_offset - kv_offset) - (kv_length - q_length)
    left = -1 if pattern[0] < 0 else pattern[0] - shift
    right = -1 if pattern[1] < 0 else pattern[1] + shift
    if (pattern[0] >= 0 and left < 0) or (pattern[1] >= 0 and right < 0):
        return None  # keys no query may see at the ends (a StaticCache's empty slots): dense mask
    padding = None
    if attention_mask is not None:
        mu, _, _ = _transformers()
        keep = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        if keep.dtype != torch.bool:
            keep = keep.bool()
        if is_compiling() or not bool(keep.all()):
            padding = ~keep
    return FastAttnMask((left, right), padding, q_length, kv_length)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask, dropout: float = 0.0, scaling: Optional[float] = None,
                      is_causal: Optional[bool] = None, **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers' attention interface: ``(B, H, Nq, D)`` in, ``(B, Nq, H, D)`` out, no weights."""
    reasons = []
    if dropout and dropout > 0:
        reasons.append("attention dropout is active (training with attention dropout > 0)")
    for name in ("position_bias", "softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            reasons.append(f"the model passes {name}")
    if kwargs.get("output_attentions"):
        reasons.append("output_attentions=True (neither fastattn nor SDPA returns weights)")
    q_length, kv_length = query.shape[2], key.shape[2]
    window, padding = FULL_WINDOW, None
    if isinstance(attention_mask, FastAttnMask):
        if (attention_mask.q_length, attention_mask.kv_length) != (q_length, kv_length):
            raise ValueError(f"attention_mask was made for q_length={attention_mask.q_length}, kv_length="
                             f"{attention_mask.kv_length}, but the layer has {q_length} queries and {kv_length} keys")
        window, padding = attention_mask.window, attention_mask.key_padding_mask
    elif attention_mask is None:
        # transformers' SDPA rule for a layer given no mask: causal from the layer unless there is a
        # single query, with causal alignment at the top left (keys past the queries unused).
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if causal and q_length > 1:
            key, value = key[:, :, :q_length], value[:, :, :q_length]
            window = (-1, q_length - key.shape[2])  # top-left: query i sees keys 0..i
    else:
        reasons.append("the attention_mask is a dense tensor (a custom or 4-D mask, or a pattern "
                       "fastattn's mask function does not express)")
    if reasons:
        warn_dense_once(_OWNER, reasons)
        if isinstance(attention_mask, FastAttnMask):
            attention_mask = attention_mask.materialize(device=query.device)
        _, sdpa, _ = _transformers()
        return sdpa.sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                           scaling=scaling, is_causal=is_causal, **kwargs)
    out = functional.attention(query, key, value, window=window, key_padding_mask=padding, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register(name: str = NAME) -> str:
    """Registers fastattn's attention and mask functions with transformers under `name` (default
    ``"fastattn"``), for ``attn_implementation=name``. Returns the name."""
    masking_utils, _, attention_interface = _transformers()
    attention_interface.register(name, attention_forward)
    masking_utils.AttentionMaskInterface.register(name, mask_function)
    return name
