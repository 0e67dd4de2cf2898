"""The CPU a benchmark ran on, by name, for the tables the benchmarks print."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The kernel's "model name" of the first CPU (e.g. "AMD EPYC"), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"
