"""Run metrics: the histogram's error bound, the outputs, and real runs with them."""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

import batchtools
from batchtools import (
    Backoff,
    CircuitBreaker,
    ConfigurationError,
    Outcome,
    Report,
    Retry,
)
from batchtools.observe._histogram import LogHistogram
from batchtools.observe.metrics import Metrics, prometheus_text
from tests.cli.support import cli_environment, run_cli, started_cli, wait_until

NO_WAIT = Backoff(initial=0, maximum=0)
QUANTILES = [0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0]
EXPECTED_FAMILIES = {
    ("batchtools_run_info", "gauge"),
    ("batchtools_run_elapsed_seconds", "gauge"),
    ("batchtools_items", "counter"),
    ("batchtools_items_from_journal", "counter"),
    ("batchtools_attempts", "counter"),
    ("batchtools_retries", "counter"),
    ("batchtools_attempts_in_flight", "gauge"),
    ("batchtools_items_retrying", "gauge"),
    ("batchtools_throughput_items_per_second", "gauge"),
    ("batchtools_attempt_duration_seconds", "summary"),
    ("batchtools_attempt_duration_max_seconds", "gauge"),
    ("batchtools_item_duration_seconds", "summary"),
    ("batchtools_item_duration_max_seconds", "gauge"),
    ("batchtools_circuits", "gauge"),
    ("batchtools_circuit_transitions", "counter"),
    ("batchtools_circuit_rejected_items", "counter"),
    ("batchtools_workers_started", "counter"),
    ("batchtools_workers_lost", "counter"),
    ("batchtools_workers_recycled", "counter"),
    ("batchtools_worker_memory_kills", "counter"),
    ("batchtools_abandoned_threads", "gauge"),
    ("batchtools_child_processes", "gauge"),
    ("batchtools_resident_memory_bytes", "gauge"),
    ("batchtools_resident_memory_peak_bytes", "gauge"),
}


def families(text: str) -> dict[str, Metric]:
    """Parse Prometheus text with the reference client's parser, by family name."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample(parsed: dict[str, Metric], name: str, **labels: str) -> float:
    """Return the value of the one sample called ``name`` with exactly ``labels``."""
    family = name.removesuffix("_total").removesuffix("_sum").removesuffix("_count")
    values = [
        s.value for s in parsed[family].samples if s.name == name and s.labels == labels
    ]
    assert len(values) == 1, f"{name}{labels}: {parsed[family].samples}"
    return float(values[0])


def fetch(
    port: int, path: str = "/metrics", host: str | None = None
) -> tuple[int, str]:
    """GET ``path`` from 127.0.0.1:``port``; return the status and the body."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Host": host} if host is not None else {}
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8")
    finally:
        connection.close()


def port_is_closed(port: int) -> bool:
    """Return whether nothing accepts connections on 127.0.0.1:``port``."""
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


# -- the histogram ------------------------------------------------------------


def _samples(kind: str) -> np.ndarray[Any, np.dtype[np.float64]]:
    rng = np.random.default_rng(20240611)
    if kind == "uniform":
        return rng.uniform(0.001, 10.0, 20_000)
    if kind == "lognormal":
        return rng.lognormal(mean=-3.0, sigma=1.5, size=20_000)
    # Pareto with shape 1.1: a heavy tail spanning several decades.
    return (rng.pareto(1.1, 20_000) + 1.0) * 0.01


@pytest.mark.parametrize("kind", ["uniform", "lognormal", "heavy_tail"])
def test_quantiles_within_one_percent(kind: str) -> None:
    values = _samples(kind)
    histogram = LogHistogram(0.01)
    histogram.update(float(v) for v in values)

    estimates = histogram.quantiles(QUANTILES)

    for q, estimate in zip(QUANTILES, estimates, strict=True):
        exact = float(np.quantile(values, q, method="inverted_cdf"))
        assert estimate is not None
        assert abs(estimate - exact) / exact <= 0.01, (q, estimate, exact)
    assert histogram.count == len(values)
    assert histogram.min == float(values.min())
    assert histogram.max == float(values.max())
    assert histogram.sum == pytest.approx(float(values.sum()))


def test_histogram_merge_matches_whole() -> None:
    values = [float(v) for v in _samples("lognormal")]
    whole = LogHistogram()
    whole.update(values)
    first, second = LogHistogram(), LogHistogram()
    first.update(values[:7_000])
    second.update(values[7_000:])

    first.merge(second)

    assert first.quantiles(QUANTILES) == whole.quantiles(QUANTILES)
    assert first.count == whole.count
    assert first.bucket_count == whole.bucket_count
    assert (first.min, first.max) == (whole.min, whole.max)


def test_histogram_memory_is_bounded() -> None:
    histogram = LogHistogram(0.01)
    rng = np.random.default_rng(7)
    # Log-uniform over 24 decades, far beyond the default range of 1e-9 to 1e9.
    histogram.update(float(v) for v in 10.0 ** rng.uniform(-12, 12, 100_000))

    # ln(1e9 / 1e-9) / ln(1.01 / 0.99) is about 2,072, plus the partial
    # buckets at both ends and the one for values at or below 1e-9.
    assert histogram.max_buckets <= 2_075
    assert histogram.bucket_count == histogram.max_buckets
    assert histogram.count == 100_000


def test_histogram_edge_values() -> None:
    histogram = LogHistogram()
    assert histogram.quantile(0.5) is None

    histogram.update([-0.5, 0.0, 5e-10, 2.0])

    assert histogram.min == 0.0
    assert histogram.quantile(0.0) == 0.0
    assert histogram.quantile(0.5) == 0.0
    assert histogram.quantile(1.0) == 2.0


@pytest.mark.parametrize("relative_error", [0, 1, -0.1, True])
def test_histogram_rejects_relative_error(relative_error: float) -> None:
    with pytest.raises(ConfigurationError, match=r"relative_error=.* must be above 0"):
        LogHistogram(relative_error)


def test_histogram_rejects_bad_merge_and_quantile() -> None:
    with pytest.raises(ConfigurationError, match=r"min_value=.* must be finite"):
        LogHistogram(min_value=1.0, max_value=0.5)
    with pytest.raises(ConfigurationError, match="relative errors or value ranges"):
        LogHistogram(0.01).merge(LogHistogram(0.02))
    with pytest.raises(ValueError, match=r"quantile 1\.5 must be between 0 and 1"):
        LogHistogram().quantile(1.5)


# -- runs through the library -------------------------------------------------


class CallCounter:
    """Counts calls per item from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: dict[int, int] = {}

    def count(self, item: int) -> int:
        with self._lock:
            self.calls[item] = self.calls.get(item, 0) + 1
            return self.calls[item]


def test_run_counts_add_up() -> None:
    counter = CallCounter()

    def task(item: int) -> int:
        calls = counter.count(item)
        if item == 7 or (item % 4 == 0 and calls <= 2):
            raise ConnectionError(f"item {item} call {calls} failed")
        return item

    metrics = Metrics()
    report = batchtools.run(
        range(20),
        task,
        backend="thread",
        retry=Retry(attempts=3, backoff=NO_WAIT),
        observers=[metrics],
    )

    assert report.metrics is not None
    snapshot = report.metrics
    assert snapshot["items"]["succeeded"] == 19
    assert snapshot["items"]["failed"] == 1
    assert snapshot["items"]["total"] == 20
    # Items 0, 4, 8, 12 and 16 retry twice each; item 7 retries twice, then fails.
    assert snapshot["retries"] == 12
    assert snapshot["attempts"] == 20 + 12
    assert snapshot["attempts"] == sum(counter.calls.values())
    assert snapshot["latency_seconds"]["attempt"]["count"] == 32
    assert snapshot["latency_seconds"]["item"]["count"] == 20
    assert snapshot["in_flight"] == 0
    assert snapshot["finished"] is True
    assert snapshot["run_id"] == report.run_id
    assert snapshot["memory_bytes"]["runner"] > 0
    item_latency = snapshot["latency_seconds"]["item"]
    assert 0 <= item_latency["p50"] <= item_latency["p99"] <= item_latency["max"]


def test_batch_attempt_counts_once() -> None:
    def task(items: list[int]) -> list[int]:
        return items

    metrics = Metrics()
    report = batchtools.run(
        range(12), task, backend="thread", batch_size=4, observers=[metrics]
    )

    assert report.metrics is not None
    assert report.metrics["items"]["succeeded"] == 12
    assert report.metrics["attempts"] == 3
    assert report.metrics["latency_seconds"]["item"]["count"] == 12


class FakeClock:
    """A clock that tasks set, for the moving-window throughput."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_window_throughput_with_fake_clock() -> None:
    clock = FakeClock()
    metrics = Metrics(window=60.0, clock=clock)

    async def finish_at(moment: float) -> float:
        clock.now = moment
        return moment

    # With one attempt at a time, each item finishes at the time it sets.
    moments = [10.0] * 120 + [45.0] * 58 + [100.0]
    report = batchtools.run(
        moments, finish_at, backend="async", concurrency=1, observers=[metrics]
    )

    assert report.metrics is not None
    throughput = report.metrics["throughput"]
    assert report.metrics["elapsed_seconds"] == 100.0
    assert throughput["items_per_second"] == pytest.approx(179 / 100)
    # The window's 60 one-second slots cover 41 s to 100 s: 58 + 1 items.
    assert throughput["window_items_per_second"] == pytest.approx(59 / 59)
    assert throughput["window_seconds"] == 60.0


def test_open_circuit_counted() -> None:
    async def always_fails(item: int) -> None:
        raise ConnectionError(f"service down for item {item}")

    breaker = CircuitBreaker.parse("3", reset_timeout=600, fail_fast=True)
    metrics = Metrics()
    report = batchtools.run(
        range(10),
        always_fails,
        backend="async",
        concurrency=1,
        policies=[breaker],
        observers=[metrics],
    )

    assert report.metrics is not None
    circuits = report.metrics["circuits"]
    assert report.metrics["items"]["failed"] == 10
    assert circuits["rejected_items"] == 7
    assert circuits["open"] == 1
    assert circuits["half_open"] == 0
    assert circuits["transitions"] == 1
    # Rejected items never ran, so only the first three count as attempts.
    assert report.metrics["attempts"] == 3


class SnapshotTaker:
    """An observer that takes a metrics snapshot at each outcome."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.snapshots: list[dict[str, Any]] = []

    def on_start(self, engine: Any) -> None:
        return None

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        return None

    def on_outcome(self, outcome: Outcome) -> None:
        self.snapshots.append(self.metrics.snapshot())

    def on_finish(self, report: Report) -> None:
        return None


def test_memory_includes_worker_processes() -> None:
    metrics = Metrics()
    taker = SnapshotTaker(metrics)

    report = batchtools.run(
        [-1, -2], abs, backend="process", concurrency=1, observers=[metrics, taker]
    )

    assert report.counts["succeeded"] == 2
    during = taker.snapshots[0]
    assert during["child_processes"] >= 1
    assert during["memory_bytes"]["children"] > 0
    assert during["memory_bytes"]["runner"] > 0
    assert during["memory_bytes"]["total_peak"] >= during["memory_bytes"]["runner"]
    assert during["workers"]["started"] >= 1


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """An event that gated tasks wait for; set at the end so nothing hangs."""
    event = threading.Event()
    yield event
    event.set()


def test_file_and_server_during_run(tmp_path: Path, gate: threading.Event) -> None:
    started = threading.Semaphore(0)

    def gated(item: int) -> int:
        started.release()
        assert gate.wait(60), "the test never opened the gate"
        return item

    path = tmp_path / "metrics.json"
    metrics = Metrics()
    metrics.write_to(path, interval=0.02)
    port = metrics.serve(0)
    reports: list[Report] = []
    runner = threading.Thread(
        target=lambda: reports.append(
            batchtools.run(
                range(3), gated, backend="thread", concurrency=3, observers=[metrics]
            )
        )
    )
    runner.start()
    for _ in range(3):
        assert started.acquire(timeout=60)

    def file_shows_three_in_flight() -> bool:
        return bool(json.loads(path.read_text())["in_flight"] == 3)

    wait_until(file_shows_three_in_flight, "the metrics file to show 3 in flight")
    status, body = fetch(port)
    gate.set()
    runner.join(60)

    assert status == 200
    parsed = families(body)
    assert sample(parsed, "batchtools_attempts_in_flight") == 3
    assert sample(parsed, "batchtools_items_total", state="succeeded") == 0
    final = json.loads(path.read_text())
    assert final["finished"] is True
    assert final["items"]["succeeded"] == 3
    assert final["in_flight"] == 0
    assert reports[0].metrics is not None
    assert reports[0].metrics["items"] == final["items"]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert port_is_closed(port)


def test_server_rejects_other_paths_and_hosts() -> None:
    with Metrics() as metrics:
        port = metrics.serve(0)
        assert fetch(port, "/")[0] == 404
        assert fetch(port, "/metrics", host="attacker.example:80")[0] == 403
        assert fetch(port, "/metrics", host=f"localhost:{port}")[0] == 200
    assert port_is_closed(port)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "localhost", "::1"])
def test_serve_rejects_other_hosts(host: str) -> None:
    with pytest.raises(ConfigurationError, match="loopback address"):
        Metrics().serve(0, host=host)


def test_serve_rejects_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ConfigurationError, match=f"port {port}: .*another port"):
            Metrics().serve(port)


def test_write_to_rejects_bad_targets(tmp_path: Path) -> None:
    metrics = Metrics()
    with pytest.raises(ConfigurationError, match="folder exists and is writable"):
        metrics.write_to(tmp_path / "missing" / "metrics.json")
    with pytest.raises(ConfigurationError, match="invalid metrics file format 'xml'"):
        metrics.write_to(tmp_path / "metrics.xml", format="xml")
    with pytest.raises(ConfigurationError, match="invalid metrics file interval"):
        metrics.write_to(tmp_path / "metrics.json", interval=0)


def test_prom_file_parses(tmp_path: Path) -> None:
    path = tmp_path / "batchtools.prom"
    metrics = Metrics()
    metrics.write_to(path)

    batchtools.run(range(5), abs, backend="thread", observers=[metrics])

    parsed = families(path.read_text())
    assert sample(parsed, "batchtools_items_total", state="succeeded") == 5
    assert sample(parsed, "batchtools_attempt_duration_seconds_count") == 5


# -- the Prometheus text ------------------------------------------------------


def test_prometheus_families_and_values() -> None:
    counter = CallCounter()

    def task(item: int) -> int:
        if counter.count(item) == 1 and item < 3:
            raise TimeoutError(f"item {item} timed out")
        if item == 9:
            raise ValueError("item 9 is invalid")
        return item

    metrics = Metrics()
    report = batchtools.run(
        range(10),
        task,
        backend="thread",
        retry=Retry(attempts=2, backoff=NO_WAIT),
        observers=[metrics],
    )
    text = metrics.to_prometheus()

    parsed = families(text)
    assert {(f.name, f.type) for f in parsed.values()} == EXPECTED_FAMILIES
    assert sample(parsed, "batchtools_items_total", state="succeeded") == 9
    assert sample(parsed, "batchtools_items_total", state="failed") == 1
    assert sample(parsed, "batchtools_items_total", state="skipped") == 0
    assert sample(parsed, "batchtools_retries_total") == 4
    assert sample(parsed, "batchtools_attempts_total") == 14
    assert sample(parsed, "batchtools_attempt_duration_seconds_count") == 14
    assert sample(parsed, "batchtools_item_duration_seconds_count") == 10
    assert report.metrics is not None
    attempt = report.metrics["latency_seconds"]["attempt"]
    for quantile, key in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99")):
        value = sample(parsed, "batchtools_attempt_duration_seconds", quantile=quantile)
        assert value == pytest.approx(attempt[key])
    assert sample(parsed, "batchtools_run_info", run_id=report.run_id) == 1
    assert "# HELP batchtools_retries_total " in text
    assert "# TYPE batchtools_retries_total counter" in text


def test_prometheus_escapes_labels_and_empty_quantiles() -> None:
    snapshot = Metrics().snapshot()
    snapshot["run_id"] = 'a "quoted" \\ run\nid'

    parsed = families(prometheus_text(snapshot))

    assert sample(parsed, "batchtools_run_info", run_id='a "quoted" \\ run\nid') == 1
    median = sample(parsed, "batchtools_attempt_duration_seconds", quantile="0.5")
    assert median != median  # NaN: no attempt was measured yet.


def test_snapshot_is_json() -> None:
    metrics = Metrics()
    batchtools.run(range(3), abs, backend="thread", observers=[metrics])

    data = json.loads(metrics.to_json())

    assert data["items"]["succeeded"] == 3
    assert data["latency_seconds"]["relative_error"] == 0.01


# -- the command line ---------------------------------------------------------

FAIL_B = ["sh", "-c", 'test "$1" != b', "sh"]


def test_cli_metrics_file_counts(tmp_path: Path) -> None:
    result = run_cli(
        [
            "run",
            "--metrics-file",
            "m.json",
            "--retries",
            "1",
            "--",
            *FAIL_B,
            ":::",
            "a",
            "b",
            "c",
        ],
        tmp_path,
    )

    assert result.returncode == 1, result.stderr
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["items"]["succeeded"] == 2
    assert data["items"]["failed"] == 1
    assert data["retries"] == 1
    assert data["attempts"] == 4
    assert data["finished"] is True
    assert not list(tmp_path.glob(".m.json*"))


def test_cli_metrics_prom_file(tmp_path: Path) -> None:
    result = run_cli(
        [
            "run",
            "--no-journal",
            "--metrics-file",
            "run.prom",
            "--",
            *FAIL_B,
            ":::",
            "a",
            "b",
        ],
        tmp_path,
    )

    assert result.returncode == 1, result.stderr
    parsed = families((tmp_path / "run.prom").read_text())
    assert sample(parsed, "batchtools_items_total", state="succeeded") == 1
    assert sample(parsed, "batchtools_items_total", state="failed") == 1


def test_cli_rejects_missing_metrics_folder(tmp_path: Path) -> None:
    result = run_cli(
        ["run", "--metrics-file", "missing/m.json", "true", ":::", "a"], tmp_path
    )

    assert result.returncode == 2
    assert b"Error: cannot write the metrics file 'missing/m.json'" in result.stderr
    assert not (tmp_path / ".batchtools").exists()


def test_cli_metrics_port_during_run(tmp_path: Path) -> None:
    ledger, gate_file, log = tmp_path / "ledger", tmp_path / "gate", tmp_path / "log"
    environment = cli_environment(CALL_LEDGER=str(ledger), CALL_GATE=str(gate_file))
    arguments = ["run", "--metrics-port", "0", "-j", "2", "--backend", "thread"]
    arguments += ["--call", "tests.cli.call_tasks:record_then_wait", ":::", "a", "b"]
    with (
        log.open("wb") as stderr,
        started_cli(
            arguments, tmp_path, environment=environment, stderr=stderr
        ) as process,
    ):

        def both_started() -> bool:
            return ledger.exists() and len(ledger.read_text().splitlines()) == 2

        wait_until(both_started, "both items to start", process=process)
        found = re.search(rb"127\.0\.0\.1:(\d+)/metrics", log.read_bytes())
        assert found is not None, log.read_bytes()
        port = int(found[1])
        status, body = fetch(port)
        gate_file.touch()
        process.wait(60)

    assert status == 200
    parsed = families(body)
    assert sample(parsed, "batchtools_attempts_in_flight") == 2
    assert sample(parsed, "batchtools_items_total", state="succeeded") == 0
    assert process.returncode == 0, log.read_text()
    assert port_is_closed(port)


def test_snapshots_from_another_thread() -> None:
    # Snapshots taken in a loop on another thread while outcomes arrive must
    # leave the counts whole.
    metrics = Metrics()
    stop = threading.Event()

    def take_snapshots() -> None:
        while not stop.is_set():
            metrics.snapshot()

    taker = threading.Thread(target=take_snapshots)
    taker.start()
    try:
        report = batchtools.run(range(200), abs, backend="thread", observers=[metrics])
    finally:
        stop.set()
        taker.join(60)

    assert report.metrics is not None
    assert report.metrics["items"]["succeeded"] == 200
    assert report.metrics["attempts"] == 200


FULL_DISK_SCRIPT = """
import resource, signal, sys
from batchtools import ConfigurationError
from batchtools.observe.metrics import Metrics

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
try:
    Metrics().write_to(sys.argv[1])
except ConfigurationError as error:
    print(error)
"""


def test_metrics_file_without_room_names_the_fix(tmp_path: Path) -> None:
    # A file size limit of 0 fails the first write as a full disk would.
    target = tmp_path / "m.json"
    result = subprocess.run(
        [sys.executable, "-c", FULL_DISK_SCRIPT, str(target)],
        env=cli_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"cannot write the metrics file {str(target)!r}: File too large; "
        "free space on its disk"
    )
