"""The source side of each measurement: baselines and migrations, run in the bench process.

The destination lives in another process (:mod:`migcore.bench.destination`),
started once per suite with the ``spawn`` method and driven over a pipe.
"""

from __future__ import annotations

import logging
import multiprocessing
import socket
import struct
import time
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import TracebackType
from typing import Any

import numpy as np
import xxhash

import migcore
from migcore import _kernels
from migcore.bench import workload as _workload
from migcore._region import Region, new_bitmap
from migcore.bench import _resources
from migcore.bench._grid import FILLS, Scenario, option_value
from migcore.bench.destination import serve

log = logging.getLogger("migcore.bench")

#: Longest wait for one migration (and for the destination's answer).
TIMEOUT = 180.0
STATE = b"migcore-bench-state" * 64


class DestinationProcess:
    """The destination process: a listener and a plain socket on loopback, one command at a time."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        self._proc: BaseProcess = ctx.Process(target=serve, args=(child,), name="migcore-bench-destination", daemon=True)
        self._proc.start()
        child.close()
        if not self._pipe.poll(60):
            raise RuntimeError("the bench destination process did not start within 60 s")
        addresses: dict[str, Any] = self._pipe.recv()
        self.listener: str = addresses["listener"]
        self.plain: tuple[str, int] = (addresses["plain"][0], int(addresses["plain"][1]))

    @property
    def pipe(self) -> Connection:
        return self._pipe

    def request(self, cmd: dict[str, Any]) -> None:
        self._pipe.send(cmd)

    def result(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if not self._pipe.poll(timeout):
            raise TimeoutError(f"the bench destination did not answer within {timeout:g} s")
        answer: dict[str, Any] = self._pipe.recv()
        return answer

    def close(self) -> None:
        try:
            self._pipe.send({"op": "quit"})
        except (BrokenPipeError, OSError):
            pass
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._pipe.close()

    def __enter__(self) -> DestinationProcess:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def prepare_region(size: int, fill: str, seed: int) -> Region:
    """A fresh region of ``size`` bytes, filled per ``fill`` (``random``: every page, ``sparse*``: 10%)."""
    region = Region.allocate(size)
    fraction, write_zeros = FILLS[fill]
    _workload.fill(region, random_fraction=fraction, seed=seed, write_zeros=write_zeros)
    return region


def release(region: Region) -> None:
    """Give the region's memory back now, so the next measurement starts from a clean RSS."""
    mapping = region._mapping
    try:
        region.view.release()
        if mapping is not None:
            mapping.close()
    except BufferError:
        pass


#: Seconds to let the machine settle after giving back a region, per GiB (the kernel frees and
#: reclaims behind our back; the next run's millisecond downtimes should not pay for it).
SETTLE_PER_GIB = 0.5


def settle(nbytes: int) -> None:
    """Wait a moment after releasing ``nbytes`` on both sides, in proportion to their size."""
    time.sleep(min(3.0, SETTLE_PER_GIB * nbytes / (1 << 30)))


def page_table(region: Region) -> np.ndarray[Any, np.dtype[np.uint64]]:
    table = np.empty(region.npages, dtype=np.uint64)
    _kernels.hash_pages(region.view, region.page_size, table)
    return table


def nonzero_pages(region: Region) -> int:
    zeros = new_bitmap(region.npages)
    return region.npages - int(_kernels.zero_pages(region.view, region.page_size, zeros))


# -- baselines -------------------------------------------------------------------


def _plain_send(dest: DestinationProcess, op: str, region: Region) -> dict[str, Any]:
    """Send the region over a plain socket (``bare``: sendall from the buffer; ``naive``: ``bytes()`` first)."""
    dest.request({"op": op, "nbytes": region.nbytes})
    _resources.reset_peak()
    base = _resources.rss()
    cpu0 = _resources.cpu_time()
    with socket.create_connection(dest.plain, timeout=TIMEOUT) as sock:
        t0 = time.perf_counter()
        if op == "naive":
            data = bytes(region.view)  # what a user without migcore would do during the pause
            sock.sendall(struct.pack("<Q", len(data)))
            sock.sendall(data)
            del data
        else:
            sock.sendall(region.view)
        if sock.recv(1) != b"k":
            raise ConnectionError("the bench destination did not acknowledge")
        elapsed = time.perf_counter() - t0
    cpu = _resources.cpu_time() - cpu0
    peak = _resources.peak_rss()
    answer = dest.result()
    if not answer.get("ok"):
        raise RuntimeError(f"bench destination: {answer.get('error')}")
    return {
        "time": elapsed,
        "throughput": region.nbytes / elapsed,
        "src_cpu": cpu,
        "dst_cpu": answer["cpu"],
        "src_peak_rss": peak,
        "src_base_rss": base,
        "dst_peak_rss": answer["peak_rss"],
        "dst_base_rss": answer["base_rss"],
    }


def run_baselines(dest: DestinationProcess, size: int, seed: int, *, repeat: int = 3) -> list[dict[str, Any]]:
    """Bare ``sendall``, one ``xxh3_64`` pass and the naive ``bytes()`` + ``sendall``, on random data.

    The bare send and the hash pass are repeated and the best run kept (the
    ceiling is what the machine can do); the naive way runs once.
    """
    region = prepare_region(size, "random", seed)
    rows: list[dict[str, Any]] = []
    try:
        best: dict[str, Any] | None = None
        for _ in range(repeat):
            r = _plain_send(dest, "bare", region)
            if best is None or r["time"] < best["time"]:
                best = r
        assert best is not None
        rows.append({"baseline": "bare_sendall", "size": size, **best})
        times = []
        for _ in range(repeat):
            cpu0 = _resources.cpu_time()
            t0 = time.perf_counter()
            xxhash.xxh3_64_intdigest(region.view)
            times.append((time.perf_counter() - t0, _resources.cpu_time() - cpu0))
        t, c = min(times)
        rows.append({"baseline": "xxh3_pass", "size": size, "time": t, "throughput": size / t, "src_cpu": c})
        rows.append({"baseline": "naive_bytes_sendall", "size": size, **_plain_send(dest, "naive", region)})
    finally:
        release(region)
    for row in rows:
        log.info("baseline %s %d MiB: %.3f s, %.2f GB/s", row["baseline"], size >> 20, row["time"], row["throughput"] / 1e9)
    return rows


# -- migrations ------------------------------------------------------------------


def _await_destination(dest: DestinationProcess, *, failed: bool) -> dict[str, Any]:
    """The destination's answer; after a failure that may have come before the source connected,
    poke the listener with an empty connection so the destination stops waiting."""
    if failed and not dest.pipe.poll(5.0):
        host, port = dest.listener.removeprefix("tcp://").rsplit(":", 1)
        with socket.create_connection((host.strip("[]"), int(port)), timeout=10):
            pass
    return dest.result()


def _scenario_fields(scenario: Scenario, rate: float, bandwidth: float, options: dict[str, Any]) -> dict[str, Any]:
    """What a result row says about the run it describes, before it runs."""
    return {
        "scenario": scenario.name,
        "size": scenario.size,
        "fill": scenario.fill,
        "mode": scenario.mode,
        "pattern": scenario.pattern,
        "rate_fraction": scenario.rate.fraction if scenario.rate.absolute is None else rate / bandwidth,
        "target_rate": rate,
        "options": options,
        "tags": list(scenario.tags),
        "bare_bandwidth": bandwidth,
        "started_at": time.time(),
    }


def _paired_baseline(dest: DestinationProcess, size: int) -> float:
    """A bare send of ``size`` bytes from a region of its own (freed before the migration starts)."""
    other = Region.allocate(size)
    try:
        other.array().fill(0xA5)  # backed by memory, like the data sent by the baselines
        return float(_plain_send(dest, "bare", other)["throughput"])
    finally:
        release(other)


def _stats_fields(stats: migcore.MigrationStats | None, size: int, paired_bare: float | None) -> dict[str, Any]:
    """The source's figures of one run (NaN or zero where the migration failed)."""
    nan = float("nan")
    return {
        "engine_verified": bool(stats and stats.verified),
        "total_time": stats.total_time if stats else nan,
        "downtime": stats.downtime if stats else nan,
        "setup_time": stats.setup_time if stats else nan,
        "rounds": stats.rounds if stats else 0,
        "transferred_bytes": stats.transferred_bytes if stats else 0,
        "wire_ratio": stats.transferred_bytes / size if stats else nan,
        "normal_pages": stats.normal_pages if stats else 0,
        "zero_pages": stats.zero_pages if stats else 0,
        "postcopy_pages": stats.postcopy_pages if stats else 0,
        "postcopy_requests": stats.postcopy_requests if stats else 0,
        "pages_per_round": list(stats.pages_per_round) if stats else [],
        "throughput": size / stats.total_time if stats else nan,
        "paired_ratio": size / stats.total_time / paired_bare if stats and paired_bare else nan,
    }


def _destination_fields(answer: dict[str, Any]) -> dict[str, Any]:
    """The destination process's figures of one run: CPU, memory, completion, post-copy fault latencies."""
    faults = sorted(answer.get("faults", []))
    return {
        "dst_cpu": answer.get("cpu", float("nan")),
        "dst_peak_rss": answer.get("peak_rss", 0),
        "dst_base_rss": answer.get("base_rss", 0),
        "dst_overhead_rss": answer.get("peak_rss", 0) - answer.get("base_rss", 0),
        "dst_complete_time": answer.get("complete_time", float("nan")),
        "faults": len(faults),
        "fault_hits": answer.get("fault_hits", 0),
        "fault_p50": float(np.percentile(faults, 50)) if faults else float("nan"),
        "fault_p99": float(np.percentile(faults, 99)) if faults else float("nan"),
        "fault_latencies": faults,
    }


def run_scenario(
    dest: DestinationProcess,
    scenario: Scenario,
    *,
    bandwidth: float,
    seed: int,
    warmup: float,
    fault_samples: int,
    paired: bool = False,
) -> dict[str, Any]:
    """Migrate a live region per ``scenario`` to the destination process; one result row.

    With ``paired``, a bare ``sendall`` of as many bytes (from a region of its
    own, freed before the migration starts) runs just before it, so the row
    also holds a ratio to a baseline taken a moment apart (``paired_ratio``).
    """
    rate = scenario.rate.resolve(bandwidth)
    options = {k: option_value(k, bandwidth) if v == "auto" else v for k, v in scenario.options}
    row = _scenario_fields(scenario, rate, bandwidth, options)
    if paired:
        row["paired_bare_throughput"] = _paired_baseline(dest, scenario.size)
    region = prepare_region(scenario.size, scenario.fill, seed)
    try:
        _resources.reset_peak()
        base = _resources.rss()
        work = _workload.Workload(region, dirty_rate=rate, pattern=scenario.pattern, seed=seed, mark=False)
        dest.request({"op": "migrate", "timeout": TIMEOUT, "faults": fault_samples, "seed": seed})
        error = ""
        stats: migcore.MigrationStats | None = None
        work.start()
        try:
            if rate > 0 and warmup > 0:
                time.sleep(warmup)
            tid = getattr(getattr(work, "_thread", None), "native_id", None)
            wl0 = _resources.thread_cpu(tid)
            cpu0 = _resources.cpu_time()
            try:
                stats = migcore.migrate(
                    region, dest.listener, mode=scenario.mode, state=STATE, pause=work.pause,
                    resume=work.resume, timeout=TIMEOUT, **options,
                )
            except Exception as exc:  # noqa: BLE001 - a failed run is a result too
                error = f"{type(exc).__name__}: {exc}"
                log.warning("%s failed: %s", scenario.name, error)
            cpu = _resources.cpu_time() - cpu0
            wl_cpu = _resources.thread_cpu(tid) - wl0
            achieved = work.stats.achieved_rate
            src_table = page_table(region) if stats is not None else None  # the writer is paused: the pause's bytes
            nonzero = nonzero_pages(region)
        finally:
            work.stop()
        peak = _resources.peak_rss()
        answer = _await_destination(dest, failed=bool(error))
    finally:
        release(region)
        settle(scenario.size)
    if not answer.get("ok"):
        error = error or f"destination: {answer.get('error')}"
    verified = bool(
        stats is not None
        and answer.get("ok")
        and src_table is not None
        and np.array_equal(src_table, answer["hashes"])
        and answer["state_hash"] == xxhash.xxh3_64_intdigest(STATE)
    )
    row.update(status=stats.status if stats is not None else "failed", error=error, verified=verified)
    row.update(_stats_fields(stats, scenario.size, row.get("paired_bare_throughput")))
    row.update(
        {
            "nonzero_pages": nonzero,
            "npages": -(-scenario.size // 4096),
            "dirty_rate": achieved,
            "dirty_fraction": achieved / bandwidth if bandwidth else float("nan"),
            "src_cpu": cpu,
            "workload_cpu": wl_cpu,
            "src_migration_cpu": max(0.0, cpu - wl_cpu),
            "src_peak_rss": peak,
            "src_base_rss": base,
            "src_overhead_rss": peak - base,
        }
    )
    row.update(_destination_fields(answer))
    log.info(
        "%s: total %.3f s, downtime %.4f s, %d rounds, wire %.2fx, verified %s",
        scenario.name, row["total_time"], row["downtime"], row["rounds"], row["wire_ratio"], verified,
    )
    return row
