"""The library's entry points: `run`, `stream` and their async twins."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import signal
import threading
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from batchtools._exceptions import ConfigurationError
from batchtools.backends._base import Backend, TaskSpec
from batchtools.backends._cluster import INSTALL_HINT, DaskCluster
from batchtools.backends._local import AsyncBackend, ThreadBackend
from batchtools.engine._engine import Engine, Observer, Settings
from batchtools.engine._halt import Halt
from batchtools.engine._outcome import Outcome, Report
from batchtools.journal import ItemRow, Journal
from batchtools.policy._units import parse_duration
from batchtools.policy.cache import Cache
from batchtools.policy.circuit_breaker import Breakers, CircuitBreaker
from batchtools.policy.concurrency import Concurrency
from batchtools.policy.memory import Memory
from batchtools.policy.rate_limit import RateLimit, RateLimiter
from batchtools.policy.retry import Retry
from batchtools.secrets._store import SecretStore

BACKENDS = ("async", "thread", "process", "subprocess", "dask")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Seconds that attempts in flight get to finish after the first stop signal.
GRACE = 10.0
# Each unit of concurrency costs a coroutine and, for threads and
# processes, an operating system resource; far beyond this is a typo.
MAX_CONCURRENCY = 100_000
_OUTPUT_LIMIT = 1024

log = logging.getLogger("batchtools.engine")


def cpu_count() -> int:
    """Return the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        return os.cpu_count() or 1


def default_concurrency(backend: str) -> int:
    """Return the default concurrency of a backend.

    Processes and commands get one slot per CPU, since each keeps a CPU
    busy. Async tasks wait on I/O almost all the time, so 100 of them cost
    little. Threads get what `ThreadPoolExecutor` picks: the CPUs plus 4, at
    most 32, enough for blocking I/O without thrashing the GIL.
    """
    cpus = cpu_count()
    if backend == "async":
        return 100
    if backend == "thread":
        return min(32, cpus + 4)
    return cpus


@dataclass(slots=True)
class Job:
    """Everything needed to start a run, checked before anything runs.

    Attributes:
        backend: The backend, not started yet.
        settings: The engine's settings.
        signature: The hash that a resumed run must match.
        spec: A description of the task and options, kept in the journal.
    """

    backend: Backend
    settings: Settings
    signature: str
    spec: dict[str, Any]


def prepare(
    task: Any,
    *,
    concurrency: int | str | Concurrency | None = None,
    retry: Retry | int | None = None,
    timeout: float | str | None = None,
    backend: str | DaskCluster | None = None,
    key: Callable[[Any], str] | None = None,
    lock_key: Callable[[Any], Any] | None = None,
    batch_size: int | None = None,
    halt: Halt | str | None = None,
    policies: Sequence[object] = (),
    deadline: float | str | None = None,
    ordered: bool = False,
    collect: bool = False,
    shell: bool = False,
    env: Mapping[str, str] | None = None,
    spec: Mapping[str, Any] | None = None,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
    read_ahead: int | None = None,
    secrets: SecretStore | None = None,
) -> Job:
    """Check the options and build the backend for ``task``.

    Raises:
        ConfigurationError: An option or the task is invalid, or a secret
            has expired already.
    """
    _check_secrets(secrets)
    batch = _positive("batch_size", batch_size, default=1)
    cluster = _dask_cluster(backend)
    requested = "dask" if isinstance(backend, DaskCluster) else backend
    name, chosen = _choose_backend(task, requested)
    # Commands run through the subprocess backend on Dask workers too.
    kind = "subprocess" if chosen == "dask" and _is_command(task) else chosen
    limit = _concurrency(concurrency, chosen)
    width = limit.max
    if lock_key is not None and not callable(lock_key):
        raise ConfigurationError(
            f"lock_key={lock_key!r} must be a function from item to lock key"
        )
    chosen_policies = _Policies.gather(policies)
    memory = chosen_policies.memory
    _check_worker_options(kind, memory, setup, teardown)
    if memory is not None:
        capped = memory.cap(width)
        if capped < width:
            logging.getLogger("batchtools.memory").warning(
                "concurrency lowered from %d to %d: each item may use %s bytes "
                "(--mem-per-item) and %s bytes are available",
                width,
                capped,
                memory.per_item,
                memory.available(),
            )
            width = capped
            limit = dataclasses.replace(
                limit, min=min(limit.min, capped), max=capped, initial=None
            )
    settings = Settings(
        retry=Retry.coerce(retry),
        timeout=None if timeout is None else parse_duration(timeout, name="timeout"),
        deadline=(
            None if deadline is None else parse_duration(deadline, name="deadline")
        ),
        batch_size=batch,
        halt=Halt.parse(halt) if isinstance(halt, str) else halt,
        rate_limiter=chosen_policies.rate_limiter,
        breakers=chosen_policies.breakers,
        memory_gate=memory.gate() if memory is not None else None,
        concurrency_limiter=limit.limiter() if limit.is_adaptive else None,
        read_ahead=read_ahead,
        ordered=ordered,
        collect=collect,
        key=key,
        lock_key=lock_key,
        secrets=secrets,
    )
    if width > MAX_CONCURRENCY:
        raise ConfigurationError(
            f"concurrency={width} is more than {MAX_CONCURRENCY:,}; "
            "use a smaller number"
        )
    # Attempts may queue ahead of threads and worker processes. They may not
    # when an attempt's clock must start when it starts (a timeout, a
    # deadline), when a failure must stop the next items from starting (a
    # halt, a circuit breaker), or when starts are counted as they happen
    # (a rate limit), or when admission pauses for lack of memory.
    queue_ahead = (
        settings.timeout is None
        and settings.halt is None
        and settings.retry.deadline_seconds is None
        and settings.rate_limiter is None
        and settings.breakers is None
        and settings.memory_gate is None
        and settings.concurrency_limiter is None
        and read_ahead != 0
    )
    made = _make_backend(
        task,
        chosen,
        width,
        batch,
        shell,
        env,
        queue_ahead,
        worker=(setup, teardown, memory),
        secrets=secrets,
        cluster=cluster,
        fixed=concurrency is not None,
    )
    description = {
        "task": name,
        "backend": chosen,
        "batch_size": batch,
        "shell": shell,
        "key": getattr(key, "__qualname__", None),
    }
    signed = dict(description)
    if chosen == "dask":
        # A dask run computes what the thread backend (a callable) or the
        # subprocess backend (a command) computes, so each resumes the other.
        signed["backend"] = "thread" if kind == "dask" else kind
    signature = hashlib.sha256(json.dumps(signed, sort_keys=True).encode()).hexdigest()[
        :32
    ]
    full_spec = {**description, **(spec or {})}
    if cluster is not None:
        full_spec["cluster"] = cluster.describe()
    if chosen_policies.cache is not None:
        _check_cache(kind, batch)
        # Opened last, so that a bad option above leaves no file behind.
        settings.cache = chosen_policies.cache.open(signature)
    return Job(made, settings, signature, full_spec)


def _check_secrets(secrets: SecretStore | None) -> None:
    if secrets is None:
        return
    if not isinstance(secrets, SecretStore):
        raise ConfigurationError(
            f"secrets={secrets!r} must be a SecretStore; build one with "
            "SecretStore().add(NAME, 'env:VAR')"
        )
    secrets.check_unexpired()


def _check_cache(backend: str, batch: int) -> None:
    if backend == "subprocess":
        raise ConfigurationError(
            "a result cache applies to Python tasks; a command's results are "
            "kept in the run's journal, and 'batchtools resume' skips done items"
        )
    if batch > 1:
        raise ConfigurationError(
            f"a result cache keeps one value per item, so it cannot be used with "
            f"batch_size={batch}; drop one of the two"
        )


_POLICY_TYPES: tuple[type, ...] = (RateLimit, CircuitBreaker, Memory, Cache)


@dataclass(slots=True)
class _Policies:
    """The policy objects of a run, one of each kind at most."""

    rate_limiter: RateLimiter | None = None
    breakers: Breakers | None = None
    memory: Memory | None = None
    cache: Cache | None = None

    @classmethod
    def gather(cls, policies: Sequence[object]) -> _Policies:
        """Sort ``policies`` by kind and build their state for one run.

        Raises:
            ConfigurationError: An object is not a policy, or a kind repeats.
        """
        seen: set[type] = set()
        gathered = cls()
        for policy in policies:
            kind = type(policy)
            if kind not in _POLICY_TYPES:
                names = ", ".join(t.__name__ for t in _POLICY_TYPES)
                raise ConfigurationError(
                    f"policies contains {policy!r}; supported policies: {names}"
                )
            if kind in seen:
                raise ConfigurationError(
                    f"policies has more than one {kind.__name__}; give one"
                )
            seen.add(kind)
            if isinstance(policy, RateLimit):
                gathered.rate_limiter = policy.limiter()
            elif isinstance(policy, CircuitBreaker):
                gathered.breakers = policy.breakers()
            elif isinstance(policy, Memory):
                gathered.memory = policy
            elif isinstance(policy, Cache):
                gathered.cache = policy
        return gathered


def _check_worker_options(
    backend: str,
    memory: Memory | None,
    setup: Callable[[], Any] | None,
    teardown: Callable[[Any], Any] | None,
) -> None:
    """Reject worker options the chosen backend cannot honour."""
    for name, function in (("setup", setup), ("teardown", teardown)):
        if function is not None and not callable(function):
            raise ConfigurationError(f"{name}={function!r} must be a callable")
    if backend == "subprocess" and (setup is not None or teardown is not None):
        raise ConfigurationError(
            "setup and teardown functions apply to Python tasks; a command runs "
            "on the subprocess backend, so make the command do its own set-up"
        )
    if memory is None or backend == "process":
        return
    for name, option in (
        ("max_worker", "--max-memory"),
        ("max_items_per_worker", "--max-items-per-worker"),
    ):
        if getattr(memory, name) is None:
            continue
        if backend == "subprocess":
            raise ConfigurationError(
                f"Memory {name} ({option}) applies to Python tasks on worker "
                "processes, not to commands; to bound a command's memory, run it "
                "under ulimit -v or a cgroup"
            )
        raise ConfigurationError(
            f"Memory {name} ({option}) applies to worker processes, and this "
            f"run uses the {backend} backend; choose the process backend "
            "(--backend process) or drop the option"
        )


def _concurrency(value: int | str | Concurrency | None, backend: str) -> Concurrency:
    """Return the concurrency policy that ``value`` requests on ``backend``.

    ``"auto"`` adapts between 1 and four times the backend's default.
    """
    default = default_concurrency(backend)
    if value is None:
        return Concurrency.fixed(default)
    if isinstance(value, Concurrency):
        return value
    if isinstance(value, str):
        return Concurrency.parse(value, name="concurrency", auto_max=4 * default)
    return Concurrency.fixed(_positive("concurrency", value, default=default))


def _positive(name: str, value: int | None, *, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"{name}={value!r} must be a whole number of at least 1"
        )
    return value


def _is_command(task: Any) -> bool:
    from batchtools.backends._command import CommandTemplate

    if isinstance(task, str | CommandTemplate):
        return True
    return isinstance(task, list | tuple) and all(
        isinstance(part, str | bytes) for part in task
    )


def _dask_cluster(backend: object) -> DaskCluster | None:
    """Return the cluster options that ``backend=`` names, if it names dask."""
    if isinstance(backend, DaskCluster):
        return backend
    return DaskCluster() if backend == "dask" else None


def _choose_backend(task: Any, backend: str | None) -> tuple[str, str]:
    if backend is not None and backend not in BACKENDS:
        raise ConfigurationError(
            f"backend={backend!r} is not one of {', '.join(BACKENDS)}"
        )
    if _is_command(task):
        if backend not in (None, "subprocess", "dask"):
            raise ConfigurationError(
                "a command template runs on the subprocess backend (or on a Dask "
                f"cluster with the dask backend), not {backend!r}"
            )
        return _command_text(task), backend or "subprocess"
    if not callable(task):
        raise ConfigurationError(
            f"task {task!r} is neither a callable nor a command template"
        )
    spec = TaskSpec.from_callable(task)
    if backend is None:
        backend = "async" if spec.is_async else "thread"
    if backend == "subprocess":
        raise ConfigurationError("the subprocess backend runs command templates only")
    if spec.is_async and backend != "async":
        raise ConfigurationError(
            f"the coroutine function {spec.name} runs on the async backend, "
            f"not {backend!r}"
        )
    if backend == "async" and not spec.is_async:
        raise ConfigurationError(
            f"the async backend needs a coroutine function; {spec.name} is not one"
        )
    return spec.name, backend


def _command_text(task: Any) -> str:
    from batchtools.backends._command import CommandTemplate

    if isinstance(task, CommandTemplate):
        return task.text
    if isinstance(task, str):
        return task
    return json.dumps([p if isinstance(p, str) else os.fsdecode(p) for p in task])


def _make_backend(
    task: Any,
    name: str,
    width: int,
    batch: int,
    shell: bool,
    env: Mapping[str, str] | None,
    queue_ahead: bool,
    worker: tuple[Callable[[], Any] | None, Callable[[Any], Any] | None, Memory | None],
    secrets: SecretStore | None = None,
    cluster: DaskCluster | None = None,
    fixed: bool = False,
) -> Backend:
    if cluster is not None:
        return _make_dask_backend(
            task,
            cluster,
            width if fixed else None,
            batch,
            shell,
            env,
            queue_ahead,
            worker,
        )
    if name == "subprocess":
        from batchtools.backends._command import CommandTemplate
        from batchtools.backends._subprocess import SubprocessBackend

        template = (
            task
            if isinstance(task, CommandTemplate)
            else CommandTemplate.parse(task, shell=shell)
        )
        return SubprocessBackend(
            template, width, env=env, batched=batch > 1, secrets=secrets
        )
    spec = TaskSpec.from_callable(task)
    spec.setup, spec.teardown, memory = worker
    if name == "async":
        return AsyncBackend(spec, width)
    if name == "thread":
        return ThreadBackend(spec, width, queue_ahead=queue_ahead)
    from batchtools.backends._process import ProcessBackend, check_picklable

    check_picklable(spec)
    max_memory = memory.max_worker if memory is not None else None
    assert max_memory is None or isinstance(max_memory, int)
    return ProcessBackend(
        spec,
        width,
        queue_ahead=queue_ahead,
        max_items_per_worker=memory.max_items_per_worker if memory else None,
        max_memory=max_memory,
    )


def _make_dask_backend(
    task: Any,
    cluster: DaskCluster,
    concurrency: int | None,
    batch: int,
    shell: bool,
    env: Mapping[str, str] | None,
    queue_ahead: bool,
    worker: tuple[Callable[[], Any] | None, Callable[[Any], Any] | None, Memory | None],
) -> Backend:
    try:
        from batchtools.backends._dask import DaskBackend
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] not in ("dask", "distributed"):
            raise
        raise ConfigurationError(
            f"the dask backend needs the dask[distributed] package ({error}); "
            f"install it with: {INSTALL_HINT}"
        ) from None
    if _is_command(task):
        from batchtools.backends._command import CommandTemplate

        template = (
            task
            if isinstance(task, CommandTemplate)
            else CommandTemplate.parse(task, shell=shell)
        )
        # The run's secrets reach commands in their contexts, not through here.
        return DaskBackend.for_command(
            template,
            cluster,
            concurrency,
            env=env,
            batched=batch > 1,
            queue_ahead=queue_ahead,
        )
    spec = TaskSpec.from_callable(task)
    spec.setup, spec.teardown, _ = worker
    return DaskBackend.for_task(spec, cluster, concurrency, queue_ahead=queue_ahead)


def open_journal(
    path: str | os.PathLike[str] | None, job: Job, *, force: bool = False
) -> Journal | None:
    """Create the journal at ``path``, or open it to resume when it exists.

    Raises:
        JournalError: The journal cannot be used (locked, damaged, another run).
    """
    if path is None:
        return None
    journal_path = Path(path)
    if journal_path.exists():
        return Journal.open_existing(
            journal_path, signature=job.signature, force=force, spec=job.spec
        )
    return Journal.create(
        journal_path, run_id=job.settings.run_id, signature=job.signature, spec=job.spec
    )


def build_engine(
    items: Iterable[Any] | AsyncIterable[Any],
    job: Job,
    journal: Journal | None,
    observers: Sequence[Observer] = (),
    *,
    rerun: Iterable[str] | None = None,
    journal_rows: Iterable[ItemRow] | None = None,
) -> Engine:
    """Assemble an engine from checked parts."""
    kwargs: dict[str, Any] = {}
    if rerun is not None:
        kwargs["rerun_states"] = frozenset(rerun)
    return Engine(
        items,
        job.backend,
        job.settings,
        journal=journal,
        observers=observers,
        journal_rows=journal_rows,
        **kwargs,
    )


@contextlib.contextmanager
def signal_handlers(
    engine: Engine, received: list[int] | None = None, *, grace: float = GRACE
) -> Iterator[None]:
    """Stop ``engine`` on SIGINT, SIGTERM and SIGHUP while the block runs.

    The first signal stops admission and lets attempts in flight finish
    within ``grace`` seconds, after which they are cancelled; the second
    signal cancels them at once. SIGTSTP (Ctrl-Z) stops the run's processes with
    this one, and their timeouts do not run while they are stopped.
    Installed only on the main thread, where the event loop can receive
    signals.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    seen = received if received is not None else []

    timer: asyncio.TimerHandle | None = None

    def handle(number: int) -> None:
        nonlocal timer
        seen.append(number)
        name = signal.Signals(number).name
        if len(seen) > 1:
            engine.terminate(f"received {name}")
            return
        engine.stop(f"received {name}")
        reason = (
            f"received {name}, and attempts still ran after the grace period "
            f"of {grace:g} s"
        )
        timer = loop.call_later(grace, lambda: engine.stop(reason, cancel=True))

    for number in STOP_SIGNALS:
        loop.add_signal_handler(number, handle, number)
    loop.add_signal_handler(signal.SIGTSTP, engine.suspend)
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
        for number in (*STOP_SIGNALS, signal.SIGTSTP):
            loop.remove_signal_handler(number)


async def arun(
    items: Iterable[Any] | AsyncIterable[Any],
    task: Any,
    *,
    concurrency: int | str | Concurrency | None = None,
    retry: Retry | int | None = None,
    timeout: float | str | None = None,
    journal: str | os.PathLike[str] | None = None,
    backend: str | DaskCluster | None = None,
    key: Callable[[Any], str] | None = None,
    lock_key: Callable[[Any], Any] | None = None,
    batch_size: int | None = None,
    halt: Halt | str | None = None,
    policies: Sequence[object] = (),
    deadline: float | str | None = None,
    observers: Sequence[Observer] = (),
    force: bool = False,
    shell: bool = False,
    env: Mapping[str, str] | None = None,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
    secrets: SecretStore | None = None,
    handle_signals: bool = False,
    grace: float | str = GRACE,
) -> Report:
    """Apply ``task`` to every item and return the report; see `run`."""
    grace_seconds = parse_duration(grace, name="grace")
    job = prepare(
        task,
        concurrency=concurrency,
        retry=retry,
        timeout=timeout,
        backend=backend,
        key=key,
        lock_key=lock_key,
        batch_size=batch_size,
        halt=halt,
        policies=policies,
        deadline=deadline,
        collect=True,
        shell=shell,
        env=env,
        setup=setup,
        teardown=teardown,
        secrets=secrets,
    )
    engine = build_engine(
        items, job, open_journal(journal, job, force=force), observers
    )
    if not handle_signals:
        return await engine.run()
    with signal_handlers(engine, grace=grace_seconds):
        return await engine.run()


def run(
    items: Iterable[Any] | AsyncIterable[Any],
    task: Any,
    *,
    concurrency: int | str | Concurrency | None = None,
    retry: Retry | int | None = None,
    timeout: float | str | None = None,
    journal: str | os.PathLike[str] | None = None,
    backend: str | DaskCluster | None = None,
    key: Callable[[Any], str] | None = None,
    lock_key: Callable[[Any], Any] | None = None,
    batch_size: int | None = None,
    halt: Halt | str | None = None,
    policies: Sequence[object] = (),
    deadline: float | str | None = None,
    observers: Sequence[Observer] = (),
    force: bool = False,
    shell: bool = False,
    env: Mapping[str, str] | None = None,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
    secrets: SecretStore | None = None,
    handle_signals: bool = False,
    grace: float | str = GRACE,
) -> Report:
    """Apply ``task`` to every item and return the report.

    Failures never raise: each is an outcome in the report. Where an event
    loop already runs in this thread (a notebook), the run goes on a helper
    thread with its own loop, and a `KeyboardInterrupt` here cancels it.

    Args:
        items: Any iterable, read lazily; an async iterable works too.
        task: A sync or async callable taking one item (or a list of items
            with ``batch_size``), optionally with a ``context`` keyword; or
            a command template such as ``"gzip -k {}"`` or ``["gzip", "{}"]``.
        concurrency: Attempts executing at once; the default depends on the
            backend (see `default_concurrency`). ``"auto"`` or
            `Concurrency.adaptive` adapts it to the task's latency and
            errors.
        retry: Retries after the first attempt, or a `Retry` policy.
        timeout: Seconds (or ``"30s"``) one attempt may take.
        journal: Path of a journal file; an existing one is resumed.
        backend: ``async``, ``thread``, ``process``, ``subprocess`` or
            ``dask``, chosen from the task by default; or a `DaskCluster`
            that names the Dask cluster to run on.
        key: A function giving each item's key, instead of a content hash.
        lock_key: A function from item to a lock key; items with equal lock
            keys never run at once (two files of one folder, say), while
            the others run in parallel.
        batch_size: Hand the task lists of up to this many items.
        halt: Stop early on failures, such as ``"now,fail=1"``.
        policies: Policy objects: a `RateLimit`, a `CircuitBreaker`, a
            `Memory`, a `Cache`.
        deadline: Seconds (or ``"2h"``) after which the run stops; items it
            cancels are run by a resume.
        observers: Receivers of the engine's events.
        force: Resume a journal whose run had a different signature.
        shell: Run a command template through ``/bin/sh``.
        env: The environment of commands.
        setup: Called once in each worker (thread, process, or the event
            loop for async tasks) before its first attempt; the task reads
            what it returned as ``context.state``.
        teardown: Called with that state when the worker stops normally.
        secrets: A `SecretStore`. Python tasks read its values as
            ``context.secret("NAME")``, commands get each as the environment
            variable ``NAME``, and every value is redacted from the journal,
            the report's failure causes and captured output. Install
            `redact_logs` on log handlers to redact log lines too.
        handle_signals: Stop on SIGINT, SIGTERM and SIGHUP (main thread only).
            The first signal stops new attempts, the second cancels those
            running.
        grace: Seconds (or ``"1m"``) that running attempts get to finish
            after the first signal, before they are cancelled.

    Returns:
        The report, with every outcome in input order.

    Raises:
        ConfigurationError: An option or the task is invalid, or a secret
            has expired already; nothing ran.
        JournalError: The journal cannot be used; nothing ran.
        RunAbortedError: The journal failed during the run; what was
            committed is kept.
    """
    kwargs: dict[str, Any] = {
        "concurrency": concurrency,
        "retry": retry,
        "timeout": timeout,
        "journal": journal,
        "backend": backend,
        "key": key,
        "lock_key": lock_key,
        "batch_size": batch_size,
        "halt": halt,
        "policies": policies,
        "deadline": deadline,
        "observers": observers,
        "force": force,
        "shell": shell,
        "env": env,
        "setup": setup,
        "teardown": teardown,
        "secrets": secrets,
    }
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        in_a_loop = False
    else:
        in_a_loop = True
    if not in_a_loop:
        # Started outside the except block: every error the run raises would
        # otherwise carry this RuntimeError as its context.
        return asyncio.run(
            arun(items, task, handle_signals=handle_signals, grace=grace, **kwargs)
        )
    return _run_on_helper_thread(lambda: arun(items, task, **kwargs))


def _run_on_helper_thread(make: Callable[[], Any]) -> Report:
    loop = asyncio.new_event_loop()
    result: list[Report] = []
    errors: list[BaseException] = []
    main: list[asyncio.Task[Report]] = []

    def target() -> None:
        async def go() -> None:
            main.append(asyncio.current_task())  # type: ignore[arg-type]
            result.append(await make())

        try:
            loop.run_until_complete(go())
        except BaseException as error:
            errors.append(error)
        finally:
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()

    thread = threading.Thread(target=target, name="batchtools-run", daemon=True)
    thread.start()
    try:
        thread.join()
    except KeyboardInterrupt:
        if main:
            loop.call_soon_threadsafe(main[0].cancel)
        thread.join()
        raise
    if errors:
        raise errors[0]
    return result[0]


class AsyncStream:
    """Outcomes of a run as they finish; an async iterator and context manager.

    Leaving the ``async with`` block, or breaking out of the loop inside it,
    cancels the run and reaps its workers at once.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._buffer: collections.deque[Outcome] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task[Report] | None = None
        self.report: Report | None = None
        engine.set_output(self._put, lambda: len(self._buffer), _OUTPUT_LIMIT)

    def _put(self, outcome: Outcome) -> None:
        self._buffer.append(outcome)
        if self._arrived is not None:
            self._arrived.set()

    async def start(self) -> None:
        """Start the run, if it has not started yet."""
        if self._task is None:
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._engine.run())
            self._task.add_done_callback(self._wake_reader)

    def _wake_reader(self, _: object) -> None:
        if self._arrived is not None:
            self._arrived.set()

    async def __aenter__(self) -> AsyncStream:
        await self.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[Outcome]:
        return self

    async def __anext__(self) -> Outcome:
        batch = await self.next_batch(1)
        if not batch:
            raise StopAsyncIteration
        return batch[0]

    async def next_batch(self, limit: int = 256) -> list[Outcome]:
        """Return up to ``limit`` outcomes, waiting for one; empty at the end.

        Raises:
            RunAbortedError: The run could not go on.
        """
        await self.start()
        assert self._task is not None and self._arrived is not None
        while not self._buffer:
            if self._task.done():
                self.report = self._task.result()
                return []
            self._arrived.clear()
            await self._arrived.wait()
        count = min(limit, len(self._buffer))
        batch = [self._buffer.popleft() for _ in range(count)]
        self._engine.output_taken()
        return batch

    async def aclose(self) -> None:
        """Cancel what is still running and wait for the workers to be reaped."""
        if self._task is None:
            return
        if not self._task.done():
            self._engine.stop("the stream was closed", cancel=True)
        with contextlib.suppress(Exception):
            self.report = await self._task


def astream(
    items: Iterable[Any] | AsyncIterable[Any],
    task: Any,
    *,
    ordered: bool = False,
    concurrency: int | str | Concurrency | None = None,
    retry: Retry | int | None = None,
    timeout: float | str | None = None,
    journal: str | os.PathLike[str] | None = None,
    backend: str | DaskCluster | None = None,
    key: Callable[[Any], str] | None = None,
    lock_key: Callable[[Any], Any] | None = None,
    batch_size: int | None = None,
    halt: Halt | str | None = None,
    policies: Sequence[object] = (),
    deadline: float | str | None = None,
    observers: Sequence[Observer] = (),
    force: bool = False,
    shell: bool = False,
    env: Mapping[str, str] | None = None,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
    secrets: SecretStore | None = None,
) -> AsyncStream:
    """Yield outcomes as they finish; the async twin of `stream`.

    Raises:
        ConfigurationError: An option or the task is invalid; nothing ran.
        JournalError: The journal cannot be used; nothing ran.
    """
    job = prepare(
        task,
        concurrency=concurrency,
        retry=retry,
        timeout=timeout,
        backend=backend,
        key=key,
        lock_key=lock_key,
        batch_size=batch_size,
        halt=halt,
        policies=policies,
        deadline=deadline,
        ordered=ordered,
        shell=shell,
        env=env,
        setup=setup,
        teardown=teardown,
        secrets=secrets,
    )
    journal_file = open_journal(journal, job, force=force)
    return AsyncStream(build_engine(items, job, journal_file, observers))


class Stream:
    """Outcomes of a run as they finish; an iterator and context manager.

    The run goes on a helper thread with its own event loop. Leaving the
    ``with`` block, or breaking out of a ``for`` loop over it, cancels the
    run and reaps its workers at once.
    """

    def __init__(self, inner: Any, thread_name: str = "batchtools-stream") -> None:
        """Wrap ``inner``, an async stream: `AsyncStream` or one like it.

        Args:
            inner: Offers ``start``, ``next_batch``, ``aclose`` and ``report``.
            thread_name: The name of the helper thread.
        """
        self._inner = inner
        self._thread_name = thread_name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def report(self) -> Report | None:
        """The report, once the run has ended."""
        report: Report | None = self._inner.report
        return report

    def _start(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name=self._thread_name, daemon=True
            )
            self._thread.start()
            asyncio.run_coroutine_threadsafe(self._inner.start(), self._loop).result()
        return self._loop

    def __enter__(self) -> Stream:
        self._start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[Outcome]:
        loop = self._start()
        try:
            while True:
                future = asyncio.run_coroutine_threadsafe(
                    self._inner.next_batch(), loop
                )
                batch = future.result()
                if not batch:
                    return
                yield from batch
        finally:
            self.close()

    def close(self) -> None:
        """Cancel what is still running, reap the workers and stop the thread."""
        if self._closed or self._loop is None:
            return
        self._closed = True
        loop = self._loop
        asyncio.run_coroutine_threadsafe(self._inner.aclose(), loop).result()
        # `loop.close` would not wait for the threads of `asyncio.to_thread`.
        asyncio.run_coroutine_threadsafe(
            loop.shutdown_default_executor(), loop
        ).result()
        loop.call_soon_threadsafe(loop.stop)
        assert self._thread is not None
        self._thread.join()
        loop.close()


def stream(
    items: Iterable[Any] | AsyncIterable[Any],
    task: Any,
    *,
    ordered: bool = False,
    concurrency: int | str | Concurrency | None = None,
    retry: Retry | int | None = None,
    timeout: float | str | None = None,
    journal: str | os.PathLike[str] | None = None,
    backend: str | DaskCluster | None = None,
    key: Callable[[Any], str] | None = None,
    lock_key: Callable[[Any], Any] | None = None,
    batch_size: int | None = None,
    halt: Halt | str | None = None,
    policies: Sequence[object] = (),
    deadline: float | str | None = None,
    observers: Sequence[Observer] = (),
    force: bool = False,
    shell: bool = False,
    env: Mapping[str, str] | None = None,
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[Any], Any] | None = None,
    secrets: SecretStore | None = None,
) -> Stream:
    """Yield outcomes as they finish, without keeping them.

    With ``ordered=True`` outcomes come in input order, through a bounded
    reorder buffer. With a journal, an outcome is yielded only after it is
    committed. Takes the same options as `run`.

    Raises:
        ConfigurationError: An option or the task is invalid; nothing ran.
        JournalError: The journal cannot be used; nothing ran.
    """
    return Stream(
        astream(
            items,
            task,
            ordered=ordered,
            concurrency=concurrency,
            retry=retry,
            timeout=timeout,
            journal=journal,
            backend=backend,
            key=key,
            lock_key=lock_key,
            batch_size=batch_size,
            halt=halt,
            policies=policies,
            deadline=deadline,
            observers=observers,
            force=force,
            shell=shell,
            env=env,
            setup=setup,
            teardown=teardown,
            secrets=secrets,
        )
    )
