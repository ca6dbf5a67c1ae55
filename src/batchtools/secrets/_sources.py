"""Reading a secret's value from its source: ``env:``, ``file:`` or ``keyring:``.

A source is text of the form ``KIND:ARGUMENT``:

* ``env:VAR`` reads the environment variable ``VAR`` of this process.
* ``file:PATH`` reads a UTF-8 file, without one trailing newline. A
  symlink is followed, because secret mounts (Docker, Kubernetes) are made
  of symlinks; what is checked is the file it points to. A file that its
  group or others may read is used, with a warning.
* ``keyring:SERVICE/USER`` reads the system keyring through the optional
  ``keyring`` package. The last ``/`` separates the two, so a service name
  may contain ``/``.
"""

from __future__ import annotations

import importlib
import logging
import os
import stat
from collections.abc import Mapping

from batchtools._exceptions import ConfigurationError, SecretMissingError

log = logging.getLogger("batchtools.secrets")

KINDS = ("env", "file", "keyring")

MAX_FILE_SIZE = 64 * 1024
"""Bytes a secret file may have; a larger file is most likely the wrong one."""


def check_source(name: str, source: str) -> tuple[str, str]:
    """Split ``source`` into its kind and argument.

    Raises:
        ConfigurationError: The source has no known kind or no argument.
    """
    kind, colon, argument = source.partition(":")
    if not colon or kind not in KINDS:
        raise ConfigurationError(
            f"secret {name!r}: invalid source {source!r}; use env:VAR, file:PATH "
            "or keyring:SERVICE/USER"
        )
    if not argument:
        raise ConfigurationError(
            f"secret {name!r}: the source {source!r} names no {_argument_name(kind)}"
        )
    if kind == "keyring" and not _split_keyring(argument)[0]:
        raise ConfigurationError(
            f"secret {name!r}: the source {source!r} must have the form "
            "keyring:SERVICE/USER"
        )
    return kind, argument


def _argument_name(kind: str) -> str:
    return {"env": "variable", "file": "file", "keyring": "service and user"}[kind]


def read_source(
    name: str, source: str, environ: Mapping[str, str] | None = None
) -> str:
    """Return the value that ``source`` holds for the secret ``name``.

    Raises:
        SecretMissingError: The source has no value (an unset or empty
            variable, a missing or empty file, no keyring entry).
        ConfigurationError: The source is invalid, the file is not UTF-8
            text or too large, or the keyring package is not installed.
    """
    kind, argument = check_source(name, source)
    if kind == "env":
        return _read_environment(name, source, argument, environ)
    if kind == "file":
        return _read_file(name, source, argument)
    return _read_keyring(name, source, argument)


def _read_environment(
    name: str, source: str, variable: str, environ: Mapping[str, str] | None
) -> str:
    value = (os.environ if environ is None else environ).get(variable)
    if value is None:
        raise SecretMissingError(
            name,
            source,
            f"the environment variable {variable} is not set; set it before the "
            "run starts",
        )
    if not value:
        raise SecretMissingError(
            name, source, f"the environment variable {variable} is empty"
        )
    return value


def _read_file(name: str, source: str, argument: str) -> str:
    path = os.path.expanduser(argument)
    try:
        # Non-blocking, so that a FIFO put in place of the file cannot hang
        # the run; it is rejected below as not a regular file.
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SecretMissingError(
            name, source, f"the file {path} does not exist"
        ) from None
    except OSError as error:
        raise SecretMissingError(
            name, source, f"the file {path} cannot be opened: {error.strerror}"
        ) from None
    try:
        data = _read_opened(name, source, path, descriptor)
    finally:
        os.close(descriptor)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"secret {name!r} ({source}): the file is not UTF-8 text"
        ) from None
    text = _strip_newline(text)
    if not text:
        raise SecretMissingError(name, source, f"the file {path} is empty")
    return text


def _read_opened(name: str, source: str, path: str, descriptor: int) -> bytes:
    """Check the opened secret file, then return its bytes."""
    info = os.fstat(descriptor)
    if not stat.S_ISREG(info.st_mode):
        raise SecretMissingError(
            name, source, f"{path} is not a regular file; give the file itself"
        )
    if info.st_size > MAX_FILE_SIZE:
        raise ConfigurationError(
            f"secret {name!r} ({source}): the file has {info.st_size} bytes, "
            f"more than the {MAX_FILE_SIZE // 1024} KiB a secret file may "
            "have; check that the path names the secret's file"
        )
    if info.st_mode & 0o077:
        log.warning(
            "secret file %s can be read by users other than its owner (mode "
            "%o); restrict it with chmod 600",
            path,
            stat.S_IMODE(info.st_mode),
        )
    chunks = []
    size = 0
    # A file that grows while it is read stops at the limit.
    while size <= MAX_FILE_SIZE:
        chunk = os.read(descriptor, MAX_FILE_SIZE + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > MAX_FILE_SIZE:
        raise ConfigurationError(
            f"secret {name!r} ({source}): the file grew past "
            f"{MAX_FILE_SIZE // 1024} KiB while it was read"
        )
    return b"".join(chunks)


def _strip_newline(text: str) -> str:
    """Remove one line ending, as editors and ``echo`` add, from the end of ``text``."""
    if text.endswith("\r\n"):
        return text[:-2]
    if text.endswith("\n"):
        return text[:-1]
    return text


def _split_keyring(argument: str) -> tuple[str, str]:
    service, slash, user = argument.rpartition("/")
    if not slash or not service or not user:
        return "", ""
    return service, user


def _read_keyring(name: str, source: str, argument: str) -> str:
    service, user = _split_keyring(argument)
    try:
        keyring = importlib.import_module("keyring")
    except ImportError:
        raise ConfigurationError(
            f"secret {name!r} ({source}) needs the keyring package, which is not "
            "installed; install it with 'pip install keyring' or use an env: or "
            "file: source"
        ) from None
    try:
        value = keyring.get_password(service, user)
    except Exception as error:
        # keyring raises its own KeyringError types, and backends raise more.
        raise SecretMissingError(
            name, source, f"the keyring failed: {type(error).__name__}: {error}"
        ) from None
    if not value:
        raise SecretMissingError(
            name,
            source,
            f"the keyring has no password for user {user!r} of service {service!r}",
        )
    if not isinstance(value, str):
        raise ConfigurationError(
            f"secret {name!r} ({source}): the keyring returned "
            f"{type(value).__name__}, not text"
        )
    return value
