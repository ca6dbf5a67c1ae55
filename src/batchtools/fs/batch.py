"""Read or write many files in parallel, with a bound on open file descriptors.

`read_many` and `write_many` return one `FileResult` per file, in input
order. `iter_read_many` and `iter_write_many` yield the results as files
finish, and hold only a bounded number of them at once. A failure is a
result with an ``error``, never an exception, so one missing file does not
stop the other 9,999.

Data flow::

    paths -> [concurrency worker threads] -> bounded queue -> caller
                   |
                   +-- each holds one of max_open slots while its
                       file is open

Workers pull from the input on demand, and the queue between them and the
caller holds at most ``concurrency`` results, so a caller that stops
reading stops the workers. Reads and writes are a few system calls, so
this module has its own small pool instead of running through the engine:
the engine's per-item work (a content-hashed key, a journal row that would
copy each file's data) costs more than the I/O. For retries, a journal and
a report, run a one-file function through `batchtools.run` instead.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import resource
import stat
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar, overload

import psutil

from batchtools._exceptions import ConfigurationError
from batchtools.fs.atomic import atomic_write

__all__ = [
    "FileResult",
    "FileResultStream",
    "default_concurrency",
    "default_max_open",
    "iter_read_many",
    "iter_write_many",
    "read_many",
    "write_many",
]

log = logging.getLogger("batchtools.fs")

StrPath = str | os.PathLike[str]
Data = bytes | bytearray | memoryview | str

MAX_CONCURRENCY = 10_000
"""The largest ``concurrency`` accepted; each unit is a thread."""
MIN_DEFAULT_MAX_OPEN = 2
"""The smallest default ``max_open``."""

DataT = TypeVar("DataT")
# Mapping keys are invariant, so a dict[Path, str] needs a variable to match.
PathT = TypeVar("PathT", bound=StrPath)
JobT = TypeVar("JobT")


@dataclass(frozen=True, slots=True)
class FileResult(Generic[DataT]):
    """The result of reading or writing one file of a batch.

    Attributes:
        index: The file's position in the input, from 0.
        path: The path as given.
        data: The contents read (bytes, or str with an encoding); ``None``
            for a write and after an error.
        size: Bytes read or written; 0 after an error.
        error: Why the file failed, or ``None``. Usually an `OSError`
            (`FileNotFoundError`, `IsADirectoryError`), a
            `UnicodeDecodeError` when decoding, or a `TypeError` for data
            that is neither bytes nor str.
    """

    index: int
    path: StrPath
    data: DataT | None
    size: int
    error: Exception | None

    @property
    def ok(self) -> bool:
        """Whether the file was read or written."""
        return self.error is None


# -- defaults ------------------------------------------------------------


def default_concurrency() -> int:
    """Return the default number of worker threads: the CPUs plus 4, at most 32.

    This is the rule of `concurrent.futures.ThreadPoolExecutor`: file I/O
    waits on the disk, so a few threads more than CPUs keep it busy.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity call
        cpus = os.cpu_count() or 1
    return min(32, cpus + 4)


def default_max_open() -> int:
    """Return half the file descriptors this process can still open, at least 2.

    The other half stays free for the rest of the process. The count is
    taken at each call, from ``RLIMIT_NOFILE`` minus the descriptors open
    now.
    """
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        soft_limit = 1 << 20
    free = soft_limit - int(psutil.Process().num_fds())
    return max(MIN_DEFAULT_MAX_OPEN, free // 2)


# -- the public calls ----------------------------------------------------


@overload
def read_many(
    paths: Iterable[StrPath],
    *,
    encoding: None = None,
    concurrency: int | None = None,
    max_open: int | None = None,
) -> list[FileResult[bytes]]: ...


@overload
def read_many(
    paths: Iterable[StrPath],
    *,
    encoding: str,
    concurrency: int | None = None,
    max_open: int | None = None,
) -> list[FileResult[str]]: ...


def read_many(
    paths: Iterable[StrPath],
    *,
    encoding: str | None = None,
    concurrency: int | None = None,
    max_open: int | None = None,
) -> list[FileResult[bytes]] | list[FileResult[str]]:
    """Read every file in ``paths`` and return the results in input order.

    Every result, with its contents, stays in the list; `iter_read_many`
    holds only a few at a time.

    Example::

        for result in read_many(["a.json", "b.json"], encoding="utf-8"):
            if result.ok:
                print(result.path, len(result.data))
            else:
                print(result.path, result.error)

    Args:
        paths: The files, read lazily; each is read whole. Only regular
            files (and symbolic links to them) are read, so a FIFO or a
            device fails as that file instead of blocking.
        encoding: Decode the contents with this encoding; ``None`` keeps
            bytes.
        concurrency: Worker threads; `default_concurrency` by default.
        max_open: Files open at once at most; `default_max_open` by
            default.

    Returns:
        One result per path. A file that could not be read has its error.

    Raises:
        ConfigurationError: An option is invalid, or ``paths`` is a single
            path.
        Exception: Whatever iterating over ``paths`` raised, after the
            files before it were read.
    """
    if encoding is None:
        return _collect(
            iter_read_many(paths, concurrency=concurrency, max_open=max_open)
        )
    return _collect(
        iter_read_many(
            paths, encoding=encoding, concurrency=concurrency, max_open=max_open
        )
    )


@overload
def iter_read_many(
    paths: Iterable[StrPath],
    *,
    encoding: None = None,
    concurrency: int | None = None,
    max_open: int | None = None,
    ordered: bool = False,
) -> FileResultStream[bytes]: ...


@overload
def iter_read_many(
    paths: Iterable[StrPath],
    *,
    encoding: str,
    concurrency: int | None = None,
    max_open: int | None = None,
    ordered: bool = False,
) -> FileResultStream[str]: ...


def iter_read_many(
    paths: Iterable[StrPath],
    *,
    encoding: str | None = None,
    concurrency: int | None = None,
    max_open: int | None = None,
    ordered: bool = False,
) -> FileResultStream[bytes] | FileResultStream[str]:
    """Read every file in ``paths`` and yield the results as they finish.

    At most about ``2 * concurrency`` contents are held at once, so a
    caller that handles each result and drops it reads any number of files
    in bounded memory. Use it as a context manager so that leaving the
    block stops the workers at once::

        with iter_read_many(paths) as results:
            for result in results:
                ...

    Takes the options of `read_many`, plus:

    Args:
        ordered: Yield in input order, through a reorder buffer of
            ``2 * concurrency`` results. A slow file then holds back the
            files after it.

    Raises:
        ConfigurationError: An option is invalid, or ``paths`` is a single
            path.
    """
    _reject_single_path(paths, "paths")
    width = _concurrency(concurrency)
    slots = _max_open(max_open)
    jobs = iter(paths)

    def work(index: int, path: StrPath) -> FileResult[Any]:
        return _read_one(index, path, encoding)

    return FileResultStream(_Pool(jobs, work, width, slots, ordered))


def write_many(
    files: Mapping[PathT, Data] | Iterable[tuple[PathT, Data]],
    *,
    atomic: bool = True,
    encoding: str = "utf-8",
    concurrency: int | None = None,
    max_open: int | None = None,
) -> list[FileResult[None]]:
    """Write every file and return the results in input order.

    Example::

        results = write_many({"out/a.txt": "alpha", "out/b.bin": b"\\x00\\x01"})
        failed = [result for result in results if not result.ok]

    Args:
        files: A mapping from path to data, or an iterable of
            ``(path, data)`` pairs, read lazily. Data is bytes, bytearray,
            memoryview or str. Give each path once: when a path repeats,
            which data ends up in the file is not defined.
        atomic: Write each file with `batchtools.fs.atomic.atomic_write`:
            under a temporary name in its folder, synced to disk and
            renamed over the target, so a reader or a crash sees the old
            contents or the new ones, never a part. A symbolic link is
            followed, and an existing file keeps its mode and owner. With
            ``False`` each file is truncated and written in place.
        encoding: The encoding of str data.
        concurrency: Worker threads; `default_concurrency` by default.
        max_open: Files open at once at most. An atomic write holds one
            descriptor at a time (its temporary file, then its folder).
            `default_max_open` by default.

    Returns:
        One result per file, with the bytes written. A file that could not
        be written has its error and, when atomic, keeps its old contents.

    Raises:
        ConfigurationError: An option is invalid, or ``files`` is a single
            path.
        TypeError: An element of ``files`` is not a ``(path, data)`` pair,
            raised after the files before it were written.
        Exception: Whatever iterating over ``files`` raised, after the
            files before it were written.
    """
    stream = iter_write_many(
        files,
        atomic=atomic,
        encoding=encoding,
        concurrency=concurrency,
        max_open=max_open,
    )
    return _collect(stream)


def iter_write_many(
    files: Mapping[PathT, Data] | Iterable[tuple[PathT, Data]],
    *,
    atomic: bool = True,
    encoding: str = "utf-8",
    concurrency: int | None = None,
    max_open: int | None = None,
    ordered: bool = False,
) -> FileResultStream[None]:
    """Write every file and yield the results as they finish.

    Takes the options of `write_many` and ``ordered`` of `iter_read_many`.
    The data is read from ``files`` only as workers become free, so a
    generator of pairs writes any number of files in bounded memory.

    Raises:
        ConfigurationError: An option is invalid, or ``files`` is a single
            path.
    """
    _reject_single_path(files, "files")
    width = _concurrency(concurrency)
    slots = _max_open(max_open)
    pairs = files.items() if isinstance(files, Mapping) else files
    write = atomic_write if atomic else _write_in_place

    def work(index: int, pair: tuple[StrPath, Data]) -> FileResult[None]:
        return _write_one(index, pair, write, encoding)

    return FileResultStream(_Pool(_checked_pairs(pairs), work, width, slots, ordered))


# -- one file ------------------------------------------------------------


def _read_one(index: int, path: StrPath, encoding: str | None) -> FileResult[Any]:
    try:
        raw = _read_bytes(path)
        data: bytes | str = raw if encoding is None else raw.decode(encoding)
    except Exception as error:  # every failure is this file's result
        return FileResult(index, path, None, 0, error)
    return FileResult(index, path, data, len(raw), None)


def _read_bytes(path: StrPath) -> bytes:
    # O_NONBLOCK makes opening a FIFO return at once, so that the check
    # below rejects it; it has no effect on reading a regular file.
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, f"not a regular file but {_kind(mode)}", path)
        file = open(descriptor, "rb")  # noqa: SIM115  # closed by the with below
    except BaseException:
        os.close(descriptor)
        raise
    with file:
        return file.read()


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a special file"


def _write_one(
    index: int,
    pair: tuple[StrPath, Data],
    write: Callable[[StrPath, bytes], None],
    encoding: str,
) -> FileResult[None]:
    path, data = pair
    try:
        raw = _as_bytes(path, data, encoding)
        write(path, raw)
    except Exception as error:  # every failure is this file's result
        return FileResult(index, path, None, 0, error)
    return FileResult(index, path, None, len(raw), None)


def _as_bytes(path: StrPath, data: object, encoding: str) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode(encoding)
    if isinstance(data, bytearray | memoryview):
        return bytes(data)
    raise TypeError(
        f"the data for '{os.fspath(path)}' is {type(data).__name__}; give bytes or str"
    )


def _write_in_place(path: StrPath, raw: bytes) -> None:
    with open(path, "wb") as file:
        file.write(raw)


# -- checks --------------------------------------------------------------


def _reject_single_path(value: object, name: str) -> None:
    if isinstance(value, str | bytes | os.PathLike):
        raise ConfigurationError(
            f"{name}={value!r} is one path; give a list or other iterable of "
            "paths, such as [path]"
        )


def _concurrency(value: int | None) -> int:
    if value is None:
        return default_concurrency()
    if type(value) is not int or not 1 <= value <= MAX_CONCURRENCY:
        raise ConfigurationError(
            f"concurrency={value!r} is invalid; give an int from 1 to "
            f"{MAX_CONCURRENCY:,}"
        )
    return value


def _max_open(value: int | None) -> int:
    if value is None:
        return default_max_open()
    if type(value) is not int or value < 1:
        raise ConfigurationError(
            f"max_open={value!r} is invalid; give an int of at least 1"
        )
    return value


def _checked_pairs(
    pairs: Iterable[tuple[StrPath, Data]],
) -> Iterator[tuple[StrPath, Data]]:
    for position, pair in enumerate(pairs):
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise TypeError(
                f"element {position} of files is {pair!r:.80}, not a (path, data) "
                "pair; give a mapping or an iterable of pairs"
            )
        yield pair


def _collect(stream: FileResultStream[DataT]) -> list[FileResult[DataT]]:
    with stream:
        results = list(stream)
    results.sort(key=lambda result: result.index)
    return results


# -- the pool ------------------------------------------------------------


class _Pool(Generic[JobT, DataT]):
    """Worker threads that apply ``work`` to each job, and their result queue.

    Only the consumer's thread calls `next_result` and `close`.
    """

    def __init__(
        self,
        jobs: Iterator[JobT],
        work: Callable[[int, JobT], FileResult[DataT]],
        concurrency: int,
        slots: int,
        ordered: bool,
    ) -> None:
        self._jobs = jobs
        self._work = work
        self._slots = threading.BoundedSemaphore(slots)
        # None marks a worker that has stopped.
        self._results: queue.Queue[FileResult[DataT] | None] = queue.Queue(
            maxsize=concurrency
        )
        self._condition = threading.Condition()
        self._jobs_taken = 0  # jobs taken from the input, under _condition
        self._delivered = 0  # results handed to the consumer
        self._window = 2 * concurrency if ordered else None
        self._reorder: dict[int, FileResult[DataT]] = {}
        self._stopping = False  # under _condition
        self._input_error: Exception | None = None
        self._threads = [
            threading.Thread(
                target=self._run_worker, name=f"batchtools-files-{n}", daemon=True
            )
            for n in range(concurrency)
        ]
        self._running = 0  # workers that have not reported their stop
        self._started = False

    @property
    def counts(self) -> tuple[int, int]:
        """Return the jobs taken from the input and the results delivered."""
        with self._condition:
            return self._jobs_taken, self._delivered

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        self._running = len(self._threads)
        for thread in self._threads:
            thread.start()

    def next_result(self) -> FileResult[DataT]:
        self.start()
        while True:
            result = self._reorder.pop(self._delivered, None)
            if result is not None:
                return self._deliver(result)
            if self._running == 0:
                error, self._input_error = self._input_error, None
                if error is not None:
                    raise error
                raise StopIteration
            received = self._results.get()
            if received is None:
                self._running -= 1
            elif self._window is None:
                return self._deliver(received)
            else:
                self._reorder[received.index] = received

    def close(self) -> None:
        """Stop taking jobs, wait for the files in progress, and join the workers."""
        with self._condition:
            self._stopping = True
            self._condition.notify_all()
        while self._running:
            if self._results.get() is None:
                self._running -= 1
        for thread in self._threads:
            if thread.is_alive():
                thread.join()
        self._reorder.clear()

    def _deliver(self, result: FileResult[DataT]) -> FileResult[DataT]:
        with self._condition:
            self._delivered += 1
            self._condition.notify_all()
        return result

    def _run_worker(self) -> None:
        try:
            while (job := self._take()) is not None:
                index, item = job
                with self._slots:
                    result = self._work(index, item)
                self._results.put(result)
        finally:
            self._results.put(None)

    def _take(self) -> tuple[int, JobT] | None:
        with self._condition:
            while self._window is not None and not self._stopping:
                if self._jobs_taken < self._delivered + self._window:
                    break
                self._condition.wait()
            if self._stopping:
                return None
            try:
                item = next(self._jobs)
            except StopIteration:
                self._stopping = True
                return None
            except Exception as error:  # the caller's iterable failed
                self._input_error = error
                self._stopping = True
                return None
            index = self._jobs_taken
            self._jobs_taken += 1
            return index, item


class FileResultStream(Generic[DataT]):
    """An iterator of `FileResult` that is also a context manager.

    The worker threads start at the first `next` (or on entering the
    ``with`` block). Leaving the block, `close`, or dropping the stream
    stops them: files in progress finish, and no others are started. Use
    it from one thread.
    """

    def __init__(self, pool: _Pool[Any, DataT]) -> None:
        # The workers refer to the pool, never to this object, so that
        # dropping the stream closes the pool.
        self._pool = pool
        self._closed = False

    def __iter__(self) -> FileResultStream[DataT]:
        return self

    def __next__(self) -> FileResult[DataT]:
        if self._closed:
            raise StopIteration
        try:
            return self._pool.next_result()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> FileResultStream[DataT]:
        self._pool.start()
        return self

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        # While the interpreter shuts down, the workers may never run again.
        if not sys.is_finalizing():
            self.close()

    def __repr__(self) -> str:
        taken, delivered = self._pool.counts
        state = "closed" if self._closed else "open"
        return f"<FileResultStream {state} taken={taken} delivered={delivered}>"

    def close(self) -> None:
        """Stop the workers after the files in progress, and wait for them."""
        if self._closed:
            return
        self._closed = True
        self._pool.close()
