"""Single-file atomic writes, and the file helpers that multi-file writes share.

A new version is written to a temporary file created next to its target.
The file is flushed, fsynced and moved over the target with `os.replace`,
and then the folder is fsynced. Temporary names carry the writer's pid and a random
token, and the writer holds an ``flock`` on its file while it writes, so
`remove_orphan_temporaries` can tell the files of dead writers from the
files of live ones.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from batchtools._exceptions import ConfigurationError

log = logging.getLogger("batchtools.fs")

StrPath = str | os.PathLike[str]
NameSource = Callable[[str], str]
"""Returns a temporary file name for the target's file name."""

ORPHAN_AGE = 3600.0
"""Seconds after which an unlocked temporary file counts as abandoned."""
TEMPORARY_SUFFIX = ".batchtools-tmp"

# Part of the target's name kept in helper names. With the suffixes it stays
# under the 255-byte name limit of common file systems.
_STEM_BYTES = 120
_NAME_ATTEMPTS = 100
_TEMPORARY_NAME = re.compile(
    r"\..*\.([0-9]+)\.[0-9a-f]{16}" + re.escape(TEMPORARY_SUFFIX), re.DOTALL
)

phase_hook: Callable[[str], None] | None = None
"""Called with each phase a write reaches; crash tests use it to stop there."""


def reached(phase: str) -> None:
    if phase_hook is not None:
        phase_hook(phase)


def random_temporary_name(target_name: str) -> str:
    # The pid lets recovery tell the files of dead writers from live ones.
    token = secrets.token_hex(8)
    return f".{stem(target_name)}.{os.getpid()}.{token}{TEMPORARY_SUFFIX}"


@contextlib.contextmanager
def writing(
    path: StrPath,
    *,
    binary: bool,
    mode: int | None,
    name_source: NameSource = random_temporary_name,
    phase_prefix: str = "",
    note_unsynced: bool = True,
    durable: bool = True,
) -> Iterator[IO[Any]]:
    """Yield a file whose content replaces ``path`` when the block ends.

    With ``note_unsynced``, the error of a failed folder sync gets a note
    stating that the target already has its new content. Without
    ``durable``, neither the file nor the folder is synced.
    """
    _check_mode(mode)
    target = resolve_target(path)
    existing = check_target(target)
    folder, name = os.path.split(target)
    # A file replacing an existing one starts private, so its content is
    # not readable by more users than the old file while it is written.
    created_mode = 0o666 if existing is None and mode is None else 0o600
    descriptor, temporary = _create_temporary(folder, name, name_source, created_mode)
    try:
        file: IO[Any] = (
            open(descriptor, "wb")  # noqa: SIM115 - closed below or on error
            if binary
            else open(descriptor, "w", encoding="utf-8")  # noqa: SIM115
        )
    except BaseException:
        os.close(descriptor)
        unlink_quietly(temporary)
        raise
    try:
        yield file
        if file.closed:
            raise ValueError(
                f"the file for {target} was closed inside the with block, so it "
                "cannot be synced; leave closing it to atomic_writer"
            )
        file.flush()
        apply_metadata(file.fileno(), existing, mode)
        if durable:
            sync_file(file.fileno())
        file.close()
        reached(phase_prefix + "written")
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError, ValueError):
            file.close()
        unlink_quietly(temporary)
        raise
    reached(phase_prefix + "replaced")
    if not durable:
        return
    try:
        sync_folder(folder)
    except OSError as error:
        if note_unsynced:
            error.add_note(
                f"{target} already has its new content, but the rename may not "
                "survive a crash"
            )
        raise


def _create_temporary(
    folder: str, target_name: str, name_source: NameSource, created_mode: int
) -> tuple[int, str]:
    # O_EXCL and O_NOFOLLOW: a file or symbolic link planted at the chosen
    # name makes the open fail, so the write cannot be redirected.
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(_NAME_ATTEMPTS):
        temporary = os.path.join(folder, name_source(target_name))
        try:
            descriptor = os.open(temporary, flags, created_mode)
        except FileExistsError:
            log.debug("temporary name %s is taken, trying another", temporary)
            continue
        # Held until the file is closed, so recovery can tell it is in use.
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return descriptor, temporary
    raise FileExistsError(
        errno.EEXIST,
        f"found no free temporary name for {target_name!r} after "
        f"{_NAME_ATTEMPTS} tries; remove the files named "
        f"'.{stem(target_name)}.*{TEMPORARY_SUFFIX}' from the folder",
        folder,
    )


def apply_metadata(
    descriptor: int, existing: os.stat_result | None, mode: int | None
) -> None:
    """Give a new version the owner, group and mode of the file it replaces."""
    if existing is not None:
        # Before the mode, because changing the owner clears set-id bits.
        _keep_owner(descriptor, existing)
    if mode is not None:
        os.fchmod(descriptor, mode)
    elif existing is not None:
        os.fchmod(descriptor, stat.S_IMODE(existing.st_mode))


def _keep_owner(descriptor: int, existing: os.stat_result) -> None:
    current = os.fstat(descriptor)
    if (current.st_uid, current.st_gid) == (existing.st_uid, existing.st_gid):
        return
    # Only root may give a file away, but other users may still keep the group.
    for uid in (existing.st_uid, -1):
        try:
            os.fchown(descriptor, uid, existing.st_gid)
            return
        except PermissionError:
            continue
    log.debug("cannot keep owner %d:%d", existing.st_uid, existing.st_gid)


def remove_orphan_temporaries(folder: str, *, any_process: bool) -> int:
    """Remove the temporary files of writers that died; return how many."""
    removed = 0
    now = time.time()
    for name in os.listdir(folder):
        match = _TEMPORARY_NAME.fullmatch(name)
        if match is not None and _remove_if_orphan(
            os.path.join(folder, name), int(match[1]), now, any_process
        ):
            removed += 1
    if removed:
        log.info("removed %d abandoned temporary files from %s", removed, folder)
    return removed


def _remove_if_orphan(path: str, pid: int, now: float, any_process: bool) -> bool:
    try:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        descriptor = os.open(path, flags)
    except OSError:
        return False  # gone, or a symbolic link, which no writer creates
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode):
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # its writer is still writing
        except OSError:
            return False  # flock fails here, so a live writer cannot be told apart
        # A writer locks its file just after creating it and unlocks it just
        # before the rename. In those two short gaps only its live pid
        # protects it, which fails for a pid of another host or PID
        # namespace: the writer's rename then fails and its target stays
        # old. The age lets the orphan of a reused pid go eventually.
        if (
            not any_process
            and _process_exists(pid)
            and now - info.st_mtime < ORPHAN_AGE
        ):
            return False
        if not os.path.samestat(os.lstat(path), info):
            return False
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    finally:
        os.close(descriptor)


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True  # it exists but belongs to another user
    return True


def resolve_target(path: StrPath) -> str:
    text = os.fspath(path)
    if not isinstance(text, str) or not text:
        raise ConfigurationError(f"a file path must be a non-empty str, not {path!r}")
    resolved = os.path.realpath(text)
    if os.path.islink(resolved):
        raise OSError(errno.ELOOP, "the symbolic links form a loop", text)
    return resolved


def check_target(target: str) -> os.stat_result | None:
    """Return the target's status, or None when it does not exist yet."""
    existing = lstat_or_none(target)
    if existing is None or stat.S_ISREG(existing.st_mode):
        return existing
    if stat.S_ISDIR(existing.st_mode):
        raise IsADirectoryError(errno.EISDIR, "cannot replace a folder", target)
    raise OSError(
        errno.EINVAL,
        "not a regular file, and atomic writes replace only regular files",
        target,
    )


def _check_mode(mode: int | None) -> None:
    if mode is None:
        return
    if type(mode) is not int or not 0 <= mode <= 0o7777:
        raise ConfigurationError(
            f"mode must be permission bits from 0 to 0o7777, such as 0o644, "
            f"not {mode!r}"
        )


def encode(path: StrPath, data: object) -> bytes:
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(
        f"the content for {os.fspath(path)!r} must be bytes or str, "
        f"not {type(data).__name__}"
    )


def stem(name: str) -> str:
    raw = os.fsencode(name)
    if len(raw) <= _STEM_BYTES:
        return name
    # surrogateescape turns a multibyte character cut in half back into
    # the same bytes when the name is encoded again.
    return os.fsdecode(raw[:_STEM_BYTES])


def write_all(descriptor: int, content: bytes) -> None:
    view = memoryview(content)
    while view:
        view = view[os.write(descriptor, view) :]


def sync_file(descriptor: int) -> None:
    # On macOS fsync leaves the data in the drive's cache, and F_FULLFSYNC
    # flushes it where the file system supports it (macOS fsync(2) page).
    full_sync = getattr(fcntl, "F_FULLFSYNC", None)
    if full_sync is not None:
        try:
            fcntl.fcntl(descriptor, full_sync)
            return
        except OSError:
            pass
    os.fsync(descriptor)


def sync_folder(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sync_file(descriptor)
    except OSError as error:
        # EINVAL: the file system cannot sync a folder (some network and
        # FUSE file systems), so there is nothing more to do.
        if error.errno != errno.EINVAL:
            raise
    finally:
        os.close(descriptor)


def identity(info: os.stat_result) -> tuple[int, int]:
    return (info.st_dev, info.st_ino)


def lstat_or_none(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def identity_or_none(path: str) -> tuple[int, int] | None:
    info = lstat_or_none(path)
    return None if info is None else identity(info)


def unlink_quietly(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
