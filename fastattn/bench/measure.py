"""Timing and peak memory of one contestant's call.

Time: one call at a time (``time_once``), on CUDA with CUDA events around the call (the GPU time
between them), on the CPU with ``time.perf_counter``. A `prepare` step (e.g. the forward pass
before a timed backward) runs before each call, outside the timed region. The caller takes the
median over repeats, interleaving contestants (see ``fastattn.bench.cli``), and on the CPU times
each call right after an untimed one of the same contestant (``time_after_own_call``).
Interleaved, a call would otherwise start from the caches and memory its predecessor left, and
in a rotated order the predecessor is mostly the same peer: fastattn followed sdpa-math (100 MB
of scores at N = 1024) in 2 of 3 rounds, sdpa-flash in 1 of 3. bf16 forward at N = 1024, 2-core
Xeon with AMX: fastattn 2.59 ms, sdpa-flash 2.97 ms (1.15x) timed so; 2.14 and 2.82 ms (1.32x)
each after its own call; 1.90 and 2.56 ms (1.34x) with no sdpa-math in the run.

Peak memory, reported in MiB above what was allocated before the calls (so the inputs are not
counted; outputs, gradients and every temporary are):

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
* CPU (Linux): the kernel's resident-set high-water mark. Writing ``5`` to
  ``/proc/self/clear_refs`` resets ``VmHWM`` to the current ``VmRSS``; after the calls,
  ``VmHWM - VmRSS(before)`` is the peak. The kernel updates the mark whenever pages are
  unmapped or released, so a peak that is freed again is still seen; its resolution is the
  RSS counters' batching, well under 1 MiB on this machine kind. ``malloc_trim(0)`` first hands
  glibc's cached free pages back to the kernel: otherwise a call could reuse them without its
  memory showing up in RSS. Elsewhere (no ``/proc/self/clear_refs``) CPU memory is not reported.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from typing import Callable, Optional

import torch

__all__ = ["warm_up", "time_once", "time_after_own_call", "PeakMemory"]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(call: Callable[[object], object], device: torch.device, warmup: int,
            prepare: Callable[[], object] = lambda: None, memory: Optional["PeakMemory"] = None) -> None:
    """Runs ``call(prepare())`` `warmup` times, untimed. `memory`, if given, is measured over these
    calls (over one call when ``warmup == 0``), so its bookkeeping never touches a timed call."""
    if memory is not None:
        memory.start()
    for _ in range(max(warmup, 1 if memory is not None else 0)):
        call(prepare())
    _synchronize(device)
    if memory is not None:
        memory.stop()


def time_once(call: Callable[[object], object], device: torch.device,
              prepare: Callable[[], object] = lambda: None) -> float:
    """Milliseconds of one ``call(prepare())``, `prepare` untimed."""
    argument = prepare()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call(argument)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    _synchronize(device)
    start = time.perf_counter()
    call(argument)
    return (time.perf_counter() - start) * 1e3


def time_after_own_call(call: Callable[[object], object], device: torch.device,
                        prepare: Callable[[], object] = lambda: None) -> float:
    """Milliseconds of one ``call(prepare())`` that follows an untimed one: the timed call finds
    the caches as this contestant's own call leaves them, whichever contestant ran before."""
    call(prepare())
    return time_once(call, device, prepare)


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak memory above the starting point, between `start()` and `stop()` (see the module
    docstring for how, per device). ``mib`` is None where it cannot be measured honestly."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: Optional[float] = None
        self._baseline = 0
        self._libc = None
        if device.type == "cpu":
            name = ctypes.util.find_library("c")
            try:
                self._libc = ctypes.CDLL(name) if name else None
            except OSError:
                self._libc = None

    _cpu_supported: Optional[bool] = None

    @classmethod
    def cpu_supported(cls) -> bool:
        """Whether this process can reset and read its resident-set high-water mark."""
        if cls._cpu_supported is None:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                _read_status_kib("VmHWM")
                cls._cpu_supported = True
            except OSError:
                cls._cpu_supported = False
        return cls._cpu_supported

    def start(self) -> None:
        self.mib = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._baseline = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu" and self.cpu_supported():
            if self._libc is not None and hasattr(self._libc, "malloc_trim"):
                self._libc.malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._baseline = _read_status_kib("VmRSS") * 1024
        else:
            self._baseline = None

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._baseline is not None:
            peak = _read_status_kib("VmHWM") * 1024
        else:
            return
        self.mib = max(0, peak - self._baseline) / 2**20
