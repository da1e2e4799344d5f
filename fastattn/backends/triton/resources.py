"""Offline compilation of every shipped Triton config, for GPUs this machine need not have.

``compile_all`` compiles each kernel (forward, delta pre-pass, dK/dV, dQ) for every head-dim
bucket, dtype (fp16, bf16, fp32), key_padding_mask variant and autotune config of ``configs``, for
sm_80 and sm_90 (``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))``, no GPU
needed), and reads registers, spills and shared memory from ptxas' report and the compiled
metadata. Causal, windowed and full attention share one binary (the window is a run-time
argument), so they need no separate compilation.

The arguments are specialised as a typical launch specialises them: 16-byte aligned pointers,
multiple-of-16 lengths and strides (e.g. N = 4096, contiguous (B, H, N, D)) and one query head
per kv head (``kv_group == 1``, which triton folds into a constant, as for any int equal to 1);
``HEAD_DIM`` is the bucket's full width, the largest tiles that bucket loads.

Triton's interpreter mode replaces ``@triton.jit`` functions, so this must run in a process
without ``TRITON_INTERPRET``: ``python benchmarks/triton_resources.py`` (the table) or
``python -m fastattn.backends.triton.resources --json`` (what ``tests/test_triton_compile.py`` reads).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional, Tuple

import triton

from . import configs

#: Shared memory a block may use, per target (bytes): 163 KiB on sm_80, 227 KiB on sm_90.
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
TARGETS = configs.TARGETS
DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
#: Representative problem the arguments are specialised for (see the module docstring).
HEADS, SEQLEN = 16, 4096


@dataclasses.dataclass
class CompiledConfig:
    kernel: str
    target: int
    dtype: str
    head_dim: int
    padding: bool
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    shared_limit: int
    seconds: float
    error: str = ""

    @property
    def fits(self) -> bool:
        return not self.error and self.spill_bytes == 0 and self.shared_bytes <= self.shared_limit


def _specialise(value) -> Tuple[str, str]:
    """(signature type, specialisation attr) of a run-time argument, as triton's launcher derives
    them: pointers and ints divisible by 16 get the divisibility hint ``D`` (except the kernel's
    ``do_not_specialize`` arguments)."""
    if isinstance(value, str):  # a pointer, given by its element type
        return f"*{value}", "D"
    if isinstance(value, float):
        return "fp32", ""
    kind = "i32" if -2**31 <= value < 2**31 else "i64"
    return kind, "D" if value % 16 == 0 else ""


def _kernel_arguments(kernel: str, dtype: str, head_dim: int, padding: bool) -> Tuple[object, Dict[str, object]]:
    """The JIT function of `kernel` and its run-time arguments by name (pointers as element types)."""
    from . import bwd, fwd

    n, h, d = SEQLEN, HEADS, head_dim
    strides = lambda prefix: {f"stride_{prefix}b": h * n * d, f"stride_{prefix}h": n * d, f"stride_{prefix}m": d}
    key_strides = lambda prefix: {f"stride_{prefix}b": h * n * d, f"stride_{prefix}h": n * d, f"stride_{prefix}n": d}
    pad = {"Padding": "u1" if padding else dtype, "stride_pb": n if padding else 0, "stride_pn": 1 if padding else 0}
    window = {"window_left": n, "window_right": n}
    buckets = {"SEQLEN_Q_BUCKET": n, "SEQLEN_K_BUCKET": n, "SPAN_BUCKET": n}
    if kernel == "preprocess":
        return bwd._attn_bwd_preprocess, {"Out": dtype, "DOut": dtype, "Delta": "fp32", **strides("o"),
                                          **strides("do"), "heads_q": h, "seqlen_q": n, "head_dim_v": d}
    if kernel == "fwd":
        args = {"Q": dtype, "K": dtype, "V": dtype, "Out": dtype, "Lse": "fp32", "Padding": pad["Padding"],
                **strides("q"), **key_strides("k"), **key_strides("v"), **strides("o"),
                "stride_pb": pad["stride_pb"], "stride_pn": pad["stride_pn"],
                "heads_q": h, "kv_group": 1, "seqlen_q": n, "seqlen_k": n, "head_dim": d, "head_dim_v": d, **window,
                "scale_log2": 0.18,
                **buckets}
        return fwd._attn_fwd, args
    common = {"Q": dtype, "K": dtype, "V": dtype, "DOut": dtype, "Lse": "fp32", "Delta": "fp32"}
    if kernel == "dkdv":
        args = {**common, "DK": dtype, "DV": dtype, "Padding": pad["Padding"],
                **strides("q"), **key_strides("k"), **key_strides("v"), **strides("do"), **key_strides("dk"),
                **key_strides("dv"), "stride_pb": pad["stride_pb"], "stride_pn": pad["stride_pn"],
                "heads_q": h, "kv_group": 1, "seqlen_q": n, "seqlen_k": n, "head_dim": d,
                "head_dim_v": d, **window,
                "scale": 0.088, "scale_log2": 0.128, **buckets}
        return bwd._attn_bwd_dkdv, args
    if kernel == "dq":
        args = {**common, "DQ": dtype, "Padding": pad["Padding"],
                **strides("q"), **key_strides("k"), **key_strides("v"), **strides("do"), **strides("dq"),
                "stride_pb": pad["stride_pb"], "stride_pn": pad["stride_pn"],
                "heads_q": h, "kv_group": 1, "seqlen_q": n, "seqlen_k": n, "head_dim": d, "head_dim_v": d,
                **window, "scale": 0.088, "scale_log2": 0.128, **buckets}
        return bwd._attn_bwd_dq, args
    raise ValueError(f"unknown kernel {kernel!r}")


_PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _compile_one(job) -> CompiledConfig:
    kernel, target, dtype, head_dim, padding, config = job
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend

    fn, runtime_args = _kernel_arguments(kernel, dtype, head_dim, padding)
    constexprs = dict(config.get("kwargs", {}))
    dots = dict(DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", INTERPRETER=False)
    if kernel == "preprocess":
        constexprs.update(BLOCK_DV=head_dim, **dots)
    else:
        constexprs.update(BLOCK_D=head_dim, BLOCK_DV=head_dim, HAS_PADDING=padding, **dots)
    gpu = GPUTarget("cuda", target, 32)
    backend = make_backend(gpu)
    signature, attrs = {}, {}
    unspecialised = {fn.arg_names[i] if isinstance(i, int) else i for i in getattr(fn, "do_not_specialize", ())}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        value = runtime_args[name]
        if name in unspecialised:
            signature[name] = _specialise(value)[0]
            continue
        if not isinstance(value, str) and not isinstance(value, float) and value == 1:
            signature[name] = "constexpr"  # triton specialises an int equal to 1 into a constant
            constexprs[name] = 1
            continue
        signature[name], attr = _specialise(value)
        if attr:
            attrs[(index,)] = backend.parse_attr(attr)
    options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    result = dict(kernel=kernel, target=target, dtype=dtype, head_dim=head_dim, padding=padding,
                  block_m=constexprs.get("BLOCK_M", 0), block_n=constexprs.get("BLOCK_N", 0),
                  num_warps=config["num_warps"], num_stages=config["num_stages"],
                  shared_limit=SHARED_MEMORY_LIMIT[target])
    start = time.time()
    log = io.StringIO()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                                      target=gpu, options=options)
    except Exception as exc:  # reported per config; the caller decides what fails
        return CompiledConfig(**result, registers=0, spill_bytes=0, shared_bytes=0, seconds=time.time() - start,
                              error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300])
    text = log.getvalue()
    registers = _PTXAS_REGISTERS.findall(text)
    spills = _PTXAS_SPILLS.findall(text)
    if not registers or not spills:
        return CompiledConfig(**result, registers=0, spill_bytes=0, shared_bytes=compiled.metadata.shared,
                              seconds=time.time() - start, error="no ptxas report (was the compile cached?)")
    return CompiledConfig(**result, registers=int(registers[-1]),
                          spill_bytes=int(spills[-1][0]) + int(spills[-1][1]),
                          shared_bytes=compiled.metadata.shared, seconds=time.time() - start)


def jobs(targets=TARGETS, dtypes=tuple(DTYPES), buckets=configs.HEAD_DIM_BUCKETS, kernels=None,
         paddings=(False, True)):
    """Every (kernel, target, dtype, head dim, padding, config) that can ship."""
    selected = []
    kernels = kernels or configs.KERNELS + ("preprocess",)
    for target in targets:
        for dtype in dtypes:
            for bucket in buckets:
                for kernel in kernels:
                    if kernel == "preprocess":  # one config, no padding variant
                        selected.append((kernel, target, dtype, bucket, False,
                                         {"kwargs": {"BLOCK_M": configs.PREPROCESS_BLOCK_M},
                                          "num_warps": 4, "num_stages": 1}))
                        continue
                    for padding in paddings:
                        for config in configs.configs_for(kernel, dtype == "fp32", bucket, target):
                            selected.append((kernel, target, dtype, bucket, padding,
                                             {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
                                              "num_stages": config.num_stages}))
    return selected


def compile_all(workers: int = 1, **selection) -> List[CompiledConfig]:
    """Compiles every selected job, in `workers` processes; ptxas always runs (no cache hits)."""
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    triton.knobs.compilation.always_compile = True
    selected = jobs(**selection)
    if workers <= 1:
        return [_compile_one(job) for job in selected]
    # Longest first, one job at a time, so that no worker is left with the slow ones at the end.
    order = sorted(range(len(selected)), key=lambda index: _expected_cost(selected[index]), reverse=True)
    with ProcessPoolExecutor(workers) as pool:
        compiled = dict(zip(order, pool.map(_compile_one, [selected[index] for index in order])))
    return [compiled[index] for index in range(len(selected))]


def _expected_cost(job) -> Tuple[bool, int, int]:
    """Sort key for compile time: IEEE fp32 tl.dot is lowered to fully unrolled FMAs, so an fp32
    kernel takes far longer to compile (55-75 s at head dim 256 on a 2-core AMD EPYC, against 3-5 s
    for fp16) and grows with the head dim and the tile."""
    kernel, _, dtype, head_dim, _, config = job
    tile = config["kwargs"].get("BLOCK_M", 1) * config["kwargs"].get("BLOCK_N", 1)
    return dtype == "fp32", head_dim, tile


def format_table(results: List[CompiledConfig]) -> str:
    lines = [f"{'kernel':>10} {'sm':>3} {'dtype':>5} {'D':>4} {'pad':>3} {'BM':>4} {'BN':>4} {'warps':>5} "
             f"{'stages':>6} {'regs':>5} {'spill B':>7} {'smem B':>7} {'limit':>7}  status"]
    for r in results:
        status = "ok" if r.fits else (r.error or ("SPILLS" if r.spill_bytes else "SHARED MEMORY"))
        lines.append(f"{r.kernel:>10} {r.target:>3} {r.dtype:>5} {r.head_dim:>4} {'yes' if r.padding else 'no':>3} "
                     f"{r.block_m:>4} {r.block_n:>4} {r.num_warps:>5} {r.num_stages:>6} {r.registers:>5} "
                     f"{r.spill_bytes:>7} {r.shared_bytes:>7} {r.shared_limit:>7}  {status}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON lines")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--targets", type=int, nargs="+", default=list(TARGETS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--head-dims", type=int, nargs="+", default=list(configs.HEAD_DIM_BUCKETS))
    parser.add_argument("--kernels", nargs="+", default=None, choices=list(configs.KERNELS) + ["preprocess"])
    parser.add_argument("--padding", choices=["both", "no", "yes"], default="both",
                        help="key_padding_mask variants to compile")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels this compiles")
    start = time.time()
    results = compile_all(workers=args.workers, targets=args.targets, dtypes=tuple(args.dtypes),
                          buckets=tuple(args.head_dims), kernels=args.kernels,
                          paddings={"both": (False, True), "no": (False,), "yes": (True,)}[args.padding])
    if args.json:
        for r in results:
            print(json.dumps({**dataclasses.asdict(r), "fits": r.fits}))
    else:
        print(format_table(results))
        failed = sum(not r.fits for r in results)
        print(f"\n{len(results)} compiled in {time.time() - start:.0f} s (triton {triton.__version__}); "
              f"{failed} spill, exceed shared memory or fail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
