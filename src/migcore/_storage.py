"""Shared storage (``file:///PATH``): the image format, and the source's link that writes it.

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

Pre-copy rounds rewrite dirty pages in place. The destination's side
(``_file_receive``) reads each round as its record appears and trusts a page
only when its bytes hash to the latest manifest hash for it. A truncated data
file or a record that fails its checksum is a :class:`ProtocolError`; a page
that still disagrees is a :class:`VerificationError`.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
import struct
import time
from collections.abc import Callable

import numpy as np
import xxhash

from migcore import _kernels
from migcore import _protocol as P
from migcore._bandwidth import TokenBucket
from migcore._errors import MigrationError, MigrationTimeout, ProtocolError
from migcore._region import Region, U64
from migcore._source_link import SourceLink
from migcore._stats import StatsRecorder
from migcore._trackers import runs_to_pages

log = logging.getLogger("migcore")


_REC = struct.Struct("<4sBBHIQ")
_REC_MAGIC = b"MGRF"
_CHECK = struct.Struct("<Q")
REC_HEADER, REC_ROUND, REC_FINAL, REC_CANCEL = 1, 2, 3, 4
#: Longest record body a reader accepts (a round of a huge region has big tables).
MAX_RECORD = 1 << 34
#: Largest page payload the source writes with one batch of ``pwrite`` calls.
BATCH_BYTES = 8 << 20
#: Seconds between looks at a manifest that has not grown.
POLL_INTERVAL = 0.005


def manifest_path(path: str) -> str:
    return path + ".manifest"


def encode_record(rtype: int, number: int, body: bytes) -> bytes:
    head = _REC.pack(_REC_MAGIC, rtype, 0, 0, number, len(body)) + body
    return head + _CHECK.pack(xxhash.xxh3_64_intdigest(head))


def open_regular(path: str, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never blocks on a FIFO or a device and accepts only a regular file.

    Opened with ``O_NONBLOCK`` (a FIFO would otherwise block ``open`` past any
    timeout), then checked with ``fstat``; the flag is cleared again, it means
    nothing for a regular file.
    """
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, mode)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError(f"{path} is not a regular file (shared storage needs one)")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], offset + done)


class FileLink(SourceLink):
    """A source link whose pages go to ``path`` and whose acknowledgements come from the file itself."""

    def __init__(
        self, region: Region, path: str, stats: StatsRecorder, *, bandwidth_limit: float | None = None,
        progress: Callable[[], None] | None = None,
    ) -> None:
        self.region = region
        self.path = path
        self.stats = stats
        self.bucket = TokenBucket(bandwidth_limit) if bandwidth_limit else None
        self.progress = progress
        self.fd = -1
        self.mfd = -1
        self.mapping: mmap.mmap | None = None
        self.state = b""
        self.rounds = 0
        self.finished = False

    def append(self, rtype: int, number: int, body: bytes) -> None:
        os.fdatasync(self.fd)  # the data a record names is on the file system before the record
        record = encode_record(rtype, number, body)
        written = os.write(self.mfd, record)
        if written != len(record):
            raise MigrationError(f"short write of a manifest record ({written} of {len(record)} bytes)")
        self.stats.add_wire(len(record))

    def open(self, hello: P.Hello) -> P.Accept:
        if hello.features:
            raise MigrationError(f"file:// shared storage takes no protocol features (asked {hello.features:#x})")
        try:
            os.unlink(manifest_path(self.path))  # a reader must never pair old records with new pages
        except FileNotFoundError:
            pass
        self.fd = open_regular(self.path, os.O_RDWR | os.O_CREAT)
        os.ftruncate(self.fd, 0)  # truncated only once it is known to be a regular file
        os.ftruncate(self.fd, self.region.nbytes)  # holes read as zeros: zero pages are never written
        self.mapping = mmap.mmap(self.fd, self.region.nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        self.mfd = open_regular(manifest_path(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND)
        self.append(REC_HEADER, 0, P.encode_hello(hello)[P.HEADER_SIZE :])
        return P.Accept(max_state=P.UNKNOWN_SIZE, max_payload=BATCH_BYTES, max_runs=P.MAX_RUNS, features=0)

    def batch_cap(self, *, postcopy: bool = False) -> int:
        ps = self.region.page_size
        cap = BATCH_BYTES if self.bucket is None else min(BATCH_BYTES, self.bucket.max_batch(ps))
        return max(ps, cap)

    def send(self, runs: U64, phase: str) -> None:
        region = self.region
        ps = region.page_size
        payload = P.runs_payload(runs, ps, region.nbytes)
        if self.bucket is not None:
            waited = self.bucket.take(payload)
            if waited:
                self.stats.add(bandwidth_wait=waited)
        for first, count in runs.tolist():
            start = first * ps
            _pwrite_all(self.fd, region.view[start : min(start + count * ps, region.nbytes)], start)
        self.stats.add_pages(int(runs[:, 1].sum()), payload, payload, settle=True)
        if self.progress is not None:
            self.progress()

    def stored_hashes(self, runs: U64) -> U64:
        """What the file holds for the pages of ``runs`` (in run order): the shared-storage ACK."""
        assert self.mapping is not None
        table = np.empty(self.region.npages, dtype=np.uint64)
        if len(runs):
            _kernels.hash_runs(self.mapping, self.region.page_size, runs, table)
        return table[runs_to_pages(runs)]

    def end_round(self, rnd: int, runs: U64, npg: int) -> U64:
        hashes = self.stored_hashes(runs)
        table = np.ascontiguousarray(runs, dtype="<u8").tobytes()
        body = struct.pack("<I", len(runs)) + table + np.ascontiguousarray(hashes, dtype="<u8").tobytes()
        self.append(REC_ROUND, rnd, body)
        self.rounds = rnd + 1
        return hashes

    def end_pages(self, rnd: int, runs: U64) -> None:
        order = runs[np.argsort(runs[:, 0], kind="stable")] if len(runs) else runs
        self.end_round(rnd, order, int(order[:, 1].sum()) if len(order) else 0)

    def send_state(self, state: bytes) -> None:
        self.state = state  # it goes with the digest in the final record

    def commit(self, digest: bytes) -> None:
        self.append(REC_FINAL, self.rounds, digest + self.state)
        os.fsync(self.mfd)
        self.finished = True

    def confirm_commit(self) -> None:
        """Nothing to wait for: the final record is durable, any reader will find it."""

    def fail(self, exc: BaseException, *, switched: bool) -> None:
        if self.mfd >= 0 and not self.finished:
            try:
                self.append(REC_CANCEL, 0, str(exc).encode("utf-8", "replace")[: P.MAX_CONTROL_BODY])
            except OSError:
                pass
        self.close()

    def close(self) -> None:
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None
        for fd in (self.fd, self.mfd):
            if fd >= 0:
                os.close(fd)
        self.fd = self.mfd = -1


class ManifestReader:
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
                self.fd = open_regular(self.path, os.O_RDONLY)
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


def read_runs(fd: int, region: Region, runs: U64, nbytes_file: int) -> None:
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


def decode_round(body: bytes, npages: int) -> tuple[U64, U64]:
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


