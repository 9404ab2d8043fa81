"""Compressed PAGES batches: exact results, raw fallback, bounded decompression, stats."""

from __future__ import annotations

import struct

import numpy as np
import pytest

import migcore
from migcore import _codecs
from migcore._errors import ProtocolError

from _modes import MIB, migrate_live

CODECS = ["zstd", "lz4"]


def text_region(nbytes: int) -> migcore.Region:
    words = b"the quick brown fox jumps over the lazy migcore page " * (nbytes // 50 + 1)
    return migcore.Region(bytearray(words[:nbytes]))


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("mode", ["precopy", "stopcopy", "hybrid"])
def test_compressed_migration_is_exact(codec: str, mode: str) -> None:
    stats, got = migrate_live(compress=codec, mode=mode, region=text_region(2 * MIB + 100))
    assert stats.compress == codec
    assert 0 < stats.compress_after < stats.compress_before / 4  # text shrinks a lot
    assert stats.transferred_bytes < stats.normal_bytes / 2
    assert got.stats.compress_after < got.stats.compress_before


@pytest.mark.parametrize("codec", CODECS)
def test_random_pages_never_inflate(codec: str) -> None:
    stats, _ = migrate_live(compress=codec, mode="stopcopy", nbytes=2 * MIB)
    # incompressible batches go raw: the codec output never exceeds its input
    assert stats.compress_after <= stats.compress_before
    assert stats.transferred_bytes <= stats.normal_bytes * 1.01 + 64 * 1024


@pytest.mark.parametrize("codec", CODECS)
def test_pack_unpack_round_trip_and_raw_fallback(codec: str) -> None:
    c = _codecs.get_codec(codec)
    data = b"abc" * 5000
    packed = _codecs.pack(c, data)
    assert packed is not None and len(packed) < len(data)
    assert _codecs.unpack(c, packed, len(data), exact=True) == data
    noise = np.random.default_rng(0).bytes(8192)
    assert _codecs.pack(c, noise) is None


@pytest.mark.parametrize("codec", CODECS)
def test_decompression_is_bounded_by_the_declared_size(codec: str) -> None:
    """A bomb: 64 MiB of zeros compressed, declared (or decoded) larger than the runs table allows."""
    c = _codecs.get_codec(codec)
    bomb = c.compress(bytes(64 * MIB))
    with pytest.raises(ProtocolError, match="declares|allows"):
        _codecs.unpack(c, struct.pack("<Q", 64 * MIB) + bomb, 4096, exact=False)
    with pytest.raises(ProtocolError):
        _codecs.unpack(c, struct.pack("<Q", 4096) + bomb, 4096, exact=True)
    with pytest.raises(ProtocolError):
        _codecs.unpack(c, b"\x01\x02", 4096, exact=False)


def test_unknown_codec_is_refused_up_front() -> None:
    with pytest.raises(ValueError, match="compress must be one of"):
        migcore.migrate(bytearray(4096), "tcp://127.0.0.1:9", compress="brotli")
    with pytest.raises(ValueError, match="file:// shared storage does not support compress"):
        migcore.migrate(bytearray(4096), "file:///tmp/never", compress="zstd")
