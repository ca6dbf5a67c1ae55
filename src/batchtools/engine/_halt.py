"""When to stop a run early because too many items failed (``--halt``)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from batchtools._exceptions import ConfigurationError
from batchtools.policy._units import whole_number

_SPEC = re.compile(r"(now|soon),fail=(\d+)(%?)")
_MIN_FOR_SHARE = 10


@dataclass(frozen=True, slots=True)
class Halt:
    """Stop the run once failures reach a count or a share of finished items.

    Attributes:
        cancel: ``True`` (``now``) cancels attempts in flight; ``False``
            (``soon``) lets them finish but starts nothing new.
        failures: Halt when this many items have failed.
        percent: Halt when this share (0 to 100) of finished items have
            failed, once at least 10 items have finished.
    """

    cancel: bool
    failures: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> Halt:
        """Parse GNU parallel's form, such as ``now,fail=1`` or ``soon,fail=20%``.

        Raises:
            ConfigurationError: The text has another form.
        """
        match = _SPEC.fullmatch(text.strip())
        if match is None:
            raise ConfigurationError(
                f"invalid halt condition {text!r}: use now,fail=N or soon,fail=N%, "
                "such as 'now,fail=1'"
            )
        cancel = match[1] == "now"
        number = whole_number(match[2], name="halt condition", text=text)
        if match[3]:
            if not 0 < number <= 100:
                raise ConfigurationError(
                    f"invalid halt condition {text!r}: the share must be 1% to 100%"
                )
            return cls(cancel, percent=float(number))
        if number < 1:
            raise ConfigurationError(
                f"invalid halt condition {text!r}: the count must be at least 1"
            )
        return cls(cancel, failures=number)

    def reached(self, failed: int, finished: int) -> str | None:
        """Return why the run must halt, or ``None`` to go on."""
        if self.failures is not None and failed >= self.failures:
            return f"{failed} items failed (halt at {self.failures})"
        if (
            self.percent is not None
            and finished >= _MIN_FOR_SHARE
            and failed * 100 >= self.percent * finished
        ):
            return (
                f"{failed} of {finished} finished items failed "
                f"(halt at {self.percent:g}%)"
            )
        return None
