"""The interface between the engine and the places where attempts execute.

The engine owns scheduling: which item runs, when, how often. A backend
only executes. The engine starts ``capacity`` worker coroutines, and each
one awaits `Backend.execute` for one attempt at a time; the backend makes
sure that no more than ``concurrency`` of them execute at once (a backend
whose ``capacity`` exceeds its concurrency queues the rest, as the process
backend does to keep its workers fed with chunks).

To stop an attempt early (a timeout, a halt, a second Ctrl-C) the engine
calls `Backend.cancel` with the error the attempt must fail with; the
pending `execute` then raises that error as soon as the backend has
stopped, or given up on, the work.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batchtools.policy.fallback import Fallback

if TYPE_CHECKING:
    from batchtools.secrets._store import TaskSecrets


@dataclass(slots=True)
class Context:
    """What a task receives when it declares a ``context`` parameter.

    Attributes:
        run_id: The run's id, kept by resume and retry.
        key: The item's key (for a batch, the first item's key).
        attempt: The attempt number, from 1.
        seq: The item's position in the input, from 0 (``{#}`` is seq + 1).
        idempotency_key: ``run_id`` and ``key`` joined; stable across
            retries and resumes, for side effects that must happen once.
        cancelled: Set when the engine gives up on the attempt (timeout,
            halt, interrupt); a thread task should poll it and return.
        state: What the run's ``setup`` function returned in the worker
            executing this attempt (a database connection, say), or ``None``.
        resources: The folder of the run's keyed lock and shared store, or
            ``None``; read them as `lock` and `shared`.
        secrets: The run's secrets, or ``None``; read one with `secret`.
    """

    run_id: str
    key: str
    attempt: int
    seq: int
    idempotency_key: str
    cancelled: threading.Event | None = field(default=None, compare=False)
    state: Any = field(default=None, compare=False)
    resources: str | None = field(default=None, compare=False)
    secrets: TaskSecrets | None = field(default=None, compare=False, repr=False)

    def secret(self, name: str) -> str:
        """Return the value of the run's secret ``name``.

        Raises:
            SecretMissingError: The run has no secret of that name.
            SecretExpiredError: The secret has expired; the attempt fails.
        """
        if self.secrets is None:
            from batchtools.secrets._store import missing_context_secret

            raise missing_context_secret(name)
        return self.secrets[name]

    @property
    def lock(self) -> Any:
        """The run's `KeyedLock`, shared by every worker of every backend.

        Use ``with context.lock.hold(key):``, or ``hold_async`` in coroutines.
        """
        return None if self.resources is None else _run_resources(self.resources).lock

    @property
    def shared(self) -> Any:
        """The run's `SharedState`: a key-value store that every worker sees."""
        if self.resources is None:
            return None
        return _run_resources(self.resources).shared

    def __getstate__(self) -> tuple[Any, ...]:
        # The event cannot cross to a worker process; a process task is
        # stopped by killing its worker instead. The worker sets its own state.
        # The lock and the store travel as their folder, opened on first use.
        # Secrets travel as a snapshot of their values (see TaskSecrets).
        return (
            self.run_id,
            self.key,
            self.attempt,
            self.seq,
            self.idempotency_key,
            self.resources,
            self.secrets,
        )

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        (
            self.run_id,
            self.key,
            self.attempt,
            self.seq,
            self.idempotency_key,
            self.resources,
            self.secrets,
        ) = state
        self.cancelled = None
        self.state = None


def _run_resources(folder: str) -> Any:
    # Imported here: flow is built on the engine and the backends.
    from batchtools.flow.locks import resources_at

    return resources_at(folder)


@dataclass(slots=True)
class TaskSpec:
    """A Python task as the backends see it.

    Attributes:
        function: The callable; a coroutine function for the async backend.
        wants_context: Whether to pass ``context=`` to it.
        name: The qualified name, for signatures and messages.
        setup: Called once in each worker before its first attempt; what it
            returns reaches the task as ``context.state``.
        teardown: Called with that state when the worker stops normally.
    """

    function: Callable[..., Any]
    wants_context: bool
    name: str
    setup: Callable[[], Any] | None = None
    teardown: Callable[[Any], Any] | None = None

    @classmethod
    def from_callable(cls, function: Callable[..., Any]) -> TaskSpec:
        """Describe ``function``, finding out whether it takes ``context``."""
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            parameters = {}  # type: ignore[assignment]  # builtins without a signature
        wants_context = "context" in parameters and parameters["context"].kind in (
            inspect.Parameter.KEYWORD_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        )
        module = getattr(function, "__module__", None) or "?"
        qualname = getattr(function, "__qualname__", None) or repr(function)
        if " at 0x" in qualname:
            # An instance's default repr contains its address, which changes from
            # one process to the next; its type's name does not.
            qualname = type(function).__qualname__
        return cls(function, wants_context, f"{module}:{qualname}")

    @property
    def has_worker_state(self) -> bool:
        """Whether workers run a setup or a teardown function."""
        return self.setup is not None or self.teardown is not None

    @property
    def is_async(self) -> bool:
        """Whether calling the function returns an awaitable."""
        if isinstance(self.function, Fallback):
            return self.function.is_async
        return inspect.iscoroutinefunction(self.function) or (
            inspect.iscoroutinefunction(getattr(self.function, "__call__", None))  # noqa: B004 - the method itself is inspected
        )


class Call:
    """One attempt handed to a backend.

    Attributes:
        payload: The item, or the list of items of a batch.
        timeout: The attempt's timeout in seconds, enforced by the engine.
        cancel_error: Set by `Backend.cancel`; the error `execute` raises.
        handle: Backend-private state for the running attempt.
        owner: The engine's worker task that awaits this attempt.
        started: When the attempt began, in seconds since the epoch. The
            engine sets the time it hands the attempt over. A backend that
            queues attempts ahead of its workers (threads, processes, Dask)
            replaces that with the time a worker takes the attempt.
        duration: The seconds the attempt executed, as measured where it
            executed, or ``None`` where the engine measures it. Process and
            Dask workers set it, so that the time results wait to be sent
            back does not count.
        slot: The job slot that executes the attempt, from 1. The engine sets
            the number of its worker coroutine; a backend with workers of
            its own (threads, processes, commands) replaces it with theirs.
        worker: The process that executes the attempt, as ``pid N``, or a
            Dask worker's address; ``None`` where the backend cannot tell.
    """

    __slots__ = (
        "_context",
        "cancel_error",
        "duration",
        "handle",
        "owner",
        "payload",
        "slot",
        "started",
        "timeout",
        "worker",
    )

    def __init__(
        self,
        payload: Any,
        context: Context | Callable[[], Context],
        timeout: float | None = None,
    ) -> None:
        self.payload = payload
        self._context = context
        self.timeout = timeout
        self.cancel_error: BaseException | None = None
        self.handle: Any = None
        self.owner: asyncio.Task[Any] | None = None
        self.started = 0.0
        self.duration: float | None = None
        self.slot = 0
        self.worker: str | None = None

    @property
    def context(self) -> Context:
        """The task's context for this attempt, built on first use."""
        context = self._context
        if not isinstance(context, Context):
            context = self._context = context()
        return context

    def __repr__(self) -> str:
        return f"<Call payload={self.payload!r:.60} timeout={self.timeout}>"


@dataclass(frozen=True, slots=True)
class BackendStatistics:
    """Counts a backend reports at the end of a run.

    Attributes:
        workers_started: Workers (threads, processes) started, replacements
            included.
        workers_lost: Worker processes that died during an attempt.
        abandoned_threads: Thread attempts given up on (timeout or cancel)
            whose thread had not yet returned at the end of the run.
        workers_recycled: Worker processes replaced after their share of
            items (``max_items_per_worker``).
        memory_kills: Worker processes killed for using too much memory.
    """

    workers_started: int = 0
    workers_lost: int = 0
    abandoned_threads: int = 0
    workers_recycled: int = 0
    memory_kills: int = 0


class Backend(ABC):
    """Executes attempts; see the module docstring for the contract.

    Attributes:
        name: ``async``, ``thread``, ``process``, ``subprocess`` or ``dask``.
        concurrency: How many attempts may execute at once.
    """

    name: str = ""
    runs_commands: bool = False
    """Whether attempts run command templates, so that the value of a batch is
    one command's result rather than one value per item."""

    def __init__(self, concurrency: int) -> None:
        self.concurrency = concurrency

    @property
    def capacity(self) -> int:
        """How many attempts the engine may hand over at once."""
        return self.concurrency

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Start workers; called once, on the engine's loop, before any attempt."""

    @abstractmethod
    async def execute(self, call: Call) -> Any:
        """Execute one attempt and return the task's value.

        Raises:
            BaseException: The task's own error, or a subclass of
                `AttemptError` describing why the attempt failed, or
                ``call.cancel_error`` once `cancel` was called.
        """

    @abstractmethod
    def cancel(self, call: Call, error: BaseException) -> None:
        """Stop the attempt of ``call``; its `execute` then raises ``error``."""

    def began(self, call: Call) -> float | None:
        """Return when ``call`` began executing, in `time.monotonic` seconds.

        The engine calls this when an attempt's timeout expires, and times
        the attempt from this moment instead of its hand-over if it is later.
        ``None`` means that the attempt still waits for a worker. The
        default, minus infinity, keeps the hand-over.
        """
        return -math.inf

    def signal_workers(self, number: int) -> None:  # noqa: B027 - optional
        """Send signal ``number`` to the processes executing attempts.

        Used to stop them with the whole run (SIGSTOP on Ctrl-Z) and to let
        them go on (SIGCONT). Backends without processes need nothing.
        """

    def direct_function(self) -> Callable[[Any], Awaitable[Any]] | None:
        """Return a coroutine function the engine may await itself, if any."""
        return None

    def stop_queued(self, error: BaseException) -> None:  # noqa: B027 - optional
        """Fail every attempt handed over but not yet executing with ``error``.

        Called when admission stops (the first Ctrl-C, a halt) so that no new
        attempt starts. Backends without a queue of their own need nothing.
        """

    def terminate(self) -> None:  # noqa: B027 - optional
        """Give up on workers that do not stop, so that `aclose` returns soon.

        Called on a second interrupt, also while `start` or `aclose` runs:
        kill worker processes, stop waiting for threads, cancel a teardown
        that hangs. Backends whose `aclose` cannot hang need nothing.
        """

    @abstractmethod
    async def aclose(self, *, cancel: bool) -> None:
        """Stop all workers and reap them.

        Args:
            cancel: Kill work that is still executing instead of waiting.
        """

    def statistics(self) -> BackendStatistics:
        """Return the backend's counts so far."""
        return BackendStatistics()


def results_per_item(value: Any, items: Sequence[Any]) -> list[Any]:
    """Split the value of a batch call into one value per item.

    A batch task returns either a sequence with one value per item, in order,
    or ``None``. An element that is an exception instance fails its item.

    Raises:
        TypeError: The value has the wrong shape.
    """
    if value is None:
        return [None] * len(items)
    if isinstance(value, list | tuple) and len(value) == len(items):
        return list(value)
    raise TypeError(
        f"a batch task must return None or a list of {len(items)} values, one per "
        f"item, not {type(value).__name__}"
        + (f" of length {len(value)}" if isinstance(value, list | tuple) else "")
    )
