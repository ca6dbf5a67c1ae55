"""Workload 3: many sync no-op items on the thread backend, 8 threads.

This measures the thread backend's cost per item. The task returns at once,
so the figure is pure overhead. The baseline is the standard library's
`ThreadPoolExecutor(8).map`, collected into a list as a caller would, with
the executor created and shut down inside the timed call just as
`batchtools.run` starts and stops its threads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from _common import (
    Config,
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
from _tasks import noop_sync

import batchtools

THREADS = 8


def run_batchtools(count: int) -> None:
    """Run `noop_sync` on ``count`` items on the thread backend and check the report."""
    report = batchtools.run(
        range(count), noop_sync, concurrency=THREADS, backend="thread"
    )
    if not report.ok or report.total != count:
        raise RuntimeError(f"batchtools run did not finish every item: {report!r}")


def run_executor(count: int) -> None:
    """Run `noop_sync` on ``count`` items with `ThreadPoolExecutor.map`."""
    with ThreadPoolExecutor(THREADS) as executor:
        list(executor.map(noop_sync, range(count)))


def measure(config: Config) -> WorkloadResult:
    """Time batchtools' thread backend against `ThreadPoolExecutor.map`."""
    count = 10_000 if config.quick else 100_000
    log(f"workload 3: {count:,} sync no-op items, {THREADS} threads")
    samples = measure_interleaved(
        {
            "batchtools": lambda: time_call(lambda: run_batchtools(count)),
            "ThreadPoolExecutor": lambda: time_call(lambda: run_executor(count)),
        },
        config.runs,
    )
    ours = median(samples["batchtools"])
    result = WorkloadResult(
        title="3. Thread no-op items",
        summary=(
            f"`batchtools.run(range(N), f, concurrency={THREADS}, "
            'backend="thread")` against '
            f"`list(ThreadPoolExecutor({THREADS}).map(f, range(N)))`, where `f` "
            "returns at once, so the time is the per-item overhead of each pool."
        ),
    )
    result.rows.append(
        compare(
            f"{count:,} items, whole call",
            ("batchtools.run", ours),
            ("ThreadPoolExecutor.map", median(samples["ThreadPoolExecutor"])),
            Target("at least", 1.0),
        )
    )
    result.notes.append(f"batchtools: {ours / count * 1e6:.1f} us per item (median).")
    result.notes.append(spread(samples, "s"))
    return result


if __name__ == "__main__":
    main_for(measure, __doc__ or "")
