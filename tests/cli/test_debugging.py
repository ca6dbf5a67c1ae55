"""--pdb, --pdb-at, --fail-fast and `retry --key --foreground`, end to end.

The debugger tests run the CLI on a pseudo-terminal, wait for pdb's
prompt, type commands and read what the terminal shows.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from batchtools._codec import digest, encode
from batchtools.journal import item_history, read_run
from tests.cli.support import (
    cli_environment,
    error_lines,
    run_cli,
    started_cli,
    wait_until,
)
from tests.cli.terminal import PROMPT, terminal_cli

TASKS = "tests.cli.debug_tasks"


def _key(item: str) -> str:
    """Return the key of a one-column CLI item, as the journal gives it."""
    return digest(encode((item.encode(),)))


# -- --pdb ----------------------------------------------------------------


def test_pdb_post_mortem_then_continue(tmp_path: Path) -> None:
    arguments = ["run", "--no-journal", "-j", "1", "--pdb"]
    task = ["--call", f"{TASKS}:fail_on_bad", ":::", "good", "bad", "other"]

    with terminal_cli([*arguments, *task], tmp_path) as terminal:
        before_prompt = terminal.expect(PROMPT)
        terminal.send("p item")
        answer = terminal.expect(PROMPT)
        # rich redraws the progress line 4 times a second; a hidden line
        # stays away while the prompt waits.
        while_waiting = terminal.read_for(0.6)
        terminal.send("c")
        status = terminal.wait()

    assert b"ValueError: cannot handle bad" in before_prompt
    assert b"The task failed on item " + _key("bad").encode() in before_prompt
    assert b"raise ValueError" in before_prompt
    assert b"'bad'" in answer
    assert b"done" not in while_waiting
    assert status == 1
    assert b"3 items: 2 succeeded, 1 failed" in terminal.output
    assert b"OTHER" in terminal.output


def test_pdb_talks_on_stderr_when_stdout_is_file(tmp_path: Path) -> None:
    arguments = ["run", "--no-journal", "-j", "1", "--pdb"]
    task = ["--call", f"{TASKS}:fail_on_bad", ":::", "good", "bad"]

    with (
        (tmp_path / "out").open("wb") as out,
        terminal_cli([*arguments, *task], tmp_path, stdout=out) as terminal,
    ):
        terminal.expect(PROMPT)
        terminal.send("p item")
        answer = terminal.expect(PROMPT)
        terminal.send("c")
        status = terminal.wait()

    assert status == 1
    assert b"'bad'" in answer
    assert (tmp_path / "out").read_bytes() == b"GOOD\n"


def test_pdb_quit_stops_run_for_resume(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    arguments = ["run", "--journal", str(journal), "-j", "1", "--pdb"]
    items = ["bad", *(f"item{number}" for number in range(20))]
    task = ["--call", f"{TASKS}:fail_on_bad_async", ":::", *items]

    with terminal_cli([*arguments, *task], tmp_path) as terminal:
        terminal.expect(PROMPT)
        terminal.send("q")
        status = terminal.wait()

    assert status == 1
    assert b"The run was stopped from the debugger." in terminal.output
    assert f"batchtools resume {journal}".encode() in terminal.output
    assert read_run(journal).state == "interrupted"
    history = item_history(journal, _key("bad"))
    assert history is not None
    assert history[0].state == "failed"


def test_pdb_at_stops_before_item_and_steps_in(tmp_path: Path) -> None:
    arguments = ["run", "--no-journal", "-j", "1", "--pdb-at", _key("b")[:12]]
    task = ["--call", f"{TASKS}:fail_on_bad", ":::", "a", "b", "c"]

    with terminal_cli([*arguments, *task], tmp_path) as terminal:
        stop = terminal.expect(PROMPT)
        terminal.send("s")
        step = terminal.expect(PROMPT)
        terminal.send("p item")
        answer = terminal.expect(PROMPT)
        terminal.send("c")
        status = terminal.wait()

    assert b"Stopped before item " + _key("b").encode() in stop
    assert b"--Call--" in step
    assert b"fail_on_bad()" in step
    assert b"'b'" in answer
    assert status == 0
    assert b"3 items: 3 succeeded, 0 failed" in terminal.output


def test_pdb_at_unknown_key_warns(tmp_path: Path) -> None:
    arguments = ["run", "--no-journal", "--pdb-at", "0000ffff"]
    task = ["--call", f"{TASKS}:identity", ":::", "a", "b"]

    with terminal_cli([*arguments, *task], tmp_path) as terminal:
        status = terminal.wait()

    assert status == 0
    assert b"Warning: --pdb-at 0000ffff: no item" in terminal.output


def test_pdb_rejects_process_backend(tmp_path: Path) -> None:
    arguments = ["run", "--no-journal", "--pdb", "--backend", "process"]

    result = run_cli([*arguments, "--call", f"{TASKS}:identity", ":::", "a"], tmp_path)

    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1
    assert "--backend process" in errors[0]
    assert "thread or async backend" in errors[0]


def test_pdb_rejects_command(tmp_path: Path) -> None:
    result = run_cli(["run", "--no-journal", "--pdb", "true", ":::", "a"], tmp_path)

    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1
    assert "--pdb debugs Python tasks given with --call" in errors[0]


def test_pdb_needs_terminal_on_stdin(tmp_path: Path) -> None:
    arguments = ["run", "--no-journal", "--pdb-at", "abc"]

    result = run_cli([*arguments, "--call", f"{TASKS}:identity", ":::", "a"], tmp_path)

    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1
    assert "needs a terminal on standard input" in errors[0]


def test_pdb_rejects_items_on_stdin(tmp_path: Path) -> None:
    result = run_cli(
        ["run", "--no-journal", "--pdb", "--call", f"{TASKS}:identity"],
        tmp_path,
        stdin=b"a\nb\n",
    )

    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1
    assert "items must come from ':::' arguments" in errors[0]


# -- --fail-fast ------------------------------------------------------------


def test_fail_fast_halts_at_first_failure(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    arguments = ["run", "--journal", str(journal), "-j", "1", "--fail-fast"]
    items = ["bad", *(f"item{number}" for number in range(20))]

    result = run_cli(
        [*arguments, "--call", f"{TASKS}:fail_on_bad", ":::", *items], tmp_path
    )

    assert result.returncode == 1
    assert b"Halted: 1 items failed" in result.stderr
    assert read_run(journal).spec["cli"]["halt"] == "now,fail=1"


def test_fail_fast_with_halt_rejected(tmp_path: Path) -> None:
    arguments = ["run", "--no-journal", "--fail-fast", "--halt", "soon,fail=3"]

    result = run_cli([*arguments, "true", ":::", "a"], tmp_path)

    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1
    assert "cannot be combined with --halt soon,fail=3" in errors[0]


def test_fail_fast_wins_over_halt_variable(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    environment = cli_environment(BATCHTOOLS_HALT="soon,fail=5")

    result = run_cli(
        ["run", "--journal", str(journal), "--fail-fast", "true", ":::", "a"],
        tmp_path,
        environment=environment,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert read_run(journal).spec["cli"]["halt"] == "now,fail=1"


# -- retry --key --foreground -----------------------------------------------

# Writes a line, then waits for the file "gate" in the working folder. So a
# test can see the line before the command ends. Exits 7 for item b.
_GATED_SCRIPT = (
    'echo "out of $0"; echo "err of $0" >&2; n=0; '
    "while [ ! -e gate ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done; "
    '[ "$0" != b ] || exit 7'
)


def _failed_command_run(folder: Path) -> Path:
    """Run the gated script over a, b and c with the gate open; b fails."""
    journal = folder / "run.db"
    (folder / "gate").touch()
    command = ["sh", "-c", _GATED_SCRIPT, "{}"]
    result = run_cli(
        ["run", "--journal", str(journal), *command, ":::", "a", "b", "c"], folder
    )
    assert result.returncode == 1, result.stderr.decode(errors="replace")
    (folder / "gate").unlink()
    return journal


def test_foreground_retry_shows_output_live(tmp_path: Path) -> None:
    journal = _failed_command_run(tmp_path)
    arguments = ["retry", str(journal), "--key", _key("b")[:12], "--foreground"]
    lines: list[bytes] = []

    with started_cli(arguments, tmp_path) as process:
        assert process.stdout is not None
        stdout = process.stdout
        reader = threading.Thread(target=lambda: lines.extend(stdout), daemon=True)
        reader.start()
        # The command waits for the gate, so a line seen now was not captured
        # until the command's end.
        wait_until(lambda: b"out of b\n" in lines, "the live line", process=process)
        (tmp_path / "gate").touch()
        try:
            status = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            raise AssertionError("the foreground retry did not end") from None
        assert process.stderr is not None
        stderr = process.stderr.read()
        reader.join(timeout=60)

    assert status == 7
    assert lines == [b"out of b\n"]
    assert b"err of b\n" in stderr
    history = item_history(journal, _key("b"))
    assert history is not None
    assert history[0].state == "failed"
    assert history[0].attempts == 2


def test_foreground_retry_of_python_task(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    task = ["--call", f"{TASKS}:talk_then_fail_on_bad", ":::", "good", "bad"]
    first = run_cli(["run", "--journal", str(journal), *task], tmp_path)
    assert first.returncode == 1, first.stderr.decode(errors="replace")

    result = run_cli(
        ["retry", str(journal), "--key", _key("bad")[:10], "--foreground"], tmp_path
    )

    assert result.returncode == 1
    assert result.stdout == b"stdout of bad\n"
    assert b"stderr of bad\n" in result.stderr
    history = item_history(journal, _key("bad"))
    assert history is not None
    assert history[0].attempts == 2


def test_retry_key_runs_only_that_item(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    task = ["--call", f"{TASKS}:talk_then_fail_on_bad", ":::", "bad", "bad", "ok"]
    first = run_cli(["run", "--journal", str(journal), *task], tmp_path)
    assert first.returncode == 1, first.stderr.decode(errors="replace")
    second_bad = _key("bad") + "-1"

    result = run_cli(["retry", str(journal), "--key", second_bad], tmp_path)

    assert result.returncode == 1
    assert result.stdout == b"stdout of bad\n"
    retried = item_history(journal, second_bad)
    other = item_history(journal, _key("bad"))
    assert retried is not None
    assert other is not None
    assert retried[0].attempts == 2
    assert other[0].attempts == 1


def test_foreground_needs_key(tmp_path: Path) -> None:
    journal = _failed_command_run(tmp_path)

    result = run_cli(["retry", str(journal), "--foreground"], tmp_path)

    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1
    assert "--foreground runs one item; name it with --key KEY" in errors[0]


def test_retry_key_rejects_unknown_and_succeeded(tmp_path: Path) -> None:
    journal = _failed_command_run(tmp_path)

    unknown = run_cli(["retry", str(journal), "--key", "0000ffff"], tmp_path)
    succeeded = run_cli(["retry", str(journal), "--key", _key("a")[:12]], tmp_path)

    assert unknown.returncode == 2
    assert error_lines(unknown.stderr) == [
        f"Error: no item with key '0000ffff' in journal {journal}"
    ]
    assert succeeded.returncode == 2
    assert b"succeeded already" in succeeded.stderr
