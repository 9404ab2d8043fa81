"""Shared-storage migration (``file:///PATH``): pages in place in a file both hosts mount, manifests beside it.

The source writes page ``i`` at offset ``i * page_size`` of ``PATH`` with
``pwrite`` straight from the region (no copy in Python), then hashes what the
file now holds (through a read-only mapping of it: the analogue of the
destination's ACK, DESIGN.md rule 1) and appends a record to
``PATH.manifest``. Every record is ``magic | type | round | length | body |
xxh3_64(all before)``, written with one ``write`` call:

- HEADER: the HELLO body (version, page size, size, mode, compat, id, ...);
- ROUND n: the runs written in round n and the hashes the file holds for them;
- FINAL: the digest of the source's hash table at the pause, then the state;
- CANCEL: the source gave up before the switchover (a reason).

Pre-copy rounds rewrite dirty pages in place; the destination reads each
round's pages as soon as its record appears, but trusts a page only when its
bytes hash to the *latest* manifest hash for it: at FINAL it rereads every
page that disagrees, then checks the expected table against the final digest.
A truncated data file or a record that fails its checksum is a
:class:`ProtocolError`; a page that still disagrees is a
:class:`VerificationError`.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import threading
import time

import numpy as np
import xxhash

from migcore import _destination, _kernels
from migcore import _protocol as P
from migcore._bandwidth import TokenBucket
from migcore._destination import Destination, DestinationOptions, Received
from migcore._errors import (
    CompatibilityError,
    MigrationCancelled,
    MigrationError,
    MigrationTimeout,
    PeerLostError,
    ProtocolError,
    VerificationError,
)
from migcore._region import Region, U64, new_bitmap
from migcore._source import BATCH_BYTES, Source, SourceOptions
from migcore._stats import MigrationStats, StatsRecorder
from migcore._trackers import runs_to_pages, zero_page_hashes
from migcore._transport import Connection

log = logging.getLogger("migcore")


_REC = struct.Struct("<4sBBHIQ")
_REC_MAGIC = b"MGRF"
_CHECK = struct.Struct("<Q")
REC_HEADER, REC_ROUND, REC_FINAL, REC_CANCEL = 1, 2, 3, 4
#: Longest record body a reader accepts (a round of a huge region has big tables).
MAX_RECORD = 1 << 34
#: Seconds between looks at a manifest that has not grown.
POLL_INTERVAL = 0.005


def manifest_path(path: str) -> str:
    return path + ".manifest"


def encode_record(rtype: int, number: int, body: bytes) -> bytes:
    head = _REC.pack(_REC_MAGIC, rtype, 0, 0, number, len(body)) + body
    return head + _CHECK.pack(xxhash.xxh3_64_intdigest(head))


class _Nowhere(Connection):
    """The connection of a shared-storage migration: there is no peer to talk to."""

    def __init__(self) -> None:  # noqa: D107 - no socket at all
        self.timeout = None
        self.received = 0
        self.sent = 0
        self._closed = True
        self._close_lock = threading.Lock()

    def send_all(self, data: bytes | bytearray | memoryview, what: str) -> None:
        raise PeerLostError(f"no connection while {what} (shared storage)")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)


class FileSource(Source):
    """A :class:`Source` whose pages go to ``path`` and whose acknowledgements come from the file itself."""

    def __init__(self, region: Region, path: str, opts: SourceOptions) -> None:
        super().__init__(region, _Nowhere(), opts)
        self.path = path
        self.fd = -1
        self.mfd = -1
        self.mapping: mmap.mmap | None = None

    def append(self, rtype: int, number: int, body: bytes) -> None:
        os.fdatasync(self.fd)  # the data a record names is on the file system before the record
        record = encode_record(rtype, number, body)
        written = os.write(self.mfd, record)
        if written != len(record):
            raise MigrationError(f"short write of a manifest record ({written} of {len(record)} bytes)")
        self.stats.add_wire(len(record))

    def handshake(self, state_size: int) -> None:
        region = self.region
        try:
            os.unlink(manifest_path(self.path))  # a reader must never pair old records with new pages
        except FileNotFoundError:
            pass
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self.fd, region.nbytes)  # holes read as zeros: zero pages are never written
        self.mapping = mmap.mmap(self.fd, region.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.mfd = os.open(manifest_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        hello = P.Hello(
            version=P.PROTOCOL_VERSION,
            page_size=region.page_size,
            nbytes=region.nbytes,
            mode=self.opts.mode,
            tracker=self.opts.tracker,
            features=0,
            compat=self.opts.compat,
            migration_id=self.mid,
            state_size=state_size,
        )
        self.append(REC_HEADER, 0, P.encode_hello(hello)[P.HEADER_SIZE :])
        self.accept = P.Accept(max_state=P.UNKNOWN_SIZE, max_payload=BATCH_BYTES, max_runs=P.MAX_RUNS, features=0)

    def send_runs(
        self,
        runs: U64,
        *,
        phase: str,
        flags: int = 0,
        conn: Connection | None = None,
        bucket: TokenBucket | None | bool = True,
    ) -> int:
        region = self.region
        ps = region.page_size
        payload = P.runs_payload(runs, ps, region.nbytes)
        self.hold_back(self.bucket, payload)
        for first, count in runs.tolist():
            start = first * ps
            _pwrite_all(self.fd, region.view[start : min(start + count * ps, region.nbytes)], start)
        self.stats.add_pages(int(runs[:, 1].sum()), payload, payload)
        with self.stats.lock:
            self.stats.remaining_bytes = max(0, self.stats.remaining_bytes - payload)
        self.report()
        return payload

    def stored_hashes(self, runs: U64) -> U64:
        """What the file holds for the pages of ``runs`` (in run order): the shared-storage ACK."""
        assert self.mapping is not None
        table = np.empty(self.region.npages, dtype=np.uint64)
        if len(runs):
            _kernels.hash_runs(self.mapping, self.region.page_size, runs, table)
        return table[runs_to_pages(runs)]

    def round_record(self, rnd: int, runs: U64) -> U64:
        hashes = self.stored_hashes(runs)
        table = np.ascontiguousarray(runs, dtype="<u8").tobytes()
        body = struct.pack("<I", len(runs)) + table + np.ascontiguousarray(hashes, dtype="<u8").tobytes()
        self.append(REC_ROUND, rnd, body)
        return hashes

    def end_round(self, rnd: int, runs: U64, npg: int) -> U64:
        return self.round_record(rnd, runs)

    def switch(self, baseline: U64, *, postcopy: bool, first: bool) -> None:
        assert not postcopy, "file:// refuses post-copy up front"
        self.do_pause()
        dirty, table, count = self.final_pass(baseline)
        if first:
            self.stats.zero_pages = self.region.npages - count
        sent, _ = self.send_bitmap(dirty, phase="stop-and-copy")
        runs = np.concatenate(sent) if sent else np.empty((0, 2), dtype=np.uint64)
        self.round_record(self.rounds_sent, runs)
        state = self.get_state()
        self.stats.state_bytes = len(state)
        self.append(REC_FINAL, self.rounds_sent, P.table_digest(table) + state)
        os.fsync(self.mfd)
        self.switched = True
        self.finish_ok()

    def run(self) -> MigrationStats:
        try:
            return super().run()
        finally:
            self.close_files()

    def fail(self, exc: BaseException) -> None:
        if self.mfd >= 0 and not self.switched:
            try:
                self.append(REC_CANCEL, 0, str(exc).encode("utf-8", "replace")[: P.MAX_CONTROL_BODY])
            except OSError:
                pass
        super().fail(exc)

    def close_files(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
        for fd in (self.fd, self.mfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.mfd = -1


class _ManifestReader:
    """Reads records from a manifest that may still be growing; waits up to ``timeout`` for each one."""

    def __init__(self, path: str, timeout: float | None) -> None:
        self.path = path
        self.timeout = timeout
        self.fd = -1
        self.buf = bytearray()
        self.offset = 0

    def _wait(self, what: str, since: float) -> None:
        if self.timeout is not None and time.monotonic() - since > self.timeout:
            if self.buf:
                raise ProtocolError(f"manifest {self.path} ends inside a record ({len(self.buf)} bytes) while {what}")
            raise MigrationTimeout(f"nothing new in {self.path} for {self.timeout:g} s while {what}")
        time.sleep(POLL_INTERVAL)

    def open(self) -> None:
        since = time.monotonic()
        while True:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
                return
            except FileNotFoundError:
                self._wait("waiting for a source to start", since)

    def _fill(self, n: int, what: str) -> None:
        since = time.monotonic()
        while len(self.buf) < n:
            chunk = os.pread(self.fd, max(n - len(self.buf), 1 << 16), self.offset)
            if chunk:
                self.buf += chunk
                self.offset += len(chunk)
                since = time.monotonic()
            else:
                self._wait(what, since)

    def next(self, what: str) -> tuple[int, int, bytes]:
        self._fill(_REC.size, what)
        magic, rtype, r1, r2, number, length = _REC.unpack_from(self.buf)
        if magic != _REC_MAGIC or r1 or r2 or not REC_HEADER <= rtype <= REC_CANCEL:
            raise ProtocolError(f"manifest {self.path} holds a damaged record header at offset {self.offset - len(self.buf)}")
        if length > MAX_RECORD:
            raise ProtocolError(f"manifest record of {length} bytes is larger than {MAX_RECORD}")
        total = _REC.size + length + _CHECK.size
        self._fill(total, what)
        head = bytes(self.buf[: _REC.size + length])
        (check,) = _CHECK.unpack_from(self.buf, _REC.size + length)
        if check != xxhash.xxh3_64_intdigest(head):
            raise ProtocolError(f"manifest record (type {rtype}, round {number}) fails its checksum: tampered or torn")
        del self.buf[:total]
        return rtype, number, head[_REC.size :]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _read_runs(fd: int, region: Region, runs: U64, nbytes_file: int) -> None:
    """``preadv`` the pages of ``runs`` from the data file straight into the region."""
    ps = region.page_size
    for first, count in runs.tolist():
        start = first * ps
        end = min(start + count * ps, region.nbytes)
        view = region.view[start:end]
        done = 0
        while done < view.nbytes:
            n = os.preadv(fd, [view[done:]], start + done)
            if n == 0:
                raise ProtocolError(
                    f"data file is truncated: page {first + done // ps} lies past its end ({nbytes_file} bytes)"
                )
            done += n


def receive_file(path: str, opts: DestinationOptions, timeout: float | None) -> Received:
    """Load a shared-storage migration into a fresh region; see the module docstring for the checks."""
    reader = _ManifestReader(manifest_path(path), timeout)
    reader.open()
    fd = -1
    region: Region | None = None
    stats = StatsRecorder(mode="", tracker="", migration_id="", page_size=0, total_bytes=0)
    try:
        rtype, _, body = reader.next("waiting for the manifest header")
        if rtype != REC_HEADER:
            raise ProtocolError("the manifest does not start with a header record")
        hello = P.decode_hello(body)
        refusal = Destination(_Nowhere(), opts).check(hello)
        if refusal is not None:
            raise CompatibilityError(f"refused the shared-storage migration ({refusal[0]}): {refusal[1]}", field=refusal[0])
        stats = StatsRecorder(
            mode=hello.mode, tracker=hello.tracker, migration_id=hello.migration_id.hex(),
            page_size=hello.page_size, total_bytes=hello.nbytes,
        )
        stats.status = "active"
        fd = os.open(path, os.O_RDONLY)
        region = _destination._allocate_region(hello.nbytes, hello.page_size)
        expected = zero_page_hashes(region)
        table = expected.copy()
        stats.setup_time = time.monotonic() - stats.started
        rounds = 0
        while True:
            rtype, number, body = reader.next("waiting for the next round")
            if rtype == REC_ROUND:
                if number != rounds:
                    raise ProtocolError(f"manifest round {number} where round {rounds} was due")
                runs, hashes = _decode_round(body, region.npages)
                if len(runs):
                    expected[runs_to_pages(runs)] = hashes
                    _read_runs(fd, region, runs, os.fstat(fd).st_size)  # start reading during pre-copy
                    _kernels.hash_runs(region.view, region.page_size, runs, table)
                    payload = P.runs_payload(runs, region.page_size, region.nbytes)
                    stats.add_pages(len(hashes), payload, payload)
                rounds += 1
                with stats.lock:
                    stats.rounds = rounds
                    stats.pages_per_round.append(len(hashes))
            elif rtype == REC_FINAL:
                if len(body) < P.DIGEST_SIZE:
                    raise ProtocolError("final manifest record shorter than its digest")
                digest, state = body[: P.DIGEST_SIZE], body[P.DIGEST_SIZE :]
                if len(state) > opts.max_state_bytes:
                    raise ProtocolError(f"state blob of {len(state)} bytes exceeds this side's limit")
                _finish(fd, region, table, expected, digest)
                stats.state_bytes = len(state)
                stats.verified = True
                stats.remaining_bytes = 0
                stats.finish("completed")
                log.info("destination: shared-storage migration %s loaded and verified", stats.migration_id)
                return Received(region, state, stats, hello.mode)
            elif rtype == REC_CANCEL:
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


def _decode_round(body: bytes, npages: int) -> tuple[U64, U64]:
    if len(body) < 4:
        raise ProtocolError("round record shorter than its run count")
    (nruns,) = struct.unpack_from("<I", body)
    if len(body) < 4 + nruns * P.RUN_SIZE:
        raise ProtocolError("round record shorter than its runs table")
    runs = P.decode_runs(body[4 : 4 + nruns * P.RUN_SIZE], nruns)
    pages = P.validate_runs(runs, npages) if nruns else 0
    rest = body[4 + nruns * P.RUN_SIZE :]
    if len(rest) != 8 * pages:
        raise ProtocolError(f"round record holds {len(rest)} bytes of hashes for {pages} pages")
    return runs, np.frombuffer(rest, dtype="<u8").astype(np.uint64)


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
        _read_runs(fd, region, runs, size)
        _kernels.hash_runs(region.view, region.page_size, runs, table)
    bad = np.flatnonzero(table != expected)
    if len(bad):
        raise VerificationError(
            f"{len(bad)} pages of the data file (first: page {int(bad[0])}) do not match the manifest: tampered file"
        )
