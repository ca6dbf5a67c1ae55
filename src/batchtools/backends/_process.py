"""The process backend: Python tasks in a pool of forkserver worker processes.

This backend is written by hand rather than on `ProcessPoolExecutor` because
the engine needs supervision that the executor does not offer. When a worker
dies, the executor marks the whole pool as broken and cannot report which
item killed it. Here only the item that was executing fails, with
`WorkerLostError`. The items its worker had finished keep their results, the
items it had not started go back to the queue, and a replacement worker
starts. Chunks are sized from the measured duration of recent items, so tiny
items travel hundreds at a time and slow ones one by one, and a single
executing attempt can be stopped by killing its worker.

Data flow for one worker::

    execute(call) -> queue -> chunk -> inbox pipe -> worker process
                                                          |
        for each item of the chunk the worker records it  |
        as executing in the control block (shared memory), |
        calls the task and appends a result frame to the   |
        journal (shared memory too)                        |
                                                          v
    future <- results message <- outbox pipe <- journal, sent at the end of
                                                 the chunk, when it is full,
                                                 and after any item that ends
                                                 50 ms or more after the
                                                 previous send

    worker exits (its sentinel becomes readable) -> read what is left in the
        outbox, then the journal and the control block: finished items keep
        their results, the executing item fails with WorkerLostError, the
        unstarted items go back to the queue, and a replacement starts.

The parent reads and writes the worker pipes in non-blocking mode from the
event loop, in the framing of `multiprocessing.connection.Connection`, which
the workers use directly. Starting a worker process does block the loop
while multiprocessing's forkserver forks it.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.util
import os
import pickle
import select
import signal
import struct
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.context import ForkServerContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Lock as ProcessLock
from typing import Any

import cloudpickle
import psutil

from batchtools._exceptions import (
    ConfigurationError,
    MemoryLimitError,
    RemoteError,
    RunAbortedError,
    WorkerLostError,
    format_size,
)
from batchtools.backends._base import Backend, BackendStatistics, Call, TaskSpec
from batchtools.backends._local import setup_failed

logger = logging.getLogger(__name__)

_PROTOCOL = pickle.HIGHEST_PROTOCOL

CAPACITY_PER_WORKER = 1024
"""Attempts the engine may hand over per worker, within `MAX_CAPACITY`.

The surplus over ``concurrency`` fills the chunks, and each worker needs a
chunk queued behind the one it executes for as long as the parent takes to
send the next. One measurement ran 200,000 items of 15 us on two workers,
on a 2-CPU virtual machine shared with other busy processes. With 256 per
worker, each worker waited for the parent for about 0.6 s of a 7 s run, and
1024 cut that wait to 0.1 to 0.4 s.
"""

MAX_CAPACITY = 16384
"""Bound on `ProcessBackend.capacity`, because the engine keeps one coroutine
per attempt handed over. The bound never cuts below 256 attempts per worker."""

_TARGET_CHUNK_SECONDS = 0.02  # the work one chunk should carry
_MAX_CHUNK = 1000  # items per chunk, and the size of each skip-flag region
# Items slower than this on average get no second chunk queued at the worker.
_PREFETCH_MAX_ITEM_SECONDS = 0.01
_SMOOTHING = 0.5  # weight of the newest sample in the item-duration average
# A worker sends its journal after an item when this long has passed since
# its previous send, so the parent receives results during long chunks.
_FLUSH_SECONDS = 0.05
_JOURNAL_BYTES = 256 * 1024
# Consecutive worker deaths before the ready message that end the run.
_MAX_STARTUP_FAILURES = 3
# How often _acquire checks whether a worker died while holding its lock.
_LOCK_POLL_SECONDS = 0.01
_MEMORY_CHECK_SECONDS = 0.1  # how often workers' resident memory is read
_ORPHANED = 70  # a worker's exit status when the main process died
_READ_BYTES = 65536  # the default capacity of a Linux pipe
_READS_PER_WAKEUP = 16  # bounds the time one busy pipe keeps the event loop

# The control block: three int64 fields that the worker writes and the parent
# reads, under the worker's lock while the worker is alive.
_H_SEQ = 0  # sequence number of the chunk the worker is in, -1 before any
# 2 * index + 1 while item ``index`` of that chunk executes, 2 * index once
# its result is in the journal, and -2 before the first item.
_H_STATE = 1
_H_JOURNAL_END = 2  # end of the committed frames in the journal, in bytes
_HEADER_FIELDS = 4  # one spare field keeps the skip flags 8-byte aligned
# Two regions of skip flags, one byte per item, used by chunks of odd and of
# even sequence numbers. At most two chunks are outstanding per worker, and
# they have consecutive numbers, so they never share a region.
_SKIP_OFFSET = 8 * _HEADER_FIELDS
_JOURNAL_OFFSET = _SKIP_OFFSET + 2 * _MAX_CHUNK
_BLOCK_BYTES = _JOURNAL_OFFSET + _JOURNAL_BYTES

# Messages, in the framing of Connection.send_bytes: a big-endian int32
# length (or -1 and a uint64 length), then the body. The first byte of the
# body is its kind.
_LENGTH = struct.Struct("!i")
_LONG_LENGTH = struct.Struct("!Q")
_READY = ord("R")  # worker: the task is loaded
_LOAD_FAILED = ord("L")  # worker: kind, 1 if setup failed, then why
_CHUNK = ord("C")  # parent: kind, seq, then the pickled list of items
_STOP = ord("S")  # parent: exit after the chunks already sent
_UNDECODABLE = ord("U")  # worker: kind, seq, then the encoded unpickling error
_RESULTS = ord("D")  # worker: kind, seq, final, elapsed, executed, frames
_CHUNK_HEADER = struct.Struct("<Bq")
_RESULTS_HEADER = struct.Struct("<Bq?dI")
# One result: status, index in the chunk, length of the pickled data, when
# the item began (seconds since the epoch) and how long it took.
_FRAME = struct.Struct("<BIIdd")
_OK = 0
_FAILED = 1
# The journal starts with room for the results header, so that the worker
# can send the journal as one message without copying it.
_FRAMES_START = _RESULTS_HEADER.size

# Progress of an item sent to a worker, as the parent reads it from the
# control block.
_NOT_STARTED = 0
_EXECUTING = 1
_FINISHED = 2


def check_picklable(task: TaskSpec) -> bytes:
    """Pickle the task's function for the worker processes and return the bytes.

    Plain pickle, which sends a module-level function by reference, is tried
    first. Lambdas and nested functions fail there and are sent by value
    with cloudpickle.

    Raises:
        ConfigurationError: Neither pickle nor cloudpickle can pickle it.
    """
    parts = (task.function, task.setup, task.teardown)
    with contextlib.suppress(Exception):
        return pickle.dumps(parts, _PROTOCOL)
    try:
        data: bytes = cloudpickle.dumps(parts, protocol=_PROTOCOL)
    except Exception as error:
        what = "its setup or teardown function" if task.has_worker_state else "it"
        raise ConfigurationError(
            f"task {task.name} cannot be sent to worker processes because {what} "
            f"cannot be pickled ({type(error).__name__}: {error}). Define the task "
            "at module level, and keep locks, open files and connections out of "
            "it; open them in a setup function instead"
        ) from error
    return data


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker process, as text.

    It is set as the ``__cause__`` of the exception that reaches the parent,
    so that printing that exception shows where the worker raised it.
    """

    def __init__(self, traceback_text: str) -> None:
        super().__init__(traceback_text)
        self.traceback_text = traceback_text

    def __str__(self) -> str:
        return self.traceback_text


def _type_name(error: BaseException) -> str:
    kind = type(error)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


class _SharedBlock:
    """Views of one worker slot's shared memory: control block, flags, journal."""

    __slots__ = ("array", "header", "journal", "skip")

    def __init__(self, array: ctypes.Array[ctypes.c_ubyte]) -> None:
        self.array = array
        self.header = (ctypes.c_int64 * _HEADER_FIELDS).from_buffer(array)
        view = memoryview(array).cast("B")
        self.skip = view[_SKIP_OFFSET:_JOURNAL_OFFSET]
        self.journal = view[_JOURNAL_OFFSET:]

    def reset(self) -> None:
        """Prepare the block for a new worker process."""
        self.header[_H_SEQ] = -1
        self.header[_H_STATE] = -2
        self.header[_H_JOURNAL_END] = _FRAMES_START

    def progress(self, seq: int, index: int) -> int:
        """Return how far the worker got with item ``index`` of chunk ``seq``.

        The caller holds the worker's lock, or the worker has exited.
        """
        header = self.header
        current = header[_H_SEQ]
        if seq != current:
            return _NOT_STARTED if seq > current else _FINISHED
        state = header[_H_STATE]
        started = state >> 1
        if index > started:
            return _NOT_STARTED
        if index == started and state & 1:
            return _EXECUTING
        return _FINISHED  # or skipped, which the parent recorded in the flag


# --- Worker side -------------------------------------------------------------


def _encode_error(error: BaseException) -> bytes:
    """Pickle an exception with its type name, message and formatted traceback.

    The exception itself is included only when it survives a pickle round
    trip here. Otherwise the parent builds a `RemoteError` from the strings.
    """
    # The first frame is the worker loop that caught the exception.
    frames = error.__traceback__.tb_next if error.__traceback__ else None
    traceback_text = "".join(traceback.format_exception(type(error), error, frames))
    type_name = _type_name(error)
    try:
        message = str(error)
    except Exception:
        message = f"<str() of the {type_name} failed>"
    exception_bytes: bytes | None
    try:
        exception_bytes = pickle.dumps(error, _PROTOCOL)
        pickle.loads(exception_bytes)
    except BaseException:
        exception_bytes = None
    return pickle.dumps(
        (type_name, message, traceback_text, exception_bytes), _PROTOCOL
    )


def decode_error(data: bytes | memoryview) -> BaseException:
    """Rebuild an exception encoded by `_encode_error`."""
    type_name, message, traceback_text, exception_bytes = pickle.loads(data)
    error: BaseException | None = None
    if exception_bytes is not None:
        try:
            loaded = pickle.loads(exception_bytes)
        except Exception:
            loaded = None
        if isinstance(loaded, BaseException):
            error = loaded
    if error is None:
        error = RemoteError(type_name, message, traceback_text)
    error.__cause__ = RemoteTraceback(traceback_text)
    return error


class _ChunkRunner:
    """Executes chunks inside a worker process and reports through the journal."""

    def __init__(
        self,
        function: Callable[..., Any],
        task_name: str,
        wants_context: bool,
        outbox: Connection,
        block: _SharedBlock,
        lock: ProcessLock,
        state: Any = None,
    ) -> None:
        self.function = function
        self.task_name = task_name
        self.wants_context = wants_context
        self.outbox = outbox
        self.block = block
        self.lock = lock
        self.state = state

    def run(self, seq: int, items: list[Any]) -> None:
        """Execute the items of chunk ``seq`` that the parent has not skipped."""
        header = self.block.header
        skip = self.block.skip
        journal = self.block.journal
        acquire = self.lock.acquire
        release = self.lock.release
        function = self.function
        wants_context = self.wants_context
        state = self.state
        clock = time.perf_counter
        wall = time.time
        pack_frame = _FRAME.pack_into
        frame_size = _FRAME.size
        limit = len(journal)
        region = (seq & 1) * _MAX_CHUNK

        end = _FRAMES_START
        header[_H_JOURNAL_END] = end
        acquire()
        header[_H_SEQ] = seq
        header[_H_STATE] = -2
        release()
        since = clock()
        flush_at = since + _FLUSH_SECONDS
        executed = 0

        for index, item in enumerate(items):
            # The lock makes "check the skip flag, mark as started" atomic
            # against the parent's "read the progress, set the skip flag".
            acquire()
            if skip[region + index]:
                release()
                continue
            header[_H_STATE] = 2 * index + 1
            release()
            began_at = wall()
            began = clock()
            try:
                if wants_context:
                    context = item[1]
                    context.state = state
                    value = function(item[0], context=context)
                else:
                    value = function(item)
            except BaseException as error:
                status, data = _FAILED, _encode_error(error)
            else:
                try:
                    status, data = _OK, pickle.dumps(value, _PROTOCOL)
                except BaseException as error:
                    status, data = _FAILED, self._unpicklable_value(value, error)
            took = clock() - began
            executed += 1

            size = frame_size + len(data)
            if end + size > limit:
                if end > _FRAMES_START:
                    now = clock()
                    self._flush(seq, end, False, now - since, executed)
                    since, executed, end = now, 0, _FRAMES_START
                if end + size > limit:
                    self._send_alone(seq, status, index, data, began_at, took)
                    header[_H_STATE] = 2 * index
                    continue
            pack_frame(journal, end, status, index, len(data), began_at, took)
            journal[end + frame_size : end + size] = data
            end += size
            header[_H_JOURNAL_END] = end
            header[_H_STATE] = 2 * index

            # NOTE: between sends, results wait in the journal. A quick item
            # chunked just before a slow one is reported when the slow one ends.
            now = clock()
            if now >= flush_at:
                self._flush(seq, end, False, now - since, executed)
                since, executed, end = now, 0, _FRAMES_START
                flush_at = now + _FLUSH_SECONDS
        self._flush(seq, end, True, clock() - since, executed)

    def _flush(
        self, seq: int, end: int, final: bool, elapsed: float, executed: int
    ) -> None:
        journal = self.block.journal
        _RESULTS_HEADER.pack_into(journal, 0, _RESULTS, seq, final, elapsed, executed)
        self.outbox.send_bytes(journal, 0, end)
        # Only now are the frames safe in the pipe. If the worker dies before
        # this reset, the parent reads them twice and ignores the copies.
        self.block.header[_H_JOURNAL_END] = _FRAMES_START

    def _send_alone(
        self,
        seq: int,
        status: int,
        index: int,
        data: bytes,
        began_at: float,
        took: float,
    ) -> None:
        # NOTE: a result too large for the journal exists only in this message.
        # If the worker dies while sending it, the item fails with
        # WorkerLostError although the task returned.
        head = _RESULTS_HEADER.pack(_RESULTS, seq, False, 0.0, 0)
        frame = _FRAME.pack(status, index, len(data), began_at, took)
        self.outbox.send_bytes(head + frame + data)

    def _unpicklable_value(self, value: Any, error: BaseException) -> bytes:
        failure = pickle.PicklingError(
            f"task {self.task_name} returned a {type(value).__qualname__} that cannot "
            f"be pickled to send it back from the worker process: {error}"
        )
        failure.__cause__ = error
        return _encode_error(failure)


def _worker_main(
    task_bytes: bytes,
    task_name: str,
    wants_context: bool,
    inbox: Connection,
    outbox: Connection,
    shared: ctypes.Array[ctypes.c_ubyte],
    lock: ProcessLock,
) -> None:
    """Load the task, then execute chunks until the parent sends the stop message.

    This is the target of every worker process.
    """
    # The terminal sends Ctrl-C to the whole foreground process group. The
    # engine, not the workers, decides what an interrupt stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(inbox)
    with contextlib.suppress(EOFError, BrokenPipeError):
        try:
            function, setup, teardown = pickle.loads(task_bytes)
        except BaseException as error:
            outbox.send_bytes(bytes([_LOAD_FAILED, 0]) + _encode_error(error))
            return
        state = None
        if setup is not None:
            try:
                state = setup()
            except BaseException as error:
                outbox.send_bytes(bytes([_LOAD_FAILED, 1]) + _encode_error(error))
                return
        outbox.send_bytes(bytes([_READY]))
        block = _SharedBlock(shared)
        runner = _ChunkRunner(
            function, task_name, wants_context, outbox, block, lock, state
        )
        while True:
            message = inbox.recv_bytes()  # EOFError: the parent is gone
            if message[0] == _STOP:
                if teardown is not None:
                    try:
                        teardown(state)
                    except Exception:
                        # The parent logs the worker's stderr with the run.
                        traceback.print_exc()
                return
            _, seq = _CHUNK_HEADER.unpack_from(message)
            try:
                items = pickle.loads(memoryview(message)[_CHUNK_HEADER.size :])
            except BaseException as error:
                head = _CHUNK_HEADER.pack(_UNDECODABLE, seq)
                outbox.send_bytes(head + _encode_error(error))
                continue
            del message
            runner.run(seq, items)
            del items


def _exit_with_parent(inbox: Connection) -> None:
    """End this worker at once when the main process is gone.

    The main process holds the only write end of the worker's inbox, so the
    inbox hangs up when it dies, even by SIGKILL. A daemon thread waits for
    that, so a worker busy in a long item, or in a setup that hangs, does
    not outlive a killed run. The forkserver, whose alive pipe the workers
    hold, then ends too.
    """
    poller = select.poll()
    poller.register(inbox.fileno(), 0)  # hang-ups and errors only

    def watch() -> None:
        while True:
            for _, event in poller.poll():
                if event & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                    os._exit(_ORPHANED)

    threading.Thread(target=watch, name="batchtools-parent-watch", daemon=True).start()


# --- Parent side -------------------------------------------------------------


@dataclass(slots=True, eq=False)
class _Chunk:
    seq: int
    calls: list[Call]
    sent_at: float = 0.0  # time.monotonic() when it went to the worker


class _Worker:
    """The parent's record of one worker process."""

    __slots__ = (
        "chunks",
        "exited",
        "inbox",
        "input_buffer",
        "input_needed",
        "killed",
        "lock",
        "next_seq",
        "outbox",
        "output",
        "process",
        "ps",
        "ready",
        "ready_at",
        "sent",
        "slot",
        "stopping",
    )

    def __init__(
        self,
        slot: int,
        process: BaseProcess,
        inbox: Connection,
        outbox: Connection,
        lock: ProcessLock,
        exited: asyncio.Future[None],
    ) -> None:
        self.slot = slot
        self.process = process
        self.inbox = inbox  # the parent's write end
        self.outbox = outbox  # the parent's read end
        self.lock = lock
        self.exited = exited
        self.chunks: dict[int, _Chunk] = {}  # sent and not yet finished, in order
        self.next_seq = 0
        self.ready = False
        self.ready_at = 0.0  # time.monotonic() of its ready message
        self.killed = False  # sent SIGKILL by this backend
        self.stopping = False  # sent the stop message
        self.output: deque[memoryview] = deque()  # bytes the pipe did not take yet
        self.input_buffer = bytearray()  # the start of an incomplete message
        self.input_needed = 0  # bytes input_buffer must reach to be parsed again
        self.sent = 0  # items sent in chunks, for recycling after a number
        self.ps: psutil.Process | None = None  # for reading its memory use


_Outcome = tuple[bool, Any]  # (True, value) or (False, exception)

_live_backends: weakref.WeakSet[ProcessBackend] = weakref.WeakSet()


def _kill_workers_at_exit() -> None:
    # Workers are not daemon processes, so that tasks may start processes of
    # their own, and multiprocessing joins them at exit. A backend that was
    # never closed would make that join wait for busy workers.
    for backend in list(_live_backends):
        backend._kill_all()


# multiprocessing.util registered its exit hook when it was imported above.
# atexit runs hooks in reverse order, so this one runs first.
atexit.register(_kill_workers_at_exit)


class ProcessBackend(Backend):
    """Runs a picklable Python task in ``concurrency`` forkserver processes.

    At most ``concurrency`` attempts execute at once, one per worker. The
    engine may hand over `capacity` attempts, and the rest wait in the parent
    or in a worker's next chunk.
    """

    name = "process"

    def __init__(
        self,
        task: TaskSpec,
        concurrency: int,
        *,
        queue_ahead: bool = True,
        max_items_per_worker: int | None = None,
        max_memory: int | None = None,
    ) -> None:
        """Describe the pool; nothing starts before `start`.

        Args:
            task: The task, with its setup and teardown functions.
            concurrency: The number of worker processes.
            queue_ahead: Hand chunks to workers before they are free.
            max_items_per_worker: Replace a worker once it was sent this many
                items, for tasks that leak memory.
            max_memory: Kill a worker whose resident memory exceeds this many
                bytes; its executing item fails with `MemoryLimitError`.
        """
        super().__init__(concurrency)
        self.queue_ahead = queue_ahead
        self.max_items_per_worker = max_items_per_worker
        self.max_memory = max_memory
        self._memory_timer: asyncio.TimerHandle | None = None
        self._workers_recycled = 0
        self._memory_kills = 0
        # Kills of workers that were executing nothing, since the last result.
        self._idle_memory_kills = 0
        self._setup_error: BaseException | None = None
        self._ready_count = 0
        # Resolved when every first worker is ready, for a task with a setup.
        self._all_ready: asyncio.Future[None] | None = None
        self._task = task
        self._task_bytes = b""
        self._context: ForkServerContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._blocks: list[_SharedBlock] = []
        self._workers: list[_Worker | None] = []
        self._queue: deque[Call] = deque()
        self._solo: set[Call] = set()  # calls to send in a chunk of their own
        self._dispatch_pending = False
        self._in_flight = 0  # calls in outstanding chunks
        self._item_seconds: float | None = None  # average duration of one item
        # The error for new calls and for calls that can no longer start.
        self._stop_error: BaseException | None = None
        self._closing = False
        self._startup_failures = 0
        self._workers_started = 0
        self._workers_lost = 0
        self._chunks_sent = 0

    @property
    def capacity(self) -> int:
        if not self.queue_ahead:
            # An attempt's timeout runs from about when it reaches a worker
            # (see `began`), and a halt must keep the next items from
            # starting: hand over no more than can run.
            return self.concurrency
        bounded = min(self.concurrency * CAPACITY_PER_WORKER, MAX_CAPACITY)
        return max(bounded, self.concurrency * 256)

    @property
    def chunks_sent(self) -> int:
        """Chunks sent to workers so far."""
        return self._chunks_sent

    async def start(self) -> None:
        """Check that the task pickles, then start the worker processes.

        Raises:
            ConfigurationError: The task cannot be pickled.
        """
        self._task_bytes = check_picklable(self._task)
        self._loop = asyncio.get_running_loop()
        self._context = multiprocessing.get_context("forkserver")
        _live_backends.add(self)
        for _ in range(self.concurrency):
            array = self._context.RawArray(ctypes.c_ubyte, _BLOCK_BYTES)
            self._blocks.append(_SharedBlock(array))
            self._workers.append(None)
        try:
            for slot in range(self.concurrency):
                self._start_worker(slot)
                # Forking blocks the loop: let a signal in between workers,
                # so that Ctrl-C can stop a start of many.
                await asyncio.sleep(0)
        except BaseException:
            self._kill_all()
            raise
        if self.max_memory is not None:
            self._memory_timer = self._loop.call_later(
                _MEMORY_CHECK_SECONDS, self._check_memory
            )
        if self._task.setup is not None:
            # Workers finish their setup before the first item goes out, so
            # that the first attempts do not wait for it.
            self._all_ready = self._loop.create_future()
            await self._all_ready
            if self._stop_error is not None:
                raise self._stop_error

    def terminate(self) -> None:
        self._kill_all()

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
        if not self._dispatch_pending:
            self._dispatch_pending = True
            loop.call_soon(self._dispatch)
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
        located = self._locate(call)
        if located is None:
            return  # queued in the parent: the dispatcher drops finished calls
        worker, chunk, index = located
        if worker.killed or not self._acquire(worker):
            return  # its exit handler accounts for the chunk
        try:
            block = self._blocks[worker.slot]
            progress = block.progress(chunk.seq, index)
            if progress == _NOT_STARTED:
                block.skip[(chunk.seq & 1) * _MAX_CHUNK + index] = 1
            elif progress == _EXECUTING:
                # Holding the lock keeps the worker from starting its next
                # item, so the kill cannot land on an innocent one.
                self._kill(worker)
        finally:
            worker.lock.release()

    def signal_workers(self, number: int) -> None:
        for worker in self._workers:
            pid = worker.process.pid if worker is not None else None
            if pid is None:
                continue
            try:
                os.kill(pid, number)
            except (ProcessLookupError, PermissionError):
                pass  # The worker ended meanwhile.

    def stop_queued(self, error: BaseException) -> None:
        if self._stop_error is None:
            self._stop_error = error
        self._fail_queue(error)
        for worker in self._workers:
            if worker is not None:
                self._skip_unstarted(worker, error)

    async def aclose(self, *, cancel: bool) -> None:
        if not self._closing:
            self._closing = True
            _live_backends.discard(self)
            if self._memory_timer is not None:
                self._memory_timer.cancel()
            if self._stop_error is None:
                self._stop_error = RuntimeError(
                    "the process backend was closed before this attempt finished"
                )
            self._fail_queue(self._stop_error)
            for worker in self._workers:
                if worker is None:
                    continue
                if cancel:
                    self._kill(worker)
                else:
                    self._skip_unstarted(worker, self._stop_error)
                    self._send(worker, [bytes([_STOP])])
                    worker.stopping = True
        workers = [worker for worker in self._workers if worker is not None]
        try:
            if workers:
                await asyncio.wait([worker.exited for worker in workers])
        except asyncio.CancelledError:
            for worker in workers:
                self._reap_now(worker)
            raise
        finally:
            if not any(self._workers):
                self._blocks.clear()

    def statistics(self) -> BackendStatistics:
        return BackendStatistics(
            workers_started=self._workers_started,
            workers_lost=self._workers_lost,
            workers_recycled=self._workers_recycled,
            memory_kills=self._memory_kills,
        )

    # --- Memory ----------------------------------------------------------

    def _check_memory(self) -> None:
        """Kill the workers whose resident memory is above the limit.

        The item a killed worker was executing fails with `MemoryLimitError`;
        its unstarted items go back to the queue and a replacement starts.
        """
        limit = self.max_memory
        assert limit is not None and self._loop is not None
        for worker in self._workers:
            if worker is None or worker.killed or worker.process.pid is None:
                continue
            try:
                if worker.ps is None:
                    worker.ps = psutil.Process(worker.process.pid)
                rss = worker.ps.memory_info().rss
            except psutil.Error:
                continue  # it exited meanwhile, and its exit handler runs
            if rss > limit:
                self._kill_for_memory(worker, rss, limit)
        if not self._closing:
            self._memory_timer = self._loop.call_later(
                _MEMORY_CHECK_SECONDS, self._check_memory
            )

    def _kill_for_memory(self, worker: _Worker, rss: int, limit: int) -> None:
        if not self._acquire(worker):
            return  # it exited meanwhile
        try:
            header = self._blocks[worker.slot].header
            chunk = worker.chunks.get(header[_H_SEQ])
            state = header[_H_STATE]
            error = MemoryLimitError(rss, limit)
            key = None
            if chunk is not None and state >= 0 and state & 1:
                call = chunk.calls[state >> 1]
                if not call.handle.done():
                    call.handle.set_result((False, error))
                    key = call.context.key
            # Killed while the lock is held, so it cannot start its next item.
            self._kill(worker)
        finally:
            worker.lock.release()
        self._memory_kills += 1
        self._idle_memory_kills = 0 if key is not None else self._idle_memory_kills + 1
        if self._idle_memory_kills >= _MAX_STARTUP_FAILURES:
            self._abort(
                RunAbortedError(
                    f"worker processes of task {self._task.name} used more memory "
                    f"than the limit of {format_size(limit)} while executing nothing "
                    f"({format_size(rss)} the last time), "
                    f"{self._idle_memory_kills} times in a row; raise --max-memory "
                    "(Memory max_worker) above what an idle worker needs"
                )
            )
            return
        logger.warning(
            "task %s: worker process %s killed: %s%s",
            self._task.name,
            worker.process.pid,
            error,
            "" if key is None else f" (during the attempt for key {key})",
        )

    # --- Workers ---------------------------------------------------------

    def _start_worker(self, slot: int) -> None:
        """Start a worker process in ``slot`` with new pipes and a new lock."""
        context = self._context
        loop = self._loop
        assert context is not None and loop is not None
        block = self._blocks[slot]
        block.reset()
        worker_inbox, inbox = context.Pipe(duplex=False)
        outbox, worker_outbox = context.Pipe(duplex=False)
        lock = context.Lock()

        process = context.Process(
            target=_worker_main,
            args=(
                self._task_bytes,
                self._task.name,
                self._task.wants_context,
                worker_inbox,
                worker_outbox,
                block.array,
                lock,
            ),
            name=f"batchtools-process-{slot}",
        )
        try:
            process.start()
        except BaseException:
            inbox.close()
            outbox.close()
            raise
        finally:
            worker_inbox.close()
            worker_outbox.close()

        os.set_blocking(inbox.fileno(), False)
        os.set_blocking(outbox.fileno(), False)
        worker = _Worker(slot, process, inbox, outbox, lock, loop.create_future())
        self._workers[slot] = worker
        self._workers_started += 1
        loop.add_reader(outbox.fileno(), self._on_readable, worker)
        loop.add_reader(process.sentinel, self._on_exit, worker)

    def _acquire(self, worker: _Worker) -> bool:
        """Take the worker's lock, or return False if the worker has exited.

        The worker holds the lock for a few statements only, but it may have
        been killed while holding it.
        """
        while not worker.lock.acquire(timeout=_LOCK_POLL_SECONDS):
            if worker.process.exitcode is not None:
                return False
        return True

    def _kill(self, worker: _Worker) -> None:
        if not worker.killed:
            worker.killed = True
            worker.process.kill()

    def _kill_all(self) -> None:
        for worker in self._workers:
            if worker is not None:
                self._kill(worker)

    def _reap_now(self, worker: _Worker) -> None:
        """Kill the worker and run its exit handler without the event loop."""
        if worker.exited.done():
            return
        self._kill(worker)
        worker.process.join()
        self._on_exit(worker)

    def _on_exit(self, worker: _Worker) -> None:
        """Account for a worker that exited, then replace it if work remains."""
        if worker.exited.done():
            return
        loop = self._loop
        assert loop is not None
        process = worker.process
        loop.remove_reader(process.sentinel)
        exit_status = process.exitcode
        if exit_status is None:  # the sentinel is readable only after the exit
            process.join()
            exit_status = process.exitcode if process.exitcode is not None else 255

        self._drain(worker)
        lost = self._harvest(worker, exit_status)
        if lost is not None:
            logger.warning(
                "task %s: %s (pid %s) during the attempt for key %s",
                self._task.name,
                WorkerLostError(exit_status),
                process.pid,
                lost.context.key,
            )
        elif not (worker.killed or worker.stopping or self._stop_error is not None):
            logger.warning(
                "task %s: %s (pid %s) while no attempt was executing",
                self._task.name,
                WorkerLostError(exit_status),
                process.pid,
            )

        loop.remove_reader(worker.outbox.fileno())
        loop.remove_writer(worker.inbox.fileno())
        worker.output.clear()
        worker.outbox.close()
        worker.inbox.close()
        process.close()
        if self._workers[worker.slot] is worker:
            self._workers[worker.slot] = None
        worker.exited.set_result(None)

        self._replace(worker, exit_status)
        self._schedule_dispatch()

    def _harvest(self, worker: _Worker, exit_status: int) -> Call | None:
        """Settle the calls of an exited worker from its journal and control block.

        Returns:
            The call that failed with WorkerLostError, if any.
        """
        lost = None
        block = self._blocks[worker.slot]
        header = block.header
        chunk = worker.chunks.get(header[_H_SEQ])
        if chunk is not None:
            self._deliver(chunk, block.journal, _FRAMES_START, header[_H_JOURNAL_END])
            state = header[_H_STATE]
            if state & 1:
                running = chunk.calls[state >> 1]
                if not running.handle.done() and not worker.killed:
                    self._workers_lost += 1
                    running.handle.set_result((False, WorkerLostError(exit_status)))
                    lost = running
        # The calls left had not started, or were executing when
        # aclose(cancel=True) killed the worker.
        unstarted = [
            call
            for chunk in worker.chunks.values()
            for call in chunk.calls
            if not call.handle.done()
        ]
        for chunk in worker.chunks.values():
            self._in_flight -= len(chunk.calls)
        worker.chunks.clear()
        if self._stop_error is not None:
            for call in unstarted:
                call.handle.set_result((False, self._stop_error))
        else:
            self._queue.extendleft(reversed(unstarted))
        return lost

    def _replace(self, worker: _Worker, exit_status: int) -> None:
        if self._closing or self._stop_error is not None:
            return
        if not worker.ready and not worker.killed:
            self._startup_failures += 1
            if self._startup_failures >= _MAX_STARTUP_FAILURES:
                why = (
                    str(self._setup_error)
                    if self._setup_error is not None
                    else f"last {WorkerLostError(exit_status)}; their stderr shows why"
                )
                error = RunAbortedError(
                    f"worker processes for task {self._task.name} failed to start "
                    f"{self._startup_failures} times in a row: {why}"
                )
                logger.error("%s", error)
                self._abort(error)
                return
        try:
            self._start_worker(worker.slot)
        except Exception as cause:
            logger.exception(
                "task %s: failed to start a replacement worker process",
                self._task.name,
            )
            error = RunAbortedError(
                f"a replacement worker process failed to start: {cause}"
            )
            error.__cause__ = cause
            self._abort(error)

    def _abort(self, error: BaseException) -> None:
        """Fail the queued calls and every later call with ``error``."""
        if self._stop_error is None:
            self._stop_error = error
        self._fail_queue(error)
        if self._all_ready is not None:
            _resolve(self._all_ready)

    # --- Sending -----------------------------------------------------------

    def _schedule_dispatch(self) -> None:
        if not self._dispatch_pending and self._loop is not None:
            self._dispatch_pending = True
            self._loop.call_soon(self._dispatch)

    def _dispatch(self) -> None:
        """Send chunks from the queue to workers that have room for one."""
        self._dispatch_pending = False
        if self._stop_error is not None:
            return
        average = self._item_seconds
        depth = 2 if average is not None and average < _PREFETCH_MAX_ITEM_SECONDS else 1
        while self._queue:
            target: _Worker | None = None
            usable = 0
            for worker in self._workers:
                if worker is None or worker.killed or worker.stopping:
                    continue
                usable += 1
                if len(worker.chunks) < depth and (
                    target is None or len(worker.chunks) < len(target.chunks)
                ):
                    target = worker
            if target is None:
                return
            size = self._chunk_size(usable * depth)
            recycle = self.max_items_per_worker
            if recycle is not None:
                size = min(size, recycle - target.sent)
            calls = self._take_chunk(size)
            if calls:
                self._send_chunk(target, calls)
            if recycle is not None and target.sent >= recycle:
                # The worker exits after its chunks, and a fresh one replaces it.
                self._send(target, [bytes([_STOP])])
                target.stopping = True
                self._workers_recycled += 1

    def _chunk_size(self, slots: int) -> int:
        """Return how many calls the next chunk may take.

        The size aims at `_TARGET_CHUNK_SECONDS` of work, but no more than a
        fair share of the calls in the backend, so that the last chunks of a
        run spread over all workers.
        """
        if self._item_seconds is None:
            return 1
        target = int(_TARGET_CHUNK_SECONDS / max(self._item_seconds, 1e-9))
        share = -(-(len(self._queue) + self._in_flight) // slots)
        return max(1, min(target, share, _MAX_CHUNK))

    def _take_chunk(self, size: int) -> list[Call]:
        queue = self._queue
        solo = self._solo
        calls: list[Call] = []
        while queue and len(calls) < size:
            call = queue[0]
            if call.handle.done():
                queue.popleft()
                continue
            if call.timeout is not None or (solo and call in solo):
                # A call with a timeout travels alone because its timer already
                # runs, and a neighbour must not wait behind it or die with it.
                if calls:
                    break
                queue.popleft()
                solo.discard(call)
                return [call]
            calls.append(queue.popleft())
        return calls

    def _send_chunk(self, worker: _Worker, calls: list[Call]) -> None:
        calls, data = self._pickle_items(calls)
        if not calls:
            return
        seq = worker.next_seq
        worker.next_seq += 1
        region = (seq & 1) * _MAX_CHUNK
        self._blocks[worker.slot].skip[region : region + len(calls)] = bytes(len(calls))
        worker.chunks[seq] = _Chunk(seq, calls, time.monotonic())
        slot, pid = worker.slot + 1, f"pid {worker.process.pid}"
        for call in calls:
            call.slot = slot
            call.worker = pid
        worker.sent += len(calls)
        self._in_flight += len(calls)
        self._chunks_sent += 1
        self._send(worker, [_CHUNK_HEADER.pack(_CHUNK, seq), data])

    def _pickle_items(self, calls: list[Call]) -> tuple[list[Call], bytes]:
        """Pickle the items of ``calls`` and return the calls sent with the bytes.

        A call whose item cannot be pickled fails with PicklingError instead.
        """
        with contextlib.suppress(Exception):
            return calls, pickle.dumps(self._items(calls), _PROTOCOL)
        picklable: list[Call] = []
        for call in calls:
            try:
                pickle.dumps(self._items([call]), _PROTOCOL)
            except Exception as error:
                self._fail_unpicklable(call, error)
            else:
                picklable.append(call)
        try:
            return picklable, pickle.dumps(self._items(picklable), _PROTOCOL)
        except Exception as error:
            # The items pickle one by one but not together. Failing them all
            # is better than losing them.
            for call in picklable:
                self._fail_unpicklable(call, error)
            return [], b""

    def _fail_unpicklable(self, call: Call, error: Exception) -> None:
        failure = pickle.PicklingError(
            f"the item cannot be pickled to send it to a worker process "
            f"({type(error).__name__}: {error})"
        )
        failure.__cause__ = error
        call.handle.set_result((False, failure))

    def _items(self, calls: list[Call]) -> list[Any]:
        if self._task.wants_context:
            return [(call.payload, call.context) for call in calls]
        return [call.payload for call in calls]

    def _send(self, worker: _Worker, parts: list[bytes]) -> None:
        """Queue one message for the worker and write what the pipe takes now."""
        size = sum(len(part) for part in parts)
        if size > 0x7FFFFFFF:
            head = _LENGTH.pack(-1) + _LONG_LENGTH.pack(size)
        else:
            head = _LENGTH.pack(size)
        worker.output.append(memoryview(head))
        worker.output.extend(memoryview(part) for part in parts)
        if len(worker.output) == len(parts) + 1:  # nothing was waiting before
            self._on_writable(worker)

    def _on_writable(self, worker: _Worker) -> None:
        loop = self._loop
        assert loop is not None
        output = worker.output
        fd = worker.inbox.fileno()
        while output:
            try:
                written = os.writev(fd, list(output)[:64])
            except BlockingIOError:
                break
            except OSError:
                # The worker is gone, and its exit handler re-queues the chunk.
                output.clear()
                break
            while written:
                head = output[0]
                if written >= len(head):
                    written -= len(head)
                    output.popleft()
                else:
                    output[0] = head[written:]
                    written = 0
        if output:
            loop.add_writer(fd, self._on_writable, worker)
        else:
            loop.remove_writer(fd)

    # --- Receiving ---------------------------------------------------------

    def _on_readable(self, worker: _Worker) -> None:
        fd = worker.outbox.fileno()
        for _ in range(_READS_PER_WAKEUP):
            try:
                data = os.read(fd, _READ_BYTES)
            except BlockingIOError:
                return
            if not data:
                # End of file: the worker exited, and its sentinel handler
                # takes over.
                assert self._loop is not None
                self._loop.remove_reader(fd)
                return
            self._consume(worker, data)
            if len(data) < _READ_BYTES:
                return

    def _drain(self, worker: _Worker) -> None:
        """Read every complete message an exited worker left in its outbox."""
        fd = worker.outbox.fileno()
        while True:
            try:
                data = os.read(fd, _READ_BYTES)
            except BlockingIOError:
                return  # a process the task started may still hold the pipe
            if not data:
                return
            self._consume(worker, data)

    def _consume(self, worker: _Worker, data: bytes) -> None:
        """Split the bytes read from a worker into messages and handle them."""
        buffer = worker.input_buffer
        if buffer:
            buffer += data
            if len(buffer) < worker.input_needed:
                return
            data = bytes(buffer)
            buffer.clear()
        view = memoryview(data)
        total = len(data)
        position = 0
        needed = 0
        while True:
            available = total - position
            if available < _LENGTH.size:
                needed = _LENGTH.size
                break
            (size,) = _LENGTH.unpack_from(view, position)
            start = position + _LENGTH.size
            if size < 0:
                if available < _LENGTH.size + _LONG_LENGTH.size:
                    needed = _LENGTH.size + _LONG_LENGTH.size
                    break
                (size,) = _LONG_LENGTH.unpack_from(view, start)
                start += _LONG_LENGTH.size
            stop = start + size
            if stop > total:
                needed = stop - position
                break
            self._on_message(worker, view[start:stop])
            position = stop
        if position < total:
            buffer += view[position:]
            worker.input_needed = needed

    def _on_message(self, worker: _Worker, message: memoryview) -> None:
        kind = message[0]
        if kind == _RESULTS:
            self._on_results(worker, message)
        elif kind == _READY:
            worker.ready = True
            worker.ready_at = time.monotonic()
            self._startup_failures = 0
            self._ready_count += 1
            if self._ready_count >= self.concurrency and self._all_ready is not None:
                _resolve(self._all_ready)
        elif kind == _UNDECODABLE:
            _, seq = _CHUNK_HEADER.unpack_from(message)
            self._on_undecodable(worker, seq, message[_CHUNK_HEADER.size :])
        elif kind == _LOAD_FAILED:
            cause = self._decode_error(message[2:])
            if message[1]:
                # The worker exits now; its replacement tries the setup
                # again, up to the limit of startup failures in a row.
                self._setup_error = setup_failed(
                    self._task, f"worker process {worker.slot}", cause
                )
                logger.warning("%s", self._setup_error)
                return
            else:
                error = ConfigurationError(
                    f"task {self._task.name} cannot be loaded in a worker process "
                    f"({type(cause).__name__}: {cause}). Define the task at module "
                    "level in a module that worker processes can import"
                )
                error.__cause__ = cause
            logger.error("%s", error)
            self._abort(error)

    def _on_results(self, worker: _Worker, message: memoryview) -> None:
        _, seq, final, elapsed, executed = _RESULTS_HEADER.unpack_from(message)
        chunk = worker.chunks.get(seq)
        if chunk is None:
            return
        self._deliver(chunk, message, _FRAMES_START, len(message))
        if executed:
            self._idle_memory_kills = 0
            sample = elapsed / executed
            average = self._item_seconds
            self._item_seconds = (
                sample if average is None else average + _SMOOTHING * (sample - average)
            )
        if final:
            del worker.chunks[seq]
            self._in_flight -= len(chunk.calls)
            self._schedule_dispatch()

    def _on_undecodable(self, worker: _Worker, seq: int, data: memoryview) -> None:
        chunk = worker.chunks.pop(seq, None)
        if chunk is None:
            return
        self._in_flight -= len(chunk.calls)
        if len(chunk.calls) == 1:
            cause = self._decode_error(data)
            error = pickle.UnpicklingError(
                "the item cannot be unpickled in the worker process "
                f"({type(cause).__name__}: {cause})"
            )
            error.__cause__ = cause
            chunk.calls[0].handle.set_result((False, error))
            return
        # Send each call alone, so that only the culprit fails.
        calls = [call for call in chunk.calls if not call.handle.done()]
        self._solo.update(calls)
        self._queue.extendleft(reversed(calls))
        self._schedule_dispatch()

    def _deliver(self, chunk: _Chunk, view: memoryview, start: int, end: int) -> None:
        """Settle the calls of ``chunk`` whose result frames are in ``view``."""
        calls = chunk.calls
        unpack = _FRAME.unpack_from
        frame_size = _FRAME.size
        loads = pickle.loads
        position = start
        while position < end:
            status, index, length, began_at, took = unpack(view, position)
            position += frame_size
            call = calls[index]
            future = call.handle
            if not future.done():
                call.started = began_at
                call.duration = took
                data = view[position : position + length]
                if status == _OK:
                    try:
                        outcome: _Outcome = (True, loads(data))
                    except Exception as error:
                        outcome = (False, self._result_unpickling_error(error))
                else:
                    outcome = (False, self._decode_error(data))
                future.set_result(outcome)
            position += length

    def _result_unpickling_error(self, error: Exception) -> BaseException:
        failure = pickle.UnpicklingError(
            f"the value returned by task {self._task.name} cannot be unpickled in "
            f"the main process ({type(error).__name__}: {error})"
        )
        failure.__cause__ = error
        return failure

    def _decode_error(self, data: memoryview) -> BaseException:
        return decode_error(data)

    # --- Stopping queued calls --------------------------------------------

    def _locate(self, call: Call) -> tuple[_Worker, _Chunk, int] | None:
        for worker in self._workers:
            if worker is None:
                continue
            for chunk in worker.chunks.values():
                try:
                    return worker, chunk, chunk.calls.index(call)
                except ValueError:
                    continue
        return None

    def began(self, call: Call) -> float | None:
        """Return when ``call`` reached a worker able to run it, or ``None``.

        A call waits while it is queued here, while its worker starts (a
        replacement for a worker killed by a timeout, say, with its setup),
        and while the worker runs an earlier chunk. The parent does not see
        the moment the worker takes it, so the later of its send and its
        worker's start is returned instead.
        """
        located = self._locate(call)
        if located is None:
            return None  # still in the queue, or settled already
        worker, chunk, index = located
        if not worker.ready:
            return None
        if not worker.killed and self._acquire(worker):
            try:
                progress = self._blocks[worker.slot].progress(chunk.seq, index)
            finally:
                worker.lock.release()
            if progress == _NOT_STARTED:
                return None
        return max(chunk.sent_at, worker.ready_at)

    def _fail_queue(self, error: BaseException) -> None:
        for call in self._queue:
            if not call.handle.done():
                call.handle.set_result((False, error))
        self._queue.clear()
        self._solo.clear()

    def _skip_unstarted(self, worker: _Worker, error: BaseException) -> None:
        """Fail with ``error`` the worker's calls that it has not started."""
        if worker.killed or not worker.chunks or not self._acquire(worker):
            return  # the exit handler fails them with the stop error
        try:
            block = self._blocks[worker.slot]
            for chunk in worker.chunks.values():
                region = (chunk.seq & 1) * _MAX_CHUNK
                for index, call in enumerate(chunk.calls):
                    if call.handle.done():
                        continue
                    if block.progress(chunk.seq, index) == _NOT_STARTED:
                        block.skip[region + index] = 1
                        call.handle.set_result((False, error))
        finally:
            worker.lock.release()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
