"""Peak extra CPU memory of a callable.

Two exact counters run during the call, one per way memory reaches a tensor here:

1. c10 allocator events. Under ``torch.profiler.profile(profile_memory=True)`` the CPU allocator
   reports every allocation (+bytes) and free (-bytes) as a ``[memory]`` event; sorting them by
   time and taking the running sum gives the bytes the callable holds at every instant beyond what
   existed before, and its maximum is the peak. This sees every ``torch.empty``/temporary, but not
   memory that torch did not allocate.
2. tracemalloc. Python objects and numpy arrays (numpy reports its data buffers to tracemalloc)
   are traced from the start of the call; ``get_traced_memory()`` gives their peak. This is what
   sees a buffer pool that hands out numpy memory wrapped with ``torch.from_numpy`` (fastdistill's
   pooled CPU gradients).

The reported peak is the sum of the two peaks: exact when one of them is (nearly) zero, as in
every benchmark case, and otherwise an upper bound (the two peaks need not coincide). Raw C/C++
``malloc`` inside a kernel is seen by neither; the resident-set high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs``) is recorded next to it as a cross-check, but is not used for the
figure: glibc returns unrelated free heap memory to the OS at arbitrary moments (RSS then drops
during the call and hides an allocation), which made it unreliable in practice here.

Whatever the callable returns (or leaves in ``.grad``) is still held at the end, so a gradient
counts, as it should. A pool that already holds a gradient-sized block would make a call look
free; the benchmarks empty fastdistill's pool before the measured call (harness.prepare), so the
figure is the memory one call needs. ``check_method`` and ``check_untracked`` verify both counters
on known allocations (bench/test_bench_memory.py runs them).
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class MemoryResult:
    peak_bytes: int  # reported peak extra memory: allocator peak + tracemalloc peak
    end_bytes: int  # still held when the call returned (outputs, gradients)
    allocator_peak_bytes: int  # c10 allocator events only
    allocator_end_bytes: int
    python_peak_bytes: int  # tracemalloc (Python objects, numpy buffers)
    python_end_bytes: int
    rss_peak_bytes: int | None  # VmHWM - RSS before (cross-check only); None without /proc
    n_events: int  # allocation + free events seen by the profiler
    result: Any  # what the callable returned

    @property
    def source(self) -> str:
        """Which counter carries the peak: ``allocator``, ``python`` (numpy/pool) or ``both``."""
        big = [
            name
            for name, b in (
                ("allocator", self.allocator_peak_bytes),
                ("python", self.python_peak_bytes),
            )
            if b > max(self.peak_bytes, 1) // 10
        ]
        return "both" if len(big) == 2 else (big[0] if big else "allocator")

    def ratio(self, unit_bytes: int) -> float:
        return self.peak_bytes / unit_bytes


def _memory_events(prof) -> list[tuple[int, int]]:
    """(time_ns, signed bytes) of every CPU allocator event, in time order."""
    events = []
    for ev in prof.profiler.kineto_results.events():
        if ev.name() != "[memory]" or ev.device_type() != torch.autograd.DeviceType.CPU:
            continue
        events.append((ev.start_ns(), int(ev.nbytes())))
    # Stable sort: events stamped in the same nanosecond keep their recorded order.
    events.sort(key=lambda e: e[0])
    return events


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
        return True
    except OSError:
        return False


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def _malloc_trim() -> None:
    # Give free heap memory back first, so less of it is returned during the call (RSS only).
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


_profiler_warm = False


def _warm_profiler() -> None:
    # The first profiling session of a process loads and initialises the profiler (over 100 MB of
    # RSS here, and Python objects); pay that once, outside any measurement.
    global _profiler_warm
    if not _profiler_warm:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            torch.empty(16).add_(1)
        _profiler_warm = True


def peak_extra_memory(fn: Callable[[], Any]) -> MemoryResult:
    """Run ``fn()`` once and measure the peak memory it allocates beyond what already exists."""
    _warm_profiler()
    gc.collect()
    _malloc_trim()
    own_tracing = not tracemalloc.is_tracing()
    if own_tracing:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        py_before, _ = tracemalloc.get_traced_memory()
        rss_before = _rss_bytes()
        hwm_ok = rss_before is not None and _reset_hwm()
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            result = fn()
        hwm = _hwm_bytes() if hwm_ok else None
        py_after, py_peak = tracemalloc.get_traced_memory()
    finally:
        if own_tracing:
            tracemalloc.stop()
    events = _memory_events(prof)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    py_peak_extra = max(0, py_peak - py_before)
    py_end_extra = py_after - py_before
    return MemoryResult(
        peak_bytes=peak + py_peak_extra,
        end_bytes=running + py_end_extra,
        allocator_peak_bytes=peak,
        allocator_end_bytes=running,
        python_peak_bytes=py_peak_extra,
        python_end_bytes=py_end_extra,
        rss_peak_bytes=hwm - rss_before if hwm is not None else None,
        n_events=len(events),
        result=result,
    )


def check_method(
    n_keep: int = 8_000_000, n_temp: int = 3_000_000, slack: int = 64 << 10
) -> MemoryResult:
    """Validate the method on a known pattern: keep ``n_keep`` floats, and hold two ``n_temp``
    temporaries at once before dropping them. Expected peak (n_keep + 2 n_temp) * 4 bytes and end
    n_keep * 4 bytes, up to ``slack`` bytes of bookkeeping (scalars, and the Python objects of
    the call itself, which tracemalloc counts: about 20 KB). Raises ValueError otherwise.

    Caveat found while writing this: the free of a block allocated *before* profiling began is not
    reported (the profiler warns "Memory block of unknown size"), so a callable that frees older
    memory is over- rather than under-estimated. The benchmarks keep their inputs alive anyway.
    """

    def pattern():
        keep = torch.empty(n_keep)
        a = torch.ones(n_temp)
        b = a * 2  # a and b alive together: the peak
        del a, b
        return keep

    res = peak_extra_memory(pattern)
    want_peak = (n_keep + 2 * n_temp) * 4
    want_end = n_keep * 4
    if abs(res.peak_bytes - want_peak) > slack or abs(res.end_bytes - want_end) > slack:
        raise ValueError(
            f"memory method disagrees with a known pattern: peak {res.peak_bytes} (want "
            f"{want_peak}), end {res.end_bytes} (want {want_end}), {res.n_events} events"
        )
    return res


def check_untracked(n_bytes: int = 64 << 20, slack: int = 1 << 20) -> MemoryResult:
    """Validate the tracemalloc counter: memory torch's allocator never sees (a numpy array wrapped
    as a tensor, the way a buffer pool hands out gradients) must still be counted, once."""
    import numpy as np

    def pattern():
        block = np.ones(n_bytes, dtype=np.uint8)
        tmp = np.ones(n_bytes // 2, dtype=np.uint8)  # a temporary: peak only
        del tmp
        return torch.from_numpy(block)

    res = peak_extra_memory(pattern)
    want_peak, want_end = n_bytes + n_bytes // 2, n_bytes
    if abs(res.peak_bytes - want_peak) > slack or abs(res.end_bytes - want_end) > slack:
        raise ValueError(
            f"memory method missed an untracked allocation: peak {res.peak_bytes} (want "
            f"{want_peak}), end {res.end_bytes} (want {want_end}); allocator saw "
            f"{res.allocator_peak_bytes}, tracemalloc {res.python_peak_bytes}"
        )
    return res
