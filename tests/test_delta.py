"""XBZRLE delta kernels (fast path vs reference, round trips, hostile deltas) and delta-encoded migrations."""

from __future__ import annotations

from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import migcore
from migcore import _fastpath, _reference
from migcore._delta import DeltaCache

from _modes import MIB, migrate_live

PS = 4096


def encode(impl: ModuleType, old: bytes, new: bytes, room: int | None = None) -> bytes | None:
    out = bytearray(len(new) * 2 + 16 if room is None else room)
    n = impl.xbzrle_encode(old, new, out)
    return None if n < 0 else bytes(out[:n])


def test_known_answer() -> None:
    old = bytes(16)
    new = bytearray(16)
    new[3:5] = b"\x01\x02"
    new[15] = 0xFF
    # zrun 3, nzrun 2 (xor bytes), zrun 10, nzrun 1; no trailing zero run
    expected = bytes([3, 2, 1, 2, 10, 1, 0xFF])
    for impl in (_fastpath, _reference):
        assert encode(impl, old, bytes(new)) == expected
        assert encode(impl, old, old) == b""


def test_uleb_lengths_over_127() -> None:
    old = bytes(PS)
    new = bytearray(PS)
    new[300:600] = b"\x07" * 300
    for impl in (_fastpath, _reference):
        enc = encode(impl, old, bytes(new))
        assert enc is not None and enc[:4] == bytes([0xAC, 0x02, 0xAC, 0x02])
        page = bytearray(old)
        impl.xbzrle_decode(enc, page)
        assert page == new


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.data())
def test_round_trip_and_both_implementations_agree(old: bytes, data: st.DataObject) -> None:
    flips = data.draw(st.lists(st.tuples(st.integers(0, max(0, len(old) - 1)), st.integers(1, 255)), max_size=40))
    new = bytearray(old)
    for pos, x in flips:
        if pos < len(new):
            new[pos] ^= x
    fast = encode(_fastpath, old, bytes(new))
    ref = encode(_reference, old, bytes(new))
    assert fast == ref
    assert fast is not None
    for impl in (_fastpath, _reference):
        page = bytearray(old)
        impl.xbzrle_decode(fast, page)
        assert page == new


def test_encoder_reports_overflow() -> None:
    rng = np.random.default_rng(1)
    old, new = rng.bytes(PS), rng.bytes(PS)
    for impl in (_fastpath, _reference):
        assert impl.xbzrle_encode(old, new, bytearray(PS - 1)) == -1


HOSTILE = [
    (bytes([0x80]), "truncated"),  # a length with its continuation bit and nothing after
    (bytes([0x80] * 6), "truncated"),  # longer than 5 bytes
    (bytes([0, 5, 1, 2]), "truncated"),  # 5 xor bytes announced, 2 present
    (bytes([0x81, 0x20, 1, 0xAA]), "past the end"),  # zrun 4097 > page
    (bytes([0xFF, 0x1F, 2, 1, 1]), "past the end"),  # zrun 4095 then 2 bytes: the last one past the page
    (bytes([0, 0]), "length 0"),
]


@pytest.mark.parametrize(("delta", "message"), HOSTILE)
def test_decoder_refuses_hostile_deltas_before_writing(impl: ModuleType, delta: bytes, message: str) -> None:
    page = bytearray(b"\x5a" * PS)
    with pytest.raises(ValueError, match=message):
        impl.xbzrle_decode(delta, page)
    assert page == b"\x5a" * PS


def batch(impl: ModuleType, buf: bytearray, runs: np.ndarray, cache: np.ndarray, slots: list[int], bases: list[int]) -> tuple[bytes, int]:
    npg = int(runs[:, 1].sum())
    out = bytearray(4 * npg + npg * PS)
    n, overflow = impl.delta_encode_runs(buf, PS, runs, cache, np.array(slots, np.int64), np.array(bases, np.uint8), out)
    return bytes(out[:n]), overflow


def test_batch_encode_decode_against_the_reference(impl: ModuleType) -> None:
    rng = np.random.default_rng(2)
    nbytes = 6 * PS + 1000  # a partial last page
    src = bytearray(rng.bytes(nbytes))
    runs = np.array([[0, 2], [4, 3]], dtype=np.uint64)
    caches = {m: np.zeros((4, PS), np.uint8) for m in ("a", "b")}
    first, _ = batch(impl, src, runs, caches["a"], [0, 1, -1, 2, 3], [0, 0, 0, 0, 0])
    ref, _ = batch(_reference, src, runs, caches["b"], [0, 1, -1, 2, 3], [0, 0, 0, 0, 0])
    assert first == ref and np.array_equal(caches["a"], caches["b"])
    dst = bytearray(nbytes)
    impl.delta_decode_runs(dst, PS, runs, first)
    src[10] ^= 1
    src[6 * PS + 5] ^= 9  # in the partial page
    second, overflow = batch(impl, src, runs, caches["a"], [0, 1, -1, 2, 3], [1, 1, 0, 1, 1])
    ref2, _ = batch(_reference, src, runs, caches["b"], [0, 1, -1, 2, 3], [1, 1, 0, 1, 1])
    assert second == ref2 and overflow == 0
    assert len(second) < PS + 100  # one raw page (no slot), the rest tiny deltas
    impl.delta_decode_runs(dst, PS, runs, second)
    for first_page, count in runs.tolist():
        lo, hi = first_page * PS, min((first_page + count) * PS, nbytes)
        assert dst[lo:hi] == src[lo:hi]


def test_batch_decoder_checks_everything_before_writing(impl: ModuleType) -> None:
    runs = np.array([[0, 2]], dtype=np.uint64)
    dst = bytearray(b"\x11" * 2 * PS)
    good_raw = (0x80000000 | PS).to_bytes(4, "little")
    bad_cases = [
        good_raw + (5).to_bytes(4, "little") + b"\x22" * PS + bytes([0xFF, 0x1F, 2, 1, 1]),  # 2nd page past the end
        good_raw + (0x80000000 | 100).to_bytes(4, "little") + b"\x22" * PS + b"\0" * 100,  # raw page of wrong size
        good_raw + (0).to_bytes(4, "little") + b"\x22" * PS + b"extra",  # bytes left over
        good_raw[:3],  # shorter than the table
    ]
    for payload in bad_cases:
        with pytest.raises(ValueError):
            impl.delta_decode_runs(dst, PS, runs, payload)
        assert dst == b"\x11" * 2 * PS


def test_cache_is_bounded_and_trusts_only_acknowledged_pages() -> None:
    npages = 64
    buf = bytearray(np.random.default_rng(3).bytes(npages * PS))
    cache = DeltaCache(npages, PS, len(buf), cache_bytes=8 * PS)
    assert cache.rows.shape == (8, PS)
    runs = np.array([[0, 16]], dtype=np.uint64)
    out = bytearray(16 * (PS + 4))
    _, hits = cache.encode(memoryview(buf), runs, out)
    assert hits == 0 and cache.evictions == 0  # 8 rows for 16 pages: half got a row
    assert int((cache.page_slot >= 0).sum()) == 8
    # the destination acknowledges what it stored; one page's hash differs (it stored something else)
    table = np.empty(npages, np.uint64)
    _fastpath.hash_pages(buf, PS, table)
    acked = table[:16].copy()
    cached_pages = np.flatnonzero(cache.page_slot >= 0)
    acked[cached_pages[0]] ^= np.uint64(1)
    cache.acknowledge(runs, acked)
    assert cache.page_slot[cached_pages[0]] == -1  # dropped: rule 1
    assert int(cache.confirmed.sum()) == 7
    buf[int(cached_pages[1]) * PS] ^= 0xFF
    _, hits = cache.encode(memoryview(buf), runs, out)
    assert hits == 7


@pytest.mark.parametrize("mode", ["precopy", "hybrid"])
def test_delta_migration_on_a_hot_set_is_exact_and_saves_bytes(mode: str) -> None:
    # hot pages rewritten (two bytes each) between every round: deltas of a few bytes
    stats, _ = migrate_live(
        delta=True, mode=mode, max_rounds=6, downtime_limit=0.0, on_stall="finish" if mode == "precopy" else "postcopy",
        writer_kw={"hot": 64, "delay": 0.002},
    )
    assert stats.delta_hits > 0
    assert stats.delta_bytes_saved > stats.delta_hits * 1000
    assert stats.delta_misses > 0


def test_delta_with_compression_and_streams_is_exact() -> None:
    stats, _ = migrate_live(delta=True, compress="lz4", streams=2, max_rounds=5, writer_kw={"hot": 32})
    assert stats.streams == 2


def test_delta_with_a_tiny_cache_still_exact() -> None:
    stats, _ = migrate_live(delta=True, delta_cache_bytes=4 * PS, max_rounds=4, writer_kw={"hot": 40})
    assert stats.verified


def test_delta_refused_where_no_page_is_sent_twice() -> None:
    for mode in ("stopcopy", "postcopy"):
        with pytest.raises(ValueError, match="delta=True needs pre-copy rounds"):
            migcore.migrate(bytearray(4096), "tcp://127.0.0.1:9", mode=mode, delta=True)


def test_cache_size_option_is_checked() -> None:
    with pytest.raises(ValueError, match="delta_cache_bytes"):
        migcore.migrate(bytearray(4096), "tcp://127.0.0.1:9", delta=True, delta_cache_bytes=-1)
    assert MIB
