"""The names of modes, trackers, codecs and stall policies, defined once.

Each is a ``Literal`` type, so a misspelt option fails ``mypy --strict`` in
user code, and a tuple derived from it for run-time checks, the CLI's
choices and the wire. The order of each tuple is its numbering in HELLO:
append new names, never reorder.
This module imports nothing from migcore so every layer may use it.
"""

from __future__ import annotations

from typing import Literal, get_args

Mode = Literal["stopcopy", "precopy", "postcopy", "hybrid"]
MODES: tuple[Mode, ...] = get_args(Mode)

Tracker = Literal["hash", "writes", "uffd"]
TRACKERS: tuple[Tracker, ...] = get_args(Tracker)
#: What ``tracker=`` accepts: a tracker, or "auto" (uffd where the kernel and region allow it, else hash).
TrackerChoice = Literal["auto", Tracker]
TRACKER_CHOICES: tuple[TrackerChoice, ...] = get_args(TrackerChoice)

Codec = Literal["zstd", "lz4"]
CODECS: tuple[Codec, ...] = get_args(Codec)

OnStall = Literal["finish", "postcopy", "throttle", "cancel"]
ON_STALL: tuple[OnStall, ...] = get_args(OnStall)
