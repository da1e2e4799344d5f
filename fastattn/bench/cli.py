"""The benchmark run: arguments, the sweep, the correctness gate, timing, and the outputs."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..backends import BACKEND_NAMES
from .cases import MODES, Case, flops
from .contestants import PEER_NAMES, Contestant, DenseMasks, Setting, Skipped, Unsupported, make_fastattn, \
    make_peers
from .measure import PeakMemory, time_after_own_call, time_once, warm_up
from .oracle import REL_ERROR_LIMIT, chunked_oracle, relative_error
from .report import HEADER, Result, format_row, plot, summary_markdown, write_csv, write_json

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
#: (warm-up calls, timed calls) when --warmup / --repeats are not given.
DEFAULT_TIMING = {"cpu": (2, 5), "cuda": (10, 30)}
QUICK_TIMING = (1, 3)
#: --min-time adds rounds up to this many per --repeats.
MAX_ROUNDS_PER_REPEAT = 20


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from . import __doc__ as package_doc
    parser = argparse.ArgumentParser(prog="python -m fastattn.bench", description=package_doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda[:i] (default: cuda when available)")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=None,
                        help="one or more; default fp32 on the CPU, bf16 on CUDA")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--batch", type=int, default=None, help="batch size for every N (default 1)")
    size.add_argument("--tokens", type=int, default=None, help="tokens per call: batch = max(1, T // N)")
    parser.add_argument("--heads", type=int, default=8, help="query heads")
    parser.add_argument("--heads-kv", type=int, default=None, help="key/value heads (GQA); default --heads")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--seqlen", type=int, nargs="+", default=[1024, 4096], help="N values (Nq = Nk)")
    parser.add_argument("--cases", type=Case.parse, nargs="+",
                        default=[Case.parse(c) for c in ("full", "causal", "window:256,256")],
                        help="full, causal, window:LEFT,RIGHT (-1 = unbounded) or window:W")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=["fwd", "fwd_bwd"],
                        help="fwd; bwd (the backward alone); fwd_bwd")
    parser.add_argument("--backends", nargs="+", choices=BACKEND_NAMES, default=["auto"],
                        help="fastattn backends, each a contestant fastattn[<name>]; the first one timed "
                             "is the reference of the ratios")
    parser.add_argument("--peers", nargs="*", choices=PEER_NAMES, default=list(PEER_NAMES),
                        help="default: all (those unavailable here are reported so)")
    parser.add_argument("--out", help="directory for bench.csv, bench.json, summary.md and the PNG plots")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: the two smallest N, warm-up/repeats {QUICK_TIMING} unless given")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls first (default cpu 2, cuda 10)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls, median taken (default cpu 5, cuda 30)")
    parser.add_argument("--min-time", type=float, default=0.0,
                        help="after the --repeats rounds of timed calls, more rounds for each contestant whose timed "
                             f"calls took less than this many seconds, at most {MAX_ROUNDS_PER_REPEAT} x --repeats "
                             "calls in all (default 0: exactly --repeats): short calls get many samples, long ones "
                             "--repeats")
    parser.add_argument("--max-dense-gib", type=float, default=6.0,
                        help="skip a contestant whose dense N x N tensors would need more (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    args = parser.parse_args(argv)

    try:
        args.device = torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    if args.device.type not in DEFAULT_TIMING:
        parser.error(f"--device must be cpu or cuda, got {args.device}")
    args.dtype = args.dtype or (["bf16"] if args.device.type == "cuda" else ["fp32"])
    args.heads_kv = args.heads_kv or args.heads
    if args.heads % args.heads_kv:
        parser.error(f"--heads ({args.heads}) must be a multiple of --heads-kv ({args.heads_kv})")
    for name in ("heads", "heads_kv", "head_dim", "batch", "tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.seqlen) < 1:
        parser.error("--seqlen values must be >= 1")
    args.seqlen = sorted(set(args.seqlen))
    warmup, repeats = QUICK_TIMING if args.quick else DEFAULT_TIMING[args.device.type]
    if args.quick:
        args.seqlen = args.seqlen[:2]
    args.warmup = warmup if args.warmup is None else args.warmup
    args.repeats = repeats if args.repeats is None else args.repeats
    if args.repeats < 1 or args.warmup < 0 or not args.min_time >= 0:
        parser.error("--repeats must be >= 1, --warmup >= 0 and --min-time >= 0")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def batch_for(args: argparse.Namespace, seqlen: int) -> int:
    if args.tokens is not None:
        return max(1, args.tokens // seqlen)
    return args.batch or 1


def make_inputs(args: argparse.Namespace, batch: int, seqlen: int, dtype: torch.dtype):
    """q, k, v, dout for one N: standard normal, the same values (rounded) for every dtype."""
    generator = torch.Generator().manual_seed(args.seed * 1_000_003 + seqlen)

    def randn(heads):
        return torch.randn(batch, heads, seqlen, args.head_dim, generator=generator).to(args.device, dtype)

    return randn(args.heads), randn(args.heads_kv), randn(args.heads_kv), randn(args.heads)


class Progress:
    """A progress bar on stderr over the sweep when it is a terminal (tqdm, or a plain
    ``[done/total]`` line without it); the table rows go to stdout either way."""

    def __init__(self, total: int, enabled: bool):
        self.enabled, self.total, self.done, self.bar = enabled, total, 0, None
        self.interactive = enabled and sys.stderr.isatty()
        if self.interactive:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False)
            except ImportError:
                pass

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description_str(text)
        elif self.interactive:
            print(f"\r[{self.done}/{self.total}] {text}\033[K", end="", file=sys.stderr, flush=True)

    def advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update()

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        elif self.enabled:
            print(("\r\033[K" if self.interactive else "") + line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.interactive:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gate(contestant: Contestant, setting: Setting, oracle, device) -> Tuple[Dict[str, float], float]:
    """The contestant's first call on the setting, checked against the oracle: returns the relative
    error of out (and dq, dk, dv for modes with a backward) and the call's wall time in seconds."""
    oracle_out, oracle_grads = oracle
    start = time.perf_counter()
    if setting.needs_grad:
        leaves = [t.detach().requires_grad_() for t in (setting.q, setting.k, setting.v)]
        out = contestant(*leaves)
        grads = torch.autograd.grad(out, leaves, setting.dout)
    else:
        with torch.no_grad():
            out = contestant(setting.q, setting.k, setting.v)
        grads = ()
    _synchronize(device)
    first_call_s = time.perf_counter() - start
    errors = {"out": relative_error(out, oracle_out)}
    for name, grad, expected in zip(("dq", "dk", "dv"), grads, oracle_grads or ()):
        errors[name] = relative_error(grad, expected)
    return errors, first_call_s


def _timed_calls(contestant: Contestant, setting: Setting):
    """(prepare, call) for `time_calls`: what one timed call of the setting's mode runs."""
    if setting.mode == "fwd":
        def forward(_):
            with torch.no_grad():
                contestant(setting.q, setting.k, setting.v)
        return (lambda: None), forward
    leaves = [t.detach().requires_grad_() for t in (setting.q, setting.k, setting.v)]
    if setting.mode == "bwd":
        return (lambda: contestant(*leaves)), (lambda out: torch.autograd.grad(out, leaves, setting.dout))

    def forward_backward(_):
        torch.autograd.grad(contestant(*leaves), leaves, setting.dout)
    return (lambda: None), forward_backward


def _failure(base: dict, exc: BaseException) -> Result:
    """A contestant's exception as a result: the run goes on."""
    if isinstance(exc, Skipped):
        return Result(**base, status="skipped", note=str(exc))
    if isinstance(exc, (Unsupported, NotImplementedError)):
        return Result(**base, status="unsupported", note=str(exc).strip().splitlines()[0])
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return Result(**base, status="error", note="CUDA out of memory")
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return Result(**base, status="error", note=f"{type(exc).__name__}: {message}"[:300])


@dataclasses.dataclass
class _Timed:
    """A contestant that passed the gate and is being timed."""

    contestant: Contestant
    base: dict
    note: str
    rel_error: float
    first_call_s: float
    prepare: Callable
    call: Callable
    memory: PeakMemory
    times: List[float] = dataclasses.field(default_factory=list)
    failure: Optional[Result] = None


def _gate_and_warm_up(contestant: Contestant, setting: Setting, oracle, args: argparse.Namespace,
                      base: dict) -> Union[Result, _Timed]:
    """Prepares the contestant, checks its first call against the oracle, warms it up (measuring
    its peak memory). Returns the failed Result, or what to time."""
    device = setting.q.device
    try:
        note = contestant.prepare(setting)
        errors, first_call_s = _gate(contestant, setting, oracle, device)
        worst = max(errors, key=errors.get)
        limit = REL_ERROR_LIMIT[setting.q.dtype]
        if not errors[worst] <= limit:
            return Result(**base, status="wrong", rel_error=errors[worst],
                          note=f"{worst} rel.err {errors[worst]:.2e} > {limit:g}" + (f"; {note}" if note else ""))
        prepare, call = _timed_calls(contestant, setting)
        memory = PeakMemory(device)
        warm_up(call, device, args.warmup, prepare, memory)
    except Exception as exc:  # a contestant's failure is a result, never the end of the run
        return _failure(base, exc)
    return _Timed(contestant, base, note, errors[worst], first_call_s, prepare, call, memory)


def _result(entry: _Timed, setting: Setting) -> Result:
    if entry.failure is not None:
        return entry.failure
    median_ms = statistics.median(entry.times)
    compile_s = None
    if entry.contestant.compiles:
        compile_s = max(0.0, entry.contestant.setup_s + entry.first_call_s - median_ms / 1e3)
    base = entry.base
    total_flops = flops(base["batch"], base["heads"], base["seqlen"], base["seqlen"], base["head_dim"],
                        base["head_dim"], setting.case, setting.mode)
    return Result(**base, status="ok", ms=median_ms, min_ms=min(entry.times), timed_calls=len(entry.times),
                  tflops=total_flops / (median_ms * 1e-3) / 1e12, peak_mib=entry.memory.mib,
                  rel_error=entry.rel_error, compile_s=compile_s, note=entry.note)


def measure_setting(contestants: Sequence[Contestant], setting: Setting, oracle, args: argparse.Namespace,
                    bases: Sequence[dict], unavailable: Dict[str, Optional[str]], progress: Progress) -> List[Result]:
    """Every contestant on one setting: each is gated and warmed up, then the timed calls are
    interleaved, repeat by repeat, in an order rotated each repeat, so that a change in the
    machine's load (it is shared) falls on all contestants alike and the ratios stay fair. On the
    CPU each timed call directly follows an untimed one of its own contestant
    (``time_after_own_call``), so no contestant is timed on the caches a peer left; on CUDA the
    inputs of the shapes we measure (64 MB each in gpu_check.sh) exceed the L2 cache, and the
    extra calls would only lengthen a time-boxed run. --repeats rounds, then (with --min-time)
    more rounds for each contestant whose own timed calls took less than that, up to the cap: on
    a noisy machine a median of 5 short calls moves by 10% from run to run. A contestant leaves
    the extra rounds once it has its time, so contestants of similar speed stay interleaved to
    the end while a much slower one (sdpa-math) stops early and no longer stretches every round
    (it did when the rule counted the whole round's time)."""
    outcomes: List[Union[Result, _Timed]] = []
    try:
        for contestant, base in zip(contestants, bases):
            progress.describe(f"{base['dtype']} N={base['seqlen']} {base['case']} {base['mode']}: {contestant.name}")
            if unavailable[contestant.name]:
                outcomes.append(Result(**base, status="unavailable", note=unavailable[contestant.name]))
            else:
                outcomes.append(_gate_and_warm_up(contestant, setting, oracle, args, base))
            progress.advance()
        timed = [o for o in outcomes if isinstance(o, _Timed)]
        rounds_most = args.repeats * (MAX_ROUNDS_PER_REPEAT if args.min_time > 0 else 1)

        def wants_more(entry: _Timed) -> bool:
            return len(entry.times) < rounds_most and sum(entry.times) < 1e3 * args.min_time

        timer = time_after_own_call if setting.q.device.type == "cpu" else time_once
        repeat = 0
        while True:
            in_round = [e for e in timed if e.failure is None and (repeat < args.repeats or wants_more(e))]
            if not in_round:
                break
            progress.describe(f"{bases[0]['dtype']} N={bases[0]['seqlen']} {bases[0]['case']} {bases[0]['mode']}: "
                              f"timing {len(in_round)} contestants, repeat {repeat + 1}")
            shift = repeat % len(in_round)
            for entry in in_round[shift:] + in_round[:shift]:
                try:
                    entry.times.append(timer(entry.call, setting.q.device, entry.prepare))
                except Exception as exc:  # noqa: BLE001 (reported as the contestant's result)
                    entry.failure = _failure(entry.base, exc)
            repeat += 1
    finally:
        for contestant in contestants:
            contestant.release()
    return [_result(o, setting) if isinstance(o, _Timed) else o for o in outcomes]


def _set_ratios(block: List[Result], contestants: Sequence[Contestant]) -> None:
    fastattn_names = {c.name for c in contestants if c.is_fastattn}
    reference = next((r for r in block if r.contestant in fastattn_names and r.status == "ok"), None)
    if reference is None:
        return
    for r in block:
        if r.status == "ok":
            r.ratio, r.ratio_to = r.ms / reference.ms, reference.contestant


def run(args: argparse.Namespace, contestants: Sequence[Contestant], progress: Optional[Progress] = None,
        dense_masks: Optional[DenseMasks] = None) -> List[Result]:
    """The sweep: every dtype, N, case and mode; every contestant on the same inputs."""
    device = args.device
    dense_masks = dense_masks or DenseMasks()
    progress = progress or Progress(0, False)
    needs_grads = any(mode != "fwd" for mode in args.modes)
    results: List[Result] = []
    for dtype_name in args.dtype:
        dtype = DTYPES[dtype_name]
        unavailable = {c.name: c.unavailable_reason(device, dtype, args.head_dim) for c in contestants}
        for name, reason in unavailable.items():
            if reason:
                progress.write(f"{dtype_name:>5} {name}: unavailable: {reason}")
        for seqlen in args.seqlen:
            batch = batch_for(args, seqlen)
            q, k, v, dout = make_inputs(args, batch, seqlen, dtype)
            for case in args.cases:
                progress.describe(f"{dtype_name} N={seqlen} {case.name}: float64 oracle")
                oracle = chunked_oracle(q, k, v, *case.window, dout=dout if needs_grads else None)
                for mode in args.modes:
                    setting = Setting(q, k, v, dout, case, mode)
                    bases = [dict(dtype=dtype_name, case=case.name, seqlen=seqlen, batch=batch, heads=args.heads,
                                  heads_kv=args.heads_kv, head_dim=args.head_dim, mode=mode, contestant=c.name)
                             for c in contestants]
                    block = measure_setting(contestants, setting, oracle, args, bases, unavailable, progress)
                    _set_ratios(block, contestants)
                    results += block
                    for r in block:
                        if r.status != "unavailable":
                            progress.write(format_row(r))
                del oracle
                dense_masks.clear()
    return results


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine(args: argparse.Namespace) -> dict:
    from ..info import collect
    info = collect()
    meta = {key: info[key] for key in ("fastattn", "python", "torch", "torch_cuda", "triton", "platform")}
    meta.update({
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m fastattn.bench " + shlex.join(args.argv),
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else f"cpu: {_cpu_model()}",
        "cpp_build": next((b.get("build") for b in info["backends"] if b["name"] == "cpp"), None),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "warmup": args.warmup, "repeats": args.repeats, "min_time_s": args.min_time,
        "rel_error_limits": {str(k).replace("torch.", ""): v for k, v in REL_ERROR_LIMIT.items()},
        "timing": "median of the timed calls after the warm-up calls (CUDA events on CUDA)",
        "peak_memory": "MiB above the inputs: CUDA max_memory_allocated; CPU VmHWM - VmRSS (fastattn.bench.measure)",
        "flops": "2 * B * Hq * sum_i visible_keys(i) * (D + Dv); bwd 2.5x, fwd_bwd 3.5x (DESIGN section 6)",
        "ratio": "contestant time / time of the reference fastattn contestant (ratio_to); > 1: fastattn faster",
    })
    return meta


def _median_of_text(args: argparse.Namespace) -> str:
    if args.min_time <= 0:
        return str(args.repeats)
    return (f"{args.repeats} to {args.repeats * MAX_ROUNDS_PER_REPEAT} (rounds until {args.min_time:g} s per contestant; "
            "timed_calls column)")


def main(argv: Optional[Sequence[str]] = None) -> List[Result]:
    args = parse_args(argv)
    contestants = make_fastattn(args.backends, int(args.max_dense_gib * 2**30))
    dense_masks = DenseMasks()
    contestants += make_peers(args.peers, dense_masks, int(args.max_dense_gib * 2**30))
    meta = describe_machine(args)
    say = (lambda *a: None) if args.quiet else print
    heads = f"H={args.heads}" + (f" Hkv={args.heads_kv}" if args.heads_kv != args.heads else "")
    size = f"tokens={args.tokens} (B = T // N)" if args.tokens else f"B={batch_for(args, 1)}"
    say(f"fastattn {meta['fastattn']}, torch {meta['torch']}, triton {meta['triton'] or '-'}, {meta['device']}, "
        f"{meta['cpu_threads']} CPU threads")
    say(f"{size} {heads} D={args.head_dim}, warm-up {args.warmup}, median of {_median_of_text(args)}; "
        f"ratio = contestant time / {contestants[0].name} time (> 1: fastattn faster)")
    say(HEADER)
    total = len(args.dtype) * len(args.seqlen) * len(args.cases) * len(args.modes) * len(contestants)
    progress = Progress(total, not args.quiet)
    try:
        results = run(args, contestants, progress, dense_masks)
    finally:
        progress.close()
    meta["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    summary = summary_markdown(results)
    say("\n" + summary)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        write_csv(results, os.path.join(args.out, "bench.csv"))
        write_json(results, meta, os.path.join(args.out, "bench.json"))
        with open(os.path.join(args.out, "summary.md"), "w") as f:
            load = "" if meta["load_average"] is None else (
                f", load average {meta['load_average'][0]:.1f} at the start, {meta['load_average_end'][0]:.1f} at the end")
            f.write(f"`{meta['command']}`\n\n{meta['device']}, {meta['cpu_threads']} threads, torch {meta['torch']}, "
                    f"fastattn {meta['fastattn']}, {meta['date']}{load}; warm-up {args.warmup}, median of "
                    f"{_median_of_text(args)} interleaved timed calls\n\n{summary}")
        title = (f"fastattn.bench on {meta['device']}, {size} {heads} D={args.head_dim}, "
                 f"torch {meta['torch']}")
        paths = plot(results, args.cases, args.out, title)
        say(f"wrote {', '.join(['bench.csv', 'bench.json', 'summary.md'] + [os.path.basename(p) for p in paths])} "
            f"to {args.out}")
    return results


def exit_status(results: Sequence[Result]) -> int:
    """1 when a fastattn contestant was wrong or raised: the run then failed its purpose."""
    failed = [r for r in results if r.contestant.startswith("fastattn[") and r.status in ("wrong", "error")]
    return 1 if failed else 0
