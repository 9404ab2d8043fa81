"""Bitmap kernels against NumPy bit oracles, a plain run finder and the reference."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from migcore import _reference

U64 = NDArray[np.uint64]
ALL = np.uint64(2**64 - 1)
HYPOTHESIS = settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)



def unpack(bitmap: U64) -> NDArray[np.uint8]:
    return np.unpackbits(bitmap.reshape(-1).view(np.uint8), bitorder="little")


def pack(flags: list[bool] | NDArray[Any]) -> U64:
    flags = np.asarray(flags, dtype=np.uint8)
    padded = np.zeros(-(-len(flags) // 64) * 64, np.uint8)
    padded[: len(flags)] = flags
    return np.packbits(padded, bitorder="little").view(np.uint64).copy()


def bitmap_with(nbits: int, positions: list[int] | range, words: int | None = None) -> U64:
    flags = np.zeros((words or -(-nbits // 64)) * 64, np.uint8)
    flags[list(positions)] = 1
    return pack(flags)


def oracle_runs(flags: list[bool], start: int, max_run: int) -> list[tuple[int, int]]:
    """Plain run finder: stretches of set bits from ``start``, cut every ``max_run`` bits."""
    runs = []
    pos = 0
    for value, group in itertools.groupby(flags):
        length = len(list(group))
        first, last = max(pos, start), pos + length
        pos += length
        if not value or first >= last:
            continue
        step = max_run or last - first
        runs += [(s, min(step, last - s)) for s in range(first, last, step)]
    return runs


def all_runs(
    impl: ModuleType, bitmap: U64, nbits: int, cap: int, start: int = 0, max_run: int = 0
) -> list[tuple[int, int]]:
    """Call dirty_runs with an ``out`` of ``cap`` rows until done, checking each resume point."""
    runs: list[tuple[int, int]] = []
    out = np.zeros((cap, 2), np.uint64)
    flags = unpack(bitmap)[:nbits]
    calls = 0
    while True:
        n, resume = impl.dirty_runs(bitmap, nbits, out, start, max_run)
        runs += [(first, count) for first, count in out[:n].tolist()]
        assert 0 <= n <= cap and start <= resume <= nbits
        if resume == nbits:
            return runs
        assert n == cap, "a short batch means the scan finished"
        assert flags[resume], "resume points at the set bit that did not fit"
        start = resume
        calls += 1
        assert calls <= nbits + 1


# --- dirty_runs ---


@pytest.mark.parametrize(
    ("nbits", "positions"),
    [
        (0, []),
        (1, []),
        (1, [0]),
        (64, [63]),
        (65, [64]),
        (66, [65]),
        (128, [0, 63, 64, 127]),
        (200, range(60, 70)),  # one run across a word boundary
        (200, range(0, 200)),  # all set, several words
        (256, range(0, 256)),
        (300, range(1, 299, 2)),  # alternating
        (1000, range(64, 640)),  # whole words set
        (4096, []),
        (4096, [4095]),
        (130, [0, 1, 2, 64, 65, 66, 128, 129]),
    ],
    ids=lambda v: str(v) if isinstance(v, int) else f"{len(list(v))}set",
)
def test_dirty_runs_matches_plain_run_finder(impl: ModuleType, nbits: int, positions: Any) -> None:
    bitmap = bitmap_with(nbits, positions, words=max(1, -(-nbits // 64)))
    flags = [bool(b) for b in unpack(bitmap)[:nbits]]
    for start in sorted({0, 1, 63, 64, 65, nbits // 2, nbits} & set(range(nbits + 1))):
        for max_run in (0, 1, 3, 63, 64, 65):
            expected = oracle_runs(flags, start, max_run)
            out = np.zeros((len(expected) + 2, 2), np.uint64)
            n, resume = impl.dirty_runs(bitmap, nbits, out, start, max_run)
            assert (n, resume) == (len(expected), nbits)
            assert [tuple(r) for r in out[:n].tolist()] == expected
            for cap in (1, 2, 5):
                assert all_runs(impl, bitmap, nbits, cap, start, max_run) == expected


def test_dirty_runs_ignores_bits_past_nbits(impl: ModuleType) -> None:
    bitmap = np.full(3, ALL)
    out = np.zeros((4, 2), np.uint64)
    assert impl.dirty_runs(bitmap, 130, out) == (1, 130)
    assert out[0].tolist() == [0, 130]
    assert impl.dirty_runs(bitmap, 100, out, 0, 64) == (2, 100)
    assert out[:2].tolist() == [[0, 64], [64, 36]]


def test_dirty_runs_full_out(impl: ModuleType) -> None:
    bitmap = bitmap_with(200, [5, 6, 70, 199])
    out = np.zeros((0, 2), np.uint64)
    assert impl.dirty_runs(bitmap, 200, out) == (0, 5)
    assert impl.dirty_runs(bitmap, 200, out, 6) == (0, 6)
    assert impl.dirty_runs(bitmap, 200, out, 71) == (0, 199)
    assert impl.dirty_runs(np.zeros(4, np.uint64), 200, out) == (0, 200)
    one = np.zeros((1, 2), np.uint64)
    assert impl.dirty_runs(bitmap, 200, one) == (1, 70)
    assert impl.dirty_runs(bitmap, 200, one, 71) == (1, 200), "the last run fits: scan is complete"
    assert impl.dirty_runs(bitmap, 200, one, 200) == (0, 200)


def test_dirty_runs_max_run_cut_then_full(impl: ModuleType) -> None:
    bitmap = bitmap_with(256, range(10, 200))
    out = np.zeros((2, 2), np.uint64)
    assert impl.dirty_runs(bitmap, 256, out, 0, 64) == (2, 138)
    assert out.tolist() == [[10, 64], [74, 64]]
    assert impl.dirty_runs(bitmap, 256, out, 138, 64) == (1, 256)
    assert out[0].tolist() == [138, 62]


def test_dirty_runs_checks(impl: ModuleType) -> None:
    bitmap = np.zeros(2, np.uint64)
    out = np.zeros((4, 2), np.uint64)
    readonly_bitmap = bitmap.copy()
    readonly_bitmap.flags.writeable = False
    assert impl.dirty_runs(readonly_bitmap, 128, out) == (0, 128)
    with pytest.raises(ValueError):
        impl.dirty_runs(bitmap, 129, out)
    with pytest.raises(ValueError):
        impl.dirty_runs(bitmap, 128, out, 129)
    with pytest.raises(ValueError):
        impl.dirty_runs(bitmap, 128, out, -1)
    with pytest.raises(ValueError):
        impl.dirty_runs(bitmap, -1, out)
    with pytest.raises(ValueError):
        impl.dirty_runs(bitmap, 128, out, 0, -1)
    with pytest.raises(ValueError):
        impl.dirty_runs(bitmap, 128, np.zeros((4, 3), np.uint64))
    with pytest.raises(ValueError):
        impl.dirty_runs(bitmap, 128, np.zeros(8, np.uint64))
    with pytest.raises(ValueError):
        impl.dirty_runs(bitmap, 128, np.zeros((4, 4), np.uint64)[:, ::2])
    with pytest.raises(ValueError):
        impl.dirty_runs(np.zeros(4, np.uint64)[::2], 128, out)
    readonly_out = out.copy()
    readonly_out.flags.writeable = False
    with pytest.raises(ValueError):
        impl.dirty_runs(bitmap, 128, readonly_out)
    with pytest.raises(TypeError):
        impl.dirty_runs(bitmap.astype(np.int64), 128, out)
    with pytest.raises(TypeError):
        impl.dirty_runs(bitmap, 128, out.astype(np.int64))
    with pytest.raises(TypeError):
        impl.dirty_runs([0, 0], 128, out)


@st.composite
def bitmaps(draw: st.DrawFn) -> tuple[U64, int]:
    """Sparse, dense and clustered patterns, with junk past ``nbits``."""
    nbits = draw(st.integers(0, 700))
    words = max(1, -(-nbits // 64)) + draw(st.integers(0, 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    style = draw(st.sampled_from(["sparse", "dense", "half", "clusters", "words"]))
    if style == "clusters":
        flags = np.zeros(words * 64, np.uint8)
        for _ in range(rng.integers(0, 8)):
            first = rng.integers(0, words * 64)
            flags[first : first + rng.integers(1, 150)] = 1
        return pack(flags), nbits
    if style == "words":
        bitmap = np.where(rng.random(words) < 0.5, ALL, np.uint64(0)).astype(np.uint64)
        return bitmap, nbits
    p = {"sparse": 0.02, "dense": 0.97, "half": 0.5}[style]
    return pack(rng.random(words * 64) < p), nbits


@HYPOTHESIS
@given(
    case=bitmaps(),
    start_fraction=st.floats(0, 1),
    max_run=st.sampled_from([0, 0, 1, 2, 5, 63, 64, 65, 130]),
    cap=st.sampled_from([1, 3, 1000]),
)
def test_dirty_runs_properties(
    impl: ModuleType, case: tuple[U64, int], start_fraction: float, max_run: int, cap: int
) -> None:
    bitmap, nbits = case
    start = int(start_fraction * nbits)
    flags = [bool(b) for b in unpack(bitmap)[:nbits]]
    expected = oracle_runs(flags, start, max_run)
    assert all_runs(impl, bitmap, nbits, cap, start, max_run) == expected
    out_mine = np.zeros((cap, 2), np.uint64)
    out_ref = np.zeros((cap, 2), np.uint64)
    assert impl.dirty_runs(bitmap, nbits, out_mine, start, max_run) == _reference.dirty_runs(
        bitmap, nbits, out_ref, start, max_run
    )
    assert (out_mine == out_ref).all()


def test_dirty_runs_sparse_large(fastpath: ModuleType) -> None:
    """Many empty words between set bits: the word-skipping path, against np.flatnonzero."""
    nbits = 1 << 24
    rng = np.random.default_rng(12)
    positions = np.unique(rng.integers(0, nbits, 2000))
    positions = np.union1d(positions, [0, 63, 64, nbits - 1])
    bitmap = bitmap_with(nbits, positions.tolist())
    out = np.zeros((len(positions) + 1, 2), np.uint64)
    n, resume = fastpath.dirty_runs(bitmap, nbits, out)
    assert resume == nbits
    covered = np.concatenate([np.arange(f, f + c) for f, c in out[:n].tolist()])
    assert (covered == np.flatnonzero(unpack(bitmap))).all()


# --- set_bits / clear_bits ---


RANGES = [
    (0, 0), (0, 1), (63, 64), (63, 65), (64, 128), (1, 191), (0, 192), (5, 6), (100, 100),
    (192, 192), (65, 190),
]


@pytest.mark.parametrize(("start", "stop"), RANGES)
def test_set_and_clear_bits(impl: ModuleType, start: int, stop: int) -> None:
    rng = np.random.default_rng(start * 1000 + stop)
    random = rng.integers(0, 2**64, 3, dtype=np.uint64)
    for initial in (np.zeros(3, np.uint64), np.full(3, ALL), random):
        bitmap = initial.copy()
        expected = unpack(initial).copy()
        expected[start:stop] = 1
        impl.set_bits(bitmap, start, stop)
        assert (unpack(bitmap) == expected).all()
        bitmap = initial.copy()
        expected[start:stop] = 0
        impl.clear_bits(bitmap, start, stop)
        assert (unpack(bitmap) == expected).all()


@pytest.mark.parametrize("name", ["set_bits", "clear_bits"])
def test_set_and_clear_bits_checks(impl: ModuleType, name: str) -> None:
    call = getattr(impl, name)
    bitmap = np.zeros(2, np.uint64)
    for start, stop in [(-1, 3), (0, 129), (5, 4), (129, 129)]:
        with pytest.raises(ValueError):
            call(bitmap, start, stop)
    readonly = bitmap.copy()
    readonly.flags.writeable = False
    with pytest.raises(ValueError):
        call(readonly, 0, 1)
    with pytest.raises(ValueError):
        call(np.zeros(4, np.uint64)[::2], 0, 1)
    with pytest.raises(ValueError):
        call(np.zeros((2, 1), np.uint64), 0, 1)
    with pytest.raises(TypeError):
        call(bitmap.astype(np.int64), 0, 1)
    call(np.zeros(0, np.uint64), 0, 0)


# --- count_bits and the binary operations ---


@pytest.mark.parametrize("words", [0, 1, 2, 3, 1023, 1024, 1025, 5000])
def test_count_bits(impl: ModuleType, words: int) -> None:
    rng = np.random.default_rng(words)
    random = rng.integers(0, 2**64, words, dtype=np.uint64)
    for bitmap in (random, np.full(words, ALL), np.zeros(words, np.uint64)):
        assert impl.count_bits(bitmap) == int(unpack(bitmap).sum())


def test_count_bits_any_shape(impl: ModuleType) -> None:
    bitmap = np.arange(12, dtype=np.uint64).reshape(3, 4)
    assert impl.count_bits(bitmap) == int(unpack(bitmap).sum())
    assert impl.count_bits(np.array(7, np.uint64)) == 3
    readonly = np.full(4, ALL)
    readonly.flags.writeable = False
    assert impl.count_bits(readonly) == 256
    with pytest.raises(TypeError):
        impl.count_bits(np.zeros(3, np.int64))
    with pytest.raises(ValueError):
        impl.count_bits(np.zeros(4, np.uint64)[::2])


OPS: dict[str, Callable[[U64, U64], U64]] = {
    "and_bits": lambda a, b: a & b,
    "or_bits": lambda a, b: a | b,
    "andnot_bits": lambda a, b: a & ~b,
}


@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("words", [0, 1, 2, 1000, 1024, 2049])
def test_binary_ops(impl: ModuleType, name: str, words: int) -> None:
    rng = np.random.default_rng(words)
    a = rng.integers(0, 2**64, words, dtype=np.uint64)
    b = rng.integers(0, 2**64, words, dtype=np.uint64)
    if words:
        a[0], b[0] = ALL, 0
    expected = OPS[name](a, b)
    call = getattr(impl, name)
    out = np.empty(words, np.uint64)
    assert call(a, b, out) == int(unpack(expected).sum())
    assert (out == expected).all()
    for alias in ("a", "b"):
        x, y = a.copy(), b.copy()
        target = x if alias == "a" else y
        assert call(x, y, target) == int(unpack(expected).sum())
        assert (target == expected).all()
    same = a.copy()
    assert call(same, same, same) == int(unpack(OPS[name](a, a)).sum())


@pytest.mark.parametrize("name", list(OPS))
def test_binary_ops_checks(impl: ModuleType, name: str) -> None:
    call = getattr(impl, name)
    a = np.zeros(4, np.uint64)
    readonly = a.copy()
    readonly.flags.writeable = False
    assert call(readonly, readonly, a.copy()) == 0
    with pytest.raises(ValueError):
        call(a, a, readonly)
    with pytest.raises(ValueError):
        call(a, np.zeros(5, np.uint64), a)
    with pytest.raises(ValueError):
        call(a, a, np.zeros(3, np.uint64))
    with pytest.raises(ValueError):
        call(a.reshape(2, 2), a.reshape(2, 2), a.reshape(2, 2).copy())
    with pytest.raises(ValueError):
        call(np.zeros(8, np.uint64)[::2], a, a)
    with pytest.raises(TypeError):
        call(a.astype(np.int64), a, a)
    with pytest.raises(TypeError):
        call(a, a, [0, 0, 0, 0])


@HYPOTHESIS
@given(
    words=st.integers(0, 40),
    seed=st.integers(0, 2**32 - 1),
    start=st.integers(0, 40 * 64),
    length=st.integers(0, 40 * 64),
)
def test_bit_kernels_agree_with_reference(
    impl: ModuleType, words: int, seed: int, start: int, length: int
) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2**64, words, dtype=np.uint64)
    b = rng.integers(0, 2**64, words, dtype=np.uint64)
    for name in OPS:
        mine, ref = np.empty_like(a), np.empty_like(a)
        assert getattr(impl, name)(a, b, mine) == getattr(_reference, name)(a, b, ref)
        assert (mine == ref).all()
    assert impl.count_bits(a) == _reference.count_bits(a)
    start = min(start, words * 64)
    stop = min(start + length, words * 64)
    for name in ("set_bits", "clear_bits"):
        mine, ref = a.copy(), a.copy()
        getattr(impl, name)(mine, start, stop)
        getattr(_reference, name)(ref, start, stop)
        assert (mine == ref).all()
