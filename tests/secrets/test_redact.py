"""Redaction of secret values in text, bytes, byte streams and log records."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchtools import ConfigurationError
from batchtools.secrets import (
    MASK,
    RedactingFilter,
    Redactor,
    StreamRedactor,
    redact_logs,
)

TOKEN = "s3cr3t-Tok3n"


def feed_in_pieces(stream: StreamRedactor, data: bytes, cuts: list[int]) -> bytes:
    """Feed ``data`` split at ``cuts`` and return everything written."""
    out = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        out.append(stream.feed(data[start:cut]))
        start = cut
    out.append(stream.flush())
    return b"".join(out)


def test_redact_replaces_each_occurrence() -> None:
    redactor = Redactor([TOKEN])

    text = redactor.redact(f"a {TOKEN} b {TOKEN}")

    assert text == "a *** b ***"


def test_redact_leaves_text_without_secrets() -> None:
    redactor = Redactor([TOKEN])
    text = "nothing to hide here"

    assert redactor.redact(text) is text


def test_empty_redactor_changes_nothing() -> None:
    redactor = Redactor()

    assert not redactor
    assert redactor.redact(TOKEN) == TOKEN
    assert redactor.redact_bytes(TOKEN.encode()) == TOKEN.encode()
    assert feed_in_pieces(redactor.stream(), b"abc", [1]) == b"abc"


def test_redact_bytes_matches_utf8_form() -> None:
    value = "pässwörd-ü"
    redactor = Redactor([value])

    data = redactor.redact_bytes(b"x " + value.encode() + b" y")

    assert data == b"x *** y"


def test_overlapping_values_are_both_covered() -> None:
    redactor = Redactor(["abcdef", "defghi"])

    text = redactor.redact("0abcdefghi1")

    assert text == "0***1"


def test_adjacent_values_become_one_mask() -> None:
    redactor = Redactor([TOKEN])

    text = redactor.redact(TOKEN + TOKEN)

    assert text == MASK


def test_shorter_value_inside_longer_one() -> None:
    redactor = Redactor(["pass", "password-long"])

    assert redactor.redact("my password-long and pass") == "my *** and ***"


@pytest.mark.parametrize("value", ["", "a", "abc"])
def test_value_shorter_than_four_is_rejected(value: str) -> None:
    redactor = Redactor()

    with pytest.raises(ConfigurationError, match="at least 4 characters"):
        redactor.add(value)


def test_rejection_message_hides_the_value() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Redactor(["xyz"])

    assert "xyz" not in str(caught.value)


def test_non_text_value_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="must be text"):
        Redactor().add(b"bytes-value")  # type: ignore[arg-type]  # the wrong type on purpose


def test_redact_data_walks_json_like_values() -> None:
    redactor = Redactor([TOKEN, "12345678"])
    value = {
        "user": "x",
        TOKEN: [f"key={TOKEN}", ("a", TOKEN.encode())],
        "pin": 12345678,
        "count": 3,
        "ok": True,
        "none": None,
    }

    redacted = redactor.redact_data(value)

    assert redacted == {
        "user": "x",
        MASK: ["key=***", ("a", b"***")],
        "pin": MASK,
        "count": 3,
        "ok": True,
        "none": None,
    }


def test_repr_hides_values() -> None:
    redactor = Redactor([TOKEN])

    assert TOKEN not in repr(redactor)
    assert "1 values" in repr(redactor)


# -- streams ------------------------------------------------------------------


def test_stream_catches_value_split_at_every_position() -> None:
    redactor = Redactor([TOKEN])
    data = f"before {TOKEN} after".encode()

    for cut in range(len(data) + 1):
        written = feed_in_pieces(redactor.stream(), data, [cut])

        assert written == b"before *** after", f"split at byte {cut}"


def test_stream_catches_value_fed_byte_by_byte() -> None:
    redactor = Redactor([TOKEN])
    data = f"{TOKEN}x{TOKEN}".encode()

    written = feed_in_pieces(redactor.stream(), data, list(range(1, len(data))))

    assert written == b"***x***"


def test_stream_holds_back_less_than_longest_value() -> None:
    redactor = Redactor([TOKEN, "short-one"])
    stream = redactor.stream()

    written = stream.feed(b"x" * 100)

    assert stream.held_back == len(TOKEN) - 1
    assert written == b"x" * (100 - stream.held_back)
    assert stream.flush() == b"x" * (len(TOKEN) - 1)


def test_stream_uses_values_added_before_it_was_made() -> None:
    redactor = Redactor([TOKEN])
    stream = redactor.stream()
    redactor.add("later-value")

    written = feed_in_pieces(stream, b"later-value " + TOKEN.encode(), [])

    assert written == b"later-value ***"


def test_stream_of_nothing_writes_nothing() -> None:
    stream = Redactor([TOKEN]).stream()

    assert stream.feed(b"") == b""
    assert stream.flush() == b""


@st.composite
def secrets_text_and_cuts(draw: st.DrawFn) -> tuple[list[str], bytes, list[int]]:
    # A small alphabet makes values overlap and repeat often.
    alphabet = st.sampled_from("abcé")
    values = draw(
        st.lists(st.text(alphabet, min_size=4, max_size=8), min_size=1, max_size=3)
    )
    text = draw(st.text(st.sampled_from("abcéxy"), max_size=60))
    data = text.encode()
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=8))
    return values, data, cuts


@settings(max_examples=300, deadline=None)
@given(secrets_text_and_cuts())
def test_stream_equals_whole_redaction(
    case: tuple[list[str], bytes, list[int]],
) -> None:
    values, data, cuts = case
    redactor = Redactor(values)

    whole = redactor.redact_bytes(data)
    streamed = feed_in_pieces(redactor.stream(), data, cuts)

    assert streamed == whole
    for value in values:
        # Masks are blanked so a value cannot straddle one and survive.
        assert value.encode() not in whole.replace(MASK.encode(), b"\0")


# -- log records --------------------------------------------------------------


@pytest.fixture
def logger_and_stream() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("batchtools.tests.secrets")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield logger, stream
    finally:
        logger.removeHandler(handler)
        logger.propagate = True


def test_filter_redacts_message_and_args(
    logger_and_stream: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logger_and_stream
    redact_logs(Redactor([TOKEN]), *logger.handlers)

    logger.warning(f"direct {TOKEN}")
    logger.warning("through %s and %r", TOKEN, {"token": TOKEN})

    output = stream.getvalue()
    assert TOKEN not in output
    assert "direct ***" in output
    assert "through *** and {'token': '***'}" in output


def test_filter_redacts_exception_text(
    logger_and_stream: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logger_and_stream
    redact_logs(Redactor([TOKEN]), *logger.handlers)

    try:
        raise RuntimeError(f"connect failed with {TOKEN}")
    except RuntimeError:
        logger.exception("the call failed")

    output = stream.getvalue()
    assert TOKEN not in output
    assert "RuntimeError: connect failed with ***" in output
    assert "Traceback" in output


def test_filter_redacts_stack_info() -> None:
    record = logging.LogRecord(
        "batchtools.tests", logging.INFO, __file__, 1, "here", None, None
    )
    record.stack_info = f"Stack (most recent call last): open({TOKEN!r})"

    RedactingFilter(Redactor([TOKEN])).filter(record)

    assert record.stack_info == "Stack (most recent call last): open('***')"


def test_filter_survives_bad_format_args(
    logger_and_stream: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logger_and_stream
    redact_logs(Redactor([TOKEN]), *logger.handlers)

    logger.warning("two %s %s", TOKEN)

    output = stream.getvalue()
    assert TOKEN not in output
    assert "two %s %s ('***',)" in output


def test_filter_sees_values_added_later(
    logger_and_stream: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, stream = logger_and_stream
    redactor = Redactor()
    redact_logs(redactor, *logger.handlers)

    redactor.add(TOKEN)
    logger.warning("value %s", TOKEN)

    assert "value ***" in stream.getvalue()


def test_redact_logs_installs_once_per_handler() -> None:
    handler = logging.StreamHandler(io.StringIO())
    redactor = Redactor([TOKEN])

    first = redact_logs(redactor, handler)
    redact_logs(redactor, handler)

    assert handler.filters == [first]
    assert isinstance(first, RedactingFilter)


def test_redact_logs_defaults_to_batchtools_and_root_handlers() -> None:
    handler = logging.StreamHandler(io.StringIO())
    logger = logging.getLogger("batchtools")
    logger.addHandler(handler)
    try:
        log_filter = redact_logs(Redactor([TOKEN]))
    finally:
        logger.removeHandler(handler)

    assert log_filter in handler.filters
