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

import tomllib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from batchtools._exceptions import ConfigurationError
from batchtools.policy._units import parse_duration, parse_size
from batchtools.policy.concurrency import Concurrency


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RunTable(_Strict):
    """The ``[run]`` table: options of `batchtools run`."""

    jobs: int | str | None = None
    journal: str | None = None
    retries: int | None = None
    timeout: str | float | int | None = None
    keep_order: bool | None = None
    halt: str | None = None
    rate: str | None = None
    breaker: str | None = None
    breaker_reset: str | float | int | None = None
    deadline: str | float | int | None = None
    item_deadline: str | float | int | None = None
    results: str | None = None
    shell: bool | None = None
    max_args: int | None = None
    colsep: str | None = None
    null: bool | None = None
    memfree: str | int | None = None
    mem_per_item: str | int | None = None
    max_memory: str | int | None = None
    max_items_per_worker: int | None = None
    cache: str | None = None
    cache_ttl: str | float | int | None = None
    serialize_by: str | None = None
    priority: str | None = None
    priority_aging: float | int | None = None

    @field_validator("memfree", "mem_per_item", "max_memory")
    @classmethod
    def _size(cls, value: str | int | None) -> str | int | None:
        if value is not None:
            try:
                parse_size(value, name="size")
            except ConfigurationError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("max_args", "max_items_per_worker")
    @classmethod
    def _at_least_one(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError("must be at least 1")
        return value

    @field_validator("jobs")
    @classmethod
    def _jobs(cls, value: int | str | None) -> int | str | None:
        if value is not None:
            try:
                Concurrency.parse(value, name="jobs")
            except ConfigurationError as error:
                raise ValueError(str(error)) from None
        return value

    @field_validator("retries")
    @classmethod
    def _not_negative(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ValueError("must be 0 or more")
        return value

    @field_validator(
        "timeout", "deadline", "item_deadline", "breaker_reset", "cache_ttl"
    )
    @classmethod
    def _duration(cls, value: str | float | None) -> str | float | None:
        if value is not None:
            try:
                parse_duration(value, name="duration")
            except ConfigurationError as error:
                raise ValueError(str(error)) from None
        return value


class InputTable(_Strict):
    """The ``[input]`` table: where the items come from."""

    args: list[str] | list[list[str]] | None = None
    files: list[str] | None = None
    glob: str | None = None
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
    try:
        with open(path, "rb") as stream:
            data = tomllib.load(stream)
    except OSError as error:
        raise ConfigurationError(
            f"cannot read the job file {path!r}: {error.strerror}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigurationError(
            f"job file {path!r} is not valid TOML: {error}"
        ) from None
    try:
        job = JobFile.model_validate(data)
    except ValidationError as error:
        first = error.errors()[0]
        # Leave out the type alternatives pydantic adds to the location.
        parts = [
            str(p) for p in first["loc"] if not str(p).startswith(("list[", "str"))
        ]
        where = ".".join(parts)
        if first["type"] == "extra_forbidden":
            raise ConfigurationError(
                f"job file {path!r}: unknown key {where!r}; check its spelling"
            ) from None
        given = first.get("input")
        raise ConfigurationError(
            f"job file {path!r}: invalid value {given!r} for {where}: {first['msg']}"
        ) from None
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
    if job.task.command is not None and job.task.call is not None:
        raise ConfigurationError(
            f"job file {path!r}: [task] has both command and call; give only one"
        )
    return job
