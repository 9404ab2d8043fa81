"""The destination of a shared-storage migration (``file:///PATH``): load the image as its rounds appear.

The format and the source's side live in ``_storage``. The reader loads each
round's pages as soon as its manifest record appears (during pre-copy
already), but trusts a page only when its bytes hash to the *latest*
manifest hash for it: at FINAL it rereads every page that disagrees, then
checks the expected table against the final digest. The pre-migration checks
are the socket destination's (``_handshake.check_hello``).
"""

from __future__ import annotations

import logging
import os

import numpy as np

from migcore import _destination, _kernels, _storage
from migcore import _protocol as P
from migcore._received import Received
from migcore._errors import CompatibilityError, MigrationCancelled, ProtocolError, VerificationError
from migcore._handshake import DestinationOptions, check_hello
from migcore._region import Region, U64, new_bitmap
from migcore._stats import StatsRecorder
from migcore._trackers import runs_to_pages, zero_page_hashes

log = logging.getLogger("migcore")


def receive_file(path: str, opts: DestinationOptions, timeout: float | None) -> Received:
    """Load a shared-storage migration into a fresh region; see the module docstring for the checks."""
    reader = _storage.ManifestReader(_storage.manifest_path(path), timeout)
    reader.open()
    fd = -1
    region: Region | None = None
    stats = StatsRecorder(mode="", tracker="", migration_id="", page_size=0, total_bytes=0)
    try:
        rtype, _, body = reader.next("waiting for the manifest header")
        if rtype != _storage.REC_HEADER:
            raise ProtocolError("the manifest does not start with a header record")
        hello = P.decode_hello(body)
        refusal = check_hello(hello, opts, extra_streams=False)
        if refusal is not None:
            raise CompatibilityError(f"refused the shared-storage migration ({refusal[0]}): {refusal[1]}", field=refusal[0])
        stats = StatsRecorder(
            mode=hello.mode, tracker=hello.tracker, migration_id=hello.migration_id.hex(),
            page_size=hello.page_size, total_bytes=hello.nbytes,
        )
        fd = _storage.open_regular(path, os.O_RDONLY)
        region = _destination._allocate_region(hello.nbytes, hello.page_size)
        expected = zero_page_hashes(region)
        table = expected.copy()
        stats.activate()
        rounds = 0
        while True:
            rtype, number, body = reader.next("waiting for the next round")
            if rtype == _storage.REC_ROUND:
                if number != rounds:
                    raise ProtocolError(f"manifest round {number} where round {rounds} was due")
                runs, hashes = _storage.decode_round(body, region.npages)
                if len(runs):
                    expected[runs_to_pages(runs)] = hashes
                    _storage.read_runs(fd, region, runs, os.fstat(fd).st_size)  # start reading during pre-copy
                    _kernels.hash_runs(region.view, region.page_size, runs, table)
                    payload = P.runs_payload(runs, region.page_size, region.nbytes)
                    stats.add_pages(len(hashes), payload, payload)
                rounds += 1
                stats.synced(len(hashes), stats.remaining_bytes)
            elif rtype == _storage.REC_FINAL:
                if len(body) < P.DIGEST_SIZE:
                    raise ProtocolError("final manifest record shorter than its digest")
                digest, state = body[: P.DIGEST_SIZE], body[P.DIGEST_SIZE :]
                if len(state) > opts.max_state_bytes:
                    raise ProtocolError(f"state blob of {len(state)} bytes exceeds this side's limit")
                _finish(fd, region, table, expected, digest)
                stats.update(state_bytes=len(state))
                stats.completed()
                log.info("destination: shared-storage migration %s loaded and verified", stats.migration_id)
                return Received(region, state, stats, hello.mode)
            elif rtype == _storage.REC_CANCEL:
                raise MigrationCancelled(f"the source gave up: {body.decode('utf-8', 'replace')}")
            else:
                raise ProtocolError("a second header record in the manifest")
    except BaseException as exc:
        stats.finish("failed", str(exc))
        if region is not None:
            _destination._discard_region(region)
        raise
    finally:
        reader.close()
        if fd >= 0:
            os.close(fd)


def _finish(fd: int, region: Region, table: U64, expected: U64, digest: bytes) -> None:
    """Reread the pages whose bytes disagree with their latest manifest hash, then check everything."""
    if P.table_digest(expected) != digest:
        raise VerificationError("the manifest's page hashes disagree with its final digest: tampered manifest")
    size = os.fstat(fd).st_size
    if size != region.nbytes:
        raise ProtocolError(f"data file is {size} bytes, the migration {region.nbytes}: truncated or overwritten")
    dirty = new_bitmap(region.npages)
    if not _kernels.compare_hashes(table, expected, dirty):
        return
    out = np.empty((P.MAX_RUNS, 2), dtype=np.uint64)
    cursor = 0
    while cursor < region.npages:
        nruns, cursor = _kernels.dirty_runs(dirty, region.npages, out, cursor)
        if nruns == 0:
            break
        runs = out[:nruns].copy()
        _storage.read_runs(fd, region, runs, size)
        _kernels.hash_runs(region.view, region.page_size, runs, table)
    bad = np.flatnonzero(table != expected)
    if len(bad):
        raise VerificationError(
            f"{len(bad)} pages of the data file (first: page {int(bad[0])}) do not match the manifest: tampered file"
        )
