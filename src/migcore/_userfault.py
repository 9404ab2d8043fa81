"""When migcore may use userfaultfd: the kernel's features, and whether a region is memory it can register.

Both the ``"uffd"`` tracker and transparent post-copy need a region of
private anonymous memory (``Region.allocate``, or any page-aligned anonymous
``MAP_PRIVATE`` mapping) whose pages are at least the system page size.
Every check answers with a reason (a string) or None, so ``"auto"`` can fall
back quietly and an explicit request can say exactly why it cannot be met.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import sys
import threading
from types import ModuleType

from migcore._region import Region

log = logging.getLogger("migcore")

SYSTEM_PAGE = mmap.PAGESIZE

try:
    from migcore import _uffd
except ImportError as _exc:  # not Linux, or built without it
    _uffd_module: ModuleType | None = None
    _IMPORT_ERROR = str(_exc)
else:
    _uffd_module = _uffd
    _IMPORT_ERROR = ""


def available() -> bool:
    """Whether the compiled ``migcore._uffd`` is importable here."""
    return _uffd_module is not None


def module() -> ModuleType:
    """The compiled ``migcore._uffd`` (call only after a check returned None)."""
    assert _uffd_module is not None
    return _uffd_module


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[int, str | None]:
    """``(features, reason)``: the kernel's userfaultfd features, or why there are none."""
    if not sys.platform.startswith("linux"):
        return 0, f"userfaultfd is Linux-only (this is {sys.platform})"
    if _uffd_module is None:
        return 0, f"migcore._uffd is not built ({_IMPORT_ERROR})"
    if SYSTEM_PAGE != _uffd_module.SYSTEM_PAGE:
        return 0, f"system page size {SYSTEM_PAGE} is not the {_uffd_module.SYSTEM_PAGE} migcore._uffd assumes"
    try:
        fd, features = _uffd_module.open_uffd(0)
    except OSError as exc:
        hint = ""
        try:
            with open("/proc/sys/vm/unprivileged_userfaultfd", encoding="ascii") as f:
                if f.read().strip() == "0" and os.geteuid() != 0:
                    hint = " (vm.unprivileged_userfaultfd=0: run as root, with CAP_SYS_PTRACE, or set it to 1)"
        except OSError:
            pass
        return 0, f"userfaultfd is not available: {exc}{hint}"
    _uffd_module.close_fd(fd)
    return int(features), None


def kernel_reason(*, write_tracking: bool) -> str | None:
    """Why this kernel cannot do userfaultfd write tracking (or post-copy); None when it can."""
    features, reason = _probe()
    if reason is not None:
        return reason
    if write_tracking:
        uffd = module()
        need = {"UFFD_FEATURE_WP_ASYNC (Linux 6.7)": uffd.FEATURE_WP_ASYNC,
                "UFFD_FEATURE_WP_UNPOPULATED (Linux 6.4)": uffd.FEATURE_WP_UNPOPULATED}
        missing = [name for name, bit in need.items() if not features & bit]
        if missing:
            return f"the kernel ({os.uname().release}) lacks {' and '.join(missing)}"
    return None


def anonymous_private(start: int, stop: int) -> str | None:
    """Why ``[start, stop)`` is not wholly private anonymous memory in /proc/self/maps; None if it is."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError as exc:
        return f"cannot read /proc/self/maps: {exc}"
    cursor = start
    for line in lines:
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if hi <= cursor or lo >= stop:
            continue
        if lo > cursor:
            break
        perms = fields[1]
        path = fields[5].strip() if len(fields) > 5 else ""
        if perms[3] != "p" or (path and path != "[heap]") or int(fields[4]) != 0:
            kind = "shared" if perms[3] == "s" else f"file-backed ({path})"
            return f"it is {kind} memory, not private anonymous memory"
        if "w" not in perms:
            return "it is not writable memory"
        cursor = hi
        if cursor >= stop:
            return None
    return "its pages are not one mapping (a hole in /proc/self/maps)"


def system_span(region: Region) -> tuple[int, int]:
    """``(address, length)`` of the system pages the region's bytes touch (it may start mid-page)."""
    addr = module().address_of(region.view)
    lo = addr - addr % SYSTEM_PAGE
    return lo, -(-(addr + region.nbytes - lo) // SYSTEM_PAGE) * SYSTEM_PAGE


#: Ranges this process registered with a userfaultfd in missing-page mode: a non-present page there is owed.
_missing: dict[int, tuple[int, int]] = {}
_missing_lock = threading.Lock()


def claim_missing(addr: int, length: int) -> int:
    """Record a missing-mode registration of ``[addr, addr + length)``; returns the key to release it."""
    with _missing_lock:
        key = max(_missing, default=0) + 1
        _missing[key] = (addr, addr + length)
        return key


def release_missing(key: int) -> None:
    with _missing_lock:
        _missing.pop(key, None)


def missing_registered(addr: int, length: int) -> bool:
    """Whether any of ``[addr, addr + length)`` is registered in missing-page mode by this process."""
    with _missing_lock:
        return any(lo < addr + length and addr < hi for lo, hi in _missing.values())


def span(region: Region) -> tuple[int, int]:
    """``(address, length)`` of the region rounded up to whole system pages."""
    addr = module().address_of(region.view)
    return addr, -(-region.nbytes // SYSTEM_PAGE) * SYSTEM_PAGE


def region_reason(region: Region) -> str | None:
    """Why userfaultfd cannot watch this region's memory; None when it can."""
    if region.page_size < SYSTEM_PAGE:
        return f"its page size {region.page_size} is smaller than the system page ({SYSTEM_PAGE})"
    if _uffd_module is None:
        return f"migcore._uffd is not built ({_IMPORT_ERROR})"
    addr = module().address_of(region.view)
    if addr % SYSTEM_PAGE:
        return f"its buffer ({type(region.obj).__name__}) does not start on a page boundary"
    whole_mapping = region._mapping is not None or (isinstance(region.obj, mmap.mmap) and len(region.obj) == region.nbytes)
    if region.nbytes % SYSTEM_PAGE and not whole_mapping:
        return f"its length {region.nbytes} is not a multiple of the system page ({SYSTEM_PAGE})"
    if region._mapping is not None:
        return None  # Region.allocate: private anonymous by construction
    reason = anonymous_private(addr, addr + -(-region.nbytes // SYSTEM_PAGE) * SYSTEM_PAGE)
    if reason is not None:
        return f"its buffer ({type(region.obj).__name__}): {reason}"
    return None


def tracker_reason(region: Region) -> str | None:
    """Why ``tracker="uffd"`` cannot track ``region``; None when it can."""
    return kernel_reason(write_tracking=True) or region_reason(region)


def postcopy_reason(region: Region) -> str | None:
    """Why a destination region cannot use transparent (userfaultfd) post-copy; None when it can."""
    if region.page_size % SYSTEM_PAGE:
        return f"its page size {region.page_size} is not a multiple of the system page ({SYSTEM_PAGE})"
    return kernel_reason(write_tracking=False) or region_reason(region)
