"""`Pipeline`: stages on the engine, failures that name their stage, bounded memory."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies

import batchtools
from batchtools import ConfigurationError, Outcome, Report, RunAbortedError, State
from batchtools.engine._engine import Engine
from batchtools.flow._pipeline_buffers import SAMPLE_SIZE, _LatencySample
from batchtools.flow.pipeline import (
    Pipeline,
    PipelineOutcome,
    PipelineReport,
    Stage,
)
from tests.engine.support import child_processes, threads_still_alive
from tests.flow import pipeline_tasks

REPOSITORY = Path(__file__).resolve().parents[2]

WAIT_LIMIT = 60.0
"""Seconds a task waits for an event before it fails, so a broken test ends."""

MEMORY_ITEMS = 100_000

READ_AHEAD_LIMIT = 20_000
"""Items the memory test's pipeline may read beyond those it has finished.

Each stage keeps at most about 2,500 items: 1,024 outcomes its consumer
has not taken, a batch of 256 in its pump, 256 in the queue to the next
stage, 512 in that stage's reader thread and its concurrency in flight.
`pipeline_tasks.report_memory` measured 5,409 on 2 CPUs, so 20,000 still
proves reading is bounded; a pipeline that read its input without bound
would be 100,000 items ahead.
"""


def reject_3_and_7(value: int) -> int:
    """Return ``value`` times 10.

    Raises:
        pipeline_tasks.Rejected: ``value`` is 3 or 7.
    """
    if value in (3, 7):
        raise pipeline_tasks.Rejected(f"item {value} is rejected")
    return value * 10


async def add_one(value: int) -> int:
    """Return ``value + 1``."""
    return value + 1


def content_keys(items: list[Any]) -> list[str]:
    """Return the keys the engine gives ``items`` in a run of their own."""
    report = batchtools.run(items, add_one)
    return [outcome.key for outcome in report.outcomes]


# -- values, failures and the stage that decided -----------------------------


def test_unordered_pipeline_reports_values_and_failures() -> None:
    pipeline = Pipeline([Stage(reject_3_and_7, name="parse"), Stage(add_one)])
    keys = content_keys(list(range(10)))

    with pipeline.stream(range(10)) as outcomes:
        received = list(outcomes)

    values = sorted(o.value for o in received if o.state is State.SUCCEEDED)
    failed = sorted(
        (o for o in received if o.state is State.FAILED), key=lambda o: o.seq
    )
    assert values == [1, 11, 21, 41, 51, 61, 81, 91]
    assert [o.item for o in failed] == [3, 7]
    assert [o.key for o in failed] == [keys[3], keys[7]]
    assert [o.stage for o in failed] == ["parse", "parse"]
    assert all(isinstance(o.error, pipeline_tasks.Rejected) for o in failed)
    assert str(failed[0].error) == "item 3 is rejected"
    assert len(received) == 10


def test_failed_item_never_enters_next_stage() -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def record(value: int) -> int:
        with lock:
            seen.append(value)
        return value

    pipeline = Pipeline([Stage(reject_3_and_7, name="parse"), Stage(record)])

    report = pipeline.run(range(10))

    assert sorted(seen) == [0, 10, 20, 40, 50, 60, 80, 90]
    failures = list(report.failed())
    assert [(o.seq, o.item, o.stage) for o in failures] == [
        (3, 3, "parse"),
        (7, 7, "parse"),
    ]
    assert all(isinstance(o, PipelineOutcome) for o in report.outcomes)


def test_succeeded_outcome_keeps_original_item() -> None:
    pipeline = Pipeline([Stage(add_one, name="first"), Stage(add_one, name="second")])

    report = pipeline.run([10, 20])

    outcome = report.outcomes[1]
    assert isinstance(outcome, PipelineOutcome)
    assert outcome.item == 20
    assert outcome.value == 22
    assert outcome.stage == "second"
    assert outcome.key == content_keys([10, 20])[1]


def test_key_function_names_original_items() -> None:
    pipeline = Pipeline([Stage(reject_3_and_7), Stage(add_one)])

    report = pipeline.run(range(5), key=lambda value: f"item-{value}")

    assert [o.key for o in report.outcomes] == [f"item-{i}" for i in range(5)]
    assert report.counts["failed"] == 1


def test_run_collects_outcomes_in_input_order() -> None:
    pipeline = Pipeline([reject_3_and_7, add_one])

    report = pipeline.run(range(10))

    assert isinstance(report, PipelineReport)
    assert [o.seq for o in report.outcomes] == list(range(10))
    assert report.counts == {"succeeded": 8, "failed": 2, "skipped": 0, "cancelled": 0}
    assert not report.ok
    assert [group.count for group in report.failures.most_common()] == [2]


def test_arun_and_astream_inside_event_loop() -> None:
    pipeline = Pipeline([Stage(add_one), Stage(add_one, name="again")])

    async def scenario() -> tuple[Report, list[int]]:
        report = await pipeline.arun(range(5))
        async with pipeline.astream(range(5), ordered=True) as outcomes:
            values = [outcome.value async for outcome in outcomes]
        return report, values

    report, values = asyncio.run(scenario())

    assert report.counts["succeeded"] == 5
    assert values == [2, 3, 4, 5, 6]


def test_async_source_feeds_first_stage() -> None:
    async def numbers() -> AsyncIterator[int]:
        for value in range(6):
            yield value

    report = Pipeline([add_one, add_one]).run(numbers())

    assert [o.value for o in report.outcomes] == [2, 3, 4, 5, 6, 7]


# -- order --------------------------------------------------------------------


class SwapPairs:
    """Finishes each call at an even position only after the call that follows it.

    With a concurrency of 2, calls finish as 1, 0, 3, 2, ... without any
    timing: the even call waits for an event that the odd one sets.

    Args:
        calls: How many calls the stage will get; a last call at an even
            position has no partner and finishes at once.
    """

    def __init__(self, calls: int) -> None:
        self.calls = calls
        self.finished: list[int] = []
        self._started = 0
        self._done: dict[int, asyncio.Event] = {}

    def _event(self, position: int) -> asyncio.Event:
        return self._done.setdefault(position, asyncio.Event())

    async def __call__(self, value: int) -> int:
        position = self._started
        self._started += 1
        if position % 2 == 0 and position + 1 < self.calls:
            await asyncio.wait_for(self._event(position + 1).wait(), WAIT_LIMIT)
        self.finished.append(value)
        self._event(position).set()
        return value


def test_ordered_pipeline_yields_input_order() -> None:
    first = SwapPairs(20)
    second = SwapPairs(20)
    pipeline = Pipeline(
        [
            Stage(first, name="first", concurrency=2),
            Stage(second, name="second", concurrency=2),
        ]
    )

    with pipeline.stream(range(20), ordered=True) as outcomes:
        order = [outcome.item for outcome in outcomes]

    assert order == list(range(20))
    assert first.finished[:4] == [1, 0, 3, 2]
    assert second.finished[:4] == [1, 0, 3, 2]


def test_ordered_pipeline_places_failures_in_order() -> None:
    swapper = SwapPairs(8)
    pipeline = Pipeline(
        [
            Stage(reject_3_and_7, name="parse", concurrency=2),
            Stage(swapper, concurrency=2),
        ]
    )

    with pipeline.stream(range(10), ordered=True) as outcomes:
        received = [(o.seq, o.state) for o in outcomes]

    assert [seq for seq, _ in received] == list(range(10))
    assert received[3] == (3, State.FAILED)
    assert received[7] == (7, State.FAILED)
    assert swapper.finished[:2] == [10, 0]


@settings(max_examples=20, deadline=None)
@given(
    first_failures=strategies.sets(strategies.integers(0, 59)),
    second_failures=strategies.sets(strategies.integers(0, 59)),
    ordered=strategies.booleans(),
    concurrency=strategies.integers(1, 8),
)
def test_every_item_gets_one_outcome(
    first_failures: set[int],
    second_failures: set[int],
    ordered: bool,
    concurrency: int,
) -> None:
    async def first(value: int) -> int:
        if value in first_failures:
            raise pipeline_tasks.Rejected(f"first rejects {value}")
        return value

    async def second(value: int) -> int:
        if value in second_failures:
            raise pipeline_tasks.Rejected(f"second rejects {value}")
        return value

    pipeline = Pipeline(
        [Stage(first, concurrency=concurrency), Stage(second, concurrency=concurrency)]
    )

    with pipeline.stream(range(60), ordered=ordered) as outcomes:
        received = list(outcomes)

    seqs = [outcome.seq for outcome in received]
    assert sorted(seqs) == list(range(60))
    if ordered:
        assert seqs == list(range(60))
    for outcome in received:
        if outcome.item in first_failures:
            assert (outcome.state, outcome.stage) == (State.FAILED, "first")
        elif outcome.item in second_failures:
            assert (outcome.state, outcome.stage) == (State.FAILED, "second")
        else:
            assert (outcome.state, outcome.value) == (State.SUCCEEDED, outcome.item)


# -- per-stage reports ----------------------------------------------------------


def reject_50(value: int) -> int:
    """Return ``value``.

    Raises:
        pipeline_tasks.Rejected: ``value`` is 50.
    """
    if value == 50:
        raise pipeline_tasks.Rejected("item 50 is rejected")
    return value


def test_stage_reports_count_each_stage() -> None:
    pipeline = Pipeline(
        [
            Stage(reject_3_and_7, name="parse"),
            Stage(reject_50, name="check"),
            Stage(add_one, name="finish"),
        ]
    )

    report = pipeline.run(range(10))

    stages = {stage.name: stage for stage in report.stages}
    assert list(stages) == ["parse", "check", "finish"]
    assert stages["parse"].counts == {
        "succeeded": 8,
        "failed": 2,
        "skipped": 0,
        "cancelled": 0,
    }
    assert stages["check"].counts == {
        "succeeded": 7,
        "failed": 1,
        "skipped": 0,
        "cancelled": 0,
    }
    assert stages["finish"].counts == {
        "succeeded": 7,
        "failed": 0,
        "skipped": 0,
        "cancelled": 0,
    }
    assert report.counts == {"succeeded": 7, "failed": 3, "skipped": 0, "cancelled": 0}
    assert [stages[name].attempts for name in stages] == [10, 8, 7]
    assert report.outcomes[5].stage == "check"


def test_stage_reports_latencies() -> None:
    report = Pipeline([Stage(reject_3_and_7), Stage(add_one)]).run(range(10))

    for stage in report.stages:
        assert stage.median_seconds is not None
        assert stage.p95_seconds is not None
        assert stage.max_seconds is not None
        assert 0 <= stage.median_seconds <= stage.p95_seconds <= stage.max_seconds


def test_stage_without_attempts_has_no_latencies() -> None:
    report = Pipeline([Stage(reject_3_and_7), Stage(add_one)]).run([3, 7])

    second = report.stages[1]
    assert second.attempts == 0
    assert second.median_seconds is None
    assert second.p95_seconds is None
    assert second.max_seconds is None


def test_small_sample_percentiles_are_exact() -> None:
    sample = _LatencySample()
    for value in range(1, 101):
        sample.add(float(value))

    assert sample.median() == 50.5
    assert sample.percentile(0.95) == 95.0
    assert sample.max == 100.0
    assert sample.count == 100


def test_latency_sample_stays_bounded() -> None:
    sample = _LatencySample()
    for value in range(5 * SAMPLE_SIZE):
        sample.add(float(value))

    assert len(sample._values) == SAMPLE_SIZE
    assert sample.max == float(5 * SAMPLE_SIZE - 1)
    median = sample.median()
    assert median is not None
    # A uniform sample of 10,000 puts the median within a few percent.
    assert abs(median - 2.5 * SAMPLE_SIZE) < 0.05 * 5 * SAMPLE_SIZE


# -- memory -----------------------------------------------------------------------


def test_slow_final_stage_keeps_memory_flat() -> None:
    # A fresh interpreter, so that its peak RSS is the pipeline's alone.
    environment = dict(os.environ, PYTHONPATH=str(REPOSITORY))
    completed = subprocess.run(
        [sys.executable, "-m", "tests.flow.pipeline_tasks", str(MEMORY_ITEMS)],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        check=False,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr.decode(errors="replace")
    result = json.loads(completed.stdout.decode().splitlines()[-1])

    assert result["outcomes"] == MEMORY_ITEMS
    assert result["succeeded"] == MEMORY_ITEMS
    # Flat: the peak at the end is within 10 percent plus 20 MB of the peak
    # after a tenth of the items.
    assert result["end_mb"] <= 1.1 * result["tenth_mb"] + 20
    # The final stage was the slow one, so the stages before it ran ahead
    # until their bounded buffers were full, and no further.
    assert result["max_ahead"] > 1000
    assert result["max_ahead"] < READ_AHEAD_LIMIT


# -- backends and retries ---------------------------------------------------------


def test_thread_stage_then_process_stage() -> None:
    pipeline = Pipeline(
        [
            Stage(pipeline_tasks.with_thread, backend="thread", concurrency=2),
            Stage(first_of_pair, backend="thread"),
            Stage(pipeline_tasks.with_pid, backend="process", concurrency=2),
        ]
    )

    report = pipeline.run(range(6))

    assert report.counts["succeeded"] == 6
    values = [o.value for o in report.outcomes]
    assert [value.split("@")[0] for value in values] == [str(i) for i in range(6)]
    pids = {int(value.split("@")[1]) for value in values}
    assert os.getpid() not in pids


def first_of_pair(pair: tuple[int, str]) -> int:
    """Return the value of a `with_thread` result, checking it ran on a worker.

    Raises:
        AssertionError: The first stage ran on the main thread.
    """
    value, thread_name = pair
    assert thread_name != threading.main_thread().name
    return value


def test_retries_are_per_stage() -> None:
    pipeline = Pipeline(
        [
            Stage(pipeline_tasks.fail_first_two, name="patient", retry=2),
            Stage(pipeline_tasks.fail_first_two, name="strict"),
        ]
    )

    report = pipeline.run(range(4))

    patient, strict = report.stages
    assert patient.counts["succeeded"] == 4
    assert patient.attempts == 12
    assert strict.counts["failed"] == 4
    assert strict.attempts == 4
    for outcome in report.outcomes:
        assert outcome.state is State.FAILED
        assert isinstance(outcome, PipelineOutcome)
        assert outcome.stage == "strict"
        assert len(outcome.attempts) == 1


# -- commands -----------------------------------------------------------------------


def test_command_stage_passes_stdout_as_text() -> None:
    pipeline = Pipeline(
        [
            Stage(["printf", "%s-x\\n", "{}"], name="suffix"),
            Stage(pipeline_tasks.shout),
        ]
    )

    report = pipeline.run(["a", "b"])

    assert [o.value for o in report.outcomes] == ["A-X", "B-X"]


def test_command_stage_keeps_bytes() -> None:
    pipeline = Pipeline(
        [
            Stage(["printf", "\\377ab\\n\\n"], name="emit"),
            Stage(["printf", "%s", "{}"], name="echo"),
        ]
    )

    report = pipeline.run(["unused"])

    value = report.outcomes[0].value
    assert os.fsencode(value) == b"\xffab"


def test_failed_command_names_its_stage() -> None:
    pipeline = Pipeline([Stage(add_one), Stage(["sh", "-c", "exit 3"], name="exit")])

    report = pipeline.run([1])

    outcome = report.outcomes[0]
    assert isinstance(outcome, PipelineOutcome)
    assert outcome.state is State.FAILED
    assert outcome.stage == "exit"
    assert isinstance(outcome.error, batchtools.CommandFailedError)
    assert outcome.item == 1


# -- stopping and cancelling --------------------------------------------------------


def test_leaving_stream_cancels_every_stage(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    ledger = tmp_path / "started"
    script = pipeline_tasks.SLEEP_UNLESS_ZERO
    command = [sys.executable, "-c", script, str(ledger), "{}"]
    pipeline = Pipeline(
        [
            Stage(pipeline_tasks.sleep_from_four, backend="process", concurrency=2),
            Stage(command, name="sleep", concurrency=4),
        ]
    )

    with pipeline.stream(range(8)) as outcomes:
        for outcome in outcomes:
            assert outcome.item == 0
            # Items 1 to 3 sleep in commands, and 4 and 5 in worker processes.
            wait_for_lines(ledger, 4)
            assert len(child_processes()) >= 5
            break

    assert child_processes() == set()
    assert threads_still_alive(before) == []


def wait_for_lines(path: Path, count: int) -> None:
    """Poll ``path`` until it has ``count`` lines.

    Raises:
        AssertionError: It did not within `WAIT_LIMIT` seconds.
    """
    deadline = time.monotonic() + WAIT_LIMIT
    while not path.exists() or path.read_text().count("\n") < count:
        assert time.monotonic() < deadline, f"{path} did not reach {count} lines"
        time.sleep(0.01)


def test_stop_cancels_values_between_stages() -> None:
    async def scenario() -> tuple[list[PipelineOutcome], PipelineReport]:
        entered = asyncio.Event()
        gate = asyncio.Event()
        passed: list[int] = []
        all_passed = asyncio.Event()

        async def first(value: int) -> int:
            passed.append(value)
            if len(passed) == 20:
                all_passed.set()
            return value

        async def hold(value: int) -> int:
            entered.set()
            await asyncio.wait_for(gate.wait(), WAIT_LIMIT)
            return value

        pipeline = Pipeline([Stage(first), Stage(hold, concurrency=1)])
        stream = pipeline.astream(range(20))
        async with stream:
            await asyncio.wait_for(all_passed.wait(), WAIT_LIMIT)
            await asyncio.wait_for(entered.wait(), WAIT_LIMIT)
            stream.stop("test stop")
            gate.set()
            received = [outcome async for outcome in stream]
        return received, stream.report

    received, report = asyncio.run(scenario())

    states = sorted(o.state.value for o in received)
    assert states == ["cancelled"] * 19 + ["succeeded"]
    assert {o.stage for o in received} == {"hold"}
    assert {o.reason for o in received if o.state is State.CANCELLED} == {"test stop"}
    assert sorted(o.item for o in received) == list(range(20))
    assert report.interrupted
    assert report.stages[1].counts["cancelled"] == 19


def test_input_error_aborts_after_earlier_outcomes() -> None:
    def numbers() -> Iterator[int]:
        yield from range(3)
        raise OSError("the disk is gone")

    received: list[PipelineOutcome] = []
    with pytest.raises(RunAbortedError, match="the disk is gone"):  # noqa: SIM117 - two steps
        with Pipeline([add_one, add_one]).stream(numbers()) as outcomes:
            for outcome in outcomes:
                received.append(outcome)

    # Items 0 to 2 were read; each ended in a stage or was cancelled between
    # stages when the run stopped, and none came twice.
    assert len({o.item for o in received}) == len(received)
    assert {o.item for o in received} <= {0, 1, 2}
    assert {o.state for o in received} <= {State.SUCCEEDED, State.CANCELLED}


# -- configuration ------------------------------------------------------------------


def test_empty_pipeline_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="at least one stage"):
        Pipeline([])


def test_duplicate_stage_names_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="two stages are named 'step'"):
        Pipeline([Stage(add_one, name="step"), Stage(add_one, name="step")])


def test_default_names_are_made_unique() -> None:
    pipeline = Pipeline([add_one, Stage(["gzip", "-c"]), add_one])

    assert [stage.name for stage in pipeline.stages] == [
        "add_one-1",
        "gzip",
        "add_one-3",
    ]


def test_batched_command_stage_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="batched command"):
        Pipeline([Stage(["gzip", "-c"], batch_size=4)])


def test_bare_command_stage_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"wrap it in Stage\(\)"):
        Pipeline(["gzip -c"])


def test_invalid_stage_option_names_stage() -> None:
    ran: list[int] = []

    def record(value: int) -> int:
        ran.append(value)
        return value

    pipeline = Pipeline([Stage(record), Stage(add_one, name="late", backend="thread")])

    with pytest.raises(ConfigurationError, match=r"stage 'late': .*coroutine function"):
        pipeline.stream(range(3))
    assert ran == []


# -- observers ----------------------------------------------------------------------


class StageRecorder:
    """An engine observer that keeps every stage outcome's item and value."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, Any]] = []

    def on_start(self, engine: Engine) -> None:
        return None

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        return None

    def on_outcome(self, outcome: Outcome) -> None:
        self.seen.append((outcome.item, outcome.value))

    def on_finish(self, report: Report) -> None:
        return None


def test_observers_see_each_stage() -> None:
    recorder = StageRecorder()
    pipeline = Pipeline([Stage(add_one), Stage(add_one, name="again")])

    pipeline.run([1], observers=[recorder])

    assert sorted(recorder.seen) == [(1, 2), (2, 3)]
