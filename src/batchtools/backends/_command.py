"""Command templates with GNU parallel's replacement strings.

A template is parsed once and rendered once per attempt into an argv of
bytes. Replacement strings are substituted inside each argument, so a
value stays one argument whatever it contains: spaces, newlines, quotes,
``$(...)``, globs, a leading ``-`` or bytes that are not UTF-8. No shell
parses the value unless the template is a shell script (``shell=True``),
and then every value is quoted for ``/bin/sh``.

Replacement strings (compared with GNU parallel 20221122):

=========  =================================================================
``{}``     The item. A tuple item's columns are joined by one space.
``{.}``    The item without its extension.
``{/}``    The basename.
``{//}``   The dirname.
``{/.}``   The basename without its extension.
``{#}``    The sequence number, from 1 (``Context.seq + 1``).
``{%}``    The job slot, from 1 to the concurrency; two commands that run at
           the same time never share one.
``{n}``    Column n of the item, from 1; ``{-n}`` counts from the last one.
           In a batch, item n of the batch instead.
``{n.}``   ``{n}`` without extension; likewise ``{n/}``, ``{n//}`` and
           ``{n/.}``.
=========  =================================================================

A path transform applies to each column, and the results are joined by a
space. The rules, and where they differ from GNU parallel:

* The extension is the last ``.`` of the final path component and what
  follows it, as in `os.path.splitext`: a component that starts with dots
  keeps them, so ``.bashrc`` and ``dir/.bashrc`` have no extension (GNU
  parallel makes ``{.}`` of ``.bashrc`` empty), and ``.config.json``
  becomes ``.config``. A path that ends in ``/`` has no extension.
* ``{/}`` and ``{//}`` follow POSIX basename(1) and dirname(1), trailing
  slashes ignored: ``{/}`` of ``dir/`` is ``dir`` and of ``/`` is ``/``
  (GNU parallel gives an empty string for both). ``{//}`` gives ``.`` for
  a name without a slash, as GNU parallel does.
* ``{/.}`` is ``{.}`` applied to ``{/}``.
* A whole-word ``{}`` in a batch (``-n``) expands to one argument per
  item, as in GNU parallel; inside a larger word the items are joined by
  spaces into one argument (GNU parallel puts the prefix on the first item
  and the suffix on the last instead). A whole-word ``{}`` of a tuple item
  is one argument, its columns joined by a space (GNU parallel passes each
  column as its own argument).
* ``{0}`` is rejected when the template is parsed, and ``{n}`` beyond the
  item's columns is a `TemplateError` when it is rendered (GNU parallel
  substitutes an empty string). ``{n}`` beyond the end of a short last
  batch is empty, as in GNU parallel.
* Any other text in braces, such as ``{foo}``, ``{+/}`` or ``{=perl=}``,
  is kept literally; the ``--plus`` strings and Perl expressions are not
  supported.
* With ``shell=True`` every value is quoted, even at the start of the
  script (where GNU parallel leaves it unquoted). Do not put quotes around
  a replacement string in a script: the value is already one shell word,
  and the extra quote characters would reach the command.
"""

from __future__ import annotations

import json
import os
import re
import reprlib
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from batchtools._exceptions import TemplateError

# Transforms are listed longest first so that "{//}" is not read as "{/}".
_REPLACEMENT = re.compile(rb"\{(?:([#%])|(-?[0-9]+)?(//|/\.|/|\.)?)\}")

# Bytes that end a word for /bin/sh. A replacement string between two of
# them, or at an end of the script, is a whole word.
_SHELL_WORD_BREAKS = frozenset(b" \t\n;&|()<>")

# Values made only of these bytes need no quoting. "=" is left out because a
# leading NAME=value word would be read as a variable assignment.
_SHELL_SAFE = re.compile(rb"[A-Za-z0-9_@%+:,./-]+")

_SHELL = b"/bin/sh"

# Longer column numbers are rejected: no item has that many columns, and
# int() rejects text of more than 4,300 digits by default.
_MAX_COLUMN_DIGITS = 18


class _Kind(Enum):
    ITEM = "item"
    POSITION = "position"
    SEQ = "seq"
    SLOT = "slot"


@dataclass(frozen=True, slots=True)
class _Field:
    """One replacement string found in the template."""

    kind: _Kind
    position: int  # from 1, or negative to count from the end; 0 for other kinds
    transform: bytes  # b"", b".", b"/", b"//" or b"/."
    text: str  # as written, for error messages
    whole_word: bool = False  # only tracked for shell scripts


_Part = bytes | _Field


class CommandTemplate:
    """A parsed command line with replacement strings; see the module docstring.

    Build one with `CommandTemplate.parse`.

    Attributes:
        source: The template as given, for messages.
        shell: Whether the template is a ``/bin/sh`` script.
    """

    __slots__ = (
        "_has_fields",
        "_literal_argv",
        "_script",
        "_words",
        "shell",
        "source",
        "uses_seq",
        "uses_slot",
    )

    def __init__(
        self, source: str, words: list[bytes], *, shell: bool, script: bytes
    ) -> None:
        # Only `parse` calls this, after validating the arguments.
        self.source = source
        self.shell = shell
        self._literal_argv = words
        self._script = script
        if shell:
            self._words: list[list[_Part]] = [_split_script(script, source)]
        else:
            self._words = [_split_word(word, source) for word in words]
        fields = [part for word in self._words for part in word if _is_field(part)]
        self._has_fields = bool(fields)
        self.uses_seq = any(
            isinstance(part, _Field) and part.kind is _Kind.SEQ for part in fields
        )
        self.uses_slot = any(
            isinstance(part, _Field) and part.kind is _Kind.SLOT for part in fields
        )

    @classmethod
    def parse(
        cls, template: str | Sequence[str | bytes], *, shell: bool = False
    ) -> CommandTemplate:
        """Parse a command template.

        Args:
            template: A command line, split like a POSIX shell would split it
                (`shlex.split`), or an argv whose elements are kept as they
                are. With ``shell=True``, a script, or an argv joined by
                spaces into one.
            shell: Run the template with ``/bin/sh -c`` and quote every
                substituted value for it. The script's own syntax is
                checked by the shell when a command runs.

        Raises:
            TemplateError: The template is empty, has an unbalanced quote,
                an element that is neither str nor bytes, ``{0}``, or a column
                number of more than 18 digits.
        """
        if isinstance(template, str):
            source = template
            if shell:
                words = [_encode_template_word(template, source)]
            else:
                try:
                    split = shlex.split(template)
                except ValueError as error:
                    raise TemplateError(
                        f"command template {source!r} cannot be split into "
                        f"arguments ({error}), so close the quote or escape it"
                    ) from None
                words = [_encode_template_word(word, source) for word in split]
        else:
            words = [_encode_template_word(word, template) for word in template]
            source = shlex.join(os.fsdecode(word) for word in words)

        if shell:
            script = b" ".join(words)
            if not script.strip():
                raise TemplateError(
                    f"command template {source!r} is an empty script, but it "
                    "must contain the commands to run"
                )
            return cls(source, [], shell=True, script=script)

        if not words:
            raise TemplateError(
                f"command template {source!r} is empty, but it must name a program"
            )
        if not words[0]:
            raise TemplateError(
                f"command template {source!r} has an empty program name"
            )
        return cls(source, words, shell=False, script=b"")

    @property
    def has_replacements(self) -> bool:
        """Whether the template contains any replacement string."""
        return self._has_fields

    @property
    def text(self) -> str:
        """A stable JSON form of the template, for the run's signature."""
        if self.shell:
            form: dict[str, Any] = {"script": _decode_for_text(self._script)}
        else:
            form = {"argv": [_decode_for_text(word) for word in self._literal_argv]}
        form["shell"] = self.shell
        return json.dumps(form, sort_keys=True, ensure_ascii=True)

    def __repr__(self) -> str:
        return f"CommandTemplate({self.source!r}, shell={self.shell})"

    def render(
        self,
        items: Sequence[Any],
        *,
        seq: int,
        slot: int,
        batch: bool | None = None,
    ) -> list[bytes]:
        """Substitute the items into the template.

        Args:
            items: The item of the attempt, as a one-element sequence, or
                the items of a batch. A tuple item is a row of columns; any
                other item is one column. A column may be bytes, str, an
                `os.PathLike` (both through `os.fsencode`), int or float.
            seq: The attempt's ``Context.seq``; ``{#}`` is ``seq + 1``.
            slot: The job slot from 1, for ``{%}``.
            batch: Whether ``items`` is a batch; by default, whether it has
                more than one item. Pass True for the short last batch of
                a batched run so that ``{n}`` still picks items.

        Returns:
            The argv, or ``[b"/bin/sh", b"-c", script]`` for a shell template.

        Raises:
            TemplateError: A column has an unsupported type or contains a
                NUL byte, or ``{n}`` is beyond the item's columns.
        """
        if batch is None:
            batch = len(items) > 1
        elif not batch and len(items) != 1:
            raise ValueError(
                f"render() needs exactly one item unless batch=True, got {len(items)}"
            )
        rows = [_item_columns(item, self.source) for item in items]
        if self.shell:
            return [_SHELL, b"-c", self._render_script(rows, items, batch, seq, slot)]

        if not self._has_fields:
            argv = list(self._literal_argv)
            for row in rows:
                argv.extend(row)
        else:
            argv = []
            for word in self._words:
                if len(word) == 1 and isinstance(word[0], bytes):
                    argv.append(word[0])
                elif batch and len(word) == 1 and _is_item_field(word[0]):
                    field = word[0]
                    assert isinstance(field, _Field)
                    argv.extend(_row_value(row, field.transform) for row in rows)
                else:
                    argv.append(
                        b"".join(
                            self._expand(part, rows, items, batch, seq, slot)
                            for part in word
                        )
                    )
        for argument in argv:
            if b"\0" in argument:
                raise TemplateError(
                    f"command template {self.source!r}: the argument "
                    f"{reprlib.repr(argument)} contains a NUL byte, which no "
                    "command argument can hold"
                )
        return argv

    def _render_script(
        self,
        rows: list[list[bytes]],
        items: Sequence[Any],
        batch: bool,
        seq: int,
        slot: int,
    ) -> bytes:
        pieces: list[bytes] = []
        if not self._has_fields:
            pieces.append(self._script)
            for row in rows:
                for column in row:
                    pieces.append(b" " + quote_for_shell(column))
        else:
            for part in self._words[0]:
                if isinstance(part, bytes):
                    pieces.append(part)
                elif batch and part.whole_word and part.kind is _Kind.ITEM:
                    values = (_row_value(row, part.transform) for row in rows)
                    pieces.append(b" ".join(quote_for_shell(v) for v in values))
                else:
                    value = self._expand(part, rows, items, batch, seq, slot)
                    pieces.append(quote_for_shell(value))
        script = b"".join(pieces)
        if b"\0" in script:
            raise TemplateError(
                f"command template {self.source!r}: an item contains a NUL byte, "
                "which no shell script can hold"
            )
        return script

    def _expand(
        self,
        part: _Part,
        rows: list[list[bytes]],
        items: Sequence[Any],
        batch: bool,
        seq: int,
        slot: int,
    ) -> bytes:
        if isinstance(part, bytes):
            return part
        if part.kind is _Kind.SEQ:
            return str(seq + 1).encode("ascii")
        if part.kind is _Kind.SLOT:
            return str(slot).encode("ascii")
        if part.kind is _Kind.ITEM:
            return b" ".join(_row_value(row, part.transform) for row in rows)

        index = part.position - 1 if part.position > 0 else part.position
        if batch:
            # A short last batch leaves the higher positions empty, as in
            # GNU parallel.
            if -len(rows) <= index < len(rows):
                return _row_value(rows[index], part.transform)
            return b""
        row = rows[0]
        if not -len(row) <= index < len(row):
            raise TemplateError(
                f"command template {self.source!r}: {part.text} refers to column "
                f"{part.position}, but the item {reprlib.repr(items[0])} has "
                f"{len(row)} column(s)"
            )
        return _transform(row[index], part.transform)


def quote_for_shell(value: bytes) -> bytes:
    """Quote ``value`` as one ``/bin/sh`` word, byte for byte.

    Values made only of letters, digits and ``_@%+:,./-`` are returned as
    they are. Anything else is put in single quotes, with each ``'`` written
    as ``'\\''``, and single quotes keep every other byte literal, newlines
    and bytes that are not UTF-8 included.
    """
    if _SHELL_SAFE.fullmatch(value):
        return value
    return b"'" + value.replace(b"'", b"'\\''") + b"'"


def _encode_template_word(word: object, template: object) -> bytes:
    if isinstance(word, bytes):
        return word
    if isinstance(word, str):
        try:
            return os.fsencode(word)
        except UnicodeEncodeError as error:
            raise TemplateError(
                f"command template {template!r}: {word!r} cannot be encoded "
                f"for the operating system: {error}"
            ) from None
    raise TemplateError(
        f"command template {template!r}: every element must be str or bytes, "
        f"not {type(word).__name__}"
    )


def _split_word(word: bytes, source: str) -> list[_Part]:
    parts: list[_Part] = []
    position = 0
    for match in _REPLACEMENT.finditer(word):
        if match.start() > position:
            parts.append(word[position : match.start()])
        parts.append(_make_field(match, source, whole_word=False))
        position = match.end()
    if position < len(word) or not parts:
        parts.append(word[position:])
    return parts


def _split_script(script: bytes, source: str) -> list[_Part]:
    parts: list[_Part] = []
    position = 0
    for match in _REPLACEMENT.finditer(script):
        start, end = match.span()
        whole_word = (start == 0 or script[start - 1] in _SHELL_WORD_BREAKS) and (
            end == len(script) or script[end] in _SHELL_WORD_BREAKS
        )
        if start > position:
            parts.append(script[position:start])
        parts.append(_make_field(match, source, whole_word=whole_word))
        position = end
    if position < len(script):
        parts.append(script[position:])
    return parts


def _make_field(match: re.Match[bytes], source: str, *, whole_word: bool) -> _Field:
    text = match.group(0).decode("ascii")
    special, number, transform = match.groups()
    if special == b"#":
        return _Field(_Kind.SEQ, 0, b"", text, whole_word)
    if special == b"%":
        return _Field(_Kind.SLOT, 0, b"", text, whole_word)
    transform = transform or b""
    if number is None:
        return _Field(_Kind.ITEM, 0, transform, text, whole_word)
    if len(number.lstrip(b"-")) > _MAX_COLUMN_DIGITS:
        raise TemplateError(
            f"command template {reprlib.repr(source)}: {reprlib.repr(text)} refers "
            "to a column beyond any item's columns; columns are numbered from 1"
        )
    position = int(number)
    if position == 0:
        raise TemplateError(
            f"command template {source!r}: {text} is not a valid replacement "
            "string because columns are numbered from 1; use {} for the whole item"
        )
    return _Field(_Kind.POSITION, position, transform, text, whole_word)


def _is_field(part: _Part) -> bool:
    return isinstance(part, _Field)


def _is_item_field(part: _Part) -> bool:
    return isinstance(part, _Field) and part.kind is _Kind.ITEM


def _item_columns(item: Any, source: str) -> list[bytes]:
    if isinstance(item, tuple):
        return [_column_bytes(column, item, source) for column in item]
    return [_column_bytes(item, item, source)]


def _column_bytes(column: Any, item: Any, source: str) -> bytes:
    if isinstance(column, bytes):
        return column
    if isinstance(column, bytearray | memoryview):
        return bytes(column)
    if isinstance(column, str | os.PathLike):
        try:
            return os.fsencode(column)
        except UnicodeEncodeError as error:
            raise TemplateError(
                f"command template {source!r}: the item {reprlib.repr(item)} "
                f"cannot be encoded for the operating system: {error}"
            ) from None
    if isinstance(column, int | float):
        return str(column).encode("ascii")
    raise TemplateError(
        f"command template {source!r}: the item {reprlib.repr(item)} has a "
        f"column of type {type(column).__name__}; a column must be bytes, str, "
        "a path, int or float"
    )


def _row_value(row: list[bytes], transform: bytes) -> bytes:
    if not transform:
        return b" ".join(row)
    return b" ".join(_transform(column, transform) for column in row)


def _transform(path: bytes, transform: bytes) -> bytes:
    if transform == b"":
        return path
    if transform == b".":
        return _without_extension(path)
    if transform == b"/":
        return _basename(path)
    if transform == b"//":
        return _dirname(path)
    return _without_extension(_basename(path))


def _basename(path: bytes) -> bytes:
    stripped = path.rstrip(b"/")
    if not stripped:
        return b"/" if path else b""
    return stripped.rpartition(b"/")[2]


def _dirname(path: bytes) -> bytes:
    stripped = path.rstrip(b"/")
    if not stripped:
        return b"/" if path else b"."
    head, slash, _ = stripped.rpartition(b"/")
    if not slash:
        return b"."
    return head.rstrip(b"/") or b"/"


def _without_extension(path: bytes) -> bytes:
    name_start = path.rfind(b"/") + 1
    dot = path.rfind(b".", name_start)
    # Leading dots belong to the name (".bashrc", ".."), not to an extension.
    if dot == -1 or not path[name_start:dot].strip(b"."):
        return path
    return path[:dot]


def _decode_for_text(value: bytes) -> str:
    # surrogateescape keeps invalid UTF-8 distinct and reversible, and
    # json.dumps writes the surrogates as \udcXX escapes.
    return value.decode("utf-8", "surrogateescape")
