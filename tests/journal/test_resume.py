"""Runs with a journal: a second run takes finished items from it, by key."""

from __future__ import annotations

import collections
import random
import threading
from pathlib import Path
from typing import Any

import batchtools
from batchtools import Context, RemoteError, State, _codec
from batchtools.journal import count_states, iter_items


class CountingTask:
    """A thread task that counts its calls per item and fails chosen items."""

    def __init__(self, failing: frozenset[int] = frozenset()) -> None:
        self._lock = threading.Lock()
        self.failing = failing
        self.calls: collections.Counter[str] = collections.Counter()

    def __call__(self, item: Any) -> str:
        with self._lock:
            self.calls[repr(item)] += 1
        if type(item) is int and item in self.failing:
            raise ValueError(f"item {item!r} is invalid")
        return f"done {item!r}"


def test_rerun_takes_items_from_journal(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    task = CountingTask()
    first = batchtools.run(range(20), task, backend="thread", journal=journal)
    assert first.counts["succeeded"] == 20
    assert first.from_journal == 0
    task.calls.clear()

    second = batchtools.run(range(20), task, backend="thread", journal=journal)

    assert task.calls == {}
    assert second.counts["succeeded"] == 20
    assert second.from_journal == 20
    assert second.run_id == first.run_id
    for outcome in second.outcomes:
        assert outcome.source == "journal"
        assert outcome.value == f"done {outcome.item!r}"
    assert [o.key for o in second.outcomes] == [o.key for o in first.outcomes]


def test_rerun_reports_failed_from_journal(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    task = CountingTask(failing=frozenset({3, 7}))
    first = batchtools.run(range(10), task, backend="thread", journal=journal)
    assert first.counts["failed"] == 2
    task.calls.clear()

    second = batchtools.run(range(10), task, backend="thread", journal=journal)

    assert task.calls == {}
    assert second.counts == {
        "succeeded": 8,
        "failed": 2,
        "skipped": 0,
        "cancelled": 0,
    }
    assert second.from_journal == 8
    failed = list(second.failed())
    assert [outcome.item for outcome in failed] == [3, 7]
    for outcome in failed:
        assert outcome.source == "journal"
        # The original exception stays behind, and a stand-in carries its facts.
        assert isinstance(outcome.error, RemoteError)
        assert outcome.error.type_name == "ValueError"
        assert outcome.error.message == f"item {outcome.item!r} is invalid"
        assert "Traceback" in outcome.error.traceback_text


TRICKY_ITEMS: list[Any] = [
    "line one\nline two",
    "tab\tseparated\tvalues",
    b"\xff\xfe not UTF-8 \x80",
    b"plain bytes",
    (1, 2),
    [1, 2],
    {1: "x"},
    {"1": "x"},
    1,
    "1",
    1.5,
    None,
    True,
    frozenset({3, 4}),
    ("nested", [b"\x00", {"k": (None, 2.25)}]),
]


def assert_same_value_and_types(stored: Any, original: Any) -> None:
    """Assert equality, and that containers and dict keys kept their types."""
    assert stored == original
    assert type(stored) is type(original)
    if isinstance(original, dict):
        for stored_key, original_key in zip(stored, original, strict=True):
            assert type(stored_key) is type(original_key)
        for key, value in original.items():
            assert_same_value_and_types(stored[key], value)
    elif isinstance(original, list | tuple):
        for stored_member, original_member in zip(stored, original, strict=True):
            assert_same_value_and_types(stored_member, original_member)


def test_tricky_items_round_trip(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"

    report = batchtools.run(
        TRICKY_ITEMS, CountingTask(), backend="thread", journal=journal
    )

    assert report.counts["succeeded"] == len(TRICKY_ITEMS)
    rows = list(iter_items(journal))
    assert len(rows) == len(TRICKY_ITEMS)
    for row, original in zip(rows, TRICKY_ITEMS, strict=True):
        assert_same_value_and_types(row.item, original)
        assert_same_value_and_types(_codec.decode(_codec.encode(original)), original)
    assert len({row.key for row in rows}) == len(TRICKY_ITEMS)


def bit_length(item: Any) -> int:
    """Return how many bits an integer item has, or its first member has."""
    first = item[0] if isinstance(item, list) else item
    return int(first.bit_length())


def test_integers_too_long_for_decimal_text_round_trip(tmp_path: Path) -> None:
    # str() refuses integers over 4,300 digits, so they are stored another way.
    items: list[Any] = [10**5000, [-(10**5000), 10**4299], 10**5000 + 1]
    journal = tmp_path / "run.db"

    report = batchtools.run(items, bit_length, backend="thread", journal=journal)

    assert report.counts["succeeded"] == 3
    rows = list(iter_items(journal))
    for row, original in zip(rows, items, strict=True):
        assert_same_value_and_types(row.item, original)
    assert len({row.key for row in rows}) == 3
    assert batchtools.run(items, bit_length, journal=journal).carried == 3


def test_keys_differ_by_type() -> None:
    pairs = [((1, 2), [1, 2]), ({1: "x"}, {"1": "x"}), (1, "1"), (b"a", "a")]
    for left, right in pairs:
        left_key = _codec.digest(_codec.encode(left))
        right_key = _codec.digest(_codec.encode(right))
        assert left_key != right_key, (left, right)


def test_repeated_items_get_numbered_keys(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    task = CountingTask()
    items = ["a", "b", "a", "c", "a", "b"]

    report = batchtools.run(items, task, backend="thread", journal=journal)

    assert task.calls == {"'a'": 3, "'b'": 2, "'c'": 1}
    digest_a = _codec.digest(_codec.encode("a"))
    digest_b = _codec.digest(_codec.encode("b"))
    keys = [outcome.key for outcome in report.outcomes]
    assert keys[0] == digest_a
    assert keys[2] == f"{digest_a}-1"
    assert keys[4] == f"{digest_a}-2"
    assert keys[1] == digest_b
    assert keys[5] == f"{digest_b}-1"
    assert len(set(keys)) == len(items)
    assert count_states(journal) == {"succeeded": 6}


def test_repeated_keys_without_journal() -> None:
    report = batchtools.run(["a", "a", "a"], CountingTask(), backend="thread")

    digest = _codec.digest(_codec.encode("a"))
    keys = [outcome.key for outcome in report.outcomes]
    assert keys == [digest, f"{digest}-1", f"{digest}-2"]


def test_resume_runs_only_new_copies(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    task = CountingTask()
    batchtools.run(["a", "a"], task, backend="thread", journal=journal)
    task.calls.clear()

    second = batchtools.run(["a", "a", "a"], task, backend="thread", journal=journal)

    assert task.calls == {"'a'": 1}
    assert second.from_journal == 2
    assert second.counts["succeeded"] == 3


class GatedTask:
    """Items from 10 up wait until cancelled while the gate is closed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gate_open = threading.Event()
        self.called: list[int] = []

    def __call__(self, x: int, context: Context) -> int:
        with self._lock:
            self.called.append(x)
        if x >= 10 and not self.gate_open.is_set():
            assert context.cancelled is not None
            context.cancelled.wait(60)
        return x


def test_reordered_resume_skips_done_items(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    items = list(range(40))
    task = GatedTask()
    with batchtools.stream(
        items, task, backend="thread", concurrency=2, journal=journal, ordered=True
    ) as outcomes:
        for outcome in outcomes:
            # An outcome is yielded only after its commit.
            if outcome.item == 4:
                break
    done_before = {row.item for row in iter_items(journal) if row.state == "succeeded"}
    assert set(range(5)) <= done_before
    assert not done_before & set(range(10, 40))
    task.called.clear()
    task.gate_open.set()
    reordered = items[:]
    random.Random(5).shuffle(reordered)

    report = batchtools.run(
        reordered, task, backend="thread", concurrency=2, journal=journal
    )

    assert sorted(task.called) == sorted(set(items) - done_before)
    assert report.from_journal == len(done_before)
    assert report.counts["succeeded"] == 40
    assert count_states(journal) == {"succeeded": 40}
    rows = list(iter_items(journal))
    assert sorted(row.item for row in rows) == items
    assert len({row.key for row in rows}) == 40


def test_interrupt_leaves_items_pending(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    task = GatedTask()

    with batchtools.stream(
        range(20), task, backend="thread", concurrency=2, journal=journal, ordered=True
    ) as outcomes:
        for outcome in outcomes:
            if outcome.item == 9:
                break

    states = count_states(journal)
    assert states.get("succeeded", 0) >= 10
    assert "running" not in states
    assert "cancelled" not in states
    outcome_states = {
        row.item: row.state for row in iter_items(journal) if row.item >= 10
    }
    assert set(outcome_states.values()) <= {"pending"}
    assert State.SUCCEEDED.value not in outcome_states.values()
