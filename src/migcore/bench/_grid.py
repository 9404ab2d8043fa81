"""The scenario grids: which migrations the suite runs (quick, default, full, or chosen on the command line)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from migcore.options import CODECS, MODES, MigrationOptions, Mode

MIB = 1 << 20
GIB = 1 << 30

#: Per fill: the share of random (non-zero) pages, and whether the zero pages are written (backed by
#: memory) rather than left untouched (no memory behind them, as in a partly used allocation).
FILLS: dict[str, tuple[float, bool]] = {"random": (1.0, False), "sparse": (0.1, False), "sparse-written": (0.1, True)}

#: Dirty rates of the main sweep, as fractions of the measured bare-socket bandwidth.
DEFAULT_RATES: tuple[float, ...] = (0.0, 0.05, 0.1, 0.25, 0.45, 1.0, 2.0)
QUICK_RATES: tuple[float, ...] = (0.0, 0.25, 1.0)

#: migrate() options the suite exercises when this migcore has them, with the value to try.
OPTIONAL_OPTIONS: dict[str, Any] = {
    "compress": True,
    "delta": True,
    "streams": 2,
    "bandwidth_limit": None,  # resolved to half the bare-socket bandwidth at run time
}


@dataclass(frozen=True)
class Rate:
    """A dirty rate: a fraction of the measured bare-socket bandwidth, or bytes per second."""

    fraction: float | None = None
    absolute: float | None = None

    def resolve(self, bandwidth: float) -> float:
        if self.absolute is not None:
            return self.absolute
        return (self.fraction or 0.0) * bandwidth

    @property
    def label(self) -> str:
        if self.absolute is not None:
            return f"{self.absolute / MIB:g}MiB/s"
        return f"{self.fraction:g}xbw"


@dataclass(frozen=True)
class Scenario:
    """One migration to run: region size and fill, mode, workload pattern and rate, extra options."""

    size: int
    mode: Mode
    rate: Rate = Rate(0.0)
    pattern: str = "uniform"
    fill: str = "random"
    options: tuple[tuple[str, Any], ...] = ()
    tags: tuple[str, ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        opts = "".join(f"+{k}" for k, _ in self.options)
        return f"{self.mode}-{self.size // MIB}MiB-{self.fill}-{self.pattern}-{self.rate.label}{opts}"


#: The options of a migration, by name (``migrate()`` takes each as a keyword).
_FIELDS = {f.name: f for f in dataclasses.fields(MigrationOptions)}


def available_options() -> list[str]:
    """The options of :data:`OPTIONAL_OPTIONS` that this migcore's ``migrate()`` takes."""
    return [name for name in OPTIONAL_OPTIONS if name in _FIELDS]


def option_value(name: str, bandwidth: float) -> Any:
    """A value to exercise option ``name`` with, chosen from its default and type."""
    if name == "bandwidth_limit":
        return int(bandwidth / 2)
    if name == "compress":
        from migcore import _codecs

        return next((codec for codec in CODECS if _codecs.available(codec)), CODECS[0])
    default = _FIELDS[name].default
    if isinstance(default, bool):
        return True
    if isinstance(default, int):
        return max(2, default)
    choices = _literal_choices(typing.get_type_hints(MigrationOptions)[name])
    if choices:
        return choices[0]
    return OPTIONAL_OPTIONS[name]


def _literal_choices(hint: Any) -> list[Any]:
    """The values a ``Literal`` type (or a union holding them) allows, in order."""
    if typing.get_origin(hint) is Literal:
        return list(typing.get_args(hint))
    return [value for arg in typing.get_args(hint) for value in _literal_choices(arg)]


def _sweep(
    sizes: Sequence[int], modes: Sequence[Mode], rates: Sequence[Rate], patterns: Sequence[str]
) -> list[Scenario]:
    out: list[Scenario] = []
    for size in sizes:
        for pattern in patterns:
            for rate in rates:
                for mode in modes:
                    out.append(Scenario(size=size, mode=mode, rate=rate, pattern=pattern, tags=("sweep",)))
    return out


def build_grid(
    profile: str,
    *,
    sizes: Sequence[int] | None = None,
    modes: Sequence[Mode] | None = None,
    rates: Sequence[Rate] | None = None,
    options: Iterable[str] = (),
) -> list[Scenario]:
    """The scenarios of ``profile`` (``quick``, ``default`` or ``full``), narrowed by the given choices."""
    modes = tuple(modes or MODES)
    main = tuple(sizes or ((64 * MIB,) if profile == "quick" else (256 * MIB,)))
    rate_list = tuple(rates or [Rate(f) for f in (QUICK_RATES if profile == "quick" else DEFAULT_RATES)])
    grid: list[Scenario] = []
    if profile == "quick":
        grid += [Scenario(main[0], "stopcopy", tags=("stopcopy-random",))]
        grid += [Scenario(main[0], "stopcopy", fill="sparse", tags=("stopcopy-sparse",))]
        grid += [Scenario(main[0], "precopy", rate=r, tags=("sweep",)) for r in rate_list if (r.fraction or 0) > 0][:1]
        grid += [Scenario(main[0], "hybrid", rate=rate_list[-1], tags=("sweep",))]
        scaling = sorted({main[0], 4 * main[0]})
        grid += [Scenario(s, "postcopy", tags=("postcopy-scaling",)) for s in scaling]
        grid += [Scenario(main[0], "postcopy", fill="sparse", tags=("postcopy-sparse",))]
    else:
        grid += _sweep(main, modes, rate_list, ("uniform",))
        for pattern in ("hotset", "sequential"):
            grid += [
                Scenario(main[0], mode, rate=Rate(f), pattern=pattern, tags=("patterns",))
                for f in (0.25, 1.0)
                for mode in ("precopy", "hybrid")
            ]
        grid += [Scenario(main[0], m, fill="sparse", tags=(f"{m}-sparse",)) for m in ("stopcopy", "precopy", "postcopy")]
        # the same zeros, written: every page has memory behind it, so the zero scan must read them all
        grid += [Scenario(main[0], "stopcopy", fill="sparse-written", tags=("stopcopy-sparse-written",))]
        scaling = [64 * MIB, 256 * MIB, GIB] + ([2 * GIB, 4 * GIB] if profile == "full" else [])
        for s in scaling:
            for m in ("stopcopy", "postcopy"):
                grid.append(Scenario(s, m, tags=("postcopy-scaling" if m == "postcopy" else "stopcopy-random",)))
            if s > main[0]:
                grid.append(Scenario(s, "precopy", rate=Rate(0.25), tags=("sweep-large",)))
    for opt in options:
        o = ((opt, "auto"),)
        precopy = [Scenario(main[0], "precopy", rate=Rate(0.25), options=o, tags=("options",))]
        if opt == "delta":  # delta needs pages sent twice: pre-copy rounds under a hot set
            precopy.append(Scenario(main[0], "precopy", rate=Rate(1.0), pattern="hotset", options=o, tags=("options",)))
            grid += precopy[: 1 if profile == "quick" else 2]
            continue
        stopcopy = [
            Scenario(main[0], "stopcopy", options=o, tags=("options",)),
            Scenario(main[0], "stopcopy", fill="sparse", options=o, tags=("options",)),
        ]
        grid += stopcopy[:1] if profile == "quick" else stopcopy + precopy
    # the targets need stop-and-copy of random and sparse data at the main size
    if not any(s.mode == "stopcopy" and s.rate == Rate(0.0) and s.fill == "random" and not s.options for s in grid):
        grid.insert(0, Scenario(main[0], "stopcopy", tags=("stopcopy-random",)))
    grid = [s for s in grid if s.mode in modes]
    unique: dict[Scenario, Scenario] = {}
    for sc in grid:  # one run per scenario; a duplicate adds its tags (which targets it serves)
        prev = unique.get(sc)
        tags = sc.tags if prev is None else tuple(dict.fromkeys(prev.tags + sc.tags))
        unique[sc] = dataclasses.replace(prev or sc, tags=tags)
    return list(unique.values())
