"""The ``batchtools`` command: run, resume, retry and status.

The CLI parses and presents; the work is done by the library's engine. Each
command checks everything it can (options, job file, template, input files,
journal, the first item) before anything runs, and reports a problem as one
``Error:`` line with exit status 2.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import itertools
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from batchtools._exceptions import (
    BatchtoolsError,
    ConfigurationError,
    JournalError,
    JournalMismatchError,
    LockTimeoutError,
    RunAbortedError,
)
from batchtools.backends._base import TaskSpec
from batchtools.backends._cluster import cluster_backend
from batchtools.cli._cluster_options import (
    apply_cluster_overrides,
    cluster_options,
    cluster_override_options,
)
from batchtools.cli._debugging import (
    ItemStatus,
    debug_options,
    inherit_output,
    report_debugging,
    retry_item_options,
    run_here,
    select_item,
    start_debugger,
)
from batchtools.cli._inputs import InputSpec, Source, split_command
from batchtools.cli._output import OutputWriter
from batchtools.cli._progress_output import (
    checked_interval,
    count_earlier,
    log_above,
    progress_interval_option,
    start_progress_log,
)
from batchtools.engine._api import (
    GRACE,
    build_engine,
    open_journal,
    prepare,
    signal_handlers,
)
from batchtools.engine._engine import Observer
from batchtools.engine._outcome import Report
from batchtools.fs.lock import FileLock
from batchtools.journal import (
    Journal,
    RunRecord,
    count_states,
    iter_items,
    read_run,
)
from batchtools.observe._summary import preview, summary_lines
from batchtools.observe.audit import AuditLog
from batchtools.policy.cache import Cache
from batchtools.policy.circuit_breaker import CircuitBreaker
from batchtools.policy.concurrency import Concurrency
from batchtools.policy.fallback import Fallback
from batchtools.policy.memory import Memory
from batchtools.policy.rate_limit import RateLimit
from batchtools.policy.retry import Retry
from batchtools.secrets import SecretStore, redact_logs

if TYPE_CHECKING:
    from batchtools.observe._progress import ProgressCounts
    from batchtools.observe.metrics import Metrics

JOURNAL_FOLDER = Path(".batchtools")
RESULTS_LOCK = ".batchtools-results.lock"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ABORTED = 0, 1, 2, 3
# Like a program killed by SIGPIPE, as the shell reports it.
EXIT_OUTPUT_CLOSED = 128 + signal.SIGPIPE
_SIGNAL_EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
_RERUN = ("pending", "running", "retrying", "cancelled")

log = logging.getLogger("batchtools.cli")


class UsageError(click.ClickException):
    """A usage error found by batchtools itself; exits with status 2."""

    exit_code = EXIT_USAGE


class AbortError(click.ClickException):
    """The run could not start or go on; exits with status 3."""

    exit_code = EXIT_ABORTED


@dataclass
class RunOptions:
    """Everything a run needs, as stored in the journal for resume and retry."""

    command: list[str] = field(default_factory=list)
    call: str | None = None
    backend: str | None = None
    scheduler: str | None = None
    local_cluster: int | None = None
    shell: bool = False
    input: dict[str, Any] | None = None
    jobs: int | str | None = None
    max_args: int = 1
    retries: int = 0
    timeout: str | None = None
    keep_order: bool = False
    halt: str | None = None
    rate: str | None = None
    breaker: str | None = None
    breaker_reset: str | None = None
    deadline: str | None = None
    item_deadline: str | None = None
    grace: str | None = None
    results: str | None = None
    memfree: str | None = None
    mem_per_item: str | None = None
    max_memory: str | None = None
    max_items_per_worker: int | None = None
    setup: str | None = None
    teardown: str | None = None
    fallback: list[str] = field(default_factory=list)
    cache: str | None = None
    cache_ttl: str | None = None
    # NAME=SOURCE texts only; values are read again by each session.
    secrets: list[str] = field(default_factory=list)
    serialize_by: str | None = None
    priority: str | None = None
    priority_aging: float | None = None
    audit: str | None = None
    audit_flush: str | None = None
    audit_max_size: str | None = None
    audit_backups: int | None = None


# -- the command group ------------------------------------------------------


class _LazyGroup(click.Group):
    """A command group that imports some commands only when they are used.

    The graph, pipeline and recover commands pull in more of the library
    than `run` needs, and every `batchtools run` would otherwise pay for it.
    """

    lazy_commands = {
        "bench": "batchtools.cli._bench_command:bench_command",
        "graph": "batchtools.cli._graph_command:graph_command",
        "grep": "batchtools.cli._grep_command:grep_command",
        "pipeline": "batchtools.cli._pipeline_command:pipeline_command",
        "recover": "batchtools.cli._recover_command:recover_command",
        "report": "batchtools.cli._report_command:report_command",
        "show": "batchtools.cli._report_command:show_command",
    }

    def list_commands(self, context: click.Context) -> list[str]:
        return sorted({*super().list_commands(context), *self.lazy_commands})

    def invoke(self, context: click.Context) -> Any:
        # A run handles SIGINT itself once its journal exists. Before that,
        # and in other commands, Ctrl-C exits 130 here instead of click's 1.
        try:
            return super().invoke(context)
        except KeyboardInterrupt:
            click.echo("\nInterrupted by SIGINT.", err=True)
            context.exit(128 + signal.SIGINT)

    def get_command(self, context: click.Context, name: str) -> click.Command | None:
        target = self.lazy_commands.get(name)
        if target is None:
            return super().get_command(context, name)
        module_name, _, attribute = target.partition(":")
        command: click.Command = getattr(
            importlib.import_module(module_name), attribute
        )
        return command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pybatchtools", prog_name="batchtools")
def main() -> None:
    """Apply one command or Python function to many items, safely.

    Runs are journaled under ./.batchtools/ so that an interrupted or killed
    run can be finished with 'batchtools resume', and its failed items
    re-run with 'batchtools retry'.

    Exit status: 0 when every item succeeded. 1 when some item failed, was
    skipped or was cancelled by --halt. 2 for invalid usage or input, found
    before anything ran. 3 when the run could not go on (journal unusable,
    disk full). 130, 129 and 143 after SIGINT, SIGHUP and SIGTERM, and 141
    when standard output was closed.
    """


def _metrics_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --metrics-file and --metrics-port, whose values go to the context's meta.

    `_start_metrics` reads them there, so the commands that take these
    options pass them on without a parameter of their own.
    """

    def keep(context: click.Context, parameter: click.Parameter, value: Any) -> Any:
        context.meta[f"batchtools.{parameter.name}"] = value
        return value

    command = click.option(
        "--metrics-port",
        metavar="PORT",
        type=click.IntRange(0, 65535),
        default=None,
        expose_value=False,
        callback=keep,
        help="Serve the run's metrics in the Prometheus text format at "
        "http://127.0.0.1:PORT/metrics while it runs; 0 picks a free port and "
        "logs it.",
    )(command)
    return click.option(
        "--metrics-file",
        metavar="PATH",
        default=None,
        expose_value=False,
        callback=keep,
        help="Rewrite PATH with the run's metrics every 5 seconds and at the end: "
        "Prometheus text if PATH ends in .prom, else JSON.",
    )(command)


@main.command(
    "run",
    context_settings={
        "allow_interspersed_args": False,
        "auto_envvar_prefix": "BATCHTOOLS",
    },
)
@click.option(
    "-j",
    "--jobs",
    metavar="N|auto",
    default=None,
    show_envvar=True,
    help="Attempts that run at once, or 'auto' to adapt to the task's latency "
    "and failures ('auto:MIN-MAX' bounds it).  [default: the number of CPUs]",
)
@click.option(
    "-n",
    "--max-args",
    type=click.IntRange(min=1),
    default=None,
    help="Items per command invocation (or per call with --call).  [default: 1]",
)
@click.option(
    "-0",
    "--null",
    is_flag=True,
    default=None,
    help="Items in files and on stdin are separated by NUL, not newline.",
)
@click.option(
    "--colsep",
    metavar="REGEX",
    default=None,
    help="Split each input line into columns {1}, {2}, ... at REGEX.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=None,
    help="Retries after the first attempt of a failed item.  [default: 0]",
)
@click.option(
    "--timeout",
    metavar="DURATION",
    default=None,
    help="Stop an attempt after this long, such as 30s or 5m.",
)
@click.option(
    "--journal",
    metavar="PATH",
    default=None,
    help="Journal file of the run.  [default: a new file under .batchtools/]",
)
@click.option(
    "--no-journal", is_flag=True, help="Keep no journal; the run cannot resume."
)
@click.option(
    "--results",
    metavar="DIR",
    default=None,
    help="Keep each item's stdout, stderr and exit status in files under DIR.",
)
@click.option(
    "-k",
    "--keep-order",
    is_flag=True,
    default=None,
    help="Print output in input order instead of as items finish.",
)
@click.option(
    "--shell",
    is_flag=True,
    default=None,
    help="Run the command through /bin/sh; items are quoted for it.",
)
@click.option(
    "--halt",
    metavar="WHEN,fail=N",
    default=None,
    help="Stop after N failures (or N%): now cancels running items, soon lets "
    "them finish.",
)
@click.option(
    "--fail-fast",
    is_flag=True,
    default=False,
    help="Stop at the first failure and cancel running items; short for "
    "--halt now,fail=1.",
)
@click.option(
    "--deadline",
    metavar="DURATION",
    default=None,
    help="Stop the run after this long, such as 2h; resume runs the rest.",
)
@click.option(
    "--item-deadline",
    metavar="DURATION",
    default=None,
    help="Give up on an item this long after its first attempt started, "
    "retries included.",
)
@click.option(
    "--grace",
    metavar="DURATION",
    default=None,
    help="After the first Ctrl-C, SIGTERM or SIGHUP, give running items this "
    "long to finish before they are cancelled (default 10s).",
)
@click.option(
    "--breaker",
    metavar="N|P%/W",
    default=None,
    help="Pause starting items after N failures in a row, or when P percent of "
    "the last W attempts failed; probe again after --breaker-reset.",
)
@click.option(
    "--breaker-reset",
    metavar="DURATION",
    default=None,
    help="How long an open circuit breaker waits before it probes.  [default: 30s]",
)
@click.option(
    "--rate",
    metavar="N/PERIOD",
    default=None,
    help="Start at most N attempts per period, such as 20/s, 100/m or 5/10s; "
    "retries count.",
)
@click.option(
    "--memfree",
    metavar="SIZE",
    default=None,
    help="Start no attempt while less than SIZE of memory is available, such as 2G.",
)
@click.option(
    "--mem-per-item",
    metavar="SIZE",
    default=None,
    help="Run no more attempts at once than the available memory divided by SIZE.",
)
@click.option(
    "--max-memory",
    metavar="SIZE",
    default=None,
    help="Kill a worker process that uses more than SIZE, failing its item "
    "(--backend process).",
)
@click.option(
    "--max-items-per-worker",
    type=click.IntRange(min=1),
    default=None,
    help="Replace each worker process after N attempts (N calls with -n), for "
    "leaky tasks (--backend process).",
)
@click.option(
    "--setup",
    metavar="MODULE:FUNCTION",
    default=None,
    help="With --call, run FUNCTION once in each worker first; the task gets its "
    "value as context.state.",
)
@click.option(
    "--fallback",
    "fallback",
    metavar="MODULE:FUNCTION",
    multiple=True,
    help="With --call, try FUNCTION on an item whose --call function raised; "
    "repeat for a chain.",
)
@click.option(
    "--teardown",
    metavar="MODULE:FUNCTION",
    default=None,
    help="With --call, run FUNCTION with that value when each worker stops.",
)
@click.option(
    "--serialize-by",
    metavar="TEMPLATE",
    default=None,
    help="Never run two items at once whose TEMPLATE renders the same, such as "
    "{//} for items in one folder; other items run in parallel.",
)
@click.option(
    "--priority",
    metavar="TEMPLATE",
    default=None,
    help="Start the item whose TEMPLATE renders the largest number first, such "
    "as {2} for a second column, among the next 10,000 items read.",
)
@click.option(
    "--priority-aging",
    type=click.FloatRange(min=0),
    callback=lambda context, parameter, value: _finite(value, "--priority-aging"),
    default=None,
    help="With --priority, raise a waiting item's priority by this much a "
    "second, so that low priorities still start.",
)
@click.option(
    "--cache",
    metavar="PATH",
    default=None,
    help="With --call, keep each item's value in the cache file PATH and reuse "
    "it in later runs instead of calling again.",
)
@click.option(
    "--cache-ttl",
    metavar="DURATION",
    default=None,
    help="Reuse cached values younger than this, such as 1h.  [default: forever]",
)
@click.option(
    "--secret",
    "secret",
    metavar="NAME=SOURCE",
    multiple=True,
    help="Read a secret from SOURCE (env:VAR, file:PATH or keyring:SERVICE/USER), "
    "give it to commands as the environment variable NAME and to --call tasks "
    "as context.secret('NAME'), and redact it from all output; repeatable.",
)
@click.option(
    "--audit",
    metavar="PATH",
    default=None,
    help="Append a JSON line to PATH when the run starts and ends and for each "
    "failed item; resume and retry append to it too.",
)
@click.option(
    "--audit-flush",
    metavar="DURATION",
    default=None,
    help="How often buffered records are written to the --audit file.  [default: 1s]",
)
@click.option(
    "--audit-max-size",
    metavar="SIZE",
    default=None,
    help="Rotate the --audit file before it grows past SIZE, such as 10M.  "
    "[default: never]",
)
@click.option(
    "--audit-backups",
    type=click.IntRange(min=0),
    default=None,
    help="Rotated --audit files to keep, as PATH.1 to PATH.N.  [default: 5]",
)
@click.option(
    "--dry-run", is_flag=True, help="Print the commands that would run; run nothing."
)
@click.option(
    "--call",
    "call",
    metavar="MODULE:FUNCTION",
    default=None,
    help="Call a Python function on each item instead of a command.",
)
@click.option(
    "--backend",
    type=click.Choice(["async", "thread", "process", "dask"]),
    default=None,
    help="Where --call runs; dask runs commands too, on the cluster of --scheduler "
    "or --local-cluster.  [default: async for coroutine functions, else thread]",
)
@cluster_options
@click.option(
    "-f",
    "--job-file",
    metavar="JOB.toml",
    default=None,
    help="Read options, input and task from a TOML job file.",
)
@click.option(
    "--force",
    is_flag=True,
    help="Reuse an existing --journal even if it records another command.",
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log the start and end of every attempt, retries and full tracebacks.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress line and no summary.")
@progress_interval_option
@debug_options
@click.option(
    "--slow-after",
    metavar="DURATION",
    default="1s",
    show_default=True,
    callback=lambda context, parameter, value: _duration_option(value, parameter),
    help="Warn about an attempt that runs longer than this and --slow-factor "
    "times the median attempt duration.",
)
@click.option(
    "--slow-factor",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    help="Warn about an attempt that runs this many times longer than the median.",
)
@_metrics_options
@click.argument("words", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run_command(
    context: click.Context, /, words: tuple[str, ...], **options: Any
) -> None:
    """Run COMMAND once per item.

    \b
    batchtools run [OPTIONS] [--] COMMAND [ARG...] [::: ITEM...]... [:::: FILE...]

    Items come from the arguments after ':::' (several groups give every
    combination), from files after '::::' (one item per line), or else from
    standard input. In COMMAND, {} is the item, {.} the item without its
    extension, {/} its base name, {//} its folder, {/.} its base name
    without extension, {#} the sequence number, {%} the job slot and {1},
    {2}, ... the columns or input sources. With none of these, the item is
    appended as the last argument. No shell is used unless --shell is given,
    so every item reaches the command as one argument, exactly as given.
    """
    _setup_logging(options["verbose"], options["quiet"])
    if options["job_file"]:
        # Imported only here: these modules load the flow package.
        from batchtools.cli._pipeline_command import (
            is_pipeline_job,
            run_pipeline_job,
        )
        from batchtools.cli._transaction_command import (
            is_transaction_job,
            run_transaction_job,
        )

        if is_transaction_job(options["job_file"]):
            if words:
                raise UsageError(
                    f"job file {options['job_file']!r} describes a transaction, "
                    f"which takes its steps from the file; drop {' '.join(words)!r}"
                )
            sys.exit(
                run_transaction_job(
                    options["job_file"],
                    quiet=bool(options["quiet"]),
                    verbose=options["verbose"],
                )
            )

        if is_pipeline_job(options["job_file"]):
            if words:
                raise UsageError(
                    f"job file {options['job_file']!r} describes a pipeline, which "
                    "takes its stages from the file; drop the command words "
                    f"{' '.join(words)!r}"
                )
            sys.exit(
                run_pipeline_job(
                    options["job_file"],
                    quiet=bool(options["quiet"]),
                    verbose=options["verbose"],
                    keep_order=bool(options["keep_order"]),
                )
            )
    _apply_fail_fast(context, options)
    options["progress_interval"] = checked_interval(options["progress_interval"])
    try:
        plan = _plan_run(context, list(words), options)
        _set_audit_options(plan.options, options)
    except ConfigurationError as error:
        raise UsageError(str(error)) from None
    if options["dry_run"]:
        _prepare(plan, open_cache=False)
        _dry_run(plan)
        return
    _execute(plan, options, mode="run")


@main.command("resume")
@click.argument("journal", required=False, metavar="[JOURNAL]")
@click.option(
    "-j", "--jobs", metavar="N|auto", default=None, help="Attempts that run at once."
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log the start and end of every attempt, retries and full tracebacks.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress line and no summary.")
@click.option(
    "--audit",
    metavar="PATH",
    default=None,
    help="Append audit records to PATH instead of the run's --audit file.",
)
@progress_interval_option
@_metrics_options
@cluster_override_options
def resume_command(
    journal: str | None,
    jobs: str | None,
    verbose: int,
    quiet: bool,
    audit: str | None,
    progress_interval: str | None,
) -> None:
    """Finish an interrupted or killed run.

    Runs the items that have no outcome yet; items that failed wait for
    'batchtools retry'. Without JOURNAL, resumes the latest unfinished run
    under ./.batchtools/.
    """
    _setup_logging(verbose, quiet)
    interval = checked_interval(progress_interval)
    path = Path(journal) if journal else _latest_unfinished()
    plan = _plan_from_journal(path, jobs)
    if audit is not None:
        plan.options.audit = os.path.abspath(audit)
    flags = {"quiet": quiet, "verbose": verbose, "progress_interval": interval}
    _execute(plan, flags, mode="resume", journal_path=path)


@main.command("retry")
@click.argument("journal", required=False, metavar="[JOURNAL]")
@click.option(
    "-j", "--jobs", metavar="N|auto", default=None, help="Attempts that run at once."
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log the start and end of every attempt, retries and full tracebacks.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress line and no summary.")
@click.option(
    "--audit",
    metavar="PATH",
    default=None,
    help="Append audit records to PATH instead of the run's --audit file.",
)
@progress_interval_option
@retry_item_options
@_metrics_options
@cluster_override_options
def retry_command(
    journal: str | None,
    jobs: str | None,
    verbose: int,
    quiet: bool,
    audit: str | None,
    progress_interval: str | None,
    key: str | None,
    foreground: bool,
) -> None:
    """Run the failed items of a run again, with their original arguments.

    Without JOURNAL, takes the latest run under ./.batchtools/. With --key,
    runs that one item, and with --foreground as well, runs it in this
    terminal: its output is shown live and the exit status is its own (a
    command's exit status; 0 or 1 for a Python task).
    """
    _setup_logging(verbose, quiet)
    interval = checked_interval(progress_interval)
    path = Path(journal) if journal else _latest(lambda run: True)
    item = select_item(path, key, foreground)
    plan = _plan_from_journal(path, jobs)
    if audit is not None:
        plan.options.audit = os.path.abspath(audit)
    if foreground:
        run_here(plan.options)
    flags = {
        "quiet": quiet,
        "verbose": verbose,
        "progress_interval": interval,
        "item": item,
        "foreground": foreground,
    }
    _execute(plan, flags, mode="retry", journal_path=path)


@main.command("status")
@click.argument("journal", required=False, metavar="[JOURNAL]")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--failed",
    is_flag=True,
    help="List the failed items, one a line, in the form '::::' reads.",
)
@click.option("-0", "--null", is_flag=True, help="With --failed, end items with NUL.")
def status_command(
    journal: str | None, as_json: bool, failed: bool, null: bool
) -> None:
    """Show the counts of a run.

    Without JOURNAL, shows the latest run under ./.batchtools/.
    """
    path = Path(journal) if journal else _latest(lambda run: True)
    try:
        run = read_run(path)
        states = count_states(path)
    except JournalError as error:
        raise AbortError(str(error)) from None
    if failed and as_json:
        raise UsageError("--failed and --json cannot be combined; give one of them")
    if failed:
        _print_failed(path, null)
        return
    state = run.state
    if state == "running" and not _is_locked(path):
        state = "interrupted"
    counts = {
        name: states.get(name, 0)
        for name in (
            "succeeded",
            "failed",
            "skipped",
            "cancelled",
            "pending",
            "running",
        )
    }
    counts["running"] += states.get("retrying", 0)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "run_id": run.run_id,
                    "state": state,
                    "journal": str(path),
                    "counts": counts,
                    "created": run.created,
                    "updated": run.updated,
                    "sessions": run.session,
                    "input_complete": run.input_complete,
                }
            )
        )
        return
    click.echo(f"run {run.run_id} ({state}), journal {path}")
    click.echo("  " + ", ".join(f"{count} {name}" for name, count in counts.items()))
    if not run.input_complete:
        click.echo("  the input was not read to its end; unread items are not counted")
    if "cli" not in run.spec:
        # A library run is resumed by calling the library again.
        return
    if state == "interrupted" or counts["pending"]:
        click.echo(f"  finish it with: batchtools resume {path}")
    if counts["failed"]:
        click.echo(f"  re-run the failed items with: batchtools retry {path}")


# -- planning a run -----------------------------------------------------------


@dataclass
class Plan:
    """A checked run, ready to start."""

    options: RunOptions
    task: Any
    input: InputSpec
    total: int | None


def _plan_run(
    context: click.Context, words: list[str], options: dict[str, Any]
) -> Plan:
    job_file = None
    if options["job_file"]:
        # pydantic is imported only for job files: it costs a tenth of a
        # second, a lot for a command that may run a single item.
        from batchtools.cli._jobfile import load_job_file

        job_file = load_job_file(options["job_file"])
    source = context.get_parameter_source

    def pick(name: str, from_file: Any, default: Any) -> Any:
        value = options[name]
        given = source(name) not in (None, click.core.ParameterSource.DEFAULT)
        if given or (value is not None and value is not False):
            return value
        return from_file if from_file is not None else default

    run_table = job_file.run if job_file else None
    task_table = job_file.task if job_file else None
    command, input_spec = split_command(words)
    if job_file is not None and not command and task_table is not None:
        if isinstance(task_table.command, str):
            command = _shell_words(task_table.command)
        elif task_table.command is not None:
            command = list(task_table.command)
    call = pick("call", task_table.call if task_table else None, None)
    if input_spec is None and job_file is not None:
        input_spec = _job_file_input(job_file)
    if input_spec is None:
        input_spec = InputSpec([Source("stdin")])
    input_spec.null = bool(pick("null", run_table.null if run_table else None, False))
    input_spec.colsep = pick("colsep", run_table.colsep if run_table else None, None)
    if call is None and not command:
        raise ConfigurationError(
            "missing command: give one after the options, such as "
            "'batchtools run gzip -k ::: a.txt b.txt', or use --call MODULE:FUNCTION"
        )
    if call is not None and command:
        raise ConfigurationError(
            f"give either a command ({' '.join(command)!r}) or --call, not both"
        )
    plan_options = RunOptions(
        command=command,
        call=call,
        backend=pick("backend", task_table.backend if task_table else None, None),
        scheduler=pick("scheduler", run_table.scheduler if run_table else None, None),
        local_cluster=pick(
            "local_cluster", run_table.local_cluster if run_table else None, None
        ),
        shell=bool(pick("shell", run_table.shell if run_table else None, False)),
        input=input_spec.to_spec(),
        jobs=pick("jobs", run_table.jobs if run_table else None, None),
        max_args=pick("max_args", run_table.max_args if run_table else None, 1),
        retries=pick("retries", run_table.retries if run_table else None, 0),
        timeout=_text(pick("timeout", run_table.timeout if run_table else None, None)),
        keep_order=bool(
            pick("keep_order", run_table.keep_order if run_table else None, False)
        ),
        halt=pick("halt", run_table.halt if run_table else None, None),
        rate=pick("rate", run_table.rate if run_table else None, None),
        breaker=pick("breaker", run_table.breaker if run_table else None, None),
        breaker_reset=_text(
            pick("breaker_reset", run_table.breaker_reset if run_table else None, None)
        ),
        deadline=_text(
            pick("deadline", run_table.deadline if run_table else None, None)
        ),
        item_deadline=_text(
            pick("item_deadline", run_table.item_deadline if run_table else None, None)
        ),
        grace=_text(pick("grace", run_table.grace if run_table else None, None)),
        results=pick("results", run_table.results if run_table else None, None),
        memfree=_text(pick("memfree", run_table.memfree if run_table else None, None)),
        mem_per_item=_text(
            pick("mem_per_item", run_table.mem_per_item if run_table else None, None)
        ),
        max_memory=_text(
            pick("max_memory", run_table.max_memory if run_table else None, None)
        ),
        max_items_per_worker=pick(
            "max_items_per_worker",
            run_table.max_items_per_worker if run_table else None,
            None,
        ),
        setup=pick("setup", task_table.setup if task_table else None, None),
        cache=pick("cache", run_table.cache if run_table else None, None),
        serialize_by=pick(
            "serialize_by", run_table.serialize_by if run_table else None, None
        ),
        priority=pick("priority", run_table.priority if run_table else None, None),
        priority_aging=pick(
            "priority_aging", run_table.priority_aging if run_table else None, None
        ),
        cache_ttl=_text(
            pick("cache_ttl", run_table.cache_ttl if run_table else None, None)
        ),
        fallback=list(
            options["fallback"]
            or (task_table.fallback if task_table and task_table.fallback else [])
        ),
        teardown=pick("teardown", task_table.teardown if task_table else None, None),
        secrets=[
            _absolute_file_source(text)
            for text in options["secret"]
            or [
                f"{name}={source}"
                for name, source in (
                    run_table.secrets.items() if run_table and run_table.secrets else ()
                )
            ]
        ],
    )
    journal = pick("journal", run_table.journal if run_table else None, None)
    options["journal"] = journal
    options["audit"] = pick("audit", run_table.audit if run_table else None, None)
    return _checked_plan(plan_options, input_spec)


def _apply_fail_fast(context: click.Context, options: dict[str, Any]) -> None:
    """Turn --fail-fast into --halt now,fail=1, unless a --halt flag is given.

    Both given as flags is an error. A flag wins over the other option's
    environment variable (BATCHTOOLS_HALT, BATCHTOOLS_FAIL_FAST).
    """
    if not options["fail_fast"]:
        return
    given = click.core.ParameterSource.COMMANDLINE
    halt_given = context.get_parameter_source("halt") is given
    if halt_given and context.get_parameter_source("fail_fast") is given:
        raise UsageError(
            f"--fail-fast is short for --halt now,fail=1, so it cannot be combined "
            f"with --halt {options['halt']}; give one of them"
        )
    if not halt_given:
        options["halt"] = "now,fail=1"


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _absolute_file_source(text: str) -> str:
    """Return a --secret NAME=file:PATH text with PATH made absolute.

    Resume and retry read the file again, maybe from another folder.
    """
    name, equals, source = text.partition("=")
    if not equals or not source.startswith("file:") or source == "file:":
        return text
    path = os.path.abspath(os.path.expanduser(source.removeprefix("file:")))
    return f"{name}=file:{path}"


def _shell_words(text: str) -> list[str]:
    import shlex

    try:
        return shlex.split(text)
    except ValueError as error:
        raise ConfigurationError(f"invalid command {text!r}: {error}") from None


def _job_file_input(job_file: Any) -> InputSpec | None:
    table = job_file.input
    if table.args is not None:
        groups = (
            table.args
            if table.args and isinstance(table.args[0], list)
            else [table.args]
        )
        return InputSpec(
            [Source("args", [os.fsencode(v) for v in group]) for group in groups]
        )
    if table.files is not None:
        return InputSpec([Source("file", path=os.path.abspath(f)) for f in table.files])
    if table.glob is not None:
        return InputSpec([Source("glob", path=table.glob)])
    if table.stdin:
        return InputSpec([Source("stdin")])
    return None


def _checked_plan(options: RunOptions, input_spec: InputSpec) -> Plan:
    input_spec.check()
    options.jobs = _checked_jobs(options.jobs)
    if options.serialize_by is not None:
        _lock_key(options.serialize_by)
    if options.priority is not None:
        _render_text(options.priority, "--priority")
    elif options.priority_aging is not None:
        raise ConfigurationError("--priority-aging needs --priority TEMPLATE")
    if options.fallback and options.call is None:
        raise ConfigurationError(
            f"--fallback {options.fallback[0]!r} needs --call: a fallback chain "
            "is made of Python functions. For commands, chain them in the shell "
            "with --shell 'first {} || second {}'"
        )
    task = (
        _load_call(options.call, options.fallback) if options.call else options.command
    )
    for option, target in (
        ("--setup", options.setup),
        ("--teardown", options.teardown),
    ):
        if target is not None and options.call is None:
            raise ConfigurationError(
                f"{option} {target!r} needs --call: setup and teardown functions "
                "apply to Python tasks, not to commands"
            )
        if target is not None:
            _import_function(target, option)
    if options.call is None and not options.shell:
        from batchtools.backends._command import CommandTemplate

        template = CommandTemplate.parse(options.command)
        task = template
        columns = len(input_spec.sources) if input_spec.colsep is None else None
        if columns is not None and options.max_args == 1:
            _check_columns(template, columns)
    elif options.call is None:
        from batchtools.backends._command import CommandTemplate

        task = CommandTemplate.parse(" ".join(options.command), shell=True)
    total = input_spec.total()
    return Plan(options, task, input_spec, total)


def _check_columns(template: Any, columns: int) -> None:
    try:
        template.render([tuple(b"x" for _ in range(columns))], seq=0, slot=1)
    except ConfigurationError as error:
        raise ConfigurationError(
            f"{error} (the input has {columns} source{'s' if columns > 1 else ''})"
        ) from None


def _import_function(target: str, option: str) -> Any:
    """Import the function that ``target`` (``MODULE:FUNCTION``) names."""
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ConfigurationError(
            f"{option} {target!r} must have the form MODULE:FUNCTION, such as "
            "'mypackage.tasks:resize'"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigurationError(
            f"{option} {target!r}: cannot import {module_name!r}: {error}"
        ) from None
    except Exception as error:
        # The module exists but its own code failed: a bug, or a missing
        # setting, that the user fixes in that module.
        raise ConfigurationError(
            f"{option} {target!r}: importing {module_name!r} failed "
            f"({type(error).__name__}: {error})"
        ) from None
    function = getattr(module, function_name, None)
    if function is None or not callable(function):
        raise ConfigurationError(
            f"{option} {target!r}: module {module_name!r} has no function "
            f"{function_name!r}"
        )
    return function


def _load_call(target: str, fallbacks: Sequence[str] = ()) -> Any:
    function = _import_function(target, "--call")
    if fallbacks:
        others = [_import_function(name, "--fallback") for name in fallbacks]
        function = Fallback(function, *others)
    if TaskSpec.from_callable(function).is_async:
        return _AsyncCallAdapter(function)
    return _CallAdapter(function)


class _CallAdapter:
    """Hands a CLI item to a Python function: one column as ``str``, more as a tuple."""

    def __init__(self, function: Any) -> None:
        self.function = function
        self.__qualname__ = getattr(function, "__qualname__", repr(function))
        self.__module__ = getattr(function, "__module__", "?")
        # Offer a context parameter exactly when the function takes one, so
        # that the engine passes the context through.
        parameters = [inspect.Parameter("item", inspect.Parameter.POSITIONAL_ONLY)]
        if TaskSpec.from_callable(function).wants_context:
            parameters.append(
                inspect.Parameter("context", inspect.Parameter.KEYWORD_ONLY)
            )
        self.__signature__ = inspect.Signature(parameters)

    def __call__(self, item: Any, **context: Any) -> Any:
        return self.function(_as_text(item), **context)


class _AsyncCallAdapter(_CallAdapter):
    async def __call__(self, item: Any, **context: Any) -> Any:
        return await self.function(_as_text(item), **context)


def _as_text(item: Any) -> Any:
    if isinstance(item, list):
        return [_as_text(member) for member in item]
    if isinstance(item, tuple):
        texts = tuple(os.fsdecode(value) for value in item)
        return texts[0] if len(texts) == 1 else texts
    return item


def _finite(value: float | None, option: str) -> float | None:
    """Reject NaN and infinity for a numeric option."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{option} {value!r} must be a finite number")
    return value


def _render_text(text: str, option: str) -> Callable[[Any], bytes]:
    """Return the function that renders ``text`` (a template option) for an item."""
    from batchtools.backends._command import CommandTemplate

    if not text.strip():
        raise ConfigurationError(
            f"{option} is empty; give a template of the item, such as '{{//}}'"
        )
    template = CommandTemplate.parse([text])
    if not template.has_replacements or template.uses_seq or template.uses_slot:
        raise ConfigurationError(
            f"{option} {text!r} must contain a replacement string of the "
            "item, such as {} or {//}, and not {#} or {%}, which differ for "
            "every item"
        )

    def render(item: Any) -> bytes:
        return b"\0".join(template.render([item], seq=0, slot=1))

    return render


def _lock_key(text: str) -> Callable[[Any], bytes]:
    """Return the function that renders ``text`` (--serialize-by) for an item."""
    return _render_text(text, "--serialize-by")


def _by_priority(items: Iterable[Any], options: RunOptions) -> Any:
    """Return ``items`` reordered by --priority, the largest first.

    An item whose priority is not a number runs last, with a warning; one
    bad line should not stop a long run.
    """
    from batchtools.flow.prioritized import prioritized

    assert options.priority is not None
    render = _render_text(options.priority, "--priority")

    def priority(item: Any) -> str:
        return os.fsdecode(render(item))

    def run_last(item: Any, error: ConfigurationError) -> float:
        log.warning("%s; the item runs last", error)
        return -math.inf

    return prioritized(
        items,
        priority=priority,
        aging=options.priority_aging,
        on_invalid=run_last,
        name="--priority",
    )


def _checked_jobs(value: int | str | None) -> int | str | None:
    """Check a --jobs value: a whole number, 'auto' or 'auto:MIN-MAX'.

    Returns:
        The value, as an int when it is a number.
    """
    if value is None:
        return None
    policy = Concurrency.parse(value, name="--jobs")
    if policy.is_adaptive or str(value).strip().lower().startswith("auto"):
        return str(value).strip().lower()
    return policy.max


def _plan_from_journal(path: Path, jobs: str | None) -> Plan:
    try:
        run = read_run(path)
    except JournalError as error:
        raise AbortError(str(error)) from None
    stored = run.spec.get("cli")
    if not isinstance(stored, dict):
        raise UsageError(
            f"journal {path} was not made by 'batchtools run'; resume it from the "
            "library with the same items and task"
        )
    try:
        options = RunOptions(**stored)
    except TypeError as error:
        raise AbortError(
            f"journal {path}: its run record is damaged ({error}); it cannot be resumed"
        ) from None
    if jobs is not None:
        options.jobs = jobs
    apply_cluster_overrides(options)
    assert options.input is not None
    input_spec = InputSpec.from_spec(options.input)
    try:
        return _checked_plan(options, input_spec)
    except ConfigurationError as error:
        raise UsageError(str(error)) from None


# -- running ------------------------------------------------------------------


def _execute(
    plan: Plan, flags: dict[str, Any], *, mode: str, journal_path: Path | None = None
) -> NoReturn:
    options = plan.options
    quiet = bool(flags.get("quiet"))
    foreground = bool(flags.get("foreground"))
    if mode == "run" and not flags.get("no_journal") and flags.get("journal"):
        _check_journal_path(Path(flags["journal"]), options)
    debugger = start_debugger(plan, flags)
    job = _prepare(plan)
    if foreground:
        inherit_output(job)
    secrets = job.settings.secrets
    redactor = secrets.redactor if secrets is not None else None
    if redactor is not None:
        # The handler of _setup_logging, and the one that prints the records
        # of a task's own loggers, which the CLI gives no handler.
        handlers = list(logging.getLogger("batchtools").handlers)
        if logging.lastResort is not None:
            handlers.append(logging.lastResort)
        redact_logs(redactor, *handlers)
    results_lock = None
    if options.results is not None:
        results_lock = _hold_results_folder(options.results)
    audit = _open_audit(plan, flags.get("journal") or journal_path)
    if audit is not None and redactor is not None:
        audit.redact = redactor.redact
    metrics = _start_metrics()
    items, journal_rows, rerun = _sources(plan, mode, journal_path)
    if flags.get("item") is not None:
        journal_rows, rerun = [flags["item"]], (flags["item"].state,)
    items = _check_first_item(items, plan)
    if options.priority is not None and journal_rows is None:
        items = _by_priority(items, options)
    # From the journal's creation until the engine's handlers are in place,
    # a stop signal waits, so that it ends the run like any other: exit 130
    # and the resume hint, not click's "Aborted!".
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNAL_EXIT)
    journal = _open_journal(job, mode, journal_path, flags)
    progress = None
    periodic = None
    console: Any = None
    restore_logging = None
    if not quiet and not foreground and sys.stderr.isatty():
        # rich is imported only to draw on a terminal.
        from rich.console import Console

        from batchtools.observe._progress import Progress

        console = Console(stderr=True, highlight=False, soft_wrap=True)
        progress = Progress(console, plan.total)
        restore_logging = log_above(console)
    elif not quiet and not foreground:
        periodic = start_progress_log(plan.total, flags.get("progress_interval"))
    counts = progress or periodic
    if counts is not None and journal_rows is not None and journal_path is not None:
        count_earlier(counts, journal_path, rerun, flags.get("item"))
    writer = OutputWriter(
        Path(options.results) if options.results else None,
        write_stderr=(lambda text: console.out(text, highlight=False))
        if progress
        else None,
        redactor=redactor,
    )
    observers: list[Observer] = []
    if audit is not None:
        observers.append(audit)
    if metrics is not None:
        observers.append(metrics)
    if progress is not None:
        writer.hide_progress_with(progress.hidden)
        observers.append(progress)
        _count_later(plan, progress)
    if periodic is not None:
        observers.append(periodic)
        _count_later(plan, periodic)
    observers.extend(_watchers(flags))
    if debugger is not None:
        if progress is not None:
            debugger.hide_with(progress.hidden)
        observers.append(debugger)
    item_status = ItemStatus() if foreground else None
    if item_status is not None:
        observers.append(item_status)
    engine = build_engine(
        items, job, journal, observers, rerun=rerun, journal_rows=journal_rows
    )
    # Output goes through the engine's output rather than as an observer, so
    # that -k gets input order and a journaled outcome is printed only once
    # it is committed.
    writer.on_start(engine)
    engine.set_output(writer.on_outcome, keep=writer.keep)
    received: list[int] = []
    report: Report | None = None
    aborted: BaseException | None = None

    async def go() -> Report:
        with signal_handlers(engine, received, grace=_grace_seconds(options)):
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            return await engine.run()

    try:
        report = asyncio.run(go())
    except RunAbortedError as error:
        aborted = error
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if progress is not None:
            progress.stop()
        if periodic is not None:
            periodic.stop()
        if restore_logging is not None:
            restore_logging()
        if audit is not None:
            audit.close()
        if metrics is not None:
            metrics.close()
        if results_lock is not None:
            results_lock.release()
    code = _finish(report, aborted, received, journal, quiet, writer.stdout_closed)
    if debugger is not None:
        report_debugging(debugger, journal)
    if item_status is not None and code in (EXIT_OK, EXIT_FAILED):
        code = item_status.exit_status(code)
    if (
        mode == "resume"
        and report is not None
        and report.total == report.carried
        and report.halted is None
    ):
        code = EXIT_OK  # The run had already finished: nothing was left to do.
    sys.exit(code)


def _duration_option(value: str, parameter: click.Parameter) -> float:
    """Return the seconds of a duration option, or fail with a usage error."""
    from batchtools.policy._units import parse_duration

    try:
        return parse_duration(value, name=f"--{parameter.name or ''}".replace("_", "-"))
    except ConfigurationError as error:
        raise click.BadParameter(str(error)) from None


def _watchers(flags: dict[str, Any]) -> list[Observer]:
    """Return the observers that warn of slow attempts and memory growth."""
    from batchtools.observe.watch import MemoryGrowth, SlowAttempts

    slow = SlowAttempts(
        factor=flags.get("slow_factor") or 10.0, after=flags.get("slow_after") or 1.0
    )
    return [slow, MemoryGrowth()]


def reject_database(path: str | os.PathLike[str], option: str) -> None:
    """Exit 2 if ``path`` is an SQLite file, such as a journal, that would be replaced.

    Raises:
        UsageError: The file starts with SQLite's header.
    """
    try:
        with open(path, "rb") as file:
            header = file.read(16)
    except OSError:
        return  # a new file, or one that writing reports on
    if header == b"SQLite format 3\0":
        raise UsageError(
            f"{option} {os.fspath(path)!r} is an SQLite file, such as a journal, "
            "which writing would replace; give another path"
        )


def _start_metrics() -> Metrics | None:
    """Start the file writer and the server of --metrics-file and --metrics-port.

    Raises:
        UsageError: The file cannot be written or the port cannot be used.
    """
    context = click.get_current_context(silent=True)
    meta = context.meta if context is not None else {}
    path = meta.get("batchtools.metrics_file")
    port = meta.get("batchtools.metrics_port")
    if path is None and port is None:
        return None
    # Imported only when one of the options is given, because it loads http.server.
    from batchtools.observe.metrics import Metrics

    # The port chosen for --metrics-port 0 is logged at INFO, which the
    # terminal does not show by default.
    metrics_log = logging.getLogger("batchtools.metrics")
    if metrics_log.getEffectiveLevel() > logging.INFO:
        metrics_log.setLevel(logging.INFO)
    if path is not None:
        reject_database(path, "--metrics-file")
    metrics = Metrics()
    try:
        if path is not None:
            metrics.write_to(path)
        if port is not None:
            metrics.serve(port)
    except ConfigurationError as error:
        metrics.close()
        raise UsageError(str(error)) from None
    return metrics


def _policies(options: RunOptions) -> list[object]:
    policies: list[object] = []
    if options.rate is not None:
        policies.append(RateLimit.parse(options.rate))
    if options.breaker is not None:
        reset = options.breaker_reset or "30s"
        policies.append(CircuitBreaker.parse(options.breaker, reset_timeout=reset))
    elif options.breaker_reset is not None:
        raise ConfigurationError("--breaker-reset needs --breaker")
    if options.cache is not None:
        policies.append(Cache(path=options.cache, ttl=options.cache_ttl))
    elif options.cache_ttl is not None:
        raise ConfigurationError("--cache-ttl needs --cache PATH")
    if (
        options.memfree is not None
        or options.mem_per_item is not None
        or options.max_memory is not None
        or options.max_items_per_worker is not None
    ):
        policies.append(
            Memory(
                free=options.memfree,
                per_item=options.mem_per_item,
                max_worker=options.max_memory,
                max_items_per_worker=options.max_items_per_worker,
            )
        )
    return policies


def _grace_seconds(options: RunOptions) -> float:
    """Return the seconds of ``--grace``, checked by `_prepare` already."""
    from batchtools.policy._units import parse_duration

    if options.grace is None:
        return GRACE
    return parse_duration(options.grace, name="--grace")


def _retry_policy(options: RunOptions) -> Retry | int:
    if options.item_deadline is None:
        return options.retries
    return Retry(attempts=options.retries + 1, deadline=options.item_deadline)


def _prepare(plan: Plan, *, open_cache: bool = True) -> Any:
    """Check every option of ``plan`` and build the job; exit 2 on bad input.

    Without ``open_cache`` (a dry run) the cache file is neither created nor
    opened, but its options are still checked.
    """
    options = plan.options
    try:
        _grace_seconds(options)
        policies = _policies(options)
        if not open_cache:
            policies = [p for p in policies if not isinstance(p, Cache)]
        return prepare(
            plan.task,
            concurrency=options.jobs,
            retry=_retry_policy(options),
            deadline=options.deadline,
            timeout=options.timeout,
            backend=cluster_backend(
                options.backend, options.scheduler, options.local_cluster
            ),
            batch_size=options.max_args,
            halt=options.halt,
            policies=policies,
            ordered=options.keep_order,
            spec={"cli": asdict(options)},
            lock_key=(
                _lock_key(options.serialize_by) if options.serialize_by else None
            ),
            # The next item to start is chosen when a worker is free, so
            # that a later item with a higher priority can go first.
            read_ahead=0 if options.priority is not None else None,
            setup=_import_function(options.setup, "--setup") if options.setup else None,
            teardown=(
                _import_function(options.teardown, "--teardown")
                if options.teardown
                else None
            ),
            # Read in every session, so resume and retry see current values.
            secrets=(
                SecretStore.from_specs(options.secrets) if options.secrets else None
            ),
        )
    except ConfigurationError as error:
        raise UsageError(str(error)) from None


def _check_journal_path(path: Path, options: RunOptions) -> None:
    """Reject a --journal path that cannot hold a journal, before anything runs."""
    if options.cache is not None and Path(options.cache).absolute() == path.absolute():
        raise UsageError(
            f"--journal and --cache both name {str(path)!r}; give them different files"
        )
    try:
        if path.is_dir():
            raise UsageError(
                f"--journal {str(path)!r} is a folder; give a file path inside "
                "it, such as " + repr(str(path / "run.db"))
            )
        folder = path.parent
        if not folder.exists():
            raise UsageError(
                f"--journal {str(path)!r}: the folder {str(folder)!r} does not "
                "exist; create it first"
            )
        if not folder.is_dir():
            raise UsageError(
                f"--journal {str(path)!r}: {str(folder)!r} is not a folder"
            )
    except OSError as error:
        raise UsageError(
            f"--journal {str(path)!r} cannot be used: {error.strerror}"
        ) from None


def _set_audit_options(options: RunOptions, flags: dict[str, Any]) -> None:
    """Copy the --audit options of `run` into ``options``, to keep in the journal.

    The path is made absolute, so that resume and retry started in another
    folder append to the same file.
    """
    if flags["audit"] is None:
        for name in ("audit_flush", "audit_max_size", "audit_backups"):
            if flags[name] is not None:
                option = "--" + name.replace("_", "-")
                raise ConfigurationError(f"{option} needs --audit PATH")
        return
    from batchtools.policy._units import parse_duration, parse_size

    if flags["audit_flush"] is not None:
        parse_duration(flags["audit_flush"], name="--audit-flush")
    if flags["audit_max_size"] is not None:
        parse_size(flags["audit_max_size"], name="--audit-max-size")
    options.audit = os.path.abspath(flags["audit"])
    options.audit_flush = flags["audit_flush"]
    options.audit_max_size = flags["audit_max_size"]
    options.audit_backups = flags["audit_backups"]


def _open_audit(plan: Plan, journal: str | Path | None) -> AuditLog | None:
    """Create the --audit log, or return ``None`` without --audit; exit 2 if invalid."""
    options = plan.options
    if options.audit is None:
        return None
    path = Path(options.audit).absolute()
    for option, other in (("--journal", journal), ("--cache", options.cache)):
        if other is not None and Path(other).absolute() == path:
            raise UsageError(
                f"--audit and {option} both name {str(path)!r}; give them "
                "different files"
            )
    try:
        return AuditLog(
            path,
            task=options.call or options.command,
            flush_interval=options.audit_flush or 1.0,
            max_bytes=options.audit_max_size,
            backups=5 if options.audit_backups is None else options.audit_backups,
        )
    except ConfigurationError as error:
        raise UsageError(str(error)) from None


def _hold_results_folder(folder: str) -> FileLock:
    """Create the --results folder and lock it for this run.

    Two runs given the same folder write the same item folders when their
    items are the same, so the second waits for the first to finish.
    """
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UsageError(
            f"--results {folder!r}: cannot create the folder: {error.strerror}"
        ) from None
    if not os.access(folder, os.W_OK):
        raise UsageError(f"--results {folder!r}: the folder is not writable")
    try:
        lock = FileLock(Path(folder) / RESULTS_LOCK)
        try:
            lock.acquire(timeout=0)
        except LockTimeoutError as error:
            holder = (
                f"the run of process {error.holder_pid}"
                if error.holder_pid
                else "another run"
            )
            log.warning(
                "waiting for --results %s, which %s is writing; press Ctrl-C to "
                "give up, or give another folder",
                folder,
                holder,
            )
            lock.acquire()
    except (ConfigurationError, OSError) as error:
        raise UsageError(
            f"--results {folder!r}: cannot lock the folder: {error}"
        ) from None
    return lock


def _sources(
    plan: Plan, mode: str, journal_path: Path | None
) -> tuple[Iterable[Any], Iterable[Any] | None, tuple[str, ...]]:
    if mode == "retry":
        assert journal_path is not None
        return [], iter_items(journal_path, ["failed"]), ("failed",)
    if mode == "resume" and plan.input.reads_stdin:
        assert journal_path is not None
        if not read_run(journal_path).input_complete:
            log.warning(
                "standard input was not read to its end before the run stopped; "
                "resume runs the items that were read, and the rest is lost"
            )
        return [], iter_items(journal_path, list(_RERUN)), _RERUN
    return plan.input.items(), None, _RERUN


def _check_first_item(items: Iterable[Any], plan: Plan) -> Iterable[Any]:
    """Read the first item before anything runs, so that input errors come first."""
    if isinstance(items, list):
        return items
    iterator = iter(items)
    try:
        first = next(iterator)
    except StopIteration:
        return []
    except OSError as error:
        raise UsageError(f"cannot read the input: {error}") from None
    return itertools.chain([first], iterator)


def _open_journal(
    job: Any, mode: str, journal_path: Path | None, flags: dict[str, Any]
) -> Journal | None:
    try:
        if mode in ("resume", "retry"):
            assert journal_path is not None
            return Journal.open_existing(journal_path, signature=job.signature)
        if flags.get("no_journal"):
            return None
        path = flags.get("journal")
        if path is None:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            path = JOURNAL_FOLDER / f"{stamp}-{job.settings.run_id[:8]}.db"
            JOURNAL_FOLDER.mkdir(mode=0o700, exist_ok=True)
        return open_journal(path, job, force=bool(flags.get("force")))
    except JournalMismatchError as error:
        raise UsageError(str(error)) from None
    except JournalError as error:
        raise AbortError(str(error)) from None


def _count_later(plan: Plan, progress: ProgressCounts) -> None:
    """Count the items of input files on a helper thread, for the ETA."""
    if plan.total is not None or plan.input.reads_stdin:
        return

    def count() -> None:
        try:
            progress.total = plan.input.count_in_files()
        except OSError:
            pass

    threading.Thread(target=count, name="batchtools-count", daemon=True).start()


def _finish(
    report: Report | None,
    aborted: BaseException | None,
    received: list[int],
    journal: Journal | None,
    quiet: bool,
    output_closed: bool = False,
) -> int:
    err = sys.stderr
    if report is not None and not quiet:
        for line in summary_lines(report):
            click.echo(line, file=err)
    if aborted is not None:
        click.echo(f"Error: {aborted}", file=err)
        # A damaged journal cannot be resumed, and its error names the next step.
        damaged = any(
            isinstance(error, JournalError) and not error.resumable
            for error in (aborted, aborted.__cause__)
        )
        if journal is not None and not damaged:
            click.echo(
                f"What was committed is kept; after fixing the cause, run: "
                f"batchtools resume {journal.path}",
                file=err,
            )
        return EXIT_ABORTED
    assert report is not None
    if received:
        name = signal.Signals(received[0]).name
        if journal is not None:
            click.echo(
                f"Interrupted by {name}. Finish the run with: "
                f"batchtools resume {journal.path}",
                file=err,
            )
        else:
            click.echo(f"Interrupted by {name}.", file=err)
        return _SIGNAL_EXIT.get(signal.Signals(received[0]), 128 + received[0])
    if output_closed:
        hint = f"; finish it with: batchtools resume {journal.path}" if journal else ""
        click.echo(f"Standard output was closed, so the run stopped{hint}", file=err)
        return EXIT_OUTPUT_CLOSED
    if report.halted is not None and report.ok:
        # Nothing failed, but items may not have run (a deadline passed).
        hint = f"; finish it with: batchtools resume {journal.path}" if journal else ""
        click.echo(f"The run stopped early{hint}", file=err)
        return EXIT_FAILED
    if report.ok:
        return EXIT_OK
    if report.counts["failed"] and journal is not None and not quiet:
        click.echo(
            f"Re-run the failed items with: batchtools retry {journal.path}", file=err
        )
    return EXIT_FAILED


def _dry_run(plan: Plan) -> None:
    from batchtools.backends._command import CommandTemplate

    task = plan.task
    out = sys.stdout.buffer
    size = plan.options.max_args
    items = iter(plan.input.items())
    failed = 0
    for seq in itertools.count():
        batch = list(itertools.islice(items, size))
        if not batch:
            break
        if isinstance(task, CommandTemplate):
            try:
                argv = task.render(
                    batch,
                    seq=seq,
                    slot=seq % _slots(plan.options.jobs) + 1,
                    batch=size > 1,
                )
            except ConfigurationError as error:
                # The real run fails just this item, so the dry run goes on.
                failed += 1
                click.echo(f"Error: item {seq + 1}: {error}", err=True)
                continue
            out.write(b" ".join(_quote(arg) for arg in argv) + b"\n")
        else:
            arguments = ", ".join(preview(item) for item in batch)
            out.write(f"{plan.options.call}({arguments})\n".encode())
    out.flush()
    if failed:
        sys.exit(EXIT_FAILED)


def _slots(jobs: int | str | None) -> int:
    """Return the job slots that {%} counts for ``jobs``; 'auto' has its maximum."""
    if jobs is None:
        return 1
    return Concurrency.parse(jobs, name="--jobs").max


def _quote(arg: bytes) -> bytes:
    from batchtools.backends._command import quote_for_shell

    return quote_for_shell(arg)


def _latest(accept: Callable[[RunRecord], bool], what: str = "run") -> Path:
    candidates = []
    for path in JOURNAL_FOLDER.glob("*.db") if JOURNAL_FOLDER.is_dir() else []:
        try:
            run = read_run(path)
        except JournalError:
            continue
        if accept(run):
            candidates.append((run.created, path))
    if not candidates:
        raise UsageError(f"no {what} under {JOURNAL_FOLDER}/; give the journal's path")
    return max(candidates)[1]


def _latest_unfinished() -> Path:
    return _latest(lambda run: run.state != "finished", "unfinished run")


def _is_locked(path: Path) -> bool:
    import filelock

    lock = filelock.FileLock(str(path) + ".lock", timeout=0, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        return True
    except OSError:
        return False
    lock.release()
    return False


def _print_failed(path: Path, null: bool) -> None:
    out = sys.stdout.buffer
    end = b"\0" if null else b"\n"
    warned = False
    for row in iter_items(path, ["failed"]):
        item = row.item
        if isinstance(item, tuple):
            line = b"\t".join(item)
        else:
            line = os.fsencode(str(item))
        if not null and b"\n" in line and not warned:
            warned = True
            click.echo(
                "Warning: some failed items contain a newline, so one line per "
                "item cannot represent them; use -0 and read them back with "
                "'batchtools run -0'.",
                err=True,
            )
        out.write(line + end)


def _setup_logging(verbose: int, quiet: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("batchtools: %(message)s"))
    root = logging.getLogger("batchtools")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(
        logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    )
    # A retry is routine; it is shown with -v only.
    logging.getLogger("batchtools.retry").setLevel(
        logging.INFO if verbose else logging.ERROR
    )
    logging.getLogger("batchtools.engine").setLevel(
        logging.INFO if verbose else logging.ERROR
    )


def cli_main() -> None:
    """Run the command line, turning unexpected library errors into exit 3."""
    try:
        main(standalone_mode=True)
    except BatchtoolsError as error:
        click.echo(f"Error: {error}", err=True)
        sys.exit(EXIT_ABORTED)
