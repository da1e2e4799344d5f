"""Triton backward kernels: dq, dk, dv of out = softmax(scale * q k^T + mask) v, from saved lse.

Three launches, no atomics, so gradients are bitwise deterministic:

1. ``_attn_bwd_preprocess``: ``delta = rowsum(dout * out)`` (float32, (B, Hq, Nq)), by the same dot
   as dP so that rows seeing one key get dS = 0 exactly.
2. ``_attn_bwd_dkdv``: one program per (key block, query head) owns that head's share of dk and dv
   of its keys in registers and walks the query rows that can see them
   (``blocks.query_block_bounds``), recomputing ``P^T = exp2(scale * log2(e) * K Q^T - lse * log2(e))``:
   ``dv += P^T dout``, ``dk += (P^T * (V dout^T - delta)) q``. With GQA the shares go to an fp32
   buffer per query head and are summed over each group afterwards, in a fixed order (a loop over
   the group inside the program needed twice the shared memory and spilled registers).
3. ``_attn_bwd_dq``: one program per (query block, query head) walks the key blocks its rows can see
   (``blocks.key_block_bounds``): ``dq += (P * (dout V^T - delta)) k``.

The element mask is applied only on blocks that straddle a window edge or a sequence end. Padded
keys need no mask in (2): a key's dk/dv rows depend only on that key, so they are zeroed at the
store. Rows that saw no key (lse = -inf) get P = 0 everywhere, hence zero gradients.

Supports what the forward does (``fwd.py``): full/causal/window with bottom-right alignment, GQA/MQA,
key_padding_mask, head dims 1..256 (padded, masked), Dv != D, fp16/bf16/fp32 (fp32 accumulation,
IEEE fp32 dots), any strides with a contiguous last dim. Does not support float64 or dropout.
"""

import torch
import triton
import triton.language as tl

from . import configs
from .blocks import (head_base, key_block_bounds, load_tile, mma, query_block_bounds, query_block_program, round_to,
                     scores, store_tile, tile_base, visible)
from .fwd import AUTOTUNE_KEY, LOG2E, SIZE_ARGUMENTS, dot_options, kernel_constexprs, padding_arguments
from .launch import launch


@triton.jit
def _log2_lse(Lse_row, rows, seqlen_q):
    """lse in the exp2 domain; rows that saw no key (-inf), or lie past Nq, become +inf so that
    P = exp2(s - lse2) is 0 for them instead of exp2(+inf) or NaN."""
    lse = tl.load(Lse_row + rows, mask=rows < seqlen_q, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.jit(do_not_specialize=["heads_q", "seqlen_q"])
def _attn_bwd_preprocess(Out, DOut, Delta,
                         stride_ob, stride_oh, stride_om,
                         stride_dob, stride_doh, stride_dom,
                         heads_q, seqlen_q, head_dim_v,
                         BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """delta = rowsum(dout * out), as the diagonal of dout out^T computed by the very dot
    (``blocks.scores``) that gives dP = dout v^T in the other kernels. A row that sees a single key
    has out = that key's v exactly, so delta equals its dP bit for bit and dS = P (dP - delta) is
    exactly 0, as the float64 oracle says; a separately rounded sum would leave ~1e-7 there."""
    start_m = tl.program_id(0) * BLOCK_M
    off_bh = tl.program_id(1)
    off_b = off_bh // heads_q
    off_h = off_bh % heads_q
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    block_rows = tl.arange(0, BLOCK_M)[:, None]
    Out_block = tile_base(Out, off_b, off_h, start_m, stride_ob, stride_oh, stride_om)
    DOut_block = tile_base(DOut, off_b, off_h, start_m, stride_dob, stride_doh, stride_dom)
    out = load_tile(Out_block + block_rows * stride_om + offs_dv[None, :], offs_m, seqlen_q, offs_dv, head_dim_v,
                    True)
    dout = load_tile(DOut_block + block_rows * stride_dom + offs_dv[None, :], offs_m, seqlen_q, offs_dv, head_dim_v,
                     True)
    products = scores(dout, out, DOut_block, stride_dom, offs_m, seqlen_q, Out_block, stride_om, offs_m, seqlen_q,
                      head_dim_v, DOT_PRECISION, INTERPRETER)
    delta = tl.sum(tl.where(offs_m[:, None] == offs_m[None, :], products, 0.0), 1)
    tl.store(Delta + off_bh.to(tl.int64) * seqlen_q + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _dkdv_blocks(dk, dv, k, v, K_block, V_block, stride_kn, stride_vn, Q_head, DOut_head, Lse_row, Delta_row,
                 q_offsets, do_offsets, stride_qm, stride_dom, offs_n, offs_m, offs_d, offs_dv, head_dim, head_dim_v,
                 block_start, block_end, seqlen_q, seqlen_k, window_left, window_right, scale_log2,
                 BLOCK_M: tl.constexpr, MASK_WINDOW: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Accumulates dk (unscaled) and dv of one key block over the query blocks in
    [block_start, block_end) of one query head; `MASK_WINDOW` for straddling blocks."""
    for start_m in range(block_start, block_end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        rows = start_m + offs_m
        Q_block = Q_head + start_m.to(tl.int64) * stride_qm
        DOut_block = DOut_head + start_m.to(tl.int64) * stride_dom
        q = load_tile(Q_block + q_offsets, rows, seqlen_q, offs_d, head_dim, MASK_WINDOW)
        lse2 = _log2_lse(Lse_row, rows, seqlen_q)
        qk_t = scores(k, q, K_block, stride_kn, offs_n, seqlen_k, Q_block, stride_qm, rows, seqlen_q, head_dim,
                      DOT_PRECISION, INTERPRETER)
        p_t = tl.math.exp2(qk_t * scale_log2 - lse2[None, :])
        if MASK_WINDOW:
            p_t = tl.where(visible(rows[None, :], offs_n[:, None], seqlen_q, seqlen_k, window_left, window_right),
                           p_t, 0.0)
        dout = load_tile(DOut_block + do_offsets, rows, seqlen_q, offs_dv, head_dim_v, MASK_WINDOW)
        dv = mma(round_to(p_t, dout.dtype, INTERPRETER), dout, dv, DOT_PRECISION, INTERPRETER)
        delta = tl.load(Delta_row + rows, mask=rows < seqlen_q, other=0.0)
        dp_t = scores(v, dout, V_block, stride_vn, offs_n, seqlen_k, DOut_block, stride_dom, rows, seqlen_q,
                      head_dim_v, DOT_PRECISION, INTERPRETER)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = mma(round_to(ds_t, q.dtype, INTERPRETER), q, dk, DOT_PRECISION, INTERPRETER)
    return dk, dv


@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def _attn_bwd_dkdv(Q, K, V, DOut, Lse, Delta, DK, DV, Padding,
                   stride_qb, stride_qh, stride_qm,
                   stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn,
                   stride_dob, stride_doh, stride_dom,
                   stride_dkb, stride_dkh, stride_dkn,
                   stride_dvb, stride_dvh, stride_dvn,
                   stride_pb, stride_pn,
                   heads_q, kv_group, seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
                   scale, scale_log2, SEQLEN_Q_BUCKET, SEQLEN_K_BUCKET, SPAN_BUCKET,
                   BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_PADDING: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    off_bh = tl.program_id(1)
    off_b = off_bh // heads_q
    off_hq = off_bh % heads_q
    off_hkv = off_hq // kv_group

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    block_keys = tl.arange(0, BLOCK_N)[:, None]
    K_block = tile_base(K, off_b, off_hkv, start_n, stride_kb, stride_kh, stride_kn)
    V_block = tile_base(V, off_b, off_hkv, start_n, stride_vb, stride_vh, stride_vn)
    k = load_tile(K_block + block_keys * stride_kn + offs_d[None, :], offs_n, seqlen_k, offs_d, head_dim, True)
    v = load_tile(V_block + block_keys * stride_vn + offs_dv[None, :], offs_n, seqlen_k, offs_dv, head_dim_v, True)
    q_offsets = offs_m[:, None] * stride_qm + offs_d[None, :]
    do_offsets = offs_m[:, None] * stride_dom + offs_dv[None, :]

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    key_end = tl.minimum(start_n + BLOCK_N, seqlen_k)
    start, full_start, full_end, end = query_block_bounds(start_n, key_end, seqlen_q, seqlen_k, window_left,
                                                          window_right, BLOCK_M)
    Q_head = head_base(Q, off_b, off_hq, stride_qb, stride_qh)
    DOut_head = head_base(DOut, off_b, off_hq, stride_dob, stride_doh)
    Lse_row = Lse + off_bh.to(tl.int64) * seqlen_q
    Delta_row = Delta + off_bh.to(tl.int64) * seqlen_q
    # Lower-edge query blocks (masked), fully visible ones (unmasked), upper-edge ones (masked).
    for phase in tl.static_range(3):
        if phase == 0:
            block_start, block_end = start, full_start
        elif phase == 1:
            block_start, block_end = full_start, full_end
        else:
            block_start, block_end = full_end, end
        dk, dv = _dkdv_blocks(dk, dv, k, v, K_block, V_block, stride_kn, stride_vn, Q_head, DOut_head, Lse_row,
                              Delta_row, q_offsets, do_offsets, stride_qm, stride_dom, offs_n, offs_m, offs_d,
                              offs_dv, head_dim, head_dim_v, block_start, block_end, seqlen_q, seqlen_k,
                              window_left, window_right, scale_log2, BLOCK_M, phase != 1, DOT_PRECISION,
                              INTERPRETER)

    dk = dk * scale
    if HAS_PADDING:
        # P is 0 in every column of a padded key, so its dk and dv rows are exactly 0.
        padding = tl.load(Padding + off_b.to(tl.int64) * stride_pb + offs_n * stride_pn, mask=offs_n < seqlen_k,
                          other=1)
        dk = tl.where(padding[:, None] != 0, 0.0, dk)
        dv = tl.where(padding[:, None] != 0, 0.0, dv)
    DK_block = tile_base(DK, off_b, off_hq, start_n, stride_dkb, stride_dkh, stride_dkn)
    DV_block = tile_base(DV, off_b, off_hq, start_n, stride_dvb, stride_dvh, stride_dvn)
    store_tile(DK_block + block_keys * stride_dkn + offs_d[None, :], dk, offs_n, seqlen_k, offs_d, head_dim,
               INTERPRETER)
    store_tile(DV_block + block_keys * stride_dvn + offs_dv[None, :], dv, offs_n, seqlen_k, offs_dv, head_dim_v,
               INTERPRETER)


@triton.jit
def _dq_blocks(dq, q, dout, lse2, delta, Q_block, DOut_block, stride_qm, stride_dom, K_head, V_head, k_offsets,
               v_offsets, stride_kn, stride_vn, Padding_row, stride_pn, offs_m, offs_n, offs_d, offs_dv, head_dim,
               head_dim_v, block_start, block_end, seqlen_q, seqlen_k, window_left, window_right, scale_log2,
               BLOCK_N: tl.constexpr, MASK_WINDOW: tl.constexpr, HAS_PADDING: tl.constexpr,
               DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """Accumulates dq (unscaled) of one query block over the key blocks in [block_start, block_end);
    `MASK_WINDOW` for straddling blocks."""
    for start_n in range(block_start, block_end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        keys = start_n + offs_n
        K_block = K_head + start_n.to(tl.int64) * stride_kn
        V_block = V_head + start_n.to(tl.int64) * stride_vn
        k = load_tile(K_block + k_offsets, keys, seqlen_k, offs_d, head_dim, MASK_WINDOW)
        v = load_tile(V_block + v_offsets, keys, seqlen_k, offs_dv, head_dim_v, MASK_WINDOW)
        qk = scores(q, k, Q_block, stride_qm, offs_m, seqlen_q, K_block, stride_kn, keys, seqlen_k, head_dim,
                    DOT_PRECISION, INTERPRETER)
        p = tl.math.exp2(qk * scale_log2 - lse2[:, None])
        if MASK_WINDOW:
            p = tl.where(visible(offs_m[:, None], keys[None, :], seqlen_q, seqlen_k, window_left, window_right), p, 0.0)
        if HAS_PADDING:
            padding = tl.load(Padding_row + keys * stride_pn, mask=keys < seqlen_k, other=1)
            p = tl.where(padding[None, :] != 0, 0.0, p)
        dp = scores(dout, v, DOut_block, stride_dom, offs_m, seqlen_q, V_block, stride_vn, keys, seqlen_k,
                    head_dim_v, DOT_PRECISION, INTERPRETER)
        ds = p * (dp - delta[:, None])
        dq = mma(round_to(ds, k.dtype, INTERPRETER), k, dq, DOT_PRECISION, INTERPRETER)
    return dq


@triton.jit(do_not_specialize=SIZE_ARGUMENTS)
def _attn_bwd_dq(Q, K, V, DOut, Lse, Delta, DQ, Padding,
                 stride_qb, stride_qh, stride_qm,
                 stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn,
                 stride_dob, stride_doh, stride_dom,
                 stride_dqb, stride_dqh, stride_dqm,
                 stride_pb, stride_pn,
                 heads_q, kv_group, seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right,
                 scale, scale_log2, SEQLEN_Q_BUCKET, SEQLEN_K_BUCKET, SPAN_BUCKET,
                 BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_PADDING: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m, off_bh, off_b, off_hq, off_hkv = query_block_program(heads_q, kv_group, BLOCK_M)

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    block_rows = tl.arange(0, BLOCK_M)[:, None]
    Q_block = tile_base(Q, off_b, off_hq, start_m, stride_qb, stride_qh, stride_qm)
    DOut_block = tile_base(DOut, off_b, off_hq, start_m, stride_dob, stride_doh, stride_dom)
    q = load_tile(Q_block + block_rows * stride_qm + offs_d[None, :], offs_m, seqlen_q, offs_d, head_dim, True)
    dout = load_tile(DOut_block + block_rows * stride_dom + offs_dv[None, :], offs_m, seqlen_q, offs_dv, head_dim_v,
                     True)
    lse2 = _log2_lse(Lse + off_bh.to(tl.int64) * seqlen_q, offs_m, seqlen_q)
    delta = tl.load(Delta + off_bh.to(tl.int64) * seqlen_q + offs_m, mask=offs_m < seqlen_q, other=0.0)
    K_head = head_base(K, off_b, off_hkv, stride_kb, stride_kh)
    V_head = head_base(V, off_b, off_hkv, stride_vb, stride_vh)
    Padding_row = Padding + off_b.to(tl.int64) * stride_pb
    k_offsets = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offsets = offs_n[:, None] * stride_vn + offs_dv[None, :]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    row_end = tl.minimum(start_m + BLOCK_M, seqlen_q)
    start, full_start, full_end, end = key_block_bounds(start_m, row_end, seqlen_q, seqlen_k, window_left,
                                                        window_right, BLOCK_N)
    for phase in tl.static_range(3):  # lower-edge (masked), fully visible, upper-edge (masked) blocks
        if phase == 0:
            block_start, block_end = start, full_start
        elif phase == 1:
            block_start, block_end = full_start, full_end
        else:
            block_start, block_end = full_end, end
        dq = _dq_blocks(dq, q, dout, lse2, delta, Q_block, DOut_block, stride_qm, stride_dom, K_head, V_head,
                        k_offsets, v_offsets, stride_kn, stride_vn, Padding_row, stride_pn, offs_m, offs_n, offs_d,
                        offs_dv, head_dim, head_dim_v, block_start, block_end, seqlen_q, seqlen_k, window_left,
                        window_right, scale_log2, BLOCK_N, phase != 1, HAS_PADDING, DOT_PRECISION, INTERPRETER)

    DQ_block = tile_base(DQ, off_b, off_hq, start_m, stride_dqb, stride_dqh, stride_dqm)
    store_tile(DQ_block + block_rows * stride_dqm + offs_d[None, :], dq * scale, offs_m, seqlen_q, offs_d, head_dim,
               INTERPRETER)


attn_bwd_dkdv_autotuned = triton.autotune(configs=configs.all_configs("dkdv"), key=AUTOTUNE_KEY,
                                          prune_configs_by={"early_config_prune": configs.prune_configs("dkdv")},
                                          )(_attn_bwd_dkdv)
attn_bwd_dq_autotuned = triton.autotune(configs=configs.all_configs("dq"), key=AUTOTUNE_KEY,
                                        prune_configs_by={"early_config_prune": configs.prune_configs("dq")},
                                        )(_attn_bwd_dq)


def attention_backward(dout, q, k, v, out, lse, key_padding_mask, scale: float, window_left: int,
                       window_right: int, dq, dk, dv) -> None:
    """Fills dq, dk, dv. The window sides are clamped (``launch.clamp_window``), every tensor has a
    contiguous last dim, lse is float32 (B, Hq, Nq) contiguous, and Nq, Nk > 0."""
    batch, heads_q, seqlen_q, head_dim = q.shape
    heads_kv, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]

    delta = torch.empty((batch, heads_q, seqlen_q), dtype=torch.float32, device=q.device)
    launch(None, _attn_bwd_preprocess, (triton.cdiv(seqlen_q, configs.PREPROCESS_BLOCK_M), batch * heads_q),
           out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
           dout.stride(2), heads_q, seqlen_q, head_dim_v,
           BLOCK_DV=configs.head_dim_block(head_dim_v), BLOCK_M=configs.PREPROCESS_BLOCK_M, **dot_options(q.dtype))

    padding, padding_strides = padding_arguments(key_padding_mask, q)
    sizes = (seqlen_q, seqlen_k, head_dim, head_dim_v, window_left, window_right, scale, scale * LOG2E,
             *configs.buckets(seqlen_q, seqlen_k, window_left, window_right))
    constexprs = kernel_constexprs(q.dtype, head_dim, head_dim_v, key_padding_mask is not None)
    # With GQA each query head's share of dk/dv goes to an fp32 buffer, summed over the group below
    # in a fixed order (deterministic, no atomics); without, the kernel writes dk and dv directly.
    kv_group = heads_q // heads_kv
    if kv_group == 1:
        dk_heads, dv_heads = dk, dv
    else:
        dk_heads = torch.empty((batch, heads_q, seqlen_k, head_dim), dtype=torch.float32, device=q.device)
        dv_heads = torch.empty((batch, heads_q, seqlen_k, head_dim_v), dtype=torch.float32, device=q.device)
    launch("dkdv", attn_bwd_dkdv_autotuned, lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), batch * heads_q),
           q, k, v, dout, lse, delta, dk_heads, dv_heads, padding,
           q.stride(0), q.stride(1), q.stride(2),
           k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2),
           dout.stride(0), dout.stride(1), dout.stride(2),
           dk_heads.stride(0), dk_heads.stride(1), dk_heads.stride(2),
           dv_heads.stride(0), dv_heads.stride(1), dv_heads.stride(2),
           *padding_strides, heads_q, kv_group, *sizes, **constexprs)
    if kv_group > 1:
        dk.copy_(dk_heads.view(batch, heads_kv, kv_group, seqlen_k, head_dim).sum(2))
        dv.copy_(dv_heads.view(batch, heads_kv, kv_group, seqlen_k, head_dim_v).sum(2))
    launch("dq", attn_bwd_dq_autotuned, lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads_q),
           q, k, v, dout, lse, delta, dq, padding,
           q.stride(0), q.stride(1), q.stride(2),
           k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2),
           dout.stride(0), dout.stride(1), dout.stride(2),
           dq.stride(0), dq.stride(1), dq.stride(2),
           *padding_strides, heads_q, kv_group, *sizes, **constexprs)
