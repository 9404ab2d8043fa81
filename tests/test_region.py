"""Region: which buffers it accepts, what it exposes, and the write marks it keeps."""

from __future__ import annotations

import mmap
from multiprocessing import shared_memory

import numpy as np
import pytest

from migcore import Region
from migcore._region import new_bitmap


def marked(region: Region) -> list[int]:
    out = new_bitmap(region.npages)
    region.take_written(out)
    bits = np.unpackbits(out.view(np.uint8), bitorder="little")[: region.npages]
    return np.flatnonzero(bits).tolist()


@pytest.mark.parametrize("nbytes, page_size, npages", [(4096, 4096, 1), (4097, 4096, 2), (1, 512, 1), (10000, 1024, 10)])
def test_geometry_counts_partial_last_page(nbytes: int, page_size: int, npages: int) -> None:
    region = Region(bytearray(nbytes), page_size=page_size)
    assert (region.nbytes, region.page_size, region.npages) == (nbytes, page_size, npages)
    assert len(region.view) == nbytes and not region.view.readonly


def test_wraps_without_copying() -> None:
    buf = bytearray(8192)
    region = Region(buf)
    region.view[5] = 7
    assert buf[5] == 7
    arr = np.zeros((4, 512), dtype=np.float64)
    region = Region(arr)
    assert region.nbytes == arr.nbytes
    region.array()[:8] = np.frombuffer(np.float64(1.5).tobytes(), np.uint8)
    assert arr[0, 0] == 1.5


def test_accepts_mmap_and_shared_memory() -> None:
    mm = mmap.mmap(-1, 3 * 4096)
    assert Region(mm).npages == 3
    shm = shared_memory.SharedMemory(create=True, size=4096 * 2)
    try:
        region = Region(shm.buf)
        region.write(4096, b"xyz")
        assert bytes(shm.buf[4096:4099]) == b"xyz"
        del region
    finally:
        shm.close()
        shm.unlink()


@pytest.mark.parametrize(
    "buffer, error",
    [
        (b"read only", TypeError),
        (memoryview(bytearray(8192)).toreadonly(), TypeError),
        (np.zeros((64, 64), dtype=np.uint8)[:, ::2], ValueError),
        (bytearray(), ValueError),
        ("text", TypeError),
        (12, TypeError),
    ],
)
def test_rejects_unusable_buffers(buffer: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        Region(buffer)


@pytest.mark.parametrize("page_size", [0, 256, 1000, 4095, 3 << 12, 1 << 31, -4096])
def test_rejects_bad_page_sizes(page_size: int) -> None:
    with pytest.raises(ValueError, match="power of two"):
        Region(bytearray(8192), page_size=page_size)


def test_rejects_non_int_page_size() -> None:
    with pytest.raises(TypeError):
        Region(bytearray(8192), page_size=4096.0)  # type: ignore[arg-type]


def test_allocate_is_zeroed_page_aligned_private_memory() -> None:
    region = Region.allocate(3 * 4096 + 100, page_size=4096)
    assert region.nbytes == 3 * 4096 + 100 and region.npages == 4
    assert not region.array().any()
    address = np.frombuffer(region.view, np.uint8).ctypes.data
    assert address % mmap.PAGESIZE == 0
    region.view[-1] = 1
    with pytest.raises(ValueError):
        Region.allocate(0)
    with pytest.raises(TypeError):
        Region.allocate(1.5)  # type: ignore[arg-type]


def test_mark_dirty_covers_every_touched_page() -> None:
    region = Region(bytearray(10 * 1024), page_size=1024)
    region.mark_dirty(1023, 2)  # straddles pages 0 and 1
    region.mark_dirty(5 * 1024, 1024)  # exactly page 5
    region.mark_dirty(9 * 1024 + 10, 0)  # empty: nothing
    assert marked(region) == [0, 1, 5]
    assert marked(region) == []  # taking clears
    with pytest.raises(ValueError):
        region.mark_dirty(10 * 1024 - 1, 2)
    with pytest.raises(ValueError):
        region.mark_dirty(-1, 1)


def test_write_copies_and_marks() -> None:
    region = Region(bytearray(4 * 512 + 7), page_size=512)
    region.write(4 * 512, b"tail!!!")
    region.write(0, np.arange(3, dtype=np.uint8))
    assert bytes(region.view[-7:]) == b"tail!!!" and bytes(region.view[:3]) == b"\x00\x01\x02"
    assert marked(region) == [0, 4]
    with pytest.raises(ValueError):
        region.write(4 * 512, b"12345678")


def test_mark_pages_vectorized_matches_mark_dirty() -> None:
    rng = np.random.default_rng(3)
    a = Region(bytearray(300 * 512), page_size=512)
    b = Region(bytearray(300 * 512), page_size=512)
    pages = rng.integers(0, 300, size=80)
    a.mark_pages(pages)
    for p in pages.tolist():
        b.mark_dirty(p * 512, 1)
    assert marked(a) == marked(b) == sorted(set(pages.tolist()))
    with pytest.raises(ValueError):
        a.mark_pages([300])
