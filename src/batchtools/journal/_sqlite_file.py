"""Opening the private SQLite files beside the journal: the cache and the state store.

Each file is created by this process with mode 0600 on a local disk, set
up with its pragmas, and checked to be the kind of file its owner expects,
before anything runs. ``what`` names the file in messages, such as
``"result cache"``.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from batchtools._exceptions import ConfigurationError
from batchtools.journal._journal import _NETWORK_FILESYSTEMS, _filesystem_type


def path_error(path: Path, what: str, reason: str) -> ConfigurationError:
    """Return the error for a path that cannot hold the file."""
    return ConfigurationError(f"invalid {what} path '{path}': {reason}")


def open_error(path: Path, what: str, error: sqlite3.Error) -> ConfigurationError:
    """Return the error for a file that SQLite could not open or set up."""
    text = str(error)
    if "not a database" in text or "malformed" in text:
        return path_error(
            path, what, f"it is not a usable SQLite file ({text}); give another path"
        )
    if "locked" in text or "busy" in text:
        return path_error(
            path,
            what,
            f"another process holds it ({text}); wait for that process, or give "
            "this run another file",
        )
    return path_error(
        path,
        what,
        f"opening it failed ({text}); the file and its folder must be writable, "
        "because SQLite adds -wal and -shm files next to it",
    )


def check_path(path: Path, what: str, example: str) -> None:
    """Reject a path that is a link, a folder or anything but a regular file.

    Args:
        path: The file's path; a missing file is fine.
        what: What messages call the file.
        example: A file name to suggest inside a folder given by mistake.

    Raises:
        ConfigurationError: The path cannot hold the file.
    """
    try:
        info = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        # A missing file, or a folder that is a file: creating the file
        # reports the second case.
        return
    except OSError as error:
        raise path_error(path, what, f"it cannot be read ({error.strerror})") from error
    if stat.S_ISLNK(info.st_mode):
        raise path_error(
            path, what, "it is a symbolic link; give the real file's path instead"
        )
    if stat.S_ISDIR(info.st_mode):
        raise path_error(
            path,
            what,
            "it is a directory; give the path of a file inside it, such as "
            f"'{path / example}'",
        )
    if not stat.S_ISREG(info.st_mode):
        raise path_error(path, what, "it is not a regular file; give a file path")


def create_file(path: Path, what: str, *, make_folder: bool) -> None:
    """Create the file, readable by its owner only, on a local disk.

    Raises:
        ConfigurationError: The folder cannot be made, it is on a network
            filesystem, or the file cannot be opened for writing.
    """
    if make_folder:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise path_error(
                path,
                what,
                f"its folder cannot be created ({error.strerror}); give a path in "
                "a folder you can write to",
            ) from error
    fstype = _filesystem_type(path.parent)
    if fstype in _NETWORK_FILESYSTEMS:
        raise path_error(
            path,
            what,
            f"it is on a network filesystem ({fstype}), where SQLite's WAL mode "
            f"does not work; put the {what} on a local disk",
        )
    # Open it here rather than leave it to SQLite, whose error for a file
    # it cannot write is a bare "unable to open database file".
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    except OSError as error:
        raise path_error(
            path,
            what,
            f"it cannot be opened for writing ({error.strerror}); give a path in "
            "a folder you can write to",
        ) from error
    os.close(descriptor)


def prepare(
    path: Path,
    conn: sqlite3.Connection,
    what: str,
    pragmas: Iterable[str],
    check_identity: Callable[[Path, sqlite3.Connection], None],
) -> None:
    """Apply the pragmas, then create the schema or check the file's identity.

    Raises:
        ConfigurationError: SQLite failed, or ``check_identity`` rejected the
            file.
    """
    try:
        for pragma in pragmas:
            conn.execute(pragma)
        conn.execute("BEGIN IMMEDIATE")
        try:
            check_identity(path, conn)
            conn.execute("COMMIT")
        except BaseException:
            roll_back(conn)
            raise
    except sqlite3.Error as error:
        raise open_error(path, what, error) from error


def roll_back(conn: sqlite3.Connection) -> None:
    """Roll back the open transaction, if SQLite has not already done so."""
    # SQLite may already have rolled back, for example after a disk full error.
    if conn.in_transaction:
        conn.execute("ROLLBACK")
