"""Damaged, foreign, newer and locked journals given to every command of the CLI.

A real run writes a journal with succeeded and failed items. Copies of it
are then truncated (inside the SQLite header, after it, mid-page, in the
last page), zeroed (whole, the first page, or two pages inside), replaced by another
program's SQLite file, or given a newer schema version. Each command
(`status`, `status --json`, `status --failed`, `report`, `report --json`,
`retry`, `resume`, `show` and `run` with the same command) is then
pointed at such a copy. Each must exit with status 3 and print one
``Error:`` line that names the file, without a traceback, and leave the
file's bytes as they were. The subset pairs each damage with one of the
commands, in turn, and the whole campaign tries every pair.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchtools.journal import iter_items
from batchtools.journal._schema import SCHEMA_VERSION
from tests.cli.support import (
    Argument,
    cli_environment,
    count_lines,
    error_lines,
    integrity_check,
    run_cli,
    started_cli,
    wait_until,
)
from tests.reliability.campaign import CAMPAIGN, ScenarioRecord

EXIT_ABORTED = 3
FAILING_TASK = "tests.reliability.tasks:fail_every_third"
GATED_TASK = "tests.cli.call_tasks:record_then_wait"
SOURCE_ITEMS = CAMPAIGN.size(90, 3000)
"""Items of the journal that is damaged: a third of them fail."""

NEXT_STEP = re.compile(
    r";.*\b(give|use|upgrade|wait|restore|remove|delete|move|start|run|pass|stop|"
    r"free|rename)\b"
)
"""An error's advice: after a semicolon, a verb that names what to do."""

Damage = Callable[[bytes, int], bytes]


def _page_size(data: bytes) -> int:
    # Bytes 16 and 17 of the SQLite header hold the page size; 1 means 65536.
    value = int.from_bytes(data[16:18], "big")
    return 65536 if value == 1 else value


DAMAGES: dict[str, Damage] = {
    "empty": lambda data, page: b"",
    "truncated-in-magic": lambda data, page: data[:10],
    "truncated-mid-header": lambda data, page: data[:50],
    "truncated-after-header": lambda data, page: data[:100],
    "truncated-to-first-page": lambda data, page: data[:page],
    "truncated-mid-second-page": lambda data, page: data[: page + page // 2],
    "truncated-mid-file": lambda data, page: data[
        : len(data) // page // 2 * page + page // 3
    ],
    "truncated-mid-last-page": lambda data, page: data[: len(data) - page // 2],
    "truncated-last-byte": lambda data, page: data[:-1],
    "zeroed": lambda data, page: bytes(len(data)),
    "zeroed-first-page": lambda data, page: bytes(page) + data[page:],
    # Pages deep in the file, which only a check of every page finds.
    "zeroed-inside-pages": lambda data, page: (
        data[: 2 * page] + bytes(2 * page) + data[4 * page :]
    ),
}
"""Damages made from the journal's bytes and its page size."""

WRITERS = {"retry", "resume", "run"}

COMMANDS = (
    "status", "status-json", "status-failed", "report", "report-json", "retry",
    "resume", "run", "show",
)  # fmt: skip
KINDS = (*DAMAGES, "foreign", "newer-schema")


def _pairs() -> list[Any]:
    """Return the (damage, command) pairs of this campaign, with known faults marked."""
    pairs = []
    for index, kind in enumerate(KINDS):
        commands: tuple[str, ...]
        if CAMPAIGN.full:
            commands = COMMANDS
        else:
            commands = (COMMANDS[index % len(COMMANDS)],)
        for command in commands:
            pairs.append(pytest.param(kind, command, id=f"{kind}-{command}"))
    return pairs


@pytest.fixture(scope="module")
def source_journal(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Return a journal with succeeded and failed items, and the key of one."""
    folder = tmp_path_factory.mktemp("source")
    journal = folder / "run.db"
    items = b"".join(b"%d\n" % number for number in range(1, SOURCE_ITEMS + 1))
    result = run_cli(
        ["run", "-q", "--journal", journal, "--call", FAILING_TASK],
        folder,
        stdin=items,
    )
    assert result.returncode == 1, result.stderr.decode(errors="replace")
    assert not Path(f"{journal}-wal").exists(), "the run left its WAL behind"
    key = next(iter_items(journal)).key
    return journal, key


def _damaged_copy(source: Path, kind: str, folder: Path) -> Path:
    """Write the ``kind`` of damaged journal into ``folder``; return its path."""
    path = folder / "damaged.db"
    if kind == "foreign":
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE run (id INTEGER, note TEXT)")
        connection.execute("INSERT INTO run VALUES (1, 'another program')")
        connection.commit()
        connection.close()
        return path
    data = source.read_bytes()
    if kind == "newer-schema":
        path.write_bytes(data)
        connection = sqlite3.connect(path)
        connection.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        connection.commit()
        connection.close()
        assert not Path(f"{path}-wal").exists()
        return path
    path.write_bytes(DAMAGES[kind](data, _page_size(data)))
    return path


def _arguments(command: str, journal: Path, key: str) -> list[Argument]:
    if command == "status-json":
        return ["status", "--json", journal]
    if command == "status-failed":
        return ["status", "--failed", journal]
    if command == "show":
        return ["show", journal, key]
    if command == "report-json":
        return ["report", "--json", journal]
    if command == "run":
        return ["run", "-q", "--journal", journal, "--call", FAILING_TASK, ":::", "1"]
    return [command, journal]


@pytest.mark.parametrize(("kind", "command"), _pairs())
def test_damaged_journal_rejected_untouched(
    tmp_path: Path,
    source_journal: tuple[Path, str],
    kind: str,
    command: str,
    scenario: ScenarioRecord,
) -> None:
    source, key = source_journal
    journal = _damaged_copy(source, kind, tmp_path)
    before = journal.read_bytes()
    scenario.faults_injected = 1

    result = run_cli(_arguments(command, journal, key), tmp_path, stdin=b"")
    scenario.tried = 1

    stderr = result.stderr.decode("utf-8", "replace")
    after = journal.read_bytes()
    scenario.notes["exit_status"] = result.returncode
    scenario.notes["modified"] = after != before
    assert "Traceback" not in stderr
    assert result.returncode == EXIT_ABORTED, stderr
    assert len(error_lines(result.stderr)) == 1, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert str(journal) in error_lines(result.stderr)[0]
    assert result.stdout == b""
    assert after == before


@pytest.mark.parametrize(
    "kind",
    [
        kind
        for kind in KINDS
        if CAMPAIGN.full or kind in ("zeroed", "foreign", "newer-schema")
    ],
)
def test_damaged_journal_error_names_next_step(
    tmp_path: Path,
    source_journal: tuple[Path, str],
    kind: str,
    scenario: ScenarioRecord,
) -> None:
    source, _ = source_journal
    journal = _damaged_copy(source, kind, tmp_path)
    scenario.faults_injected = 1

    result = run_cli(["resume", journal], tmp_path, stdin=b"")
    scenario.tried = 1

    lines = error_lines(result.stderr)
    assert result.returncode == EXIT_ABORTED
    assert len(lines) == 1
    assert NEXT_STEP.search(lines[0]), lines[0]


def test_locked_journal_rejected_while_run_lives(
    tmp_path: Path, scenario: ScenarioRecord
) -> None:
    journal = tmp_path / "held.db"
    ledger = tmp_path / "ledger"
    gate = tmp_path / "gate"
    environment = cli_environment(CALL_LEDGER=str(ledger), CALL_GATE=str(gate))
    run_arguments: list[Argument] = [
        "run", "-q", "-j", "2", "--journal", journal, "--call", GATED_TASK,
        ":::", "a", "b",
    ]  # fmt: skip
    with started_cli(run_arguments, tmp_path, environment=environment) as holder:
        wait_until(
            lambda: count_lines(ledger) == 2, "both items to start", process=holder
        )
        scenario.faults_injected = 1
        rejected = {
            "resume": run_cli(["resume", journal], tmp_path, environment=environment),
            "retry": run_cli(["retry", journal], tmp_path, environment=environment),
            "run": run_cli(run_arguments, tmp_path, environment=environment),
            "run-force": run_cli(
                [run_arguments[0], "--force", *run_arguments[1:]],
                tmp_path,
                environment=environment,
            ),
        }
        status = run_cli(["status", "--json", journal], tmp_path)
        scenario.tried = len(rejected) + 1
        gate.touch()
        holder_stderr = holder.communicate(timeout=60)[1]

    for command, result in rejected.items():
        stderr = result.stderr.decode("utf-8", "replace")
        lines = error_lines(result.stderr)
        assert "Traceback" not in stderr, command
        assert result.returncode == EXIT_ABORTED, (command, stderr)
        assert len(lines) == 1, (command, stderr)
        assert str(journal) in lines[0], command
        assert f"process {holder.pid}" in lines[0], command
        assert NEXT_STEP.search(lines[0]), (command, lines[0])
    # A live run's journal stays readable: status reports it as running.
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "running"
    assert holder.returncode == 0, holder_stderr
    calls = ledger.read_text().split()[::2]
    scenario.duplicates = len(calls) - len(set(calls))
    scenario.items_lost = len({"a", "b"} - set(calls))
    assert sorted(calls) == ["a", "b"]
    assert integrity_check(journal) == "ok"


def _not_a_file(kind: str, folder: Path) -> Path:
    if kind == "device":
        return Path("/dev/zero")
    path = folder / "journal.db"
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    return path


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
@pytest.mark.parametrize("command", ["status", "resume", "retry", "show", "report"])
def test_non_file_journal_rejected(
    tmp_path: Path, kind: str, command: str, scenario: ScenarioRecord
) -> None:
    journal = _not_a_file(kind, tmp_path)
    scenario.tried = 1
    scenario.faults_injected = 1

    result = run_cli(_arguments(command, journal, "key"), tmp_path, stdin=b"")

    assert result.returncode == EXIT_ABORTED, result.stderr
    (line,) = error_lines(result.stderr)
    assert line == (
        f"Error: journal {journal}: it is not a regular file; give the path of a "
        "journal file"
    )


def test_damaged_row_text_one_next_step(
    tmp_path: Path, scenario: ScenarioRecord
) -> None:
    # A byte of a key that is no longer UTF-8 passes SQLite's page check and
    # is found only when the row is read, after the run has begun.
    journal = tmp_path / "run.db"
    arguments: list[Argument] = ["run", "-q", "--journal", journal, "true"]
    first = run_cli(arguments, tmp_path, stdin=b"a\nb\nc\n")
    assert first.returncode == 0, first.stderr
    key = next(row.key for row in iter_items(journal) if row.seq == 1)
    data = bytearray(journal.read_bytes())
    data[data.index(key.encode()) + 3] = 0xFF
    journal.write_bytes(bytes(data))
    scenario.tried = 1
    scenario.faults_injected = 1

    result = run_cli(arguments, tmp_path, stdin=b"a\nb\nc\nd\n")

    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == EXIT_ABORTED, stderr
    (line,) = error_lines(result.stderr)
    assert "its items cannot be resumed: start the run again" in line
    assert "batchtools resume" not in stderr
