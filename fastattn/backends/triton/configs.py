"""Every launch configuration of the Triton kernels, and how a launch picks one.

Autotuning is keyed on *buckets*, never on raw lengths (which would retune on every new length):

* ``length_bucket(n)``: the next power of two of a sequence length, clamped to [64, 65536];
* ``span_bucket``: the same for the most keys one query row can see (``min(Nk, left + right + 1)``),
  so a sliding window at N = 16k tunes like the short problem it is;
* the padded head dims ``BLOCK_D``/``BLOCK_DV`` (constexprs of the kernels), the padding variant
  and the dtypes (which triton adds to every autotune key).

The tables below give, per kernel, precision (``"16bit"`` for fp16/bf16 on the tensor cores,
``"fp32"`` for IEEE fp32 on the CUDA cores) and head-dim bucket, the configs autotune may pick
from, each marked with the targets it is shipped for (sm_80: A100 and other Ampere/Ada parts;
sm_90: H100/H200, also used for newer GPUs). ``tests/test_triton_compile.py`` compiles every one of
them offline for its targets and fails on a spill or a shared-memory overflow
(``python benchmarks/triton_resources.py`` prints registers, spills and shared memory).

``FASTATTN_TRITON_AUTOTUNE=0`` turns benchmarking off: each launch takes the first config of its
list (``benchmarks/gpu_check.sh`` runs the tests so: compiling every config of every bucket would
cost minutes).

Under the Triton interpreter (``TRITON_INTERPRET=1``, the CPU tests) there is nothing to tune:
launches use ``INTERPRETER_CONFIGS`` (small tiles, so short test sequences still span many blocks
and every block-boundary path runs), which tests can replace with ``use_configs``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Dict, Iterator, List, Optional, Tuple

import triton

HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256)
TARGETS = (80, 90)
#: Rows of the delta = rowsum(dout * out) pre-pass per program; it is memory-bound and untuned.
PREPROCESS_BLOCK_M = 64

BOTH, SM80, SM90 = (80, 90), (80,), (90,)

# (BLOCK_M, BLOCK_N, num_warps, num_stages, targets), per precision and head-dim bucket.
# Forward: BLOCK_M query rows per program, BLOCK_N keys per step of its loop.
_FWD = {
    "16bit": {
        16: [(128, 64, 4, 3, BOTH), (128, 128, 8, 3, BOTH)],
        32: [(128, 64, 4, 3, BOTH), (128, 128, 8, 3, BOTH)],
        64: [(128, 64, 4, 3, SM90), (128, 128, 8, 3, BOTH), (64, 64, 4, 4, BOTH)],
        128: [(128, 128, 8, 3, SM90), (128, 64, 8, 3, BOTH), (64, 64, 4, 3, SM90)],
        256: [(128, 64, 8, 2, SM90), (64, 64, 8, 2, SM80), (64, 32, 8, 2, SM80)],
    },
    "fp32": {
        16: [(32, 32, 4, 2, BOTH), (64, 32, 8, 2, BOTH)],
        32: [(32, 32, 4, 2, BOTH), (64, 32, 8, 2, SM80)],
        64: [(32, 32, 8, 2, SM80), (64, 16, 8, 2, SM90)],
        128: [(32, 32, 8, 2, BOTH), (64, 16, 8, 2, SM90), (32, 16, 4, 2, SM80)],
        256: [(32, 32, 8, 2, SM90), (32, 16, 8, 2, SM80)],
    },
}
# dK/dV: BLOCK_N keys per program (dk, dv accumulated in registers), BLOCK_M query rows per step.
_DKDV = {
    "16bit": {
        16: [(32, 128, 4, 3, BOTH), (64, 128, 8, 3, BOTH)],
        32: [(32, 128, 4, 3, BOTH), (64, 128, 8, 3, BOTH)],
        64: [(64, 128, 8, 3, BOTH), (32, 64, 4, 3, SM90)],
        128: [(32, 128, 8, 3, SM90), (32, 64, 4, 3, BOTH), (32, 64, 8, 2, SM80)],
        256: [(32, 64, 8, 2, SM80), (32, 32, 8, 2, SM90), (16, 32, 8, 2, SM90)],
    },
    "fp32": {
        16: [(32, 32, 4, 2, BOTH), (16, 32, 4, 2, SM80)],
        32: [(16, 32, 8, 2, SM80), (32, 32, 4, 2, SM80), (16, 32, 4, 2, SM90)],
        64: [(16, 32, 4, 2, BOTH), (16, 16, 4, 2, BOTH)],
        128: [(16, 16, 4, 2, BOTH), (32, 32, 8, 2, SM80), (16, 32, 8, 2, SM90)],
        256: [(16, 32, 8, 2, BOTH), (16, 16, 8, 2, BOTH)],
    },
}
# dQ: BLOCK_M query rows per program (dq accumulated in registers), BLOCK_N keys per step.
_DQ = {
    "16bit": {
        16: [(128, 32, 4, 3, BOTH), (128, 64, 8, 3, BOTH)],
        32: [(128, 32, 4, 3, BOTH), (128, 64, 8, 3, BOTH)],
        64: [(128, 32, 4, 3, SM90), (128, 64, 8, 3, BOTH), (64, 64, 4, 3, SM90)],
        128: [(128, 32, 8, 3, BOTH), (128, 64, 8, 2, SM90), (64, 32, 4, 3, BOTH)],
        256: [(64, 32, 8, 2, BOTH), (32, 32, 4, 2, SM80)],
    },
    "fp32": {
        16: [(64, 32, 4, 2, BOTH), (32, 32, 4, 2, BOTH)],
        32: [(32, 32, 4, 2, BOTH), (32, 16, 4, 2, BOTH)],
        64: [(32, 16, 8, 2, BOTH), (32, 16, 4, 2, BOTH)],
        128: [(32, 16, 8, 2, SM80), (32, 16, 4, 2, BOTH)],
        256: [(32, 16, 8, 2, BOTH), (16, 16, 4, 2, SM80), (16, 16, 8, 2, SM90)],
    },
}
KERNEL_TABLES = {"fwd": _FWD, "dkdv": _DKDV, "dq": _DQ}
KERNELS = tuple(KERNEL_TABLES)

#: Tiles used under the interpreter: unequal BLOCK_M and BLOCK_N so that a mix-up shows.
INTERPRETER_CONFIGS: Dict[str, triton.Config] = {
    "fwd": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
    "dkdv": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}),
    "dq": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}),
}
_interpreter_override: Dict[str, triton.Config] = {}


@functools.lru_cache(maxsize=None)
def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    # One object per distinct config, so the autotuner's list and the tables share them.
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


def precision(fp32: bool) -> str:
    return "fp32" if fp32 else "16bit"


def configs_for(kernel: str, fp32: bool, bucket: int, target: int) -> List[triton.Config]:
    """The configs `kernel` may use for a head-dim `bucket` on `target` (80 or 90), in order."""
    return [_config(*entry[:4]) for entry in KERNEL_TABLES[kernel][precision(fp32)][bucket] if target in entry[4]]


def all_configs(kernel: str) -> List[triton.Config]:
    """Every config of `kernel` in any table (the autotuner's full list, pruned per launch)."""
    seen: List[triton.Config] = []
    for table in KERNEL_TABLES[kernel].values():
        for entries in table.values():
            for entry in entries:
                config = _config(*entry[:4])
                if not any(config is known for known in seen):
                    seen.append(config)
    return seen


def head_dim_block(head_dim: int) -> int:
    """The padded head dim a kernel computes with: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def length_bucket(length: int) -> int:
    return min(65536, max(64, triton.next_power_of_2(max(length, 1))))


def span_bucket(seqlen_q: int, seqlen_k: int, window_left: int, window_right: int) -> int:
    """Bucket of the most keys one query row may see; window sides are already clamped >= 0."""
    return length_bucket(min(seqlen_k, window_left + window_right + 1))


def buckets(seqlen_q: int, seqlen_k: int, window_left: int, window_right: int) -> Tuple[int, int, int]:
    """The autotune key's length buckets: (queries, keys, most keys a row sees)."""
    return length_bucket(seqlen_q), length_bucket(seqlen_k), span_bucket(seqlen_q, seqlen_k, window_left, window_right)


def autotune_enabled() -> bool:
    return os.environ.get("FASTATTN_TRITON_AUTOTUNE", "1") != "0"


@functools.lru_cache(maxsize=None)
def _target_of(device) -> int:
    import torch

    major, _ = torch.cuda.get_device_capability(device)
    return 90 if major >= 9 else 80


def prune_configs(kernel: str):
    """An ``early_config_prune`` hook keeping the configs of the launch's precision, head-dim
    bucket and GPU generation (only the first when autotuning is off)."""

    def prune(configs, named_args, **kwargs):
        import torch

        args = {**named_args, **kwargs}
        q = args["Q"]
        allowed = configs_for(kernel, q.dtype == torch.float32, max(args["BLOCK_D"], args["BLOCK_DV"]),
                              _target_of(q.device))
        kept = [config for config in allowed if any(config is candidate for candidate in configs)]
        return kept if autotune_enabled() else kept[:1]

    return prune


def interpreter_config(kernel: str) -> triton.Config:
    return _interpreter_override.get(kernel, INTERPRETER_CONFIGS[kernel])


def shipped_block_shapes(kernel: str) -> List[triton.Config]:
    """One config per distinct (BLOCK_M, BLOCK_N) that `kernel` ships, for interpreter tests."""
    shapes: Dict[Tuple[int, int], triton.Config] = {}
    for config in all_configs(kernel):
        shapes.setdefault((config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]), config)
    return list(shapes.values())


@contextlib.contextmanager
def use_configs(**configs: Optional[triton.Config]) -> Iterator[None]:
    """Within the block, interpreter launches of the named kernels (``fwd``, ``dkdv``, ``dq``) use
    the given configs (tests run shipped configs this way)."""
    unknown = set(configs) - set(INTERPRETER_CONFIGS)
    if unknown:
        raise ValueError(f"unknown kernel(s) {sorted(unknown)}; expected some of {sorted(INTERPRETER_CONFIGS)}")
    saved = dict(_interpreter_override)
    _interpreter_override.update({name: config for name, config in configs.items() if config is not None})
    try:
        yield
    finally:
        _interpreter_override.clear()
        _interpreter_override.update(saved)
