"""The report read from a journal: text, JSON data and the HTML page's content.

Journals come from real runs. Items and error messages include markup, as
hostile input would, and the page must show them only as text.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

import batchtools
from batchtools import Backoff, Retry
from batchtools.journal import JournalReader
from batchtools.observe.html_report import render_html, write_html
from batchtools.observe.report import read_report, report_data, report_lines

HOSTILE = "<script>alert(1)</script>"
NO_WAIT = Backoff(initial=0, maximum=0)


class ReportTask:
    """Fails items by a rule, sleeps chosen items, and fails one item once."""

    def __init__(self, slow: dict[int, float] | None = None) -> None:
        self.slow = slow or {}
        self._lock = threading.Lock()
        self._seen: set[object] = set()

    def __call__(self, item: object) -> object:
        if item == HOSTILE:
            raise ValueError(f"bad input {HOSTILE} & more")
        assert isinstance(item, int)
        with self._lock:
            first = item not in self._seen
            self._seen.add(item)
        if item == 4 and first:
            raise ConnectionError("reset by peer at 10.0.0.4")
        if item % 10 == 7:
            raise KeyError(f"missing record {item}")
        if item in self.slow:
            threading.Event().wait(self.slow[item])
        return item


def _journal(tmp_path: Path, count: int = 40, **slow: float) -> Path:
    journal = tmp_path / "run.db"
    items: list[object] = [*range(count), HOSTILE]
    batchtools.run(
        items,
        ReportTask(
            {int(key.removeprefix("item")): value for key, value in slow.items()}
        ),
        backend="thread",
        concurrency=3,
        journal=journal,
        retry=Retry(attempts=2, on=(ConnectionError,), backoff=NO_WAIT),
    )
    return journal


def test_report_counts_groups_and_slowest(tmp_path: Path) -> None:
    journal = _journal(tmp_path, item11=0.05, item12=0.03)

    report = read_report(journal, top=2)
    lines = report_lines(report)

    assert report.state == "finished"
    assert report.counts["succeeded"] == 36
    assert report.counts["failed"] == 5
    # Items 7, 17, 27, 37 and the hostile item fail; item 4 fails once.
    assert report.attempts == 42
    assert report.failed_attempts == 6
    causes = [(g.cause, g.count) for g in report.failures.most_common()]
    assert causes == [
        ("KeyError: 'missing record N'", 4),
        (f"ValueError: bad input {HOSTILE.replace('1', 'N')} & more", 1),
    ]
    assert [item.item for item in report.slowest] == [11, 12]
    assert lines[0] == f"run {report.run.run_id} (finished), journal {journal}"
    assert "41 items: 36 succeeded, 5 failed" in lines[1]
    assert "Failures by cause:" in lines
    assert "  4 x KeyError: 'missing record N'" in lines
    assert "42 attempts recorded, 6 of them failed." in lines
    slow_lines = lines[lines.index("Slowest items (by their last attempt):") + 1 :]
    assert len(slow_lines) == 2
    assert slow_lines[0].split()[1] == report.slowest[0].key[:16]
    assert "succeeded, 1 attempt" in slow_lines[0]
    assert re.search(r"slot [123]", slow_lines[0])


def test_report_data_is_json(tmp_path: Path) -> None:
    journal = _journal(tmp_path, item3=0.02)

    data = json.loads(json.dumps(report_data(read_report(journal, top=1))))

    assert data["state"] == "finished"
    assert data["counts"]["failed"] == 5
    assert data["attempts"] == 42
    first = data["failure_groups"][0]
    assert first["count"] == 4
    assert [example["item"] for example in first["examples"]] == ["7", "17", "27"]
    assert all(len(example["key"]) == 32 for example in first["examples"])
    (slowest,) = data["slowest"]
    assert slowest["item"] == "3"
    assert slowest["duration"] >= 0.02
    assert slowest["slot"] in (1, 2, 3)
    assert slowest["started"] <= data["ended"]


def test_report_of_journal_without_attempts(tmp_path: Path) -> None:
    journal = tmp_path / "empty.db"
    batchtools.run([], ReportTask(), backend="thread", journal=journal)

    report = read_report(journal)
    page = render_html(journal)

    assert report.span is None
    assert report.slowest == []
    assert "0 items: 0 succeeded, 0 failed" in report_lines(report)[1]
    assert "No attempts are recorded." in page


def test_html_escapes_items_and_errors(tmp_path: Path) -> None:
    journal = _journal(tmp_path)

    page = render_html(journal)

    assert HOSTILE not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    # Only the page's own two script elements open, and each closes once.
    assert page.count("<script") == 2
    assert page.count("</script>") == 2
    assert "\\u003cscript\\u003e" in page  # the timeline's data, for the tooltip
    assert not re.search(r"\b(?:src|href)\s*=", page)
    assert "default-src 'none'" in page


def test_html_timeline_is_capped(tmp_path: Path) -> None:
    journal = _journal(tmp_path, count=200)

    page = render_html(journal, max_bars=40)

    data = json.loads(
        re.search(
            r'<script type="application/json" id="timeline-data">(.*?)</script>',
            page,
            re.DOTALL,
        )
        .group(1)  # type: ignore[union-attr]  # the page has the element
        .replace("\\u003c", "<")
    )
    assert len(data["bars"]) == 40
    # Failed attempts take up to half of the bars: 20 of the 22 (the 20
    # items ending in 7, item 4 once, the hostile item), the oldest first.
    failures = [bar for bar in data["bars"] if bar[3] >= 2]
    assert len(failures) == 20
    assert "40 of 202 attempts" in page
    assert "20 of the 22 failed attempts" in page
    assert "The timeline draws at most 40 attempts." in page


def test_write_html_is_private(tmp_path: Path) -> None:
    journal = _journal(tmp_path, count=5)
    out = tmp_path / "report.html"

    write_html(journal, out)

    assert out.stat().st_mode & 0o777 == 0o600
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_duration_histogram_counts_every_attempt(tmp_path: Path) -> None:
    journal = _journal(tmp_path)

    with JournalReader(journal) as reader:
        bins = reader.duration_histogram(5)
        total, failed = reader.attempt_counts()

    assert sum(bins.values()) == total
    assert failed == 6


def test_report_rejects_missing_journal(tmp_path: Path) -> None:
    with pytest.raises(batchtools.JournalError, match="no such journal file"):
        read_report(tmp_path / "missing.db")
