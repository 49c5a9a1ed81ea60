"""Measuring tools of the perf benchmarks: the peak RSS of a block, the median wall time of a call, ratios.

Memory is the peak resident set size (RSS) of the process during the measured run, sampled every
5 ms from ``/proc/self/statm``, minus the RSS just before the run (after ``gc.collect()`` and
``malloc_trim``). ``tracemalloc`` is not used: it does not see PyTorch's tensor allocations.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any


def malloc_trim() -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    """Peak RSS delta (bytes) over a block, sampled every ``interval`` seconds by a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak_delta, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> RssPeak:
        malloc_trim()
        self.base = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.peak_delta = self.peak - self.base


def timeit(fn: Callable[[], Any], reps: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def ratio(a: float, b: float) -> float:
    return float(a) / float(b) if b > 0 else float("nan")
