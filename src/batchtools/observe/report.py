"""The report of a run read from its journal: summary, failure groups, slowest items.

`read_report` reads a journal (read-only, so also while its run is live)
and returns a `JournalReport`. `report_lines` turns it into the text that
``batchtools report`` prints, `report_data` into the JSON data of
``--json``, and `batchtools.observe.html_report.write_html` into a page.

Failures are grouped by cause exactly as the end-of-run summary groups
them (the engine's `FailureGroups`), from the errors the journal recorded.
Example::

    report = read_report("runs/thumbs.db", top=5)
    print("\\n".join(report_lines(report)))
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import filelock

from batchtools.engine._engine import error_from_json
from batchtools.engine._outcome import COUNT_KEYS, FailureGroups, Report
from batchtools.journal import ItemTrace, JournalReader, RunRecord
from batchtools.observe._summary import format_duration, preview, summary_lines

__all__ = ["JournalReport", "is_live", "read_report", "report_data", "report_lines"]

STATE_ORDER = (
    "succeeded",
    "failed",
    "skipped",
    "cancelled",
    "pending",
    "running",
    "retrying",
)


@dataclass(slots=True)
class JournalReport:
    """What a journal records about its run.

    Attributes:
        path: The journal file.
        run: The run record.
        state: ``running`` while a live process has the writer lock;
            ``interrupted`` for a run that stopped early or whose process
            died; ``finished``.
        counts: Items in each state, including ``pending``, ``running`` and
            ``retrying``.
        span: When the first recorded attempt started and the last ended,
            in seconds since the epoch, or ``None`` without attempts.
        attempts: Attempts recorded.
        failed_attempts: How many of them failed.
        failures: Failed items grouped by cause.
        slowest: The items whose last attempt took longest, longest first.
    """

    path: Path
    run: RunRecord
    state: str
    counts: dict[str, int]
    span: tuple[float, float] | None
    attempts: int
    failed_attempts: int
    failures: FailureGroups
    slowest: list[ItemTrace]

    @property
    def duration(self) -> float:
        """Seconds from the first attempt's start to the last attempt's end."""
        return 0.0 if self.span is None else self.span[1] - self.span[0]


def is_live(path: str | os.PathLike[str]) -> bool:
    """Return whether a live process holds the journal's writer lock."""
    lock = filelock.FileLock(str(path) + ".lock", timeout=0, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        return True
    except OSError:
        return False  # No lock file can be made, so no run can hold one.
    lock.release()
    return False


def read_report(path: str | os.PathLike[str], *, top: int = 10) -> JournalReport:
    """Read the report of the run in the journal at ``path``.

    Args:
        path: The journal file.
        top: How many of the slowest items to read.

    Raises:
        JournalError: The journal is missing, damaged or cannot be read.
    """
    journal_path = Path(path)
    with JournalReader(journal_path) as reader:
        run = reader.run()
        counts = reader.counts()
        span = reader.span()
        attempts, failed_attempts = reader.attempt_counts()
        failures = FailureGroups()
        for item in reader.iter_items(("failed",)):
            failures.add(item.key, error_from_json(item.error), item.item)
        slowest = reader.slowest(top) if top > 0 else []
    state = run.state
    if state == "running" and not is_live(journal_path):
        state = "interrupted"
    return JournalReport(
        path=journal_path,
        run=run,
        state=state,
        counts={name: counts.get(name, 0) for name in STATE_ORDER},
        span=span,
        attempts=attempts,
        failed_attempts=failed_attempts,
        failures=failures,
        slowest=slowest,
    )


def report_lines(report: JournalReport, *, groups: int = 10) -> list[str]:
    """Return the report as lines of plain text, as ``batchtools report`` prints it."""
    lines = [f"run {report.run.run_id} ({report.state}), journal {report.path}"]
    lines.extend(summary_lines(_as_run_report(report), groups=groups))
    unfinished = [
        f"{report.counts[name]} {name}"
        for name in ("pending", "running", "retrying")
        if report.counts[name]
    ]
    if unfinished:
        lines.append(f"Without an outcome yet: {', '.join(unfinished)}.")
    if report.attempts:
        lines.append(
            f"{report.attempts} attempts recorded, {report.failed_attempts} of "
            "them failed."
        )
    if report.slowest:
        lines.append("Slowest items (by their last attempt):")
        for item in report.slowest:
            lines.append(
                f"  {_seconds(item.duration):>9}  {item.key[:16]}  "
                f"{preview(item.item)}  ({_trace_text(item)})"
            )
    return lines


def report_data(report: JournalReport, *, groups: int = 10) -> dict[str, Any]:
    """Return the report as JSON data, as ``batchtools report --json`` prints it."""
    common = report.failures.most_common()
    return {
        "run_id": report.run.run_id,
        "state": report.state,
        "journal": str(report.path),
        "created": report.run.created,
        "updated": report.run.updated,
        "sessions": report.run.session,
        "input_complete": report.run.input_complete,
        "counts": report.counts,
        "started": None if report.span is None else report.span[0],
        "ended": None if report.span is None else report.span[1],
        "duration": report.duration,
        "attempts": report.attempts,
        "failed_attempts": report.failed_attempts,
        "failure_groups": [
            {
                "cause": group.cause,
                "count": group.count,
                "examples": [
                    {"key": key, "item": preview(item)}
                    for key, item in zip(group.examples, group.items, strict=True)
                ],
            }
            for group in common[:groups]
        ],
        "more_failure_groups": max(0, len(common) - groups),
        "slowest": [
            {
                "key": item.key,
                "item": preview(item.item),
                "state": item.state,
                "attempts": item.attempts,
                "duration": item.duration,
                "started": (
                    None
                    if item.ended is None or item.duration is None
                    else item.ended - item.duration
                ),
                "slot": item.slot,
                "worker": item.worker,
            }
            for item in report.slowest
        ],
    }


def _as_run_report(report: JournalReport) -> Report:
    """Return the engine's kind of report, so the end-of-run summary can print it."""
    run_report = Report(run_id=report.run.run_id, journal=str(report.path))
    run_report.counts = {name: report.counts[name] for name in COUNT_KEYS}
    run_report.failures = report.failures
    run_report.duration = report.duration
    run_report.started = report.span[0] if report.span is not None else 0.0
    return run_report


def _seconds(value: float | None) -> str:
    if value is None:
        return "?"
    if value < 60:
        return f"{value:.3f}s"
    return format_duration(value)


def _trace_text(item: ItemTrace) -> str:
    parts = [
        item.state,
        f"{item.attempts} attempts" if item.attempts != 1 else "1 attempt",
    ]
    if item.ended is not None and item.duration is not None:
        started = time.localtime(item.ended - item.duration)
        parts.append("started " + time.strftime("%Y-%m-%d %H:%M:%S", started))
    if item.slot is not None:
        parts.append(f"slot {item.slot}")
    if item.worker is not None:
        parts.append(item.worker)
    return ", ".join(parts)
