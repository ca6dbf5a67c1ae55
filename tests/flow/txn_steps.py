"""Transaction steps for the tests, importable by name in a new process.

`MoveFile` moves a file and can stop in the middle of a call, so that a
test can kill its process there. `Record` appends each call to a ledger
file, which is how the tests see the order of calls across processes, and
fails on request. Failures are asked for in the state:

- ``"fail": ["commit"]`` fails every call of those methods;
- ``"fail_first": {"commit": 1}`` fails the first N calls of a method, as
  counted in the ledger;
- ``"fail_while": PATH`` fails the methods in ``fail`` only while PATH exists.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from batchtools.flow.transaction import Step, StepContext

BLOCK_SECONDS = 60.0
"""How long a paused call blocks; the test kills the process long before."""

BARRIERS: dict[str, threading.Barrier] = {}
"""Barriers that `Gate` waits at, by name; a test registers them."""

EVENTS: dict[str, threading.Event] = {}
"""Events that `Hold` sets and waits for, by name; a test registers them."""


class StepFailedError(RuntimeError):
    """The failure that a test asked a step for."""


def _should_fail(state: dict[str, Any], phase: str, calls_before: int) -> bool:
    if phase in state.get("fail_first", {}):
        return bool(calls_before < state["fail_first"][phase])
    if phase not in state.get("fail", []):
        return False
    flag = state.get("fail_while")
    return flag is None or Path(flag).exists()


def _pause(state: dict[str, Any], phase: str, at: str) -> None:
    """Block if the state requests a pause at this point, the first time only."""
    pause = state.get("pause")
    if not pause or pause["phase"] != phase or pause["at"] != at:
        return
    marker = Path(pause["marker"])
    if marker.exists():
        return
    marker.write_text(f"{os.getpid()}\n")
    threading.Event().wait(BLOCK_SECONDS)
    raise StepFailedError(f"the test did not kill the process at {phase} {at}")


class MoveFile:
    """Move ``state["src"]`` to ``state["dst"]``; rollback moves it back."""

    def prepare(self, state: dict[str, Any]) -> None:
        _pause(state, "prepare", "before")
        if _should_fail(state, "prepare", 0):
            raise StepFailedError(f"prepare of {state['src']} failed on request")
        if not Path(state["src"]).exists() and not Path(state["dst"]).exists():
            raise FileNotFoundError(state["src"])

    def commit(self, state: dict[str, Any]) -> None:
        _pause(state, "commit", "before")
        if _should_fail(state, "commit", 0):
            raise StepFailedError(f"commit of {state['src']} failed on request")
        source, target = Path(state["src"]), Path(state["dst"])
        if source.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(source, target)
        _pause(state, "commit", "after")

    def rollback(self, state: dict[str, Any]) -> None:
        _pause(state, "rollback", "before")
        if _should_fail(state, "rollback", 0):
            raise StepFailedError(f"rollback of {state['src']} failed on request")
        source, target = Path(state["src"]), Path(state["dst"])
        if target.exists() and not source.exists():
            os.rename(target, source)
        _pause(state, "rollback", "after")


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """Return the calls recorded in a ledger file, oldest first."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def _record(
    state: dict[str, Any], phase: str, context: StepContext | None = None
) -> None:
    ledger = Path(state["ledger"])
    calls_before = sum(
        1
        for call in read_ledger(ledger)
        if call["name"] == state["name"] and call["phase"] == phase
    )
    entry = {
        "phase": phase,
        "name": state["name"],
        "token": state.get("token"),
        "key": None if context is None else context.idempotency_key,
        "pid": os.getpid(),
    }
    with ledger.open("a") as file:
        file.write(json.dumps(entry) + "\n")
    if _should_fail(state, phase, calls_before):
        raise StepFailedError(f"{phase} of {state['name']} failed on request")


class Record:
    """Record each call in ``state["ledger"]``; prepare adds a token to the state."""

    def prepare(self, state: dict[str, Any]) -> dict[str, Any]:
        _record(state, "prepare")
        return {**state, "token": f"token-{state['name']}"}

    def commit(self, state: dict[str, Any], context: StepContext) -> None:
        _record(state, "commit", context)

    def rollback(self, state: dict[str, Any]) -> None:
        _record(state, "rollback")


class AsyncRecord:
    """`Record` with coroutine methods."""

    async def prepare(self, state: dict[str, Any]) -> dict[str, Any]:
        _record(state, "prepare")
        return {**state, "token": f"token-{state['name']}"}

    async def commit(self, state: dict[str, Any]) -> None:
        _record(state, "commit")

    async def rollback(self, state: dict[str, Any]) -> None:
        _record(state, "rollback")


class Gate:
    """Prepare waits at ``BARRIERS[state["barrier"]]``, then records its return."""

    def prepare(self, state: dict[str, Any]) -> None:
        try:
            BARRIERS[state["barrier"]].wait(timeout=state.get("timeout", 10.0))
        finally:
            _record(state, "prepare returned")

    def commit(self, state: dict[str, Any]) -> None:
        _record(state, "commit")

    def rollback(self, state: dict[str, Any]) -> None:
        _record(state, "rollback")


class Hold:
    """Commit sets ``EVENTS[name + ":entered"]``, then waits for ``name + ":go"``."""

    def commit(self, state: dict[str, Any]) -> None:
        EVENTS[state["name"] + ":entered"].set()
        EVENTS[state["name"] + ":go"].wait(timeout=BLOCK_SECONDS)
        _record(state, "commit")

    def rollback(self, state: dict[str, Any]) -> None:
        _record(state, "rollback")


class BadPrepare:
    """Prepare returns a state that JSON cannot hold."""

    def prepare(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"numbers": {1, 2}}

    def commit(self, state: dict[str, Any]) -> None:
        pass

    def rollback(self, state: dict[str, Any]) -> None:
        pass


def _commit_record(state: dict[str, Any]) -> None:
    _record(state, "commit")


def _rollback_record(state: dict[str, Any]) -> None:
    _record(state, "rollback")


record_functions = Step(commit=_commit_record, rollback=_rollback_record)
"""A `Step` of functions without prepare."""


class NoRollback:
    """A step that cannot be undone, which a transaction rejects."""

    def commit(self, state: dict[str, Any]) -> None:
        pass


class NeedsArguments:
    """A step class that recovery could not make again."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def commit(self, state: dict[str, Any]) -> None:
        pass

    def rollback(self, state: dict[str, Any]) -> None:
        pass
