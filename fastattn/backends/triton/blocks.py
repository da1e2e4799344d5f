"""The visibility rule of ``fastattn.masks`` as Triton helpers, shared by the forward and backward.

Query row ``i`` sits at key position ``p = i + Nk - Nq`` and sees key ``j`` iff
``p - left <= j <= p + right`` (and ``j < Nk``, and the key is not padding). The launchers pass the
window sides already clamped to ``0 <= left <= Nk`` and ``0 <= right <= Nq`` (``-1``, unbounded,
becomes ``Nk`` or ``Nq``: those cover every key), so the helpers need no sign tests.

A program turns the rule into four block-aligned bounds over the other sequence:
``[start, full_start)`` blocks straddle the window's lower edge (element mask),
``[full_start, full_end)`` blocks are fully visible (no mask, no bounds checks),
``[full_end, end)`` blocks straddle the upper edge or the end of the sequence (element mask).
Blocks outside ``[start, end)`` are never visited, so cost grows with N * window, not N^2.
"""

import triton
import triton.language as tl


@triton.jit
def _clamped_block_bounds(first, end, full_first, full_end, BLOCK: tl.constexpr):
    """Aligns [first, end) outward and [full_first, full_end) inward to BLOCK multiples, keeping
    start <= full_start <= full_end <= end_aligned; an empty [first, end) visits nothing."""
    end = tl.maximum(end, first)
    start = (first // BLOCK) * BLOCK
    end_aligned = tl.where(end > first, tl.cdiv(end, BLOCK) * BLOCK, start)
    full_start = tl.minimum(tl.maximum(tl.cdiv(full_first, BLOCK) * BLOCK, start), end_aligned)
    full_end = tl.minimum(tl.maximum((full_end // BLOCK) * BLOCK, full_start), end_aligned)
    return start, full_start, full_end, end_aligned


@triton.jit
def key_block_bounds(row_begin, row_end, seqlen_q, seqlen_k, window_left, window_right, BLOCK_N: tl.constexpr):
    """Key-block bounds ``(start, full_start, full_end, end)`` for query rows [row_begin, row_end),
    a non-empty range of rows < Nq."""
    offset = seqlen_k - seqlen_q
    # The window's edges rise with the row: the first row bounds the union from below and the
    # fully visible part from above, the last row the other way round.
    first = tl.maximum(row_begin + offset - window_left, 0)
    end = tl.minimum(row_end + offset + window_right, seqlen_k)
    full_first = tl.maximum(row_end - 1 + offset - window_left, 0)
    full_end = tl.minimum(row_begin + offset + window_right + 1, seqlen_k)
    return _clamped_block_bounds(first, end, full_first, full_end, BLOCK_N)


@triton.jit
def query_block_bounds(key_begin, key_end, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M: tl.constexpr):
    """Query-block bounds ``(start, full_start, full_end, end)`` for keys [key_begin, key_end),
    a non-empty range of keys < Nk (the transposed rule, for the backward over key blocks)."""
    offset = seqlen_k - seqlen_q
    first = tl.maximum(key_begin - window_right - offset, 0)
    end = tl.minimum(key_end + window_left - offset, seqlen_q)
    full_first = tl.maximum(key_end - 1 - window_right - offset, 0)
    full_end = tl.minimum(key_begin + window_left - offset + 1, seqlen_q)
    return _clamped_block_bounds(first, end, full_first, full_end, BLOCK_M)


@triton.jit
def visible(rows, keys, seqlen_q, seqlen_k, window_left, window_right):
    """The element mask of a straddling block; `rows` and `keys` broadcast against each other
    (``rows[:, None], keys[None, :]`` or transposed)."""
    position = rows + (seqlen_k - seqlen_q)
    return (keys >= position - window_left) & (keys <= position + window_right) & (keys < seqlen_k)


@triton.jit
def query_block_program(heads_q, kv_group, BLOCK_M: tl.constexpr):
    """The query block and head a forward or dQ program owns: ``(start_m, off_bh, off_b, off_hq,
    off_hkv)``. Query blocks run heaviest first (with a causal mask the last rows see the most
    keys), so the long programs do not finish last."""
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    off_bh = tl.program_id(1)
    off_hq = off_bh % heads_q
    return start_m, off_bh, off_bh // heads_q, off_hq, off_hq // kv_group


@triton.jit
def head_base(X, batch, head, stride_batch, stride_head):
    """Pointer to element (batch, head, 0, 0) of a strided (B, H, N, D) tensor, in 64-bit
    arithmetic so that large tensors never overflow; in-tile offsets stay 32-bit."""
    return X + batch.to(tl.int64) * stride_batch + head.to(tl.int64) * stride_head


@triton.jit
def tile_base(X, batch, head, row, stride_batch, stride_head, stride_row):
    """Pointer to element (batch, head, row, 0), like ``head_base``."""
    return head_base(X, batch, head, stride_batch, stride_head) + row.to(tl.int64) * stride_row


@triton.jit
def load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr):
    """Loads a [rows, cols] tile, zero outside. Columns (the head dim, padded up to a power of two)
    are always bounded, a loop-invariant mask; rows only where `CHECK_ROWS` (blocks that may
    cross the end of the sequence)."""
    if CHECK_ROWS:
        tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    else:
        tile = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    return tile


@triton.jit
def store_tile(ptrs, value, rows, n_rows, cols, n_cols, INTERPRETER: tl.constexpr):
    """Stores the fp32 tile `value` in the pointers' dtype (see ``round_to``), inside the bounds."""
    tl.store(ptrs, round_to(value, ptrs.dtype.element_ty, INTERPRETER),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def scores(a, b, A_block, stride_a, a_rows, n_a_rows, B_block, stride_b, b_rows, n_b_rows, n_cols,
           DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """``a @ b^T`` of two tiles whose inner dimension is the head dim, accumulated in fp32.

    fp16/bf16 multiply the register tiles `a`, `b` on the tensor cores. fp32 (IEEE, on the CUDA
    cores) instead reads both again from memory, 16 columns at a time (L1 hits): triton's FMA dot
    keeps whole rows of both operands in each thread's registers, which spills for head dims
    >= 64. (The interpreter takes 64 columns at a time: the same code, fewer slow steps.) `A_block`/`B_block` point at the tiles' row 0, `a_rows`/`b_rows` are their row
    indices, `n_cols` the head dim; the unused register tile is then dropped by the compiler."""
    if DOT_PRECISION == "ieee":
        local_a = tl.arange(0, a.shape[0])[:, None] * stride_a
        local_b = tl.arange(0, b.shape[0])[:, None] * stride_b
        result = tl.zeros([a.shape[0], b.shape[0]], dtype=tl.float32)
        CHUNK: tl.constexpr = 64 if INTERPRETER else 16
        for chunk in tl.static_range(0, a.shape[1], CHUNK):
            cols = chunk + tl.arange(0, CHUNK)
            a_part = load_tile(A_block + local_a + cols[None, :], a_rows, n_a_rows, cols, n_cols, True)
            b_part = load_tile(B_block + local_b + cols[None, :], b_rows, n_b_rows, cols, n_cols, True)
            result = tl.dot(a_part, tl.trans(b_part), result, input_precision="ieee")
    else:
        result = mma(a, tl.trans(b), None, DOT_PRECISION, INTERPRETER)
    return result


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """``x.to(dtype)``, rounding to nearest even as the GPU does. The Triton interpreter's
    fp32 -> bf16 cast truncates instead, so there the value is rounded by hand first and the cast
    after it is exact."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, INTERPRETER: tl.constexpr):
    """``a @ b (+ acc)`` accumulated in fp32. The Triton interpreter's dot multiplies bf16 bit
    patterns, so there bf16 operands are upcast first: bf16 products are exact in fp32, which is
    what the tensor cores compute."""
    if INTERPRETER and a.dtype == tl.bfloat16:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        result = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return result
