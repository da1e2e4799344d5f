"""Triton forward kernel: out = softmax(scale * q k^T + mask) v and lse, never storing the scores.

One program per (query block, query head) runs FlashAttention-2's online softmax in the exp2
domain over only the key blocks its rows can see (``blocks.key_block_bounds``); the element mask
(window edges, end of the keys) is applied only on blocks that straddle a boundary, the
key_padding_mask on every block when one is given.

Supports: full, causal and sliding-window ``(left, right)`` attention with bottom-right alignment
(``Nq != Nk``), GQA/MQA (query head h reads kv head h // group), key_padding_mask, head dims
1..256 (padded to a power of two >= 16 inside, masked), ``Dv != D``, fp16/bf16/fp32 inputs with
fp32 accumulation (fp32 dots in IEEE precision, no TF32), any strides with a contiguous last dim.
Rows that see no key get out = 0 and lse = -inf. lse is natural-log, float32, (B, Hq, Nq).

Does not support: float64, dropout, attention bias or arbitrary dense masks.
"""

import torch
import triton
import triton.language as tl

from . import configs
from .blocks import (head_base, key_block_bounds, load_tile, mma, query_block_program, round_to, scores, store_tile,
                     tile_base, visible)
from .launch import is_interpreter, launch

LOG2E = 1.4426950408889634

#: Integer arguments triton must not specialise (on divisibility by 16 or equality to 1): they
#: change with every problem size and specialising would only multiply the compiled binaries.
#: Strides, head dims and the GQA group stay specialised (vector widths, a folded group loop).
SIZE_ARGUMENTS = ["heads_q", "seqlen_q", "seqlen_k", "window_left", "window_right",
                  "SEQLEN_Q_BUCKET", "SEQLEN_K_BUCKET", "SPAN_BUCKET"]


def dot_options(dtype: torch.dtype) -> dict:
    """The kernels' dot constexprs. fp32 inputs multiply in IEEE fp32 (TF32 would miss the
    oracle's tolerance); fp16/bf16 use the tensor cores (the precision only matters for fp32).
    ``INTERPRETER`` selects the interpreter's workarounds (``blocks.mma``, ``blocks.round_to``)."""
    return {"DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
            "INTERPRETER": is_interpreter()}


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, Q_block, stride_qm, K_head, V_head, k_offsets, v_offsets, stride_kn, stride_vn,
                Padding_row, stride_pn, offs_m, offs_n, offs_d, offs_dv, head_dim, head_dim_v,
                block_start, block_end, seqlen_q, seqlen_k, window_left, window_right, scale_log2,
                BLOCK_N: tl.constexpr, MASK_WINDOW: tl.constexpr, HAS_PADDING: tl.constexpr,
                DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Online-softmax update of (acc, l_i, m_i) over the key blocks in [block_start, block_end);
    `MASK_WINDOW` for blocks that straddle a window edge or the end of the keys."""
    for start_n in range(block_start, block_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n
        K_block = K_head + start_n.to(tl.int64) * stride_kn
        k = load_tile(K_block + k_offsets, keys, seqlen_k, offs_d, head_dim, MASK_WINDOW)
        qk = scores(q, k, Q_block, stride_qm, offs_m, seqlen_q, K_block, stride_kn, keys, seqlen_k, head_dim,
                    DOT_PRECISION, INTERPRETER)
        if MASK_WINDOW or HAS_PADDING:
            qk = qk * scale_log2
            if MASK_WINDOW:
                mask = visible(offs_m[:, None], keys[None, :], seqlen_q, seqlen_k, window_left, window_right)
                qk = tl.where(mask, qk, float("-inf"))
            if HAS_PADDING:
                padding = tl.load(Padding_row + keys * stride_pn, mask=keys < seqlen_k, other=1)
                qk = tl.where(padding[None, :] != 0, float("-inf"), qk)
            m_ij = tl.maximum(m_i, tl.max(qk, 1))
            # Rows that have seen no key yet keep m = -inf: shift them by 0 so exp2 gives 0, not NaN.
            m_shift = tl.where(m_ij == float("-inf"), 0.0, m_ij)
            p = tl.math.exp2(qk - m_shift[:, None])
            alpha = tl.math.exp2(m_i - m_shift)
        else:
            # Every score is finite here: fold the scale into the exponent's FMA.
            m_ij = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            p = tl.math.exp2(qk * scale_log2 - m_ij[:, None])
            alpha = tl.math.exp2(m_i - m_ij)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = load_tile(V_head + start_n.to(tl.int64) * stride_vn + v_offsets, keys, seqlen_k, offs_dv, head_dim_v,
                      MASK_WINDOW)
        acc = mma(round_to(p, v.dtype, INTERPRETER), v, acc, DOT_PRECISION, INTERPRETER)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def _attn_fwd(Q, K, V, Out, Lse, Padding,
              stride_qb, stride_qh, stride_qm,
              stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn,
              stride_ob, stride_oh, stride_om,
              stride_pb, stride_pn,
              heads_q, kv_group, seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, scale_log2,
              SEQLEN_Q_BUCKET, SEQLEN_K_BUCKET, SPAN_BUCKET,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_PADDING: tl.constexpr,
              DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh, off_b, off_hq, off_hkv = query_block_program(heads_q, kv_group, BLOCK_M)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # 64-bit scalar bases, 32-bit in-tile offsets: large tensors never overflow an int32.
    Q_block = tile_base(Q, off_b, off_hq, start_m, stride_qb, stride_qh, stride_qm)
    K_head = head_base(K, off_b, off_hkv, stride_kb, stride_kh)
    V_head = head_base(V, off_b, off_hkv, stride_vb, stride_vh)
    Padding_row = Padding + off_b.to(tl.int64) * stride_pb
    k_offsets = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offsets = offs_n[:, None] * stride_vn + offs_dv[None, :]

    q = load_tile(Q_block + tl.arange(0, BLOCK_M)[:, None] * stride_qm + offs_d[None, :], offs_m, seqlen_q,
                  offs_d, head_dim, True)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    row_end = tl.minimum(start_m + BLOCK_M, seqlen_q)
    start, full_start, full_end, end = key_block_bounds(start_m, row_end, seqlen_q, seqlen_k, window_left,
                                                        window_right, BLOCK_N)
    # Three passes: lower-edge blocks (masked), fully visible blocks (unmasked), upper-edge blocks
    # (masked); each pass is its own pipelined loop.
    for phase in tl.static_range(3):
        if phase == 0:
            block_start, block_end = start, full_start
        elif phase == 1:
            block_start, block_end = full_start, full_end
        else:
            block_start, block_end = full_end, end
        acc, l_i, m_i = _fwd_blocks(acc, l_i, m_i, q, Q_block, stride_qm, K_head, V_head, k_offsets, v_offsets,
                                    stride_kn, stride_vn, Padding_row, stride_pn, offs_m, offs_n, offs_d, offs_dv,
                                    head_dim, head_dim_v, block_start, block_end, seqlen_q, seqlen_k, window_left,
                                    window_right, scale_log2, BLOCK_N, phase != 1, HAS_PADDING, DOT_PRECISION,
                                    INTERPRETER)

    # Rows that saw no key (l = 0): out = 0 and lse = -inf, never 0/0.
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # log2 -> ln

    Out_block = tile_base(Out, off_b, off_hq, start_m, stride_ob, stride_oh, stride_om)
    store_tile(Out_block + tl.arange(0, BLOCK_M)[:, None] * stride_om + offs_dv[None, :], out, offs_m, seqlen_q,
               offs_dv, head_dim_v, INTERPRETER)
    tl.store(Lse + off_bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)


#: What autotuning is keyed on (bucketed lengths, padded head dims); triton adds the dtypes.
AUTOTUNE_KEY = ["SEQLEN_Q_BUCKET", "SEQLEN_K_BUCKET", "SPAN_BUCKET", "BLOCK_D", "BLOCK_DV", "HAS_PADDING"]

attn_fwd_autotuned = triton.autotune(configs=configs.all_configs("fwd"), key=AUTOTUNE_KEY,
                                     prune_configs_by={"early_config_prune": configs.prune_configs("fwd")},
                                     )(_attn_fwd)


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask, scale: float,
                      window_left: int, window_right: int, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fills `out` (B, Hq, Nq, Dv) and `lse` (B, Hq, Nq, float32 contiguous). The window sides are
    clamped (``launch.clamp_window``), every tensor has a contiguous last dim, and Nk > 0."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    padding, padding_strides = padding_arguments(key_padding_mask, q)
    launch("fwd", attn_fwd_autotuned, lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads_q),
           q, k, v, out, lse, padding,
           q.stride(0), q.stride(1), q.stride(2),
           k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2),
           out.stride(0), out.stride(1), out.stride(2),
           *padding_strides,
           heads_q, heads_q // heads_kv, seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
           scale * LOG2E, *configs.buckets(seqlen_q, seqlen_k, window_left, window_right),
           **kernel_constexprs(q.dtype, head_dim, head_dim_v, key_padding_mask is not None))


def padding_arguments(key_padding_mask, placeholder):
    """The padding pointer and its strides; without a mask, any tensor stands in (never read)."""
    if key_padding_mask is None:
        return placeholder, (0, 0)
    return key_padding_mask, key_padding_mask.stride()


def kernel_constexprs(dtype: torch.dtype, head_dim: int, head_dim_v: int, has_padding: bool) -> dict:
    return dict(BLOCK_D=configs.head_dim_block(head_dim), BLOCK_DV=configs.head_dim_block(head_dim_v),
                HAS_PADDING=has_padding, **dot_options(dtype))
