"""Human-friendly sizes, rates and durations: parsed from options, formatted for tables and bars.

The parsers raise :class:`argparse.ArgumentTypeError`, so argparse reports a
bad value with its usage line and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "kb": 10**3,
    "m": 1 << 20,
    "mib": 1 << 20,
    "mb": 10**6,
    "g": 1 << 30,
    "gib": 1 << 30,
    "gb": 10**9,
    "t": 1 << 40,
    "tib": 1 << 40,
    "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``"4096"``, ``"64MiB"``, ``"1G"``, ``"1.5GiB"``, ``"10MB"``, ``"0"``.

    ``K``/``M``/``G``/``T`` and ``KiB``/``MiB``/... are powers of 1024 (as in
    ``dd`` and QEMU); ``KB``/``MB``/... are powers of 1000. Case does not matter.
    """
    m = _SIZE_RE.match(text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 4096, 64MiB, 1G, 10MB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number of bytes: {text!r}")
    return int(value)


def parse_rate(text: str) -> float:
    """Bytes per second in ``text``: ``"20MiB/s"``, ``"1G"``, ``"0"``; ``"inf"``/``"max"`` = unbounded."""
    t = text.strip().lower()
    if t in ("inf", "max", "unlimited", "unbounded"):
        return math.inf
    for suffix in ("/s", "ps"):
        if t.endswith(suffix):
            t = t[: -len(suffix)]
            break
    try:
        return float(parse_size(t))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"not a rate: {text!r} (try 20MiB/s, 1G, 0, inf)") from None


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``"0.3"``, ``"0.3s"``, ``"300ms"``, ``"2m"``."""
    m = re.match(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min)?\s*$", text, re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (try 0.3, 300ms, 2s)")
    unit = (m.group(2) or "s").lower()
    return float(m.group(1)) * {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0}[unit]


def format_size(n: float) -> str:
    """``67108864`` -> ``"64.0 MiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def format_rate(n: float) -> str:
    return "unbounded" if math.isinf(n) else f"{format_size(n)}/s"


def format_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"
