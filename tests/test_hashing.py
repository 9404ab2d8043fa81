"""Page hashing and zero-page kernels vs xxhash per page, NumPy bit oracles and the reference."""

from __future__ import annotations

import mmap
import sys
import threading
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from migcore import _reference

U64 = NDArray[np.uint64]
SENTINEL = np.uint64(0xDEAD_BEEF_DEAD_BEEF)
# The impl fixture returns a module, so sharing it across examples is safe.
HYPOTHESIS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)



def random_bytes(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(n)


def npages(nbytes: int, page_size: int) -> int:
    return -(-nbytes // page_size)


def page_hashes(data: bytes, page_size: int) -> list[int]:
    """Independent oracle: one xxhash call per page, the last one over its real bytes."""
    return [
        xxhash.xxh3_64_intdigest(data[i : i + page_size]) for i in range(0, len(data), page_size)
    ]


def bits(bitmap: U64, n: int) -> list[bool]:
    return [bool(b) for b in np.unpackbits(bitmap.view(np.uint8), bitorder="little")[:n]]


def random_bitmap(nbits: int, seed: int) -> U64:
    return np.random.default_rng(seed).integers(0, 2**64, -(-nbits // 64), dtype=np.uint64)


# --- known answers: these literals freeze the digest (computed once with xxhash 3.x) ---

KNOWN = [
    (b"a", 0xE6C632B61E964E1F),
    (bytes(range(241)), 0x02E8CD95421C6D02),  # first length on XXH3's long (SIMD) path
    (bytes((i * 13) % 251 for i in range(1000)), 0x0C2FD00DC5F0D88B),
    (bytes(range(256)) * 16, 0xEB4B7C3707879151),
    (bytes((i * 7 + 3) % 256 for i in range(65536)), 0x5D03B43B14C75500),
]


def test_known_answers_of_the_oracle() -> None:
    assert xxhash.xxh3_64_intdigest(b"") == 0x2D06800538D394C2
    for data, digest in KNOWN:
        assert xxhash.xxh3_64_intdigest(data) == digest


@pytest.mark.parametrize(("data", "digest"), KNOWN, ids=[str(len(d)) for d, _ in KNOWN])
def test_known_answers(impl: ModuleType, data: bytes, digest: int) -> None:
    out = np.zeros(1, np.uint64)
    impl.hash_pages(data, len(data), out)
    assert int(out[0]) == digest


def test_known_answers_per_page(impl: ModuleType) -> None:
    data = bytes(4096) + b"\x01" * 4096 + b"\x02" * 4096
    out = np.zeros(3, np.uint64)
    impl.hash_pages(data, 4096, out)
    assert out.tolist() == [0x93D76FE148C689BA, 0x40D4D8A9314DFCD8, 0xAF32F4E35087F18E]


# --- hash_pages / hash_runs ---


@pytest.mark.parametrize(
    ("page_size", "nbytes"),
    [
        (512, 0),
        (512, 512),
        (512, 512 * 9 + 17),
        (4096, 4096 * 70),
        (4096, 4096 * 3 - 1),
        (65536, 65536 * 2 + 1),
        (1, 100),
        (7, 7 * 13 + 3),
        (1000, 10_000),
        (4097, 4097 * 5 - 4000),
        (241, 241 * 4),
        (100_000, 99_999),
    ],
)
def test_hash_pages_matches_xxhash_per_page(impl: ModuleType, page_size: int, nbytes: int) -> None:
    data = random_bytes(nbytes, nbytes)
    n = npages(nbytes, page_size)
    out = np.full(n + 2, SENTINEL, np.uint64)
    impl.hash_pages(data, page_size, out)
    assert out[:n].tolist() == page_hashes(data, page_size)
    assert (out[n:] == SENTINEL).all()


def test_hash_pages_range_writes_only_the_range(impl: ModuleType) -> None:
    data = random_bytes(4096 * 200 + 5, 1)
    expected = page_hashes(data, 4096)
    for start, stop in [(0, 0), (0, 1), (63, 65), (5, 201), (200, 201), (201, 201), (130, -1)]:
        out = np.full(201, SENTINEL, np.uint64)
        impl.hash_pages(data, 4096, out, start, stop)
        end = 201 if stop == -1 else stop
        assert out[start:end].tolist() == expected[start:end]
        assert (out[:start] == SENTINEL).all() and (out[end:] == SENTINEL).all()


def test_hash_runs(impl: ModuleType) -> None:
    data = random_bytes(512 * 300 + 100, 2)
    expected = page_hashes(data, 512)
    runs = np.array([[0, 1], [3, 0], [63, 3], [100, 50], [300, 1], [301, 0]], np.uint64)
    out = np.full(301, SENTINEL, np.uint64)
    impl.hash_runs(data, 512, runs, out)
    covered = {p for first, count in runs.tolist() for p in range(first, first + count)}
    for p in range(301):
        assert int(out[p]) == (expected[p] if p in covered else int(SENTINEL))


def test_hash_runs_empty(impl: ModuleType) -> None:
    out = np.zeros(0, np.uint64)
    impl.hash_runs(b"", 4096, np.zeros((0, 2), np.uint64), out)
    impl.hash_runs(b"xy", 4096, np.zeros((0, 2), np.uint64), np.zeros(1, np.uint64))


@pytest.mark.parametrize(
    "run",
    [(0, 5), (3, 2), (5, 0), (2**64 - 1, 2), (1, 2**64 - 1), (2**63, 2**63)],
)
def test_hash_runs_rejects_runs_outside(impl: ModuleType, run: tuple[int, int]) -> None:
    out = np.full(4, SENTINEL, np.uint64)
    runs = np.array([[0, 1], run], np.uint64)
    with pytest.raises(ValueError):
        impl.hash_runs(bytes(4 * 64), 64, runs, out)
    assert (out == SENTINEL).all(), "nothing is hashed before every run is checked"


def test_hash_runs_rejects_bad_runs_arrays(impl: ModuleType) -> None:
    out = np.zeros(4, np.uint64)
    with pytest.raises(TypeError):
        impl.hash_runs(bytes(256), 64, np.zeros((1, 2), np.int64), out)
    with pytest.raises(ValueError):
        impl.hash_runs(bytes(256), 64, np.zeros((1, 3), np.uint64), out)
    with pytest.raises(ValueError):
        impl.hash_runs(bytes(256), 64, np.zeros(2, np.uint64), out)
    with pytest.raises(ValueError):
        impl.hash_runs(bytes(256), 64, np.zeros((2, 4), np.uint64)[:, ::2], out)
    with pytest.raises(ValueError):
        impl.hash_runs(bytes(256), 64, np.zeros((1, 2), np.uint64), np.zeros(3, np.uint64))


# --- buffers of every kind ---


def buffer_kinds(data: bytes) -> list[tuple[str, Any]]:
    arr = np.frombuffer(data, np.uint8)
    ro = arr.copy()
    ro.flags.writeable = False
    padded = np.frombuffer(b"\xff" * 8 + data + b"\xff" * 8, np.uint8)
    return [
        ("bytes", data),
        ("bytearray", bytearray(data)),
        ("memoryview", memoryview(data)),
        ("memoryview-slice", memoryview(b"\xff" * 3 + data + b"\xff")[3:-1]),
        ("numpy-slice", padded[8:-8]),
        ("numpy-readonly", ro),
        ("numpy-uint32", arr.view(np.uint32)),
        ("numpy-float64-2d", arr.view(np.float64).reshape(-1, 2)),
        ("memoryview-uint16", memoryview(data).cast("H")),
    ]


@pytest.mark.parametrize("kind", [k for k, _ in buffer_kinds(b"")])
def test_any_contiguous_buffer(impl: ModuleType, kind: str) -> None:
    data = random_bytes(4096 * 4, 3)
    buf = dict(buffer_kinds(data))[kind]
    out = np.zeros(16, np.uint64)
    impl.hash_pages(buf, 1024, out)
    assert out.tolist() == page_hashes(data, 1024)
    dirty = np.zeros(1, np.uint64)
    assert impl.hash_delta(buf, 1024, np.zeros(16, np.uint64), dirty) == 16
    assert impl.zero_pages(buf, 1024, dirty) == 0


def test_mmap_buffer(impl: ModuleType) -> None:
    data = random_bytes(3 * 4096, 4)
    with mmap.mmap(-1, len(data)) as region:
        region[:] = data
        out = np.zeros(3, np.uint64)
        impl.hash_pages(region, 4096, out)
        assert out.tolist() == page_hashes(data, 4096)
        region[4096:8192] = bytes(4096)
        zero = np.zeros(1, np.uint64)
        assert impl.zero_pages(region, 4096, zero) == 1
        assert int(zero[0]) == 0b010


@pytest.mark.parametrize(
    "buf",
    [
        np.zeros(1024, np.uint8)[::2],
        memoryview(bytes(1024))[::2],
        np.zeros((8, 128), np.uint8).T,
    ],
    ids=["numpy-strided", "memoryview-strided", "numpy-fortran"],
)
def test_non_contiguous_buffers_rejected(impl: ModuleType, buf: Any) -> None:
    with pytest.raises(ValueError):
        impl.hash_pages(buf, 64, np.zeros(16, np.uint64))
    with pytest.raises(ValueError):
        impl.hash_delta(buf, 64, np.zeros(16, np.uint64), np.zeros(1, np.uint64))
    with pytest.raises(ValueError):
        impl.zero_pages(buf, 64, np.zeros(1, np.uint64))
    with pytest.raises(ValueError):
        impl.hash_runs(buf, 64, np.zeros((0, 2), np.uint64), np.zeros(16, np.uint64))


@pytest.mark.parametrize("buf", ["text", 12345, [1, 2, 3], None])
def test_non_buffers_rejected(impl: ModuleType, buf: Any) -> None:
    with pytest.raises(TypeError):
        impl.hash_pages(buf, 64, np.zeros(16, np.uint64))
    with pytest.raises(TypeError):
        impl.zero_pages(buf, 64, np.zeros(1, np.uint64))


# --- argument checks shared by the buffer kernels ---


def call_with_out(impl: ModuleType, name: str, out: Any, **kw: Any) -> Any:
    buf = bytes(64 * 10)
    if name == "hash_pages":
        return impl.hash_pages(buf, 64, out, **kw)
    if name == "hash_delta_dirty":
        return impl.hash_delta(buf, 64, np.zeros(10, np.uint64), out, **kw)
    if name == "hash_delta_baseline":
        return impl.hash_delta(buf, 64, out, np.zeros(1, np.uint64), update=True, **kw)
    if name == "zero_pages":
        return impl.zero_pages(buf, 64, out, **kw)
    raise AssertionError(name)


OUT_KERNELS = ["hash_pages", "hash_delta_dirty", "hash_delta_baseline", "zero_pages"]


def sized(name: str) -> int:
    return 1 if name in ("hash_delta_dirty", "zero_pages") else 10


@pytest.mark.parametrize("name", OUT_KERNELS)
def test_wrong_dtype_rejected(impl: ModuleType, name: str) -> None:
    n = sized(name)
    for bad in (
        np.zeros(n, np.int64),
        np.zeros(n, np.float64),
        np.zeros(n, ">u8"),
        [0] * n,
        bytearray(8 * n),
    ):
        with pytest.raises(TypeError):
            call_with_out(impl, name, bad)


@pytest.mark.parametrize("name", OUT_KERNELS)
def test_bad_outputs_rejected(impl: ModuleType, name: str) -> None:
    n = sized(name)
    readonly = np.zeros(n, np.uint64)
    readonly.flags.writeable = False
    bad_outputs = [
        readonly,
        np.zeros(2 * n + 2, np.uint64)[::2],
        np.zeros((n, 1), np.uint64),
        np.zeros(n - 1, np.uint64),
    ]
    for bad in bad_outputs:
        with pytest.raises(ValueError):
            call_with_out(impl, name, bad)


@pytest.mark.parametrize("name", OUT_KERNELS)
@pytest.mark.parametrize(("start", "stop"), [(-1, 5), (0, 11), (6, 5), (11, -1), (0, -2), (3, 2)])
def test_ranges_outside_rejected(impl: ModuleType, name: str, start: int, stop: int) -> None:
    out = np.zeros(sized(name), np.uint64)
    with pytest.raises(ValueError):
        call_with_out(impl, name, out, start=start, stop=stop)


@pytest.mark.parametrize("page_size", [0, -1, -4096])
def test_page_size_must_be_positive(impl: ModuleType, page_size: int) -> None:
    table = np.zeros(4, np.uint64)
    bitmap = np.zeros(1, np.uint64)
    with pytest.raises(ValueError):
        impl.hash_pages(b"abc", page_size, table)
    with pytest.raises(ValueError):
        impl.hash_runs(b"abc", page_size, np.zeros((0, 2), np.uint64), table)
    with pytest.raises(ValueError):
        impl.hash_delta(b"abc", page_size, table, bitmap)
    with pytest.raises(ValueError):
        impl.zero_pages(b"abc", page_size, bitmap)


def test_empty_buffer_is_zero_pages(impl: ModuleType) -> None:
    empty = np.zeros(0, np.uint64)
    impl.hash_pages(b"", 4096, empty)
    impl.hash_pages(b"", 4096, empty, 0, 0)
    assert impl.hash_delta(b"", 4096, empty, empty) == 0
    assert impl.zero_pages(bytearray(), 4096, empty) == 0
    assert impl.compare_hashes(empty, empty, empty) == 0


# --- hash_delta ---


def delta_oracle(
    data: bytes, page_size: int, baseline: U64, dirty: U64, start: int, stop: int
) -> tuple[list[bool], int]:
    """Expected dirty bits (all of them) and count, built with xxhash and plain lists."""
    hashes = page_hashes(data, page_size)
    n = len(hashes)
    stop = n if stop == -1 else stop
    expected = bits(dirty, len(dirty) * 64)
    count = 0
    for i in range(start, stop):
        expected[i] = hashes[i] != int(baseline[i])
        count += expected[i]
    return expected, count


@pytest.mark.parametrize(
    ("start", "stop"),
    [
        (0, -1), (0, 0), (0, 1), (63, 64), (63, 65), (64, 65), (65, 130), (1, 191), (128, 192),
        (3, 3),
    ],
)
def test_hash_delta_marks_changed_pages_only_in_range(
    impl: ModuleType, start: int, stop: int
) -> None:
    page_size = 256
    n = 192
    data = random_bytes(page_size * n - 100, 5)  # the last page is partial
    truth = np.array(page_hashes(data, page_size), np.uint64)
    rng = np.random.default_rng(6)
    baseline = np.where(rng.random(n) < 0.5, truth, truth ^ np.uint64(1))
    baseline[[0, 63, 64, 65, 191]] ^= np.uint64(1)  # word edges are dirty
    dirty = random_bitmap(n + 64, 7)  # room past the pages; foreign bits must survive
    expected, count = delta_oracle(data, page_size, baseline, dirty, start, stop)
    before = baseline.copy()
    assert impl.hash_delta(data, page_size, baseline, dirty, start, stop) == count
    assert bits(dirty, len(dirty) * 64) == expected
    assert (baseline == before).all(), "without update the baseline is left alone"


def test_hash_delta_update(impl: ModuleType) -> None:
    data = bytearray(random_bytes(64 * 200, 8))
    baseline = np.zeros(200, np.uint64)
    dirty = np.zeros(4, np.uint64)
    assert impl.hash_delta(data, 64, baseline, dirty, update=True) == 200
    assert baseline.tolist() == page_hashes(bytes(data), 64)
    assert impl.hash_delta(data, 64, baseline, dirty, update=True) == 0
    assert not dirty.any()
    for page in (0, 63, 64, 199):
        data[page * 64 + 10] ^= 0xFF
    assert impl.hash_delta(data, 64, baseline, dirty, 64, 200, update=True) == 2
    assert bits(dirty, 200) == [i in (64, 199) for i in range(200)]
    assert impl.hash_delta(data, 64, baseline, dirty, update=True) == 2
    assert bits(dirty, 200) == [i in (0, 63) for i in range(200)]
    assert baseline.tolist() == page_hashes(bytes(data), 64)


def test_hash_delta_readonly_baseline(impl: ModuleType) -> None:
    data = random_bytes(64 * 10, 9)
    baseline = np.array(page_hashes(data, 64), np.uint64)
    baseline.flags.writeable = False
    dirty = np.zeros(1, np.uint64)
    assert impl.hash_delta(data, 64, baseline, dirty) == 0
    with pytest.raises(ValueError):
        impl.hash_delta(data, 64, baseline, dirty, update=True)


def test_hash_delta_dirty_too_short(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.hash_delta(bytes(65 * 8), 8, np.zeros(65, np.uint64), np.zeros(1, np.uint64))
    with pytest.raises(ValueError):
        impl.hash_delta(bytes(65 * 8), 8, np.zeros(64, np.uint64), np.zeros(2, np.uint64))


def test_hash_delta_threads_on_aligned_halves_match_one_call(impl: ModuleType) -> None:
    page_size = 4096 if impl is not _reference else 64
    n = 64 * 64
    data = random_bytes(page_size * n, 10)
    truth = np.array(page_hashes(data, page_size), np.uint64)
    rng = np.random.default_rng(11)
    baseline = np.where(rng.random(n) < 0.3, truth, ~truth)
    single = np.zeros(n // 64, np.uint64)
    count = impl.hash_delta(data, page_size, baseline, single)
    for _ in range(3):
        split = np.full(n // 64, np.uint64(0xAAAA_AAAA_AAAA_AAAA))
        counts = [0, 0]

        def work(k: int, start: int, stop: int) -> None:
            counts[k] = impl.hash_delta(data, page_size, baseline, split, start, stop)

        threads = [
            threading.Thread(target=work, args=(0, 0, n // 2)),
            threading.Thread(target=work, args=(1, n // 2, n)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(counts) == count
        assert (split == single).all()


# --- compare_hashes ---


@pytest.mark.parametrize("n", [0, 1, 63, 64, 65, 128, 1000])
def test_compare_hashes(impl: ModuleType, n: int) -> None:
    rng = np.random.default_rng(n)
    current = rng.integers(0, 2**64, n, dtype=np.uint64)
    baseline = np.concatenate([current, rng.integers(0, 2**64, 5, dtype=np.uint64)])
    flip = rng.random(n) < 0.4
    if n:
        flip[[0, -1]] = True
    baseline[:n][flip] ^= np.uint64(1 << 63)
    dirty = random_bitmap(n + 130, n + 1)
    expected = bits(dirty, len(dirty) * 64)
    expected[:n] = flip.tolist()
    assert impl.compare_hashes(current, baseline, dirty) == int(flip.sum())
    assert bits(dirty, len(dirty) * 64) == expected


def test_compare_hashes_checks(impl: ModuleType) -> None:
    a = np.zeros(70, np.uint64)
    with pytest.raises(ValueError):
        impl.compare_hashes(a, np.zeros(69, np.uint64), np.zeros(2, np.uint64))
    with pytest.raises(ValueError):
        impl.compare_hashes(a, a, np.zeros(1, np.uint64))
    with pytest.raises(ValueError):
        impl.compare_hashes(np.zeros((2, 2), np.uint64), a, np.zeros(2, np.uint64))
    with pytest.raises(ValueError):
        impl.compare_hashes(np.zeros((), np.uint64), a, np.zeros(2, np.uint64))
    with pytest.raises(TypeError):
        impl.compare_hashes(a.astype(np.int64), a, np.zeros(2, np.uint64))
    readonly = a.copy()
    readonly.flags.writeable = False
    assert impl.compare_hashes(readonly, readonly, np.zeros(2, np.uint64)) == 0


# --- zero_pages ---


@pytest.mark.parametrize("page_size", [512, 4096, 65536, 1, 7, 300, 1000])
def test_zero_pages(impl: ModuleType, page_size: int) -> None:
    n = 70
    nbytes = page_size * n - (page_size // 2)  # partial last page
    data = np.zeros(nbytes, np.uint8)
    rng = np.random.default_rng(page_size)
    nonzero = set(rng.choice(n, 30, replace=False).tolist()) | {64, n - 1}
    for p in nonzero:
        first, last = p * page_size, min((p + 1) * page_size, nbytes) - 1
        spot = rng.choice([first, last, (first + last) // 2])
        data[spot] = rng.integers(1, 256)
    out = random_bitmap(n + 64, page_size)
    expected = bits(out, len(out) * 64)
    expected[:n] = [p not in nonzero for p in range(n)]
    assert impl.zero_pages(data, page_size, out) == n - len(nonzero)
    assert bits(out, len(out) * 64) == expected


def test_zero_pages_every_byte_position(impl: ModuleType) -> None:
    page_size = 600  # not a multiple of the kernel's block or word sizes
    for pos in [0, 1, 7, 8, 255, 256, 257, 511, 512, 590, 599]:
        data = bytearray(page_size * 2)
        data[page_size + pos] = 0x80
        out = np.zeros(1, np.uint64)
        assert impl.zero_pages(data, page_size, out) == 1
        assert int(out[0]) == 0b01


def test_zero_pages_range(impl: ModuleType) -> None:
    data = bytes(64 * 130)
    for start, stop in [(0, 0), (0, 130), (1, 64), (63, 65), (64, 128), (129, 130)]:
        out = np.full(3, np.uint64(0x5555_5555_5555_5555))
        expected = bits(out, 192)
        expected[start:stop] = [True] * (stop - start)
        assert impl.zero_pages(data, 64, out, start, stop) == stop - start
        assert bits(out, 192) == expected


def test_zero_pages_all_and_none(impl: ModuleType) -> None:
    out = np.zeros(2, np.uint64)
    assert impl.zero_pages(bytes(4096 * 128), 4096, out) == 128
    assert (out == np.uint64(2**64 - 1)).all()
    assert impl.zero_pages(b"\x01" * (4096 * 128), 4096, out) == 0
    assert not out.any()


# --- properties, compiled and reference alike, on random inputs ---


@st.composite
def regions(draw: st.DrawFn) -> tuple[bytes, int, int, int]:
    page_size = draw(st.sampled_from([1, 3, 64, 100, 255, 256, 300]))
    n = draw(st.integers(0, 140))
    nbytes = max(0, n * page_size - draw(st.integers(0, page_size - 1)))
    pages = npages(nbytes, page_size)
    zero_pages = draw(st.sets(st.integers(0, max(pages - 1, 0))))
    raw = bytearray(random_bytes(nbytes, draw(st.integers(0, 2**32 - 1))))
    for p in zero_pages:
        page = slice(p * page_size, (p + 1) * page_size)
        raw[page] = bytes(len(raw[page]))
    start = draw(st.integers(0, pages))
    stop = draw(st.one_of(st.just(-1), st.integers(start, pages)))
    return bytes(raw), page_size, start, stop


@HYPOTHESIS
@given(region=regions(), seed=st.integers(0, 2**32 - 1))
def test_buffer_kernels_agree_with_oracles_and_reference(
    impl: ModuleType, region: tuple[bytes, int, int, int], seed: int
) -> None:
    data, page_size, start, stop = region
    n = npages(len(data), page_size)
    end = n if stop == -1 else stop
    hashes = page_hashes(data, page_size)
    rng = np.random.default_rng(seed)
    words = -(-n // 64) + 1

    out = np.full(n, SENTINEL, np.uint64)
    impl.hash_pages(data, page_size, out, start, stop)
    assert out[start:end].tolist() == hashes[start:end]

    baseline = np.array(hashes, np.uint64)
    baseline[rng.random(n) < 0.5] ^= np.uint64(1)
    dirty = rng.integers(0, 2**64, words, dtype=np.uint64)
    calls: list[Callable[[ModuleType, U64, U64], int]] = [
        lambda m, b, d: m.hash_delta(data, page_size, b, d, start, stop, update=True),
        lambda m, b, d: m.zero_pages(data, page_size, d, start, stop),
        lambda m, b, d: m.compare_hashes(b[start:end], b[start:end][::-1].copy(), d),
    ]
    for call in calls:
        mine_b, mine_d = baseline.copy(), dirty.copy()
        ref_b, ref_d = baseline.copy(), dirty.copy()
        assert call(impl, mine_b, mine_d) == call(_reference, ref_b, ref_d)
        assert (mine_b == ref_b).all() and (mine_d == ref_d).all()

    expected_zero = bits(dirty, words * 64)
    expected_zero[start:end] = [
        not any(data[i * page_size : (i + 1) * page_size]) for i in range(start, end)
    ]
    zeros = dirty.copy()
    impl.zero_pages(data, page_size, zeros, start, stop)
    assert bits(zeros, words * 64) == expected_zero


# --- resident: pages known to be zero are not read ---


@HYPOTHESIS
@given(region=regions(), seed=st.integers(0, 2**32 - 1))
def test_resident_mask_agrees_with_oracle_and_reference(
    impl: ModuleType, region: tuple[bytes, int, int, int], seed: int
) -> None:
    """A page outside ``resident`` counts as a zero page of its length, whatever its bytes."""
    data, page_size, start, stop = region
    n = npages(len(data), page_size)
    end = n if stop == -1 else stop
    rng = np.random.default_rng(seed)
    words = -(-n // 64) + 1
    density = rng.choice([0.0, 0.1, 0.5, 1.0])
    resident = np.zeros(words, np.uint64)
    flags = rng.random(n) < density
    if n:
        flags[[0, n - 1]] = rng.random(2) < 0.5  # the first and the (partial) last page both ways
    resident[: -(-n // 64) or 0] = np.packbits(
        np.concatenate([flags, np.zeros(-n % 64, bool)]), bitorder="little"
    ).view(np.uint64)
    # what the mask promises: an absent page reads as zeros of its real length
    seen = bytearray(data)
    for i in range(n):
        if not flags[i]:
            seen[i * page_size : (i + 1) * page_size] = bytes(len(seen[i * page_size : (i + 1) * page_size]))
    truth = page_hashes(bytes(seen), page_size)

    baseline = np.array(truth, np.uint64)
    baseline[rng.random(n) < 0.5] ^= np.uint64(1)
    dirty = rng.integers(0, 2**64, words, dtype=np.uint64)
    expected_dirty = bits(dirty, words * 64)
    expected_dirty[start:end] = [truth[i] != int(baseline[i]) for i in range(start, end)]
    mine_b, mine_d = baseline.copy(), dirty.copy()
    count = impl.hash_delta(data, page_size, mine_b, mine_d, start, stop, update=True, resident=resident)
    assert count == sum(expected_dirty[start:end])
    assert bits(mine_d, words * 64) == expected_dirty
    assert mine_b[start:end].tolist() == truth[start:end]
    ref_b, ref_d = baseline.copy(), dirty.copy()
    assert _reference.hash_delta(data, page_size, ref_b, ref_d, start, stop, update=True, resident=resident) == count
    assert (ref_b == mine_b).all() and (ref_d == mine_d).all()

    zeros = dirty.copy()
    expected_zero = bits(dirty, words * 64)
    expected_zero[start:end] = [not any(seen[i * page_size : (i + 1) * page_size]) for i in range(start, end)]
    assert impl.zero_pages(data, page_size, zeros, start, stop, resident=resident) == sum(expected_zero[start:end])
    assert bits(zeros, words * 64) == expected_zero
    ref_z = dirty.copy()
    _reference.zero_pages(data, page_size, ref_z, start, stop, resident=resident)
    assert (ref_z == zeros).all()


def test_resident_all_set_is_the_same_as_none(impl: ModuleType) -> None:
    data = bytearray(random_bytes(4096 * 130 - 5, 11))
    data[4096 * 7 : 4096 * 9] = bytes(8192)
    every = np.full(3, np.uint64(2**64 - 1))
    for resident in (None, every):
        b = np.zeros(130, np.uint64)
        d = np.zeros(3, np.uint64)
        assert impl.hash_delta(data, 4096, b, d, update=True, resident=resident) == 130
        assert b.tolist() == page_hashes(bytes(data), 4096)
        z = np.zeros(3, np.uint64)
        assert impl.zero_pages(data, 4096, z, resident=resident) == 2


def test_absent_pages_are_never_read(fastpath: ModuleType) -> None:
    """The promise behind the mask: a page outside it is not touched (here it would crash the process)."""
    ps = mmap.PAGESIZE
    m = mmap.mmap(-1, 8 * ps, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        view = memoryview(m)
        view[0:ps] = b"\x01" * ps
        arr = np.frombuffer(m, np.uint8)
        libc = __import__("ctypes").CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [__import__("ctypes").c_void_p, __import__("ctypes").c_size_t, __import__("ctypes").c_int]
        addr = arr.ctypes.data
        assert libc.mprotect(addr + 2 * ps, 6 * ps, 0) == 0  # PROT_NONE: reading these pages would fault
        try:
            resident = np.array([0b11], np.uint64)
            zeros = np.zeros(1, np.uint64)
            assert fastpath.zero_pages(m, ps, zeros, resident=resident) == 7
            assert int(zeros[0]) == 0b11111110
            table = np.zeros(8, np.uint64)
            dirty = np.zeros(1, np.uint64)
            assert fastpath.hash_delta(m, ps, table, dirty, update=True, resident=resident) == 8
            assert table.tolist() == [xxhash.xxh3_64_intdigest(b"\x01" * ps)] + [xxhash.xxh3_64_intdigest(bytes(ps))] * 7
        finally:
            assert libc.mprotect(addr + 2 * ps, 6 * ps, 3) == 0
        del arr
        view.release()
    finally:
        m.close()


def test_resident_mask_too_short_rejected(impl: ModuleType) -> None:
    with pytest.raises(ValueError, match="resident"):
        impl.zero_pages(bytes(65 * 64), 64, np.zeros(2, np.uint64), resident=np.zeros(1, np.uint64))
    with pytest.raises(ValueError, match="resident"):
        impl.hash_delta(bytes(65 * 64), 64, np.zeros(65, np.uint64), np.zeros(2, np.uint64), resident=np.zeros(1, np.uint64))
    with pytest.raises(TypeError):
        impl.zero_pages(bytes(64), 64, np.zeros(1, np.uint64), resident=np.zeros(1, np.int64))


# --- the GIL ---


def test_hash_pages_releases_the_gil(fastpath: ModuleType) -> None:
    """A Python thread keeps counting while one call hashes 256 MiB."""
    data = np.full(256 << 20, 1, np.uint8)
    out = np.zeros(len(data) // 4096, np.uint64)
    counter = [0]
    running = threading.Event()
    stop = threading.Event()

    def count() -> None:
        running.set()
        while not stop.is_set():
            counter[0] += 1

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # a held GIL would let the counter run 0.5 ms at most
    thread = threading.Thread(target=count)
    thread.start()
    try:
        running.wait()
        t0, c0 = time.perf_counter(), counter[0]
        time.sleep(0.02)
        rate = (counter[0] - c0) / (time.perf_counter() - t0)
        t0, c0 = time.perf_counter(), counter[0]
        fastpath.hash_pages(data, 4096, out)
        during, elapsed = counter[0] - c0, time.perf_counter() - t0
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)
    assert during > 1000
    assert during > 0.2 * rate * elapsed, (during, rate, elapsed)
    assert int(out[-1]) == xxhash.xxh3_64_intdigest(b"\x01" * 4096)
