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
import time
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
                 device: str = "cpu", repeats: int = 10, warmup: int = 2,
                 budget_s: float = 20.0) -> List[MatmulRate]:
    """GFLOP/s of ``torch.mm`` per dtype (the benchmark's names: fp32, bf16, ...) and shape:
    2 m n k over the median of `repeats` calls after `warmup` untimed ones. A shape whose calls
    pass `budget_s` seconds in all stops early (after at least one warm-up and one timed call):
    where a dtype has no fast path (bf16 on a CPU without AVX-512 BF16 or AMX runs torch.mm at
    ~1 GFLOP/s, a minute per 2048^3 call) the rate then comes from a single call."""
    rates = []
    dev = torch.device(device)
    for dtype in dtypes:
        for (m, n, k), what in shapes:
            a = torch.randn(m, k, device=dev).to(DTYPES[dtype])
            b = torch.randn(k, n, device=dev).to(DTYPES[dtype])
            start = time.perf_counter()
            for _ in range(max(warmup, 1)):
                warm_up(lambda _: torch.mm(a, b), dev, 1)
                if time.perf_counter() - start > budget_s / 2:
                    break
            times = []
            while len(times) < max(repeats, 1) and (not times or time.perf_counter() - start <= budget_s):
                times.append(time_once(lambda _: torch.mm(a, b), dev))
            rates.append(MatmulRate(dtype, (m, n, k), what, 2 * m * n * k / statistics.median(times) / 1e6))
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
        lines.append(f"| {r.dtype} | torch.mm: {r.what} | {r.shape} | {_rate(r.gflops)} | "
                     f"{_fraction(r.gflops, best[r.dtype])} |")
    for dtype, label, gflops in attention:
        if dtype in best:
            lines.append(f"| {dtype} | attention: {label} | | {_rate(gflops)} | {_fraction(gflops, best[dtype])} |")
    return "\n".join(lines)


def _rate(gflops: float) -> str:
    """Three significant digits, so that a rate below 1 GFLOP/s does not print as 0."""
    return f"{gflops:.0f}" if gflops >= 100 else f"{gflops:.3g}"


def _fraction(gflops: float, best: float) -> str:
    """gflops as a percentage of best; an attention rate far above a torch.mm without a fast path
    says only that (the percentage would be meaningless)."""
    ratio = gflops / best
    return f"{100 * ratio:.0f}%" if ratio <= 10 else f"{ratio:.0f}x (torch.mm has no fast path)"
