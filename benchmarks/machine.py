"""What a benchmark ran on: CPU, memory, kernel and package versions (for the printed report).

Versions come from package metadata: importing Lightning just to ask costs seconds.
"""

from __future__ import annotations

import contextlib
import os
import platform
from typing import Any

__all__ = ["describe"]


def describe(*packages: str) -> dict[str, Any]:
    """CPU model and count, memory, Python, kernel, and the version of each of ``packages``."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "not installed"

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError):
        mem_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gib": mem_gib,
        "python": platform.python_version(),
    }
    info.update({package: ver(package) for package in packages})
    info["kernel"] = platform.release()
    return info
