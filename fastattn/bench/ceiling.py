"""The machine's matrix-multiply rate: the ceiling an attention kernel is measured against.

A fused attention forward is two matrix products per head (``S = q k^T`` and ``O = P v``) plus the
softmax between them, so ``torch.mm`` on the same operand shapes bounds what any attention kernel
can reach on this device and dtype. ``matmul_rates`` times ``torch.mm`` at the shapes of one head's
two products (N x D by D x N, and N x N by N x D) and at a large square product (the best case
for the BLAS), with the same timer and median as the benchmark; ``ceiling_table`` formats them
beside attention results' GFLOP/s as fractions of the best rate of their dtype.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import List, Sequence, Tuple

import torch

from .cli import DTYPES
from .measure import time_once, warm_up

__all__ = ["MatmulRate", "attention_shapes", "matmul_rates", "ceiling_table"]


@dataclasses.dataclass
class MatmulRate:
    dtype: str
    shape: Tuple[int, int, int]  # (m, n, k): an m x k matrix times a k x n one
    what: str
    gflops: float  # 2 m n k / median time


def attention_shapes(seqlen: int, head_dim: int, square: int = 2048) -> List[Tuple[Tuple[int, int, int], str]]:
    """The (m, n, k) of one head's two forward products at this length, and a large square."""
    return [((seqlen, seqlen, head_dim), "S = q k^T, one head"),
            ((seqlen, head_dim, seqlen), "O = P v, one head"),
            ((square, square, square), "square (the BLAS's best case)")]


def matmul_rates(shapes: Sequence[Tuple[Tuple[int, int, int], str]], dtypes: Sequence[str],
                 device: str = "cpu", repeats: int = 10, warmup: int = 2) -> List[MatmulRate]:
    """GFLOP/s of ``torch.mm`` per dtype (the benchmark's names: fp32, bf16, ...) and shape:
    2 m n k over the median of `repeats` calls."""
    rates = []
    dev = torch.device(device)
    for dtype in dtypes:
        for (m, n, k), what in shapes:
            a = torch.randn(m, k, device=dev).to(DTYPES[dtype])
            b = torch.randn(k, n, device=dev).to(DTYPES[dtype])
            warm_up(lambda _: torch.mm(a, b), dev, warmup)
            ms = statistics.median(time_once(lambda _: torch.mm(a, b), dev) for _ in range(repeats))
            rates.append(MatmulRate(dtype, (m, n, k), what, 2 * m * n * k / ms / 1e6))
    return rates


def ceiling_table(rates: Sequence[MatmulRate], attention: Sequence[Tuple[str, str, float]]) -> str:
    """Markdown: each torch.mm rate, then each attention rate of `attention` ((dtype, label,
    GFLOP/s) triples) as a fraction of the best torch.mm rate of its dtype."""
    lines = ["| dtype | measured | shape (m, n, k) or setting | GFLOP/s | of the best torch.mm |",
             "| --- | --- | --- | ---: | ---: |"]
    best = {}
    for r in rates:
        best[r.dtype] = max(best.get(r.dtype, 0.0), r.gflops)
    for r in rates:
        lines.append(f"| {r.dtype} | torch.mm: {r.what} | {r.shape} | {r.gflops:.0f} | "
                     f"{100 * r.gflops / best[r.dtype]:.0f}% |")
    for dtype, label, gflops in attention:
        if dtype in best:
            lines.append(f"| {dtype} | attention: {label} | | {gflops:.0f} | {100 * gflops / best[dtype]:.0f}% |")
    return "\n".join(lines)
