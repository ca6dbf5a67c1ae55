"""Parallel regular-expression search over files and folders: `grep`.

`grep` walks the trees in the parent process, in a fixed order, and hands
the files to worker processes in chunks. Results come back through a
bounded window of chunks and are yielded in walk order, so the output is
the same for any number of workers.

Data flow::

    walk (sorted, lazy) -> chunks of paths, sized from the bytes per file
                           read so far (CHUNK_BYTES, at most CHUNK_FILES)
        -> an idle worker process: one chunk at a time each, searched file
           by file, polling the stop pipe before each file
        -> outcomes -> window of at most WINDOW_PER_WORKER chunks per
           worker, consumed in walk order -> FileResult and Diagnostic

Why a pool of its own. Python's `re` holds the GIL, so only processes
search in parallel. A prototype of this search was timed on a 2-CPU
virtual machine shared with other work. The tree was the interpreter's lib
folder with its site-packages (50,700 files, 820 MB), and the pattern
``def [a-z_]+\\(self\\)``. It took 1.0 s in one process, 1.6 to 2.0 s
through the engine (``batchtools.stream(..., backend="process",
ordered=True)``, 64 files per item), and 0.75 s on two workers of a
`ProcessPoolExecutor` that imported only the search code. The engine's
journal, retries and per-item outcomes cost more than a read-only search
gains from them. A `ProcessPoolExecutor` worker of this module would also
import the batchtools package and re-import the main module, 0.25 to 0.4 s
before its first chunk. So the workers run `batchtools.fs._grep_worker` as
a script with ``python -I -S``. It imports only the standard library, and
two new workers return their first results 35 to 50 ms after they start. A
small tree (`IN_PROCESS_FILES`, `IN_PROCESS_BYTES`) is searched in this
process, and so is everything with ``jobs=1``.

The walk does not stat regular files: on that tree the stat calls took
0.12 to 0.15 s of the parent's time, on top of a 0.17 s walk. Chunks are
therefore sized in files, from the bytes per file that the workers have
read so far.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import pickle
import re
import stat
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from multiprocessing.connection import Connection, wait
from types import TracebackType
from typing import Literal

from batchtools._exceptions import ConfigurationError, WorkerLostError
from batchtools.engine._api import cpu_count
from batchtools.fs import _grep_worker as worker
from batchtools.fs._grep_worker import FAILED, NOT_READ, TEXT, Outcome, Searcher

log = logging.getLogger("batchtools.fs")

IN_PROCESS_FILES = 1000
"""Searches that find fewer files are searched in this process, unless
their files add up to `IN_PROCESS_BYTES` or more.

Two new workers return their first results 35 to 50 ms after they
start. One process
searches a cached file in about 20 us, plus 1.5 to 3 ms per MB with simple
patterns and about 7 ms per MB with an alternation such as ``TODO|FIXME``.
So 1000 small files, or 16 MiB, take about as long as that start.
"""

IN_PROCESS_BYTES = 16 << 20
"""See `IN_PROCESS_FILES`."""

CHUNK_BYTES = 2 << 20
"""The bytes a chunk should hold, estimated from the files read so far."""

CHUNK_FILES = 256
"""At most this many files go in one chunk, whatever their size."""

FIRST_CHUNK_FILES = 16
"""Files in each chunk until the workers have reported how big files are."""

WINDOW_PER_WORKER = 4
"""Chunks per worker that may be sent or finished ahead of the oldest one.

It bounds the results held for reordering, and the files read past the
point where a search with ``max_results`` stops.
"""

STOP_GRACE_SECONDS = 2.0
"""How long a closing search waits for a worker's chunk before killing it.

A worker checks the stop pipe before each file, so it returns its results
within one file's search time.
"""

Output = Literal["lines", "files", "counts"]
_MODES = {"lines": worker.LINES, "files": worker.FILES, "counts": worker.COUNTS}
StrPath = str | os.PathLike[str]


@dataclass(frozen=True, slots=True)
class Match:
    """One matching line.

    Attributes:
        path: The file, as the walk reached it (``folder/name``).
        line_number: The line's number, from 1.
        line: The line's bytes, without its newline.
    """

    path: str
    line_number: int
    line: bytes


@dataclass(frozen=True, slots=True)
class FileResult:
    """The search result for one file.

    Attributes:
        path: The file, as the walk reached it (``folder/name``).
        count: Matching lines; 1 with ``output="files"``.
        matches: The matching lines with ``output="lines"``, else empty.
    """

    path: str
    count: int
    matches: tuple[Match, ...] = ()


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """A path the search could not read, or skipped with a warning.

    Attributes:
        path: The file or folder.
        message: Why, such as ``No such file or directory``.
        severity: ``error`` for a path that could not be searched, or
            ``warning`` for a symbolic link loop, which is skipped.
    """

    path: str
    message: str
    severity: Literal["error", "warning"] = "error"


@dataclass(frozen=True, slots=True)
class SearchStatistics:
    """Counts of what one search did so far.

    Attributes:
        matches: Matching lines reported (files with ``output="files"``).
        files_searched: Text files whose results were reported.
        binary_files: Files skipped because they contain a NUL byte.
        errors: Paths reported as errors.
        files_read: Files opened, whole or in part, by this process and the
            workers, including those whose results came too late to be
            reported after ``max_results`` was reached.
        bytes_read: Bytes those files gave.
        workers: Worker processes started; 0 when the search ran in this
            process.
    """

    matches: int
    files_searched: int
    binary_files: int
    errors: int
    files_read: int
    bytes_read: int
    workers: int


@dataclass(frozen=True)
class _Settings:
    pattern: bytes
    flags: int
    mode: int
    max_results: int | None
    jobs: int


def grep(
    pattern: str | bytes,
    paths: StrPath | Iterable[StrPath] | None = None,
    *,
    ignore_case: bool = False,
    include: str | Iterable[str] = (),
    exclude: str | Iterable[str] = (),
    exclude_dir: str | Iterable[str] = (),
    follow_symlinks: bool = False,
    max_results: int | None = None,
    output: Output = "lines",
    jobs: int | None = None,
    on_diagnostic: Callable[[Diagnostic], None] | None = None,
) -> Search:
    """Search files and folders for lines that match a regular expression.

    The pattern is Python `re` syntax, matched against bytes, line by line,
    as ``LC_ALL=C grep -E`` does for patterns valid in both. Folders are
    searched recursively. Results come in a fixed order: the paths in the
    order given, inside a folder sorted by path (by code point, which is
    byte order for UTF-8 names), and lines in file order. A file that
    contains a NUL byte anywhere is binary and is skipped in every output
    mode.

    Example::

        with grep(r"TODO|FIXME", ["src"], include="*.py") as search:
            for result in search:
                for match in result.matches:
                    print(match.path, match.line_number, match.line)

    Args:
        pattern: The regular expression; a str is encoded as the file
            system encodes names (UTF-8 on most systems).
        paths: Files and folders to search; the current folder if
            ``None``, whose files are then named without a ``./`` prefix.
        ignore_case: Match ASCII letters of either case.
        include: Globs; inside folders, only files whose base name matches
            one of them are searched.
        exclude: Globs; inside folders, files whose base name matches one
            of them are skipped.
        exclude_dir: Globs; folders whose base name matches one of them
            are not entered.
        follow_symlinks: Follow symbolic links found inside folders, as
            ``grep -R`` does. A link back to a folder being searched is
            reported as a warning and skipped, and no folder is searched
            twice under one path. Links named in ``paths`` are always
            followed.
        max_results: Stop the whole search after this many matching lines
            (files with ``output="files"``). No file is opened after that.
        output: ``lines`` for the matching lines, ``files`` for the files
            with a match, ``counts`` for every text file's count of
            matching lines.
        jobs: Worker processes at most; the number of CPUs by default. With
            ``jobs=1``, or fewer than `IN_PROCESS_FILES` files that add up
            to less than `IN_PROCESS_BYTES`, the search runs in this
            process.
        on_diagnostic: Called with each path that could not be searched,
            in walk order. Without it, each is logged as a warning on the
            ``batchtools.fs`` logger. Either way they are kept in
            `Search.diagnostics`.

    Returns:
        The search, an iterator of `FileResult` that starts reading files
        when first advanced. Use it as a context manager, or exhaust it, so
        that its worker processes are stopped.

    Raises:
        ConfigurationError: The pattern is not a valid regular expression,
            or an option is invalid. Nothing was read.
    """
    settings = _Settings(
        pattern=_pattern_bytes(pattern),
        flags=re.IGNORECASE if ignore_case else 0,
        mode=_mode(output),
        max_results=_max_results(max_results),
        jobs=_jobs(jobs),
    )
    _compile(settings.pattern, settings.flags)
    walker = _Walker(
        _operands(paths),
        include=_globs("include", include),
        exclude=_globs("exclude", exclude),
        exclude_dir=_globs("exclude_dir", exclude_dir),
        follow_symlinks=follow_symlinks,
    )
    return Search(_SearchState(settings, walker, on_diagnostic))


class Search:
    """A running search: an iterator of `FileResult` and a context manager.

    Leaving the ``with`` block, `close`, or dropping the last reference to
    the search stops its worker processes.
    """

    def __init__(self, state: _SearchState) -> None:
        self._state = state
        # The generator refers to the state only, not to this object, so
        # that dropping the search frees it at once and __del__ closes it.
        self._results = state.results()

    @property
    def diagnostics(self) -> list[Diagnostic]:
        """Paths that could not be searched or were skipped, in walk order."""
        return self._state.diagnostics

    @property
    def statistics(self) -> SearchStatistics:
        """What the search did so far."""
        return self._state.statistics()

    def __iter__(self) -> Search:
        return self

    def __next__(self) -> FileResult:
        return next(self._results)

    def __enter__(self) -> Search:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop the search and its worker processes; iteration then ends."""
        self._results.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        stats = self.statistics
        return (
            f"<Search matches={stats.matches} files_searched="
            f"{stats.files_searched} errors={stats.errors} workers={stats.workers}>"
        )


class _SearchState:
    """The walk, the counts and the diagnostics of one search."""

    def __init__(
        self,
        settings: _Settings,
        walker: _Walker,
        on_diagnostic: Callable[[Diagnostic], None] | None,
    ) -> None:
        self._settings = settings
        self._walker = walker
        self._on_diagnostic = on_diagnostic
        self.diagnostics: list[Diagnostic] = []
        self._matches = 0
        self._files_searched = 0
        self._binary_files = 0
        self._errors = 0
        self._files_read = 0
        self._bytes_read = 0
        self._workers = 0

    def statistics(self) -> SearchStatistics:
        """Return the counts so far."""
        return SearchStatistics(
            matches=self._matches,
            files_searched=self._files_searched,
            binary_files=self._binary_files,
            errors=self._errors,
            files_read=self._files_read,
            bytes_read=self._bytes_read,
            workers=self._workers,
        )

    @property
    def _done(self) -> bool:
        limit = self._settings.max_results
        return limit is not None and self._matches >= limit

    def results(self) -> Generator[FileResult, None, None]:
        """Search, yielding each file's result in walk order."""
        if self._done:
            return  # max_results=0: nothing to find, so nothing is read
        items = self._walker.items()
        if self._settings.jobs == 1:
            yield from self._search_here(items)
            return
        head: list[str | Diagnostic] = []
        files = 0
        for item in items:
            head.append(item)
            if isinstance(item, str):
                files += 1
                if files >= IN_PROCESS_FILES:
                    yield from self._search_in_workers(chain(head, items))
                    return
        if _total_size(head) >= IN_PROCESS_BYTES:
            yield from self._search_in_workers(iter(head))
        else:
            yield from self._search_here(iter(head))

    def _search_here(self, items: Iterator[str | Diagnostic]) -> Iterator[FileResult]:
        settings = self._settings
        searcher = Searcher(settings.pattern, settings.flags, settings.mode, None)
        for item in items:
            if isinstance(item, Diagnostic):
                self._report(item)
                continue
            limit = None
            if settings.max_results is not None:
                limit = settings.max_results - self._matches
            outcome = searcher.search(item, limit)
            self._count_read(outcome)
            result = self._accept(item, outcome)
            if result is not None:
                yield result
            if self._done:
                return

    def _search_in_workers(
        self, items: Iterator[str | Diagnostic]
    ) -> Iterator[FileResult]:
        settings = self._settings
        pool = _WorkerPool(settings)
        window = WINDOW_PER_WORKER * settings.jobs
        slots: deque[_Chunk | Diagnostic] = deque()
        chunks = self._chunked(items)
        walking = True
        try:
            while True:
                while walking and len(slots) < window and pool.has_idle_worker():
                    element = next(chunks, None)
                    if element is None:
                        walking = False
                    elif isinstance(element, Diagnostic):
                        slots.append(element)
                    else:
                        chunk = pool.submit(element)
                        if chunk.outcomes is not None:
                            self._count_chunk(chunk)  # searched in this process
                        slots.append(chunk)
                if not slots:
                    return
                head = slots[0]
                if isinstance(head, Diagnostic):
                    slots.popleft()
                    self._report(head)
                    continue
                if head.outcomes is None:
                    for chunk in pool.wait():
                        self._count_chunk(chunk)
                    continue
                slots.popleft()
                for path, outcome in zip(head.paths, head.outcomes, strict=True):
                    result = self._accept(path, outcome)
                    if self._done:
                        # Workers stop before the caller sees the last result.
                        pool.stop()
                    if result is not None:
                        yield result
                    if self._done:
                        return
        finally:
            for chunk in pool.close():
                self._count_chunk(chunk)
            self._workers = pool.started

    def _count_chunk(self, chunk: _Chunk) -> None:
        for outcome in chunk.outcomes or ():
            self._count_read(outcome)

    def _count_read(self, outcome: Outcome) -> None:
        if outcome[0] != FAILED and outcome[0] != NOT_READ:
            self._files_read += 1
            self._bytes_read += outcome[3]

    def _accept(self, path: str, outcome: Outcome) -> FileResult | None:
        """Turn one file's outcome into a result, counted against max_results."""
        status, count, lines, _, message = outcome
        if status == FAILED:
            self._report(Diagnostic(path, message))
            return None
        if status == NOT_READ:
            return None
        if status != TEXT:
            self._binary_files += 1
            return None
        self._files_searched += 1
        mode = self._settings.mode
        if count == 0 and mode != worker.COUNTS:
            return None
        limit = self._settings.max_results
        if limit is not None:
            count = min(count, limit - self._matches)
        self._matches += count
        matches = tuple(Match(path, number, line) for number, line in lines[:count])
        return FileResult(path, count, matches)

    def _report(self, diagnostic: Diagnostic) -> None:
        self.diagnostics.append(diagnostic)
        if diagnostic.severity == "error":
            self._errors += 1
        if self._on_diagnostic is not None:
            self._on_diagnostic(diagnostic)
        else:
            log.warning("%s: %s", diagnostic.path, diagnostic.message)

    def _chunked(
        self, items: Iterator[str | Diagnostic]
    ) -> Iterator[list[str] | Diagnostic]:
        """Group consecutive paths into chunks; a diagnostic ends a chunk."""
        paths: list[str] = []
        size = self._chunk_files()
        for item in items:
            if isinstance(item, Diagnostic):
                if paths:
                    yield paths
                    paths, size = [], self._chunk_files()
                yield item
                continue
            paths.append(item)
            if len(paths) >= size:
                yield paths
                paths, size = [], self._chunk_files()
        if paths:
            yield paths

    def _chunk_files(self) -> int:
        """Return how many files make `CHUNK_BYTES`, at the mean size read so far."""
        if not self._files_read:
            return FIRST_CHUNK_FILES
        mean = max(1, self._bytes_read // self._files_read)
        return max(1, min(CHUNK_FILES, CHUNK_BYTES // mean))


def _total_size(items: list[str | Diagnostic]) -> int:
    """Return the bytes of the listed files, counting those that fail as 0."""
    total = 0
    for item in items:
        if isinstance(item, str):
            try:
                total += os.stat(item).st_size
            except OSError:
                pass  # the search reports the error when it opens the file
    return total


# --- Walking -----------------------------------------------------------------


_Child = tuple[str, str, Diagnostic | tuple[int, int] | None]
"""A folder entry: its sort key, its path, and what it is: a diagnostic, a
folder's ``(st_dev, st_ino)``, or None for a file to search."""


class _Walker:
    """Lists the files to search, lazily, in output order.

    Inside a folder, entries sort by name, a folder's name as if it ended
    with ``/``, so a depth-first walk yields the paths in sorted order. The
    order is by code point, which is byte order for UTF-8 names.
    """

    def __init__(
        self,
        operands: list[str | None],
        *,
        include: re.Pattern[str] | None,
        exclude: re.Pattern[str] | None,
        exclude_dir: re.Pattern[str] | None,
        follow_symlinks: bool,
    ) -> None:
        self._operands = operands
        self._include = include
        self._exclude = exclude
        self._exclude_dir = exclude_dir
        self._follow = follow_symlinks

    def items(self) -> Iterator[str | Diagnostic]:
        """Yield each file to search, and each path that cannot be searched."""
        for operand in self._operands:
            shown = "" if operand is None else _strip_slashes(operand)
            try:
                info = os.stat("." if operand is None else operand)
            except OSError as error:
                yield Diagnostic(shown or str(operand), worker.describe(error))
                continue
            if stat.S_ISDIR(info.st_mode):
                yield from self._tree(shown, (info.st_dev, info.st_ino))
            else:
                # A file named on the command line is read whatever its kind.
                yield str(operand)

    def _tree(self, top: str, top_key: tuple[int, int]) -> Iterator[str | Diagnostic]:
        listing = self._list(top)
        if isinstance(listing, Diagnostic):
            yield listing
            return
        stack = [iter(listing)]
        keys = [top_key]  # the folders on the path from the top, for loops
        ancestors = {top_key}
        visited = {top_key}
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                ancestors.discard(keys.pop())
                continue
            _, path, what = child
            if what is None:
                yield path
                continue
            if isinstance(what, Diagnostic):
                yield what
                continue
            if what in ancestors:
                yield Diagnostic(
                    path, "recursive directory loop; not searched again", "warning"
                )
                continue
            if what in visited:
                log.debug("%s: folder already searched through another link", path)
                continue
            visited.add(what)
            listing = self._list(path)
            if isinstance(listing, Diagnostic):
                yield listing
                continue
            stack.append(iter(listing))
            keys.append(what)
            ancestors.add(what)

    def _list(self, folder: str) -> list[_Child] | Diagnostic:
        """Return a folder's entries to search, sorted, or why it cannot be read."""
        children: list[_Child] = []
        try:
            with os.scandir(folder or ".") as entries:
                for entry in entries:
                    child = self._classify(entry, _join(folder, entry.name))
                    if child is not None:
                        children.append(child)
        except OSError as error:
            return Diagnostic(folder or ".", worker.describe(error))
        children.sort(key=lambda child: child[0])
        return children

    def _classify(self, entry: os.DirEntry[str], path: str) -> _Child | None:
        """Return the entry as a child to visit, or None to skip it.

        Only folders and symbolic links cost a stat call; a regular file's
        type comes from the folder listing.
        """
        name = entry.name
        try:
            if entry.is_symlink():
                if not self._follow:
                    return None
                info = os.stat(entry.path)
                is_folder = stat.S_ISDIR(info.st_mode)
                is_file = stat.S_ISREG(info.st_mode)
            else:
                is_folder = entry.is_dir(follow_symlinks=False)
                is_file = not is_folder and entry.is_file(follow_symlinks=False)
                if is_folder:
                    info = entry.stat(follow_symlinks=False)
        except OSError as error:
            return (name, path, Diagnostic(path, worker.describe(error)))
        if is_folder:
            if self._exclude_dir is not None and self._exclude_dir.match(name):
                return None
            return (name + "/", path, (info.st_dev, info.st_ino))
        if not is_file:
            return None  # FIFOs, sockets and devices, as grep -r skips them
        if self._include is not None and not self._include.match(name):
            return None
        if self._exclude is not None and self._exclude.match(name):
            return None
        return (name, path, None)


def _join(folder: str, name: str) -> str:
    if not folder:
        return name
    return folder + name if folder.endswith("/") else f"{folder}/{name}"


def _strip_slashes(path: str) -> str:
    """Drop trailing slashes, as grep does before it appends names."""
    stripped = path.rstrip("/")
    if not stripped and path:
        return "/"
    return stripped


# --- Worker processes --------------------------------------------------------


WORKER_SCRIPT = worker.__file__


class _Chunk:
    """Paths sent to one worker, and their outcomes once it returns them."""

    __slots__ = ("outcomes", "paths")

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        self.outcomes: list[Outcome] | None = None


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    inbox: Connection  # the parent writes chunks here
    outbox: Connection  # and reads outcomes here
    chunk: _Chunk | None = None


class _WorkerPool:
    """Worker processes that search one chunk of paths at a time each."""

    def __init__(self, settings: _Settings) -> None:
        self._size = settings.jobs
        self._settings = pickle.dumps(
            (settings.pattern, settings.flags, settings.mode, settings.max_results)
        )
        self._idle: list[_Worker] = []
        self._busy: dict[Connection, _Worker] = {}
        self._stop_read, self._stop_write = os.pipe()
        self._fallback: Searcher | None = None
        self.started = 0
        if not os.path.isfile(WORKER_SCRIPT):
            # NOTE: a package imported from a zip file has no script to run,
            # so its searches stay in this process.
            self._size = 0

    def has_idle_worker(self) -> bool:
        """Return whether `submit` would run a chunk now, not wait for a worker."""
        return bool(self._idle) or len(self._busy) < self._size or self._size == 0

    def submit(self, paths: list[str]) -> _Chunk:
        """Send ``paths`` to an idle worker, starting one if there is none.

        Without any worker process, the chunk is searched here at once, and
        the returned chunk already has its outcomes.
        """
        chunk = _Chunk(paths)
        worker_process: _Worker | None = None
        if self._idle:
            worker_process = self._idle.pop()
        elif len(self._busy) < self._size:
            worker_process = self._start()
        if worker_process is None:
            chunk.outcomes = self._search_here(paths)
            return chunk
        try:
            worker_process.inbox.send_bytes(pickle.dumps(paths))
        except OSError:
            self._bury(worker_process)  # it died while idle; the next one retries
            chunk.outcomes = self._search_here(paths)
            return chunk
        worker_process.chunk = chunk
        self._busy[worker_process.outbox] = worker_process
        return chunk

    def wait(self, timeout: float | None = None) -> list[_Chunk]:
        """Wait for at least one busy worker's outcomes; return the chunks done."""
        done: list[_Chunk] = []
        for ready in wait(list(self._busy), timeout):
            assert isinstance(ready, Connection)
            worker_process = self._busy.pop(ready)
            chunk = worker_process.chunk
            assert chunk is not None
            worker_process.chunk = None
            try:
                chunk.outcomes = pickle.loads(ready.recv_bytes())
            except (EOFError, OSError):
                status = self._bury(worker_process)
                message = f"not searched: the {WorkerLostError(status)}"
                chunk.outcomes = [(FAILED, 0, [], 0, message) for _ in chunk.paths]
            else:
                self._idle.append(worker_process)
            done.append(chunk)
        return done

    def stop(self) -> None:
        """Close the stop pipe, so that workers open no more files."""
        if self._stop_write >= 0:
            os.close(self._stop_write)
            self._stop_write = -1

    def close(self) -> list[_Chunk]:
        """Stop every worker, and return the chunks that finished meanwhile.

        Workers stop before their next file once the stop pipe closes. The
        chunks they were searching are awaited for `STOP_GRACE_SECONDS`,
        so that their reads are counted; a worker still busy then is killed.
        """
        self.stop()
        for idle in self._idle:
            self._retire(idle)
        finished: list[_Chunk] = []
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self._busy:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            finished.extend(self.wait(remaining))
        for idle in self._idle:
            self._retire(idle)
        for busy in self._busy.values():
            busy.process.kill()
            self._retire(busy)
        self._idle.clear()
        self._busy.clear()
        os.close(self._stop_read)
        return [chunk for chunk in finished if chunk.outcomes is not None]

    def _start(self) -> _Worker | None:
        """Start a worker, or return None if no process can be started."""
        to_worker_read, to_worker_write = os.pipe()
        from_worker_read, from_worker_write = os.pipe()
        try:
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", WORKER_SCRIPT, str(self._stop_read)],
                stdin=to_worker_read,
                stdout=from_worker_write,
                pass_fds=(self._stop_read,),
            )
        except OSError as error:
            for fd in (to_worker_write, from_worker_read):
                os.close(fd)
            log.warning(
                "cannot start a search worker process (%s); searching in this "
                "process instead",
                error,
            )
            self._size = len(self._busy) + len(self._idle)
            return None
        finally:
            os.close(to_worker_read)
            os.close(from_worker_write)
        self.started += 1
        started = _Worker(
            process,
            inbox=Connection(to_worker_write, readable=False),
            outbox=Connection(from_worker_read, writable=False),
        )
        started.inbox.send_bytes(self._settings)
        return started

    def _search_here(self, paths: list[str]) -> list[Outcome]:
        if self._fallback is None:
            self._fallback = Searcher(*pickle.loads(self._settings))
        return [self._fallback.search(path) for path in paths]

    def _bury(self, dead: _Worker) -> int:
        """Reap a worker that died, and return its exit status."""
        dead.inbox.close()
        dead.outbox.close()
        status = dead.process.wait()
        log.warning(
            "search worker process %d: %s", dead.process.pid, WorkerLostError(status)
        )
        return status

    @staticmethod
    def _retire(done: _Worker) -> None:
        """Close a worker's pipes, so that it exits, and reap it."""
        done.inbox.close()
        done.outbox.close()
        try:
            done.process.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            done.process.kill()
            done.process.wait()


# --- Checking the arguments --------------------------------------------------


_POSIX_CLASS = re.compile(
    rb"\[:(alpha|digit|alnum|upper|lower|space|blank|punct|print|graph|cntrl"
    rb"|xdigit):\]"
)


def _pattern_bytes(pattern: str | bytes) -> bytes:
    if isinstance(pattern, bytes):
        return pattern
    if isinstance(pattern, str):
        return os.fsencode(pattern)
    raise ConfigurationError(
        f"pattern must be a str or bytes, not {type(pattern).__name__}"
    )


def _compile(pattern: bytes, flags: int) -> None:
    """Check the pattern the way the workers will compile it."""
    shown = pattern.decode("utf-8", "backslashreplace")
    posix = _POSIX_CLASS.search(pattern)
    if posix is not None:
        name = posix.group(1).decode()
        raise ConfigurationError(
            f"the pattern {shown!r} uses the POSIX class [:{name}:], which "
            "Python's re does not support; write the characters out instead, "
            "such as [a-zA-Z] for [[:alpha:]] or \\s for [[:space:]]"
        )
    difference = _gnu_difference(pattern)
    if difference is not None:
        raise ConfigurationError(
            f"the pattern {shown!r} {difference} (grep() matches like LC_ALL=C grep -E)"
        )
    try:
        re.compile(pattern, flags | re.MULTILINE)
    except re.error as error:
        where = f" at position {error.pos}" if error.pos is not None else ""
        raise ConfigurationError(
            f"the pattern {shown!r} is not a valid regular expression: "
            f"{error.msg}{where}; see the syntax of Python's re module, and "
            "escape a literal ( [ { . * + ? | \\ with a backslash"
        ) from None
    except (OverflowError, RecursionError, ValueError):
        raise ConfigurationError(
            f"the pattern {shown!r} has a repetition count too large or groups "
            "nested too deeply for Python's re; simplify it"
        ) from None


# Escapes that Python's re and GNU grep -E both accept but read differently.
_ESCAPE_DIFFERENCES = {
    **dict.fromkeys(
        b"<>",
        "uses \\< or \\>, the start or end of a word in GNU grep, "
        "which Python's re reads as a plain < or >; write \\b instead",
    ),
    **dict.fromkeys(
        b"dD",
        "uses \\d or \\D, a digit class in Python's re but a plain d "
        "in GNU grep; write [0-9] or [^0-9] instead",
    ),
    **dict.fromkeys(
        b"tnrfvax",
        "uses an escape such as \\t or \\x41, a control or "
        "numbered character in Python's re but a plain letter in GNU grep; "
        "write the character itself instead",
    ),
    **dict.fromkeys(
        b"`'AZz",
        "uses an anchor such as \\A or \\`, which the two read "
        "differently; write ^ or $ instead",
    ),
}


def _gnu_difference(pattern: bytes) -> str | None:
    """Return how Python's re and GNU grep -E differ on ``pattern``, or None."""
    index, end = 0, len(pattern)
    while index < end:
        char = pattern[index]
        if char == ord("\\"):
            escaped = pattern[index + 1] if index + 1 < end else None
            if escaped is not None and escaped in _ESCAPE_DIFFERENCES:
                return _ESCAPE_DIFFERENCES[escaped]
            index += 2
            continue
        if char == ord("["):
            index = _skip_bracket(pattern, index)
            if index < 0:
                return (
                    "has a backslash inside [...], which GNU grep reads as a "
                    "backslash and Python's re as the start of an escape; move "
                    "it out, such as (\\w|-) for [\\w-]"
                )
            continue
        if char in b"*+?}" and pattern[index + 1 : index + 2] == b"?":
            return (
                "has a lazy quantifier such as +?, which GNU grep reads as an "
                "optional repeat; drop the ? after the quantifier"
            )
        index += 1
    return None


def _skip_bracket(pattern: bytes, start: int) -> int:
    """Return the index after the bracket expression at ``start``, or -1.

    -1 means the expression contains a backslash. An unclosed bracket returns
    the end, for re.compile to report.
    """
    index = start + 1
    if pattern[index : index + 1] == b"^":
        index += 1
    if pattern[index : index + 1] == b"]":
        index += 1  # A ] right after the opening bracket is itself.
    while index < len(pattern):
        char = pattern[index]
        if char == ord("\\"):
            return -1
        if char == ord("]"):
            return index + 1
        index += 1
    return len(pattern)


def _mode(output: str) -> int:
    try:
        return _MODES[output]
    except (KeyError, TypeError):
        raise ConfigurationError(
            f"output must be 'lines', 'files' or 'counts', not {output!r}"
        ) from None


def _max_results(value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(
            f"max_results must be a whole number, 0 or more, or None, not {value!r}"
        )
    return value


def _jobs(value: int | None) -> int:
    if value is None:
        return cpu_count()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(
            f"jobs must be a whole number, 1 or more, or None, not {value!r}"
        )
    return value


def _operands(paths: StrPath | Iterable[StrPath] | None) -> list[str | None]:
    if paths is None:
        return [None]
    if isinstance(paths, str | os.PathLike):
        return [os.fspath(paths)]
    operands: list[str | None] = []
    for path in paths:
        if not isinstance(path, str | os.PathLike):
            raise ConfigurationError(
                f"paths must hold str or os.PathLike values, not {path!r}"
            )
        operands.append(os.fspath(path))
    if not operands:
        raise ConfigurationError(
            "paths is empty; give at least one file or folder, or None for "
            "the current folder"
        )
    return operands


def _globs(name: str, globs: str | Iterable[str]) -> re.Pattern[str] | None:
    """Compile globs into one pattern matched against a whole base name."""
    if isinstance(globs, str):
        globs = [globs]
    parts: list[str] = []
    for glob in globs:
        if not isinstance(glob, str):
            raise ConfigurationError(f"{name} must hold str globs, not {glob!r}")
        parts.append(fnmatch.translate(glob))
    if not parts:
        return None
    return re.compile("|".join(f"(?:{part})" for part in parts))
