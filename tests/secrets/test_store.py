"""The secret store: sources, expiry, the access log and the task view."""

from __future__ import annotations

import logging
import os
import pickle
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from batchtools import ConfigurationError
from batchtools.secrets import (
    MAX_FILE_SIZE,
    Secret,
    SecretExpiredError,
    SecretMissingError,
    SecretStore,
    TaskSecrets,
    mask_name,
)
from batchtools.testing import FakeClock

VALUE = "correct-horse-battery"
VARIABLE = "BATCHTOOLS_TEST_SECRET_VALUE"


@pytest.fixture
def environment_value(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(VARIABLE, VALUE)
    return VALUE


# -- environment --------------------------------------------------------------


def test_env_source_reads_variable(environment_value: str) -> None:
    store = SecretStore()

    secret = store.add("DB_PASSWORD", f"env:{VARIABLE}")

    assert secret is not None
    assert secret.value == VALUE
    assert secret.source == f"env:{VARIABLE}"
    assert store.get("DB_PASSWORD") == VALUE


def test_unset_variable_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(VARIABLE, raising=False)

    with pytest.raises(
        SecretMissingError,
        match=rf"secret 'DB_PASSWORD' \(env:{VARIABLE}\) is missing: the "
        rf"environment variable {VARIABLE} is not set",
    ):
        SecretStore().add("DB_PASSWORD", f"env:{VARIABLE}")


def test_empty_variable_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLE, "")

    with pytest.raises(SecretMissingError, match="is empty"):
        SecretStore().add("DB_PASSWORD", f"env:{VARIABLE}")


def test_missing_error_is_a_configuration_error() -> None:
    assert issubclass(SecretMissingError, ConfigurationError)


def test_optional_secret_without_value_is_left_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(VARIABLE, raising=False)
    store = SecretStore()

    added = store.add("OPTIONAL", f"env:{VARIABLE}", required=False)

    assert added is None
    assert "OPTIONAL" not in store
    with pytest.raises(SecretMissingError, match="is not set"):
        store.get("OPTIONAL")


def test_short_value_is_rejected_without_showing_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(VARIABLE, "q7z")

    with pytest.raises(ConfigurationError, match="at least 4 characters") as caught:
        SecretStore().add("PIN", f"env:{VARIABLE}")

    assert "q7z" not in str(caught.value)


def test_nul_in_value_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="NUL character"):
        SecretStore().add_value("TOKEN", "abc\0def")


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("VARIABLE", "invalid source"),
        ("vault:path", "invalid source"),
        ("env:", "names no variable"),
        ("file:", "names no file"),
        ("keyring:service", "keyring:SERVICE/USER"),
        ("keyring:/user", "keyring:SERVICE/USER"),
    ],
)
def test_invalid_source_is_rejected(source: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        SecretStore().add("TOKEN", source)


@pytest.mark.parametrize("name", ["", "1ABC", "DB-PASS", "A B", "x.y"])
def test_invalid_name_is_rejected(name: str) -> None:
    with pytest.raises(ConfigurationError, match="invalid secret name"):
        SecretStore().add_value(name, VALUE)


def test_name_given_twice_is_rejected() -> None:
    store = SecretStore()
    store.add_value("TOKEN", VALUE)

    with pytest.raises(ConfigurationError, match="given twice"):
        store.add_value("TOKEN", "another-value")


# -- files --------------------------------------------------------------------


def write_secret(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def test_file_source_strips_one_newline(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "token", f"{VALUE}\n\n".encode())

    secret = SecretStore().add("TOKEN", f"file:{path}")

    assert secret is not None
    assert secret.value == f"{VALUE}\n"


def test_file_source_strips_crlf(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "token", f"{VALUE}\r\n".encode())

    secret = SecretStore().add("TOKEN", f"file:{path}")

    assert secret is not None
    assert secret.value == VALUE


def test_file_source_keeps_inner_lines(tmp_path: Path) -> None:
    key = "-----BEGIN KEY-----\nabcdef\n-----END KEY-----"
    path = write_secret(tmp_path / "key.pem", f"{key}\n".encode())

    secret = SecretStore().add("KEY", f"file:{path}")

    assert secret is not None
    assert secret.value == key


def test_file_source_follows_symlink(tmp_path: Path) -> None:
    target = write_secret(tmp_path / "data", VALUE.encode())
    link = tmp_path / "token"
    link.symlink_to(target)

    secret = SecretStore().add("TOKEN", f"file:{link}")

    assert secret is not None
    assert secret.value == VALUE


def test_group_readable_file_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_secret(tmp_path / "token", VALUE.encode(), mode=0o640)

    with caplog.at_level(logging.WARNING, logger="batchtools.secrets"):
        secret = SecretStore().add("TOKEN", f"file:{path}")

    assert secret is not None
    assert "can be read by users other than its owner (mode 640)" in caplog.text
    assert VALUE not in caplog.text


def test_private_file_does_not_warn(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_secret(tmp_path / "token", VALUE.encode())

    with caplog.at_level(logging.WARNING, logger="batchtools.secrets"):
        SecretStore().add("TOKEN", f"file:{path}")

    assert caplog.records == []


def test_missing_file_is_missing(tmp_path: Path) -> None:
    path = tmp_path / "absent"

    with pytest.raises(SecretMissingError, match=f"the file {path} does not exist"):
        SecretStore().add("TOKEN", f"file:{path}")


def test_folder_is_not_a_secret_file(tmp_path: Path) -> None:
    with pytest.raises(SecretMissingError, match="is not a regular file"):
        SecretStore().add("TOKEN", f"file:{tmp_path}")


def test_fifo_is_rejected_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    with pytest.raises(SecretMissingError, match="is not a regular file"):
        SecretStore().add("TOKEN", f"file:{fifo}")


def test_empty_file_is_missing(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "token", b"\n")

    with pytest.raises(SecretMissingError, match="is empty"):
        SecretStore().add("TOKEN", f"file:{path}")


def test_large_file_is_rejected(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "token", b"x" * (MAX_FILE_SIZE + 1))

    with pytest.raises(ConfigurationError, match="more than the 64 KiB"):
        SecretStore().add("TOKEN", f"file:{path}")


def test_binary_file_is_rejected(tmp_path: Path) -> None:
    path = write_secret(tmp_path / "token", b"\xff\xfe\x00binary")

    with pytest.raises(ConfigurationError, match="not UTF-8 text"):
        SecretStore().add("TOKEN", f"file:{path}")


# -- keyring ------------------------------------------------------------------


def test_keyring_without_package_names_the_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # None in sys.modules makes the import fail, whether or not it is installed.
    monkeypatch.setitem(sys.modules, "keyring", None)

    with pytest.raises(
        ConfigurationError,
        match=r"secret 'TOKEN' \(keyring:mail/alice\) needs the keyring package.*"
        r"pip install keyring",
    ):
        SecretStore().add("TOKEN", "keyring:mail/alice")


@pytest.fixture
def keyring_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Put a keyring module with one stored password first on sys.path.

    It replaces the optional package, which these tests cannot install,
    and offers the one call the store makes, get_password.
    """
    (tmp_path / "keyring.py").write_text(
        "PASSWORDS = {('https://mail/x', 'alice'): " + repr(VALUE) + "}\n"
        "def get_password(service, username):\n"
        "    if service == 'broken':\n"
        "        raise RuntimeError('no keyring backend')\n"
        "    return PASSWORDS.get((service, username))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "keyring", raising=False)
    return tmp_path


def test_keyring_source_splits_at_last_slash(keyring_module: Path) -> None:
    secret = SecretStore().add("TOKEN", "keyring:https://mail/x/alice")

    assert secret is not None
    assert secret.value == VALUE


def test_keyring_without_entry_is_missing(keyring_module: Path) -> None:
    with pytest.raises(
        SecretMissingError,
        match="the keyring has no password for user 'bob' of service 'mail'",
    ):
        SecretStore().add("TOKEN", "keyring:mail/bob")


def test_keyring_failure_is_missing(keyring_module: Path) -> None:
    with pytest.raises(SecretMissingError, match="the keyring failed: RuntimeError"):
        SecretStore().add("TOKEN", "keyring:broken/alice")


# -- specs --------------------------------------------------------------------


def test_from_specs_reads_each_source(environment_value: str, tmp_path: Path) -> None:
    path = write_secret(tmp_path / "api", b"api-token-value\n")

    store = SecretStore.from_specs([f"DB=env:{VARIABLE}", f"API=file:{path}"])

    assert store.names == ("DB", "API")
    assert store.get("API") == "api-token-value"


@pytest.mark.parametrize("spec", ["DB", "DB=", "=env:X", "env:X"])
def test_from_specs_rejects_bad_form(spec: str) -> None:
    with pytest.raises(ConfigurationError, match="use NAME=SOURCE"):
        SecretStore.from_specs([spec])


# -- expiry -------------------------------------------------------------------


def test_ttl_expires_on_the_store_clock() -> None:
    clock = FakeClock(1000.0)
    store = SecretStore(clock=clock)
    store.add_value("TOKEN", VALUE, ttl="15m")

    clock.advance(15 * 60 - 1)
    assert store.get("TOKEN") == VALUE
    clock.advance(1)

    with pytest.raises(SecretExpiredError, match="secret 'TOKEN' expired at"):
        store.get("TOKEN")


def test_ttl_accepts_timedelta() -> None:
    clock = FakeClock(0.0)
    store = SecretStore(clock=clock)

    secret = store.add_value("TOKEN", VALUE, ttl=timedelta(minutes=2))

    assert secret.expires_at == 120.0


def test_expires_at_accepts_datetime() -> None:
    moment = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    clock = FakeClock(moment.timestamp() - 1)
    store = SecretStore(clock=clock)
    store.add_value("TOKEN", VALUE, expires_at=moment)

    assert store.get("TOKEN") == VALUE
    clock.advance(1)
    with pytest.raises(SecretExpiredError, match="2030-01-02T03:04:05"):
        store.get("TOKEN")


def test_ttl_and_expires_at_together_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        SecretStore().add_value("TOKEN", VALUE, ttl=5, expires_at=10.0)


@pytest.mark.parametrize("ttl", [0, -5, "soon"])
def test_invalid_ttl_is_rejected(ttl: object) -> None:
    with pytest.raises(ConfigurationError, match="TOKEN ttl"):
        SecretStore().add_value("TOKEN", VALUE, ttl=ttl)  # type: ignore[arg-type]  # wrong on purpose


def test_invalid_expires_at_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="expires_at='tomorrow'"):
        SecretStore().add_value("TOKEN", VALUE, expires_at="tomorrow")  # type: ignore[arg-type]  # wrong on purpose


def test_expired_error_is_an_attempt_error_that_pickles() -> None:
    from batchtools import AttemptError

    error = SecretExpiredError("TOKEN", 120.0)

    copy = pickle.loads(pickle.dumps(error))

    assert issubclass(SecretExpiredError, AttemptError)
    assert isinstance(copy, SecretExpiredError)
    assert (copy.name, copy.expires_at) == ("TOKEN", 120.0)
    assert str(copy) == str(error)


def test_check_unexpired_raises_for_expired_secret() -> None:
    clock = FakeClock(0.0)
    store = SecretStore(clock=clock)
    store.add_value("TOKEN", VALUE, ttl=10)
    store.check_unexpired()
    clock.advance(10)

    with pytest.raises(ConfigurationError, match="expired before the run started"):
        store.check_unexpired()


# -- the access log -----------------------------------------------------------


def test_access_log_records_masked_name_and_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock(50.0)
    store = SecretStore(clock=clock)
    store.add_value("db_password", VALUE)

    with caplog.at_level(logging.DEBUG, logger="batchtools.secrets"):
        store.get("db_password", run_id="run1", key="k1", attempt=2)

    [access] = store.accesses()
    assert access.name == "db_p***"
    assert (access.run_id, access.key, access.attempt) == ("run1", "k1", 2)
    assert access.time == 50.0
    assert access.use == "task"
    assert "secret db_p*** used (task) by run run1 item k1 attempt 2" in caplog.text
    assert "db_password" not in caplog.text
    assert VALUE not in caplog.text


def test_access_log_is_bounded() -> None:
    store = SecretStore(access_log_size=3)
    store.add_value("TOKEN", VALUE)

    for attempt in range(10):
        store.get("TOKEN", attempt=attempt)

    assert [access.attempt for access in store.accesses()] == [7, 8, 9]


def test_expired_read_is_not_logged_as_access() -> None:
    clock = FakeClock(0.0)
    store = SecretStore(clock=clock)
    store.add_value("TOKEN", VALUE, ttl=1)
    clock.advance(2)

    with pytest.raises(SecretExpiredError):
        store.get("TOKEN")

    assert store.accesses() == []


@pytest.mark.parametrize(
    ("name", "masked"), [("db_password", "db_p***"), ("API", "A***"), ("X", "***")]
)
def test_mask_name_hides_most_of_it(name: str, masked: str) -> None:
    assert mask_name(name) == masked


def test_access_log_size_must_be_positive() -> None:
    with pytest.raises(ConfigurationError, match="access_log_size=0"):
        SecretStore(access_log_size=0)


# -- the task view ------------------------------------------------------------


def test_task_view_reads_and_records() -> None:
    store = SecretStore()
    store.add_value("TOKEN", VALUE)
    view = store.for_attempt("run1", "key1", 1)

    assert view["TOKEN"] == VALUE
    assert list(view) == ["TOKEN"]
    assert "TOKEN" in view
    assert len(view) == 1
    assert view.get("OTHER") is None
    assert store.accesses()[0].key == "key1"


def test_task_view_names_what_is_registered() -> None:
    store = SecretStore()
    store.add_value("TOKEN", VALUE)

    with pytest.raises(
        SecretMissingError, match=r"'OTHER' is missing.*registered: TOKEN"
    ):
        store.for_attempt("run1", "key1", 1)["OTHER"]


def test_reprs_hide_values() -> None:
    store = SecretStore()
    secret = store.add_value("TOKEN", VALUE)

    for text in (repr(store), repr(secret), repr(store.for_attempt("r", "k", 1))):
        assert VALUE not in text
        assert "TOKEN" in text


def test_pickled_view_carries_a_snapshot() -> None:
    clock = FakeClock(100.0)
    store = SecretStore(clock=clock)
    store.add_value("TOKEN", VALUE, ttl=60)
    store.add_value("OLD", "expired-value", expires_at=100.0)

    copy = pickle.loads(pickle.dumps(store.for_attempt("run1", "key1", 3)))

    assert isinstance(copy, TaskSecrets)
    assert copy["TOKEN"] == VALUE
    with pytest.raises(SecretExpiredError, match="secret 'OLD' expired"):
        copy["OLD"]
    with pytest.raises(SecretMissingError, match="registered: TOKEN, OLD"):
        copy["NONE"]
    [sent] = store.accesses()
    assert (sent.name, sent.use, sent.attempt) == ("TO***", "worker", 3)


def test_snapshot_leaves_out_expired_values() -> None:
    clock = FakeClock(100.0)
    store = SecretStore(clock=clock)
    store.add_value("OLD", "expired-value", expires_at=100.0)

    data = pickle.dumps(store.for_attempt("run1", "key1", 1))

    assert b"expired-value" not in data


def test_snapshot_expires_as_the_store_clock_would() -> None:
    clock = FakeClock(100.0)
    store = SecretStore(clock=clock)
    # Expires 5 s after the snapshot on the store's clock: the copy's
    # estimate (clock at sending + real time since) is 100 s short of it.
    store.add_value("TOKEN", VALUE, expires_at=105.0)

    copy = pickle.loads(pickle.dumps(store.for_attempt("run1", "key1", 1)))

    assert copy["TOKEN"] == VALUE


def test_environment_gives_every_secret_and_records() -> None:
    store = SecretStore()
    store.add_value("TOKEN", VALUE)
    store.add_value("OTHER", "other-value")

    environment = store.environment(run_id="r", key="k", attempt=1)

    assert environment == {"TOKEN": VALUE, "OTHER": "other-value"}
    assert [access.use for access in store.accesses()] == ["environment"] * 2


def test_info_reads_without_logging() -> None:
    store = SecretStore()
    store.add_value("TOKEN", VALUE)

    secret = store.info("TOKEN")

    assert isinstance(secret, Secret)
    assert store.accesses() == []
