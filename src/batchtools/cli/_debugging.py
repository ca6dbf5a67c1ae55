"""Debugging aids of the CLI: --pdb and --pdb-at, and `retry --key --foreground`.

`batchtools run --pdb` opens pdb at the first failure of a --call task.
``--pdb-at KEY`` stops before the item with that key runs. How a session
pauses the run is described in `batchtools.observe._debugger`.
`batchtools retry JOURNAL --key KEY --foreground` runs one item again with
its output going straight to the terminal, and exits with its status.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from batchtools._exceptions import CommandFailedError, ConfigurationError, JournalError
from batchtools.engine._outcome import Outcome, Report, State
from batchtools.journal import ItemRow, item_history
from batchtools.policy.fallback import Fallback

if TYPE_CHECKING:
    from batchtools.engine._api import Job
    from batchtools.engine._engine import Engine
    from batchtools.observe._debugger import Debugger

# The backends that run a --call task in this process, where pdb can reach it.
DEBUGGABLE_BACKENDS = ("thread", "async")


class OptionError(click.ClickException):
    """An option that cannot be used as given; exits with status 2."""

    exit_code = 2


class JournalReadError(click.ClickException):
    """The journal cannot be read; exits with status 3."""

    exit_code = 3


def debug_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --pdb and --pdb-at to `batchtools run`."""
    command = click.option(
        "--pdb-at",
        "pdb_at",
        metavar="KEY",
        default=None,
        help="With --call, stop in pdb before the item whose key starts with KEY "
        "runs ('step' enters the task); keys as the summary and "
        "'batchtools show' print them.",
    )(command)
    return click.option(
        "--pdb",
        "pdb",
        is_flag=True,
        default=False,
        help="With --call, open pdb at the first failure of the task, in this "
        "terminal; the run waits meanwhile, then goes on after 'continue' or "
        "stops after 'quit'.",
    )(command)


def start_debugger(plan: Any, flags: dict[str, Any]) -> Debugger | None:
    """Check --pdb and --pdb-at and wrap the task of ``plan`` for them.

    Returns:
        The debugger to add to the run's observers, or ``None`` without
        either option.

    Raises:
        click.ClickException: The run cannot be debugged (exit status 2).
    """
    post_mortem = bool(flags.get("pdb"))
    break_at = flags.get("pdb_at")
    if not post_mortem and break_at is None:
        return None
    option = "--pdb" if post_mortem else "--pdb-at"
    _check_debuggable(plan, option)
    if break_at is not None and not break_at.strip():
        raise OptionError(
            "--pdb-at needs the start of an item's key, such as the 16 characters "
            "the summary prints; it is empty"
        )
    # Imported here: pdb and the debugger are needed only with these options.
    from batchtools.observe._debugger import Debugger

    debugger = Debugger(
        post_mortem=post_mortem, break_at=break_at, stdout=_debugger_output(option)
    )
    adapter = plan.task
    function = adapter.function
    if isinstance(function, Fallback):
        # The first strategy is the task itself; the fallbacks follow it.
        first, *others = function.strategies
        function = Fallback(debugger.wrap(first), *others, on=function.on)
    else:
        function = debugger.wrap(function)
    # A new adapter, because it offers a context parameter only when the
    # function takes one, and the wrapper does.
    plan.task = type(adapter)(function)
    return debugger


def _check_debuggable(plan: Any, option: str) -> None:
    options = plan.options
    if options.call is None:
        raise OptionError(
            f"{option} debugs Python tasks given with --call; a command runs in a "
            "process of its own. To watch one failed item of a command, run "
            "'batchtools retry JOURNAL --key KEY --foreground'"
        )
    backend = options.backend
    if backend is None and (options.scheduler or options.local_cluster):
        backend = "dask"
    if backend is not None and backend not in DEBUGGABLE_BACKENDS:
        raise OptionError(
            f"{option} needs the task to run in this process, on the thread or "
            f"async backend, and this run uses --backend {backend}; drop "
            f"--backend {backend} while debugging"
        )
    if plan.input.reads_stdin:
        raise OptionError(
            f"{option} reads the debugger's commands from standard input, so the "
            "items must come from ':::' arguments, '::::' files or a job file"
        )
    if not sys.stdin.isatty():
        raise OptionError(
            f"{option} needs a terminal on standard input for the debugger's "
            "prompt, and standard input is a pipe or a file; run the command "
            "from an interactive shell"
        )


def _debugger_output(option: str) -> TextIO:
    """Return the terminal that pdb writes to: stdout, or stderr if stdout is not one.

    The items' output may go to a file while the debugger talks on the
    terminal.
    """
    for stream in (sys.stdout, sys.stderr):
        if stream.isatty():
            return stream
    raise OptionError(
        f"{option} needs a terminal on standard output or standard error to "
        "show the debugger, and both go to pipes or files"
    )


def report_debugging(debugger: Debugger, journal: Any) -> None:
    """Print what the user must know after a debugged run, on stderr."""
    if debugger.break_at is not None and debugger.breaks == 0:
        click.echo(
            f"Warning: --pdb-at {debugger.break_at}: no item with a key that "
            "starts with it ran in this run.",
            err=True,
        )
    if debugger.quit_requested:
        hint = (
            f" Finish it with: batchtools resume {journal.path}"
            if journal is not None
            else ""
        )
        click.echo(f"The run was stopped from the debugger.{hint}", err=True)


# -- retry --key KEY --foreground -----------------------------------------


def retry_item_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --key and --foreground to `batchtools retry`."""
    command = click.option(
        "--foreground",
        is_flag=True,
        default=False,
        help="With --key, run the item in this terminal with its output shown "
        "live, not captured, and exit with its exit status.",
    )(command)
    return click.option(
        "--key",
        metavar="KEY",
        default=None,
        help="Run only the item whose key starts with KEY; it may be in any "
        "state except succeeded.",
    )(command)


def select_item(journal: Path, key: str | None, foreground: bool) -> ItemRow | None:
    """Return the journal's row of the item that `retry --key` runs.

    Raises:
        click.ClickException: The key is missing, unknown, ambiguous, or
            names an item that succeeded (exit status 2), or the journal
            cannot be read (exit status 3).
    """
    if key is None:
        if foreground:
            raise OptionError(
                "--foreground runs one item; name it with --key KEY, the start "
                "of its key as the summary or 'batchtools show' prints it"
            )
        return None
    if not key.strip():
        raise OptionError("--key is empty; give the start of an item's key")
    try:
        history = item_history(journal, key.strip())
    except ConfigurationError as error:
        raise OptionError(str(error)) from None
    except JournalError as error:
        raise JournalReadError(str(error)) from None
    if history is None:
        raise OptionError(f"no item with key {key!r} in journal {journal}")
    row = history[0]
    if row.state == State.SUCCEEDED.value:
        raise OptionError(
            f"item {row.key} of journal {journal} succeeded already; retry runs "
            "items that did not succeed"
        )
    return row


def run_here(options: Any) -> None:
    """Make the options of a --foreground retry run the item on this machine.

    A run on a Dask cluster runs locally instead, which its journal accepts.
    One attempt runs at a time. The --results files are left as they were,
    because the output is not captured.
    """
    if options.backend == "dask":
        options.backend = None
    options.scheduler = None
    options.local_cluster = None
    options.results = None
    options.jobs = 1


def inherit_output(job: Job) -> None:
    """Make a command write to this terminal instead of being captured."""
    from batchtools.backends._subprocess import SubprocessBackend

    if isinstance(job.backend, SubprocessBackend):
        job.backend.capture = False


class ItemStatus:
    """An engine observer that keeps the last outcome, for the exit status."""

    def __init__(self) -> None:
        self.outcome: Outcome | None = None

    def on_start(self, engine: Engine) -> None:
        return None

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        return None

    def on_outcome(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def on_finish(self, report: Report) -> None:
        return None

    def exit_status(self, default: int) -> int:
        """Return the item's exit status, or ``default`` if it has none.

        A command's own exit status is returned as is, and a command killed
        by signal N as 128 + N, as shells report it. A Python task gives 0
        or ``default``.
        """
        outcome = self.outcome
        if outcome is None or outcome.source != "run":
            return default
        if outcome.state is State.SUCCEEDED:
            return 0
        error = outcome.error
        if outcome.state is State.FAILED and isinstance(error, CommandFailedError):
            status = error.exit_status
            return 128 - status if status < 0 else status
        return default
