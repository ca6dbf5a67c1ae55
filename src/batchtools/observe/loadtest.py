"""Load tests: measure a task at several concurrency levels and pick one.

`bench` runs the same task at each level of ``jobs``, in ascending order.
At each level it first runs a warm-up, whose numbers are dropped. Then it
runs ``repeat`` samples of ``sample`` items, each one call of the runner.
The default runner, `EngineRunner`, runs each sample through the engine
with that concurrency. For each level `bench` reports:

- throughput: succeeded items per second of sample time, so that a task
  that fails fast under load does not look faster;
- p50 and p99 latency of an item, from the start of its first attempt to
  the end of its last, taken from a `LogHistogram` (within 1 percent);
- error rate: the share of measured items that did not succeed;
- peak memory: the resident set size of this process plus all its
  descendants during the level, warm-up included.

The recommendation follows one rule, with ``knee_fraction`` 0.9 unless
given:

1. A level is within the limits when its p99 latency is at most
   ``max_p99`` and its error rate at most ``max_error_rate``. A limit that
   is not given is not checked.
2. The knee is the lowest level whose throughput is at least
   ``knee_fraction`` times the best throughput of all levels, so no level
   reaches more than ``1 / knee_fraction`` times the knee's throughput
   (1.11 times at 0.9). Throughput stops growing there.
3. When some levels are within the limits, the recommended level is the
   lowest of them whose throughput is at least ``knee_fraction`` times the
   best throughput among them: the knee of the levels within the limits.
4. When no level is within the limits, the recommended level is the one
   that breaks the fewest limits, the lowest one on a tie.

The runner and the clock are parameters, so that a simulated service on a
fake clock can check the rule: see `Runner`.

Example::

    result = bench(fetch, urls, jobs=[1, 2, 4, 8, 16], max_p99="200ms")
    print(result.recommended, result.reason)
    save_plot(result, "bench.png")
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, NamedTuple, Protocol

from batchtools._exceptions import ConfigurationError
from batchtools.engine._outcome import Outcome, Report, State
from batchtools.observe._histogram import LogHistogram
from batchtools.observe._loadtest_measure import ItemSource, PeakMemory
from batchtools.policy._units import parse_duration

__all__ = [
    "BenchResult",
    "EngineRunner",
    "ItemTiming",
    "LevelResult",
    "Runner",
    "bench",
    "format_jobs",
    "format_seconds",
    "save_plot",
]

log = logging.getLogger("batchtools.loadtest")

MAX_JOBS = 100_000
"""The highest concurrency level; the engine accepts no more."""


class ItemTiming(NamedTuple):
    """The measurement of one item of a sample.

    Attributes:
        latency: Seconds from the start of the item's first attempt to the
            end of its last, or ``None`` when it never started (skipped or
            cancelled).
        ok: Whether the item succeeded.
    """

    latency: float | None
    ok: bool


class Runner(Protocol):
    """Runs one sample: applies a task to a list of items at one concurrency.

    A runner returns one `ItemTiming` per item. `bench` times the call
    with its clock, so a simulated runner advances that clock by the time
    its sample would take.
    """

    def __call__(
        self, task: Any, items: list[Any], concurrency: int
    ) -> Sequence[ItemTiming]:
        """Run ``task`` on ``items`` with ``concurrency`` attempts at once."""
        ...


@dataclass(frozen=True, slots=True)
class EngineRunner:
    """A runner that runs each sample as one run of the engine, without a journal.

    Commands run on the subprocess backend, and callables on the thread or
    async backend, unless ``backend`` names another one. The run is the
    one `batchtools.run` makes, except that the thread and process
    backends queue no attempt ahead of their workers. Queued attempts would
    count their wait in the queue as latency, because an attempt's clock
    starts when it is handed to the backend.

    Attributes:
        backend: The backend, as `batchtools.run` takes it, or ``None``
            to choose it from the task.
        timeout: Seconds (or ``"30s"``) one attempt may take; an item that
            times out counts as an error.
    """

    backend: str | None = None
    timeout: float | str | None = None

    # NOTE: each sample is a new run, so the process backend starts its worker
    # processes in every sample, and that start-up counts in the sample's time.

    def __call__(
        self, task: Any, items: list[Any], concurrency: int
    ) -> list[ItemTiming]:
        """Run one sample and time each item from its attempts.

        Raises:
            ConfigurationError: The task or an option is invalid; nothing ran.
        """
        # Imported here: the engine's API loads the backends, which a caller
        # that brings its own runner does not need.
        from batchtools.engine._api import (
            _run_on_helper_thread,
            build_engine,
            prepare,
        )

        job = prepare(
            task,
            concurrency=concurrency,
            backend=self.backend,
            timeout=self.timeout,
            collect=True,
        )
        if getattr(job.backend, "queue_ahead", False):
            job.backend.queue_ahead = False  # type: ignore[attr-defined]

        async def run_sample() -> Report:
            return await build_engine(items, job, None).run()

        try:
            asyncio.get_running_loop()
        except RuntimeError:
            report = asyncio.run(run_sample())
        else:
            # An event loop runs in this thread (a notebook), as `run` allows.
            report = _run_on_helper_thread(run_sample)
        return [_timing(outcome) for outcome in report.outcomes]


def _timing(outcome: Outcome) -> ItemTiming:
    attempts = outcome.attempts
    if not attempts:
        return ItemTiming(None, outcome.state is State.SUCCEEDED)
    last = attempts[-1]
    latency = last.started + last.duration - attempts[0].started
    return ItemTiming(max(latency, 0.0), outcome.state is State.SUCCEEDED)


@dataclass(frozen=True, slots=True)
class LevelResult:
    """The measurements at one concurrency level.

    Attributes:
        jobs: The concurrency: attempts that ran at once, at most.
        items: Items measured, warm-up excluded.
        errors: Measured items that did not succeed.
        seconds: Sample time, summed over the samples.
        throughput: Succeeded items per second of sample time.
        sample_throughputs: The throughput of each sample, which shows
            how much the measurement varies.
        p50: The median latency in seconds, or ``None`` when no item
            started.
        p99: The 99th percentile of the latency in seconds, or ``None``.
        error_rate: ``errors / items``, from 0 to 1.
        peak_rss: The peak resident memory in bytes of this process plus
            its descendants during the level, or ``None`` when memory was
            not measured.
        violations: The limits that the level breaks, as text such as
            ``"p99 212 ms is above 150 ms"``; empty when it is within them.
    """

    jobs: int
    items: int
    errors: int
    seconds: float
    throughput: float
    sample_throughputs: tuple[float, ...]
    p50: float | None
    p99: float | None
    error_rate: float
    peak_rss: int | None
    violations: tuple[str, ...]

    @property
    def within_limits(self) -> bool:
        """Whether the level breaks none of the limits."""
        return not self.violations


@dataclass(frozen=True, slots=True)
class BenchResult:
    """The measurements at every level and the recommended concurrency.

    Attributes:
        levels: One result per level, in ascending order of concurrency.
        recommended: The recommended concurrency (see the module docstring).
        reason: One or two sentences that explain why it was recommended.
        knee: The lowest level whose throughput is at least
            ``knee_fraction`` times the best throughput, limits ignored.
        within_limits: Whether the recommended level is within the limits;
            false when no level is.
        max_p99: The latency limit in seconds, or ``None``.
        max_error_rate: The error limit, from 0 to 1, or ``None``.
        knee_fraction: The share of the best throughput that defines the knee.
        sample: Items in each sample.
        repeat: Samples measured at each level.
    """

    levels: tuple[LevelResult, ...]
    recommended: int
    reason: str
    knee: int
    within_limits: bool
    max_p99: float | None
    max_error_rate: float | None
    knee_fraction: float
    sample: int
    repeat: int

    def level(self, jobs: int) -> LevelResult:
        """Return the result of the level with concurrency ``jobs``.

        Raises:
            KeyError: No level had that concurrency.
        """
        for level in self.levels:
            if level.jobs == jobs:
                return level
        raise KeyError(jobs)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as plain data that `json.dumps` accepts."""
        data = asdict(self)
        for level, measured in zip(data["levels"], self.levels, strict=True):
            level["within_limits"] = measured.within_limits
        return data


def bench(
    task: Any,
    items: Iterable[Any] | Callable[[int], Any],
    *,
    jobs: Sequence[int],
    sample: int = 50,
    repeat: int = 3,
    warmup: int | None = None,
    max_p99: float | str | timedelta | None = None,
    max_error_rate: float | None = None,
    knee_fraction: float = 0.9,
    backend: str | None = None,
    timeout: float | str | None = None,
    runner: Runner | None = None,
    clock: Callable[[], float] = time.perf_counter,
    measure_memory: bool = True,
) -> BenchResult:
    """Measure ``task`` at each concurrency of ``jobs`` and recommend one.

    Args:
        task: What `batchtools.run` takes: a callable or a command template.
        items: The items to run. An iterable is used in turn, from its
            start again when it runs out. A callable is a factory: it is
            called with the position in the sample, from 1, for each item
            of every sample and warm-up.
        jobs: The concurrency levels, each at least 1, without repeats.
            They are measured in ascending order.
        sample: Items in each measured sample.
        repeat: Samples measured at each level.
        warmup: Items run at each level before the samples, whose numbers
            are dropped; 0 for none. The default is twice the level, so
            that every job slot runs at least twice.
        max_p99: The latency limit: seconds, a `timedelta` or text such as
            ``"200ms"``.
        max_error_rate: The error limit, from 0 to 1, such as 0.01.
        knee_fraction: The share of the best throughput that a level must
            reach to be the knee, above 0 and at most 1. With 1, the
            recommended level is the one with the best throughput.
        backend: The backend of the default runner.
        timeout: The attempt timeout of the default runner.
        runner: Runs each sample; `EngineRunner` by default.
        clock: Returns the time in seconds; it times each sample.
        measure_memory: Whether to sample the memory in use with psutil.

    Returns:
        The measurements and the recommended concurrency.

    Raises:
        ConfigurationError: An argument is invalid, ``items`` is empty, the
            runner rejected the task, or the clock did not advance during
            a sample.
    """
    levels = _checked_jobs(jobs)
    _check_count("sample", sample, minimum=1)
    _check_count("repeat", repeat, minimum=1)
    if warmup is not None:
        _check_count("warmup", warmup, minimum=0)
    latency_limit = None if max_p99 is None else parse_duration(max_p99, name="max_p99")
    _check_error_rate(max_error_rate)
    _check_knee_fraction(knee_fraction)
    if runner is None:
        runner = EngineRunner(backend=backend, timeout=timeout)
    elif backend is not None or timeout is not None:
        raise ConfigurationError(
            "backend and timeout configure the default runner, so they cannot be "
            f"combined with runner={runner!r}; configure that runner instead"
        )
    limits = _Limits(latency_limit, max_error_rate)
    source = ItemSource(items)
    measured: list[LevelResult] = []
    for jobs_level in levels:
        plan = _LevelPlan(
            jobs_level,
            sample,
            repeat,
            2 * jobs_level if warmup is None else warmup,
        )
        measured.append(
            _measure_level(plan, task, source, runner, clock, limits, measure_memory)
        )
    return _recommend(measured, limits, knee_fraction, sample, repeat)


def save_plot(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """Write a plot of throughput and latency against concurrency to ``path``.

    The format follows the extension: ``.png`` or ``.svg``. Drawing needs
    matplotlib, an optional dependency: ``pip install 'pybatchtools[plot]'``.

    Raises:
        ConfigurationError: The extension is neither ``.png`` nor ``.svg``,
            or matplotlib is not installed.
        OSError: The file cannot be written.
    """
    from batchtools.observe._loadtest_plot import write_plot

    write_plot(result, path)


def format_jobs(jobs: int) -> str:
    """Return ``"1 job"`` or ``"N jobs"``."""
    return "1 job" if jobs == 1 else f"{jobs} jobs"


def format_seconds(seconds: float) -> str:
    """Format a latency with three significant digits: ``850 us``, ``12.3 ms``."""
    for unit, scale in (("us", 1e6), ("ms", 1e3)):
        text = f"{seconds * scale:.3g}"
        if "e" not in text and float(text) < 1000:
            return f"{text} {unit}"
    return f"{seconds:.3g} s"


# -- measuring ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Limits:
    max_p99: float | None
    max_error_rate: float | None

    @property
    def given(self) -> int:
        return (self.max_p99 is not None) + (self.max_error_rate is not None)

    def describe(self) -> str:
        parts = []
        if self.max_p99 is not None:
            parts.append(f"p99 at most {format_seconds(self.max_p99)}")
        if self.max_error_rate is not None:
            parts.append(f"error rate at most {_format_percent(self.max_error_rate)}")
        return " and ".join(parts)

    def violations(self, p99: float | None, error_rate: float) -> tuple[str, ...]:
        broken = []
        if self.max_p99 is not None:
            if p99 is None:
                broken.append("no latency was measured, because no item started")
            elif p99 > self.max_p99:
                broken.append(
                    f"p99 {format_seconds(p99)} is above {format_seconds(self.max_p99)}"
                )
        if self.max_error_rate is not None and error_rate > self.max_error_rate:
            broken.append(
                f"error rate {_format_percent(error_rate)} is above "
                f"{_format_percent(self.max_error_rate)}"
            )
        return tuple(broken)


class _LevelPlan(NamedTuple):
    jobs: int
    sample: int
    repeat: int
    warmup: int


def _measure_level(
    plan: _LevelPlan,
    task: Any,
    source: ItemSource,
    runner: Runner,
    clock: Callable[[], float],
    limits: _Limits,
    measure_memory: bool,
) -> LevelResult:
    log.info(
        "%s: warm-up of %d items, then %d samples of %d",
        format_jobs(plan.jobs),
        plan.warmup,
        plan.repeat,
        plan.sample,
    )
    histogram = LogHistogram()
    throughputs: list[float] = []
    errors = 0
    seconds = 0.0
    memory = PeakMemory() if measure_memory else contextlib.nullcontext(None)
    with memory as peak:
        if plan.warmup:
            runner(task, source.take(plan.warmup), plan.jobs)
        for _ in range(plan.repeat):
            batch = source.take(plan.sample)
            timings, elapsed = _timed_sample(runner, task, batch, plan.jobs, clock)
            succeeded = sum(1 for timing in timings if timing.ok)
            errors += len(batch) - succeeded
            seconds += elapsed
            throughputs.append(succeeded / elapsed)
            histogram.update(t.latency for t in timings if t.latency is not None)

    items = plan.sample * plan.repeat
    p50, p99 = histogram.quantiles([0.5, 0.99])
    error_rate = errors / items
    level = LevelResult(
        jobs=plan.jobs,
        items=items,
        errors=errors,
        seconds=seconds,
        throughput=(items - errors) / seconds,
        sample_throughputs=tuple(throughputs),
        p50=p50,
        p99=p99,
        error_rate=error_rate,
        peak_rss=None if peak is None else peak.peak,
        violations=limits.violations(p99, error_rate),
    )
    _log_level(level)
    return level


def _timed_sample(
    runner: Runner,
    task: Any,
    batch: list[Any],
    jobs: int,
    clock: Callable[[], float],
) -> tuple[Sequence[ItemTiming], float]:
    """Run one sample and return its timings and the seconds it took."""
    started = clock()
    timings = runner(task, batch, jobs)
    elapsed = clock() - started
    if not elapsed > 0:
        raise ConfigurationError(
            f"the clock {clock!r} did not advance while a sample of "
            f"{len(batch)} items ran; pass a clock that the runner "
            "advances, such as time.perf_counter"
        )
    return timings, elapsed


def _log_level(level: LevelResult) -> None:
    log.info(
        "%s: %.1f items/s, p50 %s, p99 %s, %s errors",
        format_jobs(level.jobs),
        level.throughput,
        "-" if level.p50 is None else format_seconds(level.p50),
        "-" if level.p99 is None else format_seconds(level.p99),
        _format_percent(level.error_rate),
    )


# -- the recommendation -----------------------------------------------------------


def _recommend(
    levels: list[LevelResult],
    limits: _Limits,
    knee_fraction: float,
    sample: int,
    repeat: int,
) -> BenchResult:
    knee = _knee(levels, knee_fraction)
    within = [level for level in levels if level.within_limits]
    if within:
        chosen = _knee(within, knee_fraction)
        reason = _knee_reason(chosen, within, limits, knee_fraction)
    else:
        fewest = min(len(level.violations) for level in levels)
        chosen = next(level for level in levels if len(level.violations) == fewest)
        reason = (
            f"No level was within the limits ({limits.describe()}). "
            f"{format_jobs(chosen.jobs)} breaks the fewest of them ({fewest} of "
            f"{limits.given}) and is the lowest such level."
        )
    return BenchResult(
        levels=tuple(levels),
        recommended=chosen.jobs,
        reason=reason,
        knee=knee.jobs,
        within_limits=bool(within),
        max_p99=limits.max_p99,
        max_error_rate=limits.max_error_rate,
        knee_fraction=knee_fraction,
        sample=sample,
        repeat=repeat,
    )


def _knee(levels: list[LevelResult], knee_fraction: float) -> LevelResult:
    """Return the lowest level that reaches ``knee_fraction`` of the best throughput."""
    best = max(level.throughput for level in levels)
    return next(level for level in levels if level.throughput >= knee_fraction * best)


def _knee_reason(
    chosen: LevelResult,
    candidates: list[LevelResult],
    limits: _Limits,
    knee_fraction: float,
) -> str:
    best = max(candidates, key=lambda level: level.throughput)
    if best.throughput == 0:
        return (
            "No item succeeded at any level within the limits, so the lowest "
            f"level, {format_jobs(chosen.jobs)}, is recommended."
        )
    within = f" within the limits ({limits.describe()})" if limits.given else ""
    share = f"{knee_fraction * 100:g}%"
    return (
        f"{format_jobs(chosen.jobs)} is the lowest level{within} whose throughput "
        f"({chosen.throughput:,.1f} items/s) reaches {share} of the best "
        f"({best.throughput:,.1f} items/s at {format_jobs(best.jobs)})."
    )


# -- checks -------------------------------------------------------------------------


def _checked_jobs(jobs: Sequence[int]) -> list[int]:
    if isinstance(jobs, str | bytes) or not isinstance(jobs, Sequence):
        raise ConfigurationError(
            f"jobs={jobs!r} must be a list of concurrency levels, such as [1, 2, 4, 8]"
        )
    if not jobs:
        raise ConfigurationError(
            "jobs is empty; give at least one concurrency level, such as [1, 2, 4, 8]"
        )
    for value in jobs:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(
                f"jobs={list(jobs)!r}: the level {value!r} is not a whole number"
            )
        if not 1 <= value <= MAX_JOBS:
            raise ConfigurationError(
                f"jobs={list(jobs)!r}: the level {value} must be from 1 to {MAX_JOBS:,}"
            )
    repeated = sorted(
        value for value, count in collections.Counter(jobs).items() if count > 1
    )
    if repeated:
        raise ConfigurationError(
            f"jobs={list(jobs)!r}: the level {repeated[0]} is given more than once"
        )
    return sorted(jobs)


def _check_count(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(
            f"{name}={value!r} must be a whole number of at least {minimum}"
        )


def _check_error_rate(value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            f"max_error_rate={value!r} must be a number from 0 to 1, such as 0.01"
        )
    if not 0 <= value <= 1:
        raise ConfigurationError(
            f"max_error_rate={value!r} must be from 0 to 1, such as 0.01 for 1%"
        )


def _check_knee_fraction(value: float) -> None:
    valid = isinstance(value, int | float) and not isinstance(value, bool)
    if not valid or not (math.isfinite(value) and 0 < value <= 1):
        raise ConfigurationError(
            f"knee_fraction={value!r} must be above 0 and at most 1, such as 0.9"
        )


def _format_percent(share: float) -> str:
    return "0%" if share == 0 else f"{share * 100:.3g}%"
