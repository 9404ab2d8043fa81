"""How a batch of pages is encoded for the wire: raw from the region, XBZRLE deltas, compression.

The source's socket link asks :meth:`BatchEncoder.encode` for each pre-copy
batch when the migration agreed on a codec or on deltas; post-copy pages
always go raw (demand latency first, and the userfaultfd receiver writes them
straight in). The delta cache remembers what the destination acknowledged
holding (:meth:`BatchEncoder.stored`), never what was merely sent.
"""

from __future__ import annotations

from migcore import _codecs
from migcore import _protocol as P
from migcore._delta import DeltaCache
from migcore._region import Region, U64
from migcore._stats import StatsRecorder


class BatchEncoder:
    """Encodes batches of one region with an optional codec and an optional delta cache."""

    def __init__(
        self,
        region: Region,
        stats: StatsRecorder,
        *,
        codec: _codecs.Codec | None,
        delta_cache_bytes: int | None,
    ) -> None:
        self.region = region
        self.stats = stats
        self.codec = codec
        self.delta = (
            DeltaCache(region.npages, region.page_size, region.nbytes, delta_cache_bytes)
            if delta_cache_bytes is not None
            else None
        )

    @property
    def features(self) -> int:
        """The HELLO feature bits this encoding needs."""
        return (P.FEATURE_DELTA if self.delta is not None else 0) | (P.FEATURE_COMPRESS if self.codec is not None else 0)

    def stored(self, runs: U64, hashes: U64) -> None:
        """The destination acknowledged holding these pages with these hashes: the delta bases."""
        if self.delta is not None:
            self.delta.acknowledge(runs, hashes)

    def encode(self, runs: U64, payload: int, flags: int) -> tuple[memoryview, int]:
        """The batch delta-encoded and/or compressed, with its PAGES flags; raw when encoding does not pay."""
        region = self.region
        body: memoryview
        if self.delta is not None:
            npg = int(runs[:, 1].sum())
            out = bytearray(4 * npg + payload)
            size, hits = self.delta.encode(region.view, runs, out)
            if hits:
                body = memoryview(out)[:size]
                flags |= P.FLAG_DELTA
            else:  # no page had a base: the table would be pure overhead, the pages follow it raw
                body = memoryview(out)[4 * npg : size]
            self.stats.update(
                delta_hits=self.delta.hits, delta_misses=self.delta.misses, delta_overflow=self.delta.overflow
            )
            self.stats.add(delta_bytes_saved=payload - body.nbytes)
        else:
            ps = region.page_size
            body = memoryview(
                b"".join(region.view[a * ps : min((a + n) * ps, region.nbytes)] for a, n in runs.tolist())
            )
        if self.codec is not None:
            before = body.nbytes
            packed = _codecs.pack(self.codec, body)
            if packed is not None:
                body = memoryview(packed)
                flags |= P.FLAG_COMPRESSED
            self.stats.add(compress_before=before, compress_after=body.nbytes)
        return body, flags
