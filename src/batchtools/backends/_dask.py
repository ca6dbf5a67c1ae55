"""The dask backend: attempts executed on the workers of a Dask cluster.

The engine, the journal and every policy stay in this process (the driver);
Dask only executes. The driver decides retries, so Dask's own re-runs are
kept out of the way. Tasks are submitted with ``pure=False`` under unique
keys. A local cluster started here has ``allowed_failures=0``, so its
scheduler fails a task whose worker died instead of running it again.

Why this is more than ``client.submit`` per attempt:

* Dask costs about 2 ms per task: plain ``client.map`` of 10,000 no-op
  tasks on a 2-worker local cluster took 18 to 21 s (bench/dask_noop.py,
  2-CPU Linux VM, distributed 2026.8). So tiny attempts travel in chunks,
  one Dask task each, sized from the measured duration of recent items as
  the process backend does. Each chunk returns one frame per item, so
  outcomes stay per item.
* At most ``max_in_flight`` chunks are submitted at once (by default twice
  the cluster's worker threads), which bounds what the driver holds.
* The task, its setup and its teardown reach each worker once, in a
  `distributed.WorkerPlugin` registered for the run. Workers that join
  later load it too, and unregistering it runs the teardown.
* Commands run on the worker through the subprocess backend, driven by an
  event loop of the chunk's own, so they are spawned, captured and stopped
  exactly as on one machine.
* A cancel (a timeout, a halt, an interrupt) reaches the workers through
  `distributed.Client.run`: an item not started yet is skipped, a command
  is stopped with its process tree, and a Python task's
  ``context.cancelled`` is set. A Python task cannot be stopped otherwise;
  its attempt fails at once and its worker thread stays busy until it
  returns.
* A worker lost with chunks on it (``KilledWorker``) fails the attempts of
  those chunks with `DaskWorkerLostError`, which the engine retries on the
  lost-worker budget. Their retries travel alone, so that a second loss is
  charged to the one item that caused it.
* A lost connection to the scheduler cancels every Dask future; the run
  then ends with `RunAbortedError`, and the journal resumes it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import math
import os
import pickle
import uuid
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import dask
from distributed import Client, KilledWorker, LocalCluster
from distributed.client import FutureCancelledError

from batchtools._exceptions import (
    CommandFailedError,
    ConfigurationError,
    DaskWorkerLostError,
    RunAbortedError,
)
from batchtools.backends._base import Backend, BackendStatistics, Call, TaskSpec
from batchtools.backends._cluster import DaskCluster
from batchtools.backends._command import CommandTemplate
from batchtools.backends._dask_worker import (
    CHUNK_UNDECODABLE,
    FRAME_COMMAND_FAILED,
    FRAME_OK,
    RunPlugin,
    WorkerLoadError,
    cancel_attempts,
    run_chunk,
)
from batchtools.backends._local import setup_failed
from batchtools.backends._process import check_picklable, decode_error

logger = logging.getLogger(__name__)

_PROTOCOL = pickle.HIGHEST_PROTOCOL

MAX_CAPACITY = 16384
"""Bound on the attempts handed over at once, because the engine keeps one
coroutine per attempt handed over."""

_TARGET_CHUNK_SECONDS = 0.1  # about 50 times Dask's cost per task
_MAX_CHUNK = 1000  # items per chunk
_SMOOTHING = 0.5  # weight of the newest sample in the item-duration average
_SOLO_KEYS = 100_000  # keys of items to send alone, most recent kept
# Seconds to wait at the end of a run for chunks whose attempts were given
# up on: a stopped command ends within the subprocess backend's grace for
# SIGTERM (2 s) and its wait after SIGKILL (1 s).
_COMMAND_STOP_WAIT = 3.5
_CLOSE_TIMEOUT = 10.0  # seconds for the client, the plugin and a local cluster

_Outcome = tuple[bool, Any]  # (True, value) or (False, exception)


@dataclass(eq=False, slots=True)
class _Chunk:
    key: str
    calls: list[Call]
    future: Any = None  # the distributed.Future
    waiter: asyncio.Task[None] | None = None
    given_up: int = 0  # attempts settled by the driver while the chunk ran


@dataclass(slots=True)
class _Work:
    """The task or template for the workers, as the plugin sends it."""

    payload: bytes
    name: str
    wants_context: bool
    task: TaskSpec | None = None
    commands: bool = False


def _allowed_failures(dask_scheduler: Any) -> int:
    """Return the scheduler's ``allowed_failures``; runs on the scheduler."""
    return int(dask_scheduler.allowed_failures)


def start_local_cluster(workers: int, threads_per_worker: int) -> LocalCluster:
    """Start a local cluster as the dask backend wants it.

    The scheduler and the worker processes listen on 127.0.0.1 only. The
    scheduler's HTTP endpoints take a free port and serve no dashboard. The
    scheduler fails a task whose worker dies rather than re-running it
    (``allowed_failures=0``), because the engine decides retries.
    """
    return LocalCluster(  # type: ignore[no-untyped-call]
        n_workers=workers,
        threads_per_worker=threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address="127.0.0.1:0",
        scheduler_kwargs={"allowed_failures": 0, "dashboard": False},
        # The run reports lost workers and failed attempts itself.
        silence_logs=logging.ERROR,
    )


class DaskBackend(Backend):
    """Executes attempts on the workers of a Dask cluster (see the module docstring).

    Build it with `for_task` or `for_command`. At most ``concurrency``
    attempts execute at once: by default the cluster's worker threads when
    the run starts.
    """

    name = "dask"

    def __init__(
        self,
        work: _Work,
        cluster: DaskCluster,
        concurrency: int | None,
        *,
        queue_ahead: bool = True,
    ) -> None:
        super().__init__(concurrency or os.cpu_count() or 1)
        self.runs_commands = work.commands
        self.cluster = cluster
        self.queue_ahead = queue_ahead
        self._work = work
        self._fixed = concurrency
        # Dask tasks in flight; `start` sets it from the cluster's threads
        # unless the concurrency was given.
        self._task_limit = (
            min(cluster.max_in_flight or 2 * self.concurrency, self.concurrency)
            if concurrency is not None
            else cluster.max_in_flight or 2 * self.concurrency
        )
        self._token = uuid.uuid4().hex[:12]

        # The connection.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: Any = None
        self._address: str | None = None
        self._local: LocalCluster | None = None
        self._local_starting: asyncio.Future[LocalCluster] | None = None
        self._registered = False

        # Attempts: queued here, then in chunks on the cluster.
        self._queue: collections.deque[Call] = collections.deque()
        self._solo_keys: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._chunks: set[_Chunk] = set()
        self._where: dict[Call, tuple[_Chunk, int]] = {}
        self._seq = itertools.count()
        self._items_in_flight = 0
        self._item_seconds: float | None = None
        self._dispatch_pending = False
        self._cancels: list[tuple[str, int]] = []
        self._background: set[asyncio.Task[Any]] = set()

        # Stopping, and the counts for `statistics`.
        self._stop_error: BaseException | None = None
        self._aborted = False
        self._closing = False
        self._given_up: asyncio.Future[None] | None = None
        self._workers_started = 0
        self._lost_addresses: set[str] = set()
        self._abandoned = 0
        self._chunks_sent = 0

    # --- Construction --------------------------------------------------------

    @classmethod
    def for_task(
        cls,
        task: TaskSpec,
        cluster: DaskCluster,
        concurrency: int | None,
        *,
        queue_ahead: bool = True,
    ) -> DaskBackend:
        """Describe a run of a Python task; nothing connects before `start`.

        Raises:
            ConfigurationError: The task, its setup or its teardown cannot
                be pickled.
        """
        task_bytes = check_picklable(task)
        payload = pickle.dumps(("call", task.name, task_bytes, task.wants_context))
        work = _Work(payload, task.name, task.wants_context, task=task)
        return cls(work, cluster, concurrency, queue_ahead=queue_ahead)

    @classmethod
    def for_command(
        cls,
        template: CommandTemplate,
        cluster: DaskCluster,
        concurrency: int | None,
        *,
        env: Mapping[str, str] | None = None,
        batched: bool = False,
        queue_ahead: bool = True,
    ) -> DaskBackend:
        """Describe a run of a command template; nothing connects before `start`.

        The run's secrets reach each command's environment from the snapshot
        in its context, which travels with the chunk.

        Args:
            env: The whole environment of the commands; by default each
                worker's own environment.

        Raises:
            ConfigurationError: The template uses ``{%}``.
        """
        if template.uses_slot:
            raise ConfigurationError(
                f"command template {template.source!r} uses {{%}}, the job slot, "
                "which the dask backend does not number: commands run in the "
                "threads of many workers. Use {#} or the item instead"
            )
        name = template.source
        environment = dict(env) if env is not None else None
        payload = pickle.dumps(("command", name, template, environment, batched))
        work = _Work(payload, name, True, commands=True)
        return cls(work, cluster, concurrency, queue_ahead=queue_ahead)

    # --- The Backend interface -------------------------------------------------

    @property
    def capacity(self) -> int:
        if not self.queue_ahead:
            # An attempt's timeout runs from hand-over, and a halt must keep
            # the next items from starting: hand over no more than can run.
            return self.concurrency
        return max(self.concurrency, min(self._task_limit * _MAX_CHUNK, MAX_CAPACITY))

    @property
    def chunks_sent(self) -> int:
        """Dask tasks submitted so far, each a chunk of attempts."""
        return self._chunks_sent

    async def start(self) -> None:
        """Connect to the cluster (or start a local one) and load the task on it.

        Raises:
            RunAbortedError: The scheduler cannot be reached, or no worker
                joined it in time.
            ConfigurationError: The workers cannot load the task, or its
                setup failed on a worker.
        """
        loop = self._loop = asyncio.get_running_loop()
        self._given_up = loop.create_future()
        await self._connect()
        await self._measure_cluster()
        await self._register()

    async def execute(self, call: Call) -> Any:
        if call.cancel_error is not None:
            raise call.cancel_error
        if self._stop_error is not None:
            raise self._stop_error.with_traceback(None)
        loop = self._loop
        assert loop is not None, "start() must be called before execute()"
        future: asyncio.Future[_Outcome] = loop.create_future()
        call.handle = future
        self._queue.append(call)
        self._schedule_dispatch()
        ok, value = await future
        if ok:
            return value
        # A shared error instance (a cancel error, the stop error) would otherwise
        # collect one traceback entry per attempt that raises it.
        raise value.with_traceback(None)

    def cancel(self, call: Call, error: BaseException) -> None:
        call.cancel_error = error
        future = call.handle
        if not isinstance(future, asyncio.Future) or future.done():
            return
        future.set_result((False, error))
        where = self._where.get(call)
        if where is None:
            return  # still queued here: the dispatcher drops settled calls
        chunk, index = where
        chunk.given_up += 1
        self._send_cancels([(chunk.key, index)])

    def stop_queued(self, error: BaseException) -> None:
        # Chunks already submitted carry about _TARGET_CHUNK_SECONDS of work
        # each, so they are left to finish.
        if self._stop_error is None:
            self._stop_error = error
        self._fail_queue(error)

    def terminate(self) -> None:
        if self._given_up is not None and not self._given_up.done():
            self._given_up.set_result(None)

    async def aclose(self, *, cancel: bool) -> None:
        if self._closing:
            return
        self._closing = True
        if self._stop_error is None:
            self._stop_error = RuntimeError(
                "the dask backend was closed before this attempt finished"
            )
        self._fail_queue(self._stop_error)
        try:
            await self._end_chunks(cancel)
            await self._unregister()
        finally:
            await self._disconnect()

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(
            workers_started=self._workers_started,
            workers_lost=len(self._lost_addresses),
            abandoned_threads=self._abandoned,
        )

    # --- Connecting --------------------------------------------------------------

    async def _connect(self) -> None:
        cluster = self.cluster
        address = cluster.address
        if address is None and cluster.local_cluster is None:
            address = dask.config.get("scheduler-address", None)
        if address is None:
            workers = cluster.local_cluster or os.cpu_count() or 1
            loop = asyncio.get_running_loop()
            self._local_starting = loop.run_in_executor(
                None, start_local_cluster, workers, cluster.threads_per_worker
            )
            self._local = await asyncio.shield(self._local_starting)
            address = self._local.scheduler_address
            logger.info(
                "started a local Dask cluster of %d worker processes at %s",
                workers,
                address,
            )
        self._address = address
        self._client = Client(  # type: ignore[no-untyped-call]
            address,
            asynchronous=True,
            set_as_default=False,
            timeout=cluster.connect_timeout,
        )
        try:
            # Dask bounds the connection attempts but not the handshake after
            # them, to which a peer that is not a Dask scheduler never replies.
            await asyncio.wait_for(self._client, cluster.connect_timeout)
        except (OSError, TimeoutError) as error:
            raise RunAbortedError(
                f"cannot connect to the Dask scheduler at {address} ({error}); check "
                "that it runs and that this machine can reach it"
            ) from error

    async def _measure_cluster(self) -> None:
        client = self._client
        timeout = self.cluster.connect_timeout
        try:
            await client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise RunAbortedError(
                f"no Dask worker joined the scheduler at {self._address} within "
                f"{timeout:g} s; start workers with: dask worker {self._address}"
            ) from None
        threads: dict[str, int] = await client.nthreads()
        total = max(1, sum(threads.values()))
        self._workers_started = len(threads)
        if self._fixed is None:
            self.concurrency = total
            self._task_limit = self.cluster.max_in_flight or 2 * total
        if self._local is None:
            await self._check_allowed_failures()
        logger.info(
            "Dask cluster at %s: %d workers, %d threads; up to %d attempts at once "
            "in up to %d tasks",
            self._address,
            len(threads),
            total,
            self.concurrency,
            self._task_limit,
        )

    async def _check_allowed_failures(self) -> None:
        try:
            allowed = await self._client.run_on_scheduler(_allowed_failures)
        except Exception as error:
            logger.debug("cannot read the scheduler's allowed_failures: %s", error)
            return
        if allowed:
            logger.warning(
                "the Dask scheduler at %s runs a task again on another worker when "
                "its worker dies, up to %d times; set "
                "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0 for the scheduler "
                "so that only batchtools retries attempts and counts lost workers",
                self._address,
                allowed,
            )

    async def _register(self) -> None:
        plugin = RunPlugin(self._token, self._work.payload)
        try:
            await self._client.register_plugin(plugin, name=self._plugin_name)
        except WorkerLoadError as error:
            self._registered = True  # the scheduler keeps it for new workers
            task = self._work.task
            if error.stage == "setup" and task is not None:
                raise setup_failed(task, "a Dask worker", error) from None
            raise self._load_error(error) from None
        except (OSError, TimeoutError) as error:
            raise RunAbortedError(
                f"the Dask scheduler at {self._address} failed while the task was "
                f"being loaded on the workers ({error})"
            ) from error
        except Exception as error:
            self._registered = True
            raise self._load_error(error) from None
        self._registered = True

    def _load_error(self, error: BaseException) -> ConfigurationError:
        return ConfigurationError(
            f"task {self._work.name} cannot be loaded on the Dask workers "
            f"({type(error).__name__}: {error}). Every worker needs batchtools, "
            "the task's module and the same Python version as this machine"
        )

    @property
    def _plugin_name(self) -> str:
        return f"batchtools-{self._token}"

    # --- Closing -----------------------------------------------------------------

    async def _end_chunks(self, cancel: bool) -> None:
        """Settle or give up on the chunks still running."""
        chunks = list(self._chunks)
        if not chunks:
            return
        if cancel:
            cancels = []
            for chunk in chunks:
                for index, call in enumerate(chunk.calls):
                    future = call.handle
                    if isinstance(future, asyncio.Future) and not future.done():
                        future.set_result((False, self._stop_error))
                        chunk.given_up += 1
                        cancels.append((chunk.key, index))
            if not self._aborted:
                self._send_cancels(cancels)
        waiters = [chunk.waiter for chunk in chunks if chunk.waiter is not None]
        if self._work.commands and not self._aborted:
            # Let the workers stop the commands before their processes go.
            await self._wait_all(waiters, _COMMAND_STOP_WAIT)
        left = list(self._chunks)
        for chunk in left:
            # What is left executes Python code that nothing can stop, or ran
            # on a scheduler that is gone. Commands were sent their stop.
            if not self._work.commands:
                self._abandoned += chunk.given_up
            if chunk.waiter is not None:
                chunk.waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
        if left and not self._aborted:
            futures = [chunk.future for chunk in left]
            try:
                await self._bounded(self._client.cancel(futures))
            except Exception as error:
                logger.debug("cancelling the Dask tasks left failed: %s", error)

    async def _unregister(self) -> None:
        if not self._registered or self._aborted or self._client is None:
            return
        try:
            await self._bounded(
                self._client.unregister_worker_plugin(self._plugin_name)
            )
        except _GaveUp:
            logger.info(
                "task %s: stopped waiting for the teardown on the Dask workers",
                self._work.name,
            )
        except Exception as error:
            logger.warning(
                "task %s: the teardown on the Dask workers failed: %s",
                self._work.name,
                error,
            )

    async def _disconnect(self) -> None:
        if self._aborted:
            # The client logs its interrupted reconnection as an error with a
            # traceback, while the run's own error already describes the loss.
            quiet = _DropRecords()
            client_log = logging.getLogger("distributed.client")
            client_log.addFilter(quiet)
            try:
                await self._close_all()
            finally:
                client_log.removeFilter(quiet)
            return
        await self._close_all()

    async def _close_all(self) -> None:
        self._flush_cancels()
        # Cancels sent to the workers must go out before the client closes.
        await self._wait_all(list(self._background), _CLOSE_TIMEOUT)
        for task in list(self._background):
            task.cancel()
        client = self._client
        if client is not None:
            self._client = None
            try:
                await self._bounded(
                    client.close(timeout=_CLOSE_TIMEOUT), interruptible=False
                )
            except Exception as error:
                logger.debug("closing the Dask client failed: %s", error)
        if self._local is None and self._local_starting is not None:
            # A stop came while the local cluster was starting.
            try:
                self._local = await self._bounded(
                    self._local_starting, interruptible=False
                )
            except Exception as error:
                logger.debug("the local Dask cluster failed to start: %s", error)
        local = self._local
        if local is not None:
            # Even after `terminate`: closing the workers stops their commands.
            self._local = None
            loop = asyncio.get_running_loop()
            closing = loop.run_in_executor(None, _close_local_cluster, local)
            try:
                await self._bounded(
                    asyncio.shield(closing), _CLOSE_TIMEOUT + 5, interruptible=False
                )
            except TimeoutError as error:
                logger.warning(
                    "the local Dask cluster at %s failed to close: %s",
                    local.scheduler_address,
                    error,
                )

    async def _wait_all(
        self, futures: Sequence[asyncio.Future[Any]], timeout: float
    ) -> None:
        """Wait until ``futures`` are done, ``timeout`` seconds pass, or `terminate`."""
        if not futures:
            return
        everything = asyncio.ensure_future(asyncio.wait(futures))
        waits: list[asyncio.Future[Any]] = [everything]
        if self._given_up is not None:
            waits.append(self._given_up)
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        everything.cancel()

    async def _bounded(
        self,
        awaitable: Any,
        timeout: float = _CLOSE_TIMEOUT,
        *,
        interruptible: bool = True,
    ) -> Any:
        """Await ``awaitable`` for ``timeout`` seconds, or until `terminate`.

        Raises:
            TimeoutError: It did not finish within ``timeout`` seconds.
            _GaveUp: `terminate` was called, and ``interruptible`` is true.
        """
        task = asyncio.ensure_future(awaitable)
        waits: list[asyncio.Future[Any]] = [task]
        if interruptible and self._given_up is not None:
            waits.append(self._given_up)
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if interruptible and self._given_up is not None and self._given_up.done():
            raise _GaveUp("the run was terminated")
        raise TimeoutError(f"it did not finish within {timeout:g} s")

    # --- Dispatching -------------------------------------------------------------

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_pending and self._loop is not None:
            self._dispatch_pending = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Submit chunks from the queue while fewer than the limit are in flight."""
        self._dispatch_pending = False
        if self._stop_error is not None or self._client is None:
            return
        if self._client.status != "running":
            self._scheduler_lost(f"the client's state is {self._client.status!r}")
            return
        while self._queue and len(self._chunks) < self._task_limit:
            calls = self._take_chunk(self._chunk_size())
            if calls:
                self._submit(calls)

    def _chunk_size(self) -> int:
        """Return how many calls the next chunk may take.

        The size aims at `_TARGET_CHUNK_SECONDS` of work, but no more than a
        fair share of the calls in the backend, so that the last chunks of a
        run spread over all workers.
        """
        if self._item_seconds is None:
            return 1
        target = int(_TARGET_CHUNK_SECONDS / max(self._item_seconds, 1e-9))
        share = math.ceil((len(self._queue) + self._items_in_flight) / self._task_limit)
        return max(1, min(target, share, _MAX_CHUNK))

    def _take_chunk(self, size: int) -> list[Call]:
        queue = self._queue
        calls: list[Call] = []
        while queue and len(calls) < size:
            call = queue[0]
            if call.handle.done():
                queue.popleft()
                continue
            if call.timeout is not None or (
                self._solo_keys and call.context.key in self._solo_keys
            ):
                # A call with a timeout travels alone because its timer already
                # runs; a suspect travels alone so that a loss is its own.
                if calls:
                    break
                queue.popleft()
                return [call]
            calls.append(queue.popleft())
        return calls

    def _submit(self, calls: list[Call]) -> None:
        calls, data = self._pickle_entries(calls)
        if not calls:
            return
        first = calls[0].context
        seq = next(self._seq)
        key = (
            f"batchtools-{first.run_id}-{first.key}-{first.attempt}-{self._token}-{seq}"
        )
        chunk = _Chunk(key, calls)
        try:
            chunk.future = self._client.submit(
                run_chunk, self._token, key, data, key=key, pure=False
            )
        except Exception as error:
            # The client cannot submit, which means it lost the scheduler.
            self._scheduler_lost(f"{type(error).__name__}: {error}")
            for call in calls:
                _settle(call, (False, self._stop_error))
            return
        for index, call in enumerate(calls):
            self._where[call] = (chunk, index)
        self._chunks.add(chunk)
        self._items_in_flight += len(calls)
        self._chunks_sent += 1
        assert self._loop is not None
        chunk.waiter = self._loop.create_task(self._await_chunk(chunk))

    def _pickle_entries(self, calls: list[Call]) -> tuple[list[Call], bytes]:
        """Pickle the entries of ``calls``; return the calls sent and the bytes.

        A call whose item cannot be pickled fails with PicklingError instead.
        """
        with contextlib.suppress(Exception):
            return calls, pickle.dumps(self._entries(calls), _PROTOCOL)
        picklable: list[Call] = []
        for call in calls:
            try:
                pickle.dumps(self._entries([call]), _PROTOCOL)
            except Exception as error:
                failure = pickle.PicklingError(
                    "the item cannot be pickled to send it to a Dask worker "
                    f"({type(error).__name__}: {error})"
                )
                failure.__cause__ = error
                _settle(call, (False, failure))
            else:
                picklable.append(call)
        try:
            return picklable, pickle.dumps(self._entries(picklable), _PROTOCOL)
        except Exception as error:
            for call in picklable:
                _settle(call, (False, error))
            return [], b""

    def _entries(self, calls: list[Call]) -> list[tuple[Any, Any, Any]]:
        if self._work.wants_context:
            return [(call.payload, call.context, call.timeout) for call in calls]
        return [(call.payload, None, None) for call in calls]

    # --- Receiving ---------------------------------------------------------------

    async def _await_chunk(self, chunk: _Chunk) -> None:
        try:
            outcome = await chunk.future
        except FutureCancelledError as error:
            if error.reason == "scheduler-connection-lost":
                self._scheduler_lost(error.reason)
            self._settle_rest(chunk, self._stop_error or error)
        except KilledWorker as error:
            self._worker_lost(chunk, error)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            client = self._client
            if client is not None and client.status != "running":
                self._scheduler_lost(f"{type(error).__name__}: {error}")
                self._settle_rest(chunk, self._stop_error or error)
            else:
                # run_chunk itself failed on the worker, not the task.
                logger.warning(
                    "task %s: a chunk of %d attempts failed on a Dask worker: %s",
                    self._work.name,
                    len(chunk.calls),
                    error,
                )
                self._settle_rest(chunk, error)
        else:
            self._deliver(chunk, outcome)
        finally:
            self._chunk_ended(chunk)

    def _chunk_ended(self, chunk: _Chunk) -> None:
        if chunk not in self._chunks:
            return
        self._chunks.discard(chunk)
        self._items_in_flight -= len(chunk.calls)
        for call in chunk.calls:
            self._where.pop(call, None)
        self._schedule_dispatch()

    def _deliver(self, chunk: _Chunk, outcome: tuple[Any, ...]) -> None:
        kind, elapsed, executed, frames = outcome[:4]
        address = outcome[4] if len(outcome) > 4 else None
        calls = chunk.calls
        if kind == CHUNK_UNDECODABLE:
            self._undecodable(chunk, frames[0][2])
            return
        for index, status, data, began_at, took in frames:
            call = calls[index]
            if call.handle.done():
                continue
            call.worker = address
            call.started = began_at
            call.duration = took
            if status == FRAME_OK:
                try:
                    result: _Outcome = (True, pickle.loads(data))
                except Exception as error:
                    result = (False, self._result_unpickling_error(error))
            elif status == FRAME_COMMAND_FAILED:
                encoded, command_result = pickle.loads(data)
                failure = decode_error(encoded)
                if isinstance(failure, CommandFailedError):
                    failure.result = command_result
                result = (False, failure)
            else:
                result = (False, decode_error(data))
            call.handle.set_result(result)
        # Items without a frame were skipped: cancelled by the driver, which
        # settled them already, or left when their worker began to close.
        left = [call for call in calls if not call.handle.done()]
        for call in left:
            self._where.pop(call, None)
        self._queue.extendleft(reversed(left))
        if executed:
            sample = elapsed / executed
            average = self._item_seconds
            self._item_seconds = (
                sample if average is None else average + _SMOOTHING * (sample - average)
            )

    def _undecodable(self, chunk: _Chunk, data: bytes) -> None:
        calls = [call for call in chunk.calls if not call.handle.done()]
        if len(chunk.calls) == 1:
            cause = decode_error(data)
            error = pickle.UnpicklingError(
                "the item cannot be unpickled on the Dask worker "
                f"({type(cause).__name__}: {cause})"
            )
            error.__cause__ = cause
            _settle(chunk.calls[0], (False, error))
            return
        # Send each call alone, so that only the culprit fails.
        for call in calls:
            self._mark_solo(call.context.key)
            self._where.pop(call, None)
        self._queue.extendleft(reversed(calls))

    def _result_unpickling_error(self, error: Exception) -> BaseException:
        failure = pickle.UnpicklingError(
            f"the value returned by task {self._work.name} cannot be unpickled on "
            f"the driver ({type(error).__name__}: {error})"
        )
        failure.__cause__ = error
        return failure

    def _worker_lost(self, chunk: _Chunk, error: KilledWorker) -> None:
        worker = getattr(error, "last_worker", None)
        address = str(getattr(worker, "address", None) or "at an unknown address")
        unsettled = [call for call in chunk.calls if not call.handle.done()]
        for call in unsettled:
            if len(chunk.calls) > 1:
                self._mark_solo(call.context.key)
            call.handle.set_result((False, DaskWorkerLostError(address)))
        if address not in self._lost_addresses:
            self._lost_addresses.add(address)
            logger.warning(
                "task %s: Dask worker %s was lost; the attempts it held fail and "
                "are tried again on the other workers",
                self._work.name,
                address,
            )

    def _mark_solo(self, key: str) -> None:
        self._solo_keys[key] = None
        self._solo_keys.move_to_end(key)
        if len(self._solo_keys) > _SOLO_KEYS:
            self._solo_keys.popitem(last=False)

    def _scheduler_lost(self, detail: str) -> None:
        if self._aborted:
            return
        self._aborted = True
        error = RunAbortedError(
            f"the connection to the Dask scheduler at {self._address} was lost "
            f"({detail}), so the run stopped; what was committed is kept, and a "
            "resume runs the rest once a scheduler is reachable"
        )
        # The engine logs the error when the first attempt fails with it.
        self._stop_error = error
        self._fail_queue(error)
        for chunk in list(self._chunks):
            self._settle_rest(chunk, error)

    def _settle_rest(self, chunk: _Chunk, error: BaseException) -> None:
        for call in chunk.calls:
            _settle(call, (False, error))

    def _fail_queue(self, error: BaseException) -> None:
        for call in self._queue:
            _settle(call, (False, error))
        self._queue.clear()

    # --- Cancels -----------------------------------------------------------------

    def _send_cancels(self, cancels: list[tuple[str, int]]) -> None:
        """Send cancels to the workers, gathered into one message per loop turn."""
        if not cancels or self._client is None or self._loop is None:
            return
        first = not self._cancels
        self._cancels.extend(cancels)
        if first:
            self._loop.call_soon(self._flush_cancels)

    def _flush_cancels(self) -> None:
        cancels, self._cancels = self._cancels, []
        if cancels and self._client is not None and not self._aborted:
            self._in_background(self._client.run(cancel_attempts, cancels, wait=False))

    def _in_background(self, awaitable: Coroutine[Any, Any, Any] | Any) -> None:
        task = asyncio.ensure_future(awaitable)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.debug("a message to the Dask cluster failed: %s", task.exception())


class _GaveUp(Exception):
    """`DaskBackend.terminate` ended a wait."""


class _DropRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


def _settle(call: Call, outcome: _Outcome) -> None:
    future = call.handle
    if isinstance(future, asyncio.Future) and not future.done():
        future.set_result(outcome)


def _close_local_cluster(cluster: LocalCluster) -> None:
    cluster.close(timeout=_CLOSE_TIMEOUT)
