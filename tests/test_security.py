"""TLS (mutual auth, wrong CA, missing client certificate), shared tokens, and the non-loopback bind rule."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest

import migcore
from migcore import _protocol as P
from migcore import _security

from _certs import Pki, make_pki
from _live import Receiver, Writer, random_region

MIB = 1 << 20


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki2"), "other")


def migrate_to(listen_kw: dict[str, Any], *, host: str = "127.0.0.1", writer: bool = True, **kw: Any) -> tuple[
    migcore.MigrationStats | BaseException, Receiver, bytes
]:
    region = random_region(2 * MIB + 300, seed=3)
    with migcore.listen(f"tcp://{host}:0", timeout=10, **listen_kw) as listener:
        rx = Receiver(listener, timeout=10)
        live = Writer(region, seed=4).start() if writer else None
        address = listener.address
        try:
            out: migcore.MigrationStats | BaseException = migcore.migrate(
                region, address, timeout=10, state=b"tls-state", pause=live.pause if live else None, **kw
            )
        except migcore.MigrationError as exc:
            out = exc
        finally:
            if live is not None:
                live.stop()
        rx.join()
    expected = live.snapshot if live is not None and live.snapshot is not None else bytes(region.view)
    return out, rx, expected


def assert_exact(out: object, rx: Receiver, expected: bytes) -> None:
    assert isinstance(out, migcore.MigrationStats), out
    assert rx.error is None, rx.error
    assert rx.received is not None
    assert bytes(rx.received.region.view) == expected
    assert rx.received.state == b"tls-state"


def test_mutual_tls_with_a_live_writer(pki: Pki) -> None:
    out, rx, expected = migrate_to({"tls": pki.server_context()}, tls=pki.client_context(), mode="precopy")
    assert_exact(out, rx, expected)


def test_tls_checks_the_server_name_against_the_address(pki: Pki) -> None:
    """The certificate names 127.0.0.1, ::1 and localhost; it is accepted for ::1 (another SAN) too."""
    out, rx, expected = migrate_to({"tls": pki.server_context()}, host="::1", tls=pki.client_context(), writer=False)
    assert_exact(out, rx, expected)


def test_tls_refuses_a_server_name_that_does_not_match(pki: Pki) -> None:
    """127.0.0.2 is loopback but not in the certificate: the source refuses it, the destination sees why."""
    with migcore.listen("tcp://127.0.0.2:0", timeout=5, tls=pki.server_context()) as listener:
        rx = Receiver(listener, timeout=5)
        with pytest.raises(migcore.AuthenticationError, match="TLS"):
            migcore.migrate(random_region(8192), listener.address, timeout=5, tls=pki.client_context(), mode="stopcopy")
        rx.join()
    assert isinstance(rx.error, migcore.AuthenticationError), rx.error


def test_source_without_a_client_certificate_is_refused_on_both_ends(pki: Pki) -> None:
    out, rx, _ = migrate_to(
        {"tls": pki.server_context()}, tls=pki.client_context(with_cert=False), mode="stopcopy", writer=False
    )
    assert isinstance(out, migcore.AuthenticationError), out
    assert isinstance(rx.error, migcore.AuthenticationError), rx.error


def test_wrong_ca_is_refused_on_both_ends(pki: Pki, other_pki: Pki) -> None:
    out, rx, _ = migrate_to(
        {"tls": pki.server_context()}, tls=pki.client_context(ca=other_pki.ca), mode="stopcopy", writer=False
    )
    assert isinstance(out, migcore.AuthenticationError), out
    assert isinstance(rx.error, migcore.AuthenticationError), rx.error


def test_client_certificate_from_another_ca_is_refused(pki: Pki, other_pki: Pki) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    ctx.load_cert_chain(other_pki.client_cert, other_pki.client_key)
    out, rx, _ = migrate_to({"tls": pki.server_context()}, tls=ctx, mode="stopcopy", writer=False)
    assert isinstance(out, migcore.AuthenticationError), out
    assert isinstance(rx.error, migcore.AuthenticationError), rx.error


def test_a_source_context_that_does_not_verify_is_refused_up_front() -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with pytest.raises(ValueError, match="CERT_REQUIRED"):
        migcore.migrate(bytearray(4096), "tcp://127.0.0.1:9", tls=ctx)


@pytest.mark.parametrize("mode", ["precopy", "hybrid"])
def test_token_with_a_live_writer(mode: str) -> None:
    out, rx, expected = migrate_to({"token": "correct horse"}, token="correct horse", mode=mode)
    assert_exact(out, rx, expected)


@pytest.mark.parametrize(
    ("listen_token", "token"),
    [("right", "wrong"), ("right", None), (None, "right")],
    ids=["wrong-token", "no-source-token", "no-destination-token"],
)
def test_token_mismatch_is_refused_on_both_ends_before_any_page(listen_token: str | None, token: str | None) -> None:
    allocated: list[int] = []
    from migcore import _destination

    real = _destination._allocate_region

    def spy(nbytes: int, page_size: int) -> migcore.Region:
        allocated.append(nbytes)
        return real(nbytes, page_size)

    mp = pytest.MonkeyPatch()
    mp.setattr(_destination, "_allocate_region", spy)
    try:
        out, rx, _ = migrate_to({"token": listen_token}, token=token, mode="stopcopy", writer=False)
    finally:
        mp.undo()
    assert isinstance(out, migcore.AuthenticationError), out
    assert isinstance(rx.error, migcore.AuthenticationError), rx.error
    assert allocated == []  # refused before HELLO was even read
    assert out.__class__ is migcore.AuthenticationError


def test_token_inside_tls_with_streams_and_compression(pki: Pki) -> None:
    """The combination: TLS + token + compression + 3 streams, each stream authenticated too."""
    out, rx, expected = migrate_to(
        {"tls": pki.server_context(), "token": b"\x00binary token"},
        tls=pki.client_context(),
        token=b"\x00binary token",
        compress="zstd",
        streams=3,
    )
    assert_exact(out, rx, expected)
    assert isinstance(out, migcore.MigrationStats) and out.streams == 3


def test_hmac_exchange_never_sends_the_token() -> None:
    """Record what the source sends in the exchange: the token's bytes never appear in it."""
    import socket
    import threading

    from migcore._transport import Connection

    token = b"a-very-recognisable-secret"
    a, b = socket.socketpair()
    sent: list[bytes] = []
    ca, cb = Connection(a, 5), Connection(b, 5)
    orig = ca.send_all

    def spy(data: Any, what: str) -> None:
        sent.append(bytes(data))
        orig(data, what)

    ca.send_all = spy  # type: ignore[method-assign]
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(_security.authenticate_destination(cb, token)))
    t.start()
    _security.authenticate_source(ca, token)
    t.join()
    assert result == [None]
    assert sent and all(token not in frame for frame in sent)
    assert all(P.decode_header(f[: P.HEADER_SIZE]).type is P.Frame.AUTH for f in sent)
    ca.close()
    cb.close()


def test_a_public_bind_without_authentication_is_refused() -> None:
    with pytest.raises(ValueError, match="insecure=True"):
        migcore.listen("tcp://0.0.0.0:0")
    with pytest.raises(ValueError, match="insecure=True"):
        migcore.listen("tcp://[::]:0")


def test_a_public_bind_is_allowed_with_a_token_or_insecure() -> None:
    # bound only: nothing is sent anywhere but loopback
    with migcore.listen("tcp://0.0.0.0:0", token="t") as listener:
        assert listener.address.startswith("tcp://0.0.0.0:")
    with migcore.listen("tcp://0.0.0.0:0", insecure=True) as listener:
        assert listener.address.startswith("tcp://0.0.0.0:")


def test_loopback_and_unix_need_no_authentication(tmp_path: Path) -> None:
    migcore.listen("tcp://127.0.0.1:0").close()
    migcore.listen("tcp://localhost:0").close()
    migcore.listen(f"unix://{tmp_path}/s").close()


def test_security_options_are_checked() -> None:
    with pytest.raises(ValueError, match="empty"):
        migcore.listen("tcp://127.0.0.1:0", token="")
    with pytest.raises(TypeError):
        migcore.listen("tcp://127.0.0.1:0", tls="not a context")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tls needs tcp"):
        migcore.migrate(bytearray(4096), "unix:///tmp/x", tls=ssl.create_default_context())


def test_cli_receive_refuses_a_public_bind_without_authentication() -> None:
    from migcore import cli

    assert cli.main(["receive", "tcp://0.0.0.0:0", "--timeout", "0.1"]) == 2


def test_cli_builds_tls_and_token_options(pki: Pki, tmp_path: Path) -> None:
    from migcore import cli
    from migcore.cli import common

    secret = tmp_path / "token"
    secret.write_bytes(b"from-a-file\n")
    secret.chmod(0o600)
    parser = cli.build_parser()
    args = parser.parse_args([
        "send", "/dev/null", "tcp://127.0.0.1:1", "--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key),
        "--tls-ca", str(pki.ca), "--token-file", str(secret), "--compress", "lz4", "--delta", "--streams", "3",
        "--bandwidth-limit", "50MiB/s",
    ])
    opts = common.migrate_options(args)
    assert opts["token"] == b"from-a-file" and opts["compress"] == "lz4" and opts["delta"] and opts["streams"] == 3
    assert opts["bandwidth_limit"] == 50 * MIB and isinstance(opts["tls"], ssl.SSLContext)
    args = parser.parse_args([
        "receive", "tcp://127.0.0.1:0", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
        "--tls-ca", str(pki.ca), "--token", "t",
    ])
    server = common.tls_context(args, server=True)
    assert server is not None and server.verify_mode == ssl.CERT_REQUIRED


def test_migrate_refuses_a_destination_off_this_host_without_authentication() -> None:
    from migcore.options import MigrationOptions

    buf = bytearray(4096)
    # refused before any connection: nothing is ever sent to these documentation addresses
    for call in (
        lambda: migcore.migrate(buf, "tcp://192.0.2.1:7100", mode="stopcopy"),
        lambda: migcore.start(buf, "tcp://[2001:db8::1]:7100"),
        lambda: migcore.recover(buf, "tcp://192.0.2.1:7100", "00" * 16),
    ):
        with pytest.raises(ValueError, match="refusing to migrate to .*without tls=.*insecure=True"):
            call()
    # what would let it through, checked without connecting
    MigrationOptions(token="t" * 20).validate("tcp://192.0.2.1:7100")
    MigrationOptions(tls=ssl.create_default_context()).validate("tcp://192.0.2.1:7100")
    MigrationOptions(insecure=True).validate("tcp://192.0.2.1:7100")
    MigrationOptions().validate("tcp://127.0.0.1:7100")
    with pytest.raises(TypeError, match="insecure"):
        MigrationOptions(insecure="yes").validate("tcp://192.0.2.1:7100")  # type: ignore[arg-type]


def test_a_tls_listener_that_verifies_nobody_counts_as_unauthenticated(pki: Pki) -> None:
    from migcore.options import ListenOptions

    lax = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    lax.load_cert_chain(pki.server_cert, pki.server_key)
    with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0"):
        migcore.listen("tcp://0.0.0.0:0", tls=lax)
    ListenOptions(tls=lax, token="t").validate("tcp://0.0.0.0:0")
    ListenOptions(tls=lax, insecure=True).validate("tcp://0.0.0.0:0")
    ListenOptions(tls=lax).validate("tcp://127.0.0.1:0")  # loopback: this host only
    strict = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    strict.load_cert_chain(pki.server_cert, pki.server_key)
    strict.verify_mode = ssl.CERT_REQUIRED
    strict.load_verify_locations(pki.ca)
    ListenOptions(tls=strict).validate("tcp://0.0.0.0:0")


def test_cli_refuses_a_token_file_other_users_can_read(tmp_path: Path) -> None:
    import subprocess
    import sys

    secret = tmp_path / "token"
    made = subprocess.run([sys.executable, "-m", "migcore", "token", "--out", str(secret)],
                          capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    assert secret.stat().st_mode & 0o777 == 0o600
    value = secret.read_text().strip()
    assert len(value) == 43 and value != secret.read_text() and "\n" not in value
    again = subprocess.run([sys.executable, "-m", "migcore", "token", "--out", str(secret)],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode != 0 and "exists" in again.stderr and secret.read_text().strip() == value
    printed = {subprocess.run([sys.executable, "-m", "migcore", "token"], capture_output=True, text=True,
                              timeout=60).stdout.strip() for _ in range(2)}
    assert len(printed) == 2 and all(len(p) == 43 for p in printed)  # fresh each time
    # a good file works end to end: a migration over loopback with it
    region = bytes(range(256)) * 64
    sent = tmp_path / "r.bin"
    sent.write_bytes(region)
    recv = subprocess.Popen(
        [sys.executable, "-m", "migcore", "receive", f"unix://{tmp_path / 's'}", "--out", str(tmp_path / "o.bin"),
         "--token-file", str(secret), "--timeout", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    send = subprocess.run(
        [sys.executable, "-m", "migcore", "send", str(sent), f"unix://{tmp_path / 's'}", "--token-file", str(secret),
         "--wait", "30", "--no-progress", "--mode", "stopcopy"], capture_output=True, text=True, timeout=90,
    )
    out, err = recv.communicate(timeout=60)
    assert send.returncode == 0 and recv.returncode == 0, send.stderr + err
    assert (tmp_path / "o.bin").read_bytes() == region
    secret.chmod(0o644)
    refused = subprocess.run(
        [sys.executable, "-m", "migcore", "send", str(sent), f"unix://{tmp_path / 's'}", "--token-file", str(secret),
         "--no-progress"], capture_output=True, text=True, timeout=60,
    )
    assert refused.returncode != 0
    assert "readable by other users (mode 0644)" in refused.stderr and "chmod 600" in refused.stderr
    assert "Traceback" not in refused.stderr
