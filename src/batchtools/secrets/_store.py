"""The credential store: named secrets, their expiry, and a log of their use.

A `SecretStore` reads each value once, when the secret is added, so that a
missing secret stops the run before anything runs, and registers the value
with the store's `Redactor`. Attempts read values through a `TaskSecrets`
view (``context.secrets``); commands get every secret as an environment
variable. Each read is checked against the secret's expiry and recorded in
the access log.

A view sent to a worker process carries a snapshot of the values, taken
when the attempt is sent. The worker checks expiry against the store's
clock reading at that moment plus the time elapsed since, and the access
log records the secrets as sent, since the worker's reads do not come back.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from batchtools._exceptions import (
    ConfigurationError,
    SecretExpiredError,
    SecretMissingError,
)
from batchtools.policy._units import parse_duration
from batchtools.secrets._redact import Redactor
from batchtools.secrets._sources import check_source, read_source

log = logging.getLogger("batchtools.secrets")

ACCESS_LOG_SIZE = 1000
"""Accesses a store keeps in memory by default; older ones are dropped."""

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NO_SECRETS = "the run has no secrets; pass secrets= to run, or --secret to the CLI"


def mask_name(name: str) -> str:
    """Return ``name`` with all but its first few characters hidden: ``db_p***``."""
    return name[: min(4, len(name) // 2)] + "***"


@dataclass(frozen=True, slots=True)
class Secret:
    """One named secret value.

    Attributes:
        name: The name tasks ask for; also the environment variable that
            commands get.
        source: Where the value came from: ``env:VAR``, ``file:PATH``,
            ``keyring:SERVICE/USER``, or ``value`` when given directly.
        value: The value; it is left out of ``repr``.
        loaded_at: When the value was read, on the store's clock.
        expires_at: When the value stops being valid, on the store's
            clock, or ``None``.
    """

    name: str
    source: str
    value: str = field(repr=False)
    loaded_at: float
    expires_at: float | None = None

    def expired(self, now: float) -> bool:
        """Return whether the secret has expired at ``now``."""
        return self.expires_at is not None and now >= self.expires_at


class SecretAccess(NamedTuple):
    """One use of a secret, as the access log keeps it.

    Attributes:
        name: The secret's name, partly masked (``db_p***``).
        run_id: The run's id, or ``None`` outside a run.
        key: The item's key, or ``None`` outside a run.
        attempt: The attempt number, or ``None`` outside a run.
        time: When, on the store's clock.
        use: ``task`` (read by a Python task), ``environment`` (set in a
            command's environment) or ``worker`` (sent to a worker process).
    """

    name: str
    run_id: str | None
    key: str | None
    attempt: int | None
    time: float
    use: str


class SecretStore:
    """Named secrets for a run, read once from their sources.

    Pass the store to `batchtools.run` (``secrets=store``): Python tasks
    read values as ``context.secret("NAME")``, commands get each secret as
    the environment variable ``NAME``, and every value is redacted from
    what the run writes.

    Example::

        store = SecretStore()
        store.add("DB_PASSWORD", "env:DB_PASS", ttl="1h")
        store.add("API_TOKEN", "file:/run/secrets/api_token")
        batchtools.run(items, task, secrets=store)

    Args:
        clock: Returns the current time in seconds since the epoch; expiry
            is measured on it. Tests pass a fake one.
        access_log_size: Accesses kept by `accesses`; older ones are dropped.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        access_log_size: int = ACCESS_LOG_SIZE,
    ) -> None:
        if access_log_size < 1:
            raise ConfigurationError(
                f"access_log_size={access_log_size!r} must be at least 1"
            )
        self.clock = clock
        self.redactor = Redactor()
        self._secrets: dict[str, Secret] = {}
        self._unset: dict[str, SecretMissingError] = {}
        self._accesses: collections.deque[SecretAccess] = collections.deque(
            maxlen=access_log_size
        )
        self._lock = threading.Lock()

    @classmethod
    def from_specs(
        cls, specs: Iterable[str], *, clock: Callable[[], float] = time.time
    ) -> SecretStore:
        """Return a store with one secret per ``NAME=SOURCE`` text (``--secret``).

        Raises:
            ConfigurationError: A text is not ``NAME=SOURCE``, or a name or
                source is invalid.
            SecretMissingError: A source has no value.
        """
        store = cls(clock=clock)
        for spec in specs:
            name, equals, source = spec.partition("=")
            if not equals or not name or not source:
                raise ConfigurationError(
                    f"invalid secret {spec!r}: use NAME=SOURCE, such as "
                    "DB_PASSWORD=env:DB_PASS or API_TOKEN=file:/run/secrets/token"
                )
            store.add(name, source)
        return store

    def add(
        self,
        name: str,
        source: str,
        *,
        ttl: float | str | timedelta | None = None,
        expires_at: float | datetime | None = None,
        required: bool = True,
    ) -> Secret | None:
        """Read a secret from ``source`` and register it as ``name``.

        Args:
            name: A name such as ``DB_PASSWORD``: letters, digits and
                underscores, not starting with a digit.
            source: ``env:VAR``, ``file:PATH`` or ``keyring:SERVICE/USER``.
            ttl: How long the value stays valid after it is read: seconds,
                a `timedelta`, or text such as ``"15m"``.
            expires_at: When the value stops being valid: seconds since the
                epoch or a `datetime` (a naive one is local time).
            required: Raise if the source has no value. An optional secret
                without a value is left out: commands do not get it, and a
                task that reads it fails with `SecretMissingError`.

        Returns:
            The secret, or ``None`` for an optional secret without a value.

        Raises:
            ConfigurationError: The name, source or expiry is invalid, the
                name is taken, or the value is shorter than 4 characters.
            SecretMissingError: A required secret's source has no value.
        """
        self._check_name(name)
        check_source(name, source)
        expiry = self._expiry(name, ttl, expires_at)
        try:
            value = read_source(name, source)
        except SecretMissingError as error:
            if required:
                raise
            self._unset[name] = error
            log.debug("optional secret %s has no value: %s", name, error.reason)
            return None
        return self._register(name, source, value, expiry)

    def add_value(
        self,
        name: str,
        value: str,
        *,
        ttl: float | str | timedelta | None = None,
        expires_at: float | datetime | None = None,
    ) -> Secret:
        """Register a value the caller already has (from a vault client, say).

        Args:
            name: As for `add`.
            value: The secret value, at least 4 characters long.
            ttl: As for `add`.
            expires_at: As for `add`.

        Raises:
            ConfigurationError: The name or expiry is invalid, the name is
                taken, or the value is shorter than 4 characters.
        """
        self._check_name(name)
        return self._register(name, "value", value, self._expiry(name, ttl, expires_at))

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ConfigurationError(
                f"invalid secret name {name!r}: use letters, digits and "
                "underscores, not starting with a digit, such as DB_PASSWORD"
            )
        if name in self._secrets or name in self._unset:
            raise ConfigurationError(
                f"secret {name!r} is given twice; give each name once"
            )

    def _expiry(
        self,
        name: str,
        ttl: float | str | timedelta | None,
        expires_at: float | datetime | None,
    ) -> tuple[float | None, float | None]:
        if ttl is not None and expires_at is not None:
            raise ConfigurationError(
                f"secret {name!r}: give ttl or expires_at, not both"
            )
        seconds = None if ttl is None else parse_duration(ttl, name=f"{name} ttl")
        moment = expires_at.timestamp() if isinstance(expires_at, datetime) else None
        if expires_at is not None and moment is None:
            if isinstance(expires_at, bool) or not isinstance(expires_at, int | float):
                raise ConfigurationError(
                    f"secret {name!r}: expires_at={expires_at!r} must be seconds "
                    "since the epoch or a datetime"
                )
            moment = float(expires_at)
        return seconds, moment

    def _register(
        self,
        name: str,
        source: str,
        value: str,
        expiry: tuple[float | None, float | None],
    ) -> Secret:
        if "\0" in value:
            raise ConfigurationError(
                f"secret {name!r} ({source}) contains a NUL character, which an "
                "environment variable cannot hold"
            )
        try:
            self.redactor.add(value)
        except ConfigurationError as error:
            raise ConfigurationError(f"secret {name!r} ({source}): {error}") from None
        now = self.clock()
        ttl, moment = expiry
        expires_at = now + ttl if ttl is not None else moment
        secret = Secret(name, source, value, now, expires_at)
        self._secrets[name] = secret
        log.debug("secret %s registered from %s", mask_name(name), source)
        return secret

    # -- reading -------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the secrets that have a value, in the order added."""
        return tuple(self._secrets)

    def __contains__(self, name: object) -> bool:
        return name in self._secrets

    def __len__(self) -> int:
        return len(self._secrets)

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(self._secrets))

    def __repr__(self) -> str:
        return f"<SecretStore {list(self._secrets)} (values hidden)>"

    def info(self, name: str) -> Secret:
        """Return the secret ``name`` without reading it: no expiry check, no log.

        Raises:
            SecretMissingError: No secret of that name has a value.
        """
        secret = self._secrets.get(name)
        if secret is None:
            raise self._missing(name)
        return secret

    def get(
        self,
        name: str,
        *,
        run_id: str | None = None,
        key: str | None = None,
        attempt: int | None = None,
        use: str = "task",
    ) -> str:
        """Return the value of ``name`` and record the access.

        Raises:
            SecretMissingError: No secret of that name has a value.
            SecretExpiredError: The secret has expired.
        """
        secret = self._secrets.get(name)
        if secret is None:
            raise self._missing(name)
        now = self.clock()
        if secret.expired(now):
            assert secret.expires_at is not None
            raise SecretExpiredError(name, secret.expires_at)
        self._record(name, run_id, key, attempt, now, use)
        return secret.value

    def _missing(self, name: str) -> SecretMissingError:
        return _missing(name, self._unset, self._secrets)

    def _record(
        self,
        name: str,
        run_id: str | None,
        key: str | None,
        attempt: int | None,
        now: float,
        use: str,
    ) -> None:
        masked = mask_name(name)
        with self._lock:
            self._accesses.append(SecretAccess(masked, run_id, key, attempt, now, use))
        log.debug(
            "secret %s used (%s) by run %s item %s attempt %s",
            masked,
            use,
            run_id,
            key,
            attempt,
        )

    def accesses(self) -> list[SecretAccess]:
        """Return the most recent accesses, oldest first."""
        with self._lock:
            return list(self._accesses)

    def check_unexpired(self) -> None:
        """Raise if a secret has already expired, so that a run does not start.

        Raises:
            ConfigurationError: A secret's expiry time has passed.
        """
        now = self.clock()
        for secret in self._secrets.values():
            if secret.expired(now):
                raise ConfigurationError(
                    f"secret {secret.name!r} ({secret.source}) expired before the "
                    "run started; renew it and start the run again"
                )

    def environment(
        self,
        *,
        run_id: str | None = None,
        key: str | None = None,
        attempt: int | None = None,
    ) -> dict[str, str]:
        """Return every secret as environment variables for one command.

        Raises:
            SecretExpiredError: A secret has expired, so the command must
                not start.
        """
        return {
            name: self.get(
                name, run_id=run_id, key=key, attempt=attempt, use="environment"
            )
            for name in self._secrets
        }

    def for_attempt(self, run_id: str, key: str, attempt: int) -> TaskSecrets:
        """Return the view of the secrets that one attempt reads."""
        return TaskSecrets(self, run_id, key, attempt)

    def snapshot(self, run_id: str, key: str, attempt: int) -> _Snapshot:
        """Return the values, expiry times and clock reading to send to a worker."""
        now = self.clock()
        values: dict[str, str | None] = {}
        expiry: dict[str, float] = {}
        for name, secret in self._secrets.items():
            if secret.expires_at is not None:
                expiry[name] = secret.expires_at
            if secret.expired(now):
                values[name] = None
                continue
            values[name] = secret.value
            self._record(name, run_id, key, attempt, now, "worker")
        return _Snapshot(values, expiry, dict(self._unset), now, time.time())


class _Snapshot:
    """Secret values sent to a worker process, as they were at one moment."""

    __slots__ = ("clock_at_send", "expiry", "sent_at", "unset", "values")

    def __init__(
        self,
        values: dict[str, str | None],
        expiry: dict[str, float],
        unset: dict[str, SecretMissingError],
        clock_at_send: float,
        sent_at: float,
    ) -> None:
        self.values = values
        self.expiry = expiry
        self.unset = unset
        self.clock_at_send = clock_at_send
        self.sent_at = sent_at

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _Snapshot,
            (self.values, self.expiry, self.unset, self.clock_at_send, self.sent_at),
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.values)

    def get(self, name: str) -> str:
        if name not in self.values:
            raise _missing(name, self.unset, self.values)
        value = self.values[name]
        expires_at = self.expiry.get(name)
        # The store's clock is not in this process, so its reading when the
        # attempt was sent, plus the time since, is used in its place.
        now = self.clock_at_send + max(0.0, time.time() - self.sent_at)
        if expires_at is not None and (value is None or now >= expires_at):
            raise SecretExpiredError(name, expires_at)
        assert value is not None
        return value


def _missing(
    name: str, unset: dict[str, SecretMissingError], known: Iterable[str]
) -> SecretMissingError:
    """Return a fresh error for reading ``name``, which has no value."""
    error = unset.get(name)
    if error is not None:
        return SecretMissingError(error.name, error.source, error.reason)
    names = ", ".join(known) or "none"
    return SecretMissingError(
        name, "", f"no secret of that name is registered (registered: {names})"
    )


class TaskSecrets:
    """The secrets one attempt may read: ``context.secrets``.

    ``secrets["NAME"]`` returns a value, checks its expiry and records the
    access; iterating gives the names. The values never appear in ``repr``.
    """

    __slots__ = ("_attempt", "_key", "_run_id", "_source")

    def __init__(
        self,
        source: SecretStore | _Snapshot,
        run_id: str,
        key: str,
        attempt: int,
    ) -> None:
        self._source = source
        self._run_id = run_id
        self._key = key
        self._attempt = attempt

    def __reduce__(self) -> tuple[Any, ...]:
        source = self._source
        if isinstance(source, SecretStore):
            source = source.snapshot(self._run_id, self._key, self._attempt)
        return (TaskSecrets, (source, self._run_id, self._key, self._attempt))

    def __getitem__(self, name: str) -> str:
        """Return the value of ``name``.

        Raises:
            SecretMissingError: No secret of that name has a value.
            SecretExpiredError: The secret has expired; the attempt fails.
        """
        source = self._source
        if isinstance(source, SecretStore):
            return source.get(
                name, run_id=self._run_id, key=self._key, attempt=self._attempt
            )
        return source.get(name)

    def get(self, name: str, default: str | None = None) -> str | None:
        """Return the value of ``name``, or ``default`` if it has none.

        Raises:
            SecretExpiredError: The secret has expired; the attempt fails.
        """
        if name not in self:
            return default
        return self[name]

    def __contains__(self, name: object) -> bool:
        return name in self._source.names

    def __iter__(self) -> Iterator[str]:
        return iter(self._source.names)

    def __len__(self) -> int:
        return len(self._source.names)

    def __repr__(self) -> str:
        return f"<TaskSecrets {list(self._source.names)} (values hidden)>"


def missing_context_secret(name: str) -> SecretMissingError:
    """Return the error for reading a secret in a run that has none."""
    return SecretMissingError(name, "", _NO_SECRETS)
