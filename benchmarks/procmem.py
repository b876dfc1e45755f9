"""This process's resident memory, for benchmarks that run each case in a fresh subprocess.

The peak is ``VmHWM`` from ``/proc/self/status``: the high-water mark of this process's own address
space, which starts afresh at ``exec``. ``getrusage(RUSAGE_SELF).ru_maxrss`` does not: Linux carries
the forked copy of the parent's resident set over ``exec`` into it, so a child started by a parent
holding 1.4 GiB reports at least 1.4 GiB whatever it used itself.
"""

from __future__ import annotations


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def rss_bytes() -> int:
    """Resident memory now (VmRSS)."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """The highest resident memory of this process so far (VmHWM)."""
    return _status_kib("VmHWM") * 1024
