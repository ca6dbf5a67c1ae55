"""Where the CLI's items come from: ``:::`` arguments, ``::::`` files, stdin.

Every item is a tuple of byte strings, one per input source (or per column
with ``--colsep``), so that arguments that are not valid UTF-8 reach the
command byte for byte. Several sources combine as their cartesian product,
the first one varying slowest, as in GNU parallel. The first source is read
lazily; the others are read into memory, since each of their items is used
once per item of the first.
"""

from __future__ import annotations

import base64
import glob
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from batchtools._exceptions import ConfigurationError

ARGS_MARK = ":::"
FILES_MARK = "::::"
_READ_SIZE = 1 << 16


@dataclass(slots=True)
class Source:
    """One input source.

    Attributes:
        kind: ``args``, ``file``, ``glob`` or ``stdin``.
        values: The arguments, for ``args``.
        path: The file for ``file``, the pattern for ``glob``.
    """

    kind: str
    values: list[bytes] = field(default_factory=list)
    path: str | None = None

    def to_spec(self) -> dict[str, Any]:
        """Describe the source for the journal, so a resume can read it again."""
        if self.kind == "args":
            return {
                "kind": "args",
                "values": [base64.b64encode(v).decode("ascii") for v in self.values],
            }
        return {"kind": self.kind, "path": self.path}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Source:
        """Rebuild a source described by `to_spec`."""
        if spec["kind"] == "args":
            return cls("args", [base64.b64decode(v) for v in spec["values"]])
        return cls(spec["kind"], path=spec.get("path"))


@dataclass(slots=True)
class InputSpec:
    """All input sources of a run and how lines are split.

    Attributes:
        sources: The sources, combined as a cartesian product.
        null: Items are separated by NUL bytes instead of newlines.
        colsep: A regular expression that splits each line into columns.
    """

    sources: list[Source]
    null: bool = False
    colsep: str | None = None

    def to_spec(self) -> dict[str, Any]:
        """Describe the input for the journal."""
        return {
            "sources": [s.to_spec() for s in self.sources],
            "null": self.null,
            "colsep": self.colsep,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> InputSpec:
        """Rebuild an input described by `to_spec`."""
        return cls(
            [Source.from_spec(s) for s in spec["sources"]],
            null=spec.get("null", False),
            colsep=spec.get("colsep"),
        )

    @property
    def reads_stdin(self) -> bool:
        """Whether the items come from standard input."""
        return any(s.kind == "stdin" for s in self.sources)

    def check(self) -> None:
        """Check that every file can be opened, before anything runs.

        Raises:
            ConfigurationError: There is no source, a file is missing or
                unreadable, or the column separator is not a valid regular
                expression.
        """
        if not self.sources:
            raise ConfigurationError(
                "the input has no source: give items after ':::', files after "
                "'::::', or items on standard input"
            )
        if self.colsep is not None:
            try:
                re.compile(self.colsep.encode("utf-8", "surrogateescape"))
            except re.error as error:
                raise ConfigurationError(
                    f"--colsep {self.colsep!r} is not a valid regular expression: "
                    f"{error}"
                ) from None
            except (OverflowError, RecursionError, ValueError):
                raise ConfigurationError(
                    f"--colsep {self.colsep!r} has a repetition count too large or "
                    "groups nested too deeply for Python's re; simplify it"
                ) from None
        for source in self.sources:
            if source.kind == "file":
                assert source.path is not None
                try:
                    with open(source.path, "rb"):
                        pass
                except OSError as error:
                    raise ConfigurationError(
                        f"cannot read the input file {source.path!r}: {error.strerror}"
                    ) from None
                except ValueError:  # a NUL byte, which no path can contain
                    raise ConfigurationError(
                        f"cannot read the input file {source.path!r}: the name "
                        "contains a NUL byte"
                    ) from None

    def total(self) -> int | None:
        """Return the number of items if it is known without reading files."""
        count = 1
        for source in self.sources:
            if source.kind != "args":
                return None
            count *= len(source.values)
        return count

    def count_in_files(self) -> int | None:
        """Count the items by reading the files once; ``None`` for stdin."""
        count = 1
        for source in self.sources:
            if source.kind == "args":
                count *= len(source.values)
            elif source.kind == "file":
                assert source.path is not None
                count *= _count_records(source.path, self.null)
            else:
                return None
        return count

    def items(self, stdin: BinaryIO | None = None) -> Iterator[tuple[bytes, ...]]:
        """Yield the items, reading the first source lazily."""
        groups = [self._read(source, stdin) for source in self.sources]
        if len(groups) == 1:
            yield from groups[0]
            return
        rest = [list(group) for group in groups[1:]]
        for first in groups[0]:
            yield from _product(first, rest)

    def _read(
        self, source: Source, stdin: BinaryIO | None
    ) -> Iterator[tuple[bytes, ...]]:
        if source.kind == "args":
            return ((value,) for value in source.values)
        if source.kind == "file":
            assert source.path is not None
            return self._split(_file_records(source.path, self.null))
        if source.kind == "glob":
            assert source.path is not None
            paths = glob.iglob(source.path, recursive=True)
            return ((os.fsencode(path),) for path in sorted(paths) if _exists(path))
        stream = stdin if stdin is not None else sys.stdin.buffer
        return self._split(_records(stream, self.null))

    def _split(self, records: Iterable[bytes]) -> Iterator[tuple[bytes, ...]]:
        if self.colsep is None:
            return ((record,) for record in records)
        pattern = re.compile(self.colsep.encode("utf-8", "surrogateescape"))
        return (tuple(pattern.split(record)) for record in records)


def _exists(path: str) -> bool:
    # With recursive=True, a pattern ending in "/**" under a folder that
    # does not exist yields that folder with a trailing slash (CPython 3.11).
    return not path.endswith(os.sep) or os.path.isdir(path)


def _product(
    first: tuple[bytes, ...], rest: Sequence[list[tuple[bytes, ...]]]
) -> Iterator[tuple[bytes, ...]]:
    if not rest:
        yield first
        return
    for value in rest[0]:
        yield from _product(first + value, rest[1:])


def _file_records(path: str, null: bool) -> Iterator[bytes]:
    with open(path, "rb") as stream:
        yield from _records(stream, null)


def _count_records(path: str, null: bool) -> int:
    separator = b"\0" if null else b"\n"
    count = 0
    last = b""
    with open(path, "rb") as stream:
        while chunk := stream.read(_READ_SIZE):
            count += chunk.count(separator)
            last = chunk[-1:]
    return count + (1 if last and last != separator else 0)


def _records(stream: BinaryIO, null: bool) -> Iterator[bytes]:
    """Yield newline- or NUL-terminated records; a last unterminated one too."""
    separator = b"\0" if null else b"\n"
    pending = b""
    while True:
        chunk = (
            stream.read1(_READ_SIZE)
            if hasattr(stream, "read1")
            else stream.read(_READ_SIZE)
        )
        if not chunk:
            break
        pending += chunk
        *records, pending = pending.split(separator)
        yield from records
    if pending:
        yield pending


def split_command(words: Sequence[str]) -> tuple[list[str], InputSpec | None]:
    """Split ``COMMAND [ARG...] [::: ITEM...]... [:::: FILE...]`` into parts.

    Returns:
        The command template's words, and the input sources after the
        first ``:::`` or ``::::`` (``None`` when there is none, meaning
        standard input).

    Raises:
        ConfigurationError: A ``:::`` or ``::::`` has nothing after it.
    """
    command: list[str] = []
    sources: list[Source] = []
    mark: str | None = None
    after_mark = 0
    for word in [*words, None]:
        if word is None or word in (ARGS_MARK, FILES_MARK):
            if mark is not None and after_mark == 0:
                what = "item" if mark == ARGS_MARK else "file"
                raise ConfigurationError(
                    f"'{mark}' must be followed by at least one {what}"
                )
            if word is None:
                break
            mark, after_mark = word, 0
            if word == ARGS_MARK:
                sources.append(Source("args"))
            continue
        after_mark += 1
        if mark is None:
            command.append(word)
        elif mark == ARGS_MARK:
            sources[-1].values.append(os.fsencode(word))
        else:
            sources.append(Source("file", path=os.path.abspath(word)))
    if mark is None:
        return command, None
    return command, InputSpec(sources)
