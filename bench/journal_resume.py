"""Workload 7: resuming a run whose journal already has every item done.

A resume must read the input again, compute each item's key and look it up
in the journal, so its floor is one pass that hashes every item. The
baseline is that pass alone: `hashlib.blake2b(repr(item).encode())` for
every item, in a fresh interpreter like the resume. The journal is built
once, before the timed runs, by a first `batchtools.run` of the same
no-op async task; every timed resume then finds all items done.

Memory: `run` returns a report with an outcome for every item, so its peak
RSS grows with the input by design. The same resume through `stream`, which
keeps no outcomes, shows whether reading the journal itself stays flat. Both
are measured at N and at N / 10 items, each size with its own journal.
"""

from __future__ import annotations

import functools
import shutil
import tempfile
from pathlib import Path

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
    run_child,
    spread,
)

FLAT_BOUND = 1.1  # peak RSS at N over peak RSS at N / 10, as in workload 6


def build_journal(count: int, path: Path) -> float:
    """Run ``count`` items once with the journal at ``path``; return the seconds."""
    log(f"  building a journal of {count:,} items at {path}")
    result = run_child(["build-journal", str(count), str(path)])
    if result["count"] != 0:
        raise RuntimeError(f"{path} already had {result['count']} items done")
    return result["seconds"]


def child_measure(
    arguments: list[str], count: int, key: str, rss: dict[str, list[float]]
) -> float:
    """Run a child; keep its peak RSS under ``key`` and return its seconds."""
    result = run_child(arguments)
    if result["count"] != count:
        raise RuntimeError(
            f"{' '.join(arguments)} processed {result['count']} of {count} items"
        )
    rss.setdefault(key, []).append(result["rss_mb"])
    return result["seconds"]


def build_contenders(
    large: int, small: int, journals: dict[int, Path], rss: dict[str, list[float]]
) -> dict[str, functools.partial[float]]:
    """Return the timed resume, the hashing pass and the memory-only resumes."""
    runs = {
        f"resume {large:,}": (["resume", str(large), str(journals[large])], large),
        f"hash {large:,}": (["hash", str(large)], large),
        f"resume {small:,}": (["resume", str(small), str(journals[small])], small),
        f"resume-stream {large:,}": (
            ["resume-stream", str(large), str(journals[large])],
            large,
        ),
        f"resume-stream {small:,}": (
            ["resume-stream", str(small), str(journals[small])],
            small,
        ),
    }
    return {
        name: functools.partial(child_measure, arguments, count, name, rss)
        for name, (arguments, count) in runs.items()
    }


def memory_rows(large: int, small: int, rss: dict[str, list[float]]) -> list[Row]:
    """Compare the peak RSS of each kind of resume at N and at N / 10."""
    rows = []
    for mode, label in (("resume", "run()"), ("resume-stream", "stream()")):
        rows.append(
            compare(
                f"resume through {label}: peak RSS",
                (f"{large:,} items", median(rss[f"{mode} {large:,}"])),
                (f"{small:,} items", median(rss[f"{mode} {small:,}"])),
                Target("at most", FLAT_BOUND),
                unit="MB",
            )
        )
    return rows


def measure(config: Config) -> WorkloadResult:
    """Time a resume with every item done against one hashing pass."""
    large = 100_000 if config.quick else 1_000_000
    small = large // 10
    log(f"workload 7: resume of {large:,} and {small:,} items, all done")
    folder = Path(tempfile.mkdtemp(prefix="batchtools-bench-"))
    try:
        journals = {count: folder / f"run-{count}.db" for count in (large, small)}
        build_seconds = build_journal(large, journals[large])
        build_journal(small, journals[small])
        rss: dict[str, list[float]] = {}
        samples = measure_interleaved(
            build_contenders(large, small, journals, rss), config.runs
        )
    finally:
        shutil.rmtree(folder)
    result = WorkloadResult(
        title="7. Resume with every item done",
        summary=(
            f"A second `batchtools.run(range(N), noop, concurrency=100, "
            f"journal=path)` over a journal where all N = {large:,} items "
            "succeeded, against hashing each item once "
            "(`hashlib.blake2b(repr(item).encode()).digest()`). Both run in "
            "fresh interpreters, timed inside, without start-up and imports. "
            f"Memory is peak RSS in MB of 2^20 bytes at N and N = {small:,}; "
            f"flat means the larger at most {FLAT_BOUND:g} times the smaller."
        ),
    )
    result.rows.append(
        compare(
            f"{large:,} items, resume call",
            ("batchtools.run", median(samples[f"resume {large:,}"])),
            ("one hashing pass", median(samples[f"hash {large:,}"])),
            Target("at most", 3.0),
        )
    )
    result.rows.extend(memory_rows(large, small, rss))
    result.notes.append(
        f"Building the {large:,}-item journal (first run, once, not part of the "
        f"comparison) took {build_seconds:.1f} s. Resume through `stream()` took "
        f"{median(samples[f'resume-stream {large:,}']):.2f} s (median)."
    )
    result.notes.append(spread(samples, "s", heading="Seconds over the runs"))
    result.notes.append(spread(rss, "MB", heading="Peak RSS over the runs"))
    return result


if __name__ == "__main__":
    main_for(measure, __doc__ or "")
