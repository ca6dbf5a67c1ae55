"""``batchtools run --secret``: what the command writes never shows the value.

Each test runs the installed CLI as a real process, then searches every
file it wrote (journal, --results folder, --audit file) and its captured
stdout and stderr for the secret value.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from batchtools.journal import read_run
from tests.cli.support import cli_environment, error_lines, run_cli
from tests.secrets.tasks import LEAK_VARIABLE

TOKEN = "cli-tok-82d1e0f5"
SOURCE = "BATCHTOOLS_TEST_TOKEN_SOURCE"
LEAKY_COMMAND = [sys.executable, str(Path(__file__).with_name("leaky_command.py"))]
# Exits 1 unless $TOKEN equals the content of the file "expected".
CHECK_TOKEN = [
    sys.executable,
    "-c",
    "import os, pathlib, sys; "
    "sys.exit(os.environ['TOKEN'] != pathlib.Path('expected').read_text())",
]


def files_containing(folder: Path, data: bytes) -> list[str]:
    """Return the files under ``folder`` whose bytes contain ``data``."""
    return sorted(
        str(path.relative_to(folder))
        for path in folder.rglob("*")
        if path.is_file() and data in path.read_bytes()
    )


def test_command_run_writes_no_secret(tmp_path: Path) -> None:
    result = run_cli(
        [
            "run",
            "--secret",
            f"TOKEN=env:{SOURCE}",
            "--journal",
            "run.db",
            "--results",
            "results",
            "--audit",
            "audit.jsonl",
            "--",
            *LEAKY_COMMAND,
            "{}",
            ":::",
            "good",
            "bad",
        ],
        tmp_path,
        environment=cli_environment(**{SOURCE: TOKEN}),
    )

    assert result.returncode == 1, result.stderr
    assert TOKEN.encode() not in result.stdout
    assert TOKEN.encode() not in result.stderr
    assert files_containing(tmp_path, TOKEN.encode()) == []
    assert b"item good token ***" in result.stdout
    assert b"token *** was rejected" in result.stderr
    assert b"argv has the token: False" in result.stdout
    assert b"environment has the token: True" in result.stdout
    written = files_containing(tmp_path, b"***")
    assert "run.db" in written or "run.db-wal" in written
    assert any(name.startswith("results/") for name in written)


def test_python_task_writes_no_secret(tmp_path: Path) -> None:
    result = run_cli(
        [
            "run",
            "--secret",
            f"TOKEN=env:{SOURCE}",
            "--call",
            "tests.secrets.tasks:fail_with_token",
            "--teardown",
            "tests.secrets.tasks:teardown_leaking",
            "-j",
            "1",
            "--journal",
            "run.db",
            "--results",
            "results",
            "--audit",
            "audit.jsonl",
            ":::",
            "good",
            "bad",
        ],
        tmp_path,
        environment=cli_environment(**{SOURCE: TOKEN, LEAK_VARIABLE: TOKEN}),
    )

    assert result.returncode == 1, result.stderr
    assert TOKEN.encode() not in result.stdout
    assert TOKEN.encode() not in result.stderr
    assert files_containing(tmp_path, TOKEN.encode()) == []
    assert b"good used ***" in result.stdout
    # The summary's cause, the teardown's error as the log handler wrote it,
    # and the task's own log line, which no handler of the CLI formats.
    assert b"login failed with token *** for bad" in result.stderr
    assert b"closing the session *** failed" in result.stderr
    assert b"item good logs in with token ***" in result.stderr
    written = files_containing(tmp_path, b"***")
    assert "audit.jsonl" in written
    assert any(name.startswith("results/") for name in written)


def test_missing_secret_stops_before_anything_runs(tmp_path: Path) -> None:
    environment = cli_environment()
    environment.pop(SOURCE, None)

    result = run_cli(
        [
            "run",
            "--secret",
            f"TOKEN=env:{SOURCE}",
            "--journal",
            "run.db",
            "--",
            "touch",
            "{}",
            ":::",
            "ran",
        ],
        tmp_path,
        environment=environment,
    )

    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert f"secret 'TOKEN' (env:{SOURCE}) is missing" in line
    assert f"the environment variable {SOURCE} is not set" in line
    assert not (tmp_path / "run.db").exists()
    assert not (tmp_path / ".batchtools").exists()
    assert not (tmp_path / "ran").exists()


def test_invalid_secret_option_is_usage_error(tmp_path: Path) -> None:
    result = run_cli(["run", "--secret", "TOKEN", "--", "true", ":::", "a"], tmp_path)

    assert result.returncode == 2
    [line] = error_lines(result.stderr)
    assert "invalid secret 'TOKEN': use NAME=SOURCE" in line


def test_file_secret_reaches_command(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(TOKEN + "\n")
    (tmp_path / "token").chmod(0o600)
    (tmp_path / "expected").write_text(TOKEN)

    result = run_cli(
        [
            "run",
            "--secret",
            "TOKEN=file:token",
            "--journal",
            "run.db",
            "--",
            *CHECK_TOKEN,
            ":::",
            "a",
        ],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr
    # Stored absolute, so that a resume from another folder finds the file.
    [stored] = read_run(tmp_path / "run.db").spec["cli"]["secrets"]
    name, _, path = stored.partition("=file:")
    assert name == "TOKEN"
    assert os.path.isabs(path)
    assert os.path.samefile(path, tmp_path / "token")


def test_job_file_names_secrets_and_audit(tmp_path: Path) -> None:
    (tmp_path / "expected").write_text(TOKEN)
    command = ", ".join(f"{word!r}" for word in CHECK_TOKEN)
    (tmp_path / "job.toml").write_text(
        "[run]\n"
        'audit = "audit.jsonl"\n'
        f'secrets = {{ TOKEN = "env:{SOURCE}" }}\n'
        "[input]\n"
        'args = ["a"]\n'
        "[task]\n"
        f"command = [{command}]\n"
    )
    environment = cli_environment(**{SOURCE: TOKEN})

    result = run_cli(["run", "-f", "job.toml"], tmp_path, environment=environment)
    missing = run_cli(["run", "-f", "job.toml"], tmp_path)

    assert result.returncode == 0, result.stderr
    assert (tmp_path / "audit.jsonl").exists()
    assert files_containing(tmp_path, TOKEN.encode()) == ["expected"]
    assert missing.returncode == 2
    assert SOURCE.encode() in missing.stderr


def test_retry_reads_secret_again(tmp_path: Path) -> None:
    (tmp_path / "expected").write_text("second-token-value")
    first = run_cli(
        [
            "run",
            "--secret",
            f"TOKEN=env:{SOURCE}",
            "--journal",
            "run.db",
            "--",
            *CHECK_TOKEN,
            ":::",
            "a",
        ],
        tmp_path,
        environment=cli_environment(**{SOURCE: "first-token-value"}),
    )
    assert first.returncode == 1, first.stderr
    stored = read_run(tmp_path / "run.db").spec["cli"]["secrets"]

    unset = cli_environment()
    unset.pop(SOURCE, None)
    without = run_cli(["retry", "run.db"], tmp_path, environment=unset)
    again = run_cli(
        ["retry", "run.db"],
        tmp_path,
        environment=cli_environment(**{SOURCE: "second-token-value"}),
    )

    assert stored == [f"TOKEN=env:{SOURCE}"]
    assert files_containing(tmp_path, b"first-token-value") == []
    assert without.returncode == 2
    assert f"secret 'TOKEN' (env:{SOURCE}) is missing" in error_lines(without.stderr)[0]
    assert again.returncode == 0, again.stderr
