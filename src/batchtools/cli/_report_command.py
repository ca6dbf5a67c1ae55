"""The ``batchtools report`` and ``batchtools show`` commands.

Both read a journal read-only, so they work while its run is live. The work
is done by `batchtools.observe.report`, `batchtools.observe.html_report`
and `batchtools.journal.JournalReader`; this module parses and prints.
Text from the journal (items, messages, stderr) is printed with control
characters escaped, so that an item cannot drive the terminal.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import click

from batchtools._exceptions import ConfigurationError, JournalError
from batchtools.journal import AttemptTrace, ItemTrace, JournalReader
from batchtools.observe._summary import preview

# C0 and C1 control characters, DEL included, except newline and tab.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_OUTCOMES = {
    "succeeded": "succeeded",
    "retried": "failed, then retried",
    "failed": "failed for good",
}


@click.command("report")
@click.argument("journal", required=False, metavar="[JOURNAL]")
@click.option(
    "--top",
    type=click.IntRange(0),
    default=10,
    show_default=True,
    help="How many of the slowest items to list.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--html",
    "html_path",
    metavar="PATH",
    default=None,
    help="Write a self-contained HTML page with charts to PATH.",
)
def report_command(
    journal: str | None, top: int, as_json: bool, html_path: str | None
) -> None:
    """Show what a run did: counts, failures by cause and the slowest items.

    With --html, writes a page with the same facts plus a histogram of
    attempt durations, the throughput over time and a timeline of attempts
    per job slot. The page needs no network access to view. Without
    JOURNAL, reports the latest run under ./.batchtools/.
    """
    from batchtools.cli.main import AbortError, UsageError, _latest
    from batchtools.observe.report import read_report, report_data, report_lines

    path = Path(journal) if journal else _latest(lambda run: True)
    try:
        report = read_report(path, top=top)
        if html_path is not None:
            from batchtools.cli.main import reject_database
            from batchtools.observe.html_report import write_html

            reject_database(html_path, "--html")

            write_html(path, html_path, top=top)
    except JournalError as error:
        raise AbortError(str(error)) from None
    except OSError as error:
        raise UsageError(
            f"--html {html_path!r}: cannot write the page: {error.strerror or error}"
        ) from None
    if as_json:
        click.echo(json.dumps(report_data(report), ensure_ascii=False))
    elif html_path is None:
        for line in report_lines(report):
            click.echo(_printable(line))
    if html_path is not None:
        click.echo(
            f"Wrote the report of run {report.run.run_id} to {html_path}.", err=True
        )


@click.command("show")
@click.argument("journal", metavar="JOURNAL")
@click.argument("key")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "-v", "--verbose", is_flag=True, help="Also print each error's traceback."
)
def show_command(journal: str, key: str, as_json: bool, verbose: bool) -> None:
    """Show one item of a run and every attempt it made.

    Each attempt shows its start, duration, job slot, worker process, and
    for a failure its error, exit status and the end of its stderr. KEY is
    the item's key, or its start as the summary prints it when no other
    item's key starts the same way.
    """
    from batchtools.cli.main import AbortError, UsageError

    try:
        with JournalReader(journal) as reader:
            item = reader.find(key)
            history = reader.history(item) if item is not None else []
    except ConfigurationError as error:
        raise UsageError(str(error)) from None
    except JournalError as error:
        raise AbortError(str(error)) from None
    if item is None:
        raise UsageError(f"no item with key {key!r} in journal {journal}")
    if as_json:
        click.echo(json.dumps(_item_data(item, history), ensure_ascii=False))
        return
    for line in _item_lines(item, history, verbose):
        click.echo(_printable(line))


def _item_lines(
    item: ItemTrace, history: list[AttemptTrace], verbose: bool
) -> list[str]:
    lines = [
        f"item {item.seq + 1}: {preview(item.item)}",
        f"  key {item.key}, {item.state}, {item.attempts} attempt"
        + ("" if item.attempts == 1 else "s"),
    ]
    if item.lost_workers:
        lines.append(f"  worker processes lost while running it: {item.lost_workers}")
    if item.value is not None:
        lines.append(f"  value {item.value}")
    if item.reason:
        lines.append(f"  reason: {item.reason}")
    for attempt in history:
        where = [f"slot {attempt.slot}"] if attempt.slot is not None else []
        if attempt.worker is not None:
            where.append(attempt.worker)
        lines.append(
            f"  attempt {attempt.number} at {_when(attempt.started)}, "
            f"{attempt.duration:.3f} s"
            + (f", {', '.join(where)}" if where else "")
            + f": {_OUTCOMES[attempt.outcome]}"
        )
        record = _error_record(attempt.error)
        if record is None:
            continue
        kind = str(record.get("type", "?")).rsplit(".", 1)[-1]
        lines.append(f"    {kind}: {record.get('message', '')}")
        if record.get("timeout") is not None:
            lines.append(f"    timeout {record['timeout']:g} s")
        tail = record.get("stderr_tail")
        if tail:
            lines.append("    stderr (end):")
            lines.extend(f"    | {line}" for line in str(tail).splitlines())
        if verbose and record.get("traceback"):
            lines.extend(
                f"    {line}" for line in str(record["traceback"]).splitlines()
            )
    return lines


def _item_data(item: ItemTrace, history: list[AttemptTrace]) -> dict[str, Any]:
    value: Any = None
    if item.value is not None:
        try:
            value = json.loads(item.value)
        except ValueError:
            value = item.value
    return {
        "seq": item.seq,
        "key": item.key,
        "item": preview(item.item),
        "state": item.state,
        "attempts": item.attempts,
        "lost_workers": item.lost_workers,
        "value": value,
        "reason": item.reason,
        "history": [
            {
                "number": attempt.number,
                "started": attempt.started,
                "duration": attempt.duration,
                "slot": attempt.slot,
                "worker": attempt.worker,
                "outcome": attempt.outcome,
                "error": _error_record(attempt.error),
            }
            for attempt in history
        ],
    }


def _error_record(text: str | None) -> dict[str, Any] | None:
    """Return the journal's JSON record of an error, as `error_json` wrote it."""
    if not text:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return {"type": "?", "message": text}
    return record if isinstance(record, dict) else {"type": "?", "message": text}


def _when(moment: float) -> str:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(moment))
    return f"{stamp}.{int(moment % 1 * 1000):03d}"


def _printable(text: str) -> str:
    """Return ``text`` with control characters shown as escapes, such as ``\\x1b``."""
    return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
