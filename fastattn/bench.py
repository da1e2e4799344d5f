"""``python -m fastattn.bench``: fastattn against its peers, on the same inputs, in one run.

Every contestant's output is checked against the float64 oracle (computed blockwise, so its cost
follows the window) before it is timed; a wrong contestant is reported as wrong, never timed.
Times are medians after warm-up. FLOPs follow FlashAttention-3's convention: forward
``2 * B * Hq * sum_i visible_keys(i) * (D + Dv)``, backward 2.5x forward. The headline is the
ratio peer time / fastattn time (> 1: fastattn is faster).

Example::

    python -m fastattn.bench --seqlen 1024 4096 --cases full causal window:256,256
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import fastattn
from fastattn import masks

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MODES = ("fwd", "fwd_bwd")
#: Relative error (||out - oracle|| / ||oracle||) above which a contestant is reported wrong.
REL_ERROR_LIMIT = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention configuration: a name and its (left, right) window (-1 = unbounded)."""

    name: str
    window_left: int
    window_right: int

    @classmethod
    def parse(cls, text: str) -> "Case":
        if text == "full":
            return cls("full", -1, -1)
        if text == "causal":
            return cls("causal", -1, 0)
        if text.startswith("window:"):
            left, right = (int(x) for x in text.split(":", 1)[1].split(","))
            return cls(f"window({left},{right})", left, right)
        raise argparse.ArgumentTypeError(f"case must be full, causal or window:LEFT,RIGHT, got {text!r}")


@dataclasses.dataclass
class Contestant:
    """Something to time: `forward(q, k, v) -> out`, for cases it `supports`."""

    name: str
    forward: Callable
    supports: Callable[[Case], bool] = lambda case: True
    is_fastattn: bool = False


def flops(batch: int, heads: int, seqlen_q: int, seqlen_k: int, head_dim: int, head_dim_v: int, case: Case,
          mode: str) -> float:
    visible = masks.visible_key_count(seqlen_q, seqlen_k, case.window_left, case.window_right)
    forward = 2.0 * batch * heads * visible * (head_dim + head_dim_v)
    return forward * (1.0 if mode == "fwd" else 3.5)


def oracle_output(q, k, v, case: Case, block: int = 256) -> torch.Tensor:
    """The float64 output, one block of queries at a time over just the keys it may see, so the
    oracle of windowed attention costs O(N * window) like the kernels."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
    scale = q.shape[-1] ** -0.5
    for row0 in range(0, seqlen_q, block):
        row1 = min(seqlen_q, row0 + block)
        first, _ = masks.visible_key_range(row0, seqlen_q, seqlen_k, case.window_left, case.window_right)
        _, end = masks.visible_key_range(row1 - 1, seqlen_q, seqlen_k, case.window_left, case.window_right)
        if end <= first:
            continue
        qb = q[:, :, row0:row1].double()
        kb = k[:, :, first:end].double().repeat_interleave(group, 1)
        vb = v[:, :, first:end].double().repeat_interleave(group, 1)
        rows = torch.arange(row0, row1).unsqueeze(1) + (seqlen_k - seqlen_q)
        cols = torch.arange(first, end).unsqueeze(0)
        visible = torch.ones(row1 - row0, end - first, dtype=torch.bool)
        if case.window_left >= 0:
            visible &= cols >= rows - case.window_left
        if case.window_right >= 0:
            visible &= cols <= rows + case.window_right
        scores = (qb @ kb.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
        out[:, :, row0:row1] = torch.softmax(scores, -1).nan_to_num(0.0) @ vb
    return out


def relative_error(out: torch.Tensor, oracle: torch.Tensor) -> float:
    return ((out.double() - oracle).norm() / oracle.norm().clamp_min(1e-300)).item()


def time_call(fn: Callable[[], object], warmup: int, repeats: int, device: torch.device) -> float:
    """Median wall time in milliseconds of `fn`, after `warmup` calls."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def dense_mask(case: Case, seqlen_q: int, seqlen_k: int, device) -> Optional[torch.Tensor]:
    if case.window_left < 0 and case.window_right < 0:
        return None
    return masks.materialize(seqlen_q, seqlen_k, (case.window_left, case.window_right), device=device)


def default_contestants(backend: str) -> List[Contestant]:
    """fastattn and PyTorch's scaled_dot_product_attention (causal through is_causal when the
    case is causal with Nq = Nk, otherwise given the equivalent dense boolean mask)."""

    def fastattn_forward(q, k, v, case):
        return fastattn.attention(q, k, v, window=(case.window_left, case.window_right), backend=backend)

    def sdpa_forward(q, k, v, case, _cache={}):
        if case.name == "causal" and q.shape[2] == k.shape[2]:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        key = (case, q.shape[2], k.shape[2], q.device)
        if key not in _cache:
            _cache.clear()
            _cache[key] = dense_mask(case, q.shape[2], k.shape[2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_cache[key], enable_gqa=q.shape[1] != k.shape[1])

    return [Contestant(f"fastattn[{backend}]", fastattn_forward, is_fastattn=True),
            Contestant("sdpa", sdpa_forward)]


@dataclasses.dataclass
class Result:
    case: str
    seqlen: int
    mode: str
    contestant: str
    ms: Optional[float]
    tflops: Optional[float]
    rel_error: Optional[float]
    status: str  # "ok", "wrong", "unsupported" or the error message
    speedup_vs_fastattn: Optional[float] = None  # contestant time / fastattn time


def run(args: argparse.Namespace, contestants: Sequence[Contestant]) -> List[Result]:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    results: List[Result] = []
    heads_kv = args.heads_kv or args.heads
    for seqlen in args.seqlen:
        generator = torch.Generator().manual_seed(seqlen)
        q = torch.randn(args.batch, args.heads, seqlen, args.head_dim, generator=generator).to(device, dtype)
        k = torch.randn(args.batch, heads_kv, seqlen, args.head_dim, generator=generator).to(device, dtype)
        v = torch.randn(args.batch, heads_kv, seqlen, args.head_dim, generator=generator).to(device, dtype)
        dout = torch.randn(q.shape, generator=generator).to(device, dtype)
        for case in args.cases:
            oracle = oracle_output(q.cpu(), k.cpu(), v.cpu(), case)
            for mode in args.modes:
                total_flops = flops(args.batch, args.heads, seqlen, seqlen, args.head_dim, args.head_dim, case, mode)
                block: List[Result] = []
                for contestant in contestants:
                    block.append(_measure(contestant, q, k, v, dout, case, mode, oracle, total_flops, args, device))
                reference = next((r for r in block if r.contestant.startswith("fastattn") and r.ms), None)
                for r in block:
                    if reference is not None and r.ms:
                        r.speedup_vs_fastattn = r.ms / reference.ms
                results += block
                if not args.quiet:
                    for r in block:
                        print(format_row(r), flush=True)
    return results


def _measure(contestant: Contestant, q, k, v, dout, case: Case, mode: str, oracle, total_flops, args, device) -> Result:
    base = dict(case=case.name, seqlen=q.shape[2], mode=mode, contestant=contestant.name)
    if not contestant.supports(case):
        return Result(**base, ms=None, tflops=None, rel_error=None, status="unsupported")
    try:
        with torch.no_grad():
            out = contestant.forward(q, k, v, case)
        error = relative_error(out.cpu(), oracle)
        if not error <= REL_ERROR_LIMIT[q.dtype]:
            return Result(**base, ms=None, tflops=None, rel_error=error, status="wrong")
        if mode == "fwd":
            def call():
                with torch.no_grad():
                    contestant.forward(q, k, v, case)
        else:
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def call():
                out = contestant.forward(*leaves, case)
                torch.autograd.grad(out, leaves, dout)
        ms = time_call(call, args.warmup, args.repeats, device)
    except Exception as exc:  # a peer that cannot run this case is reported, not fatal
        return Result(**base, ms=None, tflops=None, rel_error=None, status=f"error: {type(exc).__name__}: {exc}"[:200])
    return Result(**base, ms=ms, tflops=total_flops / ms / 1e9, rel_error=error, status="ok")


def format_row(r: Result) -> str:
    ms = f"{r.ms:10.2f}" if r.ms else f"{'-':>10}"
    rate = f"{r.tflops * 1e3:9.1f}" if r.tflops else f"{'-':>9}"
    ratio = f"{r.speedup_vs_fastattn:6.2f}x" if r.speedup_vs_fastattn else f"{'':>7}"
    error = f"{r.rel_error:9.1e}" if r.rel_error is not None else f"{'-':>9}"
    return f"{r.case:>16} {r.seqlen:>7} {r.mode:>8} {r.contestant:>16} {ms} {rate} {ratio} {error}  {r.status}"


HEADER = (f"{'case':>16} {'N':>7} {'mode':>8} {'contestant':>16} {'ms':>10} {'GFLOP/s':>9} "
          f"{'ratio':>7} {'rel.err':>9}  status   (ratio = its time / fastattn's time)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastattn.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--heads-kv", type=int, default=None, help="kv heads (GQA); default: --heads")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seqlen", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--cases", type=Case.parse, nargs="+",
                        default=[Case.parse("full"), Case.parse("causal"), Case.parse("window:256,256")])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--backend", default="auto", help="fastattn backend to time")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", help="also write the results to this CSV file")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> List[Result]:
    args = parse_args(argv)
    if not args.quiet:
        print(f"fastattn {fastattn.__version__}, torch {torch.__version__}, device {args.device}, "
              f"{torch.get_num_threads()} threads, {args.dtype}, B={args.batch} H={args.heads} "
              f"Hkv={args.heads_kv or args.heads} D={args.head_dim}")
        print(HEADER)
    results = run(args, default_contestants(args.backend))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[field.name for field in dataclasses.fields(Result)])
            writer.writeheader()
            writer.writerows(dataclasses.asdict(r) for r in results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([dataclasses.asdict(r) for r in results], f, indent=1)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
