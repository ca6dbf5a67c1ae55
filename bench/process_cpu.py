"""Workload 4: many tiny CPU-bound items on 2 worker processes.

Each item runs `_tasks.spin`, a Python loop. Its length is calibrated at
the start so that one item costs about 15 us on this machine, and the
measured cost is reported. Every contender receives the same
`functools.partial(spin, length=...)`, which pickles by reference to
`_tasks.spin`. At that size the per-item cost of moving work to a
process dominates, so the workload shows whether batchtools' chunking keeps
up with the pools that batch for the caller.

The baselines are each library's documented way to map a function over
items: joblib's `Parallel(n_jobs=2)` with its automatic batching,
mpire's `WorkerPool(n_jobs=2).map` with its default chunk size, and
`ProcessPoolExecutor(2).map(chunksize=100)`, a hand-tuned chunk size. Every
contender creates and shuts down its pool inside the timed call, and its
start-up (a call with 2 items) is measured separately, so the tables show
both the whole call and the call minus start-up. joblib's loky backend
keeps its workers alive between calls, so from the second call on its
start-up is close to zero.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from _common import (
    Config,
    Row,
    Target,
    WorkloadResult,
    compare,
    log,
    main_for,
    measure_interleaved,
    median,
    spread,
    time_call,
)
from _tasks import spin

import batchtools

WORKERS = 2
TARGET_ITEM_SECONDS = 15e-6
EXECUTOR_CHUNKSIZE = 100
_PROBE_LENGTH = 1000
_PROBE_ITEMS = 2000

Task = Callable[[int], int]


def seconds_per_item(task: Task, items: int) -> float:
    """Return the median per-item seconds of ``task`` over 5 sequential passes."""
    passes = []
    for _ in range(5):
        start = time.perf_counter()
        for item in range(items):
            task(item)
        passes.append((time.perf_counter() - start) / items)
    return median(passes)


def calibrate_length() -> int:
    """Return the loop length at which `spin` takes about 15 us on this machine."""
    probe = seconds_per_item(
        functools.partial(spin, length=_PROBE_LENGTH), _PROBE_ITEMS
    )
    return max(1, round(_PROBE_LENGTH * TARGET_ITEM_SECONDS / probe))


def run_batchtools(task: Task, count: int) -> None:
    """Map ``task`` over ``count`` items on the process backend."""
    report = batchtools.run(range(count), task, concurrency=WORKERS, backend="process")
    if not report.ok or report.total != count:
        raise RuntimeError(f"batchtools run did not finish every item: {report!r}")


def run_joblib(task: Task, count: int) -> None:
    """Map ``task`` over ``count`` items with joblib's default (loky) backend."""
    import joblib

    joblib.Parallel(n_jobs=WORKERS)(joblib.delayed(task)(item) for item in range(count))


def run_mpire(task: Task, count: int) -> None:
    """Map ``task`` over ``count`` items with an mpire worker pool."""
    from mpire.pool import WorkerPool

    with WorkerPool(n_jobs=WORKERS) as pool:
        pool.map(task, range(count))


def run_executor(task: Task, count: int) -> None:
    """Map ``task`` over ``count`` items with `ProcessPoolExecutor` in chunks."""
    with ProcessPoolExecutor(WORKERS) as executor:
        list(executor.map(task, range(count), chunksize=EXECUTOR_CHUNKSIZE))


RUNNERS: dict[str, Callable[[Task, int], None]] = {
    "batchtools": run_batchtools,
    "joblib": run_joblib,
    "mpire": run_mpire,
    "ProcessPoolExecutor": run_executor,
}
BASELINE_TARGETS = {
    "joblib": ("joblib.Parallel", 1.0),
    "mpire": ("mpire WorkerPool.map", 1.0),
    "ProcessPoolExecutor": (
        f"ProcessPoolExecutor.map(chunksize={EXECUTOR_CHUNKSIZE})",
        0.8,
    ),
}


def _timer(runner: Callable[[Task, int], None], task: Task, count: int) -> float:
    return time_call(lambda: runner(task, count))


def build_contenders(task: Task, count: int) -> dict[str, Callable[[], float]]:
    """Return a start-up call (2 items) and a full call for every contender."""
    contenders: dict[str, Callable[[], float]] = {}
    for name, runner in RUNNERS.items():
        contenders[f"{name} start-up"] = functools.partial(_timer, runner, task, 2)
        contenders[name] = functools.partial(_timer, runner, task, count)
    return contenders


def build_rows(samples: dict[str, list[float]], count: int) -> list[Row]:
    """Compare batchtools with each baseline: start-up, whole call, net of start-up."""
    medians = {name: median(values) for name, values in samples.items()}
    ours_total = medians["batchtools"]
    ours_startup = medians["batchtools start-up"]
    rows = []
    for name, (label, bound) in BASELINE_TARGETS.items():
        total = medians[name]
        startup = medians[f"{name} start-up"]
        rows.append(
            compare(
                "start-up: 2 items, whole call",
                ("batchtools.run", ours_startup),
                (label, startup),
                None,
            )
        )
        rows.append(
            compare(
                f"{count:,} items, whole call",
                ("batchtools.run", ours_total),
                (label, total),
                Target("at least", bound),
            )
        )
        rows.append(
            compare(
                f"{count:,} items minus start-up",
                ("batchtools.run", ours_total - ours_startup),
                (label, total - startup),
                Target("at least", bound),
            )
        )
    return rows


def measure(config: Config) -> WorkloadResult:
    """Time batchtools' process backend against joblib, mpire and the executor."""
    count = 20_000 if config.quick else 200_000
    length = calibrate_length()
    task = functools.partial(spin, length=length)
    item_seconds = seconds_per_item(task, _PROBE_ITEMS)
    log(
        f"workload 4: {count:,} CPU items of {item_seconds * 1e6:.1f} us "
        f"(a {length}-integer loop), {WORKERS} processes"
    )
    samples = measure_interleaved(build_contenders(task, count), config.runs)

    result = WorkloadResult(
        title="4. Tiny CPU items, 2 processes",
        summary=(
            f"`batchtools.run(range(N), task, concurrency={WORKERS}, "
            'backend="process")` '
            f"against `joblib.Parallel(n_jobs={WORKERS})`, "
            f"`mpire.WorkerPool(n_jobs={WORKERS}).map` and "
            f"`ProcessPoolExecutor({WORKERS}).map(task, items, "
            f"chunksize={EXECUTOR_CHUNKSIZE})`. The task sums {length} consecutive "
            "integers in a Python loop. Start-up is a call with 2 items, timed "
            "separately; the last row of each baseline subtracts each "
            "contender's own start-up from its whole call. joblib (loky) keeps "
            "its workers between calls, so its start-up after the first call is "
            "almost nothing."
        ),
        rows=build_rows(samples, count),
    )

    serial = item_seconds * count
    result.notes.append(
        f"Measured task cost: {item_seconds * 1e6:.1f} us per item in this "
        f"process, so {serial:.2f} s of work for {count:,} items, or "
        f"{serial / WORKERS:.2f} s on {WORKERS} CPUs with no overhead."
    )
    result.notes.append(spread(samples, "s"))
    return result


if __name__ == "__main__":
    main_for(measure, __doc__ or "")
