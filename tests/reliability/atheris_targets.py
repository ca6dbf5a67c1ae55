"""Coverage-guided fuzzing of the input parsers with atheris (libFuzzer).

Usage: ``python -m tests.reliability.atheris_targets FOLDER [LIBFUZZER_OPTION...]``

Each input's first byte picks a parser (durations, sizes, command templates,
job files, item streams) and the rest becomes its input. A parser may
return or raise `ConfigurationError`; any other exception ends the process
with libFuzzer's report and a ``crash-*`` file in the working folder.
FOLDER receives the job files written along the way.
"""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Callable

# atheris ships no type information, and is missing where it is not installed.
import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

with atheris.instrument_imports(include=["batchtools"]):
    from batchtools._exceptions import ConfigurationError
    from batchtools.backends._command import CommandTemplate
    from batchtools.cli._inputs import InputSpec, Source
    from batchtools.cli._jobfile import load_job_file
    from batchtools.policy._units import parse_duration, parse_size

_JOB_FILE = "job.toml"


def _duration(data: atheris.FuzzedDataProvider) -> None:
    if data.ConsumeBool():
        parse_duration(data.ConsumeFloat())
    else:
        parse_duration(data.ConsumeUnicodeNoSurrogates(40))


def _size(data: atheris.FuzzedDataProvider) -> None:
    if data.ConsumeBool():
        parse_size(data.ConsumeInt(16))
    else:
        parse_size(data.ConsumeUnicodeNoSurrogates(40))


def _template(data: atheris.FuzzedDataProvider) -> None:
    shell = data.ConsumeBool()
    words = [data.ConsumeUnicode(12) for _ in range(data.ConsumeIntInRange(0, 5))]
    item = tuple(data.ConsumeBytes(10) for _ in range(data.ConsumeIntInRange(1, 3)))
    template = CommandTemplate.parse(words, shell=shell)
    template.render([item], seq=data.ConsumeIntInRange(0, 10**6), slot=1)


def _job_file(data: atheris.FuzzedDataProvider) -> None:
    with open(_JOB_FILE, "wb") as stream:
        stream.write(data.ConsumeBytes(data.remaining_bytes()))
    load_job_file(_JOB_FILE)


def _items(data: atheris.FuzzedDataProvider) -> None:
    null = data.ConsumeBool()
    colsep = data.ConsumeUnicodeNoSurrogates(6) if data.ConsumeBool() else None
    spec = InputSpec([Source("stdin")], null=null, colsep=colsep)
    spec.check()
    stream = io.BytesIO(data.ConsumeBytes(data.remaining_bytes()))
    for item in spec.items(stdin=stream):
        assert all(isinstance(column, bytes) for column in item)


_TARGETS: list[Callable[[atheris.FuzzedDataProvider], None]] = [
    _duration,
    _size,
    _template,
    _job_file,
    _items,
]


def test_one_input(raw: bytes) -> None:
    """Run the parser that the first byte picks on the rest of ``raw``."""
    if not raw:
        return
    target = _TARGETS[raw[0] % len(_TARGETS)]
    try:
        target(atheris.FuzzedDataProvider(raw[1:]))
    except ConfigurationError:
        pass


def main(arguments: list[str]) -> None:
    """Fuzz from inside FOLDER; libFuzzer reads the options that follow it."""
    os.chdir(arguments[1])
    atheris.Setup([arguments[0], *arguments[2:]], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
