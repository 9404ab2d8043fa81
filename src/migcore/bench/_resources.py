"""What one process used: CPU seconds, peak and current resident memory, per-thread CPU (Linux /proc)."""

from __future__ import annotations

import os
import re
import resource
import time

_STATUS = "/proc/self/status"


def _status_kib(field: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as f:
            match = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def rss() -> int:
    """Current resident set size in bytes (``VmRSS``; 0 where unknown)."""
    return _status_kib("VmRSS") or 0


def peak_rss() -> int:
    """Peak resident set size in bytes since the last :func:`reset_peak` (``VmHWM``, else ``ru_maxrss``)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak() -> bool:
    """Restart the peak-RSS watermark at the current RSS (Linux ``clear_refs``); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True


def cpu_time() -> float:
    """CPU seconds (user + system) used by every thread of this process."""
    return time.process_time()


def thread_cpu(native_id: int | None) -> float:
    """CPU seconds used so far by one thread of this process (0.0 where unknown)."""
    if native_id is None:
        return 0.0
    try:
        with open(f"/proc/self/task/{native_id}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    # fields after the command name: state is [0], utime [11], stime [12]
    return (int(fields[11]) + int(fields[12])) / ticks
