"""``python -m fastattn.bench``: fastattn against its peers, on the same inputs, in one run.

Each setting (dtype, N, case, mode) runs every contestant on the same q, k, v and dout:
fastattn's backends (``fastattn[auto]``, ``fastattn[cpp]``, ...) and the peers: every SDPA
backend (``sdpa-flash``, ``sdpa-efficient``, ``sdpa-cudnn``, ``sdpa-math``; causal through
``is_causal``, windows through the equivalent dense boolean mask), FlexAttention compiled with the
same block mask (``flex``; compile time in its own column, never in the kernel time), a naive
PyTorch ``softmax(q k^T * scale + mask) v`` (``naive``), and ``flash-attn`` / ``xformers`` when
installed. A peer that cannot run here is reported "unavailable: why", never fatal.

* Correctness first: each contestant's output (and dq, dk, dv for bwd modes) is compared with a
  float64 oracle computed blockwise over each query block's visible keys (cost ~ N * window);
  above the relative-error limit of the dtype (fp32 1e-4, bf16 1e-2, fp16 5e-3, fp64 1e-10) it
  is reported "wrong" and never timed.
* Time: median of --repeats calls after --warmup calls (with --min-time S, more rounds for each
  contestant until its own timed calls took S seconds, so that short calls get many samples);
  the timed calls of all contestants are interleaved (repeat by repeat, in rotated order) so that
  a change in the load of a shared machine falls on all alike. ``bwd`` times the backward alone (its forward
  runs untimed before each call). TFLOP/s: forward ``2 * B * Hq * sum_i visible_keys(i)
  * (D + Dv)``, backward 2.5x (DESIGN section 6). Peak memory above the inputs, in MiB, on CUDA
  and on the CPU. ratio = contestant time / fastattn time (> 1: fastattn faster).
* Output: a table (and a progress bar) while running, a markdown summary, and with --out DIR:
  bench.csv, bench.json, summary.md, time_vs_n.png and tflops_vs_n.png (log-log, with N^2 and
  N * w reference slopes). The exit status is 1 if a fastattn contestant was wrong or failed.

Examples::

    python -m fastattn.bench --seqlen 1024 4096 --cases full causal window:256,256 --out bench_out
    python -m fastattn.bench --device cuda --dtype bf16 --heads 16 --head-dim 128 --tokens 16384 \\
        --seqlen 1024 2048 4096 8192 16384 --cases full causal window:256,256 --modes fwd fwd_bwd \\
        --backends triton cpp --out DIR
"""

from .cases import MODES, Case, flops
from .cli import main, parse_args, run
from .contestants import Contestant, Setting, Unsupported
from .oracle import REL_ERROR_LIMIT, chunked_oracle, relative_error
from .report import Result

__all__ = ["main", "parse_args", "run", "Case", "MODES", "flops", "Contestant", "Setting", "Unsupported",
           "REL_ERROR_LIMIT", "chunked_oracle", "relative_error", "Result"]
