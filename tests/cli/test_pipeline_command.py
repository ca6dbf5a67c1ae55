"""Pipeline job files: ``[[pipeline.stages]]`` run over ``[input]``, end to end."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from click.testing import CliRunner, Result

from batchtools.cli._pipeline_command import (
    is_pipeline_job,
    pipeline_command,
    run_pipeline_job,
)
from tests.cli.support import (
    RUN_TIMEOUT,
    cli_environment,
    count_lines,
    error_lines,
    kill_tree,
    wait_until,
)

TASKS = "tests.flow.pipeline_tasks"

# Runs the pipeline command in a child interpreter, as `batchtools` would.
RUNNER = (
    "from batchtools.cli._pipeline_command import pipeline_command; pipeline_command()"
)


def write_job(folder: Path, text: str) -> Path:
    """Write ``text`` as the job file ``job.toml`` in ``folder``."""
    path = folder / "job.toml"
    path.write_text(text)
    return path


def invoke(job: Path, *options: str) -> Result:
    """Run the pipeline command on ``job`` in this process."""
    runner = CliRunner()
    return runner.invoke(pipeline_command, [*options, str(job)], catch_exceptions=False)


PARSE_THEN_ECHO = f"""
[run]
keep_order = true

[input]
args = ["1", "2", "x", "4"]

[[pipeline.stages]]
name = "parse"
call = "{TASKS}:parse_number"

[[pipeline.stages]]
name = "label"
command = ["sh", "-c", "echo n=$1; echo note $1 >&2", "sh", "{{}}"]

[[pipeline.stages]]
call = "{TASKS}:shout"
"""


def test_job_prints_values_and_stage_summary(tmp_path: Path) -> None:
    job = write_job(tmp_path, PARSE_THEN_ECHO)

    result = invoke(job)

    assert result.exit_code == 1, result.stderr
    assert result.stdout.splitlines() == ["N=1", "N=2", "N=4"]
    lines = result.stderr.splitlines()
    assert any(line.startswith("4 items: 3 succeeded, 1 failed in ") for line in lines)
    assert any(
        line.startswith("  parse: 3 succeeded, 1 failed; 4 attempts") for line in lines
    )
    assert any(line.startswith("  label: 3 succeeded, 0 failed") for line in lines)
    assert any(line.startswith("  shout: 3 succeeded, 0 failed") for line in lines)
    assert "Rejected: 'x' is not a number" in result.stderr


def test_job_passes_command_stderr_through(tmp_path: Path) -> None:
    job = write_job(tmp_path, PARSE_THEN_ECHO)

    result = invoke(job, "--quiet")

    assert sorted(line for line in result.stderr.splitlines() if "note" in line) == [
        "note 1",
        "note 2",
        "note 4",
    ]
    assert "Stages:" not in result.stderr


def test_job_with_every_item_succeeded_exits_0(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        f"""
[input]
args = ["a", "b"]

[[pipeline.stages]]
command = "printf '%s-%s' {{}} {{}}"

[[pipeline.stages]]
call = "{TASKS}:shout"
backend = "process"
jobs = 1
""",
    )

    result = invoke(job, "-k")

    assert result.exit_code == 0, result.stderr
    assert result.stdout == "A-A\nB-B\n"


def test_job_retries_stage_from_run_table(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        f"""
[run]
retries = 2

[input]
args = ["5", "6"]

[[pipeline.stages]]
call = "{TASKS}:parse_number"

[[pipeline.stages]]
name = "flaky"
call = "{TASKS}:fail_first_two"

[[pipeline.stages]]
name = "strict"
call = "{TASKS}:fail_first_two"
retries = 0
""",
    )

    result = invoke(job)

    assert result.exit_code == 1, result.stderr
    assert "  flaky: 2 succeeded, 0 failed; 6 attempts" in result.stderr
    assert "  strict: 0 succeeded, 2 failed; 2 attempts" in result.stderr


def test_failed_command_output_passes_through(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        """
[input]
args = ["ok", "bad"]

[[pipeline.stages]]
name = "check"
command = [
    "sh", "-c", "test $1 = ok || { echo no $1 >&2; exit 4; }; echo $1", "sh", "{}",
]
""",
    )

    result = invoke(job)

    assert result.exit_code == 1
    assert result.stdout == "ok\n"
    assert "no bad" in result.stderr


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "[[pipeline.stages]]\ncommand = 'true'\ncolour = 'red'\n",
            "unknown key 'pipeline.stages.0.colour'",
        ),
        (
            "[[pipeline.stages]]\ncommand = 'true'\ncall = 'a:b'\n",
            "stage 1 has both command and call",
        ),
        (
            "[[pipeline.stages]]\nname = 'empty'\n",
            "stage 1 has neither command nor call",
        ),
        ("[pipeline]\nstages = []\n", "invalid value [] for pipeline.stages"),
        (
            "[run]\njournal = 'x.db'\n[[pipeline.stages]]\ncommand = 'true'\n",
            "[run] option 'journal' does not apply to a [pipeline] job",
        ),
        (
            "[task]\ncommand = 'true'\n[[pipeline.stages]]\ncommand = 'true'\n",
            "has both [task] and [pipeline]",
        ),
        (
            "[[pipeline.stages]]\ncommand = 'true'\n"
            "[[pipeline.stages]]\ncall = 'no_such_module_here:f'\n",
            "stage 2 call 'no_such_module_here:f': cannot import",
        ),
        (
            "[[pipeline.stages]]\ncommand = 'true'\n"
            "[[pipeline.stages]]\ncommand = 'echo {2}'\n",
            "stage 2:",
        ),
        (
            "[[pipeline.stages]]\ncommand = 'true'\ntimeout = 'soon'\n",
            "invalid value 'soon' for pipeline.stages.0.timeout",
        ),
        (
            "[[pipeline.stages]]\ncommand = 'true'\nbackend = 'thread'\n",
            "stage 'true': a command template runs on the subprocess backend",
        ),
        ("[input]\nargs = ['a']\n", "has no [pipeline] table"),
    ],
    ids=[
        "unknown-key",
        "command-and-call",
        "no-task",
        "no-stages",
        "journal",
        "task-table",
        "missing-module",
        "missing-column",
        "bad-timeout",
        "command-on-threads",
        "no-pipeline",
    ],
)
def test_invalid_job_file_exits_2(tmp_path: Path, text: str, message: str) -> None:
    job = write_job(
        tmp_path, "[input]\nargs = ['a']\n" * ("[input]" not in text) + text
    )

    result = invoke(job)

    assert result.exit_code == 2, result.stderr
    errors = error_lines(result.stderr.encode())
    assert len(errors) == 1, result.stderr
    assert message in errors[0]


def test_invalid_later_stage_runs_nothing(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    job = write_job(
        tmp_path,
        f"""
[input]
args = ["a"]

[[pipeline.stages]]
command = ["sh", "-c", "echo $1 >> {ledger}", "sh", "{{}}"]

[[pipeline.stages]]
call = "{TASKS}:shout"
jobs = 0
""",
    )

    result = invoke(job)

    assert result.exit_code == 2, result.stderr
    assert "pipeline.stages.1.jobs" in result.stderr
    assert not ledger.exists()


def test_missing_job_file_exits_2(tmp_path: Path) -> None:
    code = run_pipeline_job(
        str(tmp_path / "missing.toml"), quiet=True, verbose=0, keep_order=False
    )

    assert code == 2


def test_is_pipeline_job_reads_tables(tmp_path: Path) -> None:
    pipeline = write_job(tmp_path, PARSE_THEN_ECHO)
    single = tmp_path / "single.toml"
    single.write_text("[task]\ncommand = 'true'\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("[pipeline\n")

    assert is_pipeline_job(str(pipeline))
    assert not is_pipeline_job(str(single))
    assert not is_pipeline_job(str(broken))
    assert not is_pipeline_job(str(tmp_path / "missing.toml"))


# -- a real process -----------------------------------------------------------


@contextlib.contextmanager
def started_pipeline(
    job: Path, cwd: Path, *options: str, stderr: IO[Any] | int = subprocess.PIPE
) -> Iterator[subprocess.Popen[bytes]]:
    """Start the pipeline command in a child interpreter; kill its tree at the end."""
    process = subprocess.Popen(
        [sys.executable, "-c", RUNNER, *options, str(job)],
        cwd=cwd,
        env=cli_environment(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=RUN_TIMEOUT)
        for stream in (process.stdin, process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_job_reads_stdin_in_real_process(tmp_path: Path) -> None:
    job = write_job(
        tmp_path,
        f"""
[run]
keep_order = true

[[pipeline.stages]]
call = "{TASKS}:parse_number"

[[pipeline.stages]]
command = ["printf", "%s\\\\n\\\\n", "{{}}"]
""",
    )

    with started_pipeline(job, tmp_path) as process:
        stdout, stderr = process.communicate(b"3\n4\n", timeout=RUN_TIMEOUT)

    assert process.returncode == 0, stderr.decode(errors="replace")
    # printf wrote "3\n\n"; the stage dropped one newline and the CLI added one.
    assert stdout == b"3\n\n4\n\n"


def test_second_sigint_cancels_and_exits_130(tmp_path: Path) -> None:
    ledger = tmp_path / "started"
    job = write_job(
        tmp_path,
        f"""
[input]
args = ["1", "2"]

[[pipeline.stages]]
call = "{TASKS}:parse_number"

[[pipeline.stages]]
command = ["sh", "-c", "echo $1 >> {ledger}; exec sleep 60", "sh", "{{}}"]
""",
    )

    log = tmp_path / "stderr"
    with (
        open(log, "wb") as stderr,
        started_pipeline(job, tmp_path, "-v", stderr=stderr) as process,
    ):
        wait_until(lambda: count_lines(ledger) == 2, "both commands", process=process)
        process.send_signal(signal.SIGINT)
        # A second SIGINT sent before the first is handled merges with it.
        wait_until(
            lambda: b"stopping: received SIGINT" in log.read_bytes(),
            "the first SIGINT to be handled",
            process=process,
        )
        process.send_signal(signal.SIGINT)
        process.wait(timeout=RUN_TIMEOUT)

    output = log.read_bytes()
    assert process.returncode == 130, output.decode(errors="replace")
    assert b"Interrupted by SIGINT." in output
    assert b"2 items: 0 succeeded, 0 failed, 2 cancelled" in output
