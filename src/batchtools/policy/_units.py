"""Parsing of durations (``30s``, ``5m``, ``250ms``) and sizes (``512M``, ``2G``)."""

from __future__ import annotations

import math
import re
from datetime import timedelta

from batchtools._exceptions import ConfigurationError

# A decimal number, with an optional exponent because a float from a TOML job
# file may be written back as text such as "1e-05".
_NUMBER = r"((?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)"
_DURATION = re.compile(rf"\s*{_NUMBER}\s*(ms|s|m|h|d)?\s*", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(rf"\s*{_NUMBER}\s*([KMGT]?)(i?B?)\s*", re.ASCII | re.I)
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
# More digits than this exceed every limit; int() fails past 4,300 of them.
_MAX_DIGITS = 100


def _shown(value: object) -> str:
    """Return ``repr(value)``, or a description of an integer too long for it."""
    try:
        return repr(value)
    except ValueError:
        return "(an integer of over 4,300 digits)"


def whole_number(digits: str, *, name: str, text: object) -> int:
    """Return the decimal ``digits`` found in ``text`` as an int.

    Raises:
        ConfigurationError: The number has more than 100 digits, which is
            beyond every count or limit this package takes.
    """
    significant = digits.lstrip("0")
    if len(significant) > _MAX_DIGITS:
        raise ConfigurationError(
            f"invalid {name} {text!r}: the number {digits[:12]}... is too large"
        )
    return int(significant or "0")


def parse_duration(value: str | float | timedelta, *, name: str = "duration") -> float:
    """Convert a duration to seconds.

    Args:
        value: Seconds as a number, a `timedelta`, or text such as ``"250ms"``,
            ``"30s"``, ``"5m"``, ``"2h"`` or ``"1d"`` (a bare number is seconds).
        name: What the value configures, for the error message.

    Returns:
        The duration in seconds, a finite number greater than zero.

    Raises:
        ConfigurationError: The value is not a positive, finite duration.
    """
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        seconds = math.nan
    elif isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond the float range
            seconds = math.inf
    else:
        match = _DURATION.fullmatch(str(value))
        if match is None:
            raise ConfigurationError(
                f"invalid {name} {value!r}: use a number with an optional unit "
                "ms, s, m, h or d, such as '30s' or '250ms'"
            )
        seconds = float(match[1]) * _DURATION_UNITS[match[2] or "s"]
    if math.isinf(seconds):
        raise ConfigurationError(
            f"invalid {name} {_shown(value)}: it must be a finite number of seconds"
        )
    if not seconds > 0:  # also true for NaN
        raise ConfigurationError(
            f"invalid {name} {_shown(value)}: it must be greater than zero"
        )
    return seconds


def parse_size(value: str | int, *, name: str = "size") -> int:
    """Convert a size to bytes.

    Args:
        value: Bytes as an integer, or text such as ``"512M"``, ``"2G"`` or
            ``"64KiB"``; the suffixes are binary (``1K`` is 1024 bytes).
        name: What the value configures, for the error message.

    Returns:
        The size in bytes, greater than zero.

    Raises:
        ConfigurationError: The value is not a positive size.
    """
    if isinstance(value, bool):
        size = 0
    elif isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(str(value))
        if match is None:
            raise ConfigurationError(
                f"invalid {name} {value!r}: use a number with an optional unit "
                "K, M, G or T, such as '512M'"
            )
        number = float(match[1]) * _SIZE_UNITS[match[2].upper()]
        if not math.isfinite(number):
            raise ConfigurationError(
                f"invalid {name} {value!r}: it is too large to be a size in bytes"
            )
        size = int(number)
    if size <= 0:
        raise ConfigurationError(f"invalid {name} {value!r}: it must be above zero")
    return size
