"""Signals sent to the CLI process while items run: drain, exit status, resume.

Each command records its item in a ledger, then waits for a gate file, so
the test can tell which items are in flight when it sends the signal. The CLI
runs with ``-v``, which logs "stopping: received SIG..." once the engine
has taken the signal; the test opens the gate only after that line, so
that "no new item starts after the signal" does not depend on timing.
"""

from __future__ import annotations

import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

import batchtools
from batchtools import ConfigurationError
from tests.cli.support import (
    cli_environment,
    count_in_state,
    count_lines,
    items_by_state,
    run_cli,
    started_cli,
    wait_until,
)

ITEMS = 12
JOBS = 4
_WAIT_FOR_GATE = (
    'n=0; while [ ! -e "$2" ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done; '
    '[ -e "$2" ] || exit 7'
)


def _contains(path: Path, text: bytes) -> bool:
    return path.exists() and text in path.read_bytes()


def _interrupt_then_resume(tmp_path: Path, signum: signal.Signals) -> None:
    """Send ``signum`` once while JOBS items run, then resume the run.

    Checks that the items in flight finish and are recorded, that no other
    item starts, the exit status (128 plus the signal number) and the hint
    to resume, and that `resume` runs exactly the rest.
    """
    journal = tmp_path / "run.db"
    ledger = tmp_path / "ledger"
    gate = tmp_path / "gate"
    errors = tmp_path / "stderr"
    script = f'echo "$1 $PROBE_SESSION" >> {shlex.quote(str(ledger))}; {_WAIT_FOR_GATE}'
    items = [f"item-{number:02d}" for number in range(1, ITEMS + 1)]
    arguments: list[str | Path] = [
        "run",
        "-v",
        "-j",
        str(JOBS),
        "--journal",
        journal,
        "sh",
        "-c",
        script,
        "sh",
        "{}",
        str(gate),
        ":::",
        *items,
    ]
    with (
        open(errors, "wb") as stderr,
        started_cli(
            arguments,
            tmp_path,
            environment=cli_environment(PROBE_SESSION="1"),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        ) as process,
    ):
        wait_until(
            lambda: count_lines(ledger) == JOBS,
            f"{JOBS} items in flight",
            process=process,
        )
        process.send_signal(signum)
        wait_until(
            lambda: _contains(errors, f"received {signum.name}".encode()),
            f"batchtools to log that it received {signum.name}",
            process=process,
        )
        gate.touch()
        status = process.wait(timeout=60)
    message = errors.read_text(errors="replace")

    assert status == 128 + signum, message
    assert f"batchtools resume {journal}" in message
    in_flight = {line.split(" ")[0] for line in ledger.read_text().splitlines()}
    assert len(in_flight) == JOBS, "an item started after the signal"
    states = items_by_state(journal)
    drained = {item.decode() for item, state in states.items() if state == "succeeded"}
    assert drained == in_flight

    result = run_cli(
        ["resume", "-q", journal],
        tmp_path,
        environment=cli_environment(PROBE_SESSION="2"),
    )

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert count_in_state(journal, "succeeded") == ITEMS
    calls = [line.split(" ") for line in ledger.read_text().splitlines()]
    assert sorted(item for item, _ in calls) == items
    resumed = {item for item, session in calls if session == "2"}
    assert resumed == set(items) - in_flight


def test_sigint_drains_then_resume_finishes(tmp_path: Path) -> None:
    _interrupt_then_resume(tmp_path, signal.SIGINT)


def test_sigterm_exits_143_and_resumes(tmp_path: Path) -> None:
    _interrupt_then_resume(tmp_path, signal.SIGTERM)


def test_sigint_stops_call_on_process_backend(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    ledger = tmp_path / "ledger"
    gate = tmp_path / "gate"
    errors = tmp_path / "stderr"
    environment = cli_environment(CALL_LEDGER=str(ledger), CALL_GATE=str(gate))
    jobs = 2
    arguments: list[str | Path] = [
        "run",
        "-v",
        "-j",
        str(jobs),
        "--journal",
        journal,
        "--backend",
        "process",
        "--call",
        "tests.cli.call_tasks:record_then_wait",
        ":::",
        *(f"item-{number:02d}" for number in range(1, 31)),
    ]
    with (
        open(errors, "wb") as stderr,
        started_cli(
            arguments,
            tmp_path,
            environment=environment,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        ) as process,
    ):
        wait_until(
            lambda: count_lines(ledger) == jobs,
            f"{jobs} items in flight",
            process=process,
        )
        workers = psutil.Process(process.pid).children(recursive=True)
        assert workers, "no worker processes found under batchtools"
        process.send_signal(signal.SIGINT)
        wait_until(
            lambda: _contains(errors, b"received SIGINT"),
            "batchtools to log that it received SIGINT",
            process=process,
        )
        gate.touch()
        status = process.wait(timeout=60)
    message = errors.read_text(errors="replace")

    assert status == 130, message
    calls = ledger.read_text().splitlines()
    assert len(calls) == jobs, f"items started after SIGINT: {calls}"
    assert count_in_state(journal, "succeeded") == jobs
    worker_pids = {int(line.split(" ")[1]) for line in calls}
    assert worker_pids <= {worker.pid for worker in workers}
    wait_until(
        lambda: not any(_alive(worker) for worker in workers),
        f"the worker processes {[worker.pid for worker in workers]} to exit",
        timeout=15,
    )


def _alive(process: psutil.Process) -> bool:
    # is_running compares the start time too, so a reused pid is not alive.
    try:
        running = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
        return bool(running)
    except psutil.NoSuchProcess:
        return False


def test_stopped_time_does_not_count_against_timeouts(tmp_path: Path) -> None:
    started = tmp_path / "started"
    # The command outlives neither its 3 s timeout nor its own sleep, unless
    # the 4 s the run spends stopped were counted against the timeout.
    script = f"touch {shlex.quote(str(started))}; sleep 2"
    arguments: list[str | Path] = [
        "run",
        "-v",
        "--no-journal",
        "--timeout",
        "3s",
        "sh",
        "-c",
        script,
        ":::",
        "one",
    ]

    with started_cli(arguments, tmp_path) as process:
        wait_until(started.exists, "the command starts", process=process)
        process.send_signal(signal.SIGTSTP)
        cli = psutil.Process(process.pid)
        wait_until(
            lambda: cli.status() == psutil.STATUS_STOPPED,
            "the CLI stops",
            process=process,
        )
        stopped_at = time.monotonic()
        # Here the wait is the behaviour under test, not synchronisation.
        while time.monotonic() - stopped_at < 4.0:
            time.sleep(0.1)
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr.decode(errors="replace")
    assert b"timed out" not in stderr


GRACE_SCRIPT = """
import asyncio, sys
import batchtools

async def wait(item):
    print("started", item, flush=True)
    await asyncio.sleep(600)

report = batchtools.run(
    ["a", "b"], wait, concurrency=1, handle_signals=True, grace=sys.argv[1]
)
for outcome in report.outcomes:
    print(outcome.key, outcome.state.value, outcome.reason, flush=True)
"""


def test_library_grace_period_cancels(tmp_path: Path) -> None:
    script = tmp_path / "grace.py"
    script.write_text(GRACE_SCRIPT)
    output = tmp_path / "stdout"
    with open(output, "wb") as stdout:
        process = subprocess.Popen(
            [sys.executable, script, "0.2s"],
            cwd=tmp_path,
            env=cli_environment(),
            stdout=stdout,
            stderr=subprocess.PIPE,
        )
        try:
            wait_until(
                lambda: _contains(output, b"started a"),
                "the first item to start",
                process=process,
            )
            process.send_signal(signal.SIGINT)
            _, errors = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert process.returncode == 0, errors.decode(errors="replace")
    lines = output.read_text().splitlines()
    assert lines[0] == "started a"
    (outcome,) = lines[1:]
    assert outcome.endswith(
        " cancelled received SIGINT, and attempts still ran after the grace "
        "period of 0.2 s"
    )


@pytest.mark.parametrize(
    ("grace", "message"),
    [
        ("0s", "invalid grace '0s'"),
        (10**5000, r"invalid grace \(an integer of over 4,300 digits\)"),
    ],
    ids=["zero", "huge"],
)
def test_library_rejects_invalid_grace(grace: float | str, message: str) -> None:
    ran: list[int] = []

    with pytest.raises(ConfigurationError, match=message):
        batchtools.run([1], ran.append, handle_signals=True, grace=grace)
    assert ran == []


def test_sigint_before_run_exits_130(tmp_path: Path) -> None:
    # The task's module is imported while options are checked, before the
    # journal exists, so the signal arrives before the run handles signals.
    marker = tmp_path / "importing"
    environment = cli_environment(
        SLOW_IMPORT_MARKER=str(marker), SLOW_IMPORT_GATE=str(tmp_path / "gate")
    )
    arguments: list[str | Path] = [
        "run", "--journal", tmp_path / "run.db",
        "--call", "tests.cli.slow_import:echo", ":::", "a",
    ]  # fmt: skip
    with started_cli(arguments, tmp_path, environment=environment) as process:
        wait_until(marker.exists, "the task's module to load", process=process)
        process.send_signal(signal.SIGINT)
        _, errors = process.communicate(timeout=60)

    message = errors.decode(errors="replace")
    assert process.returncode == 130, message
    assert message.strip() == "Interrupted by SIGINT."
    assert not (tmp_path / "run.db").exists()
