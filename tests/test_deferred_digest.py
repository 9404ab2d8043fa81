"""Rule 2 when the source defers its digest to END (pure post-copy: pages are hashed as they are sent).

A pure post-copy source sends POSTCOPY with an all-zero digest and END with
the digest of its pause-time hash table; the destination must verify against
that one, and refuse END without it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import xxhash

import migcore
from migcore import _protocol as P

from _live import Receiver
from test_failures import NBYTES, TIMEOUT, Forged, expect_error_frame, pages_frame, postcopy_switch


def table_digest(pages: dict[int, bytes], nbytes: int) -> bytes:
    npages = -(-nbytes // 4096)
    table = np.full(npages, xxhash.xxh3_64_intdigest(bytes(4096)), dtype=np.uint64)
    table[-1] = xxhash.xxh3_64_intdigest(bytes(nbytes - (npages - 1) * 4096))
    for page, data in pages.items():
        table[page] = xxhash.xxh3_64_intdigest(data)
    return P.table_digest(table)


@pytest.fixture
def listener() -> Iterator[migcore.Listener]:
    with migcore.listen("tcp://127.0.0.1:0", timeout=TIMEOUT) as lst:
        yield lst


def finish(listener: migcore.Listener, end: bytes) -> tuple[Receiver, Forged]:
    rx = Receiver(listener, wait=False, timeout=TIMEOUT)
    f = Forged(listener.address)
    postcopy_switch(f, [2, 3])
    f.send(pages_frame([(2, 2)], b"\x04" * 4096 + b"\x05" * 4096, flags=P.FLAG_POSTCOPY))
    f.send(end)
    rx.join()
    assert rx.received is not None
    return rx, f


def test_end_with_the_right_digest_commits(listener: migcore.Listener) -> None:
    digest = table_digest({2: b"\x04" * 4096, 3: b"\x05" * 4096}, NBYTES)
    rx, f = finish(listener, P.encode_header(P.Frame.END, length=16) + digest)
    try:
        assert rx.received is not None
        rx.received.wait(TIMEOUT * 2)
        header, _ = f.read_frame()
        assert header is not None and header.type is P.Frame.DONE
        assert rx.received.stats.verified
    finally:
        f.close()


def test_end_with_a_wrong_digest_is_refused(listener: migcore.Listener) -> None:
    digest = table_digest({2: b"\x04" * 4096, 3: b"\x06" * 4096}, NBYTES)  # not what was stored
    rx, f = finish(listener, P.encode_header(P.Frame.END, length=16) + digest)
    try:
        assert rx.received is not None
        with pytest.raises(migcore.VerificationError):
            rx.received.wait(TIMEOUT * 2)
        expect_error_frame(f, P.ErrorCode.VERIFICATION)
    finally:
        f.close()


def test_end_without_the_deferred_digest_is_refused(listener: migcore.Listener) -> None:
    rx, f = finish(listener, P.encode_header(P.Frame.END))
    try:
        assert rx.received is not None
        with pytest.raises(migcore.ProtocolError, match="digest"):
            rx.received.wait(TIMEOUT * 2)
    finally:
        f.close()
