"""Edge cases of run, resume, retry and status: halts, --force, output errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.cli.support import connect_read_only, error_lines, items_by_state, run_cli

_ECHO_AND_FAIL_ON_2 = 'echo ran "$1"; [ "$1" != 2 ]'
_BATCHTOOLS = str(Path(sys.executable).parent / "batchtools")


def test_resume_runs_items_a_halt_kept(tmp_path: Path) -> None:
    journal = tmp_path / "halt.db"
    command = ["sh", "-c", _ECHO_AND_FAIL_ON_2, "sh", "{}"]
    options = ["-q", "--journal", str(journal), "-j", "1", "--halt", "now,fail=1"]

    first = run_cli(["run", *options, *command, ":::", "1", "2", "3", "4"], tmp_path)
    resumed = run_cli(["resume", "-q", str(journal)], tmp_path)

    assert first.returncode == 1
    assert first.stdout == b"ran 1\nran 2\n"
    assert resumed.stdout == b"ran 3\nran 4\n"
    states = items_by_state(journal)
    assert sorted(states.values()) == ["failed", "succeeded", "succeeded", "succeeded"]


def test_forced_run_is_what_retry_repeats(tmp_path: Path) -> None:
    journal = tmp_path / "forced.db"
    old = ["sh", "-c", 'echo old "$1"; [ "$1" != b ]', "sh", "{}"]
    new = ["sh", "-c", 'echo new "$1"; [ "$1" != c ]', "sh", "{}"]

    run_cli(["run", "-q", "--journal", str(journal), *old, ":::", "a", "b"], tmp_path)
    forced = run_cli(
        ["run", "-q", "--journal", str(journal), "--force", *new, ":::", "c"],
        tmp_path,
    )
    retried = run_cli(["retry", "-q", str(journal)], tmp_path)

    assert forced.stdout == b"new c\n"
    assert b"old" not in retried.stdout
    assert sorted(retried.stdout.splitlines()) == [b"new b", b"new c"]


def test_call_receives_context(tmp_path: Path) -> None:
    module = tmp_path / "context_task.py"
    module.write_text(
        "def show(item, context):\n"
        "    return f'{item} {context.attempt} {len(context.key)}'\n"
    )

    result = run_cli(
        ["run", "-q", "--no-journal", "--call", "context_task:show", ":::", "x"],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b"x 1 32\n"


def test_unwritable_output_exits_3(tmp_path: Path) -> None:
    journal = tmp_path / "full.db"
    with open("/dev/full", "wb") as full:
        process = subprocess.run(
            [
                _BATCHTOOLS,
                "run",
                "-q",
                "--journal",
                str(journal),
                "echo",
                ":::",
                "a",
                "b",
            ],
            cwd=tmp_path,
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=60,
            check=False,
        )

    assert process.returncode == 3
    assert b"No space left on device" in process.stderr
    assert b"batchtools resume" in process.stderr


def test_results_path_that_is_a_file_exits_2(tmp_path: Path) -> None:
    occupied = tmp_path / "results"
    occupied.write_text("not a folder")

    result = run_cli(
        ["run", "--no-journal", "--results", str(occupied), "true", ":::", "a"],
        tmp_path,
    )

    assert result.returncode == 2
    lines = error_lines(result.stderr)
    assert len(lines) == 1
    assert "--results" in lines[0]


def test_closed_stdout_exits_141(tmp_path: Path) -> None:
    items = [str(n) for n in range(2000)]
    with subprocess.Popen(
        [
            _BATCHTOOLS,
            "run",
            "-q",
            "-j",
            "2",
            "--journal",
            "p.db",
            "echo",
            ":::",
            *items,
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None
        process.stdout.readline()
        process.stdout.close()
        _, stderr = process.communicate(timeout=60)

    assert process.returncode == 141, stderr.decode(errors="replace")
    assert b"batchtools resume" in stderr


def test_huge_jobs_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli(
        ["run", "--no-journal", "-j", "200000000", "true", ":::", "a"], tmp_path
    )

    assert result.returncode == 2
    assert "smaller number" in error_lines(result.stderr)[0]


def test_status_failed_warns_about_newlines(tmp_path: Path) -> None:
    journal = tmp_path / "lines.db"
    run_cli(
        ["run", "-q", "--journal", str(journal), "false", ":::", "one\ntwo"], tmp_path
    )

    lines = run_cli(["status", "--failed", str(journal)], tmp_path)
    nul = run_cli(["status", "--failed", "-0", str(journal)], tmp_path)

    assert b"-0" in lines.stderr
    assert nul.stdout == b"one\ntwo\0"
    assert nul.stderr == b""


def test_directory_as_journal_is_rejected(tmp_path: Path) -> None:
    folder = tmp_path / "folder.db"
    folder.mkdir()

    result = run_cli(["run", "--journal", str(folder), "true", ":::", "a"], tmp_path)

    assert result.returncode == 2
    assert "is a folder" in error_lines(result.stderr)[0]


def test_rate_limit_from_flag_and_job_file(tmp_path: Path) -> None:
    job = tmp_path / "rated.toml"
    job.write_text('[run]\nrate = "200/s"\n[input]\nargs = ["a", "b", "c"]\n')

    flagged = run_cli(
        ["run", "--no-journal", "--rate", "200/s", "echo", ":::", "x", "y"], tmp_path
    )
    from_file = run_cli(["run", "--no-journal", "-f", str(job), "echo"], tmp_path)
    invalid = run_cli(
        ["run", "--no-journal", "--rate", "fast", "echo", ":::", "x"], tmp_path
    )

    assert flagged.returncode == 0
    assert sorted(flagged.stdout.split()) == [b"x", b"y"]
    assert from_file.returncode == 0
    assert sorted(from_file.stdout.split()) == [b"a", b"b", b"c"]
    assert invalid.returncode == 2
    assert "invalid rate 'fast'" in error_lines(invalid.stderr)[0]


def test_deadline_flags_stop_the_run(tmp_path: Path) -> None:
    journal = tmp_path / "deadline.db"
    run_options = ["run", "--journal", str(journal), "--deadline", "1s"]
    item_options = ["run", "--no-journal", "--item-deadline", "1s", "--retries", "3"]
    long_sleep = ["sh", "-c", "sleep 30.25", "sh", "{}"]

    stopped = run_cli([*run_options, "sleep", "{}", ":::", "0", "30.5"], tmp_path)
    item_limited = run_cli([*item_options, *long_sleep, ":::", "x"], tmp_path)
    invalid = run_cli(
        ["run", "--no-journal", "--deadline", "later", "true", ":::", "x"], tmp_path
    )

    assert stopped.returncode == 1
    assert b"deadline" in stopped.stderr
    assert sorted(items_by_state(journal).values()) == ["cancelled", "succeeded"]
    assert item_limited.returncode == 1
    assert b"timed out" in item_limited.stderr
    assert invalid.returncode == 2


def test_breaker_flag_pauses_after_failures(tmp_path: Path) -> None:
    failing_first_two = ["sh", "-c", "exit $(( $1 < 3 ))", "sh", "{}"]
    options = ["run", "--no-journal", "-j", "1", "--breaker", "2"]

    result = run_cli(
        [
            *options,
            "--breaker-reset",
            "100ms",
            *failing_first_two,
            ":::",
            "1",
            "2",
            "3",
        ],
        tmp_path,
    )
    invalid = run_cli(
        ["run", "--no-journal", "--breaker", "often", "true", ":::", "x"], tmp_path
    )
    reset_alone = run_cli(
        ["run", "--no-journal", "--breaker-reset", "1s", "true", ":::", "x"], tmp_path
    )

    assert result.returncode == 1
    assert b"Circuit breakers opened 1 time;" in result.stderr
    assert b"2 failed" in result.stderr
    assert invalid.returncode == 2
    assert "invalid circuit breaker 'often'" in error_lines(invalid.stderr)[0]
    assert reset_alone.returncode == 2


def test_show_prints_an_item_history(tmp_path: Path) -> None:
    journal = tmp_path / "show.db"
    failing = ["sh", "-c", "echo boom >&2; exit 3", "sh", "{}"]
    run_cli(
        [
            "run",
            "-q",
            "--journal",
            str(journal),
            "--retries",
            "1",
            *failing,
            ":::",
            "a",
        ],
        tmp_path,
    )
    with connect_read_only(journal) as conn:
        (key,) = conn.execute("SELECT key FROM items").fetchone()

    full = run_cli(["show", str(journal), key], tmp_path)
    start = run_cli(["show", str(journal), key[:12]], tmp_path)
    unknown = run_cli(["show", str(journal), "nope"], tmp_path)

    assert full.returncode == 0
    assert b"failed, 2 attempts" in full.stdout
    assert full.stdout.count(b"exit status 3") == 2
    assert start.stdout == full.stdout
    assert unknown.returncode == 2
