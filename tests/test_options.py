"""The options as data: the refusal table, the docstring made from it, signatures against dataclasses, typing."""

from __future__ import annotations

import dataclasses
import inspect
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import migcore
from migcore import options
from migcore.options import REFUSALS, SCHEME_REFUSED, SCHEMES, ListenOptions, MigrationOptions, Refusal


def _nobody_listens(scheme: str, tmp_path: Path) -> str:
    """An address of ``scheme`` where a connection attempt would fail (or a file appear), not a ValueError."""
    if scheme == "tcp":
        with socket.create_server(("127.0.0.1", 0)) as s:
            port = s.getsockname()[1]
        return f"tcp://127.0.0.1:{port}"
    if scheme == "unix":
        return f"unix://{tmp_path}/nobody.sock"
    return f"file://{tmp_path}/image"


def _expected_message(refusal: Refusal, scheme: str, kw: dict[str, Any]) -> str:
    """What the refusal's error says for migrate(**kw), worked out from the table and the defaults."""
    values = {f.name: f.default for f in dataclasses.fields(MigrationOptions)} | kw
    if values["on_stall"] is None:
        values["on_stall"] = "postcopy" if values["mode"] == "hybrid" else "finish"
    text = refusal.message.format_map(values)
    return text if refusal.scheme is None else SCHEME_REFUSED[scheme].format(options=text)


def _cases() -> list[Any]:
    cases = []
    for i, refusal in enumerate(REFUSALS):
        for scheme in SCHEMES if refusal.scheme is None else (refusal.scheme,):
            cases.append(pytest.param(refusal, scheme, id=f"{i}-{refusal.option.strip('`')}-{scheme}"))
    return cases


@pytest.mark.parametrize(("refusal", "scheme"), _cases())
def test_every_refusal_raises_its_message_before_any_connection(refusal: Refusal, scheme: str, tmp_path: Path) -> None:
    kw = dict(refusal.example())
    address = _nobody_listens(scheme, tmp_path)
    with pytest.raises(ValueError) as info:
        migcore.migrate(bytearray(4096), address, timeout=5, **kw)
    assert str(info.value) == _expected_message(refusal, scheme, kw)
    assert list(tmp_path.iterdir()) == []  # no file written, no socket made


@pytest.mark.parametrize("refusal", [r for r in REFUSALS if r.scheme is not None])
def test_a_scheme_refusal_holds_on_the_refusing_schemes_only(refusal: Refusal, tmp_path: Path) -> None:
    opts = MigrationOptions(**refusal.example())
    refusing = {r.scheme for r in REFUSALS if r.option == refusal.option}
    assert "tcp" not in refusing
    for scheme in set(SCHEMES) - refusing:
        opts.validate(_nobody_listens(scheme, tmp_path))


def test_a_scheme_names_every_option_it_refuses_in_one_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        migcore.migrate(bytearray(4096), f"file://{tmp_path}/x", mode="hybrid", compress="lz4", token="t")
    named = "compress, token, mode='hybrid', on_stall='postcopy'"
    assert str(info.value) == SCHEME_REFUSED["file"].format(options=named)


def test_a_combination_is_refused_before_what_the_scheme_cannot_carry(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="delta=True needs pre-copy rounds"):
        migcore.migrate(bytearray(4096), f"file://{tmp_path}/x", mode="stopcopy", delta=True)


def test_the_docstring_table_is_the_rendered_table() -> None:
    doc = migcore.migrate.__doc__
    assert doc is not None and options.REFUSALS_PLACEHOLDER not in doc
    assert textwrap.indent(options.render_refusals(), "    ") in doc
    table = options.render_refusals()
    for refusal in REFUSALS:
        assert refusal.option in table
        assert " ".join(refusal.refused_with.split()) in " ".join(table.split())


def _keywords(fn: Any) -> list[tuple[str, Any, Any]]:
    params = inspect.signature(fn).parameters.values()
    return [(p.name, p.default, p.annotation) for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _fields(cls: Any) -> list[tuple[str, Any, Any]]:
    return [(f.name, f.default, f.type) for f in dataclasses.fields(cls)]


def test_migrate_takes_exactly_the_migration_options() -> None:
    assert _keywords(migcore.migrate) == _fields(MigrationOptions)
    assert list(inspect.signature(migcore.migrate).parameters)[:2] == ["source", "address"]


def test_listen_and_listener_take_exactly_the_listen_options() -> None:
    assert _keywords(migcore.listen) == _fields(ListenOptions)
    assert _keywords(migcore.Listener) == _fields(ListenOptions)


def test_listen_forwards_max_payload() -> None:
    with pytest.raises(ValueError, match="max_payload"):
        migcore.listen("tcp://127.0.0.1:0", max_payload=100)
    with migcore.listen("tcp://127.0.0.1:0", max_payload=1 << 20) as listener:
        assert listener._opts.max_payload == 1 << 20


def test_options_resolve_their_defaults_and_normalise() -> None:
    assert MigrationOptions().on_stall == "finish"
    assert MigrationOptions(mode="hybrid").on_stall == "postcopy"
    assert MigrationOptions(mode="hybrid", on_stall="throttle", throttle=print).stall_policy == "throttle"
    opts = MigrationOptions(token="t", timeout=5, downtime_limit=1, bandwidth_limit=10)
    assert opts.token == b"t" and opts.token_bytes == b"t"
    assert isinstance(opts.timeout, float) and isinstance(opts.downtime_limit, float)
    assert isinstance(opts.bandwidth_limit, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.mode = "stopcopy"  # type: ignore[misc]
    assert ListenOptions(token="t", timeout=2).token_bytes == b"t"


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"mode": "teleport"}, ValueError, "mode must be one of"),
        ({"tracker": "nope"}, ValueError, "tracker must be 'auto' or one of"),
        ({"on_stall": "panic"}, ValueError, "on_stall must be one of"),
        ({"downtime_limit": -1}, ValueError, "downtime_limit"),
        ({"max_rounds": 0}, ValueError, "max_rounds"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"state": 12}, TypeError, "state must be"),
        ({"pause": 1}, TypeError, "pause must be callable"),
        ({"compat": 1}, TypeError, "compat"),
        ({"token": ""}, ValueError, "empty"),
        ({"tls": "ctx"}, TypeError, "tls must be"),
        ({"compress": "brotli"}, ValueError, "compress must be one of"),
        ({"delta": 1}, TypeError, "delta must be"),
        ({"delta_cache_bytes": -1}, ValueError, "delta_cache_bytes"),
        ({"streams": 0}, ValueError, "streams must be"),
        ({"bandwidth_limit": 0}, ValueError, "bandwidth_limit"),
    ],
)
def test_migration_options_check_each_value(kw: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        MigrationOptions(**kw)


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"max_bytes": 0}, ValueError, "max_bytes"),
        ({"compat": 1}, TypeError, "compat"),
        ({"page_size": 1000}, ValueError, "page_size"),
        ({"max_state_bytes": -1}, ValueError, "max_state_bytes"),
        ({"max_payload": 1 << 31}, ValueError, "max_payload"),
        ({"timeout": -1}, ValueError, "timeout"),
        ({"token": ""}, ValueError, "empty"),
        ({"tls": "ctx"}, TypeError, "tls must be"),
    ],
)
def test_listen_options_check_each_value(kw: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        ListenOptions(**kw)


def test_the_public_names_come_from_one_definition() -> None:
    from migcore import _names

    assert options.MODES == _names.MODES and options.TRACKERS == _names.TRACKERS
    assert options.TRACKER_CHOICES == ("auto", *_names.TRACKERS)
    assert options.CODECS == _names.CODECS and options.ON_STALL == _names.ON_STALL


GOOD = """\
import numpy as np

import migcore
from migcore.options import MODES, ListenOptions, MigrationOptions

buf = bytearray(4096)
migcore.migrate(buf, "tcp://127.0.0.1:9", mode="hybrid", tracker="hash", on_stall="throttle", throttle=print)
migcore.migrate(np.zeros(4096, np.uint8), "tcp://127.0.0.1:9", compress="lz4", token=b"t")
migcore.migrate(migcore.Region.allocate(4096), "unix:///tmp/s", state=lambda: b"", compress=None)
for mode in MODES:
    migcore.migrate(buf, "tcp://127.0.0.1:9", mode=mode)
options = MigrationOptions(mode="stopcopy", streams=2)
listener: migcore.Listener = migcore.listen("tcp://127.0.0.1:0", max_payload=1 << 20, token="t")
ListenOptions(max_bytes=1 << 30)
handle: migcore.Migration = migcore.start(buf, "tcp://127.0.0.1:9", mode="stopcopy", connect_timeout=5.0)
final: migcore.MigrationStats = handle.result(1.0)
"""

BAD = """\
import migcore
from migcore.options import MigrationOptions

buf = bytearray(4096)
migcore.migrate(buf, "tcp://127.0.0.1:9", mode="precpy")
migcore.migrate(buf, "tcp://127.0.0.1:9", tracker="uff")
migcore.migrate(buf, "tcp://127.0.0.1:9", on_stall="panic")
migcore.migrate(buf, "tcp://127.0.0.1:9", compress="brotli")
migcore.listen("tcp://127.0.0.1:0", max_payload="big")
MigrationOptions(mode="teleport")
migcore.start(buf, "tcp://127.0.0.1:9", mode="precpy")
migcore.start(buf, "tcp://127.0.0.1:9", streams="two")
"""


def _mypy(path: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), "--no-error-summary", str(path)],
        capture_output=True, text=True, timeout=240, cwd=path.parent,
    )


@pytest.mark.slow
def test_mypy_strict_accepts_good_options_and_rejects_misspelt_names(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    cache = tmp_path / "cache"
    (tmp_path / "good.py").write_text(GOOD)
    (tmp_path / "bad.py").write_text(BAD)
    good = _mypy(tmp_path / "good.py", cache)
    assert good.returncode == 0, good.stdout + good.stderr
    bad = _mypy(tmp_path / "bad.py", cache)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    flagged = {int(m.group(1)) for m in re.finditer(r"^bad\.py:(\d+): error: .*\[arg-type\]$", bad.stdout, re.M)}
    assert flagged == set(range(5, 13)), bad.stdout
