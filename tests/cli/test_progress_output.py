"""The CLI's progress display: the line on a terminal, log lines elsewhere, -v."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pytest

import batchtools
from batchtools._codec import digest, encode
from batchtools._exceptions import ConfigurationError
from batchtools.cli._progress_output import count_earlier, parse_interval
from batchtools.journal import iter_items
from batchtools.observe._progress import ProgressCounts
from tests.cli.support import (
    cli_environment,
    error_lines,
    run_cli,
    started_cli,
    wait_until,
)
from tests.cli.terminal import terminal_cli

TASKS = "tests.cli.debug_tasks"
_ESCAPE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")


def _screen_lines(output: bytes) -> list[bytes]:
    """Return what the terminal showed, split at every line end and return."""
    return [line for line in re.split(rb"[\r\n]", _ESCAPE.sub(b"", output)) if line]


def _items_file(folder: Path, count: int) -> Path:
    path = folder / "items.txt"
    path.write_text("".join(f"{number}\n" for number in range(1, count + 1)))
    return path


def _fail_on_three(item: int) -> int:
    if item == 3:
        raise ValueError("item 3 is bad")
    return item


# -- on a terminal ----------------------------------------------------------------


@pytest.mark.parametrize(
    "task", [["--call", f"{TASKS}:identity_batch"], ["true"]], ids=["call", "command"]
)
def test_terminal_progress_counts_batch_items(tmp_path: Path, task: list[str]) -> None:
    items = _items_file(tmp_path, 101)
    arguments = ["run", "--no-journal", "-n", "10", "-j", "2"]
    task = [*task, "::::", str(items)]

    with terminal_cli([*arguments, *task], tmp_path) as terminal:
        status = terminal.wait()

    lines = _screen_lines(terminal.output)
    assert status == 0
    assert b"101/101 done (100%) | 0 failed | 0 retrying | 0 running" in lines[-2]
    assert lines[-1].startswith(b"101 items: 101 succeeded, 0 failed")


def test_terminal_progress_counts_process_chunks(tmp_path: Path) -> None:
    items = _items_file(tmp_path, 101)
    arguments = ["run", "--no-journal", "--backend", "process", "-j", "2"]
    task = ["--call", f"{TASKS}:identity", "::::", str(items)]

    with terminal_cli([*arguments, *task], tmp_path) as terminal:
        status = terminal.wait()

    frames = [line for line in _screen_lines(terminal.output) if b" done " in line]
    running = [int(n) for n in re.findall(rb"(\d+) running", b"\n".join(frames))]
    assert status == 0
    assert frames[-1].startswith(b"101/101 done (100%)")
    assert max(running) <= 2
    assert b"101 items: 101 succeeded, 0 failed" in terminal.output


def test_retry_progress_starts_from_earlier_items(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    task = ["--call", f"{TASKS}:fail_on_bad", ":::", "a", "bad", "c", "d", "e"]
    first = run_cli(["run", "--journal", str(journal), *task], tmp_path)
    assert first.returncode == 1, first.stderr.decode(errors="replace")

    with terminal_cli(["retry", str(journal)], tmp_path) as terminal:
        status = terminal.wait()

    done = [int(n) for n in re.findall(rb"(\d+)/5 done", terminal.output)]
    assert status == 1
    assert done
    assert min(done) >= 4
    assert done[-1] == 5
    assert b"1 failed" in terminal.output


def test_verbose_log_lines_above_progress_line(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    gate = tmp_path / "gate"
    environment = cli_environment(CALL_LEDGER=str(ledger), CALL_GATE=str(gate))
    arguments = ["run", "--no-journal", "-v", "-j", "2"]
    task = ["--call", "tests.cli.call_tasks:record_then_wait", ":::", "a", "b"]

    with terminal_cli([*arguments, *task], tmp_path, environment=environment) as cli:
        # The attempts end, and are logged, only after the line was drawn.
        cli.expect(b"0/2 done")
        gate.touch()
        status = cli.wait()

    lines = _screen_lines(cli.output)
    ended = [line for line in lines if b"attempt 1 succeeded" in line]
    assert status == 0
    assert len(ended) == 2
    assert all(line.startswith(b"batchtools: item ") for line in ended)


# -- without a terminal ------------------------------------------------------------


def test_periodic_progress_line_without_terminal(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    gate = tmp_path / "gate"
    environment = cli_environment(CALL_LEDGER=str(ledger), CALL_GATE=str(gate))
    arguments = ["run", "--no-journal", "--progress-interval", "0.05"]
    task = ["--call", "tests.cli.call_tasks:record_then_wait", ":::", "a", "b"]
    lines: list[bytes] = []

    with started_cli([*arguments, *task], tmp_path, environment=environment) as cli:
        assert cli.stderr is not None
        stderr = cli.stderr
        reader = threading.Thread(target=lambda: lines.extend(stderr), daemon=True)
        reader.start()
        wait_until(
            lambda: any(b"done" in line for line in lines),
            "a progress line",
            process=cli,
        )
        gate.touch()
        status = cli.wait(timeout=60)
        reader.join(timeout=60)

    progress = [line for line in lines if b" done " in line]
    assert status == 0
    assert progress[0].startswith(b"batchtools: 0/2 done (0%) | 0 failed")
    assert b"2 items: 2 succeeded, 0 failed" in b"".join(lines)


def test_short_run_prints_no_progress_line(tmp_path: Path) -> None:
    result = run_cli(
        ["run", "--no-journal", "--call", f"{TASKS}:identity", ":::", "a", "b"],
        tmp_path,
    )

    assert result.returncode == 0
    assert b" done " not in result.stderr
    assert result.stdout == b"a\nb\n"


def test_invalid_progress_interval_exits_2(tmp_path: Path) -> None:
    arguments = ["run", "--progress-interval", "soon"]
    task = ["--call", f"{TASKS}:identity", ":::", "a"]

    result = run_cli([*arguments, *task], tmp_path)

    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1
    assert "invalid --progress-interval 'soon'" in errors[0]


def test_verbose_logs_every_attempt(tmp_path: Path) -> None:
    arguments = ["run", "--no-journal", "-v", "-j", "1"]
    task = ["--call", f"{TASKS}:fail_on_bad", ":::", "good", "bad"]

    result = run_cli([*arguments, *task], tmp_path)

    text = result.stderr.decode()
    good, bad = digest(encode((b"good",))), digest(encode((b"bad",)))
    assert result.returncode == 1
    assert f"batchtools: item {good} attempt 1 started\n" in text
    assert re.search(
        rf"batchtools: item {good} attempt 1 succeeded in [\d.]+ s\n", text
    )
    assert re.search(
        rf"batchtools: item {bad} attempt 1 failed after [\d.]+ s: "
        r"ValueError: cannot handle bad\n",
        text,
    )


def test_quiet_by_default_logs_no_attempts(tmp_path: Path) -> None:
    task = ["--call", f"{TASKS}:fail_on_bad", ":::", "good", "bad"]

    result = run_cli(["run", "--no-journal", *task], tmp_path)

    assert result.returncode == 1
    assert b"attempt 1" not in result.stderr


# -- the pieces -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(None, 10.0), ("0", None), ("0s", None), ("30s", 30.0), ("2", 2.0)],
)
def test_parse_interval(text: str | None, seconds: float | None) -> None:
    assert parse_interval(text) == seconds


def test_parse_interval_rejects_text() -> None:
    with pytest.raises(ConfigurationError, match="invalid --progress-interval"):
        parse_interval("often")


def test_count_earlier_for_retry_and_resume(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    batchtools.run(range(6), _fail_on_three, journal=journal)
    failed_row = next(iter(iter_items(journal, ["failed"])))

    retry = ProgressCounts()
    count_earlier(retry, journal, ("failed",))
    one_item = ProgressCounts()
    count_earlier(one_item, journal, ("failed",), failed_row)
    resume = ProgressCounts()
    count_earlier(resume, journal, ("pending", "running", "retrying", "cancelled"))

    assert (retry.done, retry.failed, retry.total) == (5, 0, 6)
    assert (one_item.done, one_item.failed, one_item.total) == (5, 0, 6)
    assert (resume.done, resume.failed, resume.total) == (6, 1, 6)
