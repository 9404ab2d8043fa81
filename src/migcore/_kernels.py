"""The per-page kernels the rest of migcore calls: the compiled fast path, or the plain reference.

The reference is a fallback for platforms where the extension cannot be built,
never a silent one: it logs a warning, and ``MIGCORE_REQUIRE_FASTPATH=1``
turns a missing build into an ``ImportError``.
"""

from __future__ import annotations

import logging
import os

try:
    from migcore import _fastpath as _impl

    COMPILED = True
except ImportError as _exc:  # pragma: no cover - exercised only without a build
    if os.environ.get("MIGCORE_REQUIRE_FASTPATH") == "1":
        raise ImportError(
            "migcore's compiled fast path is not built and MIGCORE_REQUIRE_FASTPATH=1 "
            "forbids the slow reference fallback; build it with `make build` or `pip install .`"
        ) from _exc
    from migcore import _reference as _impl  # type: ignore[no-redef]

    COMPILED = False
    logging.getLogger("migcore").warning(
        "migcore's compiled fast path is not available (%s); using the slow reference kernels", _exc
    )

hash_pages = _impl.hash_pages
hash_runs = _impl.hash_runs
hash_delta = _impl.hash_delta
compare_hashes = _impl.compare_hashes
zero_pages = _impl.zero_pages
dirty_runs = _impl.dirty_runs
set_bits = _impl.set_bits
clear_bits = _impl.clear_bits
count_bits = _impl.count_bits
and_bits = _impl.and_bits
or_bits = _impl.or_bits
andnot_bits = _impl.andnot_bits
runs_nbytes = _impl.runs_nbytes
send_runs = _impl.send_runs
recv_runs = _impl.recv_runs
xbzrle_encode = _impl.xbzrle_encode
xbzrle_decode = _impl.xbzrle_decode
delta_encode_runs = _impl.delta_encode_runs
delta_decode_runs = _impl.delta_decode_runs

IMPLEMENTATION = _impl.__name__
