"""Tests of atomic_write, atomic_writer, atomic_write_many and recover_writes.

Everything runs on real files. Crash tests start child interpreters that
write through the library and die by SIGKILL. Either the child kills itself
from the phase hook at a named phase, or the test kills it at a point drawn
from a logged random seed, while the child reports its phases through a
pipe.
After each kill, recovery must leave every file wholly old or wholly new,
the set of files all old or all new, and no helper file behind.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pickle
import random
import selectors
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from batchtools import ConfigurationError
from batchtools._exceptions import LockTimeoutError, WriteRecoveryError
from batchtools.fs import _atomic_io
from batchtools.fs.atomic import (
    WriteRecovery,
    atomic_write,
    atomic_write_many,
    atomic_writer,
    recover_writes,
)

WAIT = 30.0
"""Seconds a test waits for something that happens at once unless the code is broken."""

WRITES = ".batchtools-writes"

CHILD = textwrap.dedent(
    """
    import glob, json, os, signal, sys
    from batchtools.fs import _atomic_io, atomic

    with open(sys.argv[1]) as file:
        config = json.load(file)
    progress = config.get("progress_fd")
    seen = {}

    def hook(phase):
        seen[phase] = seen.get(phase, 0) + 1
        point = [phase, seen[phase]]
        if progress is not None:
            os.write(progress, (phase + "\\n").encode())
        if point == config.get("stop_at"):
            os.kill(os.getpid(), signal.SIGKILL)
        if point == config.get("pause_at"):
            print("paused", flush=True)
            sys.stdin.readline()
        if point == config.get("sabotage_at"):
            pattern = config["sabotage_glob"]
            for path in glob.glob(pattern, recursive=True):
                os.unlink(path)

    _atomic_io.phase_hook = hook
    if config.get("gate"):
        sys.stdin.readline()
    for files in config["writes"]:
        if config["action"] == "many":
            atomic.atomic_write_many(files)
        elif config["action"] == "single":
            for path, text in files.items():
                atomic.atomic_write(path, text)
        else:
            atomic.recover_writes(config["folder"])
        if progress is not None:
            os.write(progress, b"done\\n")
    """
)


# -- helpers -------------------------------------------------------------


def version_text(name: str, version: int) -> str:
    """Return the content of file ``name`` at ``version``; sizes differ by version."""
    return f"{name} version {version}\n" * (40 + 13 * version)


def file_listing(root: Path) -> set[str]:
    """Return the relative paths of every file and link below ``root``."""
    found = set()
    for folder, _, names in os.walk(root):
        for name in names:
            found.add(os.path.relpath(os.path.join(folder, name), root))
    return found


def read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


class FileSet:
    """Three files under ``root``: two exist at version 0, ``sub/c`` does not."""

    names = ("a", "sub/b", "sub/c")

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "sub").mkdir(parents=True)
        for name in ("a", "sub/b"):
            (root / name).write_text(version_text(name, 0))

    def files(self, version: int) -> dict[str, str]:
        return {
            str(self.root / name): version_text(name, version) for name in self.names
        }

    def expected(self, version: int) -> dict[str, bytes | None]:
        return {
            name: None
            if version == 0 and name == "sub/c"
            else version_text(name, version).encode()
            for name in self.names
        }

    def state(self) -> dict[str, bytes | None]:
        return {name: read_or_none(self.root / name) for name in self.names}

    def version(self, candidates: range) -> int | None:
        """Return the version that every file has, or None for a mix."""
        state = self.state()
        for version in candidates:
            if state == self.expected(version):
                return version
        return None

    def assert_clean(self) -> None:
        """Check that no temporary, staged, backup or record file is left."""
        present = {name for name in self.names if (self.root / name).exists()}
        allowed = present | {f"{WRITES}/lock"}
        assert file_listing(self.root) - allowed == set()


class Child:
    """A child interpreter that runs CHILD with a JSON configuration."""

    def __init__(
        self, config_folder: Path, config: dict[str, Any], *, progress: bool = False
    ) -> None:
        self._events_fd: int | None = None
        self._buffer = b""
        pass_fds: tuple[int, ...] = ()
        write_fd = None
        if progress:
            self._events_fd, write_fd = os.pipe()
            config = {**config, "progress_fd": write_fd}
            pass_fds = (write_fd,)
        config_folder.mkdir(exist_ok=True)
        config_path = config_folder / f"child-{os.urandom(6).hex()}.json"
        config_path.write_text(json.dumps(config))
        self.process = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(config_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            text=True,
        )
        if write_fd is not None:
            os.close(write_fd)

    def expect(self, line: str) -> None:
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == line

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def read_events(self, count: int) -> list[str]:
        """Read up to ``count`` phase events; fewer when the child ends first."""
        assert self._events_fd is not None
        events: list[str] = []
        with selectors.DefaultSelector() as selector:
            selector.register(self._events_fd, selectors.EVENT_READ)
            while len(events) < count:
                if b"\n" in self._buffer:
                    line, self._buffer = self._buffer.split(b"\n", 1)
                    events.append(line.decode())
                    continue
                assert selector.select(WAIT), "the child reported nothing"
                chunk = os.read(self._events_fd, 4096)
                if not chunk:
                    break
                self._buffer += chunk
        return events

    def wait(self) -> int:
        """Wait for the child to end; return its exit status."""
        _, stderr = self.process.communicate(timeout=WAIT)
        status = self.process.returncode
        assert status in (0, -signal.SIGKILL), stderr
        return status

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate(timeout=WAIT)
        if self._events_fd is not None:
            os.close(self._events_fd)
            self._events_fd = None


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


@pytest.fixture
def files(tmp_path: Path) -> FileSet:
    return FileSet(tmp_path / "data")


def start(
    children: list[Child], tmp_path: Path, config: dict[str, Any], **options: bool
) -> Child:
    child = Child(tmp_path / "configs", config, **options)
    children.append(child)
    return child


def failing_fsync(
    monkeypatch: pytest.MonkeyPatch, fails: Callable[[int, int], bool]
) -> list[int]:
    """Make os.fsync raise EIO for the calls that ``fails(index, descriptor)`` selects.

    Returns the list of descriptors passed to os.fsync, which grows with each call.
    """
    real_fsync = os.fsync
    calls: list[int] = []

    def fsync(descriptor: int) -> None:
        calls.append(descriptor)
        if fails(len(calls) - 1, descriptor):
            raise OSError(errno.EIO, "injected fsync failure")
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    # On macOS the library syncs with F_FULLFSYNC first; without it, it
    # falls back to os.fsync, as it does on Linux.
    monkeypatch.delattr(fcntl, "F_FULLFSYNC", raising=False)
    return calls


def fail_call(number: int) -> Callable[[int, int], bool]:
    """Select the call ``number`` (from 0) for failing_fsync."""
    return lambda index, descriptor: index == number


def is_folder(index: int, descriptor: int) -> bool:
    return stat.S_ISDIR(os.fstat(descriptor).st_mode)


# -- one file ------------------------------------------------------------


def test_atomic_write_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_bytes(b"old")

    atomic_write(target, b"new bytes")
    atomic_write(str(tmp_path / "text.txt"), "caf\u00e9")

    assert target.read_bytes() == b"new bytes"
    assert (tmp_path / "text.txt").read_bytes() == "caf\u00e9".encode()
    assert file_listing(tmp_path) == {"out.txt", "text.txt"}


def test_atomic_writer_text_and_binary(tmp_path: Path) -> None:
    with atomic_writer(tmp_path / "a.txt", binary=False) as text_file:
        text_file.write("line \u00e9\n")
    with atomic_writer(tmp_path / "b.bin") as binary_file:
        binary_file.write(b"\x00\xff")

    assert (tmp_path / "a.txt").read_bytes() == "line \u00e9\n".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert file_listing(tmp_path) == {"a.txt", "b.bin"}


def test_exception_in_block_keeps_target(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")

    with (
        pytest.raises(RuntimeError, match="stop"),
        atomic_writer(target, binary=False) as text_file,
    ):
        text_file.write("partial new content")
        text_file.flush()
        raise RuntimeError("stop")
    with (
        pytest.raises(KeyboardInterrupt),
        atomic_writer(tmp_path / "never.txt") as binary_file,
    ):
        binary_file.write(b"x")
        raise KeyboardInterrupt

    assert target.read_text() == "old"
    assert file_listing(tmp_path) == {"keep.txt"}


def test_file_closed_in_block_is_rejected(tmp_path: Path) -> None:
    target = tmp_path / "keep.txt"
    target.write_text("old")

    with (
        pytest.raises(ValueError, match="closed inside the with block"),
        atomic_writer(target) as file,
    ):
        file.write(b"new")
        file.close()

    assert target.read_text() == "old"
    assert file_listing(tmp_path) == {"keep.txt"}


def test_new_file_mode_follows_umask(tmp_path: Path) -> None:
    previous = os.umask(0o027)
    try:
        atomic_write(tmp_path / "new.txt", b"x")
    finally:
        os.umask(previous)

    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o640


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444, 0o2755])
def test_existing_mode_is_kept(tmp_path: Path, mode: int) -> None:
    target = tmp_path / "kept"
    target.write_bytes(b"old")
    target.chmod(mode)

    atomic_write(target, b"new")

    assert stat.S_IMODE(target.stat().st_mode) == mode
    assert target.read_bytes() == b"new"


def test_explicit_mode_is_applied(tmp_path: Path) -> None:
    target = tmp_path / "script.sh"
    target.write_bytes(b"old")
    target.chmod(0o644)

    atomic_write(target, b"#!/bin/sh\n", mode=0o750)

    assert stat.S_IMODE(target.stat().st_mode) == 0o750


@pytest.mark.parametrize("mode", [-1, 0o10000, 1.5, True, "644"])
def test_invalid_mode_is_rejected(tmp_path: Path, mode: Any) -> None:
    with pytest.raises(ConfigurationError, match="mode must be permission bits"):
        atomic_write(tmp_path / "x", b"x", mode=mode)

    assert file_listing(tmp_path) == set()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file away")
def test_owner_and_group_are_kept(tmp_path: Path) -> None:
    target = tmp_path / "owned"
    target.write_bytes(b"old")
    os.chown(target, 12345, 23456)
    target.chmod(0o640)

    atomic_write(target, b"new")

    info = target.stat()
    assert (info.st_uid, info.st_gid) == (12345, 23456)
    assert stat.S_IMODE(info.st_mode) == 0o640


def test_invalid_data_and_targets_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "pipe")

    with pytest.raises(TypeError, match="must be bytes or str, not int"):
        atomic_write(tmp_path / "x", 5)  # type: ignore[arg-type]  # the wrong type is the case
    with pytest.raises(IsADirectoryError, match="cannot replace a folder"):
        atomic_write(tmp_path / "folder", b"x")
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write(tmp_path / "pipe", b"x")

    assert file_listing(tmp_path) == {"pipe"}


def test_symlink_target_replaces_linked_file(tmp_path: Path) -> None:
    real = tmp_path / "real.txt"
    real.write_bytes(b"old")
    real.chmod(0o640)
    link = tmp_path / "link.txt"
    link.symlink_to("real.txt")

    atomic_write(link, b"new")

    assert link.is_symlink()
    assert os.readlink(link) == "real.txt"
    assert real.read_bytes() == b"new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert file_listing(tmp_path) == {"real.txt", "link.txt"}


def test_dangling_symlink_creates_linked_file(tmp_path: Path) -> None:
    link = tmp_path / "link.txt"
    link.symlink_to("missing.txt")

    atomic_write(link, b"new")

    assert link.is_symlink()
    assert (tmp_path / "missing.txt").read_bytes() == b"new"


def test_symlink_loop_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "one").symlink_to("two")
    (tmp_path / "two").symlink_to("one")

    with pytest.raises(OSError, match="form a loop") as raised:
        atomic_write(tmp_path / "one", b"x")

    assert raised.value.errno == errno.ELOOP
    assert file_listing(tmp_path) == {"one", "two"}


def test_symlink_at_temporary_name_cannot_redirect(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"victim")
    folder = tmp_path / "out"
    folder.mkdir()
    target = folder / "target.txt"
    target.write_bytes(b"old")
    planted = folder / ".planted"
    planted.symlink_to(victim)
    names = iter([".planted", ".target.chosen-second"])
    requested: list[str] = []

    def name_source(target_name: str) -> str:
        requested.append(target_name)
        return next(names)

    with _atomic_io.writing(
        target, binary=True, mode=None, name_source=name_source
    ) as file:
        file.write(b"new")

    assert requested == ["target.txt", "target.txt"]
    assert target.read_bytes() == b"new"
    assert victim.read_bytes() == b"victim"
    assert planted.is_symlink()
    assert os.readlink(planted) == str(victim)
    assert file_listing(folder) == {"target.txt", ".planted"}


def test_fsync_failure_keeps_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "keep.txt"
    target.write_bytes(b"old")
    calls = failing_fsync(
        monkeypatch, lambda index, descriptor: not is_folder(index, descriptor)
    )

    with pytest.raises(OSError, match="injected fsync failure"):
        atomic_write(target, b"new")
    with pytest.raises(OSError, match="injected fsync failure"):
        atomic_write(tmp_path / "new.txt", b"new")

    assert len(calls) == 2
    assert target.read_bytes() == b"old"
    assert file_listing(tmp_path) == {"keep.txt"}


def test_write_that_is_not_durable_skips_every_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "fast.txt"
    target.write_bytes(b"old")
    calls = failing_fsync(monkeypatch, lambda index, descriptor: True)

    atomic_write(target, b"new", durable=False)
    with atomic_writer(tmp_path / "other.txt", durable=False) as file:
        file.write(b"other")

    assert calls == []
    assert target.read_bytes() == b"new"
    assert file_listing(tmp_path) == {"fast.txt", "other.txt"}


def test_folder_fsync_failure_is_raised_with_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out.txt"
    target.write_bytes(b"old")
    failing_fsync(monkeypatch, is_folder)

    with pytest.raises(OSError, match="injected fsync failure") as raised:
        atomic_write(target, b"new")

    assert any("already has its new content" in note for note in raised.value.__notes__)
    assert target.read_bytes() == b"new"
    assert file_listing(tmp_path) == {"out.txt"}


def dead_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait(WAIT)
    return process.pid


def test_recovery_spares_temporary_file_in_use(tmp_path: Path) -> None:
    # The name carries a dead pid, so only the writer's flock protects it.
    target = tmp_path / "out.txt"
    name = f".out.txt.{dead_pid()}.{'cd' * 8}.batchtools-tmp"

    with _atomic_io.writing(
        target, binary=True, mode=None, name_source=lambda _: name
    ) as file:
        file.write(b"new")
        file.flush()
        recovery = recover_writes(tmp_path)
        during = file_listing(tmp_path)

    assert recovery == WriteRecovery()
    assert during == {name}
    assert target.read_bytes() == b"new"
    assert file_listing(tmp_path) == {"out.txt"}


def test_recovery_removes_old_orphan_of_live_pid(tmp_path: Path) -> None:
    # An unlocked file named after this live process: a writer between its
    # open and its lock, or an orphan whose pid was reused. Only age decides.
    name = f".out.txt.{os.getpid()}.{'ab' * 8}.batchtools-tmp"
    orphan = tmp_path / name
    orphan.write_bytes(b"partial")

    assert recover_writes(tmp_path).temporary_files_removed == 0
    assert orphan.exists()

    old = orphan.stat().st_mtime - 2 * _atomic_io.ORPHAN_AGE
    os.utime(orphan, (old, old))

    assert recover_writes(tmp_path).temporary_files_removed == 1
    assert file_listing(tmp_path) == set()


def test_ten_processes_write_one_path(children: list[Child], tmp_path: Path) -> None:
    target = tmp_path / "data" / "shared.txt"
    target.parent.mkdir()
    target.write_text("initial")
    versions = {f"writer {n} ".encode() * 4000 for n in range(10)}
    for n in range(10):
        text = f"writer {n} " * 4000
        config = {"action": "single", "gate": True, "writes": [{str(target): text}] * 8}
        start(children, tmp_path, config)
    for child in children:
        child.send("go")

    reads = 0
    while any(child.process.poll() is None for child in children):
        content = target.read_bytes()
        reads += 1
        assert content == b"initial" or content in versions, content[:40]
    for child in children:
        assert child.wait() == 0

    assert reads > 0
    assert target.read_bytes() in versions
    assert file_listing(target.parent) == {"shared.txt"}


@pytest.mark.parametrize(("phase", "new"), [("written", False), ("replaced", True)])
def test_killed_single_write_recovers(
    children: list[Child], tmp_path: Path, phase: str, new: bool
) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    target = folder / "out.txt"
    target.write_text("old")
    config = {
        "action": "single",
        "stop_at": [phase, 1],
        "writes": [{str(target): "new"}],
    }

    assert start(children, tmp_path, config).wait() == -signal.SIGKILL
    recovery = recover_writes(folder)

    assert target.read_text() == ("new" if new else "old")
    assert recovery.temporary_files_removed == (0 if new else 1)
    assert file_listing(folder) == {"out.txt"}


# -- several files -------------------------------------------------------


def test_write_many_changes_every_file(files: FileSet) -> None:
    (files.root / "a").chmod(0o600)

    atomic_write_many(files.files(1))

    assert files.state() == files.expected(1)
    assert stat.S_IMODE((files.root / "a").stat().st_mode) == 0o600
    files.assert_clean()


def test_write_many_with_empty_mapping_does_nothing(tmp_path: Path) -> None:
    atomic_write_many({})

    assert file_listing(tmp_path) == set()


def test_write_many_rejects_invalid_input(files: FileSet) -> None:
    (files.root / "alias").symlink_to("a")
    before = files.state()

    with pytest.raises(ConfigurationError, match="name the same file"):
        atomic_write_many({files.root / "a": b"1", files.root / "alias": b"2"})
    with pytest.raises(ConfigurationError, match=r"lies inside a \.batchtools-writes"):
        atomic_write_many({files.root / WRITES / "x": b"1"})
    with pytest.raises(TypeError, match="must be bytes or str, not list"):
        atomic_write_many({files.root / "a": []})  # type: ignore[dict-item]  # the wrong type is the case
    with pytest.raises(ConfigurationError, match="timeout must be"):
        atomic_write_many({files.root / "a": b"1"}, timeout=-1)

    assert files.state() == before
    assert not (files.root / WRITES).exists()


def test_write_many_follows_symlinks(files: FileSet) -> None:
    (files.root / "alias").symlink_to("sub/b")

    atomic_write_many({files.root / "alias": b"through link", files.root / "a": b"a"})

    assert (files.root / "alias").is_symlink()
    assert (files.root / "sub" / "b").read_bytes() == b"through link"


@pytest.mark.parametrize(
    "order", [("a", "sub/b", "sub/c"), ("sub/c", "a", "sub/b"), ("sub/b", "sub/c", "a")]
)
def test_failed_rename_rolls_back(
    files: FileSet, monkeypatch: pytest.MonkeyPatch, order: tuple[str, ...]
) -> None:
    # After the first rename, the second file's staged version disappears,
    # so its rename fails and the write must undo the first one, which for
    # sub/c means removing a file that did not exist before.
    second = files.root / order[1]
    new_files = files.files(1)

    def remove_second_staged(phase: str) -> None:
        if phase == "renamed:1":
            for path in second.parent.glob(f".{second.name}.*.batchtools-staged"):
                path.unlink()

    monkeypatch.setattr(_atomic_io, "phase_hook", remove_second_staged)

    with pytest.raises(FileNotFoundError) as raised:
        atomic_write_many(
            {
                str(files.root / name): new_files[str(files.root / name)]
                for name in order
            }
        )

    assert raised.value.__notes__ == ["every file has its old content again"]
    assert files.state() == files.expected(0)
    files.assert_clean()


def test_fsync_failure_at_every_call_leaves_consistent_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = FileSet(tmp_path / "counted")
    calls = failing_fsync(monkeypatch, lambda index, descriptor: False)
    atomic_write_many(counted.files(1))
    total = len(calls)
    outcomes = []

    for failing_call in range(total):
        files = FileSet(tmp_path / f"fail-{failing_call}")
        failing_fsync(monkeypatch, fail_call(failing_call))
        with pytest.raises(OSError, match="injected fsync failure") as raised:
            atomic_write_many(files.files(1))
        monkeypatch.undo()

        version = files.version(range(2))
        assert version is not None, f"fsync call {failing_call} left a mix"
        notes = raised.value.__notes__
        if version == 1:
            assert any("already has its new content" in note for note in notes)
        else:
            assert notes == ["every file keeps its old content"]
        recover_writes(files.root)
        assert files.version(range(2)) == version
        files.assert_clean()
        outcomes.append(version)

    assert total > 6
    assert outcomes[0] == 0
    assert outcomes[-1] == 1


def test_threads_writing_many_take_turns(files: FileSet) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def write(first: int) -> None:
        try:
            barrier.wait(WAIT)
            for version in range(first, first + 10):
                atomic_write_many(files.files(version))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(n,)) for n in (1, 101)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT)

    assert errors == []
    assert files.version(range(1, 111)) in (10, 110)
    files.assert_clean()


def test_damaged_record_raises(files: FileSet) -> None:
    atomic_write_many(files.files(1))
    record = files.root / WRITES / "0123456789abcdef.intent.json"
    record.write_text('{"version": 1, "state": "committed"')

    with pytest.raises(WriteRecoveryError, match="cannot be read"):
        atomic_write_many(files.files(2))
    with pytest.raises(WriteRecoveryError, match="cannot be read"):
        recover_writes(files.root)

    assert files.state() == files.expected(1)


def test_record_outside_folder_raises(files: FileSet) -> None:
    atomic_write_many(files.files(1))
    record = files.root / WRITES / "0123456789abcdef.intent.json"
    entry = {"target": "../outside", "staged": "s", "backup": "b"}
    document = {
        "version": 1,
        "state": "prepared",
        "pid": 1,
        "created_ns": 0,
        "files": [{**entry, "old_inode": None, "new_inode": None}],
    }
    record.write_text(json.dumps(document))

    with pytest.raises(WriteRecoveryError, match="does not lie inside the folder"):
        recover_writes(files.root)


def test_unsafe_records_folder_raises(files: FileSet, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (files.root / WRITES).symlink_to(elsewhere)

    with pytest.raises(WriteRecoveryError, match="is a symbolic link"):
        atomic_write_many(files.files(1))

    assert files.state() == files.expected(0)
    assert file_listing(elsewhere) == set()


def test_recover_writes_needs_a_folder(tmp_path: Path) -> None:
    with pytest.raises(NotADirectoryError, match="needs an existing folder"):
        recover_writes(tmp_path / "missing")


def test_module_exports_public_api() -> None:
    from batchtools.fs import atomic

    assert sorted(atomic.__all__) == [
        "WriteRecovery",
        "atomic_write",
        "atomic_write_many",
        "atomic_writer",
        "recover_writes",
    ]
    assert all(hasattr(atomic, name) for name in atomic.__all__)


def test_write_recovery_error_pickles() -> None:
    error = WriteRecoveryError("/data/.batchtools-writes/x.intent.json", "damaged")

    copy = pickle.loads(pickle.dumps(error))

    assert (copy.path, copy.message) == (error.path, error.message)
    assert str(copy) == str(error)


# -- crashes -------------------------------------------------------------

# Each kill point: the phase and its occurrence, whether the files must end
# new, and the (completed, rolled back) counts that recovery reports. The
# record is saved twice (prepared, committed); "record-written" is its
# temporary file, before the rename.
KILL_POINTS = [
    (("record-written", 1), False, (0, 0)),
    (("record-replaced", 1), False, (0, 1)),
    (("prepared", 1), False, (0, 1)),
    (("staged", 1), False, (0, 1)),
    (("record-written", 2), False, (0, 1)),
    (("record-replaced", 2), True, (1, 0)),
    (("committed", 1), True, (1, 0)),
    (("renamed:1", 1), True, (1, 0)),
    (("renamed:2", 1), True, (1, 0)),
    (("renamed:3", 1), True, (1, 0)),
    (("synced", 1), True, (1, 0)),
    (("cleaned", 1), True, (1, 0)),
]


@pytest.mark.parametrize(
    ("point", "new", "counts"),
    KILL_POINTS,
    ids=[f"{phase}-{occurrence}" for (phase, occurrence), _, _ in KILL_POINTS],
)
def test_killed_write_many_recovers(
    children: list[Child],
    tmp_path: Path,
    files: FileSet,
    point: tuple[str, int],
    new: bool,
    counts: tuple[int, int],
) -> None:
    config = {"action": "many", "stop_at": list(point), "writes": [files.files(1)]}

    assert start(children, tmp_path, config).wait() == -signal.SIGKILL
    recovery = recover_writes(files.root)

    assert files.state() == files.expected(1 if new else 0)
    assert (recovery.completed, recovery.rolled_back) == counts
    files.assert_clean()


@pytest.mark.parametrize(("phase", "new"), [("staged", False), ("renamed:2", True)])
def test_next_write_many_recovers_first(
    children: list[Child], tmp_path: Path, files: FileSet, phase: str, new: bool
) -> None:
    config = {"action": "many", "stop_at": [phase, 1], "writes": [files.files(1)]}
    assert start(children, tmp_path, config).wait() == -signal.SIGKILL

    atomic_write_many({files.root / "a": version_text("a", 2)})

    expected = files.expected(1 if new else 0)
    expected["a"] = version_text("a", 2).encode()
    assert files.state() == expected
    files.assert_clean()


def test_kill_during_recovery_recovers(
    children: list[Child], tmp_path: Path, files: FileSet
) -> None:
    writer = {"action": "many", "stop_at": ["renamed:1", 1], "writes": [files.files(1)]}
    assert start(children, tmp_path, writer).wait() == -signal.SIGKILL
    recoverer = {
        "action": "recover",
        "folder": str(files.root),
        "stop_at": ["finished:2", 1],
        "writes": [{}],
    }
    assert start(children, tmp_path, recoverer).wait() == -signal.SIGKILL

    recovery = recover_writes(files.root)

    assert recovery.completed == 1
    assert files.state() == files.expected(1)
    files.assert_clean()


def test_kill_during_roll_back_recovers(
    children: list[Child], tmp_path: Path, files: FileSet
) -> None:
    # The second rename fails, the write marks itself aborted, and it dies
    # after restoring the first file only.
    config = {
        "action": "many",
        "sabotage_at": ["renamed:1", 1],
        "sabotage_glob": str(files.root / "sub" / ".b.*.batchtools-staged"),
        "stop_at": ["restored:1", 1],
        "writes": [files.files(1)],
    }
    assert start(children, tmp_path, config).wait() == -signal.SIGKILL

    recovery = recover_writes(files.root)

    assert recovery.rolled_back == 1
    assert files.state() == files.expected(0)
    files.assert_clean()


def test_live_write_is_not_recovered(
    children: list[Child], tmp_path: Path, files: FileSet
) -> None:
    config = {
        "action": "many",
        "pause_at": ["renamed:1", 1],
        "writes": [files.files(1)],
    }
    writer = start(children, tmp_path, config)
    writer.expect("paused")
    halfway = files.state()

    with pytest.raises(LockTimeoutError, match=r"was not free within 0\.1 s"):
        recover_writes(files.root, timeout=0.1)

    assert files.state() == halfway
    assert halfway["a"] == files.expected(1)["a"]
    assert halfway["sub/b"] == files.expected(0)["sub/b"]
    writer.send("go")
    assert writer.wait() == 0
    assert files.state() == files.expected(1)
    files.assert_clean()


def test_waiting_writer_recovers_killed_holder(
    children: list[Child], tmp_path: Path, files: FileSet
) -> None:
    first = {"action": "many", "pause_at": ["renamed:1", 1], "writes": [files.files(1)]}
    holder = start(children, tmp_path, first)
    holder.expect("paused")
    second_files = {
        str(files.root / name): version_text(name, 2) for name in ("a", "sub/b")
    }
    second = {"action": "many", "writes": [second_files]}
    waiter = start(children, tmp_path, second)

    holder.process.kill()
    assert holder.wait() == -signal.SIGKILL
    assert waiter.wait() == 0

    # The waiter finished the killed write (sub/c is new), then wrote its own.
    assert files.state() == {
        "a": version_text("a", 2).encode(),
        "sub/b": version_text("sub/b", 2).encode(),
        "sub/c": version_text("sub/c", 1).encode(),
    }
    files.assert_clean()


@pytest.mark.parametrize("action", ["many", "single"])
def test_random_kills_leave_whole_versions(
    children: list[Child], tmp_path: Path, action: str
) -> None:
    seed = int(os.environ.get("BATCHTOOLS_TEST_SEED", random.randrange(2**32)))
    print(f"kill points drawn with BATCHTOOLS_TEST_SEED={seed}")
    rng = random.Random(seed)
    files = FileSet(tmp_path / "data")
    version = 0
    # A multi-file write of three files reports 13 phase events, counting
    # the two saves of its record and the final "done". Three single writes
    # report two phases each, and then one "done".
    events_per_version = 13 if action == "many" else 7

    for _ in range(6):
        versions = range(version + 1, version + 4)
        config = {"action": action, "writes": [files.files(n) for n in versions]}
        child = start(children, tmp_path, config, progress=True)
        kill_after = rng.randint(1, events_per_version * len(versions))
        events = child.read_events(kill_after)
        child.process.kill()
        child.wait()

        recover_writes(files.root)
        recover_writes(files.root / "sub")

        candidates = range(version, version + 4)
        if action == "many":
            reached = files.version(candidates)
            assert reached is not None, (events, files.state())
            version = reached
        else:
            # Single writes promise each file whole, not the set.
            state = files.state()
            for name in files.names:
                assert state[name] in {files.expected(n)[name] for n in candidates}
            version = candidates[-1]
            for name in files.names:
                atomic_write(files.root / name, version_text(name, version))
        files.assert_clean()


def test_write_many_refuses_links_out_of_the_named_folder(tmp_path: Path) -> None:
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    site.mkdir()
    elsewhere.mkdir()
    (elsewhere / "b.txt").write_bytes(b"old")
    (site / "b.txt").symlink_to(elsewhere / "b.txt")

    with pytest.raises(ConfigurationError, match="give the resolved paths"):
        atomic_write_many({site / "a.txt": b"new", site / "b.txt": b"new"})

    assert (elsewhere / "b.txt").read_bytes() == b"old"
    assert not (site / "a.txt").exists()
    assert not (tmp_path / ".batchtools-writes").exists()
