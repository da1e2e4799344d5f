"""Issue 5's "must show" on the 2-core CPU machine kind, in one command, checked.

    python benchmarks/cpu_must_show.py --out bench_out/cpu_must_show

runs three ``python -m fastattn.bench`` sweeps (each one run: every contestant on the same inputs,
timed calls interleaved) and then checks the issue's criteria on their numbers:

1. ``ratios``: B=1, H=8, D=64, fp32 and bf16, N in 1024 4096 8192, full and causal, fwd and
   fwd_bwd, fastattn against every SDPA backend available here;
2. ``windows``: the same shape at N = 8192, windows (256, 256) and (512, 0), against SDPA with the
   dense mask and FlexAttention (kept to the settings it is judged on: it compiles each one cold);
3. ``scaling``: the same shape, window (256, 256), N from 1k to 64k, fastattn alone: the
   time-against-N plot;
4. ``ceiling``: this machine's ``torch.mm`` rate at one head's product shapes (N = 4096, D = 64)
   and at a large square, per dtype, beside the full-attention forward rates of fastattn and the
   fastest SDPA backend from ``ratios`` as fractions of it: how close to the machine's limit the
   kernels are (a reported measurement, not a pass/fail criterion).

Criteria (a ratio is peer time / fastattn time, so > 1 means fastattn is faster):

* full and causal, every N, dtype and mode: >= 1.2x the fastest SDPA backend (causal through
  ``is_causal=True``);
* windows (256, 256) and (512, 0) at N = 8192, every dtype and mode: >= 1.5x FlexAttention
  (compiled, block mask, compile time excluded) and >= 10x the fastest SDPA backend given the
  equivalent dense mask;
* scaling: fastattn's time against N on log-log axes is a straight line of slope 1: the
  least-squares slope is within 1 +- 0.15 and no point is more than 15% off the fitted line.

A criterion whose peer could not run (e.g. FlexAttention has no CPU backward in torch 2.14) is
reported "n/a" with the peer's reason, not counted as passed. The checks go to stdout and to
``<out>/must_show.md``; each sweep writes its CSV, JSON, summary and plots under ``<out>/<sweep>``.
The plots need matplotlib, so a run that measures refuses to start without it (the scaling plot is
one of the things to show); ``--recheck`` draws the plots again from the recorded bench.json.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

from fastattn.bench import main as bench_main, parse_args
from fastattn.bench.ceiling import MatmulRate, attention_shapes, ceiling_table, matmul_rates
from fastattn.bench.report import Result, plot

DTYPES = ["fp32", "bf16"]
HEAD_DIM = 64
SHAPE = ["--device", "cpu", "--dtype", *DTYPES, "--batch", "1", "--heads", "8", "--head-dim", str(HEAD_DIM),
         "--modes", "fwd", "fwd_bwd"]
SDPA_PEERS = ["sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math"]
SWEEPS = OrderedDict([
    ("ratios", SHAPE + ["--seqlen", "1024", "4096", "8192", "--cases", "full", "causal", "--peers", *SDPA_PEERS,
                        "--max-dense-gib", "4"]),
    ("windows", SHAPE + ["--seqlen", "8192", "--cases", "window:256,256", "window:512,0",
                         "--peers", "flex", *SDPA_PEERS, "--max-dense-gib", "4"]),
    ("scaling", SHAPE + ["--seqlen", "1024", "2048", "4096", "8192", "16384", "32768", "65536",
                         "--cases", "window:256,256", "--peers", "--max-dense-gib", "2"]),
])
CEILING_SEQLEN = 4096
FULL_VS_SDPA = 1.2
WINDOW_VS_FLEX = 1.5
WINDOW_VS_DENSE_SDPA = 10.0
WINDOW_SEQLEN = 8192
SLOPE_TOLERANCE = 0.15
LINE_DEVIATION = 0.15


def _fastest(rows: Sequence[Result], prefix: str) -> Optional[Result]:
    timed = [r for r in rows if r.contestant.startswith(prefix) and r.status == "ok"]
    return min(timed, key=lambda r: r.ms) if timed else None


def _why_missing(rows: Sequence[Result], prefix: str) -> str:
    reasons = [f"{r.contestant} {r.status}: {r.note}" for r in rows if r.contestant.startswith(prefix)]
    return "; ".join(reasons) or f"no {prefix} contestant in the run"


def check_ratios(results: Sequence[Result]) -> List[tuple]:
    """(criterion, setting, measured, passed: True/False/None) for every criterion of the sweep."""
    settings = OrderedDict()
    for r in results:
        settings.setdefault((r.dtype, r.case, r.seqlen, r.mode), []).append(r)
    checks = []
    for (dtype, case, seqlen, mode), rows in settings.items():
        windowed = case.startswith("window")
        if windowed and seqlen != WINDOW_SEQLEN:
            continue
        targets = ([("flex", WINDOW_VS_FLEX, "FlexAttention"), ("sdpa", WINDOW_VS_DENSE_SDPA, "SDPA + dense mask")]
                   if windowed else [("sdpa", FULL_VS_SDPA, "SDPA" + (" is_causal" if case == "causal" else ""))])
        reference = next((r for r in rows if r.contestant == r.ratio_to), None)
        for prefix, threshold, label in targets:
            criterion = f">= {threshold:g}x {label}"
            where = f"{dtype} {case} N={seqlen} {mode}"
            peer = _fastest(rows, prefix)
            if reference is None:
                fastattn = [r for r in rows if r.contestant.startswith("fastattn")]
                checks.append((criterion, where, "fastattn not timed: " + "; ".join(
                    f"{r.contestant} {r.status}: {r.note}" for r in fastattn), False))
            elif peer is None:
                checks.append((criterion, where, "n/a: " + _why_missing(rows, prefix), None))
            else:
                ratio = peer.ms / reference.ms
                checks.append((criterion, where, f"{ratio:.3f}x ({peer.contestant} {peer.ms:.1f} ms / "
                               f"{reference.contestant} {reference.ms:.1f} ms)", ratio >= threshold))
    return checks


def check_scaling(results: Sequence[Result]) -> List[tuple]:
    """Least-squares fit of log(ms) against log(N) for the reference fastattn contestant."""
    series = OrderedDict()
    for r in results:
        if r.status == "ok" and r.contestant == r.ratio_to:
            series.setdefault((r.dtype, r.case, r.mode, r.contestant), []).append((r.seqlen, r.ms))
    checks = []
    for (dtype, case, mode, name), points in series.items():
        xs = [math.log(n) for n, _ in points]
        ys = [math.log(ms) for _, ms in points]
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
        deviation = max(abs(math.exp(y - (mean_y + slope * (x - mean_x))) - 1) for x, y in zip(xs, ys))
        span = f"N {points[0][0]}..{points[-1][0]}: {points[0][1]:.1f} .. {points[-1][1]:.1f} ms"
        checks.append((f"straight line, slope 1 +- {SLOPE_TOLERANCE:g}", f"{name} {dtype} {case} {mode}",
                       f"slope {slope:.3f}, max {100 * deviation:.0f}% off the line ({span})",
                       abs(slope - 1) <= SLOPE_TOLERANCE and deviation <= LINE_DEVIATION))
    return checks


def attention_rates(results: Sequence[Result]) -> List[tuple]:
    """(dtype, label, GFLOP/s) of fastattn and of the fastest SDPA backend, full attention forward
    at N = CEILING_SEQLEN, from the ratios sweep."""
    rates = []
    for dtype in OrderedDict.fromkeys(r.dtype for r in results):
        rows = [r for r in results if r.dtype == dtype and r.case == "full" and r.mode == "fwd"
                and r.seqlen == CEILING_SEQLEN and r.status == "ok"]
        for row in [next((r for r in rows if r.contestant == r.ratio_to), None), _fastest(rows, "sdpa")]:
            if row is not None:
                rates.append((dtype, f"{row.contestant}, full, N={row.seqlen}, fwd", 1e3 * row.tflops))
    return rates


def measure_ceiling(out_dir: str, recheck: bool, ratio_results: Sequence[Result], repeats: int) -> str:
    """The ceiling section: torch.mm rates (measured, or read back from ceiling.json with
    --recheck) beside the attention rates of the ratios sweep."""
    path = os.path.join(out_dir, "ceiling", "ceiling.json")
    if recheck:
        with open(path) as f:
            rates = [MatmulRate(**{**r, "shape": tuple(r["shape"])}) for r in json.load(f)]
    else:
        rates = matmul_rates(attention_shapes(CEILING_SEQLEN, HEAD_DIM), DTYPES, repeats=repeats)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump([dataclasses.asdict(r) for r in rates], f, indent=1)
    return ceiling_table(rates, attention_rates(ratio_results))


def redraw_plots(results: Sequence[Result], meta: dict, bench_argv: Sequence[str], sweep_dir: str) -> List[str]:
    """The sweep's PNG plots drawn again from its recorded results (``--recheck``)."""
    first = results[0]
    title = (f"fastattn.bench on {meta['device']}, B={first.batch} H={first.heads} D={first.head_dim}, "
             f"torch {meta['torch']} (from bench.json)")
    return plot(results, parse_args(bench_argv).cases, sweep_dir, title)


def read_results(path: str) -> Tuple[List[Result], dict]:
    """The results and the metadata of a sweep's bench.json."""
    with open(path) as f:
        recorded = json.load(f)
    return [Result(**r) for r in recorded["results"]], recorded["meta"]


def format_checks(checks: Sequence[tuple]) -> str:
    verdict = {True: "PASS", False: "FAIL", None: "n/a"}
    lines = ["| criterion | setting | measured | result |", "| --- | --- | --- | --- |"]
    lines += [f"| {criterion} | {where} | {measured} | {verdict[passed]} |"
              for criterion, where, measured, passed in checks]
    counts = {v: sum(1 for c in checks if c[3] is k) for k, v in verdict.items()}
    lines.append(f"\n{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['n/a']} n/a")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench_out/cpu_must_show")
    parser.add_argument("--repeats", default="5", help="timed calls per contestant (median taken)")
    parser.add_argument("--warmup", default="2")
    parser.add_argument("--min-time", default="5",
                        help="seconds of timed calls per contestant and setting at least (short calls: more than --repeats)")
    parser.add_argument("--only", choices=list(SWEEPS) + ["ceiling"], nargs="+", default=list(SWEEPS) + ["ceiling"])
    parser.add_argument("--recheck", action="store_true",
                        help="do not measure: check the bench.json files an earlier run left in --out")
    args = parser.parse_args(argv)
    if not args.recheck:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("the sweeps' plots need matplotlib, and a run without them would have to be repeated: "
                         "pip install matplotlib (or fastattn[bench])")
    report = []
    ratio_results: List[Result] = []
    for sweep in args.only:
        if sweep == "ceiling":
            if not ratio_results and os.path.exists(os.path.join(args.out, "ratios", "bench.json")):
                ratio_results, _ = read_results(os.path.join(args.out, "ratios", "bench.json"))
            print("== ceiling: torch.mm at the attention's shapes", flush=True)
            table = measure_ceiling(args.out, args.recheck, ratio_results, int(args.repeats))
            report.append(f"## ceiling\n\n{table}\n")
            continue
        bench_argv = SWEEPS[sweep] + ["--repeats", args.repeats, "--warmup", args.warmup, "--min-time", args.min_time,
                                      "--out", os.path.join(args.out, sweep)]
        if args.recheck:
            results, meta = read_results(os.path.join(args.out, sweep, "bench.json"))
            bench_argv = meta["command"].split()[3:]
            redraw_plots(results, meta, bench_argv, os.path.join(args.out, sweep))
        else:
            print(f"== {sweep}: python -m fastattn.bench {' '.join(bench_argv)}", flush=True)
            results = bench_main(bench_argv)
        if sweep == "ratios":
            ratio_results = results
        checks = check_scaling(results) if sweep == "scaling" else check_ratios(results)
        report.append(f"## {sweep}\n\n`python -m fastattn.bench {' '.join(bench_argv)}`\n\n{format_checks(checks)}\n")
    text = "\n".join(report)
    print("\n" + text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "must_show.md"), "w") as f:
        f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
