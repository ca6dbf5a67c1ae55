"""SIGKILL of the runner at many points of a journaled run, each followed by a resume.

Two runners are killed: the CLI running a command per item on the
subprocess backend, and a Python process running the library on the
process backend (`tests.reliability.library_runner`). Every attempt
appends ``ITEM SESSION`` to a side-effect ledger. A kill point is a number
of succeeded items committed to the journal. The points are drawn from the
campaign seed (``BATCHTOOLS_TEST_SEED``), and each run is killed several
times: kill, resume, kill the resume, and so on, then resumed to its end.

After every kill, the succeeded items of the journal must include those
of the previous kill, and each must be in the ledger. At the end every item
is succeeded exactly once, and ``PRAGMA integrity_check`` passes. In the
ledger, an item may run again in a later session only if it was not
committed as succeeded at the kill that ended the earlier one. Such an
item was in flight, or its outcome was in the last, uncommitted group. The
subset kills each runner 5 times in a run of 500 items. The whole
campaign kills it 200 times, 10 times in each run of 5,000 items.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest

from batchtools.journal import iter_items
from tests.cli.support import (
    RUN_TIMEOUT,
    Argument,
    cli_argv,
    cli_environment,
    connect_read_only,
    count_in_state,
    integrity_check,
    kill_tree,
    run_cli,
    started_cli,
    wait_until,
)
from tests.reliability.campaign import CAMPAIGN, Campaign, ScenarioRecord
from tests.reliability.ledger_tasks import LEDGER_VARIABLE, SESSION_VARIABLE
from tests.reliability.leftovers import wait_for_session_end
from tests.reliability.library_runner import item_names

ITEMS = CAMPAIGN.size(500, 5000)
KILLS = CAMPAIGN.size(5, 200)
KILLS_PER_RUN = CAMPAIGN.size(5, 10)
LAST_KILL_SHARE = 0.9
"""Kill points lie in the first 90 percent of the items, so that most kills
land before a session ends on its own."""

MAX_RUNS = KILLS // KILLS_PER_RUN + 5
"""Runs allowed for the kills. When a session ends the run before its next
kill point, the remaining kills go to a new run."""

JOBS = 4
CAMPAIGN_LIMIT = CAMPAIGN.size(120, 1800)
"""Seconds one runner's campaign may take before the test fails."""

# One short echo is one write(2) on an O_APPEND file, so lines of concurrent
# commands never mix.
LEDGER_SCRIPT = f'echo "$1 ${SESSION_VARIABLE}" >> "${LEDGER_VARIABLE}"'


@dataclass(frozen=True)
class Runner:
    """How a session of the campaign's run starts.

    Attributes:
        name: ``cli`` or ``library``.
    """

    name: str

    def argv(self, journal: Path, listing: Path, first: bool) -> list[str | bytes]:
        """Return the command that starts (``first``) or resumes the run."""
        if self.name == "library":
            module = "tests.reliability.library_runner"
            return [sys.executable, "-m", module, str(journal), str(ITEMS)]
        if not first:
            return cli_argv(["resume", "-q", journal])
        command = ["sh", "-c", LEDGER_SCRIPT, "sh", "{}"]
        arguments: list[Argument] = ["run", "-q", "-j", str(JOBS), "--journal", journal]
        return cli_argv([*arguments, *command, "::::", listing])


@contextlib.contextmanager
def _started(
    argv: Sequence[str | bytes],
    cwd: Path,
    environment: dict[str, str],
    stderr: IO[bytes],
) -> Iterator[subprocess.Popen[bytes]]:
    """Start ``argv`` in its own session, and kill its tree at the end."""
    process = subprocess.Popen(
        argv,
        cwd=cwd,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
        process.wait(timeout=RUN_TIMEOUT)


def _item_name(item: object) -> str:
    """Return an item's name; a CLI item is a tuple of one bytes value."""
    if isinstance(item, tuple):
        first = item[0]
        return first.decode() if isinstance(first, bytes) else str(first)
    return str(item)


def _succeeded(journal: Path) -> set[str]:
    return {_item_name(row.item) for row in iter_items(journal, ["succeeded"])}


def _read_ledger(ledger: Path) -> list[tuple[str, int]]:
    if not ledger.exists():
        return []
    calls = []
    for line in ledger.read_text().splitlines():
        item, session = line.split(" ")
        calls.append((item, int(session)))
    return calls


@dataclass
class Figures:
    """What a runner's campaign found, for its scenario record."""

    kills: int = 0
    sessions: int = 0
    lost: int = 0
    duplicates: int = 0
    reexecuted: int = 0
    runs: int = 0


class _Run:
    """One run of ITEMS items, killed at several points and resumed each time."""

    def __init__(self, folder: Path, runner: Runner, figures: Figures) -> None:
        folder.mkdir()
        self.folder = folder
        self.runner = runner
        self.figures = figures
        self.journal = folder / "run.db"
        self.ledger = folder / "ledger"
        self.listing = folder / "items"
        self.items = list(item_names(ITEMS))
        self.listing.write_text("".join(item + "\n" for item in self.items))
        # snapshots[j] contains the items committed as succeeded at the kill
        # that ended session j, and snapshots[0] is empty.
        self.snapshots: list[set[str]] = [set()]

    @property
    def session(self) -> int:
        """The number of the next session."""
        return len(self.snapshots)

    def _environment(self) -> dict[str, str]:
        return cli_environment(
            **{LEDGER_VARIABLE: str(self.ledger), SESSION_VARIABLE: str(self.session)}
        )

    def run_until(self, kill_point: int) -> bool:
        """Run a session and SIGKILL it once ``kill_point`` items succeeded.

        Returns:
            Whether the kill happened; ``False`` when the session finished
            the run first.
        """
        threshold = max(kill_point, len(self.snapshots[-1]) + 1)
        argv = self.runner.argv(self.journal, self.listing, first=self.session == 1)
        errors = self.folder / f"stderr-{self.session}"
        self.figures.sessions += 1
        with (
            open(errors, "wb") as stderr,
            _started(argv, self.folder, self._environment(), stderr) as process,
        ):
            wait_until(
                lambda: (
                    process.poll() is not None
                    or count_in_state(self.journal, "succeeded") >= threshold
                ),
                f"{threshold} succeeded items in {self.journal}",
            )
            if process.poll() is not None:
                assert process.returncode == 0, errors.read_text()
                return False
            process.send_signal(signal.SIGKILL)
            process.wait()
        # Commands and worker processes that were running go on briefly.
        wait_for_session_end(process.pid, "the processes of the killed session")
        self._take_snapshot()
        self.figures.kills += 1
        return True

    def _take_snapshot(self) -> None:
        assert integrity_check(self.journal) == "ok"
        succeeded = _succeeded(self.journal)
        lost = self.snapshots[-1] - succeeded
        self.figures.lost += len(lost)
        assert not lost, f"committed outcomes lost after a kill: {sorted(lost)[:5]}"
        # The ledger line is written before the attempt can end, and only an
        # ended attempt is committed, so every committed success ran.
        ran = {item for item, _ in _read_ledger(self.ledger)}
        unrun = succeeded - ran
        assert not unrun, f"recorded as succeeded without running: {sorted(unrun)[:5]}"
        self.snapshots.append(succeeded)

    def finish(self) -> None:
        """Resume the run to its end, unless the last session ended it."""
        argv = self.runner.argv(self.journal, self.listing, first=False)
        self.figures.sessions += 1
        result = subprocess.run(
            argv,
            cwd=self.folder,
            env=self._environment(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")

    def check(self) -> None:
        """Check the finished run's journal and ledger."""
        self._check_journal()
        self._check_ledger()

    def _check_journal(self) -> None:
        assert integrity_check(self.journal) == "ok"
        connection = connect_read_only(self.journal)
        try:
            rows = connection.execute("SELECT count(*) FROM items").fetchone()[0]
            states = dict(
                connection.execute(
                    "SELECT state, count(*) FROM items GROUP BY state"
                ).fetchall()
            )
        finally:
            connection.close()
        succeeded = _succeeded(self.journal)
        self.figures.lost += len(set(self.items) - succeeded)
        assert rows == ITEMS
        assert states == {"succeeded": ITEMS}
        assert succeeded == set(self.items)

    def _check_ledger(self) -> None:
        calls = _read_ledger(self.ledger)
        too_late = [
            (item, session)
            for item, session in calls
            if item in self.snapshots[session - 1]
        ]
        twice_in_a_session = [
            pair for pair, count in Counter(calls).items() if count > 1
        ]
        sessions_per_item = Counter(item for item, _ in set(calls))
        self.figures.duplicates += len(too_late) + len(twice_in_a_session)
        self.figures.reexecuted += sum(n - 1 for n in sessions_per_item.values())
        assert not too_late, (
            f"items ran again although committed as succeeded before their "
            f"session: {too_late[:5]}"
        )
        assert not twice_in_a_session, (
            f"ran twice in one session: {twice_in_a_session[:5]}"
        )
        assert set(sessions_per_item) == set(self.items)


def _kill_campaign(
    runner: Runner, folder: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    generator = campaign.random(f"crash-{runner.name}")
    figures = Figures()
    last_point = int(ITEMS * LAST_KILL_SHARE)
    try:
        while figures.kills < KILLS:
            assert figures.runs < MAX_RUNS, (
                "sessions keep ending before the kill points"
            )
            figures.runs += 1
            count = min(KILLS_PER_RUN, KILLS - figures.kills)
            points = sorted(generator.sample(range(1, last_point + 1), count))
            print(f"{runner.name} run {figures.runs}: kill points {points}")
            run = _Run(folder / f"run-{figures.runs}", runner, figures)
            ended = False
            for point in points:
                if not run.run_until(point):
                    ended = True
                    break
            if not ended:
                run.finish()
            run.check()
    finally:
        scenario.tried = figures.sessions
        scenario.faults_injected = figures.kills
        scenario.items_lost = figures.lost
        scenario.duplicates = figures.duplicates
        scenario.notes["runs"] = figures.runs
        scenario.notes["items_per_run"] = ITEMS
        scenario.notes["reexecuted_in_flight_or_uncommitted"] = figures.reexecuted
    assert figures.kills == KILLS


@pytest.mark.timeout(CAMPAIGN_LIMIT)
def test_cli_killed_and_resumed(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    _kill_campaign(Runner("cli"), tmp_path, campaign, scenario)


@pytest.mark.timeout(CAMPAIGN_LIMIT)
def test_library_killed_and_rerun(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    _kill_campaign(Runner("library"), tmp_path, campaign, scenario)


CREATION_KILLS = CAMPAIGN.size(5, 50)


def _creating(folder: Path) -> bool:
    """Return whether a journal, or the temporary file it is built in, exists."""
    return any(path.name.startswith((".run.db", "run.db")) for path in folder.iterdir())


def test_kill_while_the_journal_is_created(
    tmp_path: Path, scenario: ScenarioRecord
) -> None:
    # The journal is built under a temporary name and linked into place
    # whole, so a kill at any moment of its creation leaves either no
    # journal or a complete one, never a file that no command can use.
    complete = 0
    for trial in range(CREATION_KILLS):
        folder = tmp_path / f"trial-{trial}"
        folder.mkdir()
        journal = folder / "run.db"
        arguments: list[Argument] = [
            "run", "-q", "--journal", journal, "true", ":::", "a", "b",
        ]  # fmt: skip
        with started_cli(arguments, folder, stdout=subprocess.DEVNULL) as process:
            wait_until(
                functools.partial(_creating, folder),
                "the journal's creation to begin",
                process=process,
                interval=0.0002,
            )
            process.send_signal(signal.SIGKILL)
            process.wait()
        scenario.tried += 1
        scenario.faults_injected += 1
        if journal.exists():
            complete += 1
            status = run_cli(["status", "--json", journal], folder)
            assert status.returncode == 0, status.stderr.decode(errors="replace")
        again = run_cli(arguments, folder)

        assert again.returncode == 0, again.stderr.decode(errors="replace")
        assert count_in_state(journal, "succeeded") == 2
        assert integrity_check(journal) == "ok"
        assert [path.name for path in folder.glob(".run.db.creating-*")] == []
    scenario.notes["journal_complete_at_kill"] = complete
