"""Memory, load and worker options of ``batchtools run``, as flags and in job files."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from tests.cli.support import cli_environment, run_cli, started_cli, wait_until


@pytest.mark.parametrize("backend", ["thread", "process"])
def test_setup_state_reaches_the_task_and_teardown_runs(
    tmp_path: Path, backend: str
) -> None:
    ledger = tmp_path / "ledger"
    environment = cli_environment(CALL_LEDGER=str(ledger))

    result = run_cli(
        [
            "run",
            "-q",
            "-j",
            "2",
            "--backend",
            backend,
            "--call",
            "tests.cli.call_tasks:with_session",
            "--setup",
            "tests.cli.call_tasks:connect",
            "--teardown",
            "tests.cli.call_tasks:disconnect",
            ":::",
            "a",
            "b",
            "c",
        ],
        tmp_path,
        environment=environment,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    lines = result.stdout.decode().split("\n")
    sessions = {line.split()[1] for line in lines if line}
    assert {line.split()[0] for line in lines if line} == {"a", "b", "c"}
    assert all(session.startswith("session-") for session in sessions)
    closed = ledger.read_text().splitlines()
    assert len(closed) == 2  # one teardown per worker
    assert sessions <= {line.removeprefix("closed ") for line in closed}


def test_memory_options_in_a_job_file_run(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        '[run]\nmemfree = "1K"\nmem_per_item = "1K"\njobs = 2\n'
        '[input]\nargs = ["x", "y"]\n[task]\ncommand = ["echo", "{}"]\n'
    )

    result = run_cli(["run", "-q", "-f", job], tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert sorted(result.stdout.decode().split()) == ["x", "y"]


def test_max_items_per_worker_recycles_process_workers(tmp_path: Path) -> None:
    result = run_cli(
        [
            "run",
            "-j",
            "1",
            "--backend",
            "process",
            "--max-items-per-worker",
            "2",
            "--call",
            "tests.cli.call_tasks:worker_pid",
            ":::",
            *[str(n) for n in range(6)],
        ],
        tmp_path,
    )

    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr
    pids = result.stdout.decode().split()
    assert len(pids) == 6
    assert len(set(pids)) == 3
    assert "3 worker processes were replaced after their share of items" in stderr


def test_fallback_chain_serves_what_the_call_cannot(tmp_path: Path) -> None:
    result = run_cli(
        [
            "run",
            "-k",
            "--call",
            "tests.cli.call_tasks:primary",
            "--fallback",
            "tests.cli.call_tasks:backup",
            ":::",
            "a",
            "bad-b",
            "c",
        ],
        tmp_path,
    )

    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr
    assert result.stdout.decode().splitlines() == [
        "a from primary",
        "bad-b from backup",
        "c from primary",
    ]
    assert "Succeeded by fallback strategy: primary 2, backup 1." in stderr


def test_fallback_in_a_job_file(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        '[input]\nargs = ["bad-x"]\n[task]\ncall = "tests.cli.call_tasks:primary"\n'
        'fallback = ["tests.cli.call_tasks:backup"]\n'
    )

    result = run_cli(["run", "-q", "-f", job], tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.decode() == "bad-x from backup\n"


def test_fallback_needs_call(tmp_path: Path) -> None:
    result = run_cli(
        ["run", "--fallback", "tests.cli.call_tasks:backup", "echo", ":::", "a"],
        tmp_path,
    )

    assert result.returncode == 2
    assert b"needs --call" in result.stderr


def test_cache_file_skips_calls_in_a_second_run(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    environment = cli_environment(CALL_LEDGER=str(ledger))
    arguments = [
        "run",
        "-k",
        "--cache",
        "cache.db",
        "--cache-ttl",
        "1h",
        "--call",
        "tests.cli.call_tasks:count_call",
        ":::",
        "abc",
        "def",
    ]

    first = run_cli(arguments, tmp_path, environment=environment)
    second = run_cli(arguments, tmp_path, environment=environment)

    assert first.returncode == 0, first.stderr.decode(errors="replace")
    assert second.returncode == 0, second.stderr.decode(errors="replace")
    assert first.stdout == second.stdout == b"cba\nfed\n"
    assert sorted(ledger.read_text().split()) == ["abc", "def"]
    assert b"2 of the succeeded items took their value from the result cache" in (
        second.stderr
    )


def test_cache_ttl_needs_cache(tmp_path: Path) -> None:
    result = run_cli(
        [
            "run",
            "--cache-ttl",
            "1h",
            "--call",
            "tests.cli.call_tasks:backup",
            ":::",
            "a",
        ],
        tmp_path,
    )

    assert result.returncode == 2
    assert b"--cache-ttl needs --cache" in result.stderr


@pytest.mark.parametrize("jobs", ["auto", "auto:2-4"])
def test_adaptive_jobs_run_every_item(tmp_path: Path, jobs: str) -> None:
    result = run_cli(
        ["run", "-j", jobs, "--", "echo", ":::", *[str(n) for n in range(30)]],
        tmp_path,
    )

    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr
    assert sorted(result.stdout.decode().split(), key=int) == [
        str(n) for n in range(30)
    ]


def test_adaptive_jobs_from_a_job_file_and_resume(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(
        '[run]\njobs = "auto:1-3"\njournal = "run.db"\n'
        '[input]\nargs = ["a", "b"]\n[task]\ncommand = ["echo", "{}"]\n'
    )

    first = run_cli(["run", "-q", "-f", job], tmp_path)
    again = run_cli(["resume", "-q", "-j", "auto", "run.db"], tmp_path)

    assert first.returncode == 0, first.stderr.decode(errors="replace")
    assert again.returncode == 0, again.stderr.decode(errors="replace")


def test_serialize_by_keeps_one_item_per_folder_running(tmp_path: Path) -> None:
    # mkdir is atomic: it fails while another item of the folder has the mark.
    for name in ("d1", "d2"):
        (tmp_path / name).mkdir()
    items = [f"{d}/{n}" for n in range(6) for d in ("d1", "d2")]
    script = "mkdir {//}/busy || echo OVERLAP {}; sleep 0.02; rmdir {//}/busy"

    options = ["-q", "-j", "4", "--serialize-by", "{//}", "--shell"]
    result = run_cli(["run", *options, script, ":::", *items], tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert b"OVERLAP" not in result.stdout


def test_serialize_by_needs_a_replacement_string(tmp_path: Path) -> None:
    result = run_cli(["run", "--serialize-by", "folder", "echo", ":::", "a"], tmp_path)

    assert result.returncode == 2
    assert b"--serialize-by 'folder' must contain a replacement string" in (
        result.stderr
    )


def test_workers_end_when_the_cli_is_killed(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    environment = cli_environment(
        CALL_LEDGER=str(ledger), CALL_GATE=str(tmp_path / "never")
    )
    arguments = ["run", "-q", "-j", "2", "--backend", "process"]
    arguments += ["--call", "tests.cli.call_tasks:record_then_wait", ":::", "a", "b"]

    with started_cli(arguments, tmp_path, environment=environment) as process:
        wait_until(
            lambda: ledger.exists() and len(ledger.read_text().splitlines()) == 2,
            "both items to start in worker processes",
            process=process,
        )
        workers = [int(line.split()[1]) for line in ledger.read_text().splitlines()]
        process.kill()
        process.wait()

        wait_until(
            lambda: not any(psutil.pid_exists(pid) for pid in workers),
            "the worker processes to end after their parent was killed",
        )


def test_priority_warns_about_bad_values(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text("a 1\nb 5\nc x\nd 9\n")

    options = ["-q", "--colsep", " ", "--priority", "{2}"]
    result = run_cli(["run", *options, "echo", "{1}", "::::", "in.txt"], tmp_path)

    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 0, stderr
    assert sorted(result.stdout.decode().split()) == ["a", "b", "c", "d"]
    assert "--priority='x' for item 2 of the input" in stderr
    assert "the item runs last" in stderr


def test_priority_aging_needs_priority(tmp_path: Path) -> None:
    result = run_cli(["run", "--priority-aging", "1", "echo", ":::", "a"], tmp_path)

    assert result.returncode == 2
    assert b"--priority-aging needs --priority" in result.stderr
