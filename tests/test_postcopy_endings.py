"""No reader left behind: threads reading owed pages race every way a transparent post-copy can end.

Each round, reader threads fault on owed pages while a hand-driven source
completes the migration, cuts the link (the program then abandons), or keeps
sending while the program abandons. Whatever ends it, every reader must wake,
with the source's bytes or, after ``abandon()``, with the zeros the program
chose; a page present before the end keeps the source's bytes.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import migcore
from migcore import _postcopy_wire as PW
from migcore import _protocol as P
from migcore import _userfault

from _live import Receiver, wait_status
from test_deferred_digest import table_digest
from test_failures import NBYTES, Forged, pages_frame

REASON = _userfault.postcopy_reason(migcore.Region.allocate(4096))
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"userfaultfd post-copy unavailable: {REASON}")

ROUNDS = 150
NPAGES = -(-NBYTES // 4096)
ENDINGS = ("complete", "cut", "abandon")


def page_bytes(rng: np.random.Generator) -> dict[int, bytes]:
    """Non-zero content for every page (the last one partial)."""
    sizes = [4096] * (NPAGES - 1) + [NBYTES - (NPAGES - 1) * 4096]
    return {p: rng.integers(1, 256, n, dtype=np.uint8).tobytes() for p, n in enumerate(sizes)}


def switch_owing_everything(f: Forged, digest: bytes) -> None:
    f.hello(mode="postcopy")
    f.send(P.encode_header(P.Frame.STATE, length=1) + b"s")
    f.send(PW.encode_postcopy(digest, PW.all_owed(NPAGES), f.binding(b"s")))
    header, _ = f.read_frame()
    assert header is not None and header.type is P.Frame.SWITCHED


def reader(received: migcore.Received, pages: list[int], out: dict[int, bytes]) -> None:
    """Touch each page as native code would (the fault waits without the GIL), then read it."""
    uffd = _userfault.module()
    view = received.region.view
    addr = uffd.address_of(view)
    for p in pages:
        lo, hi = p * 4096, min((p + 1) * 4096, NBYTES)
        uffd.touch(addr + lo, hi - lo, 4096)
        out[p] = bytes(view[lo:hi])


def test_every_reader_wakes_with_the_right_bytes_whatever_ends_the_postcopy() -> None:
    rng = np.random.default_rng(0)
    outcomes = dict.fromkeys(ENDINGS, 0)
    with migcore.listen("tcp://127.0.0.1:0", timeout=5) as listener:
        for i in range(ROUNDS):
            ending = ENDINGS[i % 3]
            data = page_bytes(rng)
            rx = Receiver(listener, wait=False, timeout=5)
            f = Forged(listener.address)
            try:
                switch_owing_everything(f, table_digest(data, NBYTES))
                rx.join()
                received = rx.received
                assert received is not None and received.transparent
                order = [int(p) for p in rng.permutation(NPAGES)]
                got: list[dict[int, bytes]] = [{} for _ in range(3)]
                readers = [
                    threading.Thread(target=reader, args=(received, order[k::3] + order[: 1 + k], got[k]), daemon=True)
                    for k in range(3)
                ]
                for t in readers:
                    t.start()
                sent = NPAGES if ending == "complete" else int(rng.integers(0, NPAGES))
                for p in sorted(order[:sent]):
                    f.send(pages_frame([(p, 1)], data[p], flags=P.FLAG_POSTCOPY))
                    if rng.random() < 0.2:
                        time.sleep(0.0005)  # let readers fault in between
                if ending == "complete":
                    f.send(P.encode_header(P.Frame.END))
                    received.wait(5)
                elif ending == "cut":
                    f.close()
                    wait_status(received, "postcopy-paused", 5)
                    missing = received.missing_pages  # at least what was never sent (a reset drops what was in flight)
                    assert NPAGES - sent <= missing
                    assert received.abandon() == missing == received.missing_pages
                else:
                    lost = received.abandon()  # pages may still be on their way: they are refused from now on
                    assert NPAGES - sent <= lost <= NPAGES and received.missing_pages == lost
                for t in readers:
                    t.join(5)
                    assert not t.is_alive(), f"round {i} ({ending}): a reader stayed blocked"
            finally:
                f.close()
            present = {p for p in range(NPAGES) if not received.missing_in(p * 4096, 1)}
            view = received.region.view
            for p in range(NPAGES):
                now = bytes(view[p * 4096 : min((p + 1) * 4096, NBYTES)])
                if ending == "complete" or p in present:
                    assert now == data[p], f"round {i} ({ending}): page {p}"
                else:
                    assert now == bytes(len(now)), f"round {i} ({ending}): lost page {p} is not zeros"
            for out in got:
                for p, seen in out.items():
                    assert seen in (data[p], bytes(len(seen))), f"round {i}: a reader saw a byte nobody sent"
                    if ending == "complete":
                        assert seen == data[p]
            outcomes[ending] += 1
    assert outcomes == dict.fromkeys(ENDINGS, ROUNDS // 3)
