"""Sliding-window attention over very long sequences on the CPU: time and peak memory against N.

Each N runs in a fresh process (so its peak resident memory, ru_maxrss, is its own): forward and
backward of window (128, 128), B=1, H=1, D=64, fp32 by default. Both time and memory should grow
linearly with N (cost ~ N * window); a dense N x N score matrix at N = 1M would need 4 TB.

    python benchmarks/long_sequence.py                      # N = 62,500 ... 1,000,000
    python benchmarks/long_sequence.py --seqlen 100000 --window 256
"""

import argparse
import json
import resource
import subprocess
import sys
import time


def child(seqlen: int, window: int, head_dim: int, dtype_name: str) -> dict:
    import torch

    import fastattn

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, seqlen, head_dim, generator=generator, dtype=dtype).requires_grad_()
               for _ in range(3))
    dout = torch.randn(1, 1, seqlen, head_dim, generator=generator, dtype=dtype)
    inputs_mib = 4 * q.numel() * q.element_size() / 2**20  # q, k, v, dout

    # The second of two runs is timed: the first pays for page faults on fresh allocations.
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        start = time.perf_counter()
        out = fastattn.attention(q, k, v, window=window, backend="cpp")
        forward_s = time.perf_counter() - start
        start = time.perf_counter()
        out.backward(dout)
        backward_s = time.perf_counter() - start
    assert torch.isfinite(q.grad).all() and torch.isfinite(out).all()
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seqlen": seqlen, "forward_s": forward_s, "backward_s": backward_s, "peak_rss_mib": peak_mib,
            "inputs_mib": inputs_mib}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, nargs="+", default=[62_500, 125_000, 250_000, 500_000, 1_000_000])
    parser.add_argument("--window", type=int, default=128, help="window (w, w)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.seqlen[0], args.window, args.head_dim, args.dtype)))
        return

    print(f"window ({args.window}, {args.window}), B=1, H=1, D={args.head_dim}, {args.dtype}, one process per N")
    print(f"{'N':>10} {'forward s':>10} {'backward s':>11} {'fwd us/token':>13} {'peak RSS MiB':>13} "
          f"{'inputs MiB':>11} {'RSS/N (KiB)':>12}")
    for seqlen in args.seqlen:
        command = [sys.executable, __file__, "--child", "--seqlen", str(seqlen), "--window", str(args.window),
                   "--head-dim", str(args.head_dim), "--dtype", args.dtype]
        r = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{seqlen:>10,} {r['forward_s']:>10.2f} {r['backward_s']:>11.2f} {1e6 * r['forward_s'] / seqlen:>13.2f} "
              f"{r['peak_rss_mib']:>13.0f} {r['inputs_mib']:>11.0f} {1024 * r['peak_rss_mib'] / seqlen:>12.2f}",
              flush=True)


if __name__ == "__main__":
    main()
