"""migcore: live-migrate a running program's memory to another host with a millisecond pause."""

from migcore._api import Listener, Received, listen, migrate, recover
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
from migcore._migration import Migration, start
from migcore._region import Region
from migcore._stats import MigrationStats

__all__ = [
    "AuthenticationError",
    "CompatibilityError",
    "Listener",
    "Migration",
    "MigrationCancelled",
    "MigrationError",
    "MigrationStats",
    "MigrationTimeout",
    "PeerLostError",
    "ProtocolError",
    "Received",
    "Region",
    "VerificationError",
    "listen",
    "migrate",
    "recover",
    "start",
]
__version__ = "0.1.0"
