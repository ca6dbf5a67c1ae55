"""The worker side of the dask backend: what runs inside each Dask worker.

`RunPlugin` loads the run's task once per worker, with its setup and
teardown. `run_chunk` is the function of every Dask task the backend
submits: it executes a chunk of attempts and returns one frame per item, so
that outcomes stay per item. `cancel_attempts` reaches a chunk that executes
here when the driver gives up on one of its attempts.

Commands run through the subprocess backend, driven by an event loop of the
chunk's own, so they are spawned, captured and stopped as on one machine.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from distributed import WorkerPlugin

from batchtools._exceptions import (
    AttemptTimeoutError,
    BatchtoolsError,
    CommandFailedError,
)
from batchtools.backends._base import Call
from batchtools.backends._command import CommandTemplate
from batchtools.backends._process import _encode_error
from batchtools.backends._subprocess import SubprocessBackend
from batchtools.secrets import Redactor

logger = logging.getLogger(__name__)

_PROTOCOL = pickle.HIGHEST_PROTOCOL

# The result of a chunk: (kind, elapsed seconds, items executed, frames).
CHUNK_DONE = 0
CHUNK_UNDECODABLE = 1
# One frame per executed item: (index in the chunk, status, data, when it
# began in seconds since the epoch, seconds it took).
Frame = tuple[int, int, bytes, float, float]
FRAME_OK = 0
FRAME_FAILED = 1  # data is an encoded exception
FRAME_COMMAND_FAILED = 2  # data pickles (encoded exception, CommandResult)


@dataclass(slots=True)
class _LoadedRun:
    """The run's task as one worker loaded it."""

    name: str
    function: Callable[..., Any] | None = None
    wants_context: bool = False
    setup: Callable[[], Any] | None = None
    teardown: Callable[[Any], Any] | None = None
    state: Any = None
    template: CommandTemplate | None = None
    env: dict[str, str] | None = None
    batched: bool = False


class WorkerLoadError(Exception):
    """The run's task could not be loaded, or its setup failed, on a worker.

    Attributes:
        stage: ``load`` or ``setup``.
        type_name: The qualified name of the original exception's type.
        message: `str()` of the original exception.
    """

    def __init__(self, stage: str, type_name: str, message: str) -> None:
        super().__init__(stage, type_name, message)
        self.stage = stage
        self.type_name = type_name
        self.message = message

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}"


_runs: dict[str, _LoadedRun] = {}
_chunks: dict[str, _ChunkState] = {}
_registry_lock = threading.Lock()


class RunPlugin(WorkerPlugin):
    """Loads the run's task on each worker and runs its setup and teardown."""

    def __init__(self, token: str, work: bytes) -> None:
        self.token = token
        self.work = work

    async def setup(self, worker: Any) -> None:
        try:
            loaded = _load_work(self.work)
        except Exception as error:
            raise WorkerLoadError("load", _type_name(error), str(error)) from None
        if loaded.setup is not None:
            # A setup may take a while (a connection, a model), and the worker's
            # event loop must keep replying to the scheduler meanwhile.
            try:
                loaded.state = await asyncio.to_thread(loaded.setup)
            except Exception as error:
                raise WorkerLoadError("setup", _type_name(error), str(error)) from None
        with _registry_lock:
            _runs[self.token] = loaded

    async def teardown(self, worker: Any) -> None:
        with _registry_lock:
            loaded = _runs.pop(self.token, None)
            executing = [
                state for state in _chunks.values() if state.token == self.token
            ]
        # The run is over, or the worker is closing: commands still running
        # would outlive it, since each runs in a process group of its own.
        for state in executing:
            state.close()
        if loaded is None or loaded.teardown is None:
            return
        try:
            await asyncio.to_thread(loaded.teardown, loaded.state)
        except Exception:
            logger.exception(
                "the teardown function of task %s failed on Dask worker %s",
                loaded.name,
                getattr(worker, "address", "?"),
            )


def _load_work(work: bytes) -> _LoadedRun:
    kind, *parts = pickle.loads(work)
    if kind == "command":
        name, template, env, batched = parts
        return _LoadedRun(name, template=template, env=env, batched=batched)
    name, task_bytes, wants_context = parts
    function, setup, teardown = pickle.loads(task_bytes)
    return _LoadedRun(name, function, wants_context, setup, teardown)


class _ChunkState:
    """The executing and skipped items of a chunk, for cancels from the driver."""

    __slots__ = ("closed", "current", "event", "lock", "skipped", "stop", "token")

    def __init__(self, token: str) -> None:
        self.token = token
        self.lock = threading.Lock()
        self.closed = False
        self.skipped: set[int] = set()
        self.current = -1
        self.event: threading.Event | None = None
        self.stop: Callable[[], Any] | None = None

    def begin(
        self,
        index: int,
        event: threading.Event | None = None,
        stop: Callable[[], Any] | None = None,
    ) -> bool:
        """Mark item ``index`` as executing; return False if it was cancelled."""
        with self.lock:
            if self.closed or index in self.skipped:
                return False
            self.current = index
            self.event = event
            self.stop = stop
            return True

    def end(self) -> None:
        with self.lock:
            self.current = -1
            self.event = None
            self.stop = None

    def cancel(self, index: int) -> None:
        with self.lock:
            if index != self.current:
                self.skipped.add(index)
                return
            self._stop_current()

    def close(self) -> None:
        """Skip the items not started and stop the one executing."""
        with self.lock:
            self.closed = True
            self._stop_current()

    def _stop_current(self) -> None:
        # The caller holds the lock.
        if self.event is not None:
            self.event.set()
        if self.stop is not None:
            self.stop()


def run_chunk(token: str, chunk_key: str, data: bytes) -> tuple[Any, ...]:
    """Execute one chunk of attempts on a worker: the function of every Dask task.

    Returns:
        ``(kind, elapsed, executed, frames, address)``, with one `Frame`
        per item executed and the address of the worker that executed them.

    Raises:
        RuntimeError: The run's task is not loaded on this worker.
    """
    with _registry_lock:
        loaded = _runs.get(token)
    if loaded is None:
        raise RuntimeError(
            f"the task of this run is not loaded on Dask worker {_worker_address()}, "
            "because its setup failed there or the worker left the run"
        )
    try:
        entries = pickle.loads(data)
    except BaseException as error:
        frame = (0, FRAME_FAILED, _encode_error(error), 0.0, 0.0)
        return (CHUNK_UNDECODABLE, 0.0, 0, [frame])
    del data
    state = _ChunkState(token)
    with _registry_lock:
        _chunks[chunk_key] = state
    try:
        if loaded.template is not None:
            result = asyncio.run(_run_commands(loaded, entries, state))
        else:
            result = _run_calls(loaded, entries, state)
        return (*result, _worker_address())
    finally:
        with _registry_lock:
            _chunks.pop(chunk_key, None)


def _run_calls(
    loaded: _LoadedRun, entries: list[tuple[Any, Any, Any]], state: _ChunkState
) -> tuple[Any, ...]:
    function = loaded.function
    assert function is not None
    wants_context = loaded.wants_context
    frames: list[Frame] = []
    executed = 0
    clock = time.perf_counter
    started = clock()
    for index, (payload, context, _) in enumerate(entries):
        event = None
        if wants_context:
            event = threading.Event()
            context.cancelled = event
            context.state = loaded.state
        if not state.begin(index, event):
            continue
        began_at = time.time()
        began = clock()
        try:
            if wants_context:
                value = function(payload, context=context)
            else:
                value = function(payload)
        except BaseException as error:
            status, data = FRAME_FAILED, _encode_error(error)
        else:
            status, data = _value_data(value, loaded.name)
        finally:
            state.end()
        frames.append((index, status, data, began_at, clock() - began))
        executed += 1
    return (CHUNK_DONE, clock() - started, executed, frames)


async def _run_commands(
    loaded: _LoadedRun, entries: list[tuple[Any, Any, Any]], state: _ChunkState
) -> tuple[Any, ...]:
    assert loaded.template is not None
    secrets = _ChunkSecrets(entries)
    backend = SubprocessBackend(
        loaded.template,
        1,
        env=loaded.env,
        batched=loaded.batched,
        secrets=cast(Any, secrets) if len(secrets) else None,
    )
    await backend.start()
    loop = asyncio.get_running_loop()
    frames: list[Frame] = []
    executed = 0
    clock = time.perf_counter
    started = clock()
    try:
        for index, (payload, context, timeout) in enumerate(entries):
            call = Call(payload, context, timeout)
            stopped = _StoppedByDriver()

            def stop(call: Call = call, error: BaseException = stopped) -> None:
                loop.call_soon_threadsafe(backend.cancel, call, error)

            if not state.begin(index, None, stop):
                continue
            # The driver times the attempt too; this timer stops the command
            # even if the driver's cancel never arrives.
            timer = (
                loop.call_later(
                    timeout, backend.cancel, call, AttemptTimeoutError(timeout)
                )
                if timeout is not None
                else None
            )
            began_at = time.time()
            began = clock()
            try:
                value = await backend.execute(call)
            except _StoppedByDriver:
                # The driver settled the attempt already, or the worker is
                # closing and the driver sends the item elsewhere.
                continue
            except CommandFailedError as error:
                status, data = FRAME_COMMAND_FAILED, _command_failure(error)
            except BaseException as error:
                status, data = FRAME_FAILED, _encode_error(error)
            else:
                status, data = _value_data(value, loaded.name)
                value.close()
            finally:
                state.end()
                if timer is not None:
                    timer.cancel()
            frames.append((index, status, data, began_at, clock() - began))
            executed += 1
    finally:
        await backend.aclose(cancel=True)
    return (CHUNK_DONE, clock() - started, executed, frames)


class _ChunkSecrets:
    """The secrets of a chunk's commands, read from the snapshots in their contexts.

    It offers what `SubprocessBackend` reads of a `SecretStore`: the
    environment of one attempt's command, and a redactor of every value,
    so that the output sent back to the driver is redacted already.
    """

    def __init__(self, entries: list[tuple[Any, Any, Any]]) -> None:
        self._by_attempt: dict[tuple[str, int], Any] = {}
        values: set[str] = set()
        for _, context, _ in entries:
            secrets = getattr(context, "secrets", None)
            if not secrets:
                continue
            self._by_attempt[(context.key, context.attempt)] = secrets
            for name in secrets:
                try:
                    values.add(secrets[name])
                except BatchtoolsError:
                    continue  # expired: its command fails when it reads it
        self.redactor = Redactor(sorted(values))

    def __len__(self) -> int:
        return len(self._by_attempt)

    def environment(
        self,
        *,
        run_id: str | None = None,
        key: str | None = None,
        attempt: int | None = None,
    ) -> dict[str, str]:
        """Return the secrets of one attempt as environment variables.

        Raises:
            SecretExpiredError: A secret has expired, so the command must
                not start.
        """
        secrets = self._by_attempt.get((key or "", attempt or 0))
        if secrets is None:
            return {}
        return {name: secrets[name] for name in secrets}


class _StoppedByDriver(Exception):
    """The command was stopped because the driver gave up on its attempt.

    A teardown of the run on a closing worker stops commands the same way.
    """


def _command_failure(error: CommandFailedError) -> bytes:
    result = error.result
    data = pickle.dumps((_encode_error(error), result), _PROTOCOL)
    if result is not None:
        result.close()
    return data


def _value_data(value: Any, task_name: str) -> tuple[int, bytes]:
    """Return the status and data of the frame of a returned ``value``."""
    try:
        return (FRAME_OK, pickle.dumps(value, _PROTOCOL))
    except BaseException as error:
        failure = pickle.PicklingError(
            f"task {task_name} returned a {type(value).__qualname__} that cannot be "
            f"pickled to send it back from the Dask worker: {error}"
        )
        failure.__cause__ = error
        return (FRAME_FAILED, _encode_error(failure))


async def cancel_attempts(cancels: list[tuple[str, int]]) -> None:
    """Cancel items of chunks executing on this worker; sent by `Client.run`.

    A coroutine function, because `Client.run` runs only those without
    waiting for their result. Chunks that run elsewhere are not found here.
    """
    with _registry_lock:
        found = [(_chunks[key], index) for key, index in cancels if key in _chunks]
    for state, index in found:
        state.cancel(index)


def _worker_address() -> str:
    try:
        from distributed import get_worker

        address: str = get_worker().address
        return address
    except ValueError:
        return "?"


def _type_name(error: BaseException) -> str:
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"
