"""Drop-in transformer layers and ``swap_attention``.

``TransformerEncoderLayer`` and ``TransformerDecoderLayer`` subclass torch's, with the same
signatures, initialisation (the same seed gives the same weights) and state_dict keys; their
attention modules are :class:`fastattn.nn.MultiheadAttention`. They add ``window`` (a sliding
window for the self-attention). The encoder layer runs its own forward: torch's fused inference
fast path (``torch._transformer_encoder_layer_fwd``) would read the attention weights and bypass
fastattn, ignoring the window.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import masks
from .attention import MultiheadAttention

__all__ = ["TransformerEncoderLayer", "TransformerDecoderLayer", "swap_attention"]

Tensor = torch.Tensor


def _disable_torch_fast_path(layer: torch.nn.TransformerEncoderLayer) -> None:
    # torch reads this flag only to decide whether its fused kernels (the encoder layer's fast
    # path and nn.TransformerEncoder's nested-tensor path) may replace the layer's own forward;
    # 0 says they may not, so the (swapped) attention module really runs. The layer itself uses
    # `self.activation`, which is unchanged.
    layer.activation_relu_or_gelu = 0


class TransformerEncoderLayer(torch.nn.TransformerEncoderLayer):
    """``torch.nn.TransformerEncoderLayer`` with fastattn self-attention, plus ``window``.

    ``forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)`` as torch's. Masks
    are passed to :class:`fastattn.nn.MultiheadAttention` as given (bool masks stay bool, so they
    are served fused under torch.compile too). Use it inside ``nn.TransformerEncoder`` with
    ``enable_nested_tensor=False`` (torch warns otherwise; the result is the same).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None, *, window=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                         layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first, bias=bias,
                         device=device, dtype=dtype)
        MultiheadAttention.adopt(self.self_attn, window=window)
        _disable_torch_fast_path(self)

    def forward(self, src: Tensor, src_mask: Optional[Tensor] = None, src_key_padding_mask: Optional[Tensor] = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            x = x + self._ff_block(self.norm2(x))
        else:
            x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
            x = self.norm2(x + self._ff_block(x))
        return x


class TransformerDecoderLayer(torch.nn.TransformerDecoderLayer):
    """``torch.nn.TransformerDecoderLayer`` with fastattn self- and cross-attention, plus ``window``
    (a sliding window for the self-attention; cross-attention to ``memory`` stays full).

    ``forward(tgt, memory, tgt_mask, memory_mask, tgt_key_padding_mask, memory_key_padding_mask,
    tgt_is_causal, memory_is_causal)`` as torch's; ``tgt_is_causal=True`` without ``tgt_mask``
    means causal.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation=F.relu, layer_norm_eps: float = 1e-5, batch_first: bool = False,
                 norm_first: bool = False, bias: bool = True, device=None, dtype=None, *, window=None) -> None:
        super().__init__(d_model, nhead, dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                         layer_norm_eps=layer_norm_eps, batch_first=batch_first, norm_first=norm_first, bias=bias,
                         device=device, dtype=dtype)
        MultiheadAttention.adopt(self.self_attn, window=window)
        MultiheadAttention.adopt(self.multihead_attn)


def swap_attention(model: torch.nn.Module, window=None, causal: Optional[bool] = None) -> int:
    """Replaces every ``torch.nn.MultiheadAttention`` inside `model` by fastattn's, in place.

    Each module keeps its identity and its Parameter objects (weights, optimizer state and tied
    weights are untouched); only its forward becomes fastattn's. ``window`` and ``causal`` (None:
    False), when given, apply to every swapped module -- note that in an encoder-decoder model that
    includes the encoder and the cross-attention. Modules that are already fastattn's, and
    subclasses of torch's module (whose forward may differ), are left alone. torch's encoder-layer
    fast paths, which would bypass the swapped modules, are turned off for the layers that hold
    them. Returns how many modules were replaced.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if causal is None:
        causal = False
    masks.normalise_window(window, causal)  # bad arguments fail before any module changes
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.MultiheadAttention:
            MultiheadAttention.adopt(module, window=window, causal=causal)
            swapped += 1
    for module in model.modules():
        if isinstance(module, torch.nn.TransformerEncoderLayer) and isinstance(module.self_attn, MultiheadAttention):
            _disable_torch_fast_path(module)
        if isinstance(module, torch.nn.TransformerEncoder) and any(
                isinstance(layer, torch.nn.TransformerEncoderLayer) and isinstance(layer.self_attn, MultiheadAttention)
                for layer in module.layers):
            module.use_nested_tensor = False
    return swapped
