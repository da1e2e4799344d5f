"""Registers, spills and shared memory of every shipped Triton config, compiled offline.

Compiles each kernel (forward, delta pre-pass, dK/dV, dQ) for every head-dim bucket, dtype,
key_padding_mask variant and autotune config for sm_80 and sm_90 without a GPU, and prints one row
per compiled binary (see fastattn/backends/triton/resources.py for what is specialised how).

    python benchmarks/triton_resources.py                 # everything (a few minutes)
    python benchmarks/triton_resources.py --workers 2 --targets 90 --dtypes bf16 --head-dims 128
"""

import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    # The interpreter replaces the kernels this compiles: run again without it.
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    os.execve(sys.executable, [sys.executable] + sys.argv, env)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from fastattn.backends.triton.resources import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
