"""The package's public names: `batchtools.__all__` lists exactly them."""

from __future__ import annotations

import types

import batchtools


def public_attributes() -> set[str]:
    """Return the package attributes that are public and are not modules."""
    return {
        name
        for name, value in vars(batchtools).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }


def test_every_name_in_all_exists() -> None:
    missing = [name for name in batchtools.__all__ if not hasattr(batchtools, name)]

    assert missing == []


def test_every_public_attribute_is_in_all() -> None:
    unlisted = public_attributes() - set(batchtools.__all__)

    assert unlisted == set()


def test_all_has_no_duplicates_or_modules() -> None:
    names = batchtools.__all__

    assert len(names) == len(set(names))
    assert not any(
        isinstance(getattr(batchtools, name), types.ModuleType) for name in names
    )


def test_public_exceptions_share_one_root() -> None:
    exceptions = [
        getattr(batchtools, name)
        for name in batchtools.__all__
        if isinstance(getattr(batchtools, name), type)
        and issubclass(getattr(batchtools, name), BaseException)
    ]

    assert len(exceptions) >= 10
    assert all(issubclass(error, batchtools.BatchtoolsError) for error in exceptions)


def test_version_is_a_string() -> None:
    assert isinstance(batchtools.__version__, str)
    assert batchtools.__version__.count(".") == 2
