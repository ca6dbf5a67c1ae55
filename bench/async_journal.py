"""Workload 2: the cost of the journal on many async no-op items.

The same run as workload 1 (`batchtools.run`, concurrency 100, a task that
yields once) with ``journal=`` a fresh file against the same run without
one. Both sides are batchtools, so the ratio isolates what recording every
item durably costs. Each journal goes in a new temporary folder, created
before and deleted after the timed call.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

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
)
from _tasks import noop_async

import batchtools

CONCURRENCY = 100


def time_run(count: int, journal: bool) -> float:
    """Return the seconds of one run of ``count`` items, with or without a journal."""
    folder = Path(tempfile.mkdtemp(prefix="batchtools-bench-"))
    try:
        path = folder / "run.db" if journal else None
        start = time.perf_counter()
        report = batchtools.run(
            range(count), noop_async, concurrency=CONCURRENCY, journal=path
        )
        elapsed = time.perf_counter() - start
    finally:
        shutil.rmtree(folder)
    if not report.ok or report.total != count:
        raise RuntimeError(f"batchtools run did not finish every item: {report!r}")
    return elapsed


def measure(config: Config) -> WorkloadResult:
    """Time runs with and without a journal, interleaved."""
    count = 10_000 if config.quick else 100_000
    log(f"workload 2: {count:,} async no-op items with and without a journal")
    samples = measure_interleaved(
        {
            "journal": lambda: time_run(count, journal=True),
            "no journal": lambda: time_run(count, journal=False),
        },
        config.runs,
    )
    with_journal = median(samples["journal"])
    result = WorkloadResult(
        title="2. Journal overhead",
        summary=(
            f"`batchtools.run(range(N), noop, concurrency={CONCURRENCY}, "
            "journal=path)` with a new journal file each run, against the same "
            "call without a journal. The ratio is the time with the journal "
            "over the time without."
        ),
    )
    result.rows.append(
        compare(
            f"{count:,} items, whole call",
            ("with journal", with_journal),
            ("without journal", median(samples["no journal"])),
            Target("at most", 2.0),
        )
    )
    per_item_us = with_journal / count * 1e6
    result.notes.append(f"With the journal: {per_item_us:.1f} us per item (median).")
    result.notes.append(spread(samples, "s"))
    return result


if __name__ == "__main__":
    main_for(measure, __doc__ or "")
