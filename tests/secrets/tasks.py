"""Tasks that read secrets, for the process backend and the CLI's ``--call``.

Worker processes import a task by module and name, so these live in an
importable module. Each one does something a careless task might do with a
secret: put it in an error message, return it, or fail in a teardown that
mentions it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import batchtools

log = logging.getLogger("tests.secrets.tasks")

LEAK_VARIABLE = "BATCHTOOLS_TEST_LEAK"
"""Environment variable that a teardown reads to put a value in its error."""


def read_token(item: Any, context: batchtools.Context) -> str:
    """Return the length of secret ``TOKEN`` and the item, never the value."""
    return f"{item}:{len(context.secret('TOKEN'))}"


def fail_with_token(item: str, context: batchtools.Context) -> str:
    """Raise an error whose message contains secret ``TOKEN`` for item ``bad``.

    Other items log a warning with the value on this module's logger, and
    return a text that contains it, as a value the CLI prints and the
    journal keeps.
    """
    token = context.secret("TOKEN")
    if item == "bad":
        raise ValueError(f"login failed with token {token} for {item}")
    log.warning("item %s logs in with token %s", item, token)
    return f"{item} used {token}"


def teardown_leaking(state: Any) -> None:
    """Fail with a message that contains the value of `LEAK_VARIABLE`."""
    raise RuntimeError(f"closing the session {os.environ.get(LEAK_VARIABLE)} failed")
