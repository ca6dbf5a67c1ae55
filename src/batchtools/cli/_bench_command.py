"""The ``batchtools bench`` command: measure a task at several concurrency levels.

`batchtools.observe.loadtest.bench` measures and picks the level. This
module turns the options into its arguments and the items into a source,
prints the table (with rich on a terminal) and the recommendation, and
writes the plot.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click

from batchtools._exceptions import ConfigurationError, format_size
from batchtools.backends._command import CommandTemplate
from batchtools.cli._inputs import InputSpec, Source, split_command
from batchtools.cli.main import (
    EXIT_FAILED,
    EXIT_OK,
    AbortError,
    UsageError,
    _check_columns,
    _load_call,
    _setup_logging,
)
from batchtools.observe.loadtest import (
    MAX_JOBS,
    BenchResult,
    LevelResult,
    bench,
    format_jobs,
    format_seconds,
    save_plot,
)
from batchtools.policy._units import parse_duration

EXIT_INTERRUPTED = 130
_WHOLE_NUMBER = re.compile(r"[0-9]+")
_PERCENT = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*%?\s*")
_HEADERS = ("jobs", "items/s", "p50", "p99", "errors", "peak RSS", "note")


@click.command(
    "bench",
    context_settings={"allow_interspersed_args": False},
)
@click.option(
    "-j",
    "--jobs",
    "levels_text",
    metavar="N,N,...",
    default="1,2,4,8,16",
    show_default=True,
    help="Concurrency levels to measure, separated by commas.",
)
@click.option(
    "--sample",
    type=click.IntRange(min=1),
    metavar="N",
    default=50,
    show_default=True,
    help="Items in each measured sample.",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    metavar="N",
    default=3,
    show_default=True,
    help="Samples measured at each level.",
)
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    metavar="N",
    default=None,
    help="Items run at each level before measuring, whose numbers are dropped.  "
    "[default: twice the level]",
)
@click.option(
    "--max-p99",
    metavar="DURATION",
    default=None,
    help="Recommend no level whose p99 latency is above DURATION, such as 200ms.",
)
@click.option(
    "--max-errors",
    metavar="PCT",
    default=None,
    help="Recommend no level where more than PCT percent of the items fail, "
    "such as 1 or 0.5%.",
)
@click.option(
    "--timeout",
    metavar="DURATION",
    default=None,
    help="Stop an attempt after this long, such as 5s, and count it as an error.",
)
@click.option(
    "--call",
    metavar="MODULE:FUNCTION",
    default=None,
    help="Call a Python function on each item instead of a command.",
)
@click.option(
    "--backend",
    type=click.Choice(["async", "thread", "process"]),
    default=None,
    help="Where --call runs.  [default: async for coroutine functions, else thread]",
)
@click.option(
    "--stdin",
    "from_stdin",
    is_flag=True,
    help="Read the items from standard input, one a line, instead of using "
    "the sample index.",
)
@click.option(
    "--plot",
    metavar="PATH",
    default=None,
    help="Write a plot of throughput and latency against concurrency to PATH, "
    "a .png or .svg file (needs matplotlib).",
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print one JSON object, not the table."
)
@click.option("-v", "--verbose", count=True, help="Log the engine's messages too.")
@click.option("-q", "--quiet", is_flag=True, help="Log nothing while measuring.")
@click.argument("words", nargs=-1, type=click.UNPROCESSED, metavar="[--] COMMAND...")
def bench_command(
    levels_text: str,
    sample: int,
    repeat: int,
    warmup: int | None,
    max_p99: str | None,
    max_errors: str | None,
    timeout: str | None,
    call: str | None,
    backend: str | None,
    from_stdin: bool,
    plot: str | None,
    as_json: bool,
    verbose: int,
    quiet: bool,
    words: tuple[str, ...],
) -> None:
    """Measure throughput and latency of COMMAND at several concurrency levels.

    \b
    batchtools bench [OPTIONS] [--] COMMAND [ARG...] [::: ITEM...]... [:::: FILE...]

    At each level of --jobs, runs a warm-up and then --repeat samples of
    --sample items, and prints the throughput (succeeded items per
    second), the p50 and p99 latency of an item, the share of items that
    failed and the peak memory of batchtools and its child processes.

    The recommended level is the lowest one within --max-p99 and
    --max-errors whose throughput reaches 90% of the best throughput within
    them. The knee is the lowest level that reaches 90% of the best
    throughput of all levels: throughput stops growing there.

    By default the items are the position in the sample: {} is 1 to
    --sample, and a command without a replacement string runs as written.
    Items after ':::' or '::::', or from standard input with --stdin, are
    used in turn, from the first again when they run out, and are
    substituted as 'batchtools run' does.

    Exit status: 0 after measuring; 1 when limits were given and no level
    was within them; 2 for invalid usage; 130 after SIGINT.
    """
    _setup_logging(verbose, quiet)
    if not quiet:
        # One line per level measured, on stderr, so a long run shows progress.
        logging.getLogger("batchtools.loadtest").setLevel(logging.INFO)
    try:
        jobs = parse_jobs(levels_text)
        latency_limit = _duration(max_p99, "--max-p99")
        attempt_timeout = _duration(timeout, "--timeout")
        error_rate = None if max_errors is None else parse_percent(max_errors)
        if plot is not None:
            from batchtools.observe._loadtest_plot import check_plot_path

            check_plot_path(plot)
        task, items = _task_and_items(list(words), call, from_stdin)
        result = bench(
            task,
            items,
            jobs=jobs,
            sample=sample,
            repeat=repeat,
            warmup=warmup,
            max_p99=latency_limit,
            max_error_rate=error_rate,
            backend=backend,
            timeout=attempt_timeout,
        )
    except ConfigurationError as error:
        raise UsageError(str(error)) from None
    except KeyboardInterrupt:
        click.echo("Interrupted by SIGINT.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
    else:
        _print_table(result)
        for line in recommendation_lines(result):
            click.echo(line)
    if plot is not None:
        try:
            save_plot(result, plot)
        except OSError as error:
            raise AbortError(
                f"cannot write the plot {plot!r}: {error.strerror}"
            ) from None
    no_level_within = (max_p99 is not None or max_errors is not None) and not (
        result.within_limits
    )
    sys.exit(EXIT_FAILED if no_level_within else EXIT_OK)


def parse_jobs(text: str) -> list[int]:
    """Parse a --jobs value such as ``1,2,4,8`` into levels.

    Raises:
        ConfigurationError: The list is empty, or a level is not a whole
            number from 1 to `MAX_JOBS`, or is given twice.
    """
    if not text.strip():
        raise ConfigurationError(
            "--jobs is empty; give concurrency levels separated by commas, "
            "such as 1,2,4,8"
        )
    levels: list[int] = []
    for part in (part.strip() for part in text.split(",")):
        if _WHOLE_NUMBER.fullmatch(part) is None:
            raise ConfigurationError(
                f"--jobs {text!r}: {part!r} is not a whole number; give "
                "concurrency levels separated by commas, such as 1,2,4,8"
            )
        level = int(part)
        if not 1 <= level <= MAX_JOBS:
            raise ConfigurationError(
                f"--jobs {text!r}: the level {level} must be at least 1 and at "
                f"most {MAX_JOBS:,}"
            )
        if level in levels:
            raise ConfigurationError(
                f"--jobs {text!r}: the level {level} is given more than once"
            )
        levels.append(level)
    return levels


def parse_percent(text: str) -> float:
    """Parse a --max-errors value such as ``1``, ``0.5%`` or ``10%`` into a share.

    Raises:
        ConfigurationError: The value is not a number from 0 to 100.
    """
    match = _PERCENT.fullmatch(text)
    if match is None or float(match[1]) > 100:
        raise ConfigurationError(
            f"--max-errors {text!r} must be a percentage from 0 to 100, such as "
            "1 or 0.5%"
        )
    return float(match[1]) / 100


def _duration(text: str | None, option: str) -> float | None:
    return None if text is None else parse_duration(text, name=option)


def _task_and_items(
    words: list[str], call: str | None, from_stdin: bool
) -> tuple[Any, Iterable[Any] | Callable[[int], Any]]:
    """Return the task and the items of the command line.

    Raises:
        ConfigurationError: The command, --call or the input is invalid.
    """
    command, input_spec = split_command(words)
    if call is None and not command:
        raise ConfigurationError(
            "missing command: give one after the options, such as "
            "'batchtools bench --jobs 1,2,4 -- curl -s http://127.0.0.1:8000/', "
            "or use --call MODULE:FUNCTION"
        )
    if call is not None and command:
        raise ConfigurationError(
            f"give either a command ({' '.join(command)!r}) or --call, not both"
        )
    if from_stdin and input_spec is not None:
        raise ConfigurationError(
            "--stdin and ':::' or '::::' both give items; use one of them"
        )
    if from_stdin:
        input_spec = InputSpec([Source("stdin")])
    task: Any = _load_call(call) if call is not None else CommandTemplate.parse(command)
    if input_spec is None:
        return task, _index_items(task)
    input_spec.check()
    if isinstance(task, CommandTemplate):
        _check_columns(task, len(input_spec.sources))
    return task, input_spec.items()


def _index_items(task: Any) -> Callable[[int], Any]:
    """Return the factory of the default items: the position in the sample.

    A command without a replacement string gets an item with no columns,
    so that nothing is appended to it.
    """
    if isinstance(task, CommandTemplate) and not task.has_replacements:
        return lambda position: ()
    return str


# -- output ---------------------------------------------------------------------


def recommendation_lines(result: BenchResult) -> list[str]:
    """Return the lines printed under the table: the choice and the knee."""
    lines = [f"Recommended: --jobs {result.recommended}. {result.reason}"]
    highest = result.levels[-1].jobs
    if result.knee < highest:
        times = 1 / result.knee_fraction
        lines.append(
            f"Throughput stops growing at {format_jobs(result.knee)} (the knee): "
            f"no higher level reaches more than {times:.3g} times its throughput."
        )
    return lines


def table_rows(result: BenchResult) -> list[tuple[str, ...]]:
    """Return the table's rows as text, one per level, under `_HEADERS`."""
    return [
        (
            str(level.jobs),
            f"{level.throughput:,.1f}",
            _latency_text(level.p50),
            _latency_text(level.p99),
            _errors_text(level),
            "-" if level.peak_rss is None else format_size(level.peak_rss),
            _note(result, level),
        )
        for level in result.levels
    ]


def _latency_text(seconds: float | None) -> str:
    return "-" if seconds is None else format_seconds(seconds)


def _errors_text(level: LevelResult) -> str:
    if level.errors == 0:
        return "0"
    return f"{level.errors} ({level.error_rate * 100:.3g}%)"


def _note(result: BenchResult, level: LevelResult) -> str:
    notes = []
    if level.jobs == result.recommended:
        notes.append("recommended")
    if level.jobs == result.knee:
        notes.append("knee")
    elif level.jobs > result.knee:
        notes.append("past the knee")
    notes.extend(level.violations)
    return "; ".join(notes)


def _print_table(result: BenchResult) -> None:
    rows = table_rows(result)
    if sys.stdout.isatty():
        # rich is imported only to draw on a terminal.
        from rich.console import Console
        from rich.table import Table

        table = Table(*_HEADERS)
        for column in table.columns[1:6]:
            column.justify = "right"
        for row in rows:
            table.add_row(*row)
        Console().print(table)
        return
    for line in _plain_table(rows):
        click.echo(line)


def _plain_table(rows: list[tuple[str, ...]]) -> list[str]:
    """Return the table as aligned text: numbers to the right, notes to the left."""
    widths = [
        max(len(text) for text in column)
        for column in zip(_HEADERS, *rows, strict=True)
    ]
    lines = []
    for row in [_HEADERS, *rows]:
        cells = [
            text.ljust(width) if index in (0, 6) else text.rjust(width)
            for index, (text, width) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return lines
