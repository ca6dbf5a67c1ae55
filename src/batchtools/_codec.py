"""Canonical, type-tagged encoding of items, and the item keys built on it.

Every value becomes JSON text of the form ``[tag, payload]``, with dict
entries and set members sorted by their own encoding. Equal values of the
same type always give the same text, and values of different types never
do, so ``(1, 2)`` and ``[1, 2]``, or ``{1: x}`` and ``{"1": x}``, get
different keys. The text decodes back to an equal value, which is how the
journal stores items: bytes (including invalid UTF-8), tabs and newlines
round-trip exactly. An integer too long for decimal text (over 4,300
digits) is written in hexadecimal (tag ``I``). Types outside the table are
pickled (tag ``x``); the journal that stores them is private to the user.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import pickle
from pathlib import Path, PurePath
from typing import Any

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


_dump_string = json.encoder.encode_basestring


def encode(value: Any) -> str:
    """Return the canonical JSON text of ``value``."""
    kind = type(value)
    # Fast paths for the common item types; they give the same text as
    # the general path below.
    if kind is str:
        return f'["s",{_dump_string(value)}]'
    if kind is int:
        try:
            return f'["i","{value}"]'
        except ValueError:
            return _dumps(_tag(value))
    return _dumps(_tag(value))


def decode(text: str | bytes) -> Any:
    """Return the value whose canonical text is ``text``.

    Raises:
        ValueError: The text is not an encoding made by `encode`.
    """
    return _untag(json.loads(text))


def digest(text: str) -> str:
    """Return the 32-hex-digit content hash of an encoded item."""
    return hashlib.blake2b(
        text.encode("utf-8", "surrogatepass"), digest_size=16
    ).hexdigest()


def item_key(text: str, occurrence: int) -> str:
    """Return the key of the ``occurrence``-th copy (from 0) of an encoded item."""
    base = digest(text)
    return base if occurrence == 0 else f"{base}-{occurrence}"


def _tag(value: Any) -> list[Any]:
    kind = type(value)
    if kind is str:
        return ["s", value]
    if kind is bytes:
        try:
            return ["u", value.decode("utf-8")]
        except UnicodeDecodeError:
            return ["y", base64.b64encode(value).decode("ascii")]
    if kind is bool or value is None:
        return ["n", value]
    if kind is int:
        try:
            return ["i", str(value)]
        except ValueError:
            # Past 4,300 digits str() refuses; hexadecimal has no such limit.
            return ["I", hex(value)]
    if kind is float:
        return ["f", value.hex() if math.isfinite(value) else repr(value)]
    if kind is tuple:
        return ["t", [_tag(v) for v in value]]
    if kind is list:
        return ["l", [_tag(v) for v in value]]
    if kind is dict:
        pairs = sorted(
            ([_tag(k), _tag(v)] for k, v in value.items()),
            key=lambda pair: _dumps(pair[0]),
        )
        return ["d", pairs]
    if kind is set or kind is frozenset:
        members = sorted((_tag(v) for v in value), key=_dumps)
        return ["S" if kind is set else "F", members]
    if isinstance(value, PurePath):
        return ["p", str(value)]
    return ["x", base64.b64encode(pickle.dumps(value, protocol=5)).decode("ascii")]


def _untag(node: Any) -> Any:
    try:
        tag, payload = node
    except (TypeError, ValueError):
        raise ValueError(f"not an encoded item: {node!r}") from None
    if tag == "s":
        return payload
    if tag == "u":
        return payload.encode("utf-8")
    if tag == "y":
        return base64.b64decode(payload)
    if tag == "n":
        return payload
    if tag == "i":
        return int(payload)
    if tag == "I":
        return int(payload, 16)
    if tag == "f":
        return float.fromhex(payload) if "x" in payload else float(payload)
    if tag == "t":
        return tuple(_untag(v) for v in payload)
    if tag == "l":
        return [_untag(v) for v in payload]
    if tag == "d":
        return {_untag(k): _untag(v) for k, v in payload}
    if tag == "S":
        return {_untag(v) for v in payload}
    if tag == "F":
        return frozenset(_untag(v) for v in payload)
    if tag == "p":
        return Path(payload)
    if tag == "x":
        return pickle.loads(base64.b64decode(payload))
    raise ValueError(f"unknown item tag {tag!r}")
