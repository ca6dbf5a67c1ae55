"""Load tests: the recommendation on a simulated service, real runs, and plots.

The recommendation is checked against `SimulatedService`, a model of a
service with a known capacity that runs on a fake clock, so the expected
level follows from the model and no test depends on the machine's speed.
Real runs go through the engine with small samples.
"""

from __future__ import annotations

import heapq
import math
import sys
import threading
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from batchtools._exceptions import ConfigurationError
from batchtools.observe.loadtest import (
    BenchResult,
    EngineRunner,
    ItemTiming,
    bench,
    format_jobs,
    format_seconds,
    save_plot,
)

LEVELS = [1, 2, 4, 8, 16, 32]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SVG_NAMESPACE = "{http://www.w3.org/2000/svg}"


class FakeClock:
    """A clock that only moves when the simulated service advances it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class SimulatedService:
    """A service with ``capacity`` slots, each serving a request in ``latency`` s.

    The runner plays ``concurrency`` clients in a closed loop: each client
    sends its next request when its previous one ends. Requests beyond the
    capacity wait in a FIFO queue, so above the capacity the latency grows
    and the throughput stays at ``capacity / latency``. A request that
    arrives while more than ``fail_above`` requests are at the service
    fails, after taking its slot for the usual time. Each sample advances
    the clock by the simulated time it took.
    """

    capacity: int
    latency: float
    clock: FakeClock
    fail_above: int | None = None
    calls: list[tuple[int, int]] = field(default_factory=list)

    def __call__(
        self, task: Any, items: list[Any], concurrency: int
    ) -> list[ItemTiming]:
        self.calls.append((len(items), concurrency))
        clients = [0.0] * concurrency
        slots = [0.0] * self.capacity
        finishes: list[float] = []
        timings = []
        for _ in items:
            arrival = heapq.heappop(clients)
            at_service = sum(1 for end in finishes if end > arrival)
            start = max(arrival, heapq.heappop(slots))
            end = start + self.latency
            heapq.heappush(slots, end)
            heapq.heappush(clients, end)
            finishes.append(end)
            ok = self.fail_above is None or at_service <= self.fail_above
            timings.append(ItemTiming(end - arrival, ok))
        self.clock.now += max(clients)
        return timings


def simulated_bench(
    service: SimulatedService, levels: list[int] = LEVELS, **options: Any
) -> BenchResult:
    """Run `bench` against ``service`` on its fake clock, without memory sampling."""
    return bench(
        "unused: the simulated service ignores the task",
        range(1000),
        jobs=levels,
        sample=64,
        repeat=2,
        runner=service,
        clock=service.clock,
        measure_memory=False,
        **options,
    )


# -- the recommendation on a simulated service ------------------------------------


def test_service_throughput_plateaus_at_capacity() -> None:
    service = SimulatedService(capacity=8, latency=0.1, clock=FakeClock())

    result = simulated_bench(service)

    throughput = {level.jobs: level.throughput for level in result.levels}
    for jobs in [1, 2, 4, 8]:
        assert throughput[jobs] == pytest.approx(jobs / 0.1)
    for jobs in [16, 32]:
        assert throughput[jobs] == pytest.approx(8 / 0.1)


def test_service_latency_grows_past_capacity() -> None:
    service = SimulatedService(capacity=8, latency=0.1, clock=FakeClock())

    result = simulated_bench(service)

    assert result.level(8).p99 == pytest.approx(0.1, rel=0.01)
    assert result.level(16).p50 == pytest.approx(0.2, rel=0.01)
    assert result.level(32).p99 == pytest.approx(0.4, rel=0.01)


def test_recommends_capacity_without_limits() -> None:
    service = SimulatedService(capacity=8, latency=0.1, clock=FakeClock())

    result = simulated_bench(service)

    assert result.recommended == 8
    assert result.knee == 8
    assert result.within_limits
    assert "8 jobs is the lowest level" in result.reason


def test_p99_limit_rejects_queued_levels() -> None:
    service = SimulatedService(capacity=8, latency=0.1, clock=FakeClock())

    result = simulated_bench(service, max_p99="150ms")

    assert result.recommended == 8
    assert result.within_limits
    assert [level.jobs for level in result.levels if level.within_limits] == [
        1,
        2,
        4,
        8,
    ]
    assert result.level(16).violations == ("p99 200 ms is above 150 ms",)
    assert result.level(32).violations == ("p99 400 ms is above 150 ms",)
    assert "within the limits (p99 at most 150 ms)" in result.reason


def test_tight_p99_limit_picks_lower_level() -> None:
    # With 4 slots, requests queue from 8 jobs on. A limit of 150 ms keeps
    # only the levels that never queue, so 4 is both the knee and the choice.
    service = SimulatedService(capacity=4, latency=0.1, clock=FakeClock())

    result = simulated_bench(service, max_p99=0.15)

    assert result.recommended == 4
    assert result.knee == 4


def test_knee_fraction_moves_the_knee() -> None:
    # 4 jobs reach 40 items/s, half of the best (80 items/s at 8 and above),
    # and 2 jobs a quarter of it.
    service = SimulatedService(capacity=8, latency=0.1, clock=FakeClock())

    result = simulated_bench(service, knee_fraction=0.4)

    assert result.knee == 4
    assert result.recommended == 4
    assert "reaches 40% of the best" in result.reason


def test_error_limit_rejects_overloaded_levels() -> None:
    # 32 slots, but requests fail once more than 8 are at the service, so the
    # throughput of succeeded items still grows past 8 jobs while errors appear.
    service = SimulatedService(
        capacity=32, latency=0.1, clock=FakeClock(), fail_above=8
    )

    unlimited = simulated_bench(service)
    limited = simulated_bench(service, max_error_rate=0.01)

    assert unlimited.recommended > 8
    assert unlimited.level(16).error_rate > 0.01
    assert limited.recommended == 8
    assert limited.level(8).errors == 0
    assert not limited.level(16).within_limits
    assert limited.level(16).violations[0].startswith("error rate ")


def test_no_level_within_limits_picks_fewest() -> None:
    # Every level breaks the 50 ms limit, and past 8 jobs the levels break
    # the error limit as well, so the levels up to 8 break the fewest.
    service = SimulatedService(
        capacity=32, latency=0.1, clock=FakeClock(), fail_above=8
    )

    result = simulated_bench(service, max_p99="50ms", max_error_rate=0.01)

    assert not result.within_limits
    assert result.recommended == 1
    assert len(result.level(1).violations) == 1
    assert len(result.level(16).violations) == 2
    assert result.reason.startswith("No level was within the limits")
    assert "(1 of 2)" in result.reason


def test_samples_and_warmup_reach_the_runner() -> None:
    service = SimulatedService(capacity=8, latency=0.1, clock=FakeClock())

    result = bench(
        None,
        [1, 2, 3],
        jobs=[2, 1],
        sample=5,
        repeat=3,
        runner=service,
        clock=service.clock,
        measure_memory=False,
    )

    # Levels run in ascending order, and the default warm-up is twice the level.
    assert service.calls == [(2, 1), (5, 1), (5, 1), (5, 1), (4, 2), *[(5, 2)] * 3]
    assert [level.jobs for level in result.levels] == [1, 2]
    assert result.level(1).items == 15
    assert len(result.level(1).sample_throughputs) == 3
    assert result.level(1).peak_rss is None


def test_explicit_warmup_zero_skips_warmup() -> None:
    service = SimulatedService(capacity=8, latency=0.1, clock=FakeClock())

    bench(
        None,
        [1],
        jobs=[4],
        sample=5,
        repeat=1,
        warmup=0,
        runner=service,
        clock=service.clock,
        measure_memory=False,
    )

    assert service.calls == [(5, 4)]


def test_result_to_dict_is_plain_data() -> None:
    service = SimulatedService(capacity=8, latency=0.1, clock=FakeClock())
    result = simulated_bench(service, [1, 16], max_p99=0.15)

    data = result.to_dict()

    assert data["recommended"] == 1
    assert data["levels"][1]["jobs"] == 16
    assert data["levels"][1]["within_limits"] is False
    assert data["levels"][0]["violations"] == ()
    assert data["max_p99"] == pytest.approx(0.15)


# -- real runs through the engine -------------------------------------------------


def test_engine_run_measures_threads_and_memory() -> None:
    seen: set[int] = set()
    lock = threading.Lock()

    def record(item: int) -> int:
        with lock:
            seen.add(item)
        return item

    result = bench(record, range(7), jobs=[1, 2], sample=10, repeat=2)

    assert seen == set(range(7))  # the items are used in turn, then again
    for level in result.levels:
        assert level.items == 20
        assert level.errors == 0
        assert level.throughput > 0
        assert level.p50 is not None
        assert level.p99 is not None
        assert level.p50 <= level.p99
        assert level.peak_rss is not None
        assert level.peak_rss > 1_000_000


def test_thread_latency_excludes_wait_for_a_thread() -> None:
    # One thread runs the items one after another. An item's latency must
    # not cover the execution of the item before it, as it would if items
    # queued for the thread started their clocks early.
    spans: dict[int, tuple[float, float]] = {}

    def work(item: int) -> None:
        began = time.perf_counter()
        time.sleep(0.05)  # the work itself, not a wait for another thread
        spans[item] = (began, time.perf_counter())

    timings = EngineRunner()(work, [0, 1, 2, 3], 1)

    for item in [1, 2, 3]:
        latency = timings[item].latency
        assert latency is not None
        previous_start = spans[item - 1][0]
        assert latency < spans[item][1] - previous_start


def test_engine_run_counts_failures_as_errors() -> None:
    def fail_on_even(item: int) -> int:
        if item % 2 == 0:
            raise ValueError(f"even item {item}")
        return item

    result = bench(
        fail_on_even, lambda position: position, jobs=[2], sample=10, repeat=1
    )

    level = result.level(2)
    assert level.errors == 5
    assert level.error_rate == pytest.approx(0.5)
    assert level.throughput > 0  # the 5 items that succeeded


def test_engine_run_of_command_template() -> None:
    result = bench(["true"], [()], jobs=[1], sample=5, repeat=1, warmup=0)

    assert result.level(1).errors == 0
    assert result.recommended == 1


def test_engine_runner_timeout_counts_as_error() -> None:
    release = threading.Event()

    def hang(item: int) -> None:
        release.wait(60)

    try:
        result = bench(hang, [1], jobs=[1], sample=1, repeat=1, warmup=0, timeout=0.05)
    finally:
        release.set()

    assert result.level(1).errors == 1


def test_engine_runner_rejects_invalid_task() -> None:
    with pytest.raises(ConfigurationError, match="neither a callable"):
        bench(42, [1], jobs=[1], sample=1, repeat=1)


# -- argument checks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"jobs": []}, "jobs is empty"),
        ({"jobs": [0]}, "the level 0 must be from 1"),
        ({"jobs": [1, True]}, "True is not a whole number"),
        ({"jobs": [2, 1, 2]}, "the level 2 is given more than once"),
        ({"jobs": "1,2"}, "must be a list"),
        ({"sample": 0}, "sample=0"),
        ({"repeat": 0}, "repeat=0"),
        ({"warmup": -1}, "warmup=-1"),
        ({"max_p99": "soon"}, "invalid max_p99 'soon'"),
        ({"max_error_rate": 1.5}, "max_error_rate=1.5"),
        ({"max_error_rate": math.nan}, "max_error_rate=nan"),
        ({"knee_fraction": 0}, "knee_fraction=0"),
        ({"knee_fraction": 1.2}, "knee_fraction=1.2"),
    ],
)
def test_invalid_argument_raises(options: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"jobs": [1], **options}

    with pytest.raises(ConfigurationError, match=message):
        bench(print, [1], **arguments)


def test_empty_items_raise() -> None:
    with pytest.raises(ConfigurationError, match="items is empty"):
        bench(print, [], jobs=[1], measure_memory=False)


def test_string_items_raise() -> None:
    with pytest.raises(ConfigurationError, match="is a string"):
        bench(print, "http://127.0.0.1/", jobs=[1])


def test_runner_with_backend_raises() -> None:
    service = SimulatedService(capacity=1, latency=0.1, clock=FakeClock())

    with pytest.raises(ConfigurationError, match="configure that runner"):
        bench(None, [1], jobs=[1], runner=service, backend="thread")


def test_clock_that_stands_still_raises() -> None:
    def instant(task: Any, items: list[Any], concurrency: int) -> list[ItemTiming]:
        return [ItemTiming(0.0, True) for _ in items]

    with pytest.raises(ConfigurationError, match="did not advance"):
        bench(
            None,
            [1],
            jobs=[1],
            runner=instant,
            clock=FakeClock(),
            measure_memory=False,
        )


def test_engine_runner_is_default() -> None:
    assert EngineRunner() == EngineRunner(backend=None, timeout=None)


# -- formatting ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.00085, "850 us"),
        (0.0123, "12.3 ms"),
        (0.9996, "1 s"),
        (0.15, "150 ms"),
        (2.5, "2.5 s"),
    ],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_format_jobs_singular_and_plural() -> None:
    assert format_jobs(1) == "1 job"
    assert format_jobs(16) == "16 jobs"


# -- plots ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_result() -> BenchResult:
    service = SimulatedService(capacity=8, latency=0.1, clock=FakeClock())
    return simulated_bench(service, max_p99=0.15, knee_fraction=0.4)


def test_png_plot_is_valid_png(tmp_path: Path, limited_result: BenchResult) -> None:
    path = tmp_path / "bench.png"

    save_plot(limited_result, path)

    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 10_000


def test_svg_plot_has_drawn_paths(tmp_path: Path, limited_result: BenchResult) -> None:
    path = tmp_path / "bench.svg"

    save_plot(limited_result, path)

    root = ElementTree.parse(path).getroot()
    assert root.tag == f"{SVG_NAMESPACE}svg"
    paths = list(root.iter(f"{SVG_NAMESPACE}path"))
    assert len(paths) > 20
    assert "recommended: 4 jobs" in path.read_text()


def test_plot_rejects_other_extension(
    tmp_path: Path, limited_result: BenchResult
) -> None:
    path = tmp_path / "bench.gif"

    with pytest.raises(ConfigurationError, match=r"must end in \.png or \.svg"):
        save_plot(limited_result, path)

    assert not path.exists()


def test_plot_rejects_missing_folder(
    tmp_path: Path, limited_result: BenchResult
) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        save_plot(limited_result, tmp_path / "missing" / "bench.png")


def test_plot_without_matplotlib_names_the_extra(
    tmp_path: Path, limited_result: BenchResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes the import fail as if not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    with pytest.raises(ConfigurationError, match=r"pybatchtools\[plot\]"):
        save_plot(limited_result, tmp_path / "bench.png")
