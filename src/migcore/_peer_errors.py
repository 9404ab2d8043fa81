"""ERROR frames and exceptions, both ways: why one side gave up becomes the same exception on the other."""

from __future__ import annotations

from migcore import _protocol as P
from migcore._errors import (
    AuthenticationError,
    CompatibilityError,
    MigrationCancelled,
    MigrationError,
    MigrationTimeout,
    PeerLostError,
    ProtocolError,
    VerificationError,
)

#: Exception classes by the ERROR code that carries them (anything else: INTERNAL).
_BY_CODE: dict[P.ErrorCode, type[MigrationError]] = {
    P.ErrorCode.VERIFICATION: VerificationError,
    P.ErrorCode.PROTOCOL: ProtocolError,
    P.ErrorCode.TIMEOUT: MigrationTimeout,
    P.ErrorCode.COMPATIBILITY: CompatibilityError,
    P.ErrorCode.AUTHENTICATION: AuthenticationError,
}


def error_from_peer(code: P.ErrorCode, message: str, who: str) -> MigrationError:
    """The exception that mirrors an ERROR frame from the peer."""
    return _BY_CODE.get(code, MigrationError)(f"{who} reported: {message}")


def error_frame_for(exc: BaseException, who: str = "destination") -> bytes | None:
    """The ERROR frame that tells the peer why this side gave up (None: nothing to say, just close)."""
    if isinstance(exc, (PeerLostError, MigrationCancelled)):
        return None
    for code, cls in _BY_CODE.items():
        if cls is not CompatibilityError and isinstance(exc, cls):
            return P.encode_error(code, str(exc))
    return P.encode_error(P.ErrorCode.INTERNAL, f"{who} failed: {exc!r}")
