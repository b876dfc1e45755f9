"""The machine and this process, for the benchmarks' headers and for benchmarks that run each case in a
fresh subprocess: the CPU's name, this process's resident memory.

The peak is ``VmHWM`` from ``/proc/self/status``: the high-water mark of this process's own address
space, which starts afresh at ``exec``. ``getrusage(RUSAGE_SELF).ru_maxrss`` does not: Linux carries
the forked copy of the parent's resident set over ``exec`` into it, so a child started by a parent
holding 1.4 GiB reports at least 1.4 GiB whatever it used itself.
"""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (or what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_bytes() -> int:
    """Resident memory now (VmRSS)."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The highest resident memory of this process so far (VmHWM)."""
    return _status_kib("VmHWM") * 1024
