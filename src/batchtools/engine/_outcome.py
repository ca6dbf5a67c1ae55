"""Item states, attempts, outcomes and the report of a run."""

from __future__ import annotations

import collections
import enum
import re
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from batchtools import _codec
from batchtools._exceptions import (
    AttemptTimeoutError,
    CommandFailedError,
    RemoteError,
    WorkerLostError,
)


class State(enum.Enum):
    """The state of one item; final states are past participles."""

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Whether the item has its outcome."""
        return self in FINAL_STATES


FINAL_STATES = frozenset(
    {State.SUCCEEDED, State.FAILED, State.SKIPPED, State.CANCELLED}
)

# Every allowed change of state. An interrupted run puts running and
# retrying items back to pending; retry puts failed items back to pending.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.PENDING: frozenset({State.RUNNING, State.SKIPPED, State.CANCELLED}),
    State.RUNNING: frozenset(
        {State.SUCCEEDED, State.FAILED, State.RETRYING, State.CANCELLED, State.PENDING}
    ),
    State.RETRYING: frozenset(
        {State.RUNNING, State.FAILED, State.CANCELLED, State.PENDING}
    ),
    State.SUCCEEDED: frozenset(),
    State.FAILED: frozenset({State.PENDING}),
    State.SKIPPED: frozenset({State.PENDING}),
    State.CANCELLED: frozenset({State.PENDING}),
}

COUNT_KEYS = ("succeeded", "failed", "skipped", "cancelled")


class Attempt(NamedTuple):
    """One execution of the task on an item.

    Attributes:
        number: From 1.
        started: Wall-clock start, seconds since the epoch.
        duration: Seconds from start to end.
        error: Why the attempt failed, or ``None`` if it succeeded.
    """

    number: int
    started: float
    duration: float
    error: BaseException | None = None


class Outcome:
    """The final state of one item.

    Attributes:
        seq: The item's position in the input, from 0.
        key: The item's stable identity within the run; computed from the
            item on first use when the run had no journal.
        item: The item itself.
        state: One of the final states.
        value: The task's value, for a succeeded item.
        error: The last attempt's error, for a failed item.
        attempts: Every attempt, oldest first. A run that does not collect
            outcomes (`stream`, the CLI) leaves out the record of a first
            attempt that succeeded, to save its cost per item, unless an
            observer sets ``wants_attempts``.
        reason: Why the item was skipped or cancelled.
        source: ``"run"``; ``"journal"`` for an item finished in an
            earlier session of the same run; ``"cache"`` for a value taken
            from the result cache.
        strategy: The fallback strategy that produced the value, when the
            task is a `Fallback`.
    """

    __slots__ = (
        "_key",
        "attempts",
        "error",
        "item",
        "reason",
        "seq",
        "source",
        "state",
        "strategy",
        "value",
    )

    def __init__(
        self,
        seq: int,
        key: str | None,
        item: Any,
        state: State,
        value: Any = None,
        error: BaseException | None = None,
        attempts: list[Attempt] | None = None,
        reason: str | None = None,
        source: str = "run",
        strategy: str | None = None,
    ) -> None:
        self.seq = seq
        self._key = key
        self.item = item
        self.state = state
        self.value = value
        self.error = error
        self.attempts = attempts if attempts is not None else []
        self.reason = reason
        self.source = source
        self.strategy = strategy

    @property
    def key(self) -> str:
        """The item's key."""
        if self._key is None:
            self._key = _codec.digest(_codec.encode(self.item))
        return self._key

    @key.setter
    def key(self, value: str) -> None:
        self._key = value

    @property
    def ok(self) -> bool:
        """Whether the item succeeded."""
        return self.state is State.SUCCEEDED

    def __repr__(self) -> str:
        detail = self.error if self.state is State.FAILED else self.value
        return (
            f"<Outcome #{self.seq} {self.state.value} item={self.item!r:.60} "
            f"{detail!r:.60}>"
        )


_HEX = re.compile(r"\b(?:0x[0-9a-fA-F]+|[0-9a-fA-F]{8,})\b")
_PATH = re.compile(r"(?:(?<=\s)|(?<=^)|(?<=['\"(]))(?:/|\./|~/)[^\s'\",:)]*")
# Whole numbers only: digits inside a word ("utf8", "0o", "U+20AC") stay.
_NUMBER = re.compile(r"\b\d+(?:\.\d+)?\b")


def cause_of(error: BaseException, redact: Callable[[str], str] | None = None) -> str:
    """Return the failure group of ``error``: its kind plus a masked message.

    Numbers, paths and hex ids are masked, so that failures that differ
    only in those fall into one group. ``redact`` replaces secret values
    first, before masking could change them beyond recognition.
    """
    clean = redact if redact is not None else _unchanged
    if isinstance(error, CommandFailedError):
        # The last line a command wrote to stderr usually names the cause.
        tail = clean(error.stderr_tail.decode("utf-8", "replace"))
        lines = tail.strip().splitlines()
        last = _mask(lines[-1]) if lines else ""
        return f"{error}: {last}" if last else str(error)
    if isinstance(error, WorkerLostError | AttemptTimeoutError):
        return _NUMBER.sub("N", str(error))
    if isinstance(error, RemoteError):
        name, message = error.type_name, error.message
    elif isinstance(error, SyntaxError):
        # str() of a SyntaxError names the file, which would split the group.
        name, message = type(error).__name__, str(error.msg)
    else:
        name, message = type(error).__name__, str(error)
    masked = _mask(clean(message))
    return f"{name}: {masked}" if masked else name


def _unchanged(text: str) -> str:
    return text


def _mask(message: str) -> str:
    """Return the first line of ``message`` with hex ids, paths and numbers masked."""
    message = _HEX.sub("<hex>", message)
    message = _PATH.sub("<path>", message)
    message = _NUMBER.sub("N", message)
    stripped = message.strip()
    return stripped.splitlines()[0] if stripped else ""


@dataclass(slots=True)
class FailureGroup:
    """Failed items that share a cause.

    Attributes:
        cause: The error kind and masked message.
        count: How many items failed with it.
        examples: Up to three keys of such items.
        items: The items of those keys, in the same order.
        error: The first such item's error.
    """

    cause: str
    count: int = 0
    examples: list[str] = field(default_factory=list)
    items: list[Any] = field(default_factory=list)
    error: BaseException | None = None


class FailureGroups:
    """Tally of failures by cause, kept as items fail; memory grows with causes.

    Attributes:
        redact: Replaces secret values in the text of causes, or ``None``.
    """

    def __init__(
        self, examples: int = 3, redact: Callable[[str], str] | None = None
    ) -> None:
        self._groups: dict[str, FailureGroup] = {}
        self._examples = examples
        self.redact = redact

    def add(self, key: str, error: BaseException | None, item: Any = None) -> None:
        """Count a failed item."""
        cause = cause_of(error, self.redact) if error is not None else "unknown error"
        group = self._groups.get(cause)
        if group is None:
            group = self._groups[cause] = FailureGroup(cause, error=error)
        group.count += 1
        if len(group.examples) < self._examples:
            group.examples.append(key)
            group.items.append(item)

    def most_common(self) -> list[FailureGroup]:
        """Return the groups, largest first."""
        return sorted(self._groups.values(), key=lambda g: (-g.count, g.cause))

    def __len__(self) -> int:
        return len(self._groups)


@dataclass(slots=True, repr=False)
class Report:
    """What happened in a run.

    Attributes:
        run_id: The run's id (kept by resume and retry).
        counts: Items per final state: ``succeeded``, ``failed``,
            ``skipped`` and ``cancelled``.
        collected: The outcomes as the engine collected them; read them
            through `outcomes`.
        failures: Failures grouped by cause.
        started: Wall-clock start, seconds since the epoch.
        duration: Seconds the run took.
        from_journal: Items counted as succeeded because an earlier session
            of the run finished them.
        carried: Items of any final state taken from an earlier session
            without running.
        interrupted: Whether a signal or a cancel stopped the run early.
        halted: Why a halt condition stopped the run, if one did.
        journal: The journal's path, if the run had one.
        abandoned_threads: Thread attempts given up on whose thread was
            still running at the end.
        workers_lost: Worker processes that died during an attempt.
        workers_recycled: Worker processes replaced after their share of items.
        memory_kills: Worker processes killed for using too much memory.
        memory_pauses: How many times admission paused for lack of memory.
        paused_seconds: Seconds admission spent paused for lack of memory.
        rate_limited: Attempts that had to wait for the rate limit.
        strategies: Items that succeeded per fallback strategy.
        cache_hits: Items whose value came from the result cache.
        cache_errors: Reads and writes of the cache's file that failed; the
            run went on without them.
        cache_unstorable: Values that the cache's file could not take (they
            need pickle, or hold a secret), kept in memory only.
        concurrency_limits: For an adaptive concurrency, ``(seconds since
            the start, limit)`` at the start and at each change.
        circuit_transitions: Every change of a circuit breaker's state.
        unnumbered: Whether keys of repeated items still need their
            occurrence numbers (a run without a journal).
        metrics: The final snapshot of a `batchtools.observe.metrics.Metrics`
            observer attached to the run, or ``None``.
    """

    run_id: str
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNT_KEYS, 0))
    collected: list[Outcome] = field(default_factory=list)
    failures: FailureGroups = field(default_factory=FailureGroups)
    started: float = 0.0
    duration: float = 0.0
    from_journal: int = 0
    carried: int = 0
    interrupted: bool = False
    halted: str | None = None
    journal: str | None = None
    abandoned_threads: int = 0
    workers_lost: int = 0
    workers_recycled: int = 0
    memory_kills: int = 0
    memory_pauses: int = 0
    paused_seconds: float = 0.0
    rate_limited: int = 0
    strategies: collections.Counter[str] = field(default_factory=collections.Counter)
    cache_hits: int = 0
    cache_errors: int = 0
    cache_unstorable: int = 0
    concurrency_limits: list[tuple[float, int]] = field(default_factory=list)
    circuit_transitions: list[Any] = field(default_factory=list)
    unnumbered: bool = False
    metrics: dict[str, Any] | None = None

    def __repr__(self) -> str:
        counts = ", ".join(f"{name}={count}" for name, count in self.counts.items())
        return f"<Report {self.run_id} {counts} in {self.duration:.3f} s>"

    @property
    def total(self) -> int:
        """How many items reached a final state."""
        return sum(self.counts.values())

    @property
    def ok(self) -> bool:
        """Whether every item succeeded and the run was not stopped early."""
        return self.total == self.counts["succeeded"] and not self.interrupted

    @property
    def rate(self) -> float:
        """Items per second over the run's duration."""
        return self.total / self.duration if self.duration > 0 else 0.0

    @property
    def outcomes(self) -> list[Outcome]:
        """Every outcome in input order, when the caller collected them.

        `run` collects; `stream` and the CLI do not. Without a journal the
        keys are computed here, on first use, so a caller who never looks
        at them does not pay for hashing every item.
        """
        if self.unnumbered:
            self.unnumbered = False
            _number_duplicates(self.collected)
        return self.collected

    def failed(self) -> Iterator[Outcome]:
        """Yield the collected outcomes that failed."""
        return (o for o in self.outcomes if o.state is State.FAILED)

    def values(self) -> list[Any]:
        """Return the values of the collected outcomes in input order.

        Raises:
            BaseException: The error of the first item that did not
                succeed, so that a caller who wants all-or-nothing gets it.
        """
        for outcome in self.outcomes:
            if outcome.state is not State.SUCCEEDED:
                if outcome.error is not None:
                    raise outcome.error
                raise RuntimeError(f"item {outcome.key} was {outcome.state.value}")
        return [o.value for o in self.outcomes]


def format_error(error: BaseException) -> str:
    """Return the traceback text of ``error`` (the stand-in's own, if remote)."""
    if isinstance(error, RemoteError):
        return error.traceback_text
    return "".join(traceback.format_exception(error))


def _number_duplicates(outcomes: list[Outcome]) -> None:
    """Give outcomes without a journal their keys, numbering repeated items."""
    seen: dict[str, int] = {}
    for outcome in outcomes:
        base = outcome.key
        count = seen.get(base, 0)
        seen[base] = count + 1
        if count:
            outcome.key = f"{base}-{count}"
