"""Transactions over several operations, run as sagas that survive a crash.

A transaction is a list of operations. Each is a step, named by its
importable name, and a JSON-serializable state::

    txn = Transaction("moves.db", retry=2, concurrency=8)
    txn.add("myapp.steps:MoveFile", {"src": "a", "dst": "b"})
    report = txn.run()          # or: await txn.arun()
    Transaction.recover("moves.db")

The transaction is a saga, not an isolated unit. Prepare holds no locks,
readers may see partial states, and rollback is compensation. It runs in
these phases, and the journal records each one before the next starts:

1. The intent: every operation, pending.
2. Every prepare, as the items of one engine run, concurrently and with
   the engine's retry and timeout. Then, in one write, the state each
   prepare returned and the status ``committing``. From this point a
   transaction with ``roll_forward`` is finished forward by recovery.
3. Commit 1 to n, in order. Each operation is marked ``committing``
   before its call and ``committed`` after it.
4. When a prepare or a commit fails (after its retries), the transaction
   rolls back: each operation from n to 1, except the ones whose prepare
   never started. Rollback errors are recorded and reported, and the
   rollback goes on with the operations before.

Recovery (`Transaction.recover`, ``batchtools recover``, and every
`Transaction.run` on the same journal before its own work) reads the
unfinished transactions and finishes them from the phase recorded.

A step is a class, instantiated with no arguments, or any object, such as
a `Step` of functions, with the methods ``commit(state)`` and
``rollback(state)`` and optionally ``prepare(state)``. Each may be a
coroutine function, and each may take a keyword ``context``, a
`StepContext`. Prepare may return a new state, which commit and rollback
then receive. The contract a step must keep:

- Every method is idempotent. Recovery, maybe in a new process, calls
  commit or rollback again for an operation that may have done its work.
- Rollback undoes whatever ran of prepare and commit, from any point. It
  receives the original state when the process died before the prepared
  states were recorded, so name temporary files after the state itself.

The coordinator is written here because no standard package fits. It
must keep its progress in a journal as durable as a run's and find each
step again by name in a new process. It must also run the prepares as one
run of this engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import inspect
import json
import logging
import os
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

from batchtools._exceptions import ConfigurationError
from batchtools.engine._api import MAX_CONCURRENCY, _run_on_helper_thread, arun
from batchtools.engine._halt import Halt
from batchtools.engine._outcome import State
from batchtools.journal._transaction_store import (
    OPERATION_TRANSITIONS,
    TRANSACTION_TRANSITIONS,
    OperationStatus,
    StoredError,
    StoredTransaction,
    TransactionStatus,
    TransactionStore,
)
from batchtools.policy._units import parse_duration
from batchtools.policy.retry import Retry

__all__ = [
    "OPERATION_TRANSITIONS",
    "TRANSACTION_TRANSITIONS",
    "OperationResult",
    "OperationStatus",
    "Step",
    "StepContext",
    "StepError",
    "Transaction",
    "TransactionReport",
    "TransactionStatus",
]

log = logging.getLogger("batchtools.flow")
retry_log = logging.getLogger("batchtools.retry")

_P = ParamSpec("_P")
_R = TypeVar("_R")
_PHASES = ("prepare", "commit", "rollback")
# Once a prepare has failed, no other prepare starts, but those in flight finish.
_STOP_AT_FIRST_FAILURE = Halt(cancel=False, failures=1)


@dataclass(frozen=True, slots=True)
class Step:
    """A step made of functions; register it as a module-level name.

    Example::

        move = Step(commit=do_move, rollback=undo_move)  # "myapp.steps:move"
    """

    commit: Callable[..., Any]
    rollback: Callable[..., Any]
    prepare: Callable[..., Any] | None = None


@dataclass(frozen=True, slots=True)
class StepContext:
    """The context a step method receives when it declares a ``context`` parameter.

    Attributes:
        transaction_id: The transaction's id, kept by recovery.
        index: The operation's position in the transaction, from 0.
        step: The step's importable name.
    """

    transaction_id: str
    index: int
    step: str

    @property
    def idempotency_key(self) -> str:
        """A key that is the same for every call on this operation, in any process."""
        return f"{self.transaction_id}:{self.index}"


@dataclass(frozen=True, slots=True)
class StepError:
    """A step call that failed, after its retries.

    Attributes:
        index: The operation's position in the transaction, from 0.
        step: The step's importable name.
        phase: ``prepare``, ``commit`` or ``rollback``.
        type_name: The exception's type name.
        message: `str()` of the exception.
        traceback: The formatted traceback.
        error: The exception itself, when it was raised in this process.
    """

    index: int
    step: str
    phase: str
    type_name: str
    message: str
    traceback: str = field(repr=False)
    error: BaseException | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return (
            f"operation {self.index} ({self.step}): {self.phase} failed: "
            f"{self.type_name}: {self.message}"
        )


@dataclass(frozen=True, slots=True)
class OperationResult:
    """The final status of one operation and the calls this session made on it.

    Attributes:
        index: Its position in the transaction, from 0.
        step: The step's importable name.
        status: Its status at the end.
        calls: The step methods called on it in this session, in order,
            one entry per attempt.
    """

    index: int
    step: str
    status: OperationStatus
    calls: tuple[str, ...]


@dataclass(slots=True)
class TransactionReport:
    """The outcome of a transaction, or of the recovery of one.

    Attributes:
        transaction_id: The transaction's id.
        journal: The journal's path.
        status: Its status at the end: ``committed`` or ``rolled_back``,
            ``rollback_failed`` when some rollback failed, or the status
            it had when recovery could not import one of its steps.
        operations: Every operation, in order.
        errors: The step calls that failed in this session.
        recovered_from: For a recovery, the status it found.
        recoveries: For `Transaction.run`, the reports of the unfinished
            transactions it found in the journal and finished first.
    """

    transaction_id: str
    journal: str
    status: TransactionStatus
    operations: list[OperationResult]
    errors: list[StepError]
    recovered_from: TransactionStatus | None = None
    recoveries: list[TransactionReport] = field(default_factory=list)

    @property
    def committed(self) -> bool:
        """Whether every operation is committed."""
        return self.status is TransactionStatus.COMMITTED

    @property
    def rolled_back(self) -> bool:
        """Whether every operation is rolled back, or was never prepared."""
        return self.status is TransactionStatus.ROLLED_BACK


class Transaction:
    """Operations that are all committed, or all rolled back.

    Args:
        journal: The journal file. It is created when missing, and several
            transactions may share it.
        roll_forward: After a crash that happened once every prepare had
            succeeded, let recovery finish the commits instead of rolling
            back. A commit that fails still rolls the transaction back.
        retry: Retries after the first failed call of any step method, or a
            `Retry`.
        timeout: Seconds (or ``"30s"``) one prepare attempt may take.
            Commit and rollback calls have no timeout, because a call
            abandoned in its thread could race with the rollback after it.
        concurrency: Prepares executing at once; the engine's default for
            the backend when ``None``.

    Raises:
        ConfigurationError: An option is invalid.
    """

    def __init__(
        self,
        journal: str | os.PathLike[str],
        *,
        roll_forward: bool = False,
        retry: Retry | int | None = None,
        timeout: float | str | None = None,
        concurrency: int | None = None,
    ) -> None:
        if concurrency is not None and (
            isinstance(concurrency, bool)
            or not isinstance(concurrency, int)
            or not 1 <= concurrency <= MAX_CONCURRENCY
        ):
            raise ConfigurationError(
                f"concurrency={concurrency!r} must be a whole number from 1 to "
                f"{MAX_CONCURRENCY:,}"
            )
        self.journal = Path(journal)
        self.roll_forward = bool(roll_forward)
        self.retry = Retry.coerce(retry)
        self.timeout = (
            None if timeout is None else parse_duration(timeout, name="timeout")
        )
        self.concurrency = concurrency
        self._operations: list[tuple[str, _ResolvedStep, str]] = []

    def __repr__(self) -> str:
        return f"<Transaction {str(self.journal)!r} operations={len(self)}>"

    def __len__(self) -> int:
        return len(self._operations)

    def add(self, step: str, state: Any = None) -> int:
        """Append an operation and return its index.

        Args:
            step: The step's importable name, ``package.module:Name``.
            state: JSON data: dicts with string keys, lists, strings,
                numbers, booleans and ``None``. Tuples become lists. The
                step receives the JSON-decoded copy, as recovery would.

        Raises:
            ConfigurationError: The step cannot be imported or lacks commit
                or rollback, or the state is not JSON data.
        """
        resolved = _resolve_step(step)
        index = len(self._operations)
        text = _encode(state, f"the state of operation {index} ({step})")
        self._operations.append((step, resolved, text))
        return index

    def run(self) -> TransactionReport:
        """Run the transaction and return its report; see `arun`.

        Where an event loop already runs in this thread (a notebook), the
        transaction runs on a helper thread with its own loop.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun())
        # The helper is typed for the engine's report but returns any value.
        return cast(TransactionReport, _run_on_helper_thread(self.arun))

    async def arun(self) -> TransactionReport:
        """Finish the journal's unfinished transactions, then run this one.

        A step that fails does not raise here: the report lists its error.
        When the call is cancelled, the journal keeps the transaction for recovery,
        which starts once the step calls still executing have returned.

        Raises:
            JournalLockedError: Another process holds the journal.
            JournalError: The journal cannot be used or written; what was
                recorded is kept for recovery.
        """
        store = await _in_thread(TransactionStore.open, self.journal, create=True)
        try:
            recoveries = await _recover_unfinished(store, self.retry)
            transaction_id = uuid.uuid4().hex
            store.lock.claim(transaction_id)  # a new id, so the claim succeeds
            saga = _Saga(store, transaction_id, self.roll_forward, self.retry)
            saga.operations = [
                _Operation(index, name, step, text)
                for index, (name, step, text) in enumerate(self._operations)
            ]
            try:
                await saga.execute(self.concurrency, self.timeout)
            finally:
                saga.close()
            report = saga.report()
            report.recoveries = recoveries
            return report
        finally:
            store.close()

    @staticmethod
    def recover(
        journal: str | os.PathLike[str], *, retry: Retry | int | None = None
    ) -> list[TransactionReport]:
        """Finish the unfinished transactions of a journal; see `arecover`."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(Transaction.arecover(journal, retry=retry))
        return cast(
            list[TransactionReport],
            _run_on_helper_thread(lambda: Transaction.arecover(journal, retry=retry)),
        )

    @staticmethod
    async def arecover(
        journal: str | os.PathLike[str], *, retry: Retry | int | None = None
    ) -> list[TransactionReport]:
        """Finish the unfinished transactions of a journal.

        A transaction that was preparing, or committing without
        ``roll_forward``, is rolled back; one committing with it gets its
        remaining commits. Failed rollbacks are called again. Transactions
        still running in this process are left alone.

        Args:
            journal: The journal file.
            retry: Retries after a failed commit or rollback call.

        Returns:
            One report per transaction it acted on; empty when none was
            unfinished. A report whose status is not final names the
            rollback error, or the step it could not import.

        Raises:
            ConfigurationError: ``retry`` is invalid.
            JournalLockedError: Another process holds the journal.
            JournalError: The journal is missing, damaged or not a
                transaction journal.
        """
        policy = Retry.coerce(retry)
        store = await _in_thread(TransactionStore.open, journal, create=False)
        try:
            return await _recover_unfinished(store, policy)
        finally:
            store.close()


# -- steps ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Method:
    function: Callable[..., Any]
    is_async: bool
    wants_context: bool

    @classmethod
    def of(cls, function: Callable[..., Any]) -> _Method:
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            parameters = {}  # type: ignore[assignment]  # builtins without a signature
        return cls(
            function,
            inspect.iscoroutinefunction(function),
            "context" in parameters
            and parameters["context"].kind is not inspect.Parameter.POSITIONAL_ONLY,
        )


@dataclass(frozen=True, slots=True)
class _ResolvedStep:
    prepare: _Method | None
    commit: _Method
    rollback: _Method


def _resolve_step(name: str) -> _ResolvedStep:
    """Import the step that ``name`` names and check its methods.

    Raises:
        ConfigurationError: The name is malformed or cannot be imported, or
            the step lacks commit or rollback.
    """
    text = name if isinstance(name, str) else ""
    module_name, _, attribute = text.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(
            f"step {name!r} must be an importable name of the form "
            "'package.module:Name', such as 'myapp.steps:MoveFile'"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except Exception as error:  # importing runs the module, which may raise anything
        raise ConfigurationError(
            f"step {name!r}: importing {module_name!r} failed ({error!r}); check "
            "the name, and that the module is on sys.path"
        ) from error
    for part in attribute.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigurationError(
                f"step {name!r}: {module_name!r} has no attribute {attribute!r}"
            )
    if isinstance(target, type):
        try:
            target = target()
        except TypeError as error:
            raise ConfigurationError(
                f"step {name!r}: the class must take no arguments, because "
                f"recovery makes it again in a new process ({error})"
            ) from error
    methods: dict[str, _Method | None] = {}
    for phase in _PHASES:
        function = getattr(target, phase, None)
        if function is not None and not callable(function):
            function = None
        if function is None and phase != "prepare":
            raise ConfigurationError(
                f"step {name!r} has no {phase} method; every step needs commit "
                "and rollback, so that a failed transaction can be undone"
            )
        methods[phase] = None if function is None else _Method.of(function)
    commit, rollback = methods["commit"], methods["rollback"]
    assert commit is not None and rollback is not None
    return _ResolvedStep(methods["prepare"], commit, rollback)


def _encode(value: Any, what: str) -> str:
    """Return ``value`` as JSON text.

    Raises:
        ConfigurationError: ``value`` is not JSON data.
    """
    try:
        _check_keys(value)
        return json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as error:
        raise ConfigurationError(
            f"{what} is not JSON data ({error}): {value!r:.200}; use dicts with "
            "string keys, lists, strings, numbers, booleans and None"
        ) from None


def _check_keys(value: Any) -> None:
    # json.dumps turns other keys into strings, so a step would see the keys
    # change between the call and a recovery.
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"key {key!r} is not a string")
            _check_keys(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _check_keys(item)


# -- running --------------------------------------------------------------


async def _in_thread(
    function: Callable[_P, _R], *args: _P.args, **kwargs: _P.kwargs
) -> _R:
    """Run a journal call in a thread; a cancellation waits for it to end.

    The call is short (a write and an fsync). Waiting for it means the
    store is never closed while a thread still uses it. The future is not
    a task, so the cancellation of every task at the end of `asyncio.run`
    cannot cut the wait short.
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, functools.partial(function, *args, **kwargs))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved, so asyncio does not log it
        raise


class _Running:
    """Step calls still executing, counted per operation.

    A prepare or commit abandoned by a timeout or a cancellation goes on in
    its thread. Its operation's rollback waits for it, and the transaction
    stays live, so that recovery leaves it alone until the last call ends.
    """

    def __init__(self) -> None:
        self._counts: Counter[int] = Counter()
        self._condition = threading.Condition()
        self._closed = False
        self._on_idle: Callable[[], None] | None = None

    @contextlib.contextmanager
    def call(self, index: int) -> Iterator[None]:
        """Count a call of operation ``index`` while the block runs."""
        with self._condition:
            if self._closed:
                raise RuntimeError("the transaction has ended; the call was not made")
            self._counts[index] += 1
        try:
            yield
        finally:
            with self._condition:
                self._counts[index] -= 1
                self._condition.notify_all()
                callback = self._on_idle if self._closed and self._idle() else None
                if callback is not None:
                    self._on_idle = None
            if callback is not None:
                callback()

    def _idle(self) -> bool:
        return not any(count > 0 for count in self._counts.values())

    def busy(self, index: int) -> bool:
        """Return whether a call of operation ``index`` is executing."""
        with self._condition:
            return self._counts[index] > 0

    def wait_idle(self, index: int) -> None:
        """Block until no call of operation ``index`` is executing."""
        with self._condition:
            self._condition.wait_for(lambda: self._counts[index] <= 0)

    def close(self, on_idle: Callable[[], None]) -> None:
        """Refuse new calls; call ``on_idle`` once no call is executing."""
        with self._condition:
            self._closed = True
            idle = self._idle()
            self._on_idle = None if idle else on_idle
        if idle:
            on_idle()


@dataclass(slots=True)
class _Operation:
    index: int
    name: str
    step: _ResolvedStep | None  # None where recovery could not import it
    state: str
    prepared: str | None = None
    status: OperationStatus = OperationStatus.PENDING
    calls: list[str] = field(default_factory=list)

    def current_state(self) -> Any:
        return json.loads(self.state if self.prepared is None else self.prepared)


def _status_after_prepares(op: _Operation) -> OperationStatus:
    """Return the status of ``op`` once the prepares have ended."""
    if op.prepared is not None:
        return OperationStatus.PREPARED
    if "prepare" in op.calls:
        return OperationStatus.PENDING  # prepare failed or was cut short
    return OperationStatus.SKIPPED


class _Saga:
    """Runs or recovers one transaction, recording each change in the store."""

    def __init__(
        self,
        store: TransactionStore,
        transaction_id: str,
        roll_forward: bool,
        retry: Retry,
    ) -> None:
        self.store = store
        self.id = transaction_id
        self.roll_forward = roll_forward
        self.retry = retry
        self.status = TransactionStatus.PREPARING
        self.operations: list[_Operation] = []
        self.errors: list[StepError] = []
        self.running = _Running()

    def close(self) -> None:
        """Drop the transaction's claim once every step call has returned."""
        self.running.close(lambda: self.store.lock.release(self.id))

    def report(
        self, recovered_from: TransactionStatus | None = None
    ) -> TransactionReport:
        operations = [
            OperationResult(op.index, op.name, op.status, tuple(op.calls))
            for op in self.operations
        ]
        return TransactionReport(
            self.id,
            str(self.store.path),
            self.status,
            operations,
            list(self.errors),
            recovered_from,
        )

    async def execute(self, concurrency: int | None, timeout: float | None) -> None:
        """Record the intent, prepare every operation, then commit or roll back."""
        steps = [(op.name, op.state) for op in self.operations]
        await _in_thread(self.store.begin, self.id, self.roll_forward, steps)
        log.debug("transaction %s: %d operations recorded", self.id, len(steps))
        failures = await self._prepare_all(concurrency, timeout)
        prepared = {
            op.index: op.prepared for op in self.operations if op.prepared is not None
        }
        if not failures:
            statuses = dict.fromkeys(prepared, OperationStatus.PREPARED)
            await self._write(
                status=TransactionStatus.COMMITTING,
                operations=statuses,
                prepared=prepared,
            )
            await self._commit_remaining()
            return
        statuses = {op.index: _status_after_prepares(op) for op in self.operations}
        log.warning(
            "transaction %s: %s; rolling back", self.id, "; ".join(map(str, failures))
        )
        await self._write(
            status=TransactionStatus.ROLLING_BACK,
            operations=statuses,
            prepared=prepared,
            errors=[self._stored(error) for error in failures],
        )
        await self._roll_back()

    async def recover(self, stored: StoredTransaction) -> TransactionReport:
        """Finish ``stored`` from the status the journal recorded."""
        self.status = stored.status
        for row in stored.operations:
            try:
                step = _resolve_step(row.step)
            except ConfigurationError as error:
                step = None
                phase = "commit" if self._rolls_forward() else "rollback"
                self._fail(row.seq, row.step, phase, error)
            self.operations.append(
                _Operation(row.seq, row.step, step, row.state, row.prepared, row.status)
            )
        if self.errors:
            log.warning(
                "transaction %s cannot be recovered here: %s", self.id, self.errors[0]
            )
        elif self._rolls_forward():
            log.warning("transaction %s was committing; finishing its commits", self.id)
            await self._commit_remaining()
        else:
            log.warning(
                "transaction %s was %s; rolling back", self.id, stored.status.value
            )
            await self._roll_back()
        return self.report(recovered_from=stored.status)

    def _rolls_forward(self) -> bool:
        return self.roll_forward and self.status is TransactionStatus.COMMITTING

    async def _prepare_all(
        self, concurrency: int | None, timeout: float | None
    ) -> list[StepError]:
        """Run every prepare as one engine run; return the failures."""
        methods = [op.step.prepare for op in self.operations if op.step is not None]
        on_loop = any(method is not None and method.is_async for method in methods)
        report = await arun(
            range(len(self.operations)),
            self._prepare_async if on_loop else self._prepare_sync,
            backend="async" if on_loop else "thread",
            concurrency=concurrency,
            retry=self.retry,
            timeout=timeout,
            halt=_STOP_AT_FIRST_FAILURE,
        )
        for outcome in report.outcomes:
            op = self.operations[outcome.item]
            if outcome.state is State.SUCCEEDED:
                op.prepared = outcome.value
            elif outcome.state is State.FAILED:
                error = outcome.error or RuntimeError("prepare failed")
                self._fail(op.index, op.name, "prepare", error)
        return list(self.errors)

    def _prepare_sync(self, index: int) -> str:
        op = self.operations[index]
        assert op.step is not None
        method = op.step.prepare
        if method is None:
            return op.state
        with self.running.call(index):
            op.calls.append("prepare")
            value = method.function(op.current_state(), **self._context(op, method))
        return self._prepared_text(op, value)

    async def _prepare_async(self, index: int) -> str:
        op = self.operations[index]
        assert op.step is not None
        method = op.step.prepare
        if method is None:
            return op.state
        if not method.is_async:
            return await asyncio.to_thread(self._prepare_sync, index)
        with self.running.call(index):
            op.calls.append("prepare")
            value = await method.function(
                op.current_state(), **self._context(op, method)
            )
        return self._prepared_text(op, value)

    def _prepared_text(self, op: _Operation, value: Any) -> str:
        if value is None:
            return op.state
        return _encode(value, f"the state that prepare of {op.name} returned")

    async def _commit_remaining(self) -> None:
        """Commit, in order, every operation not committed yet."""
        previous: _Operation | None = None
        for op in self.operations:
            if op.status is OperationStatus.COMMITTED:
                continue
            statuses = {op.index: OperationStatus.COMMITTING}
            if previous is not None:
                statuses[previous.index] = OperationStatus.COMMITTED
            await self._write(operations=statuses)
            error = await self._call(op, "commit")
            if error is not None:
                log.warning("transaction %s: %s; rolling back", self.id, error)
                await self._write(
                    status=TransactionStatus.ROLLING_BACK, errors=[self._stored(error)]
                )
                await self._roll_back()
                return
            previous = op
        last = {} if previous is None else {previous.index: OperationStatus.COMMITTED}
        await self._write(status=TransactionStatus.COMMITTED, operations=last)
        log.debug("transaction %s committed", self.id)

    async def _roll_back(self) -> None:
        """Roll back, from the last to the first, every operation that needs it."""
        if self.status is not TransactionStatus.ROLLING_BACK:
            await self._write(status=TransactionStatus.ROLLING_BACK)
        failed = False
        for op in reversed(self.operations):
            if op.status in (OperationStatus.ROLLED_BACK, OperationStatus.SKIPPED):
                continue
            if self.running.busy(op.index):
                log.warning(
                    "transaction %s: waiting for an abandoned call of operation %d "
                    "to return before its rollback",
                    self.id,
                    op.index,
                )
                await asyncio.to_thread(self.running.wait_idle, op.index)
            error = await self._call(op, "rollback")
            if error is None:
                await self._write(operations={op.index: OperationStatus.ROLLED_BACK})
                continue
            failed = True
            log.warning("transaction %s: %s", self.id, error)
            await self._write(
                operations={op.index: OperationStatus.ROLLBACK_FAILED},
                errors=[self._stored(error)],
            )
        final = (
            TransactionStatus.ROLLBACK_FAILED
            if failed
            else TransactionStatus.ROLLED_BACK
        )
        await self._write(status=final)

    async def _call(self, op: _Operation, phase: str) -> StepError | None:
        """Call commit or rollback, retrying as the policy allows."""
        assert op.step is not None
        method: _Method = getattr(op.step, phase)
        started = time.monotonic()
        attempt = 1
        while True:
            op.calls.append(phase)
            try:
                await self._invoke(op, method)
                return None
            except Exception as error:
                if not self._may_retry(error, attempt, started):
                    return self._fail(op.index, op.name, phase, error)
                delay = self.retry.backoff.delay(attempt)
                retry_log.warning(
                    "transaction %s: %s of operation %d failed (attempt %d), "
                    "retrying in %.2f s: %r",
                    self.id,
                    phase,
                    op.index,
                    attempt,
                    delay,
                    error,
                )
                await asyncio.sleep(delay)
                attempt += 1

    def _may_retry(self, error: Exception, attempt: int, started: float) -> bool:
        if not self.retry.allows(error, attempt, 0):
            return False
        deadline = self.retry.deadline_seconds
        return deadline is None or time.monotonic() - started < deadline

    async def _invoke(self, op: _Operation, method: _Method) -> None:
        state = op.current_state()
        context = self._context(op, method)
        if method.is_async:
            with self.running.call(op.index):
                await method.function(state, **context)
            return
        await asyncio.to_thread(self._invoke_sync, op.index, method, state, context)

    def _invoke_sync(
        self, index: int, method: _Method, state: Any, context: dict[str, Any]
    ) -> None:
        with self.running.call(index):
            method.function(state, **context)

    def _context(self, op: _Operation, method: _Method) -> dict[str, Any]:
        if not method.wants_context:
            return {}
        return {"context": StepContext(self.id, op.index, op.name)}

    async def _write(
        self,
        *,
        status: TransactionStatus | None = None,
        operations: dict[int, OperationStatus] | None = None,
        prepared: dict[int, str] | None = None,
        errors: list[StoredError] | None = None,
    ) -> None:
        """Record changes durably, then apply them to this object."""
        await _in_thread(
            self.store.update,
            self.id,
            status=status,
            operations=operations,
            prepared=prepared,
            errors=errors or (),
        )
        if status is not None:
            self.status = status
        for index, op_status in (operations or {}).items():
            self.operations[index].status = op_status

    def _fail(
        self, index: int, step: str, phase: str, error: BaseException
    ) -> StepError:
        failure = StepError(
            index,
            step,
            phase,
            type(error).__qualname__,
            str(error),
            "".join(traceback.format_exception(error)),
            error,
        )
        self.errors.append(failure)
        return failure

    @staticmethod
    def _stored(error: StepError) -> StoredError:
        return StoredError(
            error.index,
            error.phase,
            time.time(),
            error.type_name,
            error.message,
            error.traceback,
        )


async def _recover_unfinished(
    store: TransactionStore, retry: Retry
) -> list[TransactionReport]:
    """Finish every unfinished transaction that is not live in this process."""
    reports = []
    for found in await _in_thread(store.unfinished):
        if not store.lock.claim(found.id):
            log.debug("transaction %s is running in this process; skipped", found.id)
            continue
        saga = _Saga(store, found.id, found.roll_forward, retry)
        try:
            # Read again under the claim: it may have ended since the list
            # was read.
            stored = await _in_thread(store.load, found.id)
            if stored is not None and not stored.status.is_final:
                reports.append(await saga.recover(stored))
        finally:
            saga.close()
    return reports
