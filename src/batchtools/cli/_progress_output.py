"""The CLI's display of a run's progress: a line on a terminal, log lines elsewhere.

On a terminal, `batchtools.observe._progress.Progress` redraws one line on
stderr, and log records are written above it through the same console.
When stderr is not a terminal, `ProgressLog` writes the line as a log
record every --progress-interval seconds instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from batchtools._exceptions import ConfigurationError
from batchtools.cli._debugging import OptionError
from batchtools.engine._outcome import COUNT_KEYS
from batchtools.journal import ItemRow, count_states, read_run

if TYPE_CHECKING:
    from rich.console import Console

    from batchtools.observe._progress import ProgressCounts, ProgressLog

DEFAULT_INTERVAL = 10.0
"""Seconds between two progress lines when stderr is not a terminal."""


def progress_interval_option(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --progress-interval, also read from BATCHTOOLS_PROGRESS_INTERVAL."""
    return click.option(
        "--progress-interval",
        "progress_interval",
        metavar="DURATION",
        envvar="BATCHTOOLS_PROGRESS_INTERVAL",
        show_envvar=True,
        default=None,
        help="When stderr is not a terminal, log the progress line this often, "
        "such as 30s or 5m; 0 turns it off.  [default: 10s]",
    )(command)


def parse_interval(text: str | None) -> float | None:
    """Return the seconds of a --progress-interval value; ``None`` turns it off.

    Raises:
        ConfigurationError: The value is not a duration.
    """
    if text is None:
        return DEFAULT_INTERVAL
    if text.strip() in ("0", "0s"):
        return None
    from batchtools.policy._units import parse_duration

    return parse_duration(text, name="--progress-interval")


def start_progress_log(total: int | None, interval: float | None) -> ProgressLog | None:
    """Return the observer that logs the progress line, or ``None`` if it is off."""
    if interval is None:
        return None
    # Imported here: the module imports rich, which the progress line needs.
    from batchtools.observe._progress import ProgressLog, progress_log

    # The lines are INFO records, which the CLI shows without -v too.
    if progress_log.getEffectiveLevel() > logging.INFO:
        progress_log.setLevel(logging.INFO)
    return ProgressLog(total, interval=interval)


def count_earlier(
    progress: ProgressCounts,
    journal: Path,
    rerun: Collection[str],
    only: ItemRow | None = None,
) -> None:
    """Count the items that earlier sessions finished and this one does not read.

    For a session that reads its items from the journal (a retry, a resume
    of items read from standard input), where the engine never emits the
    other items. The total becomes the journal's item count once the input
    was read to its end.

    Args:
        progress: The progress to count them in.
        journal: The run's journal.
        rerun: The states of the items this session runs.
        only: The one item this session runs (`retry --key`), if so.

    Raises:
        JournalError: The journal cannot be read.
    """
    states = count_states(journal)
    if only is not None:
        running = {only.state: 1}
    else:
        running = {state: states.get(state, 0) for state in rerun}
    done = sum(states.get(state, 0) - running.get(state, 0) for state in COUNT_KEYS)
    failed = states.get("failed", 0) - running.get("failed", 0)
    progress.add_earlier(done, failed)
    if progress.total is None and read_run(journal).input_complete:
        progress.total = sum(states.values())


def log_above(console: Console) -> Callable[[], None]:
    """Write the CLI's log records through ``console``, above the progress line.

    Returns:
        A function that writes them to stderr directly again.
    """
    handlers = [
        handler
        for handler in logging.getLogger("batchtools").handlers
        if isinstance(handler, logging.StreamHandler)
    ]
    streams = [handler.setStream(_ConsoleStream(console)) for handler in handlers]

    def restore() -> None:
        for handler, stream in zip(handlers, streams, strict=True):
            if stream is not None:
                handler.setStream(stream)

    return restore


class _ConsoleStream:
    """A text stream that writes through a rich console, for a log handler.

    Text written through the console that draws the progress line appears
    above the line instead of being appended to it.
    """

    def __init__(self, console: Console) -> None:
        self._console = console

    def write(self, text: str) -> int:
        ending = "\n" if text.endswith("\n") else ""
        self._console.out(text.removesuffix("\n"), highlight=False, end=ending)
        return len(text)

    def flush(self) -> None:
        self._console.file.flush()


def checked_interval(text: str | None) -> float | None:
    """Return `parse_interval` of ``text``; exit 2 if it is not a duration."""
    try:
        return parse_interval(text)
    except ConfigurationError as error:
        raise OptionError(str(error)) from None
