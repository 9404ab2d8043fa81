"""migcore: live-migrate a running program's memory to another host with a millisecond pause."""

from migcore._region import Region

__all__ = ["Region"]
__version__ = "0.1.0"
