"""`batchtools graph`: job files, --dry-run, exit statuses, resume and SIGINT.

Most tests invoke the click command in this process with CliRunner. Tasks
are real commands that append their name to a ledger file, so the ledger
shows what ran and in which order. The SIGINT test runs the command as a
real process, since a signal must reach its event loop.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from batchtools.cli._graph_command import graph_command
from tests.cli.support import REPOSITORY, wait_until

# Runs the graph command as the integrated CLI would, in a new process.
GRAPH_SCRIPT = (
    "from batchtools.cli._graph_command import graph_command; "
    "graph_command(prog_name='batchtools graph')"
)


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # The command points the batchtools logger at CliRunner's stream.
    logger = logging.getLogger("batchtools")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


def invoke(folder: Path, *arguments: str) -> Result:
    """Run ``batchtools graph`` with ``arguments`` in ``folder``."""
    previous = Path.cwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(graph_command, list(arguments))
    finally:
        os.chdir(previous)


def record(name: str, then: str = "") -> str:
    """Return a TOML command that appends ``name`` to the ledger, then runs ``then``."""
    script = f"echo {name} >> ledger"
    if then:
        script += f"; {then}"
    return f'["sh", "-c", "{script}"]'


def ledger(folder: Path) -> list[str]:
    path = folder / "ledger"
    return path.read_text().split() if path.exists() else []


DIAMOND = f"""
[tasks.top]
command = {record("top")}

[tasks.left]
needs = ["top"]
command = {record("left")}

[tasks.right]
needs = ["top"]
command = {record("right")}

[tasks.bottom]
needs = ["left", "right"]
command = {record("bottom")}
"""


def test_diamond_runs_in_dependency_order(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(DIAMOND)

    result = invoke(tmp_path, "job.toml", "-j", "2")

    assert result.exit_code == 0, result.output
    order = ledger(tmp_path)
    assert sorted(order) == ["bottom", "left", "right", "top"]
    assert order[0] == "top"
    assert order[-1] == "bottom"
    assert "4 tasks: 4 succeeded, 0 failed" in result.stderr


def test_dry_run_prints_levels_and_critical_path(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(DIAMOND)

    result = invoke(tmp_path, "job.toml", "--dry-run")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "4 tasks in 3 levels; the tasks of a level need only tasks of earlier levels:",
        "  1. top",
        "  2. left, right",
        "  3. bottom",
        "Critical path, 3 tasks:",
        "  top -> left -> bottom",
    ]
    assert ledger(tmp_path) == []


def test_dry_run_weighs_critical_path_by_estimate(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        f"""
[tasks.top]
command = {record("top")}

[tasks.quick]
needs = ["top"]
estimate = "1s"
command = {record("quick")}

[tasks.slow]
needs = ["top"]
estimate = "2m"
command = {record("slow")}

[tasks.bottom]
needs = ["quick", "slow"]
command = {record("bottom")}
"""
    )

    result = invoke(tmp_path, "job.toml", "--dry-run")

    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[-2] == "Critical path, 2m00s by estimate:"
    assert lines[-1] == "  top (no estimate) -> slow (2m00s) -> bottom (no estimate)"


def test_failing_task_exits_1(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        f"""
[tasks.broken]
command = {record("broken", "exit 4")}

[tasks.after]
needs = ["broken"]
command = {record("after")}

[tasks.other]
command = {record("other")}
"""
    )

    result = invoke(tmp_path, "job.toml")

    assert result.exit_code == 1, result.output
    assert sorted(ledger(tmp_path)) == ["broken", "other"]
    assert "  broken: exit status 4" in result.stderr
    assert "  after: needs broken, which failed" in result.stderr


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            "[tasks.a]\ncommand = COMMAND\nretries = -1\n",
            "invalid value -1 for tasks.a.retries: must be 0 or more",
        ),
        (
            '[run]\njournal = "j\\u0000.db"\n[tasks.a]\ncommand = COMMAND\n',
            "invalid value 'j\\x00.db' for run.journal: "
            "a path cannot contain a NUL character",
        ),
    ],
    ids=["negative retries", "NUL in journal"],
)
def test_invalid_value_exits_2(tmp_path: Path, table: str, message: str) -> None:
    (tmp_path / "job.toml").write_text(table.replace("COMMAND", record("a")))

    result = invoke(tmp_path, "job.toml")

    assert result.exit_code == 2
    assert result.stderr.strip() == f"Error: job file 'job.toml': {message}"
    assert ledger(tmp_path) == []


def test_unknown_key_exits_2(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        f"[tasks.a]\ncommand = {record('a')}\nretry = 1\n"
    )

    result = invoke(tmp_path, "job.toml")

    assert result.exit_code == 2
    assert "unknown key 'tasks.a.retry'" in result.stderr


def test_unknown_need_exits_2_with_suggestion(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        f"""
[tasks.thumbs]
command = {record("thumbs")}

[tasks.index]
needs = ["thumb"]
command = {record("index")}
"""
    )

    result = invoke(tmp_path, "job.toml", "--dry-run")

    assert result.exit_code == 2
    assert "did you mean 'thumbs'?" in result.stderr


def test_cycle_exits_2_naming_it(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        f"""
[tasks.a]
needs = ["b"]
command = {record("a")}

[tasks.b]
needs = ["a"]
command = {record("b")}
"""
    )

    result = invoke(tmp_path, "job.toml")

    assert result.exit_code == 2
    assert "a -> b -> a" in result.stderr
    assert ledger(tmp_path) == []


def test_items_option_on_single_task_exits_2(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        f"[tasks.a]\ncommand = {record('a')}\nallow_failures = 2\n"
    )

    result = invoke(tmp_path, "job.toml")

    assert result.exit_code == 2
    assert "tasks.a: allow_failures applies to a task over items" in result.stderr


def test_second_run_skips_succeeded_tasks(tmp_path: Path) -> None:
    # "flaky" fails while the file "broken" exists.
    (tmp_path / "broken").touch()
    (tmp_path / "job.toml").write_text(
        f"""
[run]
journal = "runs/graph.db"

[tasks.first]
command = {record("first")}

[tasks.flaky]
needs = ["first"]
command = {record("flaky", "test ! -e broken")}

[tasks.last]
needs = ["flaky"]
command = {record("last")}
"""
    )

    first = invoke(tmp_path, "job.toml")
    (tmp_path / "broken").unlink()
    second = invoke(tmp_path, "job.toml")

    assert first.exit_code == 1, first.output
    assert "run the same command again" in first.stderr
    assert second.exit_code == 0, second.output
    assert ledger(tmp_path) == ["first", "flaky", "flaky", "last"]
    assert (tmp_path / "runs" / "graph.db").exists()


def test_command_output_passes_through(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        """
[tasks.greet]
input = { args = ["ann", "bob"] }
command = ["echo", "hello", "{}"]
jobs = 1

[tasks.done]
needs = ["greet"]
command = ["echo", "done"]
"""
    )

    result = invoke(tmp_path, "job.toml")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["hello ann", "hello bob", "done"]
    assert "greet: 2 items: 2 succeeded, 0 failed" in result.stderr


def test_call_tasks_print_their_values(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        """
[tasks.answer]
call = "tests.flow.graph_tasks:answer"

[tasks.loud]
needs = ["answer"]
input = { args = ["ab", "cd"] }
call = "tests.flow.graph_tasks:shout"
jobs = 1
"""
    )

    result = invoke(tmp_path, "job.toml")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["42", "AB", "CD"]


def test_glob_input_is_read_when_the_task_starts(tmp_path: Path) -> None:
    (tmp_path / "job.toml").write_text(
        """
[tasks.make]
command = ["mkdir", "made"]

[tasks.fill]
needs = ["make"]
command = ["touch", "made/a.txt", "made/b.txt"]

[tasks.list]
needs = ["fill"]
input = { glob = "made/*.txt" }
command = ["echo", "{/}"]
jobs = 1
"""
    )

    result = invoke(tmp_path, "job.toml")

    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["a.txt", "b.txt"]


def test_sigint_exits_130(tmp_path: Path) -> None:
    # "wait" records its start, then waits for the file "gate".
    (tmp_path / "job.toml").write_text(
        """
[tasks.wait]
command = ["sh", "-c", "touch started; while [ ! -e gate ]; do sleep 0.01; done"]

[tasks.after]
needs = ["wait"]
command = ["touch", "after-ran"]
"""
    )
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    log = tmp_path / "stderr"
    with open(log, "wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", GRAPH_SCRIPT, "job.toml", "-v", "--journal", "g.db"],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        wait_until((tmp_path / "started").exists, "the task to start", process=process)
        process.send_signal(signal.SIGINT)
        # With -v the engines log the stop; only then may the task end.
        wait_until(
            lambda: b"stopping: received SIGINT" in log.read_bytes(),
            "the graph to stop admission",
            process=process,
        )
        (tmp_path / "gate").touch()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    output = log.read_bytes()
    assert process.returncode == 130, output.decode(errors="replace")
    assert b"Interrupted by SIGINT. To finish the graph, run the same" in output
    assert not (tmp_path / "after-ran").exists()
