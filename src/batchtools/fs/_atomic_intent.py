"""Multi-file writes: their records, their phases and their recovery.

`batchtools.fs.atomic` describes the protocol. A record is a JSON file in
the hidden folder ``.batchtools-writes`` of the common folder. It names
every path relative to that folder, so a record stays valid when the whole
folder is moved, and a record cannot point outside it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import filelock

from batchtools._exceptions import (
    ConfigurationError,
    LockTimeoutError,
    WriteRecoveryError,
)
from batchtools.fs._atomic_io import (
    apply_metadata,
    identity,
    identity_or_none,
    lstat_or_none,
    reached,
    remove_orphan_temporaries,
    stem,
    sync_file,
    sync_folder,
    unlink_quietly,
    write_all,
    writing,
)

log = logging.getLogger("batchtools.fs")

WRITES_FOLDER = ".batchtools-writes"
"""The hidden folder, inside the common folder, that keeps multi-file records."""

_STAGED_SUFFIX = ".batchtools-staged"
_BACKUP_SUFFIX = ".batchtools-backup"
_RECORD_SUFFIX = ".intent.json"
_LOCK_NAME = "lock"
_RECORD_VERSION = 1
_STATES = ("prepared", "committed", "aborted")


@dataclass
class Entry:
    """One target of a multi-file write, with its helper names and inodes."""

    target: str
    staged: str
    backup: str
    old_inode: tuple[int, int] | None = None  # None: the target did not exist
    new_inode: tuple[int, int] | None = None


@dataclass
class Intent:
    """The record of one multi-file write."""

    folder: str
    writes: str
    identifier: str
    state: str
    pid: int
    created_ns: int
    entries: list[Entry] = field(default_factory=list)

    @property
    def record(self) -> str:
        return os.path.join(self.writes, self.identifier + _RECORD_SUFFIX)

    def folders(self) -> list[str]:
        return sorted({os.path.dirname(entry.target) for entry in self.entries})


def plan(folder: str, writes: str, targets: list[str]) -> Intent:
    identifier = secrets.token_hex(8)
    intent = Intent(folder, writes, identifier, "prepared", os.getpid(), time.time_ns())
    for index, target in enumerate(targets):
        parent, name = os.path.split(target)
        # The record's random identifier makes the names unique; the index
        # separates targets whose names share the kept part.
        base = os.path.join(parent, f".{stem(name)}.{identifier}-{index}")
        intent.entries.append(
            Entry(target, base + _STAGED_SUFFIX, base + _BACKUP_SUFFIX)
        )
    return intent


def write_together(intent: Intent, contents: list[bytes]) -> None:
    try:
        _save_record(intent)
        reached("prepared")
        _stage(intent, contents)
        _sync_folders(intent)
        reached("staged")
        intent.state = "committed"
        _save_record(intent)
    except BaseException as error:
        error.add_note("every file keeps its old content")
        _clean_up_after_failure(intent, error, _discard)
        raise
    reached("committed")

    try:
        for count, entry in enumerate(intent.entries, 1):
            os.replace(entry.staged, entry.target)
            reached(f"renamed:{count}")
    except BaseException as error:
        intent.state = "aborted"
        if _clean_up_after_failure(intent, error, _save_and_restore):
            error.add_note("every file has its old content again")
        raise

    try:
        _sync_folders(intent)
        reached("synced")
        _remove_backups(intent)
        reached("cleaned")
        os.unlink(intent.record)
    except OSError as error:
        error.add_note(
            "every file already has its new content; the write's record stays "
            f"until recover_writes({intent.folder!r}) removes it"
        )
        raise


def _stage(intent: Intent, contents: list[bytes]) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for entry, content in zip(intent.entries, contents, strict=True):
        existing = lstat_or_none(entry.target)
        descriptor = os.open(entry.staged, flags, 0o666 if existing is None else 0o600)
        try:
            write_all(descriptor, content)
            apply_metadata(descriptor, existing, None)
            sync_file(descriptor)
            entry.new_inode = identity(os.fstat(descriptor))
        finally:
            os.close(descriptor)
        if existing is not None:
            # A hard link keeps the old version without copying it, and the
            # target stays in place for readers until the rename.
            os.link(entry.target, entry.backup, follow_symlinks=False)
            entry.old_inode = identity(os.lstat(entry.backup))


def _clean_up_after_failure(
    intent: Intent, error: BaseException, clean_up: Callable[[Intent], None]
) -> bool:
    """Run ``clean_up`` after ``error``; return whether it succeeded."""
    try:
        clean_up(intent)
        return True
    except (OSError, WriteRecoveryError) as cleanup_error:
        log.error(
            "cleaning up the failed multi-file write %s failed: %s",
            intent.record,
            cleanup_error,
        )
        error.add_note(
            f"cleaning up also failed ({cleanup_error}); recover_writes("
            f"{intent.folder!r}) finishes the write or undoes it"
        )
        return False


def _save_and_restore(intent: Intent) -> None:
    try:
        _save_record(intent)
    except OSError:
        # Recovery of the committed record also restores the backups,
        # because the staged files removed below are then missing.
        log.warning("cannot mark %s as aborted; restoring anyway", intent.record)
    _restore(intent)


def recover_records(folder: str, writes: str) -> tuple[int, int]:
    """Finish or undo every record in ``writes``; the caller holds the lock."""
    # The lock's holder is the only writer, so every temporary file here
    # belongs to a dead process.
    remove_orphan_temporaries(writes, any_process=True)
    intents = [
        _load_record(folder, writes, name)
        for name in os.listdir(writes)
        if name.endswith(_RECORD_SUFFIX)
    ]
    completed = rolled_back = 0
    for intent in sorted(intents, key=lambda intent: intent.created_ns):
        log.warning(
            "repairing multi-file write %s of process %d, left %s with %d files",
            intent.record,
            intent.pid,
            intent.state,
            len(intent.entries),
        )
        try:
            if _repair(intent):
                completed += 1
            else:
                rolled_back += 1
        except OSError as error:
            raise WriteRecoveryError(
                intent.record,
                f"repairing this interrupted write failed: {error}; fix the "
                f"cause, then call recover_writes({folder!r}) again",
            ) from error
    return completed, rolled_back


def _repair(intent: Intent) -> bool:
    """Finish or undo one interrupted write; return whether it was finished."""
    if intent.state == "prepared":
        _discard(intent)
        return False
    if intent.state == "committed" and _finish(intent):
        return True
    if intent.state == "committed":
        log.warning("a staged file of %s is missing; restoring", intent.record)
        intent.state = "aborted"
        _save_record(intent)
    _restore(intent)
    return False


def _discard(intent: Intent) -> None:
    """Undo a write before its commit point: no target was touched yet."""
    for entry in intent.entries:
        unlink_quietly(entry.staged)
        unlink_quietly(entry.backup)
    _sync_folders(intent)
    unlink_quietly(intent.record)


def _finish(intent: Intent) -> bool:
    """Rename the staged files that remain; return False if one is missing."""
    for count, entry in enumerate(intent.entries, 1):
        if identity_or_none(entry.target) == entry.new_inode:
            continue
        if identity_or_none(entry.staged) != entry.new_inode:
            return False
        os.replace(entry.staged, entry.target)
        reached(f"finished:{count}")
    _sync_folders(intent)
    _remove_backups(intent)
    os.unlink(intent.record)
    return True


def _restore(intent: Intent) -> None:
    """Give every target its old content back and remove the new files."""
    for count, entry in enumerate(intent.entries, 1):
        current = identity_or_none(entry.target)
        if entry.old_inode is None:
            if current is not None and current == entry.new_inode:
                os.unlink(entry.target)
        elif identity_or_none(entry.backup) == entry.old_inode:
            # When the target still is the old file, both names link to one
            # inode. Then rename does nothing and the backup name stays, so
            # it is unlinked here.
            os.replace(entry.backup, entry.target)
            unlink_quietly(entry.backup)
        elif current is not None and current == entry.new_inode:
            raise WriteRecoveryError(
                intent.record,
                f"the backup {entry.backup} of {entry.target} is missing, so its "
                "old content cannot be restored; restore the file by hand, then "
                "delete this record",
            )
        unlink_quietly(entry.staged)
        reached(f"restored:{count}")
    _sync_folders(intent)
    unlink_quietly(intent.record)


def _remove_backups(intent: Intent) -> None:
    for entry in intent.entries:
        unlink_quietly(entry.backup)
    # Durable before the record goes, or a crash could leave backups that
    # no record names.
    _sync_folders(intent)


def _sync_folders(intent: Intent) -> None:
    for folder in intent.folders():
        sync_folder(folder)


def _save_record(intent: Intent) -> None:
    def relative(path: str) -> str:
        return os.path.relpath(path, intent.folder)

    def inode(value: tuple[int, int] | None) -> list[int] | None:
        return None if value is None else list(value)

    document = {
        "version": _RECORD_VERSION,
        "state": intent.state,
        "pid": intent.pid,
        "created_ns": intent.created_ns,
        "files": [
            {
                "target": relative(entry.target),
                "staged": relative(entry.staged),
                "backup": relative(entry.backup),
                "old_inode": inode(entry.old_inode),
                "new_inode": inode(entry.new_inode),
            }
            for entry in intent.entries
        ],
    }
    content = json.dumps(document, indent=1).encode()
    # The caller's note states which files changed, and a note about the
    # record itself would mislead.
    with writing(
        intent.record,
        binary=True,
        mode=0o600,
        phase_prefix="record-",
        note_unsynced=False,
    ) as file:
        file.write(content)


def _load_record(folder: str, writes: str, name: str) -> Intent:
    record = os.path.join(writes, name)
    try:
        descriptor = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(descriptor, "rb") as file:
            document = json.loads(file.read())
        if document["version"] != _RECORD_VERSION:
            raise ValueError(f"unknown record version {document['version']!r}")
        state = document["state"]
        if state not in _STATES:
            raise ValueError(f"unknown state {state!r}")
        intent = Intent(
            folder,
            writes,
            name.removesuffix(_RECORD_SUFFIX),
            state,
            int(document["pid"]),
            int(document["created_ns"]),
        )
        for item in document["files"]:
            entry = Entry(
                _inside(folder, item["target"]),
                _inside(folder, item["staged"]),
                _inside(folder, item["backup"]),
                _inode(item["old_inode"]),
                _inode(item["new_inode"]),
            )
            if state != "prepared" and entry.new_inode is None:
                raise ValueError(f"a {state} record lacks the inode of a new file")
            intent.entries.append(entry)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise WriteRecoveryError(
            record,
            f"the record of an interrupted write cannot be read ({error}); check "
            "the files it names by hand, then delete it",
        ) from error
    return intent


def _inside(folder: str, relative: object) -> str:
    """Return the path of a record's entry, which must stay below ``folder``."""
    if (
        not isinstance(relative, str)
        or not relative
        or os.path.isabs(relative)
        or os.path.normpath(relative) != relative
        or relative.split(os.sep)[0] == os.pardir
    ):
        raise ValueError(f"path {relative!r} does not lie inside the folder")
    path = os.path.join(folder, relative)
    parent = os.path.dirname(path)
    if os.path.realpath(parent) != parent:
        raise ValueError(f"a folder on the path {path} is now a symbolic link")
    return path


def _inode(value: object) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(type(part) is int for part in value)
    ):
        raise ValueError(f"invalid inode {value!r}")
    return (value[0], value[1])


def writes_folder(folder: str, *, create: bool) -> str | None:
    """Return the hidden records folder after checking that only we control it."""
    path = os.path.join(folder, WRITES_FOLDER)
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if create:
            raise
        return None
    problem = None
    if stat.S_ISLNK(info.st_mode):
        problem = "is a symbolic link"
    elif not stat.S_ISDIR(info.st_mode):
        problem = "is not a folder"
    elif info.st_uid != os.geteuid():
        problem = f"belongs to user id {info.st_uid}, not to user id {os.geteuid()}"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = "can be written by other users"
    if problem is not None:
        raise WriteRecoveryError(
            path,
            f"it {problem}, so the records of multi-file writes cannot be kept "
            "there safely; remove it, or write as the user who owns it",
        )
    return path


@contextlib.contextmanager
def holding_lock(writes: str, timeout: float | None) -> Iterator[None]:
    # preserve_lock_file keeps one inode for every holder, which also rules
    # out filelock's fallback to a marker that a dead process leaves behind.
    lock = filelock.UnixFileLock(
        os.path.join(writes, _LOCK_NAME),
        timeout=-1 if timeout is None else timeout,
        mode=0o600,
        thread_local=False,
        preserve_lock_file=True,
        fallback_to_soft=False,
    )
    try:
        lock.acquire()
    except filelock.Timeout:
        # NOTE: the holder's pid is not recorded, so the message cannot name it.
        assert timeout is not None  # waiting without a timeout never times out
        raise LockTimeoutError(lock.lock_file, timeout, None) from None
    try:
        yield
    finally:
        lock.release()


def check_timeout(timeout: float | None) -> None:
    if timeout is None:
        return
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not timeout >= 0
    ):
        raise ConfigurationError(
            f"timeout must be a number of seconds >= 0 or None, not {timeout!r}"
        )
