"""Smoke tests of the benchmark suite (``fastattn.bench``): tiny CPU runs, the correctness gate,
the FLOP formula and the chunked oracle. No timing is asserted, only that times are reported."""

import csv
import dataclasses
import json
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from fastattn import masks
from fastattn.bench import REL_ERROR_LIMIT, Case, chunked_oracle, flops, main, parse_args, run
from fastattn.bench.cli import MAX_ROUNDS_PER_REPEAT, batch_for
from fastattn.bench.contestants import Contestant, make_fastattn, make_peers, DenseMasks
from fastattn.bench.measure import PeakMemory
from fastattn.bench.report import Result
from fastattn.testing import attention_ref, make_qkv

TINY = ["--device", "cpu", "--dtype", "fp32", "--heads", "4", "--heads-kv", "2", "--head-dim", "16",
        "--repeats", "2", "--warmup", "1"]
NO_DENSE_LIMIT = 1 << 40


# ---- FLOPs ---------------------------------------------------------------------------------------

def test_flops_count_visible_keys_and_scale_backward():
    batch, heads, head_dim, head_dim_v = 2, 3, 16, 8
    per_key = 2 * batch * heads * (head_dim + head_dim_v)
    assert flops(batch, heads, 64, 64, head_dim, head_dim_v, Case.parse("full"), "fwd") == per_key * 64 * 64
    assert flops(batch, heads, 64, 64, head_dim, head_dim_v, Case.parse("causal"), "fwd") == per_key * 64 * 65 // 2
    # Nq != Nk, bottom-right aligned causal (DESIGN section 3): rows see 4 and 5 keys.
    assert flops(batch, heads, 2, 5, head_dim, head_dim_v, Case.parse("causal"), "fwd") == per_key * 9
    window = Case.parse("window:4,2")
    visible = int(masks.materialize(37, 37, window=(4, 2)).sum())
    assert flops(batch, heads, 37, 37, head_dim, head_dim_v, window, "fwd") == per_key * visible
    assert flops(batch, heads, 37, 37, head_dim, head_dim_v, window, "bwd") == 2.5 * per_key * visible
    assert flops(batch, heads, 37, 37, head_dim, head_dim_v, window, "fwd_bwd") == 3.5 * per_key * visible


def test_case_parsing():
    assert Case.parse("window:128") == Case("window(128,128)", 128, 128)
    assert Case.parse("window:512,0").window == (512, 0)
    assert Case.parse("causal").is_causal and not Case.parse("window:512,0").is_causal
    with pytest.raises(SystemExit):
        parse_args(["--cases", "window:-3,2"])
    with pytest.raises(SystemExit):
        parse_args(["--cases", "sliding"])


def test_tokens_quick_and_timing_defaults():
    args = parse_args(["--device", "cpu", "--tokens", "4096", "--seqlen", "8192", "1024", "2048"])
    assert [batch_for(args, n) for n in args.seqlen] == [4, 2, 1]
    quick = parse_args(["--device", "cpu", "--quick", "--seqlen", "4096", "512", "1024"])
    assert quick.seqlen == [512, 1024] and (quick.warmup, quick.repeats) == (1, 3)
    assert parse_args(["--device", "cpu", "--quick", "--repeats", "7"]).repeats == 7
    with pytest.raises(SystemExit):
        parse_args(["--device", "cpu", "--heads", "6", "--heads-kv", "4"])


# ---- the chunked float64 oracle ------------------------------------------------------------------

@pytest.mark.parametrize("seqlen_q, seqlen_k, heads_kv, window", [
    (33, 33, 4, (-1, -1)),
    (33, 33, 2, (-1, 0)),
    (40, 40, 1, (3, 7)),
    (40, 40, 4, (0, 0)),
    (17, 17, 2, (100, 100)),   # wider than the sequence
    (5, 20, 4, (-1, 0)),       # Nq < Nk: bottom-right aligned
    (20, 5, 2, (-1, 0)),       # Nq > Nk: the first rows see no key
    (20, 5, 4, (1, 0)),
])
def test_chunked_oracle_matches_dense_reference(seqlen_q, seqlen_k, heads_kv, window):
    q, k, v = make_qkv(2, 4, heads_kv, seqlen_q, seqlen_k, 8, 12, dtype=torch.float64)
    dout = torch.randn(2, 4, seqlen_q, 12, dtype=torch.float64)
    out, grads = chunked_oracle(q, k, v, *window, dout=dout, rows_per_block=7)

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    expected_out, _ = attention_ref(*leaves, window=window)
    expected_grads = torch.autograd.grad(expected_out, leaves, dout)
    torch.testing.assert_close(out, expected_out.detach(), rtol=1e-12, atol=1e-12)
    for grad, expected in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected, rtol=1e-11, atol=1e-12)
    assert not any(torch.isnan(t).any() for t in (out, *grads))


def test_chunked_oracle_default_blocks_and_forward_only():
    q, k, v = make_qkv(1, 2, 2, 300, 300, 16, dtype=torch.float32)
    out, grads = chunked_oracle(q, k, v, 20, 5)
    expected, _ = attention_ref(q, k, v, window=(20, 5))
    assert grads is None and out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


# ---- the correctness gate ------------------------------------------------------------------------

class _CountingContestant(Contestant):
    """Counts its calls, so a test can see whether it was timed."""

    def __init__(self, name):
        self.name = name
        self.calls = 0

    def __call__(self, q, k, v):
        self.calls += 1
        return self.compute(q, k, v)


class WrongScale(_CountingContestant):
    def compute(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, scale=1.0, enable_gqa=True)


class _WrongGradient(torch.autograd.Function):
    """The right output, but dk carries a wrong factor."""

    @staticmethod
    def forward(ctx, q, k, v):
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*leaves, enable_gqa=True)
        ctx.saved = (leaves, out)
        return out.detach()

    @staticmethod
    def backward(ctx, dout):
        leaves, out = ctx.saved
        dq, dk, dv = torch.autograd.grad(out, leaves, dout)
        return dq, 1.5 * dk, dv


class WrongGradient(_CountingContestant):
    def compute(self, q, k, v):
        return _WrongGradient.apply(q, k, v)


def test_gate_reports_wrong_contestants_and_never_times_them():
    args = parse_args(TINY + ["--seqlen", "48", "--cases", "full", "--modes", "fwd", "fwd_bwd", "--quiet"])
    wrong_scale, wrong_gradient = WrongScale("wrong-scale"), WrongGradient("wrong-gradient")
    results = run(args, make_fastattn(["auto"], NO_DENSE_LIMIT) + [wrong_scale, wrong_gradient])
    by = {(r.contestant, r.mode): r for r in results}

    for mode in ("fwd", "fwd_bwd"):
        assert by[("fastattn[auto]", mode)].status == "ok"
        r = by[("wrong-scale", mode)]
        assert r.status == "wrong" and r.ms is None and r.ratio is None and r.rel_error > REL_ERROR_LIMIT[torch.float32]
    assert wrong_scale.calls == 2  # one gate call per mode, no warm-up, no timing

    assert by[("wrong-gradient", "fwd")].status == "ok" and by[("wrong-gradient", "fwd")].ms > 0
    calls_after_fwd = 1 + args.warmup + 2 * args.repeats  # each timed call follows an untimed one
    r = by[("wrong-gradient", "fwd_bwd")]
    assert r.status == "wrong" and r.ms is None and r.note.startswith("dk rel.err")
    assert wrong_gradient.calls == calls_after_fwd + 1


def test_min_time_adds_interleaved_rounds_up_to_its_cap():
    timing = ["--seqlen", "48", "--cases", "full", "--modes", "fwd", "--quiet", "--repeats", "2", "--warmup", "1"]
    counted = WrongGradient("counted")  # its forward is right: it is timed
    results = run(parse_args(TINY + timing), [counted])
    # gate, warm-up, --repeats timed calls each after an untimed one
    assert counted.calls == 1 + 1 + 2 * 2 and results[0].timed_calls == 2
    counted = WrongGradient("counted")
    results = run(parse_args(TINY + timing + ["--min-time", "60"]), [counted])
    rounds = 2 * MAX_ROUNDS_PER_REPEAT  # 60 s is never reached: the cap ends it
    assert counted.calls == 1 + 1 + 2 * rounds and results[0].timed_calls == rounds and results[0].status == "ok"
    with pytest.raises(SystemExit):
        parse_args(TINY + ["--min-time", "-1"])


class Logged(_CountingContestant):
    """A right output; appends its name to a log shared with other contestants at each call."""

    def __init__(self, name, log):
        super().__init__(name)
        self.log = log

    def compute(self, q, k, v):
        self.log.append(self.name)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def test_each_timed_call_follows_a_call_of_its_own_contestant():
    # Interleaved in a rotated order, a contestant's predecessor would be mostly the same peer,
    # and its call would start from the caches that peer left (fastattn.bench.measure).
    log = []
    contestants = [Logged(name, log) for name in ("a", "b", "c")]
    args = parse_args(TINY + ["--seqlen", "48", "--cases", "full", "--modes", "fwd", "--quiet", "--repeats", "3",
                              "--warmup", "1"])
    results = run(args, contestants)
    assert all(r.status == "ok" and r.timed_calls == 3 for r in results)
    timed_phase = log[2 * len(contestants):]  # after each one's gate call and warm-up call
    assert len(timed_phase) == 2 * 3 * len(contestants)
    pairs = [timed_phase[i:i + 2] for i in range(0, len(timed_phase), 2)]
    assert all(first == second for first, second in pairs), pairs
    # still interleaved: every round has each contestant once
    assert [sorted(p[0] for p in pairs[r * 3:(r + 1) * 3]) for r in range(3)] == [["a", "b", "c"]] * 3


class Sleepy(_CountingContestant):
    """A right output that takes at least `seconds` per call."""

    def __init__(self, name, seconds):
        super().__init__(name)
        self.seconds = seconds

    def compute(self, q, k, v):
        time.sleep(self.seconds)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def test_min_time_counts_each_contestants_own_calls():
    timing = ["--seqlen", "48", "--cases", "full", "--modes", "fwd", "--quiet", "--repeats", "2", "--warmup", "1",
              "--min-time", "0.25"]
    slow, fast = Sleepy("slow", 0.1), Sleepy("fast", 0.0)
    results = run(parse_args(TINY + timing), [slow, fast])
    by = {r.contestant: r for r in results}
    # 3 calls of >= 0.1 s pass 0.25 s (2 do not, unless each overslept by 25 ms); the fast one is
    # still short of it at the cap.
    assert by["slow"].timed_calls == 3 and by["fast"].timed_calls == 2 * MAX_ROUNDS_PER_REPEAT
    assert all(r.status == "ok" for r in results)


# ---- whole runs ----------------------------------------------------------------------------------

def test_tiny_run_writes_table_csv_json_summary_and_plots(tmp_path, capsys):
    argv = TINY + ["--seqlen", "32", "64", "--cases", "full", "causal", "window:4,2", "--modes", "fwd", "bwd",
                   "fwd_bwd", "--peers", "sdpa-math", "sdpa-flash", "naive", "flash-attn", "--out", str(tmp_path)]
    results = main(argv)
    printed = capsys.readouterr().out
    assert "contestant" in printed and "fastattn[auto]" in printed and "| case | N |" in printed
    assert "flash-attn: unavailable: flash-attn runs on CUDA only" in printed

    assert len(results) == 2 * 3 * 3 * 5
    for r in results:
        if r.contestant == "flash-attn":
            assert r.status == "unavailable" and r.ms is None
            continue
        assert r.status == "ok", r
        assert r.ms > 0 and r.min_ms <= r.ms and r.rel_error <= REL_ERROR_LIMIT[torch.float32]
        expected = flops(r.batch, r.heads, r.seqlen, r.seqlen, r.head_dim, r.head_dim, Case.parse(
            {"full": "full", "causal": "causal"}.get(r.case, "window:4,2")), r.mode)
        assert r.tflops == pytest.approx(expected / (r.ms * 1e-3) / 1e12)
        assert r.ratio_to == "fastattn[auto]"
        if r.contestant == "fastattn[auto]":
            assert r.ratio == 1.0 and r.note == "auto -> cpp"
        if PeakMemory.cpu_supported():
            assert r.peak_mib is not None and r.peak_mib >= 0
    notes = {(r.contestant, r.case) for r in results if r.note == "dense bool mask"}
    assert ("sdpa-math", "window(4,2)") in notes and ("sdpa-math", "causal") not in notes

    with open(tmp_path / "bench.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results) and rows[0]["contestant"] == "fastattn[auto]"
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["meta"]["command"].startswith("python -m fastattn.bench --device cpu")
    assert data["meta"]["torch"] == torch.__version__ and len(data["results"]) == len(results)
    assert "| window(4,2) | 64 | 1 | fwd_bwd |" in (tmp_path / "summary.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "time_vs_n.png").exists()
        return
    for name in ("time_vs_n.png", "tflops_vs_n.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unavailable_unsupported_and_skipped_are_reported_not_fatal():
    # float64: no Triton kernel takes it (under TRITON_INTERPRET=1 Triton serves fp32 on the CPU).
    args = parse_args(TINY + ["--seqlen", "64", "--cases", "window:4,4", "--modes", "fwd", "--quiet",
                              "--backends", "auto", "triton", "--dtype", "fp64"])
    dense_masks = DenseMasks()
    tiny_limit = 1000  # bytes: any dense N x N tensor exceeds it
    contestants = make_fastattn(args.backends, tiny_limit) + make_peers(
        ["sdpa-efficient", "xformers", "naive", "sdpa-math", "sdpa-flash"], dense_masks, tiny_limit)
    by = {r.contestant: r for r in run(args, contestants, dense_masks=dense_masks)}
    assert by["fastattn[auto]"].status == "ok"
    assert by["fastattn[triton]"].status in ("unavailable", "unsupported") and by["fastattn[triton]"].note
    assert by["sdpa-efficient"].status == "unavailable" and "EFFICIENT_ATTENTION" in by["sdpa-efficient"].note
    assert by["xformers"].status == "unavailable"
    for name in ("naive", "sdpa-math", "sdpa-flash"):
        assert by[name].status == "skipped" and "--max-dense-gib" in by[name].note and by[name].ms is None


def test_flex_uses_the_same_window_and_reports_compile_time_apart():
    args = parse_args(TINY + ["--seqlen", "64", "--cases", "window:5,3", "--modes", "fwd", "fwd_bwd", "--quiet",
                              "--repeats", "1"])
    results = run(args, make_fastattn(["auto"], NO_DENSE_LIMIT) + make_peers(["flex"], DenseMasks(), NO_DENSE_LIMIT))
    by = {(r.contestant, r.mode): r for r in results}
    flex = by[("flex", "fwd")]
    assert flex.status == "ok" and flex.note == "block mask", flex  # passed the gate: the same mask
    assert flex.compile_s is not None and flex.compile_s > 0 and flex.ms > 0
    # torch 2.14 has no FlexAttention backward on the CPU: reported, never an error.
    assert by[("flex", "fwd_bwd")].status in ("ok", "unsupported"), by[("flex", "fwd_bwd")]
    import torch._inductor.config as inductor_config
    assert not inductor_config.force_disable_caches  # the cold compile did not leak into the process


@pytest.mark.skipif(not PeakMemory.cpu_supported(), reason="needs /proc/self/clear_refs (Linux)")
def test_cpu_peak_memory_sees_a_freed_allocation():
    memory = PeakMemory(torch.device("cpu"))
    memory.start()
    buffer = torch.ones(16 * 2**20)  # 64 MiB, touched, then freed before stop()
    del buffer
    memory.stop()
    assert 60 <= memory.mib <= 200


def _load_must_show():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_must_show.py"
    spec = importlib.util.spec_from_file_location("cpu_must_show", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_must_show_checks_use_the_fastest_sdpa_and_report_missing_peers():
    must_show = _load_must_show()
    shape = dict(dtype="fp32", batch=1, heads=8, heads_kv=8, head_dim=64)

    def row(contestant, ms, case="full", seqlen=1024, status="ok", note=""):
        return Result(**shape, case=case, seqlen=seqlen, mode="fwd", contestant=contestant, status=status,
                      ms=ms, ratio_to="fastattn[auto]" if status == "ok" else "", note=note)

    results = [row("fastattn[auto]", 10.0), row("sdpa-flash", 11.0), row("sdpa-math", 50.0),
               row("fastattn[auto]", 10.0, "window(256,256)", 8192), row("sdpa-flash", 150.0, "window(256,256)", 8192),
               row("flex", None, "window(256,256)", 8192, status="unsupported", note="no CPU backward"),
               row("fastattn[auto]", 10.0, "window(256,256)", 4096)]  # windows are judged at N = 8192 only
    checks = must_show.check_ratios(results)
    assert [(c[0], c[3]) for c in checks] == [(">= 1.2x SDPA", False), (">= 1.5x FlexAttention", None),
                                              (">= 10x SDPA + dense mask", True)]
    assert checks[0][2].startswith("1.100x (sdpa-flash") and "no CPU backward" in checks[1][2]

    line = [row("fastattn[auto]", 0.5 * n / 1024, "window(256,256)", n) for n in (1024, 4096, 16384, 65536)]
    bent = [row("fastattn[auto]", 0.5 * (n / 1024) ** 2, "window(256,256)", n) for n in (1024, 4096, 16384)]
    assert must_show.check_scaling(line)[0][3] is True
    assert must_show.check_scaling([dataclasses.replace(r, dtype="bf16") for r in bent])[0][3] is False


def test_ceiling_times_torch_mm_and_reports_attention_as_a_fraction_of_it():
    from fastattn.bench.ceiling import MatmulRate, attention_shapes, ceiling_table, matmul_rates
    shapes = attention_shapes(256, 64, square=128)
    assert [s for s, _ in shapes] == [(256, 256, 64), (256, 64, 256), (128, 128, 128)]
    rates = matmul_rates(shapes[:1], ["fp32"], repeats=2, warmup=1)
    assert len(rates) == 1 and rates[0].dtype == "fp32" and rates[0].gflops > 0

    must_show = _load_must_show()
    shape = dict(batch=1, heads=8, heads_kv=8, head_dim=64, case="full", seqlen=must_show.CEILING_SEQLEN,
                 mode="fwd", status="ok", ratio_to="fastattn[auto]")
    results = [Result(dtype="fp32", contestant="fastattn[auto]", ms=100.0, tflops=0.3, **shape),
               Result(dtype="fp32", contestant="sdpa-flash", ms=120.0, tflops=0.25, **shape),
               Result(dtype="fp32", contestant="sdpa-math", ms=900.0, tflops=0.03, **shape)]
    attention = must_show.attention_rates(results)
    assert [(label.split(",")[0], round(g)) for _, label, g in attention] == [("fastattn[auto]", 300), ("sdpa-flash", 250)]
    table = ceiling_table([MatmulRate("fp32", (8, 8, 8), "square", 400.0), MatmulRate("fp32", (8, 8, 4), "x", 200.0)],
                          attention)
    assert "| 75% |" in table and "| 62% |" in table and "| 50% |" in table
    # A dtype without a fast torch.mm: its rates keep their digits, attention is not a percentage.
    slow = ceiling_table([MatmulRate("bf16", (8, 8, 8), "square", 0.49)], [("bf16", "fastattn", 101.0)])
    assert "| 0.49 |" in slow and "206x (torch.mm has no fast path)" in slow


def test_ceiling_stops_a_slow_shape_at_its_time_budget(monkeypatch):
    from fastattn.bench import ceiling
    calls = []
    timed = ceiling.time_once
    monkeypatch.setattr(ceiling, "time_once", lambda *a, **k: calls.append(1) or timed(*a, **k))
    rates = ceiling.matmul_rates([((64, 64, 64), "tiny")], ["fp32"], repeats=5, warmup=3, budget_s=0.0)
    assert len(calls) == 1 and rates[0].gflops > 0  # one timed call, however slow
    calls.clear()
    ceiling.matmul_rates([((64, 64, 64), "tiny")], ["fp32"], repeats=5, warmup=1, budget_s=60.0)
    assert len(calls) == 5


def test_must_show_recheck_redraws_the_plots_of_a_recorded_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    must_show = _load_must_show()
    sweep_dir = tmp_path / "scaling"
    main(TINY + ["--seqlen", "32", "64", "--cases", "window:4,4", "--modes", "fwd", "--quiet", "--repeats", "1",
                 "--peers", "--out", str(sweep_dir)])
    for name in ("time_vs_n.png", "tflops_vs_n.png"):
        (sweep_dir / name).unlink()
    assert must_show.main(["--out", str(tmp_path), "--recheck", "--only", "scaling"]) == 0
    for name in ("time_vs_n.png", "tflops_vs_n.png"):
        assert (sweep_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fastattn[auto] fp32 window(4,4) fwd" in (tmp_path / "must_show.md").read_text()


def test_must_show_refuses_to_measure_without_matplotlib(monkeypatch, capsys):
    must_show = _load_must_show()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(SystemExit):
        must_show.main(["--out", "unused", "--only", "scaling"])
    assert "need matplotlib" in capsys.readouterr().err
