"""The benchmark suite: the classic live-migration experiments, reproducible, with tables and plots.

``migcore bench`` (and ``make bench``) runs a grid of migrations over region
size, dirty rate, write pattern, mode and the options this migcore has, each
to a listener on loopback in a separate process while a workload writes the
source. It records times, downtime, rounds, bytes on the wire, demand-fault
latency, CPU time and peak memory of each side, and checks every result
byte for byte; baselines from the same run (bare ``sendall``, one xxh3 pass,
the naive ``bytes()`` + ``sendall``) turn the figures into ratios.

Modules, one job each: ``_grid`` (the scenarios), ``destination`` (the
destination process), ``_runs`` (the source side of one measurement),
``_resources`` (CPU and RSS), ``_machine`` (the machine description),
``_targets`` (the PASS/FAIL checks), ``_report`` (files, tables, Markdown),
``_plots`` (PNG plots), ``_suite`` (one whole run) and ``workload`` (the
live writer that plays the running program). Sizes and rates arrive as
numbers: parsing what a person typed is the command line's job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from migcore.bench._grid import Rate
    from migcore.bench._suite import BenchConfig, run_bench

__all__ = ["BenchConfig", "Rate", "run_bench"]


def __getattr__(name: str) -> Any:
    # lazy, so the destination process does not import the whole suite (rich, plots)
    if name in __all__:
        from migcore.bench import _suite

        return getattr(_suite, name)
    raise AttributeError(f"module 'migcore.bench' has no attribute {name!r}")
