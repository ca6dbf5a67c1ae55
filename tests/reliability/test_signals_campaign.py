"""SIGINT, SIGTERM and SIGHUP at random moments of a run whose commands spawn children.

Each trial draws from the campaign seed a signal, whether it is sent once
(drain) or twice (cancel), and how many items must be committed before it
is sent. In half of the trials, and in every trial that cancels, the test
first removes a gate file, so that the items in flight wait at the gate,
with children that wait for it to reappear. Each command records its item in a ledger,
then starts two children that carry a marker argument, then waits for
them.

After the CLI exits, the test checks the following:

- the exit status is 128 plus the number of the first signal (130, 143 or
  129), and stderr names the ``batchtools resume`` command;
- no process of the run is left: none of the CLI's descendants seen
  before the signal, none with the marker, none in the CLI's session;
- the journal passes ``PRAGMA integrity_check`` and has no item
  ``running``: interrupted items go back to ``pending``;
- after a drain, every item that started succeeded, and when the items
  waited at the gate, no item started after the signal;
- ``resume`` finishes the run, runs no item that had succeeded, and leaves
  no process either.

The subset runs each signal once as a drain and once as a cancel. The
whole campaign runs 100 trials.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.cli.support import (
    cli_environment,
    count_in_state,
    count_lines,
    integrity_check,
    items_by_state,
    kill_tree,
    run_cli,
    started_cli,
    wait_until,
)
from tests.reliability.campaign import CAMPAIGN, Campaign, ScenarioRecord
from tests.reliability.leftovers import (
    describe,
    marked_processes,
    session_processes,
    still_alive,
)

ITEMS = 100
JOBS = 4
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
TRIALS = CAMPAIGN.size(2 * len(SIGNALS), 100)
EXIT_LIMIT = 60.0
"""Seconds the CLI may take to exit after the last signal."""

# $0 is the marker and $1 the item. Each child works 50 ms, so that the run
# lasts long enough to be signalled. Then it waits up to 30 s for the gate
# file, and while it waits, it creates a file named after its item.
CHILD = (
    "n=0; while sleep 0.05; do "
    '[ -e "$RELIABILITY_GATE" ] || [ $n -ge 600 ] && break; '
    ': > "$RELIABILITY_WAITING/$1"; n=$((n+1)); done'
)
SCRIPT = (
    'echo "$1 $RELIABILITY_SESSION" >> "$RELIABILITY_LEDGER"; '
    f'sh -c \'{CHILD}\' "$0" "$1" & sh -c \'{CHILD}\' "$0" "$1" & wait'
)


@dataclass(frozen=True)
class Trial:
    """One drawn trial.

    Attributes:
        signum: The signal sent.
        times: 1 to drain, 2 to cancel.
        committed: Succeeded items to wait for before the signal.
        gated: Whether the items in flight wait at the gate at the signal.
    """

    signum: signal.Signals
    times: int
    committed: int
    gated: bool

    def __str__(self) -> str:
        mode = "drain" if self.times == 1 else "cancel"
        gate = "gated" if self.gated else "free"
        return f"{self.signum.name} {mode} after {self.committed} items, {gate}"


def _trials(campaign: Campaign) -> list[Trial]:
    generator = campaign.random("signals")
    trials = []
    for number in range(TRIALS):
        if campaign.full:
            signum = generator.choice(SIGNALS)
            times = generator.choice((1, 2))
        else:
            signum = SIGNALS[number % len(SIGNALS)]
            times = 1 + number // len(SIGNALS)
        gated = times == 2 or generator.random() < 0.5
        committed = generator.randrange(0, ITEMS // 4)
        trials.append(Trial(signum, times, committed, gated))
    return trials


@dataclass
class Figures:
    """What the trials found, for the scenario record."""

    tried: int = 0
    signals: int = 0
    lost: int = 0
    duplicates: int = 0


class _TrialRun:
    """The folder, journal, ledger and gate of one trial."""

    def __init__(self, folder: Path, trial: Trial) -> None:
        folder.mkdir()
        self.folder = folder
        self.trial = trial
        self.journal = folder / "run.db"
        self.ledger = folder / "ledger"
        self.gate = folder / "gate"
        self.waiting = folder / "waiting"
        self.waiting.mkdir()
        self.errors = folder / "stderr"
        self.marker = f"batchtools-signal-trial-{uuid.uuid4().hex}"
        self.items = [f"item-{number:02d}" for number in range(1, ITEMS + 1)]

    def environment(self, session: int) -> dict[str, str]:
        return cli_environment(
            RELIABILITY_LEDGER=str(self.ledger),
            RELIABILITY_SESSION=str(session),
            RELIABILITY_GATE=str(self.gate),
            RELIABILITY_WAITING=str(self.waiting),
        )

    def ledger_calls(self) -> list[tuple[str, int]]:
        if not self.ledger.exists():
            return []
        calls = []
        for line in self.ledger.read_text().splitlines():
            item, session = line.split(" ")
            calls.append((item, int(session)))
        return calls

    def leftovers(self, session: int) -> list[psutil.Process]:
        return [*marked_processes(self.marker), *session_processes(session)]


def _signal_run(run: _TrialRun, figures: Figures) -> int | None:
    """Run the first session and signal it.

    Returns:
        The ledger's length when the signal was sent to items waiting at
        the gate, or ``None`` when the gate was open.
    """
    trial = run.trial
    run.gate.touch()
    arguments: list[str | Path] = [
        "run", "-v", "-j", str(JOBS), "--journal", run.journal,
        "sh", "-c", SCRIPT, run.marker, "{}", ":::", *run.items,
    ]  # fmt: skip
    with (
        open(run.errors, "wb") as stderr,
        started_cli(
            arguments,
            run.folder,
            environment=run.environment(1),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        ) as process,
    ):
        # The CLI handles signals once its run has started, which a first
        # item in the ledger shows.
        wait_until(
            lambda: (
                count_lines(run.ledger) > 0
                and count_in_state(run.journal, "succeeded") >= trial.committed
            ),
            f"a started run with {trial.committed} succeeded items",
            process=process,
        )
        started_at_signal = None
        if trial.gated:
            run.gate.unlink()
            # An item waiting at the gate cannot end, so once JOBS items
            # wait, every job slot is taken and the ledger stays as it is.
            wait_until(
                lambda: len(list(run.waiting.iterdir())) >= JOBS,
                f"{JOBS} items waiting at the gate",
                process=process,
            )
            started_at_signal = count_lines(run.ledger)
        tree = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(trial.signum)
        figures.signals += 1
        wait_until(
            lambda: f"received {trial.signum.name}".encode() in run.errors.read_bytes(),
            f"batchtools to log that it received {trial.signum.name}",
            process=process,
        )
        if trial.times == 2:
            process.send_signal(trial.signum)
            figures.signals += 1
        else:
            run.gate.touch()
        status = process.wait(timeout=EXIT_LIMIT)
        left = still_alive(tree) + run.leftovers(process.pid)
    message = run.errors.read_text(errors="replace")
    assert status == EXIT_STATUS[trial.signum], message
    assert f"batchtools resume {run.journal}" in message
    assert left == [], f"processes left after the run: {describe(left)}"
    return started_at_signal


def _check_journal(run: _TrialRun, started_at_signal: int | None) -> set[str]:
    """Check the interrupted run's journal; return its succeeded items."""
    assert integrity_check(run.journal) == "ok"
    states = {
        item.decode(): state for item, state in items_by_state(run.journal).items()
    }
    succeeded = {item for item, state in states.items() if state == "succeeded"}
    assert set(states.values()) <= {"succeeded", "pending"}, states
    started = {item for item, _ in run.ledger_calls()}
    assert succeeded <= started
    if run.trial.times == 1:
        assert started == succeeded, "an item that started did not finish"
    if started_at_signal is not None:
        assert len(started) == started_at_signal, "an item started after the signal"
    return succeeded


def _resume(run: _TrialRun, succeeded: set[str], figures: Figures) -> None:
    run.gate.touch()
    result = run_cli(
        ["resume", "-q", run.journal], run.folder, environment=run.environment(2)
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    final = {
        item.decode()
        for item, state in items_by_state(run.journal).items()
        if state == "succeeded"
    }
    calls = run.ledger_calls()
    again = {item for item, session in calls if session == 2} & succeeded
    figures.lost += len(set(run.items) - final)
    figures.duplicates += len(again)
    assert final == set(run.items)
    assert again == set(), f"resume ran items that had succeeded: {sorted(again)}"
    assert {item for item, _ in calls} == set(run.items)
    left = marked_processes(run.marker)
    assert left == [], f"processes left after resume: {describe(left)}"


@pytest.mark.timeout(CAMPAIGN.size(120, 1800))
def test_signals_at_random_moments(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    figures = Figures()
    try:
        for number, trial in enumerate(_trials(campaign), 1):
            print(f"trial {number}: {trial}")
            run = _TrialRun(tmp_path / f"trial-{number}", trial)
            figures.tried += 1
            started_at_signal = _signal_run(run, figures)
            succeeded = _check_journal(run, started_at_signal)
            _resume(run, succeeded, figures)
    finally:
        scenario.tried = figures.tried
        scenario.faults_injected = figures.signals
        scenario.items_lost = figures.lost
        scenario.duplicates = figures.duplicates


def test_sigint_right_after_journal_created(
    tmp_path: Path, scenario: ScenarioRecord
) -> None:
    for number in range(3):
        folder = tmp_path / f"try-{number}"
        folder.mkdir()
        journal = folder / "run.db"
        arguments: list[str | Path] = [
            "run", "-q", "--journal", journal, "sleep", "0.5", ":::", "one", "two",
        ]  # fmt: skip
        with started_cli(arguments, folder, stdout=subprocess.DEVNULL) as process:
            wait_until(
                journal.exists, "the journal to be created", process=process,
                interval=0.0005,
            )  # fmt: skip
            process.send_signal(signal.SIGINT)
            _, errors = process.communicate(timeout=EXIT_LIMIT)
        scenario.tried += 1
        scenario.faults_injected += 1
        message = errors.decode(errors="replace")

        assert process.returncode == 130, message
        assert f"batchtools resume {journal}" in message


def test_first_signal_drains_within_grace_period(
    tmp_path: Path, scenario: ScenarioRecord
) -> None:
    marker = f"batchtools-signal-grace-{uuid.uuid4().hex}"
    errors = tmp_path / "stderr"
    arguments: list[str | Path] = [
        "run", "-v", "-j", "2", "--grace", "1s", "--journal", tmp_path / "run.db",
        "sh", "-c", "sleep 30 & sleep 30 & wait", marker, ":::", "one", "two",
    ]  # fmt: skip
    scenario.tried = 1
    scenario.faults_injected = 1
    with (
        open(errors, "wb") as stderr,
        started_cli(
            arguments, tmp_path, stdout=subprocess.DEVNULL, stderr=stderr
        ) as process,
    ):
        # The CLI's own arguments hold the marker too; count only commands.
        wait_until(
            lambda: (
                len([p for p in marked_processes(marker) if p.pid != process.pid]) == 2
            ),
            "both commands to start",
            process=process,
        )
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        try:
            status = process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            kill_tree(process.pid)
            raise AssertionError(
                "the run still drained 20 s after SIGINT, although its grace "
                "period was 1 s"
            ) from None
    assert status == 130
    assert time.monotonic() - started < 20
    assert "attempts still ran after the grace period of 1 s" in errors.read_text()
    assert [p for p in marked_processes(marker) if p.pid != process.pid] == []
