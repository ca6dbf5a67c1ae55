"""Workload 1: many async no-op items at concurrency 100, without a journal.

This measures the engine's own cost per item on the async backend. Each
item's task yields to the event loop once (``await asyncio.sleep(0)``), as a
task waiting on I/O does, so the figure is the fixed cost that a real I/O
task pays on top of its own waiting.

The baselines are fair because they do the same work with less machinery:
the raw pool is 100 worker coroutines pulling items from one shared
iterator, the cheapest correct shape in asyncio; aiometer's `run_on_each`
is its fastest entry point (its `amap` also collects results and is slower
here). Neither baseline keeps results, while `batchtools.run` returns a
report holding an outcome for every item. Every contender starts its own
event loop with `asyncio.run`, inside the timed call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence

import aiometer
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
from _tasks import noop_async

import batchtools

CONCURRENCY = 100


async def raw_pool(items: Iterable[int], workers: int) -> None:
    """Run `noop_async` on every item in ``workers`` coroutines sharing an iterator."""
    iterator = iter(items)

    async def worker() -> None:
        for item in iterator:
            await noop_async(item)

    await asyncio.gather(*(worker() for _ in range(workers)))


async def with_aiometer(items: Sequence[int], workers: int) -> None:
    """Run `noop_async` on every item through aiometer with ``workers`` at once."""
    await aiometer.run_on_each(noop_async, items, max_at_once=workers)


def run_batchtools(count: int) -> None:
    """Run `noop_async` on ``count`` items with batchtools and check the report."""
    report = batchtools.run(range(count), noop_async, concurrency=CONCURRENCY)
    if not report.ok or report.total != count:
        raise RuntimeError(f"batchtools run did not finish every item: {report!r}")


def measure(config: Config) -> WorkloadResult:
    """Time batchtools, the raw pool and aiometer on the same no-op items."""
    count = 10_000 if config.quick else 100_000
    log(f"workload 1: {count:,} async no-op items, concurrency {CONCURRENCY}")
    samples = measure_interleaved(
        {
            "batchtools": lambda: time_call(lambda: run_batchtools(count)),
            "raw pool": lambda: time_call(
                lambda: asyncio.run(raw_pool(range(count), CONCURRENCY))
            ),
            "aiometer": lambda: time_call(
                lambda: asyncio.run(with_aiometer(range(count), CONCURRENCY))
            ),
        },
        config.runs,
    )
    ours = ("batchtools.run", median(samples["batchtools"]))
    measured = f"{count:,} items, whole call"
    result = WorkloadResult(
        title="1. Async no-op items",
        summary=(
            f"`batchtools.run(range(N), noop, concurrency={CONCURRENCY})` against "
            f"{CONCURRENCY} worker coroutines pulling from one shared iterator "
            f"(raw pool) and `aiometer.run_on_each(noop, items, "
            f"max_at_once={CONCURRENCY})`, without a journal. The task is "
            "`async def noop(x): await asyncio.sleep(0)` for all three: it "
            "yields to the event loop once, like any I/O task, so the time is "
            "the per-item overhead of each scheduler. The baselines keep no "
            "results; `batchtools.run` returns a report with every outcome."
        ),
    )
    result.rows.append(
        compare(
            measured,
            ours,
            ("raw pool", median(samples["raw pool"])),
            Target("at least", 0.35),
        )
    )
    result.rows.append(
        compare(
            measured,
            ours,
            ("aiometer", median(samples["aiometer"])),
            Target("at least", 4.0),
        )
    )
    per_item_us = ours[1] / count * 1e6
    result.notes.append(f"batchtools: {per_item_us:.1f} us per item (median).")
    result.notes.append(spread(samples, "s"))
    return result


if __name__ == "__main__":
    main_for(measure, __doc__ or "")
