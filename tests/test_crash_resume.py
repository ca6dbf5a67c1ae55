"""Crash and resume through the CLI: SIGKILL at chosen points, then `resume`.

Kill points are chosen by the number of succeeded items committed to the
journal, from a random seed that is printed and can be fixed with the
``BATCHTOOLS_TEST_SEED`` environment variable. Each command appends its
item and the session number to a ledger file, which is how the tests see
what ran, and how often.
"""

from __future__ import annotations

import os
import random
import shlex
import signal
import subprocess
from collections import Counter
from pathlib import Path

from batchtools.journal import iter_items
from batchtools.journal._journal import COMMIT_OPS
from tests.cli.support import (
    cli_environment,
    connect_read_only,
    count_in_state,
    integrity_check,
    items_by_state,
    items_in_state,
    kill_tree,
    processes_with_argument,
    run_cli,
    started_cli,
    succeeded_without_results,
    wait_until,
)

ITEMS = 2000
JOBS = 4
KILL_POINTS = 10
LAST_KILL_POINT = 1600
"""The highest kill point, in succeeded items, leaving 400 items of the run
to go, so that the kill lands before the run ends on its own."""

MAX_CAMPAIGNS = 5
"""Runs from scratch allowed for the kill points; a new one starts when a
run ends before its next kill point is reached."""


def _seed() -> int:
    fixed_seed = os.environ.get("BATCHTOOLS_TEST_SEED")
    seed = int(fixed_seed) if fixed_seed else random.SystemRandom().randrange(2**32)
    print(f"kill points seeded with BATCHTOOLS_TEST_SEED={seed}")
    return seed


def _ledger_script(ledger: Path) -> str:
    # One short echo is one write(2) on an O_APPEND file, so lines of
    # concurrent commands never mix.
    return f'echo "$1 $PROBE_SESSION" >> {shlex.quote(str(ledger))}'


def _read_ledger(ledger: Path) -> list[tuple[str, int]]:
    if not ledger.exists():
        return []
    calls = []
    for line in ledger.read_text().splitlines():
        item, session = line.split(" ")
        calls.append((item, int(session)))
    return calls


def _wait_for_orphans(script: str) -> None:
    # Commands that were running at a kill go on by themselves; wait for
    # them, so that the ledger is complete before it is checked.
    wait_until(
        lambda: not processes_with_argument(script),
        "the commands of killed sessions to end",
    )


class _Campaign:
    """One run of ITEMS items, killed at several points and resumed each time."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.folder = folder
        self.journal = folder / "run.db"
        self.results = folder / "results"
        self.ledger = folder / "ledger"
        self.script = _ledger_script(self.ledger)
        self.input = folder / "items"
        self.items = [f"item-{number:04d}" for number in range(1, ITEMS + 1)]
        self.input.write_text("".join(item + "\n" for item in self.items))
        # snapshots[j] is the set of succeeded items read right after the
        # kill that ended session j, and snapshots[0] is the empty set.
        self.snapshots: list[set[str]] = [set()]

    @property
    def session(self) -> int:
        """The number of the next session."""
        return len(self.snapshots)

    def start_arguments(self) -> list[str | Path]:
        if self.session == 1:
            return [
                "run",
                "-q",
                "-j",
                str(JOBS),
                "--journal",
                self.journal,
                "--results",
                self.results,
                "sh",
                "-c",
                self.script,
                "sh",
                "{}",
                "::::",
                self.input,
            ]
        return ["resume", "-q", self.journal]

    def run_until(self, kill_point: int) -> bool:
        """Run a session and SIGKILL it at ``kill_point`` succeeded items.

        Returns:
            Whether the kill happened; ``False`` when the session finished
            the run first.
        """
        threshold = max(kill_point, len(self.snapshots[-1]) + 1)
        environment = cli_environment(PROBE_SESSION=str(self.session))
        errors = self.folder / f"stderr-{self.session}"
        with (
            open(errors, "wb") as stderr,
            started_cli(
                self.start_arguments(),
                self.folder,
                environment=environment,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            ) as process,
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
        self._take_snapshot()
        return True

    def _take_snapshot(self) -> None:
        succeeded = {
            item.decode() for item in items_in_state(self.journal, "succeeded")
        }
        lost = self.snapshots[-1] - succeeded
        assert not lost, f"committed outcomes lost after a kill: {sorted(lost)[:5]}"
        # A command appends to the ledger before it exits, and only then can
        # its outcome be committed, so every committed success is in it.
        ran = {item for item, _ in _read_ledger(self.ledger)}
        unrun = succeeded - ran
        assert not unrun, f"recorded as succeeded without running: {sorted(unrun)[:5]}"
        # Result files are written before the outcome is committed.
        unkept = succeeded_without_results(self.journal, self.results)
        assert not unkept, f"committed without their result files: {unkept[:5]}"
        self.snapshots.append(succeeded)

    def finish(self) -> None:
        """Resume the run to its end and check the journal and the ledger."""
        environment = cli_environment(PROBE_SESSION=str(self.session))
        result = run_cli(
            ["resume", "-q", self.journal], self.folder, environment=environment
        )
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        self.check(final_session=self.session)

    def check(self, final_session: int) -> None:
        """Check the finished run: ``final_session`` is the one that ended it."""
        _wait_for_orphans(self.script)
        self._check_journal()
        self._check_ledger(final_session)

    def _check_journal(self) -> None:
        assert integrity_check(self.journal) == "ok"
        connection = connect_read_only(self.journal)
        try:
            rows = connection.execute("SELECT count(*) FROM items").fetchone()[0]
            succeeded = connection.execute(
                "SELECT count(DISTINCT item) FROM items WHERE state = 'succeeded'"
            ).fetchone()[0]
        finally:
            connection.close()
        assert rows == ITEMS
        assert succeeded == ITEMS
        states = items_by_state(self.journal)
        assert sorted(item.decode() for item in states) == self.items
        assert succeeded_without_results(self.journal, self.results) == []

    def _check_ledger(self, final_session: int) -> None:
        calls = _read_ledger(self.ledger)
        for item, session in calls:
            committed_before = self.snapshots[session - 1]
            assert item not in committed_before, (
                f"{item} ran again in session {session} although it was "
                f"committed as succeeded before that session"
            )
        assert {item for item, _ in calls} == set(self.items)
        seen: set[str] = set()
        for session in range(1, final_session + 1):
            ran = [item for item, number in calls if number == session]
            twice = [item for item, count in Counter(ran).items() if count > 1]
            assert not twice, f"session {session} ran {twice[:5]} more than once"
            again = seen.intersection(ran)
            print(f"session {session}: {len(ran)} ran, {len(again)} of them again")
            # At-least-once: a kill loses the attempts in flight and the
            # outcomes not yet committed, which fit in one commit group of
            # at most COMMIT_OPS operations.
            # NOTE: with ITEMS below COMMIT_OPS this bound cannot fail. The
            # checks against the snapshots above are the strict ones.
            assert len(again) <= JOBS + COMMIT_OPS
            seen.update(ran)


def test_kill_9_resume_succeeds_each_item_once(tmp_path: Path) -> None:
    rng = random.Random(_seed())
    kill_points = sorted(rng.sample(range(1, LAST_KILL_POINT + 1), KILL_POINTS))
    print(f"kill points: {kill_points}")
    kills = 0
    campaigns = 0
    while kill_points:
        campaigns += 1
        assert campaigns <= MAX_CAMPAIGNS, "runs keep ending before the kill points"
        campaign = _Campaign(tmp_path / f"campaign-{campaigns}")
        ended_by_itself = False
        while kill_points and not ended_by_itself:
            if campaign.run_until(kill_points[0]):
                kill_points.pop(0)
                kills += 1
            else:
                ended_by_itself = True
        if ended_by_itself:
            # The remaining kill points go to a fresh run.
            campaign.check(final_session=campaign.session)
        else:
            campaign.finish()
    assert kills == KILL_POINTS


# -- an outcome record is what makes an item done ------------------------------

_WAIT_FOR_GATE = (
    'n=0; while [ ! -e "$2" ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done; '
    '[ -e "$2" ] || exit 7'
)


def test_item_killed_mid_run_reruns_despite_its_files(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    ledger = tmp_path / "ledger"
    results = tmp_path / "results"
    gate = tmp_path / "gate"
    (tmp_path / "out").mkdir()
    script = (
        f'echo "$1 $PROBE_SESSION" >> {shlex.quote(str(ledger))}; '
        'echo "partial $1" > "out/$1.txt"; '
        'if [ "$1" = bad ]; then exit 5; fi; '
        f'if [ "$1" = slow ]; then {_WAIT_FOR_GATE}; fi; '
        'echo "done $1"'
    )
    command = ["sh", "-c", script, "sh", "{}", str(gate)]
    arguments: list[str | Path] = [
        "run",
        "-q",
        "-j",
        "4",
        "--journal",
        journal,
        "--results",
        results,
        *command,
        ":::",
        "ok-1",
        "ok-2",
        "bad",
        "slow",
    ]
    with started_cli(
        arguments, tmp_path, environment=cli_environment(PROBE_SESSION="1")
    ) as process:
        wait_until(
            lambda: (
                count_in_state(journal, "succeeded") == 2
                and count_in_state(journal, "failed") == 1
                and _complete_exit_statuses(results) == 3
                and (tmp_path / "out" / "slow.txt").exists()
            ),
            "ok-1, ok-2 and bad to be recorded while slow runs",
            process=process,
        )
        process.send_signal(signal.SIGKILL)
        process.wait()
    for orphan in processes_with_argument(script):
        kill_tree(orphan.pid)

    recorded = _outcome_rows(journal)
    assert sorted(recorded) == [b"bad", b"ok-1", b"ok-2"]
    kept = _result_files(results)
    assert len(kept) == 3 * 3  # stdout, stderr and exit_status of each
    slow = next(row for row in iter_items(journal) if row.item == (b"slow",))
    assert slow.state in ("pending", "running")
    # Leave files that look like a finished attempt of slow: they must not
    # count as its outcome.
    stale = results / f"{slow.seq + 1:06d}-{slow.key[:16]}"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "stdout").write_text("stale\n")
    (stale / "exit_status").write_text("0\n")
    gate.touch()

    result = run_cli(
        ["resume", "-q", journal],
        tmp_path,
        environment=cli_environment(PROBE_SESSION="2"),
    )

    # bad failed in the first session, so the run as a whole has a failure.
    assert result.returncode == 1, result.stderr.decode(errors="replace")
    ran_again = [
        line.split(" ")[0]
        for line in ledger.read_text().splitlines()
        if line.endswith(" 2")
    ]
    assert ran_again == ["slow"]
    after = _outcome_rows(journal)
    for item, row in recorded.items():
        assert after[item] == row, f"the recorded outcome of {item!r} changed"
    kept_after = _result_files(results)
    for name, content in kept.items():
        assert kept_after[name] == content, f"{name} was rewritten by resume"
    assert items_by_state(journal)[b"slow"] == "succeeded"
    assert (stale / "stdout").read_text() == "done slow\n"
    assert (stale / "exit_status").read_text() == "0\n"


def _complete_exit_statuses(results: Path) -> int:
    # exit_status is the last file written for an item; its newline ends it.
    files = results.glob("*/exit_status") if results.exists() else []
    return sum(1 for path in files if path.read_bytes().endswith(b"\n"))


def _result_files(results: Path) -> dict[str, bytes]:
    """Return the content of every item's file under ``results``, by relative path.

    The folder's lock and its holder record are left out.
    """
    return {
        str(path.relative_to(results)): path.read_bytes()
        for path in sorted(results.rglob("*"))
        if path.is_file() and path.parent != results
    }


def _outcome_rows(journal: Path) -> dict[bytes, tuple[object, ...]]:
    """Return the whole journal row of each item with a final outcome."""
    items = {row.seq: row.item[0] for row in iter_items(journal)}
    connection = connect_read_only(journal)
    try:
        rows = connection.execute(
            "SELECT seq, key, state, attempts, lost_workers, value, error, reason, "
            "started, ended, (SELECT count(*) FROM attempts WHERE attempts.seq = "
            "items.seq) FROM items WHERE state IN ('succeeded', 'failed')"
        ).fetchall()
    finally:
        connection.close()
    return {items[row[0]]: tuple(row) for row in rows}
