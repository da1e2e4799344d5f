"""Drop-in ``torch.nn`` modules computed by fastattn's fused kernels.

* :class:`MultiheadAttention` -- ``torch.nn.MultiheadAttention``'s signature and state_dict, plus
  ``window`` and ``causal``;
* :class:`TransformerEncoderLayer`, :class:`TransformerDecoderLayer` -- torch's, plus ``window``;
* :class:`SelfAttention` -- compact ``(B, N, E)`` self-attention with GQA, causal and window;
* :func:`swap_attention` -- turns every ``torch.nn.MultiheadAttention`` of a model into fastattn's.

What is fused and what falls back to the dense path: ``docs/nn.md``.
"""

from .attention import MultiheadAttention, SelfAttention
from .transformer import TransformerDecoderLayer, TransformerEncoderLayer, swap_attention

__all__ = ["MultiheadAttention", "SelfAttention", "TransformerEncoderLayer", "TransformerDecoderLayer",
           "swap_attention"]
