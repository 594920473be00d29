"""Facts about this machine and its installed packages (``normlab info``, ``normlab bench``)."""

from __future__ import annotations

import platform
from importlib import metadata


def version(dist: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpuinfo_field(name: str):
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(name):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The vector-unit flags that matter to the kernels, as /proc/cpuinfo lists them."""
    flags = set((_cpuinfo_field("flags") or "").split())
    return [f for f in ("avx2", "fma", "avx512f", "avx512bw") if f in flags]
