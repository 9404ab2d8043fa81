"""The wire format on bytes alone: round trips, known layouts, and every validation rule."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from migcore import _postcopy_wire as PW
from migcore import _protocol as P
from migcore._errors import CompatibilityError, ProtocolError

U64 = np.uint64


def runs(*rows: tuple[int, int]) -> np.ndarray:
    return np.array(rows, dtype=np.uint64).reshape(-1, 2)


def test_header_layout_is_frozen() -> None:
    raw = P.encode_header(P.Frame.PAGES, flags=1, count=3, length=0x0102030405)
    assert raw == bytes([4, 1, 0, 0, 3, 0, 0, 0, 5, 4, 3, 2, 1, 0, 0, 0])
    h = P.decode_header(raw)
    assert (h.type, h.flags, h.count, h.length) == (P.Frame.PAGES, 1, 3, 0x0102030405)


@pytest.mark.parametrize("raw", [bytes([0] * 16), bytes([200] + [0] * 15)])
def test_unknown_frame_type(raw: bytes) -> None:
    with pytest.raises(ProtocolError, match="unknown frame type"):
        P.decode_header(raw)


def test_reserved_field_and_size() -> None:
    with pytest.raises(ProtocolError, match="reserved"):
        P.decode_header(struct.pack("<BBHIQ", 4, 0, 7, 0, 0))
    with pytest.raises(ProtocolError, match="16 bytes"):
        P.decode_header(b"\x04" * 15)


def test_expect_and_lengths() -> None:
    h = P.decode_header(P.encode_header(P.Frame.COMPLETE, length=16))
    with pytest.raises(ProtocolError, match="unexpected COMPLETE frame during post-copy"):
        P.expect(h, (P.Frame.PAGES, P.Frame.END), "post-copy")
    assert P.check_length(h, 16, exact=16) == 16
    with pytest.raises(ProtocolError, match="expected 8"):
        P.check_length(h, 100, exact=8)
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        P.check_length(h, 15)


def hello(**kw: object) -> P.Hello:
    base: dict[str, object] = dict(
        version=P.PROTOCOL_VERSION, page_size=4096, nbytes=10_000, mode="hybrid", tracker="writes",
        features=P.FEATURE_POSTCOPY, compat="app 1.2 ✓", migration_id=bytes(range(16)), state_size=77,
    )
    base.update(kw)
    return P.Hello(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("compat", [None, "", "app 1.2 ✓"])
def test_hello_round_trip(compat: str | None) -> None:
    h = hello(compat=compat)
    raw = P.encode_hello(h)
    header = P.decode_header(raw[: P.HEADER_SIZE])
    assert header.type is P.Frame.HELLO and header.length == len(raw) - P.HEADER_SIZE
    back = P.decode_hello(raw[P.HEADER_SIZE :])
    assert back == h and back.npages == 3


def test_hello_wrong_magic_and_version() -> None:
    body = bytearray(P.encode_hello(hello())[P.HEADER_SIZE :])
    bad = bytes(b"HTTP" + body[4:])
    with pytest.raises(ProtocolError, match="magic"):
        P.decode_hello(bad)
    with pytest.raises(ProtocolError, match="magic"):
        P.decode_hello(b"GET / HTTP/1.1\r\n")
    with pytest.raises(ProtocolError, match="magic"):
        P.decode_hello(b"MI")
    body[4:6] = (2).to_bytes(2, "little")
    assert P.decode_hello(bytes(body)).version == 2  # the destination refuses it by name


def test_hello_malformed_bodies() -> None:
    body = P.encode_hello(hello())[P.HEADER_SIZE :]
    with pytest.raises(ProtocolError, match="shorter"):
        P.decode_hello(body[:20])
    with pytest.raises(ProtocolError, match="compat string length"):
        P.decode_hello(body + b"x")
    mode_at = 4 + 2 + 2 + 4 + 8 + 8 + 16
    for offset, pattern in ((mode_at, "mode"), (mode_at + 1, "tracker")):
        bad = bytearray(body)
        bad[offset] = 99
        with pytest.raises(ProtocolError, match=pattern):
            P.decode_hello(bytes(bad))
    empty = P.encode_hello(hello(nbytes=0))[P.HEADER_SIZE :]
    with pytest.raises(ProtocolError, match="empty"):
        P.decode_hello(empty)


def test_accept_refuse_error_cancel() -> None:
    acc = P.Accept(max_state=5, max_payload=1 << 20, max_runs=100, features=1)
    raw = P.encode_accept(acc)
    assert P.decode_accept(raw[P.HEADER_SIZE :]) == acc
    with pytest.raises(ProtocolError):
        P.decode_accept(raw[P.HEADER_SIZE : -1])
    with pytest.raises(ProtocolError, match="unusable"):
        P.decode_accept(P.encode_accept(P.Accept(5, 10, 1, 0))[P.HEADER_SIZE :])
    err = P.decode_refuse(P.encode_refuse("compat", "compat 'a' differs from 'b'")[P.HEADER_SIZE :])
    assert isinstance(err, CompatibilityError) and err.field == "compat" and "'a'" in str(err)
    code, msg = P.decode_error(P.encode_error(P.ErrorCode.VERIFICATION, "bad")[P.HEADER_SIZE :])
    assert code is P.ErrorCode.VERIFICATION and msg == "bad"
    assert P.decode_cancel(P.encode_cancel("stalled")[P.HEADER_SIZE :]) == "stalled"
    with pytest.raises(ProtocolError):
        P.decode_error(b"\x01")


def test_runs_round_trip_and_header() -> None:
    r = runs((0, 2), (5, 1), (9, 3))
    raw = P.encode_runs_header(P.Frame.PAGES, r, 6 * 4096)
    h = P.decode_header(raw[: P.HEADER_SIZE])
    assert (h.count, h.length) == (3, 6 * 4096)
    back = P.decode_runs(raw[P.HEADER_SIZE :], h.count)
    assert back.dtype == np.uint64 and np.array_equal(back, r)
    demand = P.encode_runs_header(P.Frame.DEMAND, r, 0)
    assert P.decode_header(demand[: P.HEADER_SIZE]).length == 48
    with pytest.raises(ProtocolError, match="runs table"):
        P.decode_runs(raw[P.HEADER_SIZE : -1], 3)


def test_validate_runs_accepts_good_tables() -> None:
    assert P.validate_runs(runs((0, 1)), 1) == 1
    assert P.validate_runs(runs((0, 2), (2, 3), (10, 6)), 16) == 11
    assert P.validate_runs(runs((4, 2)), 16, after=4) == 2


@pytest.mark.parametrize(
    ("table", "pattern"),
    [
        (runs((0, 0)), "count of 0"),
        (runs((16, 1)), "outside"),
        (runs((15, 2)), "outside"),
        (runs((0, 17)), "outside"),
        (runs(((1 << 64) - 1, 1)), "outside"),
        (runs((1, (1 << 64) - 1)), "outside"),
        (runs(((1 << 63), (1 << 63))), "outside"),
        (runs((4, 2), (5, 1)), "ascending"),
        (runs((6, 2), (1, 1)), "ascending"),
        (runs((3, 1), (3, 1)), "ascending"),
        (np.empty((0, 2), dtype=np.uint64), "empty"),
    ],
)
def test_validate_runs_rejects(table: np.ndarray, pattern: str) -> None:
    with pytest.raises(ProtocolError, match=pattern):
        P.validate_runs(table, 16)


def test_validate_runs_rejects_going_back_within_a_round() -> None:
    with pytest.raises(ProtocolError, match="back before"):
        P.validate_runs(runs((2, 1)), 16, after=3)


def test_runs_payload_counts_the_partial_last_page() -> None:
    assert P.runs_payload(runs((0, 2)), 4096, 3 * 4096 - 100) == 8192
    assert P.runs_payload(runs((1, 2)), 4096, 3 * 4096 - 100) == 8192 - 100
    assert P.runs_payload(runs((2, 1)), 4096, 2 * 4096 + 1) == 1


def test_postcopy_frame() -> None:
    owed = np.array([0b1011, 1 << 3], dtype=np.uint64)
    raw = PW.encode_postcopy(b"d" * 16, owed, b"b" * 16)
    h = P.decode_header(raw[: P.HEADER_SIZE])
    assert h.count == 2 and h.length == 48
    digest, binding, back = PW.decode_postcopy(raw[P.HEADER_SIZE :], 68)
    assert digest == b"d" * 16 and binding == b"b" * 16 and np.array_equal(back, owed)
    with pytest.raises(ProtocolError, match="past the end"):
        PW.decode_postcopy(raw[P.HEADER_SIZE :], 67)
    with pytest.raises(ProtocolError, match="expected"):
        PW.decode_postcopy(raw[P.HEADER_SIZE :], 200)


@pytest.mark.parametrize("npages", [1, 63, 64, 65, 128, 1000])
def test_postcopy_frame_owing_every_page_has_no_bitmap(npages: int) -> None:
    raw = PW.encode_postcopy(b"d" * 16, None, b"b" * 16)
    h = P.decode_header(raw[: P.HEADER_SIZE])
    assert h.count == 0 and h.length == 32 and len(raw) == P.HEADER_SIZE + 32
    digest, binding, owed = PW.decode_postcopy(raw[P.HEADER_SIZE :], npages)
    assert digest == b"d" * 16 and binding == b"b" * 16
    bits = np.unpackbits(owed.view(np.uint8), bitorder="little")
    assert len(owed) == -(-npages // 64) and bits[:npages].all() and not bits[npages:].any()


def test_postcopy_decodes_into_a_given_bitmap() -> None:
    out = np.full(2, np.uint64(7))
    owed = np.array([0b1011, 1 << 3], dtype=np.uint64)
    _, _, back = PW.decode_postcopy(PW.encode_postcopy(b"d" * 16, owed)[P.HEADER_SIZE :], 68, out=out)
    assert back is out and np.array_equal(out, owed)
    _, _, back = PW.decode_postcopy(PW.encode_postcopy(b"d" * 16, None)[P.HEADER_SIZE :], 68, out=out)
    assert back is out and out.tolist() == [2**64 - 1, 0b1111]
    with pytest.raises(ValueError, match="words"):
        PW.decode_postcopy(PW.encode_postcopy(b"d" * 16, None)[P.HEADER_SIZE :], 200, out=out)


def test_table_digest_changes_with_any_page() -> None:
    t = np.arange(100, dtype=np.uint64)
    d = P.table_digest(t)
    assert len(d) == P.DIGEST_SIZE and d == P.table_digest(t.copy())
    t[57] ^= U64(1)
    assert P.table_digest(t) != d


def test_zero_notice_flag_is_a_distinct_pages_flag_and_carries_no_payload() -> None:
    flags = (P.FLAG_POSTCOPY, P.FLAG_COMPRESSED, P.FLAG_DELTA, P.FLAG_ZERO)
    assert len(set(flags)) == 4 and all(f & (f - 1) == 0 for f in flags)
    assert P.PAGES_FLAGS == P.FLAG_POSTCOPY | P.FLAG_COMPRESSED | P.FLAG_DELTA | P.FLAG_ZERO
    runs = np.array([[3, 2], [9, 1]], dtype=np.uint64)
    raw = P.encode_runs_header(P.Frame.PAGES, runs, 0, flags=P.FLAG_POSTCOPY | P.FLAG_ZERO)
    h = P.decode_header(raw[: P.HEADER_SIZE])
    assert (h.type, h.flags, h.count, h.length) == (P.Frame.PAGES, P.FLAG_POSTCOPY | P.FLAG_ZERO, 2, 0)
    assert len(raw) == P.HEADER_SIZE + 2 * P.RUN_SIZE
    assert np.array_equal(P.decode_runs(raw[P.HEADER_SIZE :], 2), runs)


def test_the_protocol_document_lists_every_frame_with_its_number() -> None:
    from pathlib import Path
    import re

    doc = (Path(__file__).parent.parent / "docs" / "protocol.md").read_text()
    table = doc.split("<!-- frames:", 1)[1].split("<!-- /frames -->", 1)[0]
    rows = dict(re.findall(r"^\| ([A-Z_]+) \| (\d+) \|", table, re.M))
    assert {name: int(number) for name, number in rows.items()} == {f.name: int(f) for f in P.Frame}
    flags = dict(re.findall(r"^\| `(FLAG_[A-Z]+)` \| (\d+) \|", doc, re.M))
    assert {name: int(v) for name, v in flags.items()} == {
        name: getattr(P, name) for name in ("FLAG_POSTCOPY", "FLAG_COMPRESSED", "FLAG_DELTA", "FLAG_ZERO")
    }
    assert ", ".join(P.REFUSE_FIELDS) in " ".join(doc.split())
