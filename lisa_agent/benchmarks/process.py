"""This process's memory, for the benchmarks' reports (Linux ``/proc``; the peak from ``getrusage``
elsewhere)."""

from __future__ import annotations


def _status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` field (``VmRSS``, ``VmHWM``) in MiB; None where there is no /proc."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """The high-water mark of this process's resident memory, MiB."""
    peak = _status_mb("VmHWM")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def rss_mb() -> float:
    """This process's resident memory now, MiB (the peak where the current figure cannot be read)."""
    now = _status_mb("VmRSS")
    return peak_rss_mb() if now is None else now
