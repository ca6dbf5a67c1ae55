"""The ``batchtools graph`` command: run the graph of tasks in a TOML job file.

A graph job file names its tasks in ``[tasks.NAME]`` tables::

    [run]                         # optional
    jobs = 4                      # tasks that run at once (-j overrides)
    journal = "runs/site.db"      # resume here on the next run (--journal)

    [tasks.thumbs]                # a task over items: it has an input
    input = { glob = "photos/*.jpg" }   # or args = [...], files = [...]
    command = ["convert", "{}", "thumbs/{/.}.png"]
    jobs = 8                      # items of this task that run at once
    retries = 2
    timeout = "60s"
    allow_failures = "5%"         # true, a count, or a percentage

    [tasks.index]                 # a single operation: no input
    needs = ["thumbs"]
    call = "site.build:index"     # or command = [...]
    estimate = "30s"              # weighs the critical path of --dry-run

Each task has either ``command`` or ``call``. A task's input is read when
the task starts, so a glob matches what earlier tasks made. Relative paths
are taken from the current directory.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import click
from pydantic import ValidationError, field_validator

from batchtools._exceptions import (
    ConfigurationError,
    JournalError,
    JournalMismatchError,
    RunAbortedError,
)
from batchtools.backends._base import TaskSpec
from batchtools.backends._command import CommandTemplate
from batchtools.cli._inputs import InputSpec
from batchtools.cli._jobfile import (
    Count,
    Duration,
    InputTable,
    Jobs,
    PathText,
    Retries,
    _Strict,
    read_toml,
    schema_error,
)
from batchtools.cli._output import OutputWriter
from batchtools.cli.main import (
    _SIGNAL_EXIT,
    EXIT_ABORTED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_OUTPUT_CLOSED,
    AbortError,
    UsageError,
    _AsyncCallAdapter,
    _CallAdapter,
    _import_function,
    _job_file_input,
    _setup_logging,
    _shell_words,
)
from batchtools.engine._engine import Engine, Observer
from batchtools.engine._outcome import Outcome, Report, State
from batchtools.flow._graph_plan import Allowance, task_key
from batchtools.flow.graph import Graph, GraphReport, Task, summary_lines
from batchtools.observe._summary import format_duration


class GraphRunTable(_Strict):
    """The optional ``[run]`` table of a graph job file."""

    jobs: Count = None
    journal: PathText = None


class GraphTaskTable(_Strict):
    """One ``[tasks.NAME]`` table: a command or call, over an input or once."""

    needs: list[str] = []
    command: str | list[str] | None = None
    call: str | None = None
    shell: bool = False
    input: InputTable | None = None
    backend: str | None = None
    jobs: Jobs = None
    max_args: Count = None
    retries: Retries = None
    timeout: Duration = None
    allow_failures: bool | int | str | None = None
    estimate: Duration = None

    @field_validator("allow_failures")
    @classmethod
    def _allowance(cls, value: bool | int | str | None) -> bool | int | str | None:
        try:
            Allowance.parse(value, task="")
        except ConfigurationError:
            raise ValueError(
                "must be true, a count of items such as 3, or a percentage such as '5%'"
            ) from None
        return value


class GraphFile(_Strict):
    """A whole graph job file."""

    run: GraphRunTable = GraphRunTable()
    tasks: dict[str, GraphTaskTable]


def load_graph_file(path: str) -> GraphFile:
    """Read and validate a graph job file.

    Raises:
        ConfigurationError: The file is unreadable, not TOML, or does not
            match the schema; the message names the file and the key.
    """
    data = read_toml(path)
    if "tasks" not in data:
        raise ConfigurationError(
            f"job file {path!r} has no [tasks.NAME] tables; a job file with a "
            "single [task] runs with 'batchtools run -f'"
        )
    try:
        return GraphFile.model_validate(data)
    except ValidationError as error:
        raise schema_error(path, error) from None


def build_graph(path: str, job_file: GraphFile) -> Graph:
    """Turn the tasks of a checked job file into a `Graph`.

    Raises:
        ConfigurationError: A task is invalid; the message names the file
            and the task's key.
    """
    graph = Graph()
    for name, table in job_file.tasks.items():
        where = f"job file {path!r}: tasks.{name}"
        try:
            _add_task(graph, name, table)
        except ConfigurationError as error:
            message = str(error)
            prefix = f"task {name!r}: "
            if message.startswith(prefix):
                message = message[len(prefix) :]
            raise ConfigurationError(f"{where}: {message}") from None
    try:
        graph.check()
    except ConfigurationError as error:
        raise ConfigurationError(f"job file {path!r}: {error}") from None
    return graph


def _add_task(graph: Graph, name: str, table: GraphTaskTable) -> None:
    if (table.command is None) == (table.call is None):
        raise ConfigurationError("give either command or call")
    items = None
    if table.input is not None:
        items = _input_reader(table)
    else:
        for option in ("jobs", "max_args", "allow_failures"):
            if getattr(table, option) is not None:
                raise ConfigurationError(
                    f"{option} applies to a task over items; give it an input, "
                    "or remove the option"
                )
    operation: Any
    if table.call is not None:
        if table.shell:
            raise ConfigurationError("shell applies to command, not to call")
        function = _import_function(table.call, f"tasks.{name}.call")
        operation = function
        if items is not None:
            # Items are tuples of bytes; the adapter hands over text, as
            # 'batchtools run --call' does.
            is_async = TaskSpec.from_callable(function).is_async
            operation = (_AsyncCallAdapter if is_async else _CallAdapter)(function)
    elif table.shell:
        # A script as it is, or the words of a list joined, as 'run --shell' does.
        command = table.command
        assert command is not None
        script = command if isinstance(command, str) else " ".join(command)
        operation = CommandTemplate.parse(script, shell=True)
    else:
        command = table.command
        assert command is not None
        words = _shell_words(command) if isinstance(command, str) else command
        operation = CommandTemplate.parse(words)
    graph.add(
        name,
        operation,
        needs=table.needs,
        items=items,
        concurrency=table.jobs,
        retry=table.retries,
        timeout=table.timeout,
        backend=table.backend,
        batch_size=table.max_args,
        allow_failures=table.allow_failures,
        estimate=table.estimate,
    )


class _InputReader:
    """Reads a task's input when the task starts, checking its files first."""

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def __call__(self) -> Any:
        self.spec.check()
        return self.spec.items()


def _input_reader(table: GraphTaskTable) -> _InputReader:
    assert table.input is not None
    sources = [
        name
        for name in ("args", "files", "glob")
        if getattr(table.input, name) is not None
    ]
    if table.input.stdin:
        raise ConfigurationError(
            "input cannot be stdin, since several tasks may run at once; give "
            "args, files or glob"
        )
    if len(sources) != 1:
        listed = " and ".join(sources) if sources else "nothing"
        raise ConfigurationError(
            f"input has {listed}; give exactly one of args, files or glob"
        )
    spec = _job_file_input(table)
    assert spec is not None
    return _InputReader(spec)


# -- the command ------------------------------------------------------------


@click.command("graph")
@click.argument("job_file", metavar="JOB.toml")
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the order of the tasks and the critical path; run nothing.",
)
@click.option(
    "--journal",
    metavar="PATH",
    default=None,
    help="Journal of the graph; a second run with it skips the tasks that "
    "succeeded.  [default: the job file's [run] journal, else none]",
)
@click.option(
    "-j",
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Tasks that run at once.  [default: the number of CPUs]",
)
@click.option(
    "--force",
    is_flag=True,
    help="Reuse a --journal made by a different graph.",
)
@click.option("-v", "--verbose", count=True, help="Log retries and full tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
def graph_command(
    job_file: str,
    dry_run: bool,
    journal: str | None,
    jobs: int | None,
    force: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Run the graph of tasks described in JOB.toml.

    Each [tasks.NAME] table is a task: a command or a Python function, run
    once or over the items of its input. A task starts as soon as every
    task in its 'needs' has succeeded. When a task fails, the tasks that
    need it are skipped and the others go on.

    Exit status: 0 when every task succeeded, 1 when a task failed or was
    skipped, 2 for an invalid job file, 3 when a journal failed, 130 after
    SIGINT.
    """
    _setup_logging(verbose, quiet)
    try:
        job = load_graph_file(job_file)
        graph = build_graph(job_file, job)
    except ConfigurationError as error:
        raise UsageError(str(error)) from None
    if dry_run:
        _print_plan(graph)
        return
    journal = journal if journal is not None else job.run.journal
    _execute(graph, jobs or job.run.jobs, journal, force, quiet)


def _print_plan(graph: Graph) -> None:
    """Print the levels of the graph and its critical path."""
    levels = graph.levels()
    click.echo(
        f"{len(graph)} tasks in {len(levels)} levels; the tasks of a level "
        "need only tasks of earlier levels:"
    )
    for number, level in enumerate(levels, start=1):
        click.echo(f"  {number}. {', '.join(task_key(name) for name in level)}")
    path = graph.critical_path()
    if path.by_estimate:
        chain = " -> ".join(
            f"{task_key(name)} ({_estimate(graph.tasks[name])})" for name in path.tasks
        )
        click.echo(f"Critical path, {format_duration(path.length)} by estimate:")
    else:
        chain = " -> ".join(task_key(name) for name in path.tasks)
        click.echo(f"Critical path, {len(path.tasks)} tasks:")
    click.echo(f"  {chain}")


def _estimate(task: Task) -> str:
    if task.estimate is None:
        return "no estimate"
    return format_duration(task.estimate)


class _GraphOutput:
    """Prints the values of call tasks and stops the graph when stdout closes.

    A graph engine observer. Commands print through an `OutputWriter` on
    their task's own engine. This observer watches those writers too, and
    stops admission of new tasks once one of them found stdout closed.
    """

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.writers: list[OutputWriter] = []
        self.engine: Engine | None = None
        self.printer = OutputWriter()

    def task_observers(self, task: Task) -> Sequence[Observer]:
        writer = OutputWriter()
        self.writers.append(writer)
        return [writer]

    @property
    def stdout_closed(self) -> bool:
        return self.printer.stdout_closed or any(
            writer.stdout_closed for writer in self.writers
        )

    def on_start(self, engine: Engine) -> None:
        self.engine = engine
        self.printer.on_start(engine)

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        return None

    def on_outcome(self, outcome: Outcome) -> None:
        task = self.graph.tasks.get(outcome.item)
        if task is not None and task.runs_inline and outcome.state is State.SUCCEEDED:
            self.printer.on_outcome(outcome)
        if self.stdout_closed and self.engine is not None:
            self.engine.stop("standard output was closed")

    def on_finish(self, report: Report) -> None:
        self.printer.on_finish(report)


def _execute(
    graph: Graph, jobs: int | None, journal: str | None, force: bool, quiet: bool
) -> NoReturn:
    if journal is not None and Path(journal).is_dir():
        raise UsageError(
            f"--journal {journal!r} is a folder; give a file path inside it, such "
            f"as {str(Path(journal) / 'graph.db')!r}"
        )
    output = _GraphOutput(graph)
    aborted: BaseException | None = None
    report: GraphReport | None = None
    try:
        report = graph.run(
            concurrency=jobs,
            journal=journal,
            force=force,
            observers=[output],
            task_observers=output.task_observers,
            handle_signals=True,
        )
    except (ConfigurationError, JournalMismatchError) as error:
        raise UsageError(str(error)) from None
    except JournalError as error:
        raise AbortError(str(error)) from None
    except RunAbortedError as error:
        aborted = error
    sys.exit(_finish(report, aborted, journal, quiet, output.stdout_closed))


def _finish(
    report: GraphReport | None,
    aborted: BaseException | None,
    journal: str | None,
    quiet: bool,
    output_closed: bool,
) -> int:
    """Print the summary and what to do next; return the exit status."""
    err = sys.stderr
    if report is not None and not quiet:
        for line in summary_lines(report):
            click.echo(line, file=err)
    again = "run the same command again"
    if aborted is not None:
        click.echo(f"Error: {aborted}", file=err)
        if journal is not None:
            click.echo(
                f"What was committed is kept; after fixing the cause, {again}.",
                file=err,
            )
        return EXIT_ABORTED
    assert report is not None
    if report.signals:
        number = signal.Signals(report.signals[0])
        hint = f" To finish the graph, {again}." if journal is not None else ""
        click.echo(f"Interrupted by {number.name}.{hint}", file=err)
        return _SIGNAL_EXIT.get(number, 128 + number)
    if output_closed:
        click.echo("Standard output was closed, so the graph stopped.", file=err)
        return EXIT_OUTPUT_CLOSED
    if report.ok:
        return EXIT_OK
    if journal is not None and not quiet:
        click.echo(
            f"To run the failed and skipped tasks again, {again}; the tasks "
            f"that succeeded are not run again (journal {journal}).",
            file=err,
        )
    return EXIT_FAILED
