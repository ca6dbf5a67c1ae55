"""Job files with a ``[pipeline]`` table: stages run one after another per item.

A pipeline job file takes its items from ``[input]``, as ``batchtools run``
job files do, and lists its stages in order::

    [run]                       # optional; see below
    keep_order = true

    [input]                     # one of: args, files, glob, stdin
    files = ["urls.txt"]

    [[pipeline.stages]]
    name = "fetch"
    command = ["curl", "-fsS", "{}"]
    jobs = 8
    retries = 2
    timeout = "30s"

    [[pipeline.stages]]
    call = "mypackage.pages:title"
    backend = "process"

Each stage has ``command`` or ``call`` and optionally ``name``, ``jobs``,
``backend``, ``retries`` and ``timeout``. The first stage gets each input
item as ``batchtools run`` passes it; a later stage gets the value of the
stage before it. A command stage passes on its stdout as text, without
its trailing newline. The value of the last stage is printed, one per
item, to stdout.

In ``[run]``, ``jobs``, ``retries`` and ``timeout`` are defaults for every
stage, and ``keep_order``, ``shell``, ``null`` and ``colsep`` apply as for
``batchtools run``. The other ``[run]`` options are rejected: a pipeline
runs without a journal, so it cannot be resumed.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from batchtools._exceptions import ConfigurationError, RunAbortedError
from batchtools.backends._command import CommandTemplate
from batchtools.backends._subprocess import CommandResult
from batchtools.cli._inputs import InputSpec, Source
from batchtools.cli._jobfile import Duration, Jobs, Retries, read_toml, schema_error
from batchtools.cli._output import OutputWriter
from batchtools.cli.main import (
    EXIT_USAGE,
    _check_columns,
    _finish,
    _import_function,
    _job_file_input,
    _load_call,
    _setup_logging,
    _shell_words,
)
from batchtools.engine._outcome import Outcome, Report, State
from batchtools.flow.pipeline import Pipeline, PipelineReport, Stage
from batchtools.observe._summary import summary_lines

if TYPE_CHECKING:
    from batchtools.cli._jobfile import JobFile, RunTable
    from batchtools.engine._engine import Engine

# The [run] options that a pipeline honours; the rest need a journal or
# apply to a single task.
RUN_OPTIONS = frozenset(
    {"jobs", "retries", "timeout", "keep_order", "shell", "null", "colsep"}
)
_Model = TypeVar("_Model", bound=BaseModel)


class StageTable(BaseModel):
    """One ``[[pipeline.stages]]`` table: a command or a call and its policies."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = None
    command: str | list[str] | None = None
    call: str | None = None
    jobs: Jobs = None
    backend: str | None = None
    retries: Retries = None
    timeout: Duration = None


class PipelineTable(BaseModel):
    """The ``[pipeline]`` table: its stages, in order."""

    model_config = ConfigDict(extra="forbid", strict=True)

    stages: list[StageTable] = Field(min_length=1)


@dataclass(slots=True)
class PipelinePlan:
    """A checked pipeline job, ready to run.

    Attributes:
        pipeline: The stages.
        input: Where the items come from.
        ordered: Print values in input order.
    """

    pipeline: Pipeline
    input: InputSpec
    ordered: bool


def is_pipeline_job(path: str) -> bool:
    """Return whether the job file at ``path`` has a ``[pipeline]`` table.

    An unreadable or invalid file returns false, so that the caller's own
    loading reports the problem.
    """
    try:
        with open(path, "rb") as stream:
            return "pipeline" in tomllib.load(stream)
    except (OSError, ValueError, RecursionError):
        # ValueError covers TOMLDecodeError and a file that is not UTF-8.
        return False


def load_pipeline_job(path: str) -> tuple[JobFile, PipelineTable]:
    """Read and validate a job file that has a ``[pipeline]`` table.

    Raises:
        ConfigurationError: The file is unreadable, not TOML, or does not
            match the schema; the message names the file and the key.
    """
    from batchtools.cli._jobfile import JobFile

    data = read_toml(path)
    table = data.pop("pipeline", None)
    if table is None:
        raise ConfigurationError(f"job file {path!r} has no [pipeline] table")
    for other in ("task", "tasks"):
        if other in data:
            raise ConfigurationError(
                f"job file {path!r} has both [{other}] and [pipeline]; a "
                "pipeline's tasks are its stages, so remove one of them"
            )
    pipeline = _validated(PipelineTable, table, path, "pipeline")
    job = _validated(JobFile, data, path, "")
    return job, pipeline


def _validated(model: type[_Model], data: Any, path: str, prefix: str) -> _Model:
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise schema_error(path, error, [prefix] if prefix else []) from None


def plan_pipeline_job(path: str, *, keep_order: bool = False) -> PipelinePlan:
    """Check a pipeline job file and build its stages, before anything runs.

    Args:
        path: The job file.
        keep_order: Print values in input order, even where the file's
            ``keep_order`` is false.

    Raises:
        ConfigurationError: The file, a stage, a template or an input file
            is invalid; the message names the file and the stage.
    """
    job, table = load_pipeline_job(path)
    run = job.run
    unsupported = sorted(run.model_fields_set - RUN_OPTIONS)
    if unsupported:
        raise ConfigurationError(
            f"job file {path!r}: [run] option {unsupported[0]!r} does not apply to "
            "a [pipeline] job, which runs without a journal; remove it"
        )
    input_spec = _input_of(job, path)
    columns = len(input_spec.sources) if input_spec.colsep is None else None
    stages = [
        _stage(stage, position, run, columns, path)
        for position, stage in enumerate(table.stages, start=1)
    ]
    pipeline = Pipeline(stages)
    return PipelinePlan(pipeline, input_spec, keep_order or bool(run.keep_order))


def _input_of(job: JobFile, path: str) -> InputSpec:
    sources = [
        name
        for name in ("args", "files", "glob")
        if getattr(job.input, name) is not None
    ]
    if job.input.stdin:
        sources.append("stdin")
    if len(sources) > 1:
        raise ConfigurationError(
            f"job file {path!r}: [input] has {' and '.join(sources)}; give only one"
        )
    input_spec = _job_file_input(job) or InputSpec([Source("stdin")])
    input_spec.null = bool(job.run.null)
    input_spec.colsep = job.run.colsep
    input_spec.check()
    return input_spec


def _stage(
    table: StageTable, position: int, run: RunTable, columns: int | None, path: str
) -> Stage:
    """Build stage ``position`` (from 1) of the file's ``[pipeline]`` table.

    Args:
        columns: The columns of the items this stage gets, when known:
            those of the input for the first stage, one for the others.
    """
    label = f"job file {path!r}: [pipeline] stage {position}"
    if table.command is not None and table.call is not None:
        raise ConfigurationError(f"{label} has both command and call; give only one")
    task: Any
    if table.command is not None:
        try:
            task = _template(table.command, bool(run.shell))
            expected = columns if position == 1 else 1
            if not task.shell and expected is not None:
                _check_columns(task, expected)
        except ConfigurationError as error:
            raise ConfigurationError(f"{label}: {error}") from None
    elif table.call is not None:
        task = _import_function(table.call, f"{label} call")
        if position == 1:
            # Hands the function text instead of the CLI's tuples of bytes.
            task = _load_call(table.call)
    else:
        raise ConfigurationError(
            f"{label} has neither command nor call; give one, such as "
            "command = ['gzip', '-c', '{}']"
        )
    return Stage(
        task,
        name=table.name,
        concurrency=table.jobs if table.jobs is not None else run.jobs,
        backend=table.backend,
        retry=table.retries if table.retries is not None else run.retries,
        timeout=table.timeout if table.timeout is not None else run.timeout,
    )


def _template(command: str | list[str], shell: bool) -> CommandTemplate:
    if shell:
        text = command if isinstance(command, str) else " ".join(command)
        return CommandTemplate.parse(text, shell=True)
    words = _shell_words(command) if isinstance(command, str) else list(command)
    return CommandTemplate.parse(words)


class StderrPassThrough:
    """An engine observer that copies a succeeded command's stderr to ours.

    A command stage's stdout becomes the next stage's value, but its
    stderr is meant for the person running it. Failed commands are left
    out: `OutputWriter` passes their output through with the final outcome.
    """

    def on_start(self, engine: Engine) -> None:
        return None

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        return None

    def on_outcome(self, outcome: Outcome) -> None:
        result = outcome.value
        if (
            not isinstance(result, CommandResult)
            or outcome.state is not State.SUCCEEDED
        ):
            return
        if result.captured_stderr.size:
            result.write_stderr_to(sys.stderr.buffer)
            sys.stderr.buffer.flush()

    def on_finish(self, report: Report) -> None:
        return None


def run_pipeline_job(path: str, *, quiet: bool, verbose: int, keep_order: bool) -> int:
    """Run a job file's ``[pipeline]`` over its ``[input]``; return the exit status.

    Prints the last stage's value of each item to stdout as it finishes
    (a failed command's output passes through as with ``batchtools run``),
    and a summary with each stage's counts to stderr unless ``quiet``.

    Args:
        path: The job file.
        quiet: Print no summary.
        verbose: With 1, log retries and stops; with 2, debug messages too.
        keep_order: Print values in input order.

    Returns:
        The exit status: 0 when every item succeeded, 1 when some item
        failed or was cancelled, and 2 for an invalid job file or input,
        found before anything ran. 3 when a stage could not go on. 130,
        129 or 143 after SIGINT, SIGHUP or SIGTERM, and 141 when standard
        output was closed.
    """
    _setup_logging(verbose, quiet)
    try:
        plan = plan_pipeline_job(path, keep_order=keep_order)
        items = _with_first_item(plan.input.items())
        stream = plan.pipeline.astream(
            items, ordered=plan.ordered, observers=[StderrPassThrough()]
        )
    except ConfigurationError as error:
        click.echo(f"Error: {error}", err=True)
        return EXIT_USAGE
    writer = OutputWriter()
    received: list[int] = []

    async def go() -> None:
        async with stream:
            with stream.stop_on_signals(received):
                while batch := await stream.next_batch():
                    for outcome in batch:
                        writer.on_outcome(outcome)
                    if writer.stdout_closed:
                        stream.stop("standard output was closed")

    aborted: RunAbortedError | None = None
    try:
        asyncio.run(go())
    except RunAbortedError as error:
        aborted = error
    if not quiet:
        for line in pipeline_summary_lines(stream.report):
            click.echo(line, err=True)
    return _finish(stream.report, aborted, received, None, True, writer.stdout_closed)


def _with_first_item(items: Iterable[Any]) -> Iterable[Any]:
    """Read the first item before anything runs, so that input errors come first."""
    iterator = iter(items)
    try:
        first = next(iterator)
    except StopIteration:
        return []
    except OSError as error:
        raise ConfigurationError(f"cannot read the input: {error}") from None
    return itertools.chain([first], iterator)


def pipeline_summary_lines(report: PipelineReport) -> list[str]:
    """Return the end-to-end summary of ``report`` and a line per stage."""
    lines = summary_lines(report)
    lines.append("Stages:")
    for stage in report.stages:
        counts = ", ".join(
            f"{count} {name}"
            for name, count in stage.counts.items()
            if count or name in ("succeeded", "failed")
        )
        line = f"  {stage.name}: {counts}; {stage.attempts} attempts"
        if stage.median_seconds is not None:
            assert stage.p95_seconds is not None and stage.max_seconds is not None
            line += (
                f", median {_format_seconds(stage.median_seconds)}, "
                f"p95 {_format_seconds(stage.p95_seconds)}, "
                f"max {_format_seconds(stage.max_seconds)}"
            )
        lines.append(line)
    return lines


def _format_seconds(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds:.2f} s"


@click.command("pipeline")
@click.argument("job_file", metavar="JOB.toml")
@click.option(
    "-k",
    "--keep-order",
    is_flag=True,
    help="Print values in input order instead of as items finish.",
)
@click.option("-v", "--verbose", count=True, help="Log retries and full tracebacks.")
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
def pipeline_command(
    job_file: str, keep_order: bool, verbose: int, quiet: bool
) -> None:
    """Run the stages of JOB.toml's [pipeline] over the items of its [input].

    Each item goes through the stages in order and moves on as soon as it
    leaves a stage. An item that fails in a stage goes no further. The
    last stage's value of each item is printed to stdout. A pipeline keeps
    no journal, so it cannot be resumed.
    """
    sys.exit(
        run_pipeline_job(job_file, quiet=quiet, verbose=verbose, keep_order=keep_order)
    )
