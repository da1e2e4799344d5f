"""Results of ``python -m fastattn.bench``: the row type, the printed table, the summary, CSV,
JSON and the PNG plots (matplotlib, optional: without it the plots are skipped with a message)."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

from .cases import Case, flops

__all__ = ["Result", "HEADER", "format_row", "summary_markdown", "write_csv", "write_json", "plot"]

#: Statuses: timed; failed the correctness gate (never timed); cannot run this setting; cannot run
#: here at all; would exceed --max-dense-gib; raised an unexpected exception.
STATUSES = ("ok", "wrong", "unsupported", "unavailable", "skipped", "error")


@dataclasses.dataclass
class Result:
    dtype: str
    case: str
    seqlen: int
    batch: int
    heads: int
    heads_kv: int
    head_dim: int
    mode: str
    contestant: str
    status: str
    ms: Optional[float] = None  # median of the timed calls
    min_ms: Optional[float] = None  # fastest timed call: how far the median is from noise-free
    tflops: Optional[float] = None  # DESIGN section 6 FLOPs / median time
    peak_mib: Optional[float] = None  # peak memory above the inputs (see fastattn.bench.measure)
    ratio: Optional[float] = None  # this contestant's time / the time of `ratio_to`
    ratio_to: str = ""  # the reference: the first fastattn contestant timed in this setting
    rel_error: Optional[float] = None  # worst relative error of out (and dq, dk, dv) vs the oracle
    compile_s: Optional[float] = None  # compiling contestants: setup + first call - one timed call
    note: str = ""  # how the case is expressed, or why the status is not ok
    timed_calls: Optional[int] = None  # calls the median was taken over (--repeats, more with --min-time)


HEADER = (f"{'dtype':>5} {'case':>16} {'N':>6} {'B':>3} {'mode':>7} {'contestant':>17} {'ms':>10} "
          f"{'TFLOP/s':>8} {'peak MiB':>9} {'ratio':>7} {'rel.err':>8} {'compile s':>9}  status")


def _number(value: Optional[float], width: int, spec: str, suffix: str = "") -> str:
    return f"{'-':>{width}}" if value is None else f"{format(value, spec) + suffix:>{width}}"


def format_row(r: Result) -> str:
    status = r.status if not r.note else f"{r.status}: {r.note}" if r.status != "ok" else f"ok ({r.note})"
    return (f"{r.dtype:>5} {r.case:>16} {r.seqlen:>6} {r.batch:>3} {r.mode:>7} {r.contestant:>17} "
            f"{_number(r.ms, 10, '.2f')} {_number(r.tflops, 8, '.3f')} {_number(r.peak_mib, 9, '.1f')} "
            f"{_number(r.ratio, 7, '.2f', 'x')} {_number(r.rel_error, 8, '.1e')} {_number(r.compile_s, 9, '.1f')}"
            f"  {status}")


def _cell(r: Result, is_reference: bool) -> str:
    if r.status != "ok":
        return r.status
    if is_reference or r.ratio is None:
        return f"{r.ms:.2f} ms"
    return f"{r.ratio:.2f}x ({r.ms:.2f} ms)"


def summary_markdown(results: Sequence[Result]) -> str:
    """One markdown table per dtype: a row per (case, N, mode), a column per contestant; fastattn
    cells give ms, peer cells give peer time / fastattn time (> 1: fastattn is faster) and ms."""
    lines: List[str] = []
    by_dtype: Dict[str, List[Result]] = OrderedDict()
    for r in results:
        by_dtype.setdefault(r.dtype, []).append(r)
    for dtype, rows in by_dtype.items():
        everywhere_unavailable = OrderedDict()
        for r in rows:
            everywhere_unavailable.setdefault(r.contestant, set()).add(r.note if r.status == "unavailable" else None)
        absent = [name for name, notes in everywhere_unavailable.items() if None not in notes]
        contestants = [name for name in everywhere_unavailable if name not in absent]
        settings: Dict[tuple, Dict[str, Result]] = OrderedDict()
        for r in rows:
            settings.setdefault((r.case, r.seqlen, r.batch, r.mode), {})[r.contestant] = r
        lines += [f"{dtype}: cells are ms for the reference fastattn contestant, else time / its time "
                  f"(> 1: fastattn faster) and ms", "",
                  *(["unavailable here: " + "; ".join(f"{name} ({next(iter(everywhere_unavailable[name]))})"
                                                      for name in absent), ""] if absent else []),
                  "| case | N | B | mode | " + " | ".join(contestants) + " |",
                  "| --- | ---: | ---: | --- | " + " | ".join("---:" for _ in contestants) + " |"]
        for (case, seqlen, batch, mode), cells in settings.items():
            reference = next((r.ratio_to for r in cells.values() if r.ratio_to), None)
            row = [_cell(cells[c], c == reference) if c in cells else "" for c in contestants]
            lines.append(f"| {case} | {seqlen} | {batch} | {mode} | " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def write_csv(results: Sequence[Result], path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in dataclasses.fields(Result)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in results)


def write_json(results: Sequence[Result], meta: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": [dataclasses.asdict(r) for r in results]}, f, indent=1)


def _reference_curves(case: Case, points: Dict[int, Result], anchor_seqlen: int, anchor_ms: float, mode: str):
    """Time curves through the anchor point growing like the dense work (N^2) and, for windowed
    cases, like the visible keys (N * w): the slopes a kernel's line should follow."""
    def work(seqlen: int, of_case: Case) -> float:
        r = points[seqlen]
        return flops(r.batch, r.heads, seqlen, seqlen, r.head_dim, r.head_dim, of_case, mode)

    seqlens = sorted(points)
    full = Case("full", -1, -1)
    curves = [("N^2", [anchor_ms * work(n, full) / work(anchor_seqlen, full) for n in seqlens])]
    if not case.is_full and not case.is_causal:
        curves.append(("N*w (visible keys)",
                       [anchor_ms * work(n, case) / work(anchor_seqlen, case) for n in seqlens]))
    return seqlens, curves


def _draw_panel(ax, panel: Sequence[Result], case: Case, mode: str, metric: str, colors: dict) -> None:
    import matplotlib.ticker
    by_contestant: Dict[str, Dict[int, Result]] = OrderedDict()
    for r in panel:
        by_contestant.setdefault(r.contestant, {})[r.seqlen] = r
    for name, points in by_contestant.items():
        seqlens = sorted(points)
        ax.plot(seqlens, [getattr(points[n], metric) for n in seqlens], marker="o", ms=3,
                color=colors[name], label=name, lw=2.2 if name.startswith("fastattn") else 1.2)
    reference = next((points for name, points in by_contestant.items()
                      if any(r.ratio_to == name for r in points.values())), None)
    if metric == "ms" and reference:
        anchor = min(reference)
        seqlens, curves = _reference_curves(case, reference, anchor, reference[anchor].ms, mode)
        for (curve_label, values), style in zip(curves, ("--", ":")):
            ax.plot(seqlens, values, style, color="0.45", lw=1, label=f"~ {curve_label}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    seqlens = sorted({r.seqlen for r in panel})
    ax.set_xticks(seqlens, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in seqlens], fontsize=7)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("N (tokens per sequence)", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    if panel:
        ax.legend(fontsize=6)


def plot(results: Sequence[Result], cases: Sequence[Case], out_dir: str, title: str) -> List[str]:
    """Writes ``time_vs_n.png`` and ``tflops_vs_n.png``: log-log, a panel per (dtype, mode, case),
    one line per contestant; the time panels carry dashed N^2 and dotted N*w slopes through the
    reference fastattn contestant's first point. Returns the paths written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib, or fastattn[bench])")
        return []
    ok = [r for r in results if r.status == "ok"]
    if not ok:
        return []
    contestants = list(OrderedDict.fromkeys(r.contestant for r in ok))
    colors = {name: plt.cm.tab10(i % 10) for i, name in enumerate(contestants)}
    # A row per (dtype, mode) and a column per case; a single case is wrapped onto two columns.
    panels = [(dtype, mode, case) for dtype, mode in OrderedDict.fromkeys((r.dtype, r.mode) for r in ok)
              for case in cases]
    columns = len(cases) if len(cases) > 1 else min(len(panels), 2)
    grid_rows = -(-len(panels) // columns)
    paths = []
    for metric, label, filename in (("ms", "time per call (ms)", "time_vs_n.png"),
                                    ("tflops", "TFLOP/s (DESIGN section 6 FLOPs)", "tflops_vs_n.png")):
        fig, axes = plt.subplots(grid_rows, columns, figsize=(4.6 * columns, 3.6 * grid_rows), squeeze=False)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for (dtype, mode, case), ax in zip(panels, axes.flat):
            panel = [r for r in ok if r.dtype == dtype and r.mode == mode and r.case == case.name]
            _draw_panel(ax, panel, case, mode, metric, colors)
            ax.set_title(f"{case.name}, {mode}, {dtype}", fontsize=9)
            ax.set_ylabel(label, fontsize=8)
        fig.suptitle(title, fontsize=9, wrap=True)
        fig.tight_layout()
        path = os.path.join(out_dir, filename)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
