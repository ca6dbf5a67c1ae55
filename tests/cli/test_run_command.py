"""`run`, `status`, exit statuses, --halt, --dry-run and job files, end to end."""

from __future__ import annotations

import json
import shlex
from collections import Counter
from pathlib import Path

import pytest

from tests.cli.support import (
    Argument,
    cli_environment,
    count_lines,
    probe_command,
    read_probe_ledger,
    run_cli,
)

_COUNT_NAMES = ("succeeded", "failed", "skipped", "cancelled", "pending", "running")


def _fail_list(path: Path, items: list[bytes]) -> dict[str, str]:
    """Write the probe's list of items to fail, and return an environment naming it."""
    path.write_text("".join(item.hex() + "\n" for item in items))
    return cli_environment(PROBE_FAIL_LIST=str(path))


# -- exit statuses ------------------------------------------------------------


def test_all_succeeded_exits_0(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"

    result = run_cli(
        ["run", "--no-journal", *probe_command(ledger), ":::", "a", "b", "c"],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert count_lines(ledger) == 3


def test_some_failed_exits_1(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    environment = _fail_list(tmp_path / "fail-list", [b"b"])

    result = run_cli(
        ["run", "--no-journal", *probe_command(ledger), ":::", "a", "b", "c"],
        tmp_path,
        environment=environment,
    )

    assert result.returncode == 1, result.stderr.decode(errors="replace")
    assert count_lines(ledger) == 3


def test_halt_now_on_first_failure_exits_1(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    gate = tmp_path / "gate-never-opened"
    # Item 01 fails at once. Every other item waits for a gate that never
    # opens, so only a halt that cancels them ends the run early.
    script = (
        f'echo "$1" >> {shlex.quote(str(ledger))}; [ "$1" = 01 ] && exit 4; '
        'n=0; while [ ! -e "$2" ] && [ $n -lt 1200 ]; do sleep 0.05; '
        "n=$((n+1)); done"
    )
    items = [f"{number:02d}" for number in range(1, 21)]

    options = ["--no-journal", "-j", "2", "--halt", "now,fail=1"]
    command = ["sh", "-c", script, "sh", "{}", str(gate)]

    result = run_cli(["run", *options, *command, ":::", *items], tmp_path, timeout=45)

    assert result.returncode == 1, result.stderr.decode(errors="replace")
    started = ledger.read_text().split()
    assert "01" in started
    # Item 01 and the items in its two job slots: nothing starts after the halt.
    assert len(started) <= 3


# -- status -------------------------------------------------------------------


def test_status_json_has_run_state_and_counts(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    ledger = tmp_path / "ledger"
    environment = _fail_list(tmp_path / "fail-list", [b"b"])
    run = run_cli(
        ["run", "--journal", journal, *probe_command(ledger), ":::", "a", "b", "c"],
        tmp_path,
        environment=environment,
    )
    assert run.returncode == 1, run.stderr.decode(errors="replace")

    result = run_cli(["status", "--json", journal], tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    status = json.loads(result.stdout)
    assert isinstance(status["run_id"], str)
    assert status["run_id"]
    assert status["state"] == "finished"
    assert set(status["counts"]) == set(_COUNT_NAMES)
    assert status["counts"]["succeeded"] == 2
    assert status["counts"]["failed"] == 1
    for name in ("skipped", "cancelled", "pending", "running"):
        assert status["counts"][name] == 0, name


@pytest.mark.parametrize("null", [False, True], ids=["lines", "nul"])
def test_status_failed_feeds_back_through_files(tmp_path: Path, null: bool) -> None:
    journal = tmp_path / "run.db"
    ledger = tmp_path / "ledger"
    items = [b"ok", b"bad one", b"-bad", b"bad\xb2\x97", b"ok 2", b"bad\ttab"]
    if null:
        items += [b"bad\nnewline", b"ok\nnewline"]
    failing = [item for item in items if b"bad" in item]
    environment = _fail_list(tmp_path / "fail-list", failing)
    null_options = ["-0"] if null else []
    first = run_cli(
        ["run", "--journal", journal, *probe_command(ledger), ":::", *items],
        tmp_path,
        environment=environment,
    )
    assert first.returncode == 1, first.stderr.decode(errors="replace")

    listed = run_cli(["status", "--failed", *null_options, journal], tmp_path)

    assert listed.returncode == 0, listed.stderr.decode(errors="replace")
    failed_file = tmp_path / "failed"
    failed_file.write_bytes(listed.stdout)
    ledger.unlink()
    options = ["--no-journal", *null_options]
    again = run_cli(
        ["run", *options, *probe_command(ledger), "::::", failed_file], tmp_path
    )
    assert again.returncode == 0, again.stderr.decode(errors="replace")
    rerun = Counter(call.argv for call in read_probe_ledger(ledger))
    assert rerun == Counter((item,) for item in failing)


# -- dry run and job files ----------------------------------------------------


def test_dry_run_prints_commands_and_runs_nothing(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    command = [*probe_command(ledger), "--name={}", "{.}"]

    result = run_cli(
        ["run", "--dry-run", *command, ":::", "a.txt", "two words.txt", "$(x)"],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    printed = [shlex.split(line) for line in result.stdout.decode().splitlines()]
    assert printed == [
        [*probe_command(ledger), "--name=a.txt", "a"],
        [*probe_command(ledger), "--name=two words.txt", "two words"],
        [*probe_command(ledger), "--name=$(x)", "$(x)"],
    ]
    assert not ledger.exists()
    assert not (tmp_path / ".batchtools").exists()


def _write_job_file(path: Path, ledger: Path) -> None:
    command = json.dumps([*probe_command(ledger), "{}"])
    path.write_text(
        "[run]\n"
        "jobs = 2\n"
        'journal = "from-job-file.db"\n'
        "max_args = 1\n"
        "\n"
        "[input]\n"
        'args = ["a", "b", "c"]\n'
        "\n"
        "[task]\n"
        f"command = {command}\n"
    )


def test_job_file_runs_its_task_on_its_input(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    job_file = tmp_path / "job.toml"
    _write_job_file(job_file, ledger)

    result = run_cli(["run", "-f", job_file], tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert sorted(call.argv for call in read_probe_ledger(ledger)) == [
        (b"a",),
        (b"b",),
        (b"c",),
    ]
    assert (tmp_path / "from-job-file.db").exists()


def test_flag_overrides_job_file_value(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    job_file = tmp_path / "job.toml"
    _write_job_file(job_file, ledger)

    result = run_cli(
        ["run", "-f", job_file, "--journal", "from-flag.db", "--timeout", "30s"],
        tmp_path,
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert (tmp_path / "from-flag.db").exists()
    assert not (tmp_path / "from-job-file.db").exists()
    assert count_lines(ledger) == 3


def test_command_line_input_overrides_job_file(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    job_file = tmp_path / "job.toml"
    _write_job_file(job_file, ledger)
    arguments: list[Argument] = ["run", "-f", job_file, *probe_command(ledger)]

    result = run_cli([*arguments, "cli-{}", ":::", "x", "y"], tmp_path)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert sorted(call.argv for call in read_probe_ledger(ledger)) == [
        (b"cli-x",),
        (b"cli-y",),
    ]
