"""TOML job files: a repeatable run described in a file, validated up front.

A job file has three tables::

    [run]                       # the options of `batchtools run`
    jobs = 8
    journal = "runs/thumbs.db"
    retries = 3
    timeout = "60s"

    [input]                     # one of: args, files, glob, stdin
    glob = "photos/**/*.jpg"

    [task]                      # one of: command, call
    command = ["convert", "{}", "-resize", "256x256", "thumbs/{/.}.png"]

Relative paths are taken from the current directory, like the paths on a
command line. Options given on the command line or through environment
variables override the file.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Sequence
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from batchtools._exceptions import ConfigurationError
from batchtools.policy._units import parse_duration, parse_size
from batchtools.policy.concurrency import Concurrency


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _checked(check: Callable[[Any], object]) -> AfterValidator:
    """Run ``check`` on a value that is set; its error becomes pydantic's."""

    def validate(value: Any) -> Any:
        if value is not None:
            try:
                check(value)
            except ConfigurationError as error:
                raise ValueError(str(error)) from None
        return value

    return AfterValidator(validate)


def _at_least_one(value: int) -> None:
    if value < 1:
        raise ConfigurationError("must be at least 1")


def _not_negative(value: int) -> None:
    if value < 0:
        raise ConfigurationError("must be 0 or more")


def _finite(value: float) -> None:
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond the range of a float
        finite = False
    if not finite:
        raise ConfigurationError("must be a finite number")


def _no_nul(value: str | list[str]) -> None:
    # TOML can write a NUL as "\u0000", but no file name can contain one.
    texts = value if isinstance(value, list) else [value]
    if any("\0" in text for text in texts):
        raise ConfigurationError("a path cannot contain a NUL character")


# Value types that job files share: `batchtools run`, graphs, pipelines
# and transactions check them the same way.
Jobs = Annotated[
    int | str | None, _checked(lambda value: Concurrency.parse(value, name="jobs"))
]
Count = Annotated[int | None, _checked(_at_least_one)]
Retries = Annotated[int | None, _checked(_not_negative)]
Duration = Annotated[
    str | float | int | None,
    _checked(lambda value: parse_duration(value, name="duration")),
]
PathText = Annotated[str | None, _checked(_no_nul)]
RequiredPathText = Annotated[str, _checked(_no_nul)]
Size = Annotated[
    str | int | None, _checked(lambda value: parse_size(value, name="size"))
]


def read_toml(path: str) -> dict[str, Any]:
    """Read the job file at ``path``.

    Raises:
        ConfigurationError: The file is unreadable or not TOML.
    """
    try:
        with open(path, "rb") as stream:
            return tomllib.load(stream)
    except OSError as error:
        raise ConfigurationError(
            f"cannot read the job file {path!r}: {error.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(
            f"job file {path!r} is not valid TOML: {error}"
        ) from None
    except UnicodeDecodeError as error:
        # tomllib decodes the whole file first and lets this error through.
        raise ConfigurationError(
            f"job file {path!r} is not UTF-8 text: byte {error.start} cannot be "
            "decoded; save it as UTF-8"
        ) from None
    except RecursionError:
        # tomllib parses nested arrays and inline tables recursively.
        raise ConfigurationError(
            f"job file {path!r} nests arrays or inline tables too deeply to read; "
            "flatten it"
        ) from None
    except ValueError:
        # tomllib converts integers with int(), which rejects over 4,300 digits.
        raise ConfigurationError(
            f"job file {path!r} contains an integer too long to read; shorten it"
        ) from None


def schema_error(
    path: str, error: ValidationError, prefix: Sequence[str] = ()
) -> ConfigurationError:
    """Return the one-line error for the first problem pydantic found.

    Args:
        path: The job file.
        error: What validation raised.
        prefix: The table the validated data came from, such as
            ``("transaction",)``, to name keys in full.
    """
    first = error.errors()[0]
    # Leave out the type alternatives pydantic adds to the location.
    parts = [*prefix] + [
        str(part)
        for part in first["loc"]
        if not str(part).startswith(
            ("list[", "str", "int", "bool", "float", "function-after")
        )
    ]
    where = ".".join(parts)
    if first["type"] == "extra_forbidden":
        return ConfigurationError(
            f"job file {path!r}: unknown key {where!r}; check its spelling"
        )
    if first["type"] == "missing":
        return ConfigurationError(f"job file {path!r}: {where!r} is missing; add it")
    # pydantic prefixes the message of a ValueError that our checks raise.
    message = first["msg"].removeprefix("Value error, ")
    return ConfigurationError(
        f"job file {path!r}: invalid value {first.get('input')!r} for {where}: "
        f"{message}"
    )


class RunTable(_Strict):
    """The ``[run]`` table: options of `batchtools run`."""

    jobs: Jobs = None
    journal: PathText = None
    retries: Retries = None
    timeout: Duration = None
    keep_order: bool | None = None
    halt: str | None = None
    rate: str | None = None
    breaker: str | None = None
    breaker_reset: Duration = None
    deadline: Duration = None
    item_deadline: Duration = None
    grace: Duration = None
    results: PathText = None
    shell: bool | None = None
    max_args: Count = None
    colsep: str | None = None
    null: bool | None = None
    memfree: Size = None
    mem_per_item: Size = None
    max_memory: Size = None
    max_items_per_worker: Count = None
    cache: PathText = None
    cache_ttl: Duration = None
    serialize_by: str | None = None
    priority: str | None = None
    priority_aging: Annotated[float | int | None, _checked(_finite)] = None
    scheduler: str | None = None
    local_cluster: Count = None
    audit: PathText = None
    secrets: dict[str, str] | None = None


class InputTable(_Strict):
    """The ``[input]`` table: where the items come from."""

    args: list[str] | list[list[str]] | None = None
    files: Annotated[list[str] | None, _checked(_no_nul)] = None
    glob: PathText = None
    stdin: bool = False


class TaskTable(_Strict):
    """The ``[task]`` table: a command template or a Python callable."""

    command: str | list[str] | None = None
    call: str | None = None
    backend: str | None = None
    setup: str | None = None
    teardown: str | None = None
    fallback: list[str] | None = None


class JobFile(_Strict):
    """A whole job file."""

    run: RunTable = RunTable()
    input: InputTable = InputTable()
    task: TaskTable = TaskTable()
    tasks: dict[str, Any] | None = None
    pipeline: dict[str, Any] | None = None


def load_job_file(path: str) -> JobFile:
    """Read and validate a job file.

    Raises:
        ConfigurationError: The file is unreadable, not TOML, or does not
            match the schema; the message names the file and the key.
    """
    data = read_toml(path)
    try:
        job = JobFile.model_validate(data)
    except ValidationError as error:
        raise schema_error(path, error) from None
    if job.tasks is not None:
        raise ConfigurationError(
            f"job file {path!r} describes a graph of tasks ([tasks.*]); run it "
            f"with 'batchtools graph {path}'"
        )
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
    if job.input.files == []:
        raise ConfigurationError(
            f"job file {path!r}: [input] files is an empty list; name at least "
            "one file, or give the items another way"
        )
    if job.task.command is not None and job.task.call is not None:
        raise ConfigurationError(
            f"job file {path!r}: [task] has both command and call; give only one"
        )
    return job
