"""Atomic file writes: one file, or several files that change together.

`atomic_write` and `atomic_writer` write one file. The data goes to a new
temporary file in the target's folder, which is flushed and fsynced, moved
over the target with `os.replace`, and then the folder is fsynced. A reader
sees the whole old file or the whole new one, and after a crash the target
is one of the two. On an error before the rename the target keeps its old
content, the temporary file is removed and the error is raised, never
retried.

`atomic_write_many` changes several files so that all of them change or
none does, also across a crash. Its records live in a hidden folder,
``.batchtools-writes``, inside the deepest folder that contains every
target (the common folder), and each call runs these phases:

1. Under a lock file in the hidden folder, repair any write that a dead
   process left there.
2. Save the record, state ``prepared``: the targets, and the names of the
   staged files and backups to come.
3. Stage each new version in a file next to its target and fsync it.
   Link each existing target to a backup name. Fsync the folders.
4. Save the record again, state ``committed``, with the inode of each
   staged file and backup. This is the commit point.
5. Rename each staged file over its target, then fsync the folders.
6. Remove the backups, fsync the folders, remove the record.

Recovery reads the record. A ``prepared`` write is undone by removing its
staged files and backups, because no target was touched yet. A
``committed`` write is finished by renaming the staged files that remain.
An ``aborted`` write, or a committed one whose staged file is gone, is
undone by renaming the backups back and removing the targets that did not
exist before. Recovery compares inodes to find which version each name
refers to, so every step can be repeated after another crash.

This is written by hand because no standard package writes several files
as one unit with crash recovery.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Literal, TextIO, TypeVar, overload

from batchtools._exceptions import ConfigurationError
from batchtools.fs._atomic_intent import (
    WRITES_FOLDER,
    check_timeout,
    holding_lock,
    plan,
    recover_records,
    write_together,
    writes_folder,
)
from batchtools.fs._atomic_io import (
    StrPath,
    check_target,
    encode,
    remove_orphan_temporaries,
    resolve_target,
    writing,
)

_PathT = TypeVar("_PathT", bound=StrPath)

__all__ = [
    "WriteRecovery",
    "atomic_write",
    "atomic_write_many",
    "atomic_writer",
    "recover_writes",
]


@dataclass(frozen=True, slots=True)
class WriteRecovery:
    """The counts of what one call of `recover_writes` repaired.

    Attributes:
        completed: Interrupted multi-file writes finished, so that each of
            their files has its new content.
        rolled_back: Interrupted multi-file writes undone, so that each of
            their files has its old content, and files they created are gone.
        temporary_files_removed: Temporary files of single-file writes whose
            process died, removed from the folder.
    """

    completed: int = 0
    rolled_back: int = 0
    temporary_files_removed: int = 0


def atomic_write(
    path: StrPath, data: bytes | str, *, mode: int | None = None, durable: bool = True
) -> None:
    """Replace the file at ``path`` with ``data`` in one step.

    Args:
        path: The file to write. A symbolic link is followed, so the file it
            points to is replaced and the link stays.
        data: The new content; a `str` is written as UTF-8.
        mode: Permission bits for the file. By default an existing file
            keeps its mode, and a new file gets ``0o666`` minus the umask.
        durable: Sync the file and its folder. ``False`` skips both syncs:
            a killed process still leaves the old or the new file, but a
            power loss may leave either one, or an empty file.

    Raises:
        OSError: Writing, syncing or renaming failed, and the file is
            unchanged. The exception is a failed sync of the folder after the
            rename: the new content is then in place, as a note on the error
            states.
        IsADirectoryError: ``path`` is a folder.
        TypeError: ``data`` is neither bytes nor str.
        ConfigurationError: ``mode`` is not a permission value.
    """
    content = encode(path, data)
    with writing(path, binary=True, mode=mode, durable=durable) as file:
        file.write(content)


@overload
def atomic_writer(
    path: StrPath,
    binary: Literal[True] = True,
    *,
    mode: int | None = None,
    durable: bool = True,
) -> contextlib.AbstractContextManager[BinaryIO]: ...


@overload
def atomic_writer(
    path: StrPath,
    binary: Literal[False],
    *,
    mode: int | None = None,
    durable: bool = True,
) -> contextlib.AbstractContextManager[TextIO]: ...


@overload
def atomic_writer(
    path: StrPath,
    binary: bool = True,
    *,
    mode: int | None = None,
    durable: bool = True,
) -> contextlib.AbstractContextManager[IO[Any]]: ...


def atomic_writer(
    path: StrPath,
    binary: bool = True,
    *,
    mode: int | None = None,
    durable: bool = True,
) -> contextlib.AbstractContextManager[IO[Any]]:
    """Return a context manager whose file replaces ``path`` when the block ends.

    The file is a new temporary file; text mode writes UTF-8. When the block
    ends normally, the file is synced and moved over ``path``. When the
    block raises, ``path`` is unchanged and the temporary file is removed.
    Leave closing the file to the context manager::

        with atomic_writer("report.csv", binary=False) as file:
            file.write("key,value\\n")

    Args:
        path: The file to write; a symbolic link is followed.
        binary: Yield a binary file (the default) or a text file.
        mode: Permission bits for the file, as in `atomic_write`.
        durable: Sync the file and its folder, as in `atomic_write`.

    Raises:
        OSError: As in `atomic_write`, when the block ends.
        IsADirectoryError: ``path`` is a folder.
        ConfigurationError: ``mode`` is not a permission value.
    """
    return writing(path, binary=binary, mode=mode, durable=durable)


def atomic_write_many(
    files: Mapping[_PathT, bytes | str], *, timeout: float | None = None
) -> None:
    """Write several files so that all of them change or none does.

    The guarantee also covers a crash of the process or the machine: the
    next `atomic_write_many` on the same common folder, or `recover_writes`
    on it, finishes or undoes the interrupted write first. Readers are not
    isolated, because during the rename phase they may see some files new
    and others still old. Two calls on the same common folder take turns.

    Args:
        files: The new content of each file; a `str` is written as UTF-8.
            Symbolic links are followed, as in `atomic_write`.
        timeout: Seconds to wait while another call holds the common
            folder's lock; `None` waits as long as it takes.

    Raises:
        OSError: Staging or renaming failed, and every file has its old
            content. An error raised after the commit point, while folders
            are synced or backups removed, leaves every file new, as a note
            on it states.
        WriteRecoveryError: An interrupted write found in the common folder
            cannot be repaired, or its hidden folder is unsafe to use.
        LockTimeoutError: Another call held the folder's lock for more than
            ``timeout``.
        ConfigurationError: Two paths name the same file, or a path lies
            inside a hidden records folder.
        TypeError: A value is neither bytes nor str.
    """
    targets, contents = _collect(files)
    check_timeout(timeout)
    if not targets:
        return

    folder = os.path.commonpath([os.path.dirname(target) for target in targets])
    _check_records_folder(folder, list(files))
    try:
        writes = writes_folder(folder, create=True)
    except OSError as error:
        error.add_note(
            f"atomic_write_many keeps its records in {folder}, the folder that "
            "contains every file written"
        )
        raise
    assert writes is not None  # created above
    with holding_lock(writes, timeout):
        recover_records(folder, writes)
        write_together(plan(folder, writes, targets), contents)


def recover_writes(folder: StrPath, *, timeout: float | None = None) -> WriteRecovery:
    """Repair the writes that a crashed or killed process left in ``folder``.

    Interrupted multi-file writes recorded in ``folder``'s hidden records
    folder are finished or undone, so each one ends all new or all old.
    Temporary files that `atomic_write` left directly in ``folder`` are
    removed once their process is gone. Subfolders are not searched: pass
    the common folder of the interrupted write.

    Args:
        folder: The folder to repair.
        timeout: Seconds to wait while an `atomic_write_many` in the folder
            holds its lock; `None` waits as long as it takes. A write in
            progress is never touched.

    Returns:
        What was repaired.

    Raises:
        WriteRecoveryError: A record is damaged or cannot be carried out,
            or the hidden records folder is unsafe to use.
        LockTimeoutError: A write held the folder's lock for more than
            ``timeout``.
        NotADirectoryError: ``folder`` is not a folder.
    """
    check_timeout(timeout)
    root = os.path.realpath(folder)
    if not os.path.isdir(root):
        raise NotADirectoryError(
            errno.ENOTDIR, "recover_writes needs an existing folder", os.fspath(folder)
        )
    removed = remove_orphan_temporaries(root, any_process=False)
    writes = writes_folder(root, create=False)
    if writes is None:
        return WriteRecovery(temporary_files_removed=removed)
    with holding_lock(writes, timeout):
        completed, rolled_back = recover_records(root, writes)
    return WriteRecovery(completed, rolled_back, removed)


def _check_records_folder(folder: str, given: list[Any]) -> None:
    """Reject a records folder that `recover_writes` on the named folder misses.

    The records live in the folder that contains every resolved target. When a
    symbolic link takes a target out of the folder the caller named, or the
    targets share only the root, a recovery of the caller's folder would not
    find them.
    """
    named = os.path.commonpath(
        [os.path.dirname(os.path.abspath(os.fspath(path))) for path in given]
    )
    if folder == os.path.dirname(folder):
        raise ConfigurationError(
            f"the files given to atomic_write_many share no folder but {folder}, "
            "where the records of the write would be kept; write files of one "
            "folder tree together"
        )
    if os.path.realpath(named) != folder:
        raise ConfigurationError(
            f"the files given to atomic_write_many lie under {named}, but through "
            f"symbolic links they resolve to files under {folder}, where the "
            "records of the write would be kept and recover_writes on "
            f"{named} would not find them; give the resolved paths"
        )


def _collect(files: Mapping[_PathT, bytes | str]) -> tuple[list[str], list[bytes]]:
    """Return the resolved targets and their contents, after checking both."""
    targets: list[str] = []
    contents: list[bytes] = []
    first_path_of: dict[str, str] = {}
    for given_path, data in files.items():
        path: StrPath = given_path
        target = resolve_target(path)
        if target in first_path_of:
            raise ConfigurationError(
                f"{first_path_of[target]!r} and {os.fspath(path)!r} name the same file "
                f"{target}; give each file once"
            )
        if WRITES_FOLDER in target.split(os.sep):
            raise ConfigurationError(
                f"{os.fspath(path)!r} lies inside a {WRITES_FOLDER} folder, which "
                "keeps the records of multi-file writes; write it elsewhere"
            )
        check_target(target)
        first_path_of[target] = os.fspath(path)
        targets.append(target)
        contents.append(encode(path, data))
    return targets, contents
