"""Migration modes (issue 4): compression, delta encoding, parallel streams, bandwidth limit, TLS.

Run with::

    .venv/bin/python -m pytest benchmarks/bench_modes.py --benchmark-only -o python_files='bench_*.py' -s

Each benchmark prints its figures (``-s`` shows them) and stores them in
``extra_info``; the pairs measured in one run (streams vs one connection, TLS
vs plain TCP) go through ``compare`` so the summary prints their ratios. All
traffic stays on loopback.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import migcore
from migcore import _codecs
from migcore.bench.workload import Workload, fill

log = logging.getLogger("migcore.bench")

MIB = 1 << 20
PAGE = 4096
BATCH = 8 * MIB


def pages(kind: str, nbytes: int = BATCH) -> bytes:
    """8 MiB of pages: random, half of each page zero, or text-like."""
    rng = np.random.default_rng(0)
    if kind == "random":
        return rng.bytes(nbytes)
    if kind == "half-zero":
        arr = np.frombuffer(bytearray(rng.bytes(nbytes)), np.uint8).reshape(-1, PAGE).copy()
        arr[:, PAGE // 2 :] = 0
        return arr.tobytes()
    words = np.array(b"migration page region dirty round source destination the of and to in a is".split())
    text = b" ".join(rng.choice(words, nbytes // 5).tolist())
    return text[:nbytes].ljust(nbytes, b" ")


def report(name: str, **figures: Any) -> None:
    line = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\n[bench_modes] {name}: {line}")  # noqa: T201 - a benchmark's output is its figures


@pytest.mark.parametrize("kind", ["random", "half-zero", "text"])
@pytest.mark.parametrize("codec", ["zstd", "lz4"])
def test_compression(benchmark: Any, codec: str, kind: str) -> None:
    benchmark.group = f"compress {kind}"
    c = _codecs.get_codec(codec)
    data = pages(kind)
    packed = benchmark.pedantic(lambda: _codecs.pack(c, data), rounds=5, warmup_rounds=1)
    size = len(packed) if packed is not None else len(data)
    t0 = time.perf_counter()
    if packed is not None:
        _codecs.unpack(c, packed, len(data), exact=True)
    decode = time.perf_counter() - t0
    encode = benchmark.stats.stats.median if getattr(benchmark, "stats", None) else 0.0
    ratio = len(data) / size
    benchmark.extra_info.update(ratio=round(ratio, 2), raw=packed is None)
    report(
        f"compress {codec} {kind}", ratio=ratio, sent_raw=packed is None,
        compress_MiB_s=(len(data) / MIB / encode) if encode else 0.0, decompress_MiB_s=len(data) / MIB / max(decode, 1e-9),
    )


def migrate_once(
    region: migcore.Region,
    *,
    listen_kw: dict[str, Any] | None = None,
    pause: Callable[[], object] | None = None,
    **kw: Any,
) -> migcore.MigrationStats:
    with migcore.listen("tcp://127.0.0.1:0", timeout=60, **(listen_kw or {})) as listener:
        got: list[migcore.Received] = []
        t = threading.Thread(target=lambda: got.append(listener.receive()), daemon=True)
        t.start()
        stats = migcore.migrate(region, listener.address, timeout=60, pause=pause, **kw)
        t.join(60)
    assert got and got[0].stats.verified
    return stats


@pytest.fixture(scope="module")
def region64() -> migcore.Region:
    region = migcore.Region.allocate(64 * MIB)
    fill(region, random_fraction=1.0, seed=1)
    return region


def test_delta_on_a_hot_set(benchmark: Any) -> None:
    """Pre-copy of a region whose hot set keeps changing a little: bytes saved by XBZRLE."""
    benchmark.group = "delta hotset"
    results: dict[bool, migcore.MigrationStats] = {}

    def run(delta: bool) -> None:
        region = migcore.Region.allocate(32 * MIB)
        fill(region, random_fraction=1.0, seed=2)
        work = Workload(region, dirty_rate=64 * MIB, pattern="hotset", hotset_fraction=0.05, seed=3, write_bytes=64)
        with work:
            time.sleep(0.05)
            results[delta] = migrate_once(
                region, pause=work.pause, delta=delta, max_rounds=8, downtime_limit=0.0, tracker="hash",
            )

    benchmark.pedantic(lambda: run(True), rounds=1, iterations=1)
    run(False)
    on, off = results[True], results[False]
    per_round_on = on.transferred_bytes / max(on.rounds, 1)
    per_round_off = off.transferred_bytes / max(off.rounds, 1)
    benchmark.extra_info.update(saved_MiB=round(on.delta_bytes_saved / MIB, 1), hits=on.delta_hits)
    report(
        "delta hotset 32 MiB", delta_hits=on.delta_hits, delta_misses=on.delta_misses, overflow=on.delta_overflow,
        saved_MiB=on.delta_bytes_saved / MIB, bytes_per_round_delta_MiB=per_round_on / MIB,
        bytes_per_round_plain_MiB=per_round_off / MIB, rounds_delta=on.rounds, rounds_plain=off.rounds,
    )


def test_streams(benchmark: Any, compare: Callable[..., object], region64: migcore.Region) -> None:
    """Stop-and-copy of 64 MiB with 1, 2 and 4 page connections."""
    benchmark.group = "streams"
    figures: dict[int, float] = {}

    def timed(n: int) -> Callable[[], None]:
        def run() -> None:
            t0 = time.perf_counter()
            migrate_once(region64, mode="stopcopy", streams=n)
            figures[n] = 64 / (time.perf_counter() - t0)

        return run

    compare(benchmark, "streams=4", timed(4), {"streams=1": timed(1), "streams=2": timed(2)}, rounds=3, nbytes=64 * MIB)
    report("streams 64 MiB stop-and-copy (MiB/s, last round)", **{f"streams_{k}": v for k, v in sorted(figures.items())})


def test_bandwidth_limit(benchmark: Any, region64: migcore.Region) -> None:
    """Measured page throughput under a 200 MiB/s cap: within 10% of the limit."""
    benchmark.group = "bandwidth"
    limit = 200 * MIB
    out: list[migcore.MigrationStats] = []
    benchmark.pedantic(lambda: out.append(migrate_once(region64, mode="stopcopy", bandwidth_limit=limit)), rounds=1)
    stats = out[-1]
    # the page phase: setup, verification and the state are not traffic the bucket governs
    elapsed = stats.total_time - stats.setup_time
    measured = stats.transferred_bytes / elapsed
    error = measured / limit - 1
    benchmark.extra_info.update(measured_MiB_s=round(measured / MIB, 1), error=round(error, 3))
    report("bandwidth limit 200 MiB/s", measured_MiB_s=measured / MIB, off_by=error, held_back_s=stats.bandwidth_wait)
    assert abs(error) <= 0.10, f"measured {measured / MIB:.1f} MiB/s under a limit of {limit / MIB:.0f} MiB/s"


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _certs import make_pki

    pki = make_pki(tmp_path_factory.mktemp("pki"))
    return pki.server_context(), pki.client_context()


def test_tls_vs_plain(
    benchmark: Any, compare: Callable[..., object], region64: migcore.Region, tls_pair: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    """Stop-and-copy of 64 MiB over TLS 1.3 (mutual auth) against plain TCP."""
    benchmark.group = "tls"
    server, client = tls_pair
    figures: dict[str, float] = {}

    def run(tls: bool) -> Callable[[], None]:
        def go() -> None:
            t0 = time.perf_counter()
            if tls:
                migrate_once(region64, mode="stopcopy", tls=client, listen_kw={"tls": server})
            else:
                migrate_once(region64, mode="stopcopy")
            figures["tls" if tls else "plain"] = 64 / (time.perf_counter() - t0)

        return go

    compare(benchmark, "tls", run(True), {"plain_tcp": run(False)}, rounds=3, nbytes=64 * MIB)
    report("TLS vs plain 64 MiB stop-and-copy (MiB/s)", **figures)
