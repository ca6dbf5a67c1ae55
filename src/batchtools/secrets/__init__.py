"""Secrets: a credential store, and the redaction applied where a run writes.

Secrets reach Python tasks through their context (``context.secret("NAME")``)
and commands through their environment, never through the command line.
Every registered value is replaced by ``***`` in log lines, error messages,
journal rows, the report and captured output. Items themselves are stored
as given, so a secret must not be an item.
"""

from batchtools._exceptions import SecretExpiredError, SecretMissingError
from batchtools.secrets._redact import (
    MASK,
    MIN_LENGTH,
    RedactingFilter,
    Redactor,
    StreamRedactor,
    redact_logs,
)
from batchtools.secrets._sources import MAX_FILE_SIZE
from batchtools.secrets._store import (
    Secret,
    SecretAccess,
    SecretStore,
    TaskSecrets,
    mask_name,
)

__all__ = [
    "MASK",
    "MAX_FILE_SIZE",
    "MIN_LENGTH",
    "RedactingFilter",
    "Redactor",
    "Secret",
    "SecretAccess",
    "SecretExpiredError",
    "SecretMissingError",
    "SecretStore",
    "StreamRedactor",
    "TaskSecrets",
    "mask_name",
    "redact_logs",
]
