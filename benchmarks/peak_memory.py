"""Peak resident memory of this process above a baseline, for the benchmarks.

The kernel's own peak (``VmHWM``, reset through ``/proc/self/clear_refs``) where Linux allows it,
else RSS sampled every millisecond in a thread.
"""

from __future__ import annotations

import gc
import os
import threading
import time

__all__ = ["PeakRSS", "current_rss"]


def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        import psutil  # type: ignore[import-not-found]

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 64  # the reset really happened


class PeakRSS:
    """Peak resident memory above the level at ``__enter__``, in bytes (``.extra``)."""

    def __init__(self) -> None:
        self.method = ""
        self.baseline = 0
        self.extra = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRSS:  # noqa: PYI034 - Self needs Python 3.11
        gc.collect()
        self.baseline = current_rss()
        if _reset_peak_rss():
            self.method = "VmHWM (kernel peak RSS, reset via /proc/self/clear_refs)"
        else:
            try:
                import psutil  # type: ignore[import-not-found]  # noqa: F401

                self.method = "RSS sampled every 1 ms (psutil)"
            except ImportError:
                self.method = "RSS sampled every 1 ms (/proc/self/statm)"
            self._peak = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss())
            time.sleep(0.001)

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, current_rss())
        else:
            peak = (_proc_status_kib("VmHWM") or 0) * 1024
        self.extra = max(0, peak - self.baseline)
