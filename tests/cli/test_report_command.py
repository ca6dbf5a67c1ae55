"""``batchtools report``, ``batchtools show`` and the warnings a run logs.

Runs are real ``batchtools`` processes. A slow item waits for a gate file
that the test creates once it has seen what it waits for, so nothing
depends on a fixed sleep.
"""

from __future__ import annotations

import json
from pathlib import Path

import batchtools
from batchtools.journal import iter_items
from tests.cli.support import (
    Argument,
    count_in_state,
    error_lines,
    run_cli,
    started_cli,
    wait_until,
)

# Fails items that start with "bad" with exit status 3 and a line on stderr;
# waits for the file "gate" when the item is "slow".
SCRIPT = (
    'case "$1" in '
    'bad*) echo "cannot parse $1" >&2; exit 3;; '
    "slow) while [ ! -e gate ]; do sleep 0.01; done;; "
    "esac"
)
COMMAND = ["sh", "-c", SCRIPT, "sh", "{}"]


def _run(tmp_path: Path, *items: str, retries: int = 0) -> Path:
    journal = tmp_path / "run.db"
    result = run_cli(
        [
            "run",
            "-q",
            "--journal",
            journal,
            "-j",
            "2",
            "--retries",
            str(retries),
            *COMMAND,
            ":::",
            *items,
        ],
        tmp_path,
    )
    assert result.returncode in (0, 1), result.stderr.decode(errors="replace")
    assert b"has run for" not in result.stderr
    return journal


def _key_of(journal: Path, tmp_path: Path, item: str) -> str:
    result = run_cli(["report", "--json", "--top", "100", journal], tmp_path)
    for entry in json.loads(result.stdout)["slowest"]:
        if entry["item"] == item:
            return str(entry["key"])
    raise AssertionError(f"item {item!r} is not in the report of {journal}")


def test_report_prints_summary_groups_and_slowest(tmp_path: Path) -> None:
    journal = _run(tmp_path, "a", "bad-1", "b", "bad-22", "c")

    result = run_cli(["report", "--top", "2", journal], tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    lines = result.stdout.decode().splitlines()
    assert lines[0].endswith(f"(finished), journal {journal}")
    assert "5 items: 3 succeeded, 2 failed" in lines[1]
    assert "  2 x exit status 3: cannot parse bad-N" in lines
    assert "5 attempts recorded, 2 of them failed." in lines
    slowest = lines[lines.index("Slowest items (by their last attempt):") + 1 :]
    assert len(slowest) == 2
    assert all("slot " in line and ", pid " in line for line in slowest)


def test_report_json_and_html(tmp_path: Path) -> None:
    journal = _run(tmp_path, "a", "bad-1", "b")
    page = tmp_path / "out" / "report.html"
    page.parent.mkdir()

    as_json = run_cli(["report", "--json", journal], tmp_path)
    as_html = run_cli(["report", "--html", page, journal], tmp_path)
    unwritable = run_cli(
        ["report", "--html", tmp_path / "no" / "r.html", journal], tmp_path
    )

    data = json.loads(as_json.stdout)
    assert data["counts"]["failed"] == 1
    assert data["failure_groups"][0]["cause"] == "exit status 3: cannot parse bad-N"
    assert data["failure_groups"][0]["examples"][0]["item"] == "bad-1"
    assert as_html.returncode == 0
    assert as_html.stdout == b""
    assert b"Wrote the report of run" in as_html.stderr
    assert page.read_text().startswith("<!DOCTYPE html>")
    assert unwritable.returncode == 2
    assert "cannot write the page" in error_lines(unwritable.stderr)[0]


def test_show_prints_every_attempt_with_trace(tmp_path: Path) -> None:
    journal = _run(tmp_path, "bad-7", "fine", retries=1)
    key = _key_of(journal, tmp_path, "bad-7")

    text = run_cli(["show", journal, key[:10]], tmp_path)
    as_json = run_cli(["show", "--json", journal, key], tmp_path)

    assert text.returncode == 0, text.stderr.decode(errors="replace")
    lines = text.stdout.decode().splitlines()
    assert lines[0] == "item 1: bad-7"
    assert lines[1] == f"  key {key}, failed, 2 attempts"
    attempts = [line for line in lines if line.startswith("  attempt ")]
    assert len(attempts) == 2
    assert attempts[0].endswith(": failed, then retried")
    assert attempts[1].endswith(": failed for good")
    assert all(", slot " in line and ", pid " in line for line in attempts)
    assert lines.count("    CommandFailedError: exit status 3") == 2
    assert lines.count("    | cannot parse bad-7") == 2
    data = json.loads(as_json.stdout)
    assert [entry["outcome"] for entry in data["history"]] == ["retried", "failed"]
    first = data["history"][0]
    assert first["error"]["exit_status"] == 3
    assert first["error"]["stderr_tail"] == "cannot parse bad-7\n"
    assert first["slot"] in (1, 2)
    assert first["worker"].startswith("pid ")
    assert first["duration"] >= 0


def test_show_escapes_control_characters(tmp_path: Path) -> None:
    journal = _run(tmp_path, "bad-\x1b[31mred")
    key = _key_of(journal, tmp_path, "bad-\x1b[31mred")

    result = run_cli(["show", journal, key], tmp_path)

    assert b"\x1b" not in result.stdout
    assert b"bad-\\x1b[31mred" in result.stdout


def test_report_and_show_errors(tmp_path: Path) -> None:
    journal = _run(tmp_path, "a")

    missing = run_cli(["report", tmp_path / "missing.db"], tmp_path)
    unknown = run_cli(["show", journal, "0123nope"], tmp_path)
    bad_option = run_cli(
        ["run", "--slow-after", "soon", "--no-journal", "true", ":::", "x"], tmp_path
    )

    assert missing.returncode == 3
    assert "no such journal file" in error_lines(missing.stderr)[0]
    assert unknown.returncode == 2
    assert "no item with key '0123nope'" in error_lines(unknown.stderr)[0]
    assert bad_option.returncode == 2
    assert b"invalid --slow-after 'soon'" in bad_option.stderr


def test_slow_item_warned_and_live_run_readable(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    stderr_path = tmp_path / "stderr.txt"
    quick = [f"q{n}" for n in range(10)]
    with (
        stderr_path.open("wb") as stderr,
        started_cli(
            [
                "run",
                "-q",
                "--journal",
                journal,
                "-j",
                "2",
                "--slow-after",
                "200ms",
                *COMMAND,
                ":::",
                "slow",
                *quick,
            ],
            tmp_path,
            stderr=stderr,
        ) as process,
    ):
        wait_until(
            lambda: b"has run for" in stderr_path.read_bytes(),
            "the warning about the slow item",
            process=process,
        )
        wait_until(
            lambda: count_in_state(journal, "succeeded") == 10,
            "the quick items committed",
            process=process,
        )
        report = run_cli(["report", "--json", journal], tmp_path)
        key = json.loads(report.stdout)["slowest"][0]["key"]
        show = run_cli(["show", journal, key], tmp_path)
        (tmp_path / "gate").touch()
        process.wait(timeout=60)
        returncode = process.returncode

    warnings = [
        line for line in stderr_path.read_text().splitlines() if "has run for" in line
    ]
    assert returncode == 0
    assert len(warnings) == 1
    assert "attempt 1 has run for" in warnings[0]
    assert "(slot 1, pid " in warnings[0]
    assert "10 times the median attempt duration" in warnings[0]
    data = json.loads(report.stdout)
    assert data["state"] == "running"
    assert data["counts"]["succeeded"] == 10
    assert show.returncode == 0
    assert b"succeeded, 1 attempt\n" in show.stdout


def test_help_lists_report_and_show(tmp_path: Path) -> None:
    result = run_cli(["--help"], tmp_path)

    assert result.returncode == 0
    assert b"  report " in result.stdout
    assert b"  show " in result.stdout


def test_undecodable_items_of_python_tasks_are_journaled(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    items: list[str | bytes] = [b"bad-\xff\xfe", b"ok-\xff", "plain"]

    result = run_cli(
        [
            "run",
            "-q",
            "--journal",
            journal,
            "--call",
            "tests.cli.call_tasks:primary",
            ":::",
            *items,
        ],
        tmp_path,
    )
    report = run_cli(["report", journal], tmp_path)

    assert result.returncode == 1, result.stderr.decode(errors="replace")
    assert count_in_state(journal, "succeeded") == 2
    assert count_in_state(journal, "failed") == 1
    assert report.returncode == 0, report.stderr.decode(errors="replace")
    assert b"Traceback" not in report.stderr


def test_html_page_never_replaces_a_journal(tmp_path: Path) -> None:
    journal = _run(tmp_path, "ok", "bad")
    before = journal.read_bytes()

    result = run_cli(["report", journal, "--html", journal], tmp_path)

    assert result.returncode == 2
    assert len(error_lines(result.stderr)) == 1
    assert journal.read_bytes() == before


def test_integers_too_long_to_print_are_reported(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    batchtools.run([10**5000, 7], _remainder, backend="thread", journal=journal)
    key = next(row.key for row in iter_items(journal) if row.item != 7)

    commands: list[list[Argument]] = [
        ["report", journal],
        ["report", "--json", journal],
        ["report", journal, "--html", tmp_path / "page.html"],
        ["show", journal, key],
    ]
    for arguments in commands:
        result = run_cli(arguments, tmp_path)

        assert result.returncode == 0, result.stderr.decode(errors="replace")
    printed = run_cli(["show", journal, key], tmp_path).stdout.decode()
    assert "<int too long to show>" in printed


def _remainder(item: int) -> int:
    return item % 3
