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
        received = rx.received
        assert received is not None
        expect_error_frame(f, P.ErrorCode.PROTOCOL)
        # every page arrived but none is verified: paused, for a recovering source to end it properly
        with pytest.raises(migcore.MigrationTimeout):
            received.wait(0.3)
        assert received.stats.status == "postcopy-paused" and "digest" in received.stats.error
        assert not received.stats.verified
    finally:
        f.close()


@pytest.mark.parametrize("receiver", ["uffd", "python"])
def test_zero_notices_install_zero_pages_and_the_digest_still_checks(
    listener: migcore.Listener, receiver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A zero notice (PAGES with FLAG_ZERO, no payload) makes owed pages present as zeros, hashed as zeros."""
    if receiver == "python":
        from migcore._uffd_postcopy import UffdPostcopy

        monkeypatch.setattr(UffdPostcopy, "attach", classmethod(lambda cls, *a, **k: None))
    digest = table_digest({2: b"\x04" * 4096}, NBYTES)  # page 3 is a zero page
    rx = Receiver(listener, wait=False, timeout=TIMEOUT)
    f = Forged(listener.address)
    try:
        postcopy_switch(f, [2, 3])
        f.send(pages_frame([(3, 1)], b"", flags=P.FLAG_POSTCOPY | P.FLAG_ZERO))
        f.send(pages_frame([(2, 1)], b"\x04" * 4096, flags=P.FLAG_POSTCOPY))
        f.send(P.encode_header(P.Frame.END, length=16) + digest)
        rx.join()
        received = rx.received
        assert received is not None
        received.wait(TIMEOUT * 2)
        header, _ = f.read_frame()
        assert header is not None and header.type is P.Frame.DONE
        assert received.stats.verified and received.missing_pages == 0
        assert received.transparent == (receiver == "uffd")
        assert bytes(received.region.view[3 * 4096 : 4 * 4096]) == bytes(4096)
        assert bytes(received.region.view[2 * 4096 : 3 * 4096]) == b"\x04" * 4096
        stats = received.stats
        assert stats.zero_pages == 1 and stats.postcopy_pages == 1
    finally:
        f.close()


@pytest.mark.parametrize("pattern", ["random", "alternate"])
@pytest.mark.parametrize("receiver", ["uffd", "python"])
def test_pure_postcopy_owes_every_page_and_sends_zero_pages_as_notices(
    listener: migcore.Listener, receiver: str, pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No zero scan in the pause: every page is owed, the zero ones go as notices, each non-zero page once.

    "alternate" (every other page zero): a zero run between every two
    non-zero pages, so each background batch mixes a zero notice with pages.
    """
    if receiver == "python":
        from migcore._uffd_postcopy import UffdPostcopy

        monkeypatch.setattr(UffdPostcopy, "attach", classmethod(lambda cls, *a, **k: None))
    else:  # the source runs in this process, but nothing here touches an owed page: userfaultfd is safe
        from migcore import _local

        monkeypatch.setattr(_local, "is_source", lambda mid: False)
    nbytes = 3 * (1 << 20) + 1000  # ragged tail
    region = migcore.Region.allocate(nbytes)
    arr = region.array()
    rng = np.random.default_rng(8)
    arr[:] = rng.integers(1, 256, nbytes, dtype=np.uint8)
    npages = region.npages
    if pattern == "random":
        zero = sorted(int(p) for p in rng.choice(npages, size=npages // 3, replace=False))
    else:
        zero = list(range(1, npages, 2))
    zero.append(npages - 1)  # the partial last page too
    for p in zero:
        arr[p * 4096 : (p + 1) * 4096] = 0
    zero = sorted(set(zero))
    expected = bytes(region.view)
    rx = Receiver(listener, wait=True, timeout=TIMEOUT)
    stats = migcore.migrate(region, listener.address, mode="postcopy", state=b"s", timeout=TIMEOUT)
    rx.join()
    assert rx.error is None, rx.error
    received = rx.received
    assert received is not None and received.transparent == (receiver == "uffd")
    assert bytes(received.region.view) == expected
    assert stats.verified and received.stats.verified
    assert stats.zero_pages == len(zero) and received.stats.zero_pages == len(zero)
    assert stats.postcopy_pages == npages - len(zero) == received.stats.postcopy_pages
    assert list(stats.pages_per_round) == [npages]  # every page owed at the switch, nothing scanned
