"""The end-of-run summary: counts, duration, rate and failures by cause."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from batchtools.engine._outcome import Report

_PREVIEW = 60


def preview(item: Any) -> str:
    """Return a short, printable form of an item for messages."""
    if isinstance(item, tuple) and all(isinstance(v, bytes) for v in item):
        text = " ".join(os.fsdecode(v) for v in item)
    elif isinstance(item, bytes):
        text = os.fsdecode(item)
    elif isinstance(item, str):
        text = item
    else:
        try:
            text = repr(item)
        except ValueError:
            # repr() refuses integers of over 4,300 digits, alone or inside.
            text = f"<{type(item).__name__} too long to show>"
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = text.replace("\n", "\\n").replace("\t", "\\t")
    # The end of a long item, such as a path's file name, distinguishes items best.
    return text if len(text) <= _PREVIEW else "..." + text[3 - _PREVIEW :]


def summary_lines(
    report: Report, *, groups: int = 10, describe: Callable[[Any], str] = preview
) -> list[str]:
    """Return the summary of ``report`` as lines of plain text."""
    counts = report.counts
    parts = [
        f"{counts[name]} {name}"
        for name in counts
        if counts[name] or name in ("succeeded", "failed")
    ]
    lines = [
        f"{report.total} items: {', '.join(parts)} in "
        f"{format_duration(report.duration)} ({report.rate:,.1f} items/s)"
    ]
    if report.from_journal:
        lines.append(
            f"{report.from_journal} of the succeeded items were done in an earlier "
            "session of this run."
        )
    if report.abandoned_threads:
        lines.append(
            f"{report.abandoned_threads} thread attempts that timed out or were "
            "cancelled were still running at the end; threads cannot be killed."
        )
    if report.workers_lost:
        lines.append(f"{report.workers_lost} worker processes died during attempts.")
    if report.memory_kills:
        lines.append(
            f"{report.memory_kills} worker processes were killed for using more "
            "memory than allowed."
        )
    if report.workers_recycled:
        lines.append(
            f"{report.workers_recycled} worker processes were replaced after their "
            "share of items."
        )
    if report.memory_pauses:
        lines.append(
            f"Admission paused {report.memory_pauses} times for lack of memory, "
            f"for {format_duration(report.paused_seconds)} in all."
        )
    if report.strategies:
        used = ", ".join(
            f"{name} {count}" for name, count in report.strategies.most_common()
        )
        lines.append(f"Succeeded by fallback strategy: {used}.")
    if len(report.concurrency_limits) > 1:
        limits = [limit for _, limit in report.concurrency_limits]
        lines.append(
            f"Concurrency adapted {len(limits) - 1} times between {min(limits)} "
            f"and {max(limits)}, and ended at {limits[-1]}."
        )
    if report.cache_hits:
        lines.append(
            f"{report.cache_hits} of the succeeded items took their value from "
            "the result cache without running."
        )
    if report.cache_unstorable:
        lines.append(
            f"{report.cache_unstorable} values were kept in memory only, because "
            "the cache file stores JSON data and they need pickle."
        )
    if report.cache_errors:
        lines.append(
            f"Reading or writing the result cache's file failed {report.cache_errors} "
            "times; those values were not reused or not kept."
        )
    if report.rate_limited:
        lines.append(f"Attempts waited for the rate limit {report.rate_limited} times.")
    if report.circuit_transitions:
        opened = sum(1 for t in report.circuit_transitions if t.new.value == "open")
        last = report.circuit_transitions[-1]
        circuit = "the circuit" if last.key is None else f"the circuit of {last.key!r}"
        lines.append(
            f"Circuit breakers opened {opened} time{'s' if opened != 1 else ''}; "
            f"last, {circuit} became {last.new.value} ({last.reason})."
        )
    if report.halted:
        lines.append(f"Halted: {report.halted}.")
    common = report.failures.most_common()
    if common:
        lines.append("Failures by cause:")
    for group in common[:groups]:
        lines.append(f"  {group.count} x {group.cause}")
        for key, item in zip(group.examples, group.items, strict=True):
            lines.append(f"      {key[:16]}  {describe(item)}")
    if len(common) > groups:
        lines.append(f"  ... and {len(common) - groups} more causes")
    return lines


def format_duration(seconds: float) -> str:
    """Format seconds as ``1h02m``, ``3m05s`` or ``4.2s``."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
