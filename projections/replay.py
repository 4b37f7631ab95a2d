"""Replay: stored events folded into a Session through the aggregate's own apply functions."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from sessionledger.domain.errors import CorruptedData
from sessionledger.domain.events import EVENT_SCHEMAS, upcast
from sessionledger.domain.session import Session

#: decodes a stored payload: (payload, session_id, version) -> (schema version, data)
PayloadDecoder = Callable[[bytes, str, int], tuple[int, Any]]


def event_data(
    decode: PayloadDecoder, session_id: str, version: int, event_type: str, payload: bytes
) -> dict[str, Any]:
    """The data of one stored event in the current schema of its type (upcast if older)."""
    schema, data = decode(payload, session_id, version)
    current = EVENT_SCHEMAS.get(event_type)
    if current is None:
        raise CorruptedData(session_id, version, f"unknown event type {event_type!r}")
    if schema != current:
        if schema > current:
            raise CorruptedData(
                session_id, version,
                f"{event_type} schema {schema} is newer than this release reads ({current})",
            )
        data = upcast(event_type, schema, data)
    if type(data) is not dict:
        raise CorruptedData(session_id, version, f"{event_type} data is not a map")
    return data


def replay(
    session: Session,
    rows: Iterable[tuple[int, str, int, bytes, bytes]],
    decode: PayloadDecoder,
) -> bytes | None:
    """Apply stored rows (version, type, ts, payload, digest) that follow `session.version`.

    Returns the digest of the last row applied (None when there was none). A gap in versions, an
    unknown type or a schema newer than this release is damage and raises CorruptedData.
    """
    apply = session.apply
    session_id = session.id
    expected = session.version + 1
    digest = None
    for version, event_type, micros, payload, row_digest in rows:
        if version != expected:
            raise CorruptedData(session_id, expected, f"event version {expected} is missing")
        data = event_data(decode, session_id, version, event_type, payload)
        try:
            apply(event_type, data, version, micros)
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise CorruptedData(
                session_id, version, f"{event_type} data has the wrong shape ({error!r})"
            ) from None
        expected += 1
        digest = row_digest
    return digest
