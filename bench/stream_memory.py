"""Workload 6: peak memory of `batchtools.stream` over 10 million items.

A stream without a journal keeps no outcome once the caller has taken it,
so its peak RSS should not grow with the number of items. This runs 10
million async no-op items (1 million with ``--quick``) and a tenth as many,
each in a fresh interpreter, and compares the peak RSS of the two
(``VmHWM``, which includes the interpreter and its imports; `ru_maxrss`
would include the parent's peak, see `_common.peak_rss_mb`). Comparing
batchtools with itself at two sizes isolates the memory that grows with
the input.
"""

from __future__ import annotations

import functools

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

RSS_LIMIT_MB = 100.0


def stream_child(count: int, seconds: dict[int, list[float]]) -> float:
    """Stream ``count`` items in a child, keep its time, return its peak RSS in MB."""
    result = run_child(["stream", str(count)])
    if result["count"] != count:
        raise RuntimeError(f"the stream yielded {result['count']} of {count} items")
    seconds.setdefault(count, []).append(result["seconds"])
    return result["rss_mb"]


def limit_row(measured: str, label: str, value: float) -> Row:
    """Build the row that checks the large stream's peak RSS against the limit."""
    return Row(
        measured=measured,
        contender=(label, value),
        baseline=None,
        unit="MB",
        ratio=None,
        target=f"< {RSS_LIMIT_MB:g} MB",
        met=value < RSS_LIMIT_MB,
    )


def measure(config: Config) -> WorkloadResult:
    """Compare the peak RSS of streams over N and N / 10 items."""
    large = 1_000_000 if config.quick else 10_000_000
    small = large // 10
    log(f"workload 6: peak RSS of a stream over {large:,} and {small:,} items")
    seconds: dict[int, list[float]] = {}
    samples = measure_interleaved(
        {
            f"{large:,} items": functools.partial(stream_child, large, seconds),
            f"{small:,} items": functools.partial(stream_child, small, seconds),
        },
        config.runs,
    )
    large_rss = median(samples[f"{large:,} items"])
    small_rss = median(samples[f"{small:,} items"])
    measured = "peak RSS of a fresh process"
    result = WorkloadResult(
        title="6. Stream memory",
        summary=(
            f"`for outcome in batchtools.stream(range(N), noop, concurrency=100)` "
            f"in a fresh interpreter, with N = {large:,} against N = {small:,}, "
            "without a journal. The figures are peak RSS of the "
            "whole child process (`VmHWM`; `ru_maxrss` is not used because Linux "
            "carries the parent's peak into it across exec), in MB of 2^20 "
            "bytes, interpreter and imports included. The ratio is the large "
            "run's peak over the small run's."
        ),
    )
    result.rows.append(
        compare(
            measured,
            (f"{large:,} items", large_rss),
            (f"{small:,} items", small_rss),
            Target("at most", 1.1),
            unit="MB",
        )
    )
    result.rows.append(limit_row(measured, f"{large:,} items", large_rss))
    large_seconds = median(seconds[large])
    result.notes.append(
        f"Time of the large stream: {large_seconds:.1f} s (median), "
        f"{large_seconds / large * 1e6:.1f} us per item; the small one "
        f"{median(seconds[small]):.2f} s."
    )
    result.notes.append(spread(samples, "MB"))
    return result


if __name__ == "__main__":
    main_for(measure, __doc__ or "")
