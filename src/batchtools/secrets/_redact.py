"""Redaction: every registered secret value becomes ``***`` in what a run writes.

A `Redactor` stores the values. It rewrites text (`Redactor.redact`), bytes
(`Redactor.redact_bytes`) and JSON-like data (`Redactor.redact_data`), and
makes a `StreamRedactor` for output that arrives in pieces. The
`RedactingFilter` applies it to log records.

How a match is found: every position where some value starts is located
with one regular expression (a lookahead over the values, longest first),
so overlapping values are all covered. Covered positions that touch merge
into one run, and each run is written as one ``***``. The streaming form
does the same over a sliding buffer. It writes a position only once the
next ``longest - 1`` bytes are known, so a value split across two reads is
still found. At most ``longest - 1`` bytes are held back between reads.

Only the raw value is matched. Transformed forms (base64, URL encoding,
hex, ``repr`` escapes, a value split by a line break) are not.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from collections.abc import Iterator
from typing import Any, AnyStr, NamedTuple

from batchtools._exceptions import ConfigurationError

MIN_LENGTH = 4
"""Characters a secret value must have, so that redacting it leaves text usable.

Replacing every occurrence of a one-, two- or three-character string would
mangle ordinary output (``"ab"`` is in many words), and the positions of
the masks would then point at the value. A value that short can also be
guessed by trying every combination.
"""

MASK = "***"
"""The replacement text for each run of secret characters."""

_MASK_BYTES = MASK.encode()


class _Patterns(NamedTuple):
    """The compiled form of a redactor's values, replaced as a whole on change."""

    text_any: re.Pattern[str] | None
    text_starts: re.Pattern[str] | None
    text_longest: int
    data_any: re.Pattern[bytes] | None
    data_starts: re.Pattern[bytes] | None
    data_longest: int


_EMPTY = _Patterns(None, None, 0, None, None, 0)


def _compile(values: set[str]) -> _Patterns:
    if not values:
        return _EMPTY
    texts = sorted(values, key=len, reverse=True)
    datas = sorted(
        {value.encode("utf-8", "surrogateescape") for value in values},
        key=len,
        reverse=True,
    )
    text_choices = "|".join(re.escape(value) for value in texts)
    data_choices = b"|".join(re.escape(value) for value in datas)
    return _Patterns(
        re.compile(text_choices),
        # At each position the lookahead takes the longest value that starts
        # there, because the choices are ordered longest first.
        re.compile(f"(?=({text_choices}))"),
        len(texts[0]),
        re.compile(data_choices),
        re.compile(b"(?=(" + data_choices + b"))"),
        len(datas[0]),
    )


class Redactor:
    """Replaces registered secret values with ``***``.

    Safe to share between threads: `add` swaps the compiled patterns in one
    assignment, and readers use whichever set they read.

    Args:
        values: Secret values to register now; see `add`.
    """

    def __init__(self, values: tuple[str, ...] | list[str] = ()) -> None:
        self._values: set[str] = set()
        self._lock = threading.Lock()
        self._patterns = _EMPTY
        for value in values:
            self.add(value)

    def add(self, value: str) -> None:
        """Register ``value`` so that it is redacted from now on.

        Raises:
            ConfigurationError: The value is not text, or is shorter than
                `MIN_LENGTH` characters.
        """
        if not isinstance(value, str):
            raise ConfigurationError(
                f"a secret value must be text (str), not {type(value).__name__}"
            )
        if len(value) < MIN_LENGTH:
            # The value itself is never put in a message.
            raise ConfigurationError(
                f"a secret value must be at least {MIN_LENGTH} characters long so "
                f"that it can be redacted, and this one has {len(value)}; use a "
                "longer secret"
            )
        with self._lock:
            if value in self._values:
                return
            self._values.add(value)
            self._patterns = _compile(self._values)

    def __bool__(self) -> bool:
        return bool(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"<Redactor of {len(self._values)} values>"

    @property
    def longest_bytes(self) -> int:
        """Bytes of the longest value in UTF-8; a stream holds back one less."""
        return self._patterns.data_longest

    def redact(self, text: str) -> str:
        """Return ``text`` with every run of secret values replaced by ``***``."""
        patterns = self._patterns
        if patterns.text_any is None or patterns.text_any.search(text) is None:
            return text
        assert patterns.text_starts is not None
        pieces, _, _ = _write(text, patterns.text_starts, 0, len(text), MASK, False)
        return "".join(pieces)

    def redact_bytes(self, data: bytes) -> bytes:
        """Return ``data`` with every run of secret values replaced by ``***``.

        Values are matched in their UTF-8 form.
        """
        patterns = self._patterns
        if patterns.data_any is None or patterns.data_any.search(data) is None:
            return data
        assert patterns.data_starts is not None
        pieces, _, _ = _write(
            data, patterns.data_starts, 0, len(data), _MASK_BYTES, False
        )
        return b"".join(pieces)

    def redact_data(self, value: Any) -> Any:
        """Return a copy of JSON-like ``value`` with secrets redacted in its strings.

        Strings, bytes, dictionary keys and the members of lists, tuples and
        dictionaries are redacted. A number whose digits contain a secret
        becomes the string ``"***"``. Other objects are returned unchanged.
        """
        if not self._values:
            return value
        return self._redact_value(value)

    def _redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, bytes):
            return self.redact_bytes(value)
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int | float):
            return MASK if self.redact(str(value)) != str(value) else value
        if isinstance(value, list | tuple):
            return type(value)(self._redact_value(member) for member in value)
        if isinstance(value, dict):
            return {
                self._redact_value(key): self._redact_value(member)
                for key, member in value.items()
            }
        return value

    def stream(self) -> StreamRedactor:
        """Return a redactor for one byte stream that arrives in pieces."""
        return StreamRedactor(self)


class StreamRedactor:
    """Redacts one byte stream fed in pieces, catching values split between them.

    Feed each piece to `feed` and write what it returns; at the end of the
    stream write what `flush` returns. The values are those registered with
    the redactor when this object was made.

    Args:
        redactor: The redactor whose values to replace.
    """

    __slots__ = ("_buffer", "_longest", "_masked", "_pattern", "_probe", "_written")

    def __init__(self, redactor: Redactor) -> None:
        patterns = redactor._patterns
        self._probe = patterns.data_any
        self._pattern = patterns.data_starts
        self._longest = patterns.data_longest
        # The last bytes seen: those not written yet, plus up to longest - 1
        # written ones before them, where a value may start that the next
        # piece completes.
        self._buffer = b""
        self._written = 0
        self._masked = False

    @property
    def held_back(self) -> int:
        """Bytes fed but not returned yet; at most the longest value's length - 1."""
        return len(self._buffer) - self._written

    def feed(self, data: bytes) -> bytes:
        """Take the next piece of the stream; return the bytes that can be written."""
        return self._advance(data, final=False)

    def flush(self) -> bytes:
        """End the stream; return the bytes still held back, redacted."""
        return self._advance(b"", final=True)

    def _advance(self, data: bytes, *, final: bool) -> bytes:
        if self._pattern is None or self._probe is None:
            return data
        buffer = self._buffer + data if self._buffer else data
        size = len(buffer)
        reach = self._longest - 1
        # A position below the limit has the whole of any value that starts
        # there in the buffer, so whether it is secret is known.
        limit = size if final else max(size - reach, self._written)
        if self._probe.search(buffer) is None:
            start = self._written
            pieces = [buffer[start:limit]] if limit > start else []
            written, masked = max(limit, start), self._masked and limit <= start
        else:
            pieces, written, masked = _write(
                buffer, self._pattern, self._written, limit, _MASK_BYTES, self._masked
            )
        keep_from = 0 if final else min(written, max(size - reach, 0))
        self._buffer = b"" if final else buffer[keep_from:]
        self._written = 0 if final else written - keep_from
        self._masked = False if final else masked
        return b"".join(pieces)


def _covered_runs(pattern: re.Pattern[AnyStr], buffer: AnyStr) -> Iterator[range]:
    """Yield the runs of positions covered by some value, in order, merged."""
    run_start = run_end = -1
    for match in pattern.finditer(buffer):
        start = match.start()
        end = start + len(match.group(1))
        if run_end >= 0 and start <= run_end:
            run_end = max(run_end, end)
            continue
        if run_end >= 0:
            yield range(run_start, run_end)
        run_start, run_end = start, end
    if run_end >= 0:
        yield range(run_start, run_end)


def _write(
    buffer: AnyStr,
    pattern: re.Pattern[AnyStr],
    position: int,
    limit: int,
    mask: AnyStr,
    masked: bool,
) -> tuple[list[AnyStr], int, bool]:
    """Return the redacted pieces of ``buffer`` from ``position`` on.

    Plain characters are written up to ``limit``. A covered run is written
    as one mask even past it, because its characters are known to be
    secret. ``masked`` is true when the output so far ends with a mask,
    which a run continuing at ``position`` extends.

    Returns:
        The pieces, the position after the last one, and whether the
        output now ends with a mask.
    """
    pieces: list[AnyStr] = []
    for run in _covered_runs(pattern, buffer):
        if run.stop <= position:
            continue
        if run.start > position:
            stop = min(run.start, limit)
            if stop > position:
                pieces.append(buffer[position:stop])
                position, masked = stop, False
            if stop < run.start:
                return pieces, position, masked
        if not masked:
            pieces.append(mask)
        position, masked = run.stop, True
    if limit > position:
        pieces.append(buffer[position:limit])
        position, masked = limit, False
    return pieces, position, masked


class RedactingFilter(logging.Filter):
    """A logging filter that redacts secrets from each record it passes.

    It formats the message with its arguments, then redacts the message,
    the formatted exception and the stack text, so a handler's formatter
    gets only redacted text. Install it on handlers (a filter on a logger
    does not see records from its child loggers); `redact_logs` does that.

    Args:
        redactor: The redactor whose values to replace.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.redactor
        if not redactor:
            return True
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            # Arguments that do not fit the format: keep both, redacted, so
            # the handler does not fail on them again.
            message = f"{record.msg} {record.args!r}"
        record.msg = redactor.redact(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            text = record.exc_text or "".join(
                traceback.format_exception(record.exc_info[1])
            ).rstrip("\n")
            # Formatters append exc_text when it is set; without exc_info
            # none of them formats the exception again from the original.
            record.exc_text = redactor.redact(text)
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redactor.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redactor.redact(record.stack_info)
        return True


def redact_logs(redactor: Redactor, *handlers: logging.Handler) -> RedactingFilter:
    """Install a `RedactingFilter` of ``redactor`` on logging handlers.

    Args:
        redactor: The redactor, such as ``SecretStore.redactor``.
        handlers: The handlers to filter. Without any, the handlers of the
            root logger and of the ``batchtools`` logger at this moment.

    Returns:
        The filter; remove it with ``handler.removeFilter``.
    """
    if not handlers:
        handlers = (
            *logging.getLogger().handlers,
            *logging.getLogger("batchtools").handlers,
        )
    log_filter = RedactingFilter(redactor)
    for handler in handlers:
        installed = any(
            isinstance(existing, RedactingFilter) and existing.redactor is redactor
            for existing in handler.filters
        )
        if not installed:
            handler.addFilter(log_filter)
    return log_filter
