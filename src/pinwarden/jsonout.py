"""One JSON style for every ``--json`` document pinwarden prints.

* every document is an object whose first key is ``"schema": 1`` (:data:`SCHEMA`; bumped
  when a field changes meaning or goes away — added fields do not bump it), error objects
  included;
* CPU (and NUMA node) lists are kernel list strings, ``"0-3,8"`` (a :class:`CpuSet` value
  is written that way by itself); a single CPU stays a number;
* times are ISO 8601 strings in UTC with their offset, ``"2025-03-01T12:00:00.250+00:00"``
  (:func:`timestamp` for a Unix time; an aware :class:`~datetime.datetime` is written that
  way by itself; a naive one is refused);
* paths are strings.

Pure: :func:`dumps` returns the text, the CLI's ``print_json`` writes it.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

from pinwarden.cpuset import CpuSet

#: Version of the JSON documents' shape (the ``"schema"`` field of every document).
SCHEMA = 1


def timestamp(unix_time: float) -> str:
    """A Unix time as ISO 8601 in UTC, to the millisecond: ``2025-03-01T12:00:00.250+00:00``."""
    moment = dt.datetime.fromtimestamp(unix_time, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds")


def cpulist(cpus: CpuSet) -> str:
    """A CPU list as the kernel writes it (``0-3,8``; empty: ``""``)."""
    return str(cpus)


def _default(value: Any) -> Any:
    if isinstance(value, CpuSet):
        return cpulist(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise TypeError(f"naive datetime {value.isoformat()} in JSON output: give it a "
                            f"timezone")
        return value.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    if isinstance(value, PurePath):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def document(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` with ``"schema"`` as its first key."""
    if "schema" in data:
        raise ValueError("a JSON document's 'schema' field is set by pinwarden.jsonout")
    return {"schema": SCHEMA, **data}


def error_document(code: str, message: str) -> dict[str, Any]:
    """The object printed (with ``--json``) for a refusal or an error."""
    return document({"error": {"code": code, "message": message}})


def dumps(data: Mapping[str, Any]) -> str:
    """The document as pinwarden prints it: indented, ``schema`` first, keys as given."""
    return json.dumps(document(data), indent=2, sort_keys=False, default=_default)
