"""Every shipped Triton config compiles for sm_80 and sm_90 without a GPU, without spilling
registers and within the target's shared memory (what benchmarks/triton_resources.py prints).

The compilation runs in a subprocess without TRITON_INTERPRET: the interpreter (on in this
process when there is no GPU) replaces the @triton.jit kernels that triton.compile needs.
"""

import json
import os
import subprocess
import sys

import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def test_every_shipped_config_compiles_for_sm80_and_sm90_without_spills():
    from fastattn.backends.triton import configs, resources

    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(ROOT), env.get("PYTHONPATH")]))
    workers = str(max(1, min(16, len(os.sched_getaffinity(0)))))
    result = subprocess.run([sys.executable, "-m", "fastattn.backends.triton.resources", "--json",
                             "--workers", workers], env=env, capture_output=True, text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [resources.CompiledConfig(**{k: v for k, v in json.loads(line).items() if k != "fits"})
            for line in result.stdout.splitlines() if line.startswith("{")]
    print("\n" + resources.format_table(rows))

    expected = resources.jobs()
    assert len(rows) == len(expected)
    assert {row.target for row in rows} == {80, 90}
    assert {row.dtype for row in rows} == {"fp16", "bf16", "fp32"}
    assert {row.head_dim for row in rows} == set(configs.HEAD_DIM_BUCKETS)
    errors = [row for row in rows if row.error]
    assert not errors, resources.format_table(errors)
    assert all(row.registers > 0 for row in rows), "ptxas reported no register count"
    spilling = [row for row in rows if row.spill_bytes > 0]
    assert not spilling, "configs that spill:\n" + resources.format_table(spilling)
    too_big = [row for row in rows if row.shared_bytes > resources.SHARED_MEMORY_LIMIT[row.target]]
    assert not too_big, "configs over the shared memory limit:\n" + resources.format_table(too_big)
