"""Strict msgpack decoding for everything that arrives from a peer.

Every container and string length is capped inside msgpack's own parser
(so nothing is allocated beyond the cap), extension types are refused (the
one msgpack decodes itself, Timestamp, then fails every typed accessor), and
the typed accessors below turn any schema violation into one
RemoteProtocolError that names the field.
"""

from __future__ import annotations

import re

import msgpack

from .errors import RemoteProtocolError

_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def _no_ext(code, data):
    raise ValueError(f"msgpack extension type {code} is not allowed")


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, what: str, *, max_len: int | None = None) -> object:
    limit = len(data) if max_len is None else max_len
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            ext_hook=_no_ext,
            max_bin_len=limit,
            max_str_len=limit,
            max_array_len=limit,
            max_map_len=limit,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(f"malformed {what}: {exc}", code="malformed") from None


class Fields:
    """Typed, bounded access to a decoded msgpack map."""

    def __init__(self, obj: object, what: str):
        if not isinstance(obj, dict):
            raise RemoteProtocolError(f"{what} is not a map", code="malformed")
        self.map = obj
        self.what = what

    def _get(self, key: str):
        if key not in self.map:
            raise RemoteProtocolError(f"{self.what} lacks field {key!r}", code="malformed")
        return self.map[key]

    def _bad(self, key: str, expected: str):
        return RemoteProtocolError(f"{self.what} field {key!r} must be {expected}", code="malformed")

    def int(self, key: str, low: int, high: int) -> int:
        value = self._get(key)
        if type(value) is not int or not low <= value <= high:
            raise self._bad(key, f"an integer in [{low}, {high}]")
        return value

    def bool(self, key: str) -> bool:
        value = self._get(key)
        if type(value) is not bool:
            raise self._bad(key, "a boolean")
        return value

    def bytes(self, key: str, *, length: int | None = None, max_len: int | None = None) -> bytes:
        value = self._get(key)
        if type(value) is not bytes:
            raise self._bad(key, "binary")
        if length is not None and len(value) != length:
            raise self._bad(key, f"exactly {length} bytes")
        if max_len is not None and len(value) > max_len:
            raise self._bad(key, f"at most {max_len} bytes")
        return value

    def str(self, key: str, *, max_len: int) -> str:
        value = self._get(key)
        if type(value) is not str or len(value) > max_len:
            raise self._bad(key, f"a string of at most {max_len} characters")
        return value

    def time(self, key: str) -> str:
        """An RFC 3339 UTC time as Dorothy writes it: 2026-11-29T06:40:00.123456Z."""
        value = self.str(key, max_len=32)
        if not _TIME.fullmatch(value):
            raise self._bad(key, "an RFC 3339 UTC time like 2026-11-29T06:40:00.123456Z")
        return value

    def list(self, key: str, *, max_len: int) -> list:
        value = self._get(key)
        if type(value) is not list or len(value) > max_len:
            raise self._bad(key, f"a list of at most {max_len} items")
        return value
