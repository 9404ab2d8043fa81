"""Batch compression for PAGES frames: zstd (``zstandard``) and lz4 block (``lz4``), bounded on the way in.

Each codec's package is an extra (``migcore[zstd]``, ``migcore[lz4]``),
imported when the codec is first asked for; a missing one is a
``ValueError`` that names the extra to install.

A compressed payload is ``u64 decoded size`` followed by the codec's bytes.
The destination refuses a declared size above the bound the runs table
implies before it decompresses anything, then decompresses into a buffer of
exactly that size: a frame that would inflate further is a
:class:`ProtocolError`, never an allocation the peer chose (no decompression
bombs). A batch that does not shrink is sent raw by the caller.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

from migcore._errors import ProtocolError
from migcore._extras import require
from migcore._names import CODECS

_SIZE = struct.Struct("<Q")
SIZE_PREFIX = _SIZE.size


class Codec(Protocol):
    name: str

    def compress(self, data: Any) -> bytes: ...

    def decompress(self, data: Any, size: int) -> bytes: ...


class Zstd:
    """zstd at a fast level; the frame must declare its content size, and it must be the announced one."""

    name = "zstd"

    def __init__(self, level: int = 1) -> None:
        self._z: Any = require("zstandard", "compress='zstd'")
        self._level = level

    def compress(self, data: Any) -> bytes:
        # a compressor per call: ZstdCompressor objects must not be shared between threads
        return bytes(self._z.ZstdCompressor(level=self._level, write_content_size=True).compress(data))

    def decompress(self, data: Any, size: int) -> bytes:
        try:
            declared = self._z.frame_content_size(data)
        except self._z.ZstdError as exc:
            raise ProtocolError(f"compressed batch is not a zstd frame: {exc}") from None
        if declared != size:
            raise ProtocolError(f"zstd frame declares {declared} bytes, the PAGES frame {size}")
        try:
            out = self._z.ZstdDecompressor().decompress(data, max_output_size=size)
        except self._z.ZstdError as exc:
            raise ProtocolError(f"corrupt zstd batch: {exc}") from None
        return bytes(out)


class Lz4:
    """lz4 block format without a stored size: the PAGES frame's declared size bounds the output buffer."""

    name = "lz4"

    def __init__(self) -> None:
        self._b: Any = require("lz4.block", "compress='lz4'")

    def compress(self, data: Any) -> bytes:
        return bytes(self._b.compress(data, store_size=False))

    def decompress(self, data: Any, size: int) -> bytes:
        if size == 0:
            return b""
        try:
            return bytes(self._b.decompress(data, uncompressed_size=size))
        except self._b.LZ4BlockError as exc:
            raise ProtocolError(f"corrupt lz4 batch: {exc}") from None


CODEC_NAMES = CODECS


def get_codec(name: str) -> Codec:
    """The codec called ``name``; a missing package is a ``MissingExtraError`` (a ``ValueError``) naming the extra."""
    if name not in CODEC_NAMES:
        raise ValueError(f"compress must be one of {CODEC_NAMES} or None, got {name!r}")
    return Zstd() if name == "zstd" else Lz4()


def available(name: str) -> bool:
    """Whether codec ``name`` exists and its package is installed."""
    try:
        get_codec(name)
    except ValueError:  # an unknown name, or a MissingExtraError
        return False
    return True


def pack(codec: Codec, data: Any) -> bytes | None:
    """``u64 size + compressed`` when that is smaller than ``data``; None when compression does not pay."""
    raw = memoryview(data).nbytes
    out = codec.compress(data)
    if SIZE_PREFIX + len(out) >= raw:
        return None
    return _SIZE.pack(raw) + out


def unpack(codec: Codec, payload: Any, bound: int, *, exact: bool) -> bytes:
    """Decompress a ``pack`` payload whose decoded size must be ``bound`` (``exact``) or at most ``bound``."""
    view = memoryview(payload)
    if view.nbytes < SIZE_PREFIX:
        raise ProtocolError("compressed batch shorter than its size prefix")
    (size,) = _SIZE.unpack_from(view)
    if size > bound or (exact and size != bound):
        raise ProtocolError(f"compressed batch declares {size} bytes, the runs table allows {bound}")
    out = codec.decompress(view[SIZE_PREFIX:], size)
    if len(out) != size:
        raise ProtocolError(f"compressed batch decoded to {len(out)} bytes, declared {size}")
    return out
