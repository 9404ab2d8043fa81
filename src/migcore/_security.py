"""Who is on the other end: TLS on the socket, a shared-token HMAC exchange, and the loopback rule.

The token exchange runs before HELLO (and before STREAM on extra
connections), inside TLS when there is TLS, and proves the token both ways
without sending it::

    S AUTH 1  ns                      (32 random bytes)
    D AUTH 2  nd + HMAC(token, "migcore destination" | ns | nd)
    S AUTH 3  HMAC(token, "migcore source" | ns | nd)
    D AUTH 4  (empty: accepted)

Each side checks the other's MAC with ``hmac.compare_digest``; a wrong or
missing token ends the exchange with an ERROR (code AUTHENTICATION) and an
:class:`AuthenticationError` on both sides, before any page moves. The two
labels differ, so a MAC one side sends can never be replayed as the other's.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import ssl

from migcore import _protocol as P
from migcore._errors import AuthenticationError, MigrationError, ProtocolError
from migcore._transport import Connection

_LABEL_D = b"migcore destination"
_LABEL_S = b"migcore source"


def check_token(token: str | bytes | None) -> bytes | None:
    """The token as bytes (UTF-8 for a str); an empty one is refused, it would prove nothing."""
    if token is None:
        return None
    if isinstance(token, str):
        token = token.encode()
    if not isinstance(token, (bytes, bytearray)):
        raise TypeError(f"token must be a str or bytes, not {type(token).__name__}")
    if not token:
        raise ValueError("token must not be empty")
    return bytes(token)


def check_tls(tls: ssl.SSLContext | None, *, server: bool) -> ssl.SSLContext | None:
    """Refuse a context that could not authenticate the peer it is meant to check."""
    if tls is None:
        return None
    if not isinstance(tls, ssl.SSLContext):
        raise TypeError(f"tls must be an ssl.SSLContext, not {type(tls).__name__}")
    if not server and (tls.verify_mode != ssl.CERT_REQUIRED or not tls.check_hostname):
        raise ValueError(
            "the source's tls context must verify the destination: verify_mode=CERT_REQUIRED and check_hostname=True "
            "(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=...) does both)"
        )
    return tls


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _mac(token: bytes, label: bytes, ns: bytes, nd: bytes) -> bytes:
    return hmac.new(token, label + ns + nd, hashlib.sha256).digest()


def _read(conn: Connection, what: str) -> tuple[P.Header, bytes]:
    header = P.decode_header(conn.recv_exact(P.HEADER_SIZE, what))
    body = bytes(conn.recv_exact(P.check_length(header, P.MAX_CONTROL_BODY), what))
    return header, body


def _refuse(conn: Connection, message: str) -> AuthenticationError:
    conn.abort_soon(P.encode_error(P.ErrorCode.AUTHENTICATION, message))
    return AuthenticationError(message)


def _peer_error(header: P.Header, body: bytes, who: str) -> MigrationError:
    code, message = P.decode_error(body)
    if code is P.ErrorCode.AUTHENTICATION:
        return AuthenticationError(f"{who} refused: {message}")
    return ProtocolError(f"{who} reported during authentication: {message}")


def authenticate_source(conn: Connection, token: bytes) -> None:
    """The source's side of the exchange; returns once the destination accepted the proof."""
    ns = os.urandom(P.AUTH_SIZE)
    conn.send_all(P.encode_auth(1, ns), "sending AUTH")
    header, body = _read(conn, "waiting for the destination's AUTH")
    if header.type is P.Frame.ERROR:
        raise _peer_error(header, body, "the destination")
    if header.type is not P.Frame.AUTH or header.count != 2 or len(body) != 2 * P.AUTH_SIZE:
        raise _refuse(conn, f"expected AUTH 2 from the destination, got {header.name} {header.count}")
    nd, mac_d = body[: P.AUTH_SIZE], body[P.AUTH_SIZE :]
    if not hmac.compare_digest(mac_d, _mac(token, _LABEL_D, ns, nd)):
        raise _refuse(conn, "the destination could not prove it holds the token")
    conn.send_all(P.encode_auth(3, _mac(token, _LABEL_S, ns, nd)), "sending AUTH")
    header, body = _read(conn, "waiting for the destination to accept the token")
    if header.type is P.Frame.ERROR:
        raise _peer_error(header, body, "the destination")
    if header.type is not P.Frame.AUTH or header.count != 4 or body:
        raise _refuse(conn, f"expected AUTH 4 from the destination, got {header.name} {header.count}")


def authenticate_destination(conn: Connection, token: bytes | None) -> P.Header | None:
    """The destination's side; returns the first non-AUTH header already read when there is no token.

    With a token, a source that does not start with AUTH is refused; without
    one, a source that does is refused too (the two ends disagree on security).
    """
    header = P.decode_header(conn.recv_exact(P.HEADER_SIZE, "waiting for the source"))
    if token is None:
        if header.type is P.Frame.AUTH:
            conn.recv_exact(P.check_length(header, P.MAX_CONTROL_BODY), "reading AUTH")
            raise _refuse(conn, "the source offers a token but this destination has none")
        return header
    if header.type is not P.Frame.AUTH:
        if header.length <= P.MAX_CONTROL_BODY:  # drain it, so the source reads our ERROR, not a reset
            conn.recv_exact(header.length, "reading the source's first frame")
        raise _refuse(conn, "this destination requires a token; the source sent none")
    body = bytes(conn.recv_exact(P.check_length(header, P.MAX_CONTROL_BODY), "reading AUTH"))
    if header.count != 1 or len(body) != P.AUTH_SIZE:
        raise _refuse(conn, f"malformed AUTH {header.count} from the source")
    ns, nd = body, os.urandom(P.AUTH_SIZE)
    conn.send_all(P.encode_auth(2, nd + _mac(token, _LABEL_D, ns, nd)), "sending AUTH")
    header, body = _read(conn, "waiting for the source's AUTH")
    if header.type is P.Frame.ERROR:
        raise _peer_error(header, body, "the source")
    if header.type is not P.Frame.AUTH or header.count != 3 or len(body) != P.AUTH_SIZE:
        raise _refuse(conn, f"expected AUTH 3 from the source, got {header.name} {header.count}")
    if not hmac.compare_digest(body, _mac(token, _LABEL_S, ns, nd)):
        raise _refuse(conn, "wrong token: the source could not prove it holds the token")
    conn.send_all(P.encode_auth(4, b""), "sending AUTH")
    return None
