"""Memory: the budget, parsing sizes like ``4GiB``, and the process's peak resident size."""
import logging
import os
import re

from .errors import NumbaemError

logger = logging.getLogger(__name__)

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000 ** 2, "mb": 1000 ** 2, "mib": 1024 ** 2,
          "g": 1000 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3, "t": 1000 ** 4, "tb": 1000 ** 4, "tib": 1024 ** 4}


def total_memory():
    """Physical memory of the machine in bytes."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 * 1024 ** 3


def default_budget():
    """A quarter of the machine's memory."""
    return total_memory() // 4


def parse_size(text):
    """``'4GiB'``, ``'512MB'``, ``'2e9'`` -> bytes (int)."""
    if isinstance(text, (int, float)):
        val = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise NumbaemError(f"memory size {text!r} is not understood; write it like 4GiB, 512MB or 2e9")
        val = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not val > 0:
        raise NumbaemError(f"memory size {text!r} must be positive")
    return int(val)


def format_size(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024.0


def peak_rss():
    """Peak resident set size of this process in bytes (``VmHWM``; resettable on Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def reset_peak_rss():
    """Reset the kernel's peak-RSS counter for this process (Linux; silently ignored elsewhere)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
