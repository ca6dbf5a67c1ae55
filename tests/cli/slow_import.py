"""A task module that takes long to import, for signals sent while a run starts.

On import it creates the file named by ``SLOW_IMPORT_MARKER`` and then
waits up to a minute for the file named by ``SLOW_IMPORT_GATE``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_marker = os.environ.get("SLOW_IMPORT_MARKER")
_gate = os.environ.get("SLOW_IMPORT_GATE")
if _marker and _gate:
    Path(_marker).touch()
    _until = time.monotonic() + 60
    while not Path(_gate).exists() and time.monotonic() < _until:
        time.sleep(0.01)


def echo(item: str) -> str:
    """Return ``item``."""
    return item
