"""pdb for a run's Python task: post-mortem at a failure, or a stop before one item.

`Debugger.wrap` wraps the task function; the debugger is also an engine
observer, which gives it the run's event loop and engine. It works on the
thread and async backends, whose tasks run in this process; the process,
subprocess and Dask backends run them elsewhere.

While a debugger session is open the run is paused:

* the engine's event loop is blocked, so no attempt starts, no outcome is
  printed and no retry is scheduled. A thread task's session blocks the
  loop with a callback that waits for the session's end. An async task's
  session runs on the loop itself.
* a thread that takes its next attempt from the queue waits before it
  calls the task. Attempts that were already executing on other threads go
  on, and print what they print.
* ``hide`` keeps the progress line off the terminal.
* the timeouts of attempts in flight move later by the time the loop was
  blocked, so the pause does not count against them.

Leaving the session with ``continue`` lets the run go on; the failed attempt
is then handled as usual (retried if retries are left). Only the first
failure opens a post-mortem session. ``quit`` stops the run as a first
Ctrl-C does: nothing new starts, what runs finishes, and a resume runs the
rest. An item stopped before it ran goes back to pending.

Writing to the terminal is this module's purpose, so the sessions write to
the debugger's own output (standard output by default), as pdb does.
"""

from __future__ import annotations

import asyncio
import bdb
import contextlib
import pdb
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any

from batchtools.backends._base import Context, TaskSpec
from batchtools.engine._engine import Interrupted

if TYPE_CHECKING:
    from batchtools.engine._engine import Engine
    from batchtools.engine._outcome import Outcome, Report

QUIT_REASON = "the debugger was quit"

# Stepping does not stop in the engine's, the backends' or asyncio's frames,
# so that a step out of the task does not land in the scheduler.
_SKIPPED_MODULES = ("batchtools.*", "asyncio.*", "threading", "concurrent.*")


class _TaskPdb(pdb.Pdb):
    """A pdb that skips batchtools' frames, except for its first stop.

    Args:
        on_pause: Receives the seconds each prompt took, or ``None``.
    """

    def __init__(
        self,
        stdin: IO[str] | None,
        stdout: IO[str] | None,
        on_pause: Callable[[float], None] | None,
    ) -> None:
        # nosigint: pdb would otherwise replace the CLI's SIGINT handler.
        super().__init__(
            stdin=stdin, stdout=stdout, skip=_SKIPPED_MODULES, nosigint=True
        )
        self.entry: FrameType | None = None
        self.on_pause = on_pause

    def stop_here(self, frame: FrameType) -> bool:
        if frame is self.entry:
            # The wrapper's frame, where the stop before an item shows the
            # call of the task; later steps skip it like other batchtools code.
            self.entry = None
            return True
        return bool(super().stop_here(frame))

    def interaction(
        self, frame: FrameType | None, traceback: TracebackType | None
    ) -> None:
        began = time.monotonic()
        try:
            super().interaction(frame, traceback)
        finally:
            if self.on_pause is not None:
                self.on_pause(time.monotonic() - began)


class Debugger:
    """pdb for a run's task: at its first failure, or before chosen items run.

    Pass it as an observer of the run and give the run ``wrap(task)`` as its
    task. See the module docstring for how a session pauses the run.

    Args:
        post_mortem: Open a post-mortem session at the first exception that
            an attempt raises.
        break_at: Stop before every attempt of each item whose key starts
            with this text (for a batch, the key of its first item).
        stdin: Where the debugger reads commands; standard input by default.
        stdout: Where it writes; standard output by default.

    Attributes:
        quit_requested: Whether a session ended with ``quit``, which stopped
            the run.
        breaks: How many times the debugger stopped before an item.
        post_mortems: How many post-mortem sessions were opened (0 or 1).
        waiting: Attempts waiting for a session to end before they start.

    Raises:
        ValueError: ``break_at`` is empty.
    """

    def __init__(
        self,
        *,
        post_mortem: bool = True,
        break_at: str | None = None,
        stdin: IO[str] | None = None,
        stdout: IO[str] | None = None,
    ) -> None:
        if break_at is not None and not break_at.strip():
            raise ValueError("break_at must be the start of an item's key, not empty")
        self.post_mortem = post_mortem
        self.break_at = break_at.strip() if break_at is not None else None
        self.quit_requested = False
        self.breaks = 0
        self.post_mortems = 0
        self.waiting = 0
        self._stdin = stdin
        self._stdout = stdout
        self._hide: Callable[[], AbstractContextManager[None]] | None = None
        self._engine: Engine | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._running = False
        self._lock = threading.Lock()
        self._session_lock = threading.RLock()
        self._holder: int | None = None
        # Set while no session is open; threads wait on it before an attempt.
        self._no_session = threading.Event()
        self._no_session.set()
        # Resolved when an async stop before an item ends; coroutines wait
        # on it before an attempt.
        self._async_session_end: asyncio.Future[None] | None = None

    @property
    def session_open(self) -> bool:
        """Whether a debugger session is open, which pauses the run."""
        return self._holder is not None

    def hide_with(self, hidden: Callable[[], AbstractContextManager[None]]) -> None:
        """Keep a progress line away through ``hidden`` while a session is open."""
        self._hide = hidden

    # -- engine events ----------------------------------------------------

    def on_start(self, engine: Engine) -> None:
        self._engine = engine
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._running = True

    def on_retry(
        self, key: str, attempt: int, delay: float, error: BaseException
    ) -> None:
        return None

    def on_outcome(self, outcome: Outcome) -> None:
        return None

    def on_finish(self, report: Report) -> None:
        # A thread attempt abandoned after a timeout may still fail later;
        # with the run over there is nothing to pause.
        self._running = False

    # -- wrapping the task ------------------------------------------------

    def wrap(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """Return ``function`` wrapped so that its attempts can open the debugger.

        The wrapper takes the item and a ``context`` keyword, which it passes
        on only if ``function`` declares one. It keeps the name of
        ``function``, so that a journaled run keeps its signature.
        """
        spec = TaskSpec.from_callable(function)
        wants_context = spec.wants_context
        wrapper: Callable[..., Any]
        if spec.is_async:

            async def debugged_async(item: Any, /, *, context: Context) -> Any:
                await self._wait_for_session_async()
                arguments = {"context": context} if wants_context else {}
                if self._stops_before(context):
                    return await self._stop_before_async(
                        function, item, arguments, context
                    )
                try:
                    return await function(item, **arguments)
                except Exception as error:
                    self._open_post_mortem(error, context)
                    raise

            wrapper = debugged_async
        else:

            def debugged(item: Any, /, *, context: Context) -> Any:
                self._wait_for_session()
                arguments = {"context": context} if wants_context else {}
                if self._stops_before(context):
                    return self._stop_before(function, item, arguments, context)
                try:
                    return function(item, **arguments)
                except Exception as error:
                    self._open_post_mortem(error, context)
                    raise

            wrapper = debugged
        wrapper.__qualname__ = spec.name.partition(":")[2]
        wrapper.__module__ = spec.name.partition(":")[0]
        wrapper.__name__ = getattr(function, "__name__", wrapper.__qualname__)
        wrapper.__doc__ = getattr(function, "__doc__", None)
        return wrapper

    def _stops_before(self, context: Context) -> bool:
        return (
            self.break_at is not None
            and self._running
            and context.key.startswith(self.break_at)
        )

    # -- the stop before an item ------------------------------------------

    def _stop_before(
        self,
        function: Callable[..., Any],
        item: Any,
        arguments: dict[str, Any],
        context: Context,
    ) -> Any:
        debugger = self._pdb()
        # A tracer that was there before (coverage, say) comes back after.
        tracer = sys.gettrace()
        with self._session():
            self._announce_stop(debugger, context)
            try:
                debugger.entry = sys._getframe()
                debugger.set_trace(debugger.entry)
                return function(item, **arguments)  # The first stop is here.
            except bdb.BdbQuit:
                self._quit()
                raise Interrupted(QUIT_REASON) from None
            except Exception as error:
                self._open_post_mortem(error, context)
                raise
            finally:
                sys.settrace(tracer)

    async def _stop_before_async(
        self,
        function: Callable[..., Any],
        item: Any,
        arguments: dict[str, Any],
        context: Context,
    ) -> Any:
        session_end = asyncio.get_running_loop().create_future()
        self._async_session_end = session_end
        debugger = self._pdb()
        tracer = sys.gettrace()
        try:
            with self._session():
                self._announce_stop(debugger, context)
                try:
                    debugger.entry = sys._getframe()
                    debugger.set_trace(debugger.entry)
                    return await function(item, **arguments)  # The first stop.
                except bdb.BdbQuit:
                    self._quit()
                    raise Interrupted(QUIT_REASON) from None
                except Exception as error:
                    self._open_post_mortem(error, context)
                    raise
                finally:
                    sys.settrace(tracer)
        finally:
            self._async_session_end = None
            session_end.set_result(None)

    def _announce_stop(self, debugger: pdb.Pdb, context: Context) -> None:
        self.breaks += 1
        debugger.message(
            f"Stopped before item {context.key} runs (attempt {context.attempt}). "
            "'step' enters the task, 'continue' runs it, 'quit' stops the run."
        )

    # -- the post-mortem --------------------------------------------------

    def _open_post_mortem(self, error: Exception, context: Context) -> None:
        if not self.post_mortem or not self._running:
            return
        if isinstance(error, bdb.BdbQuit | Interrupted):
            return
        with self._lock:
            if self.post_mortems:
                return
            self.post_mortems += 1
        # The first entry is the wrapper's frame; the task's frames follow.
        frames = error.__traceback__
        if frames is not None and frames.tb_next is not None:
            frames = frames.tb_next
        debugger = self._pdb()
        with self._session():
            text = "".join(traceback.format_exception(type(error), error, frames))
            debugger.message(text.rstrip("\n"))
            debugger.message(
                f"The task failed on item {context.key} (attempt "
                f"{context.attempt}). 'continue' goes on with the run, 'quit' "
                "stops it."
            )
            debugger.reset()
            debugger.interaction(None, frames)
        if debugger.quitting:
            self._quit()

    # -- pausing the run --------------------------------------------------

    def _pdb(self) -> _TaskPdb:
        on_loop = self._on_loop_thread()
        return _TaskPdb(self._stdin, self._stdout, self._extend if on_loop else None)

    def _on_loop_thread(self) -> bool:
        return self._loop_thread == threading.get_ident()

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        """Pause the run while the block runs; a nested session changes nothing."""
        me = threading.get_ident()
        if self._holder == me:
            yield
            return
        with self._session_lock:
            self._holder = me
            self._no_session.clear()
            try:
                with self._loop_held(), self._hidden():
                    yield
            finally:
                self._holder = None
                self._no_session.set()

    def _hidden(self) -> AbstractContextManager[None]:
        return self._hide() if self._hide is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _loop_held(self) -> Iterator[None]:
        """Block the event loop from another thread while the block runs."""
        loop = self._loop
        if loop is None or self._on_loop_thread():
            yield
            return
        blocked = threading.Event()
        release = threading.Event()
        try:
            loop.call_soon_threadsafe(self._hold, blocked, release)
        except RuntimeError:  # The loop has closed: there is nothing to hold.
            yield
            return
        # A loop that stops running never calls back, so do not wait for it.
        while not blocked.wait(0.05) and loop.is_running():
            pass
        try:
            yield
        finally:
            release.set()

    def _hold(self, blocked: threading.Event, release: threading.Event) -> None:
        """Block the event loop until ``release`` is set; runs on the loop."""
        began = time.monotonic()
        blocked.set()
        release.wait()
        self._extend(time.monotonic() - began)

    def _extend(self, seconds: float) -> None:
        if self._engine is not None:
            self._engine.extend_timeouts(seconds)

    def _wait_for_session(self) -> None:
        if self._no_session.is_set() or self._holder == threading.get_ident():
            return
        with self._lock:
            self.waiting += 1
        try:
            self._no_session.wait()
        finally:
            with self._lock:
                self.waiting -= 1

    async def _wait_for_session_async(self) -> None:
        while (end := self._async_session_end) is not None:
            self.waiting += 1
            try:
                # Shielded: a waiter that is cancelled must not end the session.
                await asyncio.shield(end)
            finally:
                self.waiting -= 1

    def _quit(self) -> None:
        """Stop the run, as a first Ctrl-C does."""
        self.quit_requested = True
        engine, loop = self._engine, self._loop
        if engine is None or loop is None:
            return
        if self._on_loop_thread():
            engine.stop(QUIT_REASON)
            return
        with contextlib.suppress(RuntimeError):  # The loop has closed.
            loop.call_soon_threadsafe(engine.stop, QUIT_REASON)
