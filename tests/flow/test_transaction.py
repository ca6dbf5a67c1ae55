"""Transactions: commit, rollback, recovery after SIGKILL, and bad input.

Steps come from `tests.flow.txn_steps`. `MoveFile` moves real files, so
the tests check the outcome on disk. `Record` appends every call to a
ledger file, which shows the order of calls, also across processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner

from batchtools import ConfigurationError, JournalError, JournalLockedError
from batchtools.cli._recover_command import recover_command
from batchtools.flow.transaction import (
    OPERATION_TRANSITIONS,
    TRANSACTION_TRANSITIONS,
    OperationStatus,
    Transaction,
    TransactionReport,
    TransactionStatus,
)
from batchtools.journal._transaction_store import StoredError, TransactionStore
from batchtools.testing import fast_retries
from tests.cli.support import wait_until
from tests.flow import txn_steps
from tests.flow.txn_steps import read_ledger

REPOSITORY = Path(__file__).resolve().parents[2]
MOVE = "tests.flow.txn_steps:MoveFile"
RECORD = "tests.flow.txn_steps:Record"
FILES = 3
S = TypeVar("S", TransactionStatus, OperationStatus)

# Runs one transaction in a new process; the test kills it where a step pauses.
TRANSACTION_SCRIPT = """
import json, sys
from batchtools.flow.transaction import Transaction
spec = json.loads(sys.argv[1])
txn = Transaction(spec["journal"], roll_forward=spec["roll_forward"])
for step, state in spec["operations"]:
    txn.add(step, state)
txn.run()
"""


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    # The recover command points the batchtools logger at CliRunner's stream.
    logger = logging.getLogger("batchtools")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


# -- helpers ------------------------------------------------------------------


def make_files(folder: Path) -> list[dict[str, Any]]:
    """Create FILES source files and return a move state for each."""
    (folder / "src").mkdir()
    states = []
    for number in range(FILES):
        source = folder / "src" / f"file{number}"
        source.write_text(f"content {number}\n")
        states.append(
            {"src": str(source), "dst": str(folder / "dst" / f"file{number}")}
        )
    return states


def where_files_are(states: list[dict[str, Any]]) -> list[str]:
    """Return "src" or "dst" per file, checking that it is in one place, intact."""
    places = []
    for number, state in enumerate(states):
        at_source = Path(state["src"]).exists()
        at_target = Path(state["dst"]).exists()
        assert at_source != at_target, f"file{number}: src {at_source}, dst {at_target}"
        path = Path(state["src"] if at_source else state["dst"])
        assert path.read_text() == f"content {number}\n"
        places.append("src" if at_source else "dst")
    return places


def record_states(ledger: Path, count: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"ledger": str(ledger), "name": f"op{n}"} | extra for n in range(count)]


def ledger_calls(ledger: Path, phase: str) -> list[str]:
    return [call["name"] for call in read_ledger(ledger) if call["phase"] == phase]


def transaction_of(
    journal: Path, step: str, states: list[dict[str, Any]], **options: Any
) -> Transaction:
    txn = Transaction(journal, **options)
    for state in states:
        txn.add(step, state)
    return txn


def stored_statuses(journal: Path) -> tuple[list[str], list[str]]:
    """Return the statuses of the transactions and of all operations, as stored."""
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        transactions = [
            row[0] for row in conn.execute("SELECT status FROM transactions")
        ]
        operations = [
            row[0] for row in conn.execute("SELECT status FROM operations ORDER BY seq")
        ]
    finally:
        conn.close()
    return transactions, operations


def statuses(report: TransactionReport) -> list[OperationStatus]:
    return [op.status for op in report.operations]


def recover_cli(*arguments: str) -> Any:
    return CliRunner().invoke(recover_command, list(arguments))


# -- commit and rollback in one process ------------------------------------------


def test_transaction_commits_every_move(tmp_path: Path) -> None:
    states = make_files(tmp_path)
    journal = tmp_path / "moves.db"

    report = transaction_of(journal, MOVE, states).run()

    assert report.committed
    assert report.errors == []
    assert statuses(report) == [OperationStatus.COMMITTED] * FILES
    assert where_files_are(states) == ["dst"] * FILES
    assert stored_statuses(journal) == (["committed"], ["committed"] * FILES)
    assert journal.stat().st_mode & 0o777 == 0o600


def test_commits_run_in_order_with_prepared_state(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    txn = transaction_of(tmp_path / "t.db", RECORD, record_states(ledger, 4))

    report = txn.run()

    assert report.committed
    assert sorted(ledger_calls(ledger, "prepare")) == ["op0", "op1", "op2", "op3"]
    assert ledger_calls(ledger, "commit") == ["op0", "op1", "op2", "op3"]
    commits = [call for call in read_ledger(ledger) if call["phase"] == "commit"]
    assert [call["token"] for call in commits] == [f"token-op{n}" for n in range(4)]
    keys = [f"{report.transaction_id}:{n}" for n in range(4)]
    assert [call["key"] for call in commits] == keys
    assert [op.calls for op in report.operations] == [("prepare", "commit")] * 4


def test_prepare_failure_commits_nothing(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    states = record_states(ledger, 3)
    states[1]["fail"] = ["prepare"]

    report = transaction_of(tmp_path / "t.db", RECORD, states, concurrency=1).run()

    assert report.rolled_back
    assert ledger_calls(ledger, "commit") == []
    assert [(e.index, e.phase) for e in report.errors] == [(1, "prepare")]
    assert "prepare of op1 failed on request" in str(report.errors[0])
    # Every operation whose prepare ran is rolled back, the last one first.
    prepared = ledger_calls(ledger, "prepare")
    assert ledger_calls(ledger, "rollback") == sorted(prepared, reverse=True)
    for op in report.operations:
        ran = f"op{op.index}" in prepared
        expected = OperationStatus.ROLLED_BACK if ran else OperationStatus.SKIPPED
        assert op.status is expected


def test_commit_failure_rolls_back_earlier_commits(tmp_path: Path) -> None:
    states = make_files(tmp_path)
    states[1]["fail"] = ["commit"]

    report = transaction_of(tmp_path / "t.db", MOVE, states).run()

    assert report.rolled_back
    assert where_files_are(states) == ["src"] * FILES
    assert [(e.index, e.phase, e.type_name) for e in report.errors] == [
        (1, "commit", "StepFailedError")
    ]
    assert isinstance(report.errors[0].error, txn_steps.StepFailedError)
    assert "StepFailedError" in report.errors[0].traceback
    assert stored_statuses(tmp_path / "t.db") == (
        ["rolled_back"],
        ["rolled_back"] * FILES,
    )


def test_rollback_runs_from_last_to_first(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    states = record_states(ledger, 3)
    states[1]["fail"] = ["commit"]

    report = transaction_of(tmp_path / "t.db", RECORD, states).run()

    assert report.rolled_back
    assert ledger_calls(ledger, "commit") == ["op0", "op1"]
    assert ledger_calls(ledger, "rollback") == ["op2", "op1", "op0"]
    rollbacks = [call for call in read_ledger(ledger) if call["phase"] == "rollback"]
    assert [call["token"] for call in rollbacks] == [
        "token-op2",
        "token-op1",
        "token-op0",
    ]


def test_rollback_error_is_reported_and_recovered(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    flag = tmp_path / "rollback-fails"
    flag.touch()
    journal = tmp_path / "t.db"
    states = record_states(ledger, 3)
    states[2]["fail"] = ["commit"]
    states[0] |= {"fail": ["rollback"], "fail_while": str(flag)}

    report = transaction_of(journal, RECORD, states).run()

    assert report.status is TransactionStatus.ROLLBACK_FAILED
    assert [(e.index, e.phase) for e in report.errors] == [
        (2, "commit"),
        (0, "rollback"),
    ]
    assert ledger_calls(ledger, "rollback") == ["op2", "op1", "op0"]
    assert statuses(report) == [
        OperationStatus.ROLLBACK_FAILED,
        OperationStatus.ROLLED_BACK,
        OperationStatus.ROLLED_BACK,
    ]
    assert stored_statuses(journal)[0] == ["rollback_failed"]

    still_failing = Transaction.recover(journal)

    assert [r.status for r in still_failing] == [TransactionStatus.ROLLBACK_FAILED]
    assert still_failing[0].recovered_from is TransactionStatus.ROLLBACK_FAILED
    assert [op.calls for op in still_failing[0].operations] == [("rollback",), (), ()]

    result = recover_cli("-v", str(journal))

    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.output
    assert "operation 0 (tests.flow.txn_steps:Record): rollback failed" in result.output
    assert "run 'batchtools recover' again" in result.output

    flag.unlink()
    fixed = Transaction.recover(journal)

    assert [r.status for r in fixed] == [TransactionStatus.ROLLED_BACK]
    assert fixed[0].errors == []
    assert Transaction.recover(journal) == []
    assert stored_statuses(journal) == (["rolled_back"], ["rolled_back"] * 3)


def test_retries_apply_to_prepare_and_commit(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    states = record_states(ledger, 2, fail_first={"prepare": 1, "commit": 1})

    with fast_retries():
        report = transaction_of(tmp_path / "t.db", RECORD, states, retry=1).run()

    assert report.committed
    assert sorted(ledger_calls(ledger, "prepare")) == ["op0", "op0", "op1", "op1"]
    assert ledger_calls(ledger, "commit") == ["op0", "op0", "op1", "op1"]
    assert report.operations[0].calls == ("prepare", "prepare", "commit", "commit")


def test_without_retry_one_failure_rolls_back(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    states = record_states(ledger, 2, fail_first={"commit": 1})

    report = transaction_of(tmp_path / "t.db", RECORD, states).run()

    assert report.rolled_back
    assert ledger_calls(ledger, "commit") == ["op0"]


def test_prepares_run_concurrently(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    txn_steps.BARRIERS["three"] = threading.Barrier(3)
    states = record_states(ledger, 3, barrier="three")

    report = transaction_of(
        tmp_path / "t.db", "tests.flow.txn_steps:Gate", states, concurrency=3
    ).run()

    # Each prepare waits until all three wait at once, so they ran concurrently.
    assert report.committed
    assert report.errors == []


def test_rollback_waits_for_a_prepare_that_timed_out(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    txn_steps.BARRIERS["never-full"] = threading.Barrier(2)
    states = record_states(ledger, 1, barrier="never-full", timeout=1.0)

    report = transaction_of(
        tmp_path / "t.db", "tests.flow.txn_steps:Gate", states, timeout=0.1
    ).run()

    assert report.rolled_back
    assert [(e.phase, e.type_name) for e in report.errors] == [
        ("prepare", "AttemptTimeoutError")
    ]
    phases = [call["phase"] for call in read_ledger(ledger)]
    assert phases == ["prepare returned", "rollback"]


def test_async_and_sync_steps_mix(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    txn = Transaction(tmp_path / "t.db")
    txn.add("tests.flow.txn_steps:AsyncRecord", {"ledger": str(ledger), "name": "a"})
    txn.add(RECORD, {"ledger": str(ledger), "name": "b"})

    report = asyncio.run(txn.arun())

    assert report.committed
    assert ledger_calls(ledger, "commit") == ["a", "b"]


def test_step_of_functions_without_prepare(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    states = record_states(ledger, 2)

    report = transaction_of(
        tmp_path / "t.db", "tests.flow.txn_steps:record_functions", states
    ).run()

    assert report.committed
    assert ledger_calls(ledger, "prepare") == []
    assert [call["token"] for call in read_ledger(ledger)] == [None, None]


def test_run_works_inside_a_running_event_loop(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    txn = transaction_of(tmp_path / "t.db", RECORD, record_states(ledger, 1))

    async def main() -> TransactionReport:
        return txn.run()

    assert asyncio.run(main()).committed


def test_empty_transaction_commits(tmp_path: Path) -> None:
    report = Transaction(tmp_path / "t.db").run()

    assert report.committed
    assert report.operations == []


def test_prepare_returning_non_json_state_fails(tmp_path: Path) -> None:
    txn = Transaction(tmp_path / "t.db")
    txn.add("tests.flow.txn_steps:BadPrepare", {})

    report = txn.run()

    assert report.rolled_back
    assert [(e.phase, e.type_name) for e in report.errors] == [
        ("prepare", "ConfigurationError")
    ]
    assert "is not JSON data" in report.errors[0].message


def test_transactions_share_a_journal_in_one_process(tmp_path: Path) -> None:
    journal = tmp_path / "t.db"
    ledger = tmp_path / "ledger"
    first = transaction_of(journal, RECORD, [{"ledger": str(ledger), "name": "a"}])
    second = transaction_of(journal, RECORD, [{"ledger": str(ledger), "name": "b"}])

    async def both() -> list[TransactionReport]:
        return list(await asyncio.gather(first.arun(), second.arun()))

    reports = asyncio.run(both())

    assert [r.status for r in reports] == [TransactionStatus.COMMITTED] * 2
    assert sorted(ledger_calls(ledger, "commit")) == ["a", "b"]


def test_recovery_skips_a_transaction_live_in_this_process(tmp_path: Path) -> None:
    journal = tmp_path / "t.db"
    ledger = tmp_path / "ledger"
    entered = txn_steps.EVENTS["held:entered"] = threading.Event()
    go = txn_steps.EVENTS["held:go"] = threading.Event()
    txn = transaction_of(
        journal, "tests.flow.txn_steps:Hold", [{"ledger": str(ledger), "name": "held"}]
    )
    reports: list[TransactionReport] = []
    runner = threading.Thread(target=lambda: reports.append(txn.run()))
    runner.start()
    try:
        assert entered.wait(timeout=30)

        recovered = Transaction.recover(journal)
    finally:
        go.set()
        runner.join()

    assert recovered == []
    assert [r.status for r in reports] == [TransactionStatus.COMMITTED]
    assert ledger_calls(ledger, "rollback") == []


def test_cancelled_run_is_left_for_recovery(tmp_path: Path) -> None:
    journal = tmp_path / "t.db"
    ledger = tmp_path / "ledger"
    entered = txn_steps.EVENTS["cancelled:entered"] = threading.Event()
    go = txn_steps.EVENTS["cancelled:go"] = threading.Event()
    txn = transaction_of(
        journal,
        "tests.flow.txn_steps:Hold",
        [{"ledger": str(ledger), "name": "cancelled"}],
    )

    async def cancel_during_commit() -> list[TransactionReport]:
        task = asyncio.create_task(txn.arun())
        await asyncio.to_thread(entered.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The commit still executes in its thread, so the transaction is live.
        try:
            return await Transaction.arecover(journal)
        finally:
            go.set()

    # asyncio.run returns once the commit's thread has ended.
    while_committing = asyncio.run(cancel_during_commit())
    reports = Transaction.recover(journal)

    assert while_committing == []
    assert [r.recovered_from for r in reports] == [TransactionStatus.COMMITTING]
    assert reports[0].rolled_back
    assert [call["phase"] for call in read_ledger(ledger)] == ["commit", "rollback"]


# -- bad input --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ("no_colon", "must be an importable name"),
        ("tests.flow.no_such_module:Step", "importing 'tests.flow.no_such_module'"),
        ("tests.flow.txn_steps:Missing", "has no attribute 'Missing'"),
        ("tests.flow.txn_steps:NoRollback", "has no rollback method"),
        ("tests.flow.txn_steps:NeedsArguments", "must take no arguments"),
        ("tests.flow.txn_steps:BLOCK_SECONDS", "has no commit method"),
    ],
)
def test_bad_step_is_rejected(tmp_path: Path, step: str, message: str) -> None:
    txn = Transaction(tmp_path / "t.db")

    with pytest.raises(ConfigurationError, match=message) as info:
        txn.add(step, {})

    assert repr(step) in str(info.value)
    assert len(txn) == 0
    assert not (tmp_path / "t.db").exists()


def test_step_name_must_be_text(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="must be an importable name"):
        Transaction(tmp_path / "t.db").add(42, {})  # type: ignore[arg-type]  # the wrong type is the case


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({1: "a"}, "key 1 is not a string"),
        ({"a": {1, 2}}, "not JSON serializable"),
        (float("nan"), "Out of range float"),
        ([object()], "not JSON serializable"),
    ],
)
def test_state_that_is_not_json_is_rejected(
    tmp_path: Path, state: Any, message: str
) -> None:
    txn = Transaction(tmp_path / "t.db")

    with pytest.raises(ConfigurationError, match=message) as info:
        txn.add(RECORD, state)

    assert "the state of operation 0 (tests.flow.txn_steps:Record)" in str(info.value)
    assert "use dicts with string keys" in str(info.value)
    assert not (tmp_path / "t.db").exists()


def test_state_reaches_steps_as_decoded_json(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger"
    txn = Transaction(tmp_path / "t.db")
    txn.add(RECORD, {"ledger": str(ledger), "name": "op0", "pair": (1, 2)})

    report = txn.run()

    assert report.committed
    conn = sqlite3.connect(tmp_path / "t.db")
    (state,) = conn.execute("SELECT state FROM operations").fetchone()
    conn.close()
    assert json.loads(state)["pair"] == [1, 2]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"concurrency": 0}, "concurrency=0 must be a whole number from 1"),
        ({"concurrency": True}, "concurrency=True must be a whole number"),
        ({"retry": -1}, "retry=-1 must be a number of retries"),
        ({"timeout": "soon"}, "invalid timeout 'soon'"),
    ],
)
def test_bad_option_is_rejected(
    tmp_path: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        Transaction(tmp_path / "t.db", **options)


def test_run_journal_is_not_a_transaction_journal(tmp_path: Path) -> None:
    import batchtools

    run_journal = tmp_path / "run.db"
    batchtools.run([1], str, journal=run_journal)
    txn = Transaction(run_journal)

    with pytest.raises(JournalError, match="it is a run journal"):
        txn.run()
    with pytest.raises(JournalError, match="it is a run journal"):
        Transaction.recover(run_journal)


def test_recover_of_a_missing_journal_fails(tmp_path: Path) -> None:
    with pytest.raises(JournalError, match="no such transaction journal"):
        Transaction.recover(tmp_path / "missing.db")

    assert list(tmp_path.iterdir()) == []


# -- the state machines -----------------------------------------------------------


def reachable(table: Mapping[S, frozenset[S]], start: S) -> set[S]:
    """Return the statuses that ``table`` lets ``start`` reach, itself included."""
    reached = {start}
    frontier = [start]
    while frontier:
        for target in table[frontier.pop()]:
            if target not in reached:
                reached.add(target)
                frontier.append(target)
    return reached


def test_transition_tables_cover_every_status() -> None:
    assert set(TRANSACTION_TRANSITIONS) == set(TransactionStatus)
    assert set(OPERATION_TRANSITIONS) == set(OperationStatus)
    for status, targets in TRANSACTION_TRANSITIONS.items():
        assert (not targets) == status.is_final, status
    assert reachable(TRANSACTION_TRANSITIONS, TransactionStatus.PREPARING) == set(
        TransactionStatus
    )
    assert reachable(OPERATION_TRANSITIONS, OperationStatus.PENDING) == set(
        OperationStatus
    )


def test_store_rejects_changes_outside_the_tables(tmp_path: Path) -> None:
    store = TransactionStore.open(tmp_path / "t.db", create=True)
    try:
        store.begin("t1", False, [("pkg.mod:Step", "{}")])
        for status in TransactionStatus:
            if status is TransactionStatus.PREPARING:
                continue
            allowed = status in TRANSACTION_TRANSITIONS[TransactionStatus.PREPARING]
            if not allowed:
                with pytest.raises(JournalError, match="cannot change from preparing"):
                    store.update("t1", status=status)
        for op_status in OperationStatus:
            if op_status is OperationStatus.PENDING:
                continue
            if op_status not in OPERATION_TRANSITIONS[OperationStatus.PENDING]:
                with pytest.raises(JournalError, match="cannot change from pending"):
                    store.update("t1", operations={0: op_status})
        error = StoredError(0, "prepare", 1.0, "OSError", "boom", "trace")
        store.update("t1", status=TransactionStatus.ROLLING_BACK, errors=[error])
        stored = store.load("t1")
    finally:
        store.close()

    assert stored is not None
    assert stored.status is TransactionStatus.ROLLING_BACK
    assert stored.errors == (error,)
    assert [op.status for op in stored.operations] == [OperationStatus.PENDING]


# -- recovery after SIGKILL ---------------------------------------------------------


def start_transaction(
    journal: Path, states: list[dict[str, Any]], *, roll_forward: bool
) -> subprocess.Popen[bytes]:
    spec = {
        "journal": str(journal),
        "roll_forward": roll_forward,
        "operations": [[MOVE, state] for state in states],
    }
    return subprocess.Popen(
        [sys.executable, "-c", TRANSACTION_SCRIPT, json.dumps(spec)],
        cwd=REPOSITORY,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def kill_when_paused(process: subprocess.Popen[bytes], marker: Path) -> None:
    """Wait until a step pauses and writes ``marker``, then SIGKILL the process."""
    try:
        wait_until(marker.exists, "a step to pause", timeout=30, process=process)
    except AssertionError:
        process.kill()
        _, stderr = process.communicate()
        raise AssertionError(stderr.decode(errors="replace")) from None
    process.kill()
    process.communicate()


def pause_at(
    states: list[dict[str, Any]], index: int, phase: str, at: str, marker: Path
) -> None:
    states[index]["pause"] = {"phase": phase, "at": at, "marker": str(marker)}


@pytest.mark.parametrize(
    ("roll_forward", "index", "at", "via"),
    [
        (False, 1, "after", "library"),
        (False, 2, "before", "cli"),
        (True, 1, "before", "cli"),
        (True, 2, "after", "library"),
    ],
)
def test_kill_during_commit_then_recover(
    tmp_path: Path, roll_forward: bool, index: int, at: str, via: str
) -> None:
    journal = tmp_path / "moves.db"
    marker = tmp_path / "paused"
    states = make_files(tmp_path)
    pause_at(states, index, "commit", at, marker)
    process = start_transaction(journal, states, roll_forward=roll_forward)
    try:
        wait_until(marker.exists, "commit to pause", timeout=30, process=process)
        # While the process lives, recovery must not touch its transaction.
        with pytest.raises(JournalLockedError) as locked:
            Transaction.recover(journal)
        assert locked.value.holder_pid == process.pid
        assert recover_cli(str(journal)).exit_code == 3
    finally:
        kill_when_paused(process, marker)
    expected = "dst" if roll_forward else "src"

    if via == "library":
        reports = Transaction.recover(journal)
        assert [r.recovered_from for r in reports] == [TransactionStatus.COMMITTING]
        assert reports[0].errors == []
        if roll_forward:
            assert reports[0].committed
            # Commits recorded as done are not called again.
            calls = [("commit",) if n >= index else () for n in range(FILES)]
            assert [op.calls for op in reports[0].operations] == calls
        else:
            assert reports[0].rolled_back
            rolled = [op.index for op in reports[0].operations if op.calls]
            assert rolled == list(range(FILES))
    else:
        result = recover_cli(str(journal))
        assert result.exit_code == 0, result.output
        now = "committed" if roll_forward else "rolled back"
        assert f"was committing, now {now}" in result.output

    assert where_files_are(states) == [expected] * FILES
    final = "committed" if roll_forward else "rolled_back"
    assert stored_statuses(journal) == ([final], [final] * FILES)
    # Recovery again finds nothing to do.
    assert Transaction.recover(journal) == []
    again = recover_cli(str(journal))
    assert again.exit_code == 0
    assert again.output == f"no unfinished transactions in {journal}\n"


def test_kill_during_prepare_rolls_back_even_forward(tmp_path: Path) -> None:
    journal = tmp_path / "moves.db"
    marker = tmp_path / "paused"
    states = make_files(tmp_path)
    pause_at(states, 1, "prepare", "before", marker)
    process = start_transaction(journal, states, roll_forward=True)
    kill_when_paused(process, marker)
    ledger = tmp_path / "ledger"

    # The next transaction on the journal finishes the killed one first.
    report = transaction_of(journal, RECORD, record_states(ledger, 1)).run()

    assert report.committed
    assert [r.recovered_from for r in report.recoveries] == [
        TransactionStatus.PREPARING
    ]
    assert report.recoveries[0].rolled_back
    assert where_files_are(states) == ["src"] * FILES
    assert Transaction.recover(journal) == []


def test_kill_during_rollback_then_recover(tmp_path: Path) -> None:
    journal = tmp_path / "moves.db"
    marker = tmp_path / "paused"
    states = make_files(tmp_path)
    states[2]["fail"] = ["commit"]
    pause_at(states, 1, "rollback", "after", marker)
    process = start_transaction(journal, states, roll_forward=True)
    kill_when_paused(process, marker)

    reports = Transaction.recover(journal)

    assert [r.recovered_from for r in reports] == [TransactionStatus.ROLLING_BACK]
    assert reports[0].rolled_back
    # Operation 2 was rolled back before the kill; 1 is rolled back again.
    assert [op.calls for op in reports[0].operations] == [
        ("rollback",),
        ("rollback",),
        (),
    ]
    assert where_files_are(states) == ["src"] * FILES


# -- the recover command ----------------------------------------------------------


def test_recover_command_rejects_bad_paths(tmp_path: Path) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    journal = tmp_path / "t.db"
    Transaction(journal).run()
    link = tmp_path / "link.db"
    link.symlink_to(journal)

    missing = recover_cli(str(tmp_path / "missing.db"))
    directory = recover_cli(str(folder))
    symlink = recover_cli(str(link))

    assert missing.exit_code == 2
    assert "no such file" in missing.output
    assert directory.exit_code == 2
    assert "not a regular file" in directory.output
    assert symlink.exit_code == 2
    assert "symbolic link" in symlink.output


def test_recover_command_rejects_unusable_journals(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    empty = tmp_path / "empty.db"
    empty.touch()

    damaged = recover_cli(str(text))
    blank = recover_cli(str(empty))

    assert damaged.exit_code == 3
    assert "not a transaction journal" in damaged.output
    assert blank.exit_code == 3
    assert "it is empty" in blank.output
    assert text.read_text() == "not a database\n" * 100
    assert empty.stat().st_size == 0
