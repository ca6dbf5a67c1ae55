"""Fuzzing of the parsers that read user input, in-process, under hypothesis.

Each parser gets random input: text and numbers for durations and sizes,
words for command templates, bytes and TOML structures for job files, and
bytes for item files and standard input. It may only return a value or
raise `ConfigurationError`, with no other exception type and no example
slower than `DEADLINE`. Where the right
answer is known (a duration written as number and unit, the records of an
item file) the value is checked too. The campaign runs `CAMPAIGN.examples`
examples per parser.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchtools._exceptions import ConfigurationError
from batchtools.backends._command import CommandTemplate
from batchtools.cli._inputs import InputSpec, Source, split_command
from batchtools.cli._jobfile import InputTable, RunTable, TaskTable, load_job_file
from batchtools.cli.main import main
from batchtools.engine._halt import Halt
from batchtools.policy._units import parse_duration, parse_size
from batchtools.policy.circuit_breaker import CircuitBreaker
from batchtools.policy.concurrency import Concurrency
from tests.reliability.campaign import CAMPAIGN, ScenarioRecord

DEADLINE = timedelta(seconds=5)
"""Maximum time of one example. It is far above what any parser needs, so
only a hang or runaway work reaches it."""

pytestmark = pytest.mark.timeout(CAMPAIGN.size(120, 1800))

FUZZ = settings(
    max_examples=CAMPAIGN.examples,
    deadline=DEADLINE,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

_NUMBER_TEXT = st.from_regex(r"\A[0-9]{0,12}(\.[0-9]{0,6})?\Z") | st.sampled_from(
    ["1" * 400, "9" * 5000, "0", ".", "1e3", "1e400", "-1", "+1", "nan", "inf"]
)
_UNIT_TEXT = st.sampled_from(
    ["", "ms", "s", "m", "h", "d", "K", "M", "G", "T", "KiB", "MB", "k", "x", "µs"]
)
_SPACE = st.sampled_from(["", " ", "\t", "\n", "\u00a0"])


@st.composite
def _unit_text(draw: st.DrawFn) -> str:
    """Text shaped like ``30s`` or ``512M``, often slightly wrong."""
    return (
        draw(_SPACE)
        + draw(_NUMBER_TEXT)
        + draw(_SPACE)
        + draw(_UNIT_TEXT)
        + draw(_SPACE)
    )


_DURATION_INPUT = st.one_of(
    _unit_text(),
    st.text(),
    st.floats(),
    st.integers() | st.sampled_from([10**400, -(10**400)]),
    st.booleans(),
    st.timedeltas(),
)
_DURATION_SHAPE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h|d)?\s*", re.ASCII)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def test_duration_parser_fuzz(scenario: ScenarioRecord) -> None:
    @FUZZ
    @given(_DURATION_INPUT)
    def check(value: Any) -> None:
        scenario.tried += 1
        try:
            seconds = parse_duration(value, name="timeout")
        except ConfigurationError as error:
            assert "timeout" in str(error)
            return
        assert isinstance(seconds, float)
        assert math.isfinite(seconds)
        assert seconds > 0
        match = _DURATION_SHAPE.fullmatch(value) if isinstance(value, str) else None
        if match is not None:
            expected = float(match[1]) * _DURATION_UNITS[match[2] or "s"]
            assert seconds == expected

    check()


_SIZE_INPUT = st.one_of(_unit_text(), st.text(), st.integers(), st.booleans())


def test_size_parser_fuzz(scenario: ScenarioRecord) -> None:
    @FUZZ
    @given(_SIZE_INPUT)
    def check(value: Any) -> None:
        scenario.tried += 1
        try:
            size = parse_size(value, name="--memfree")
        except ConfigurationError as error:
            assert "--memfree" in str(error)
            return
        assert isinstance(size, int)
        assert size > 0

    check()


_TEMPLATE_PIECE = st.sampled_from(
    [
        "{}", "{.}", "{/}", "{//}", "{/.}", "{#}", "{%}", "{0}", "{1}", "{-1}",
        "{2.}", "{-3//}", "{" + "9" * 5000 + "}", "{" + "1" * 30 + "}", "{", "}",
        "{{}}", "{foo}", "'", '"', "\\", " ", "$(x)", ";", "\x00", "\udcff", "-",
    ]
)  # fmt: skip
_TEMPLATE_WORD = st.lists(_TEMPLATE_PIECE | st.text(max_size=5), max_size=6).map(
    "".join
)
_COLUMN = st.binary(max_size=20) | st.text(max_size=20) | st.integers()
_ITEM = st.tuples(_COLUMN) | st.lists(_COLUMN, min_size=1, max_size=4).map(tuple)


def test_template_parser_fuzz(scenario: ScenarioRecord) -> None:
    @FUZZ
    @given(
        template=st.lists(_TEMPLATE_WORD, max_size=5) | _TEMPLATE_WORD,
        shell=st.booleans(),
        item=_ITEM,
        seq=st.integers(min_value=0, max_value=2**40),
        slot=st.integers(min_value=1, max_value=2**20),
    )
    def check(
        template: list[str] | str,
        shell: bool,
        item: tuple[Any, ...],
        seq: int,
        slot: int,
    ) -> None:
        scenario.tried += 1
        try:
            parsed = CommandTemplate.parse(template, shell=shell)
            argv = parsed.render([item], seq=seq, slot=slot)
        except ConfigurationError:
            return
        assert all(isinstance(argument, bytes) for argument in argv)
        assert all(b"\0" not in argument for argument in argv)
        if shell:
            assert argv[:2] == [b"/bin/sh", b"-c"]

    check()


def test_template_item_reaches_argument_exactly(scenario: ScenarioRecord) -> None:
    @FUZZ
    @given(item=st.binary(max_size=50).filter(lambda data: b"\0" not in data))
    def check(item: bytes) -> None:
        scenario.tried += 1
        template = CommandTemplate.parse(["probe", "{}", "x{}y"])
        assert template.render([(item,)], seq=0, slot=1) == [
            b"probe",
            item,
            b"x" + item + b"y",
        ]

    check()


# -- job files ------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    """Write ``value`` as a TOML value (inline tables for dicts)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(member) for member in value) + "]"
    assert isinstance(value, dict)
    pairs = (f"{json.dumps(key)} = {_toml_value(v)}" for key, v in value.items())
    return "{" + ", ".join(pairs) + "}"


def _toml_document(tables: dict[str, dict[str, Any]]) -> str:
    """Write a document of ``[table]`` headers with ``key = value`` lines."""
    lines = []
    for name, table in tables.items():
        lines.append(f"[{json.dumps(name)}]")
        lines.extend(
            f"{json.dumps(key)} = {_toml_value(v)}" for key, v in table.items()
        )
    return "\n".join(lines) + "\n"


_TEXT = st.text(
    st.characters(codec="utf-8"), max_size=12
) | st.sampled_from(
    ["30s", "250ms", "5m", "2G", "512M", "8", "auto", "auto:2-4", "now,fail=1",
     "soon,fail=10%", "20/s", "3", "50%/10", "{}", "{//}", "{2}", "\t", ",", "",
     "thread", "async", "process", "subprocess", "bogus", "-1", "0", "1e3"]
)  # fmt: skip
_SCALAR = st.one_of(
    _TEXT,
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.booleans(),
)
_VALUE = st.recursive(
    _SCALAR,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3)
    ),
    max_leaves=8,
)


def _table(keys: list[str], extra: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    known = st.dictionaries(st.sampled_from(keys), _VALUE, max_size=6)
    unknown = st.dictionaries(_TEXT, _VALUE, max_size=2) if extra else st.just({})
    return st.builds(lambda a, b: {**b, **a}, known, unknown)


def _job_tables(run_keys: list[str]) -> st.SearchStrategy[dict[str, dict[str, Any]]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "run": _table(run_keys),
            "input": _table(list(InputTable.model_fields)),
            "task": _table(list(TaskTable.model_fields)),
            "other": _table(["x"]),
        },
    )


def test_job_file_random_bytes_fuzz(tmp_path: Path, scenario: ScenarioRecord) -> None:
    path = tmp_path / "job.toml"

    @FUZZ
    @given(
        st.binary(max_size=300)
        | st.sampled_from(
            [b"a = " + b"[" * 5000, b"a = " + b"{b = " * 3000, b"[run]\n\xff = 1"]
        )
    )
    def check(data: bytes) -> None:
        scenario.tried += 1
        path.write_bytes(data)
        try:
            load_job_file(str(path))
        except ConfigurationError as error:
            assert str(path) in str(error)

    check()


def test_job_file_random_structure_fuzz(
    tmp_path: Path, scenario: ScenarioRecord
) -> None:
    path = tmp_path / "job.toml"

    @FUZZ
    @given(_job_tables(list(RunTable.model_fields)))
    def check(tables: dict[str, dict[str, Any]]) -> None:
        scenario.tried += 1
        path.write_text(_toml_document(tables))
        try:
            load_job_file(str(path))
        except ConfigurationError as error:
            assert str(path) in str(error)

    check()


SAFE_RUN_KEYS = [
    "jobs", "retries", "timeout", "keep_order", "halt", "rate", "breaker",
    "breaker_reset", "deadline", "item_deadline", "shell", "max_args", "colsep",
    "null", "memfree", "mem_per_item", "max_memory", "max_items_per_worker",
    "cache_ttl", "serialize_by", "priority", "priority_aging",
]  # fmt: skip
"""Keys of ``[run]`` that a dry run reads without touching anything outside
its folder: no journal, results or cache files, no cluster, no secrets."""

SAFE_CALLS = st.sampled_from(
    ["tests.reliability.tasks:ignore", "tests.reliability.tasks:missing", ":", "x"]
)


def _sanitized(tables: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Confine a random job file to what a dry run may safely do.

    Globs and files stay inside the working folder, and only the test's own
    module is ever imported, since importing an arbitrary module runs its code.
    """
    tables = {name: dict(table) for name, table in tables.items()}
    task = tables.get("task", {})
    for key in ("call", "setup", "teardown", "fallback", "backend"):
        task.pop(key, None)
    inputs = tables.get("input", {})
    if isinstance(inputs.get("glob"), str):
        inputs["glob"] = "inside/" + inputs["glob"].lstrip("/")
    if isinstance(inputs.get("files"), list):
        inputs["files"] = [
            "inside/" + str(name).lstrip("/") for name in inputs["files"]
        ]
    return tables


def test_job_file_through_cli_fuzz(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: ScenarioRecord
) -> None:
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    @settings(FUZZ, max_examples=CAMPAIGN.size(50, CAMPAIGN.examples))
    @given(
        tables=_job_tables(SAFE_RUN_KEYS).map(_sanitized),
        call=st.none() | SAFE_CALLS,
        stdin=st.binary(max_size=40),
    )
    def check(
        tables: dict[str, dict[str, Any]], call: str | None, stdin: bytes
    ) -> None:
        scenario.tried += 1
        if call is not None:
            tables.setdefault("task", {})["call"] = call
        Path("job.toml").write_text(_toml_document(tables))
        result = runner.invoke(
            main, ["run", "--dry-run", "-f", "job.toml"], input=stdin
        )
        if result.exception is not None and not isinstance(
            result.exception, SystemExit
        ):
            raise result.exception
        assert result.exit_code in (0, 1, 2), result.output

    check()


# -- item files and standard input -------------------------------------------


class _Trickle(io.BytesIO):
    """A stream whose ``read1`` returns at most ``step`` bytes at a time."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__(data)
        self.step = step

    def read1(self, size: int | None = -1) -> bytes:
        wanted = size if size is not None and size > 0 else self.step
        return super().read1(min(self.step, wanted))


def _expected_records(data: bytes, separator: bytes) -> list[bytes]:
    if not data:
        return []
    records = data.split(separator)
    if data.endswith(separator):
        records.pop()
    return records


_ITEM_BYTES = st.binary(max_size=200) | st.lists(
    st.sampled_from([b"\n", b"\0", b"a", b"\t", b"\xff", b"\r\n", b",", b""]),
    max_size=30,
).map(b"".join)


def test_item_file_reader_fuzz(tmp_path: Path, scenario: ScenarioRecord) -> None:
    path = tmp_path / "items"

    @FUZZ
    @given(data=_ITEM_BYTES, null=st.booleans())
    def check(data: bytes, null: bool) -> None:
        scenario.tried += 1
        path.write_bytes(data)
        spec = InputSpec([Source("file", path=str(path))], null=null)
        spec.check()
        separator = b"\0" if null else b"\n"
        records = [item[0] for item in spec.items()]
        assert records == _expected_records(data, separator)
        assert spec.count_in_files() == len(records)

    check()


def test_stdin_reader_fuzz(scenario: ScenarioRecord) -> None:
    @FUZZ
    @given(data=_ITEM_BYTES, null=st.booleans(), step=st.integers(1, 7))
    def check(data: bytes, null: bool, step: int) -> None:
        scenario.tried += 1
        spec = InputSpec([Source("stdin")], null=null)
        separator = b"\0" if null else b"\n"
        records = [item[0] for item in spec.items(stdin=_Trickle(data, step))]
        assert records == _expected_records(data, separator)

    check()


_COLSEP = st.text(max_size=6) | st.sampled_from(
    ["\t", ",", " +", "(,)", "(", "[", "\\", "a*", "(?P<x>,)", "|", "", "\\d+"]
)


def test_colsep_reader_fuzz(tmp_path: Path, scenario: ScenarioRecord) -> None:
    path = tmp_path / "items"

    @FUZZ
    @given(data=_ITEM_BYTES, colsep=_COLSEP, null=st.booleans())
    def check(data: bytes, colsep: str, null: bool) -> None:
        scenario.tried += 1
        path.write_bytes(data)
        spec = InputSpec([Source("file", path=str(path))], null=null, colsep=colsep)
        try:
            spec.check()
        except ConfigurationError as error:
            assert "--colsep" in str(error)
            return
        for item in spec.items():
            assert isinstance(item, tuple)
            assert all(isinstance(column, bytes) for column in item)

    check()


_WORD = st.sampled_from(
    [":::", "::::", "--", "-0", "{}", "echo", "\x00", ""]
) | st.text(max_size=8)


def test_command_line_splitter_fuzz(scenario: ScenarioRecord) -> None:
    @FUZZ
    @given(st.lists(_WORD, max_size=8))
    def check(words: list[str]) -> None:
        scenario.tried += 1
        try:
            command, spec = split_command(words)
            if spec is not None:
                spec.check()
                if spec.total() is not None:
                    list(spec.items())
        except ConfigurationError:
            return
        assert ":::" not in command
        assert "::::" not in command

    check()


def test_glob_under_missing_folder_yields_nothing(tmp_path: Path) -> None:
    # glob.iglob("missing/**", recursive=True) yields "missing/" on CPython 3.11.
    spec = InputSpec([Source("glob", path=str(tmp_path / "missing" / "**"))])

    assert list(spec.items()) == []


def test_float_written_as_text_reads_back() -> None:
    # A float from a TOML job file reaches the parsers as str(value).
    assert parse_duration(str(0.00001)) == 0.00001
    assert parse_duration(str(1e16)) == 1e16
    assert parse_size("1e3K") == 1_024_000


def test_input_spec_faults_found_by_fuzzing(scenario: ScenarioRecord) -> None:
    # Cases that fuzzing found, kept as plain examples: each is an error, not a crash.
    cases: list[tuple[str, Callable[[], object]]] = [
        ("empty source list", InputSpec([]).check),
        ("NUL in a file name", InputSpec([Source("file", path="a\0b")]).check),
    ]
    scenario.tried = len(cases)
    for name, call in cases:
        with pytest.raises(ConfigurationError):
            call()
        scenario.notes[name] = "ConfigurationError"


FOUND_JOB_FILES = {
    "not UTF-8": b"[run]\njobs = 1\n# \xff\n[task]\ncommand = ['echo']\n",
    "deep arrays": b"a = " + b"[" * 5000 + b"]" * 5000,
    "deep inline tables": b"a = " + b"{b = " * 3000 + b"1" + b"}" * 3000,
    "empty files list": b"[input]\nfiles = []\n[task]\ncommand = ['echo']\n",
    "huge size": b"[run]\nmemfree = '1" + b"0" * 400 + b"'\n[task]\ncommand = ['e']\n",
    "huge column": b"[task]\ncommand = ['echo', '{" + b"9" * 5000 + b"}']\n",
    "infinite aging": b"[run]\npriority = '{}'\npriority_aging = inf\n"
    b"[task]\ncommand = ['e']\n",
    "NUL in results": b'[run]\nresults = "\\u0000"\n[task]\ncommand = ["e"]\n',
    "NUL in journal": b'[run]\njournal = "a\\u0000"\n[task]\ncommand = ["e"]\n',
    "NUL in files": b'[input]\nfiles = ["\\u0000"]\n[task]\ncommand = ["e"]\n',
    "huge integer": b"[run]\njobs = " + b"9" * 5000 + b"\n[task]\ncommand = ['e']\n",
    "huge aging": b"[run]\npriority = '{}'\npriority_aging = "
    + b"9" * 4000
    + b"\n[task]\ncommand = ['e']\n",
    "huge local cluster": b"[run]\nlocal_cluster = "
    + b"9" * 4000
    + b"\n[task]\ncommand = ['e']\n",
}
"""Job files that once crashed the CLI with a traceback."""


@pytest.mark.parametrize("content", FOUND_JOB_FILES.values(), ids=FOUND_JOB_FILES)
def test_job_files_found_by_fuzzing_exit_2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    scenario: ScenarioRecord,
    content: bytes,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("job.toml").write_bytes(content)
    scenario.tried = 1

    result = CliRunner().invoke(
        main, ["run", "--no-journal", "-f", "job.toml", ":::", "a"], input=b""
    )

    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: "), result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


HUGE = "9" * 5000
"""More digits than int() converts by default (4,300)."""


@pytest.mark.parametrize(
    "parse",
    [
        lambda: Concurrency.parse(HUGE, name="--jobs"),
        lambda: Concurrency.parse(f"auto:1-{HUGE}", name="--jobs"),
        lambda: Concurrency.parse(f"auto:{HUGE}-2", name="--jobs"),
        lambda: CircuitBreaker.parse(HUGE),
        lambda: CircuitBreaker.parse(f"50%/{HUGE}"),
        lambda: Halt.parse(f"now,fail={HUGE}"),
        lambda: Halt.parse(f"soon,fail={HUGE}%"),
    ],
    ids=["jobs", "auto max", "auto min", "breaker", "breaker window", "halt", "share"],
)
def test_numbers_beyond_int_conversion_are_errors(
    scenario: ScenarioRecord, parse: Callable[[], object]
) -> None:
    scenario.tried = 1
    with pytest.raises(ConfigurationError, match=r"number 9{12}\.\.\. is too large"):
        parse()


def test_leading_zeros_do_not_count_as_digits() -> None:
    assert Concurrency.parse("0" * 5000 + "4", name="--jobs") == Concurrency.fixed(4)
