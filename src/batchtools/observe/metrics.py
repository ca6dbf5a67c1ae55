"""Run metrics: counts, throughput, latency percentiles, retries, circuits, memory.

`Metrics` is an engine observer. The engine calls it on its event loop, so
each event costs a few counter updates and two histogram insertions under
a lock, never I/O. Everything slower happens when a snapshot is taken:
percentiles, the engine's gauges (attempts in flight, items retrying,
circuit states, backend statistics) and the resident memory of this
process and its children, read with psutil. The snapshot is published
three ways: as ``report.metrics`` at the end of a run, as a file rewritten
atomically by a helper thread (`Metrics.write_to`), and over HTTP on the
loopback interface in the Prometheus text format (`Metrics.serve`).

Example::

    metrics = Metrics()
    metrics.serve(9464)
    report = batchtools.run(items, task, observers=[metrics])
    print(report.metrics["latency_seconds"]["attempt"]["p99"])
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import resource
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import cachetools
import psutil

from batchtools._exceptions import CircuitOpenError, ConfigurationError
from batchtools.engine._outcome import COUNT_KEYS, Attempt, Outcome, Report, State
from batchtools.observe._histogram import LogHistogram
from batchtools.observe._metrics_publish import FileWriter, Server, check_loopback
from batchtools.observe._prometheus import QUANTILES, prometheus_text
from batchtools.policy._units import parse_duration
from batchtools.policy.circuit_breaker import BreakerState

if TYPE_CHECKING:
    from batchtools.engine._engine import Engine

__all__ = ["QUANTILES", "Metrics", "prometheus_text"]

log = logging.getLogger("batchtools.metrics")

_WINDOW_SLOTS = 60
# Enum members hash in Python code; their ids hash in C.
_STATE_NAMES = {id(state): state.value for state in State}


class Metrics:
    """An engine observer that measures a run; see the module docstring.

    Pass it to a run with ``observers=[metrics]``. It measures one run at a
    time: `on_start` clears the previous run's values. The file writer and
    the HTTP server stop at the end of the run (or on `close`), after a
    last write of the file.

    Args:
        window: Seconds (or ``"1m"``) of the moving window for the recent
            throughput. It is counted in 60 slots, so the window's start
            moves in steps of ``window / 60``.
        relative_error: The bound on the relative error of the latency
            percentiles (see `LogHistogram`).
        clock: Returns the time in seconds for elapsed time and throughput.

    Attributes:
        wants_attempts: Tells the engine to keep every attempt in outcomes,
            even a first success, because latency is measured from them.

    Raises:
        ConfigurationError: ``window`` or ``relative_error`` is invalid.
    """

    wants_attempts = True

    def __init__(
        self,
        *,
        window: float | str | timedelta = 60.0,
        relative_error: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = parse_duration(window, name="metrics window")
        self.relative_error = relative_error
        LogHistogram(relative_error)  # Checks the value now rather than at start.
        self._clock = clock
        self._lock = threading.Lock()
        # Serializes starting and stopping the file writer and the server.
        self._publish_lock = threading.Lock()
        self._file: FileWriter | None = None
        self._server: Server | None = None
        self._clear()

    def _clear(self) -> None:
        self._engine: Engine | None = None
        self._run_id: str | None = None
        self._started: float | None = None
        self._finished: float | None = None
        self._counts = dict.fromkeys(COUNT_KEYS, 0)
        self._from_journal = 0
        self._attempts = 0
        self._retries = 0
        self._rejected = 0
        self._attempt_latency = LogHistogram(self.relative_error)
        self._item_latency = LogHistogram(self.relative_error)
        self._recent = _RateWindow(self.window)
        self._previous_attempts: list[Attempt] = []
        self._circuits = _CircuitTally()
        self._workers: dict[str, int] = {}
        self._memory_peak = 0

    def __repr__(self) -> str:
        with self._lock:
            counts = " ".join(f"{name}={n}" for name, n in self._counts.items())
            retries = self._retries
        return f"<Metrics {counts} retries={retries}>"

    # -- engine events -----------------------------------------------------

    def on_start(self, engine: Engine) -> None:
        with self._lock:
            self._clear()
            self._engine = engine
            self._run_id = engine.run_id
            self._started = self._clock()

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        with self._lock:
            self._retries += 1

    def on_outcome(self, outcome: Outcome) -> None:
        now = self._clock()
        with self._lock:
            self._counts[_STATE_NAMES[id(outcome.state)]] += 1
            if outcome.source == "journal":
                self._from_journal += 1
                return
            self._recent.add(now)
            if outcome.error is not None and isinstance(
                outcome.error, CircuitOpenError
            ):
                self._rejected += 1
            attempts = outcome.attempts
            if len(attempts) == 1 and attempts[0].error is None:
                # The common case: one attempt, which is the item's latency.
                attempt = attempts[0]
                if attempt not in self._previous_attempts:
                    self._attempts += 1
                    self._attempt_latency.add(attempt.duration)
                self._item_latency.add(attempt.duration)
                self._previous_attempts = attempts
            elif attempts:
                self._record_attempts(attempts)

    def _record_attempts(self, attempts: list[Attempt]) -> None:
        # The items of a batch share their attempts and are emitted one after
        # the other, so an attempt equal to one of the previous outcome's is
        # the same execution and counts once.
        previous = self._previous_attempts
        self._previous_attempts = attempts
        first: Attempt | None = None
        last: Attempt | None = None
        for attempt in attempts:
            if isinstance(attempt.error, CircuitOpenError):
                continue  # Rejected by an open circuit: nothing ran.
            if first is None:
                first = attempt
            last = attempt
            if attempt not in previous:
                self._attempts += 1
                self._attempt_latency.add(attempt.duration)
        if first is not None and last is not None:
            self._item_latency.add(last.started + last.duration - first.started)

    def on_finish(self, report: Report) -> None:
        with self._lock:
            self._finished = self._clock()
        report.metrics = self.snapshot()
        with self._lock:
            self._engine = None
        self.close()

    # -- snapshots ---------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Return the metrics now as JSON data, with the keys of docs/metrics.md.

        Safe to call from any thread. The engine's gauges and the memory
        are read at the time of the call. After the run they keep their
        last values, except ``in_flight`` and ``retrying``, which are 0.
        """
        memory = _sample_memory()
        with self._lock:
            engine = self._engine
            if engine is not None:
                self._circuits.update(engine)
                self._workers = _backend_counts(engine)
            self._memory_peak = max(self._memory_peak, memory["total"])
            now = self._finished if self._finished is not None else self._clock()
            started = self._started if self._started is not None else now
            elapsed = now - started
            ran = sum(self._counts.values()) - self._from_journal
            snapshot: dict[str, Any] = {
                "run_id": self._run_id,
                "finished": self._finished is not None,
                "timestamp": time.time(),
                "elapsed_seconds": elapsed,
                "items": {
                    **self._counts,
                    "total": sum(self._counts.values()),
                    "from_journal": self._from_journal,
                },
                "attempts": self._attempts,
                "retries": self._retries,
                "in_flight": engine.in_flight if engine is not None else 0,
                "retrying": engine.retrying if engine is not None else 0,
                "throughput": {
                    "items_per_second": ran / elapsed if elapsed > 0 else 0.0,
                    "window_items_per_second": self._recent.rate(now, started),
                    "window_seconds": self.window,
                },
                "circuits": {
                    **self._circuits.counts(),
                    "rejected_items": self._rejected,
                },
                "workers": dict(self._workers),
                "memory_bytes": {
                    "runner": memory["runner"],
                    "children": memory["children"],
                    "runner_peak": memory["runner_peak"],
                    "total_peak": self._memory_peak,
                },
                "child_processes": memory["count"],
            }
            attempt_latency = self._attempt_latency.copy()
            item_latency = self._item_latency.copy()
        snapshot["latency_seconds"] = {
            "attempt": _summary(attempt_latency),
            "item": _summary(item_latency),
            "relative_error": self.relative_error,
        }
        return snapshot

    def to_json(self, *, indent: int | None = None) -> str:
        """Return a snapshot as JSON text."""
        return json.dumps(self.snapshot(), indent=indent)

    def to_prometheus(self) -> str:
        """Return a snapshot in the Prometheus text exposition format 0.0.4."""
        return prometheus_text(self.snapshot())

    # -- publishing --------------------------------------------------------

    def write_to(
        self,
        path: str | os.PathLike[str],
        interval: float | str | timedelta = 5.0,
        *,
        format: str | None = None,
    ) -> None:
        """Rewrite ``path`` with a snapshot now, every ``interval`` and at the end.

        Each write goes through `batchtools.fs.atomic.atomic_write` (a
        temporary file in the same folder, synced, then renamed over
        ``path``), so a reader never sees a partial file. A write that fails
        after the first is logged and tried again at the next interval.

        Args:
            path: The file to write.
            interval: Seconds (or ``"5s"``) between writes.
            format: ``"json"`` or ``"prometheus"``; by default Prometheus
                text for a name ending in ``.prom`` (what node_exporter's
                textfile collector reads), else JSON.

        Raises:
            ConfigurationError: The interval or format is invalid, a file is
                already being written, or the first write failed.
        """
        seconds = parse_duration(interval, name="metrics file interval")
        target = Path(path)
        if format is None:
            format = "prometheus" if target.suffix == ".prom" else "json"
        if format not in ("json", "prometheus"):
            raise ConfigurationError(
                f"invalid metrics file format {format!r}: use 'json' or 'prometheus'"
            )
        render = self.to_prometheus if format == "prometheus" else self._json_text
        with self._publish_lock:
            if self._file is not None:
                raise ConfigurationError(
                    f"metrics are already written to {str(self._file.path)!r}; "
                    "use one Metrics object per file"
                )
            writer = FileWriter(target, seconds, render)
            try:
                writer.write(raise_errors=True)
            except OSError as error:
                fix = (
                    "free space on its disk"
                    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
                    else "check that its folder exists and is writable"
                )
                raise ConfigurationError(
                    f"cannot write the metrics file {str(target)!r}: "
                    f"{error.strerror or error}; {fix}"
                ) from None
            writer.start()
            self._file = writer

    def _json_text(self) -> str:
        return json.dumps(self.snapshot(), indent=2) + "\n"

    def serve(self, port: int = 0, host: str = "127.0.0.1") -> int:
        """Serve ``/metrics`` in the Prometheus format over HTTP until the run ends.

        The server listens on a loopback address only, on a daemon thread,
        and answers only requests whose ``Host`` header names a loopback
        address or ``localhost`` (a guard against DNS rebinding). To reach
        it from another machine, use an SSH tunnel or a reverse proxy.

        Args:
            port: The TCP port; 0 picks a free one.
            host: An IPv4 loopback address, such as ``127.0.0.1``.

        Returns:
            The port the server listens on.

        Raises:
            ConfigurationError: The host is not a loopback address, the port
                is out of range or in use, or a server already runs.
        """
        check_loopback(host)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 2**16:
            raise ConfigurationError(
                f"invalid metrics port {port!r}: use a number from 0 to 65535, "
                "where 0 picks a free port"
            )
        with self._publish_lock:
            if self._server is not None:
                raise ConfigurationError(
                    f"metrics are already served on port {self._server.port}; "
                    "use one Metrics object per port"
                )
            try:
                server = Server((host, port), self.to_prometheus)
            except OSError as error:
                raise ConfigurationError(
                    f"cannot serve metrics on {host} port {port}: "
                    f"{error.strerror or error}; choose another port, or 0 for a "
                    "free one"
                ) from None
            server.start()
            self._server = server
        log.info("serving metrics at http://%s:%d/metrics", host, server.port)
        return server.port

    def close(self) -> None:
        """Write the file a last time and stop the file writer and the server.

        Calling it again does nothing. Metrics that have not published
        anything need no close.
        """
        with self._publish_lock:
            writer, self._file = self._file, None
            server, self._server = self._server, None
        if writer is not None:
            writer.close()
        if server is not None:
            server.close()

    def __enter__(self) -> Metrics:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()


# -- pieces of a snapshot -------------------------------------------------------


class _RateWindow:
    """Counts of events in the last ``window`` seconds, in 60 time slots."""

    def __init__(self, window: float) -> None:
        self.width = window / _WINDOW_SLOTS
        self._ticks = [-1] * _WINDOW_SLOTS
        self._counts = [0] * _WINDOW_SLOTS

    def add(self, now: float) -> None:
        tick = int(now // self.width)
        slot = tick % _WINDOW_SLOTS
        if self._ticks[slot] != tick:
            self._ticks[slot] = tick
            self._counts[slot] = 0
        self._counts[slot] += 1

    def rate(self, now: float, started: float) -> float:
        """Return events per second from the oldest slot kept up to ``now``."""
        tick = int(now // self.width)
        total = sum(
            count
            for slot_tick, count in zip(self._ticks, self._counts, strict=True)
            if tick - _WINDOW_SLOTS < slot_tick <= tick
        )
        # The slots cover the current, partly elapsed slot and 59 whole ones.
        window_start = max((tick - _WINDOW_SLOTS + 1) * self.width, started)
        span = now - window_start
        return total / span if span > 0 else 0.0


class _CircuitTally:
    """The circuits that are not closed, followed through the run's transitions."""

    def __init__(self) -> None:
        self._seen = 0
        self.transitions = 0
        # NOTE: bounded like the breakers' own LRU, but a circuit that the
        # breakers forget while open stays counted as open here.
        self._states: cachetools.LRUCache[Any, BreakerState] | None = None

    def update(self, engine: Engine) -> None:
        breakers = engine.settings.breakers
        if breakers is None:
            return
        if self._states is None:
            self._states = cachetools.LRUCache(maxsize=breakers.policy.max_keys)
        new = engine.report.circuit_transitions[self._seen :]
        self._seen += len(new)
        self.transitions += len(new)
        for transition in new:
            if transition.new is BreakerState.CLOSED:
                self._states.pop(transition.key, None)
            else:
                self._states[transition.key] = transition.new

    def counts(self) -> dict[str, int]:
        states = list(self._states.values()) if self._states is not None else []
        return {
            "open": states.count(BreakerState.OPEN),
            "half_open": states.count(BreakerState.HALF_OPEN),
            "transitions": self.transitions,
        }


def _backend_counts(engine: Engine) -> dict[str, int]:
    stats = engine.backend.statistics()
    return {
        "started": stats.workers_started,
        "lost": stats.workers_lost,
        "recycled": stats.workers_recycled,
        "memory_kills": stats.memory_kills,
        "abandoned_threads": stats.abandoned_threads,
    }


def _sample_memory() -> dict[str, int]:
    """Return the resident memory of this process and of all its descendants.

    Dask workers on other machines are not descendants and are not counted.
    """
    me = psutil.Process()
    runner = me.memory_info().rss
    children = 0
    count = 0
    with contextlib.suppress(psutil.Error):
        for child in me.children(recursive=True):
            try:
                children += child.memory_info().rss
                count += 1
            except psutil.Error:
                continue  # It ended between the listing and the read.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    peak = peak if sys.platform == "darwin" else peak * 1024
    return {
        "runner": runner,
        "children": children,
        "count": count,
        "runner_peak": max(peak, runner),
        "total": runner + children,
    }


def _summary(histogram: LogHistogram) -> dict[str, Any]:
    p50, p90, p99 = histogram.quantiles(QUANTILES)
    empty = histogram.count == 0
    return {
        "count": histogram.count,
        "sum": histogram.sum,
        "min": None if empty else histogram.min,
        "p50": p50,
        "p90": p90,
        "p99": p99,
        "max": None if empty else histogram.max,
    }
