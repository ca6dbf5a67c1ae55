"""The journal runs out of space in the middle of a run, then space is freed.

Two ways to run out, each tested on its own:

- tmpfs: the journal lives on a tmpfs of 1 MiB (8 MiB in the whole
  campaign) mounted in a private mount namespace (``unshare -m`` as root,
  ``unshare -Urm`` otherwise). A holder process keeps the namespace alive,
  and the CLI runs in it through ``nsenter``. Once some items are
  committed, the test fills the tmpfs to the last byte through
  ``/proc/PID/root``. Where a mount namespace cannot be made, this test
  falls back to the file-size limit, so it never skips.
- file-size limit: the CLI runs with SIGXFSZ ignored, and once some items
  are committed the test lowers its ``RLIMIT_FSIZE`` to one byte with
  ``prlimit``, so that every later write to the journal fails with EFBIG.

The first quarter of the items finish at once, and the rest wait for a
gate file. The test waits until the CLI has printed the output of those
first items, which it does only after their outcomes are committed. Then
it takes the space away and opens the gate. The CLI must exit with status 3
and one ``Error:`` line that names the journal and the cause. Every item
whose output was printed must still be recorded as succeeded. Once space is
back, ``batchtools resume`` must finish the run.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from tests.cli.support import (
    RUN_TIMEOUT,
    Argument,
    cli_argv,
    cli_environment,
    error_lines,
    kill_tree,
    run_cli,
    succeeded_without_results,
)
from tests.reliability.campaign import CAMPAIGN, Campaign, ScenarioRecord

TMPFS_SIZE = f"{CAMPAIGN.size(1, 8)}m"
"""The tmpfs must fit the journal of every item once the filler is gone."""
RESULTS_TMPFS_SIZE = f"{CAMPAIGN.size(4, 40)}m"
"""Room for the three result files of every item, a page each."""
EXIT_ABORTED = 3
JOBS = 4
FILL_BLOCK = 64 * 1024
# Items above FAST_ITEMS wait up to 60 s for the gate file, then fail.
SCRIPT = (
    'if [ "$1" -gt "$2" ]; then n=0; '
    'while [ ! -e "$3" ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n+1)); done; '
    '[ -e "$3" ] || exit 7; fi; echo "$1"'
)
NO_SPACE = re.compile(r"No space left on device|disk is full", re.IGNORECASE)
FILE_TOO_LARGE = re.compile(r"file too large|file size limit", re.IGNORECASE)


class Disk(Protocol):
    """A place for the journal whose space the test can take away and give back."""

    name: str
    folder: Path
    """The journal's folder, as a path inside the CLI's mount namespace."""

    def argv(self, arguments: Sequence[str | bytes]) -> list[str | bytes]:
        """Return the command that runs ``arguments`` where the journal is."""
        ...

    def start(self, argv: Sequence[str | bytes], cwd: Path) -> subprocess.Popen[bytes]:
        """Start ``argv`` with its stdout and stderr piped."""
        ...

    def take_space(self, process: subprocess.Popen[bytes]) -> None:
        """Leave no room for the journal of the running ``process``."""
        ...

    def give_space(self) -> None:
        """Give the room back."""
        ...

    def copy_journal(self, destination: Path) -> Path:
        """Copy the journal and its WAL to ``destination``; return the copy."""
        ...

    def outside(self) -> Path:
        """Return the folder as this process reaches it."""
        ...


def _ignore_file_size_signal() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _popen(
    argv: Sequence[str | bytes], cwd: Path, preexec: bool
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        cwd=cwd,
        env=cli_environment(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=_ignore_file_size_signal if preexec else None,
    )


def _copy_journal(source: Path, destination: Path) -> Path:
    destination.mkdir(exist_ok=True)
    for suffix in ("", "-wal"):
        origin = source.with_name(source.name + suffix)
        if origin.exists():
            shutil.copyfile(origin, destination / origin.name)
    return destination / source.name


@dataclass
class FileSizeLimit:
    """The journal on the test's own disk, with RLIMIT_FSIZE lowered mid-run."""

    folder: Path
    name: str = "rlimit"

    def argv(self, arguments: Sequence[str | bytes]) -> list[str | bytes]:
        return list(arguments)

    def start(self, argv: Sequence[str | bytes], cwd: Path) -> subprocess.Popen[bytes]:
        return _popen(argv, cwd, preexec=True)

    def take_space(self, process: subprocess.Popen[bytes]) -> None:
        psutil.Process(process.pid).rlimit(resource.RLIMIT_FSIZE, (1, 1))

    def give_space(self) -> None:
        """Nothing to do: a new process starts without the lowered limit."""

    def copy_journal(self, destination: Path) -> Path:
        return _copy_journal(self.folder / "run.db", destination)

    def outside(self) -> Path:
        return self.folder


@dataclass
class Tmpfs:
    """A small tmpfs in a private mount namespace, kept by a holder process."""

    folder: Path
    holder: subprocess.Popen[bytes]
    name: str = "tmpfs"
    filler: list[Path] = field(default_factory=list)

    def outside(self) -> Path:
        """Return the tmpfs as this process reaches it: through the holder's root."""
        return Path(f"/proc/{self.holder.pid}/root") / self.folder.relative_to("/")

    def argv(self, arguments: Sequence[str | bytes]) -> list[str | bytes]:
        entering = ["nsenter", "-t", str(self.holder.pid), "-m"]
        if os.geteuid() != 0:
            entering += ["-U", "--preserve-credentials"]
        return [*entering, f"--wd={self.folder.parent}", "--", *arguments]

    def start(self, argv: Sequence[str | bytes], cwd: Path) -> subprocess.Popen[bytes]:
        return _popen(argv, cwd, preexec=False)

    def take_space(self, process: subprocess.Popen[bytes]) -> None:
        path = self.outside() / "filler"
        self.filler.append(path)
        block = bytes(FILL_BLOCK)
        with contextlib.suppress(OSError), open(path, "wb", buffering=0) as stream:
            # Halve the block at each ENOSPC, down to one byte, so that no
            # byte of the tmpfs is left.
            while block:
                try:
                    stream.write(block)
                except OSError as error:
                    if error.errno != errno.ENOSPC:
                        raise
                    block = block[: len(block) // 2]

    def give_space(self) -> None:
        for path in self.filler:
            path.unlink()
        self.filler.clear()

    def copy_journal(self, destination: Path) -> Path:
        return _copy_journal(self.outside() / "run.db", destination)


@contextlib.contextmanager
def _tmpfs(folder: Path, size: str = TMPFS_SIZE) -> Iterator[Tmpfs | None]:
    """Mount a tmpfs of ``size`` on ``folder`` in a mount namespace, if permitted."""
    folder.mkdir()
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        yield None
        return
    namespaces = "-m" if os.geteuid() == 0 else "-Urm"
    mount = f'mount -t tmpfs -o size={size} tmpfs "$1" && echo mounted && exec cat'
    holder = subprocess.Popen(
        ["unshare", namespaces, "sh", "-c", mount, "sh", str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        ready = holder.stdout.readline() == b"mounted\n"
        yield Tmpfs(folder, holder) if ready else None
    finally:
        holder.stdin.close()  # cat ends, and the namespace with its tmpfs.
        holder.wait(timeout=RUN_TIMEOUT)
        holder.stdout.close()
        if holder.stderr is not None:
            holder.stderr.close()


def _states(journal: Path) -> dict[str, set[str]]:
    """Return the items of a journal copy by state."""
    connection = sqlite3.connect(journal)
    try:
        rows = connection.execute("SELECT item, state FROM items").fetchall()
    finally:
        connection.close()
    states: dict[str, set[str]] = {}
    for item, state in rows:
        states.setdefault(state, set()).add(_item_text(item))
    return states


def _item_text(stored: str | bytes) -> str:
    # Imported here because the codec is private to the package.
    from batchtools import _codec

    item = _codec.decode(stored)
    assert isinstance(item, tuple), f"{item!r} is not a CLI item"
    value = item[0]
    return value.decode() if isinstance(value, bytes) else str(value)


def _integrity(journal: Path) -> str:
    connection = sqlite3.connect(journal)
    try:
        return "; ".join(
            str(row[0]) for row in connection.execute("PRAGMA integrity_check")
        )
    finally:
        connection.close()


@dataclass
class Outcome:
    """What the run that ran out of space did."""

    status: int
    stderr: str
    printed: set[str]
    committed: dict[str, set[str]]
    journal: Path
    copy: Path
    """The copy of the journal taken right after the failure."""


def _run_out_of_space(
    disk: Disk,
    tmp_path: Path,
    campaign: Campaign,
    scenario: ScenarioRecord,
    *,
    results: bool = False,
) -> Outcome:
    """Run the CLI, take the disk's space once items are committed, wait for it.

    With ``results``, the `--results` folder is on that disk and the journal
    on the test's own disk. Otherwise the journal is on that disk.
    """
    count = campaign.size(200, 2000)
    fast = count // 4
    listing = tmp_path / "items"
    listing.write_text("".join(f"{number}\n" for number in range(1, count + 1)))
    gate = tmp_path / "gate"
    journal = (tmp_path if results else disk.folder) / "run.db"
    command = ["sh", "-c", SCRIPT, "sh", "{}", str(fast), str(gate)]
    arguments: list[Argument] = ["run", "-q", "-j", str(JOBS), "--journal", journal]
    if results:
        arguments += ["--results", disk.folder / "results"]
    arguments += command
    argv = disk.argv(cli_argv([*arguments, "::::", listing]))
    scenario.tried = count
    scenario.faults_injected = 1
    scenario.notes["disk"] = disk.name

    process = disk.start(argv, tmp_path)
    assert process.stdout is not None
    try:
        # The CLI prints an item's output once its outcome is committed.
        printed: set[str] = set()
        while len(printed) < fast:
            line = process.stdout.readline()
            assert line, "the CLI ended before the fast items were committed"
            printed.add(line.decode().strip())
        disk.take_space(process)
        gate.touch()
        rest, errors = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
            process.communicate()
    printed.update(line.decode().strip() for line in rest.splitlines())
    after = tmp_path / "after-failure"
    copy = _copy_journal(journal, after) if results else disk.copy_journal(after)
    committed = _states(copy)
    lost = printed - committed.get("succeeded", set())
    scenario.items_lost = len(lost)
    scenario.notes["committed_before_failure"] = len(committed.get("succeeded", ()))
    return Outcome(
        process.returncode,
        errors.decode(errors="replace"),
        printed,
        committed,
        journal,
        copy,
    )


def _resume_after_space_is_back(
    disk: Disk, outcome: Outcome, tmp_path: Path, scenario: ScenarioRecord
) -> None:
    disk.give_space()
    process = disk.start(
        disk.argv(cli_argv(["resume", "-q", outcome.journal])), tmp_path
    )
    _, errors = process.communicate(timeout=RUN_TIMEOUT)
    assert process.returncode == 0, errors.decode(errors="replace")
    copy = disk.copy_journal(tmp_path / "after-resume")
    states = _states(copy)
    total = scenario.tried
    scenario.items_lost += total - len(states.get("succeeded", ()))
    assert _integrity(copy) == "ok"
    assert set(states) == {"succeeded"}
    assert len(states["succeeded"]) == total
    assert outcome.committed.get("succeeded", set()) <= states["succeeded"]


def _check_failure(outcome: Outcome, cause: re.Pattern[str]) -> None:
    assert outcome.status == EXIT_ABORTED, outcome.stderr
    assert "Traceback" not in outcome.stderr
    errors = error_lines(outcome.stderr.encode())
    assert len(errors) == 1, outcome.stderr
    assert str(outcome.journal) in errors[0]
    assert cause.search(errors[0]), errors[0]
    assert outcome.printed <= outcome.committed.get("succeeded", set())


def test_full_disk_on_tmpfs(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    with _tmpfs(tmp_path / "tmpfs") as tmpfs:
        disk: Disk
        if tmpfs is None:
            disk, cause = FileSizeLimit(tmp_path / "tmpfs"), re.compile(".")
            scenario.notes["fallback"] = "unshare is not permitted here"
        else:
            disk, cause = tmpfs, NO_SPACE
        outcome = _run_out_of_space(disk, tmp_path, campaign, scenario)

        _check_failure(outcome, cause)
        _resume_after_space_is_back(disk, outcome, tmp_path, scenario)


def test_full_disk_file_size_limit(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    folder = tmp_path / "journal"
    folder.mkdir()
    disk = FileSizeLimit(folder)
    outcome = _run_out_of_space(disk, tmp_path, campaign, scenario)

    _check_failure(outcome, re.compile("."))
    _resume_after_space_is_back(disk, outcome, tmp_path, scenario)


def test_file_size_limit_error_names_cause(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    folder = tmp_path / "journal"
    folder.mkdir()
    outcome = _run_out_of_space(FileSizeLimit(folder), tmp_path, campaign, scenario)

    _check_failure(outcome, FILE_TOO_LARGE)


def test_journal_error_printed_once(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    folder = tmp_path / "journal"
    folder.mkdir()
    outcome = _run_out_of_space(FileSizeLimit(folder), tmp_path, campaign, scenario)

    assert outcome.status == EXIT_ABORTED, outcome.stderr
    mentions = [
        line for line in outcome.stderr.splitlines() if "writing failed" in line
    ]
    assert len(mentions) == 1, outcome.stderr


def test_full_results_disk_keeps_files(
    tmp_path: Path, campaign: Campaign, scenario: ScenarioRecord
) -> None:
    # Result files are written before their outcome is committed, so no
    # item is recorded as succeeded without them.
    with _tmpfs(tmp_path / "tmpfs", RESULTS_TMPFS_SIZE) as tmpfs:
        disk: Disk = tmpfs if tmpfs is not None else FileSizeLimit(tmp_path / "tmpfs")
        outcome = _run_out_of_space(disk, tmp_path, campaign, scenario, results=True)
        results = disk.outside() / "results"

        assert outcome.status == EXIT_ABORTED, outcome.stderr
        assert "Traceback" not in outcome.stderr
        errors = error_lines(outcome.stderr.encode())
        assert len(errors) == 1, outcome.stderr
        assert outcome.stderr.count("writing the output") == 1, outcome.stderr
        if tmpfs is not None:
            assert f"cannot write {disk.folder / 'results'}/" in errors[0]
            assert NO_SPACE.search(errors[0]), errors[0]
        assert succeeded_without_results(outcome.copy, results) == []
        assert outcome.printed <= outcome.committed.get("succeeded", set())

        disk.give_space()
        resumed = disk.start(
            disk.argv(cli_argv(["resume", "-q", outcome.journal])), tmp_path
        )
        _, resume_errors = resumed.communicate(timeout=RUN_TIMEOUT)
        assert resumed.returncode == 0, resume_errors.decode(errors="replace")
        states = _states(outcome.journal)
        assert set(states) == {"succeeded"}
        assert len(states["succeeded"]) == scenario.tried
        assert succeeded_without_results(outcome.journal, results) == []


def _small_file_limit() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_no_room_at_creation_leaves_nothing(
    tmp_path: Path, scenario: ScenarioRecord
) -> None:
    journal = tmp_path / "run.db"
    arguments: list[Argument] = ["run", "-q", "--journal", journal, "true", ":::", "a"]
    scenario.tried = 1
    scenario.faults_injected = 1

    failed = run_cli(arguments, tmp_path, preexec=_small_file_limit)

    stderr = failed.stderr.decode(errors="replace")
    assert failed.returncode == EXIT_ABORTED, stderr
    (line,) = error_lines(failed.stderr)
    assert str(journal) in line
    assert FILE_TOO_LARGE.search(line), line
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run.db.lock"]
    again = run_cli(arguments, tmp_path)
    assert again.returncode == 0, again.stderr.decode(errors="replace")


def _fill_leaving(folder: Path, free: int) -> Path:
    """Fill the filesystem of ``folder`` until ``free`` bytes are left."""
    filler = folder / "filler"
    room = shutil.disk_usage(folder).free - free
    with open(filler, "wb", buffering=0) as stream:
        while room > 0:
            room -= stream.write(bytes(min(room, FILL_BLOCK)))
    return filler


def test_disk_full_at_journal_creation(
    tmp_path: Path, scenario: ScenarioRecord
) -> None:
    # With a little room left, creating the journal runs out of space at one
    # step or another. Each time there is either no journal or a
    # whole one, and the same command works once the space is back.
    with _tmpfs(tmp_path / "tmpfs") as tmpfs:
        if tmpfs is None:
            scenario.notes["fallback"] = "unshare is not permitted here"
            test_no_room_at_creation_leaves_nothing(tmp_path, scenario)
            return
        inside = tmpfs.outside()
        for free in range(4096, 81920, 8192):
            journal = tmpfs.folder / f"run-{free}.db"
            arguments: list[Argument] = [
                "run", "-q", "--journal", journal, "true", ":::", "a",
            ]  # fmt: skip
            filler = _fill_leaving(inside, free)
            try:
                process = tmpfs.start(tmpfs.argv(cli_argv(arguments)), tmp_path)
                _, errors = process.communicate(timeout=RUN_TIMEOUT)
            finally:
                filler.unlink()
            scenario.tried += 1
            scenario.faults_injected += 1
            assert process.returncode in (0, EXIT_ABORTED), errors.decode()
            if (inside / journal.name).exists():
                # Made whole, even if the run then found no room to start.
                status = tmpfs.start(
                    tmpfs.argv(cli_argv(["status", "--json", journal])), tmp_path
                )
                _, status_errors = status.communicate(timeout=RUN_TIMEOUT)
                assert status.returncode == 0, status_errors.decode(errors="replace")
            again = tmpfs.start(tmpfs.argv(cli_argv(arguments)), tmp_path)
            _, errors = again.communicate(timeout=RUN_TIMEOUT)
            assert again.returncode == 0, errors.decode(errors="replace")
            leftovers = [p.name for p in inside.iterdir() if "creating" in p.name]
            assert leftovers == []
