"""Drop-in attention modules: ``MultiheadAttention`` (torch's signature) and a compact ``SelfAttention``.

``MultiheadAttention`` subclasses ``torch.nn.MultiheadAttention`` so it has exactly its
constructor, parameters, initialisation and state_dict keys (``load_state_dict`` works both ways)
and passes ``isinstance`` checks; only ``forward`` differs. It runs fastattn's fused kernels when
``need_weights=False`` and the masks are ones the kernels express (none, causal, a sliding window,
a key padding mask); every other call is computed densely and correctly, with a one-time
``FastAttnFallbackWarning`` saying why (see ``docs/nn.md``).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import functional, masks
from ._dense import dense_attention, warn_dense_once
from ._mask_patterns import (FULL_WINDOW, Window, additive_of, bool_mask_of_additive, intersect_windows,
                             is_compiling, window_of_allowed)

__all__ = ["MultiheadAttention", "SelfAttention"]

Tensor = torch.Tensor
CAUSAL_WINDOW: Window = (-1, 0)


def _window_of_attn_mask(attn_mask: Tensor, is_causal: bool, seqlen_q: int, seqlen_k: int) -> Optional[Window]:
    """The window equal to torch's ``attn_mask`` (2-D, or 3-D with every slice equal), or None.

    Eager mode reads the mask. Under torch.compile reading it would break the graph, so there the
    ``is_causal`` hint is trusted for square masks, as torch's own module trusts it, and any other
    mask is left to the dense path.
    """
    if is_compiling():
        return CAUSAL_WINDOW if is_causal and seqlen_q == seqlen_k else None
    blocked = bool_mask_of_additive(attn_mask)
    if blocked is None:
        return None
    if blocked.dim() == 3:
        if not bool((blocked == blocked[:1]).all()):
            return None
        blocked = blocked[0]
    return window_of_allowed(~blocked)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` computed by fastattn's fused kernels.

    Same arguments, parameters and ``forward(query, key, value, key_padding_mask=None,
    need_weights=True, attn_mask=None, average_attn_weights=True, is_causal=False)`` as torch's,
    plus two keyword-only options applied to every call:

    * ``window``: ``None`` (full), ``w`` or ``(left, right)`` -- a sliding window, the rule of
      :func:`fastattn.attention` (bottom-right aligned, ``-1`` = unbounded side);
    * ``causal``: each query sees keys at or before its position.

    Fused when ``need_weights=False``, no attention dropout is active (``eval()`` or
    ``dropout=0``) and ``attn_mask`` is None, causal or a sliding window (bool or 0/-inf float,
    recognised exactly) and ``key_padding_mask`` is bool or 0/-inf float. Anything else is
    computed densely with a one-time warning. Differences from torch, by design: ``is_causal=True``
    without ``attn_mask`` means causal (torch raises), and a query with no visible key gets a zero
    output instead of NaN.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, window=None,
                 causal: bool = False) -> None:
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.set_attention_pattern(window=window, causal=causal)

    def set_attention_pattern(self, window=None, causal: bool = False) -> None:
        """Sets the window/causal pattern applied to every call (validated like fastattn.attention)."""
        self._window = masks.normalise_window(window, causal)
        self.window = window
        self.causal = causal

    @classmethod
    def adopt(cls, module: torch.nn.MultiheadAttention, window=None, causal: bool = False) -> "MultiheadAttention":
        """Turns a ``torch.nn.MultiheadAttention`` into this class in place: the same object, the
        same Parameter objects (optimizers and tied weights keep working), only forward changes."""
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        masks.normalise_window(window, causal)  # validate before mutating the module
        module.__class__ = cls
        module.set_attention_pattern(window=window, causal=causal)
        return module

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, window={self.window}, causal={self.causal}"

    # -- forward -------------------------------------------------------------------------------

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        self_attention, shared_kv = query is key and key is value, key is value
        if not batched:  # (L, E) -> (1, L, E); torch ignores batch_first for unbatched inputs
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # (L, B, E) -> (B, L, E) views
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)

        batch, seqlen_q, _ = query.shape
        seqlen_k = key.shape[1]
        q, k, v = self._project(query, key, value, self_attention, shared_kv)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, -1)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, -1)], dim=1)
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros], dim=2)
        extra_keys = k.shape[2] - seqlen_k  # bias_k and the zero key: always visible, never padding

        window, padding, reasons = self._fused_plan(key_padding_mask, attn_mask, is_causal, need_weights,
                                                    seqlen_q, seqlen_k, extra_keys)
        weights = None
        if not reasons:
            if padding is not None and extra_keys:
                padding = F.pad(padding, (0, extra_keys), value=False)
            out = functional.attention(q, k, v, window=window, key_padding_mask=padding)
        else:
            warn_dense_once("fastattn.nn.MultiheadAttention", reasons)
            additive = self._dense_mask(key_padding_mask, attn_mask, is_causal, batch, seqlen_q, seqlen_k,
                                        extra_keys, q)
            dropout_p = self.dropout if self.training else 0.0
            out, weights = dense_attention(q, k, v, additive, dropout_p)

        if self.batch_first or not batched:
            out = self.out_proj(out.transpose(1, 2).reshape(batch, seqlen_q, self.embed_dim))
        else:
            out = self.out_proj(out.permute(2, 0, 1, 3).reshape(seqlen_q, batch, self.embed_dim))
        if weights is not None and need_weights:
            weights = weights.mean(dim=1) if average_attn_weights else weights
            if not batched:
                weights = weights.squeeze(0)
        if not batched:
            out = out.squeeze(0)
        return out, (weights if need_weights else None)

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            if t.is_nested:
                raise ValueError(f"{name}: fastattn.nn.MultiheadAttention does not take nested tensors; pass a "
                                 f"padded tensor and key_padding_mask (and enable_nested_tensor=False to "
                                 f"nn.TransformerEncoder)")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key and value must have the dimensions of query ({query.dim()}-D), got key "
                             f"{tuple(key.shape)} and value {tuple(value.shape)}")
        batch_dim = 0 if query.dim() == 2 else (0 if self.batch_first else 1)
        expected = (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim))
        for name, t, dim in expected:
            if t.shape[-1] != dim:
                raise ValueError(f"{name} must have {dim} features in its last dimension, got shape {tuple(t.shape)}")
        if query.dim() == 3 and not (query.shape[batch_dim] == key.shape[batch_dim] == value.shape[batch_dim]):
            raise ValueError(f"query, key and value must have the same batch size, got {tuple(query.shape)}, "
                             f"{tuple(key.shape)}, {tuple(value.shape)} (batch_first={self.batch_first})")
        seq_dim = 1 if (query.dim() == 3 and self.batch_first) else 0
        if key.shape[seq_dim] != value.shape[seq_dim]:
            raise ValueError(f"key and value must have the same length, got {tuple(key.shape)} and {tuple(value.shape)}")
        batch = query.shape[batch_dim] if query.dim() == 3 else None
        seqlen_q, seqlen_k = query.shape[seq_dim], key.shape[seq_dim]
        if key_padding_mask is not None:
            want = (batch, seqlen_k) if batch is not None else (seqlen_k,)
            if not isinstance(key_padding_mask, torch.Tensor) or tuple(key_padding_mask.shape) != want:
                raise ValueError(f"key_padding_mask must be a tensor of shape {want} (True or -inf = padding), "
                                 f"got {getattr(key_padding_mask, 'shape', type(key_padding_mask).__name__)}")
            if key_padding_mask.dtype != torch.bool and not key_padding_mask.is_floating_point():
                raise TypeError(f"key_padding_mask must be bool or floating point, got {key_padding_mask.dtype}")
        if attn_mask is not None:
            allowed = [(seqlen_q, seqlen_k), (self.num_heads * (batch or 1), seqlen_q, seqlen_k)]
            if not isinstance(attn_mask, torch.Tensor) or tuple(attn_mask.shape) not in allowed:
                raise ValueError(f"attn_mask must be a tensor of shape {allowed[0]} or {allowed[1]}, got "
                                 f"{getattr(attn_mask, 'shape', type(attn_mask).__name__)}")
            if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
                raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        return query.dim() == 3

    def _project(self, query: Tensor, key: Tensor, value: Tensor, self_attention: bool, shared_kv: bool):
        """The q, k, v projections, ``(B, N, E)`` each; one matmul for self-attention (q, k, v are
        then strided views of it, which the kernels read in place)."""
        embed = self.embed_dim
        bias = self.in_proj_bias
        bias_q, bias_k, bias_v = (None, None, None) if bias is None else bias.split(embed)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, bias_q), F.linear(key, self.k_proj_weight, bias_k),
                    F.linear(value, self.v_proj_weight, bias_v))
        weight = self.in_proj_weight
        if self_attention:
            return F.linear(query, weight, bias).split(embed, dim=-1)
        weight_q, weight_kv = weight.split([embed, 2 * embed])
        q = F.linear(query, weight_q, bias_q)
        if shared_kv:
            k, v = F.linear(key, weight_kv, None if bias is None else bias[embed:]).split(embed, dim=-1)
            return q, k, v
        weight_k, weight_v = weight_kv.split(embed)
        return q, F.linear(key, weight_k, bias_k), F.linear(value, weight_v, bias_v)

    def _fused_plan(self, key_padding_mask, attn_mask, is_causal, need_weights, seqlen_q, seqlen_k, extra_keys
                    ) -> Tuple[Window, Optional[Tensor], List[str]]:
        """The window and bool padding mask for the fused kernels, or the reasons they cannot serve."""
        reasons = []
        if need_weights:
            reasons.append("need_weights=True (fused kernels never form the weights; pass need_weights=False)")
        if self.training and self.dropout > 0:
            reasons.append("attention dropout is active (training with dropout > 0)")
        window = self._window
        if attn_mask is None:
            if is_causal:
                window = intersect_windows(window, CAUSAL_WINDOW)
        else:
            mask_window = _window_of_attn_mask(attn_mask, is_causal, seqlen_q, seqlen_k)
            if mask_window is None:
                reasons.append("attn_mask is not a causal or sliding-window pattern" +
                               (" that can be checked under torch.compile" if is_compiling() else ""))
            else:
                window = intersect_windows(window, mask_window)
        if extra_keys and window != FULL_WINDOW:
            reasons.append("add_bias_kv/add_zero_attn keys combined with a causal or window mask")
        padding = None
        if key_padding_mask is not None:
            if key_padding_mask.dtype == torch.bool:
                padding = key_padding_mask
            elif is_compiling():
                reasons.append("a float key_padding_mask cannot be checked for 0/-inf under torch.compile "
                               "(pass a bool mask)")
            else:
                padding = bool_mask_of_additive(key_padding_mask)
                if padding is None:
                    reasons.append("key_padding_mask has float values other than 0 and -inf")
        return window, padding, reasons

    def _dense_mask(self, key_padding_mask, attn_mask, is_causal, batch, seqlen_q, seqlen_k, extra_keys, like
                    ) -> Optional[Tensor]:
        """One additive mask ``(B or 1, H or 1, Nq, Nk + extra_keys)`` with torch's meaning of every
        part, in the dtype and on the device of `like`."""
        total, dtype = None, like.dtype
        window = self._window
        if attn_mask is None and is_causal:
            window = intersect_windows(window, CAUSAL_WINDOW)
        if window != FULL_WINDOW:
            total = additive_of(~masks.materialize(seqlen_q, seqlen_k, window, device=like.device), dtype)
        if attn_mask is not None:
            part = additive_of(attn_mask, dtype)
            part = part.view(batch, self.num_heads, seqlen_q, seqlen_k) if part.dim() == 3 else part
            total = part if total is None else total + part
        if key_padding_mask is not None:
            part = additive_of(key_padding_mask, dtype).view(batch, 1, 1, seqlen_k)
            total = part if total is None else total + part
        if total is not None and extra_keys:
            total = F.pad(total, (0, extra_keys))  # the extra keys are visible to every query
        return total


class SelfAttention(torch.nn.Module):
    """Compact fused self-attention for ``(B, N, E)`` inputs, with GQA/MQA, causal and window options.

    ``qkv_proj``: one ``Linear(embed_dim, (num_heads + 2 * num_kv_heads) * head_dim)``, then
    ``out_proj``: ``Linear(num_heads * head_dim, embed_dim)``. ``forward(x, key_padding_mask=None)``
    with a bool ``(B, N)`` padding mask (True = padding). Always fused (no attention dropout, no
    attention weights); window/causal follow :func:`fastattn.attention`.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *,
                 head_dim: Optional[int] = None, causal: bool = False, window=None, bias: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if head_dim is None:
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), "
                                 f"or pass head_dim")
            head_dim = embed_dim // num_heads
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = embed_dim, num_heads, num_kv_heads, head_dim
        self.window_left_right = masks.normalise_window(window, causal)
        self.causal, self.window = causal, window
        factory = {"device": device, "dtype": dtype}
        self.qkv_proj = torch.nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * head_dim, bias=bias, **factory)
        self.out_proj = torch.nn.Linear(num_heads * head_dim, embed_dim, bias=bias, **factory)

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, causal={self.causal}, window={self.window}")

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be a (B, N, {self.embed_dim}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        batch, seqlen, _ = x.shape
        sizes = [self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim]
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
                   for t in self.qkv_proj(x).split(sizes, dim=-1))
        out = functional.attention(q, k, v, window=self.window_left_right, key_padding_mask=key_padding_mask)
        return self.out_proj(out.transpose(1, 2).reshape(batch, seqlen, -1))
