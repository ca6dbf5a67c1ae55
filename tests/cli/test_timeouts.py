"""``--timeout`` through the CLI: the whole process tree is stopped, pipes or not.

Each test gives its ``sleep`` processes a duration no other process uses,
such as ``60.483920``, so that they can be found by their arguments.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from batchtools.journal import iter_items
from tests.cli.support import kill_tree, processes_with_argument, run_cli, wait_until

ENDED_BY_ITSELF = 25.0
"""Seconds under which a run must end. Its sleeps last 30 or 60 s, so only a
working timeout ends it this early, even on a loaded machine."""


def _marker(seconds: int) -> str:
    return f"{seconds}.{random.SystemRandom().randrange(10**6):06d}"


def _timeout_error(journal: Path) -> dict[str, object]:
    rows = list(iter_items(journal, ["failed"]))
    assert len(rows) == 1
    assert rows[0].error is not None
    error: dict[str, object] = json.loads(rows[0].error)
    return error


def test_timeout_kills_whole_process_tree(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    marker = _marker(60)
    script = f"sleep {marker} & sleep {marker}"
    began = time.monotonic()

    result = run_cli(
        [
            "run",
            "--timeout",
            "1s",
            "--journal",
            journal,
            "sh",
            "-c",
            script,
            ":::",
            "x",
        ],
        tmp_path,
    )

    elapsed = time.monotonic() - began
    try:
        assert result.returncode == 1, result.stderr.decode(errors="replace")
        assert elapsed < ENDED_BY_ITSELF
        error = _timeout_error(journal)
        assert "timed out" in str(error["message"])
        wait_until(
            lambda: not processes_with_argument(marker),
            f"the 'sleep {marker}' processes to end",
            timeout=10,
        )
    finally:
        for process in processes_with_argument(marker):
            kill_tree(process.pid)


def test_timeout_with_grandchild_holding_pipe(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    marker = _marker(30)
    script = f"sleep {marker} & wait"
    began = time.monotonic()

    result = run_cli(
        [
            "run",
            "--timeout",
            "1s",
            "--journal",
            journal,
            "sh",
            "-c",
            script,
            ":::",
            "x",
        ],
        tmp_path,
    )

    elapsed = time.monotonic() - began
    try:
        assert result.returncode == 1, result.stderr.decode(errors="replace")
        assert elapsed < ENDED_BY_ITSELF
        assert "timed out" in str(_timeout_error(journal)["message"])
    finally:
        for process in processes_with_argument(marker):
            kill_tree(process.pid)


def test_exited_command_with_background_child_returns(tmp_path: Path) -> None:
    marker = _marker(30)
    script = f"echo started; sleep {marker} &"
    began = time.monotonic()

    result = run_cli(
        ["run", "--timeout", "1s", "--no-journal", "sh", "-c", script, ":::", "x"],
        tmp_path,
    )

    elapsed = time.monotonic() - began
    try:
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert result.stdout == b"started\n"
        assert elapsed < ENDED_BY_ITSELF
    finally:
        for process in processes_with_argument(marker):
            kill_tree(process.pid)
