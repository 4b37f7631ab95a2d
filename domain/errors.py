"""Errors of sessionledger. Every error the library raises on purpose is a SessionLedgerError."""

from __future__ import annotations


class SessionLedgerError(Exception):
    """Base class of every error sessionledger raises on purpose."""

    def __reduce__(self) -> tuple[object, ...]:
        # pickled as its message and attributes, not by calling __init__ again with the
        # message as the first argument (each subclass's __init__ takes its own fields): a
        # worker process's error reaches the caller as itself, not as a BrokenProcessPool
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls: type[SessionLedgerError], args: tuple[object, ...],
             state: dict[str, object]) -> SessionLedgerError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class InvalidArgument(SessionLedgerError, ValueError):
    """An argument is out of range or of the wrong kind (a name, label, option or config value)."""


class InvalidSessionId(InvalidArgument):
    """A session id string that is not a UUID."""

    def __init__(self, value: object) -> None:
        super().__init__(f"invalid session id {value!r}: expected a UUID string")
        self.value = value


class SessionNotFound(SessionLedgerError, LookupError):
    """No session with this id exists in the store."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id} not found")
        self.session_id = session_id


class SessionPurged(SessionNotFound):
    """The session was purged by a retention cleanup: only its tombstone is left."""

    def __init__(self, session_id: str, name: str, final_status: str, purged_at: str) -> None:
        LookupError.__init__(
            self, f"session {session_id} ({name!r}, {final_status}) was purged at {purged_at}"
        )
        self.session_id = session_id
        self.name = name
        self.final_status = final_status
        self.purged_at = purged_at


class InvalidTransition(SessionLedgerError):
    """The operation is not allowed in the session's current status."""

    def __init__(self, session_id: str, status: str, operation: str) -> None:
        super().__init__(f"cannot {operation} session {session_id}: it is {status}")
        self.session_id = session_id
        self.status = status
        self.operation = operation


class CheckpointNotFound(SessionLedgerError, LookupError):
    """A checkpoint label, save point or version to restore to does not exist."""

    def __init__(self, session_id: str, what: str) -> None:
        super().__init__(f"session {session_id} has no {what}")
        self.session_id = session_id
        self.what = what


class ConcurrencyConflict(SessionLedgerError):
    """Another writer changed the session first and the command was not applied."""

    def __init__(self, session_id: str, expected_version: int, detail: str = "") -> None:
        message = (
            f"session {session_id} was changed by another writer "
            f"(expected version {expected_version})"
        )
        super().__init__(message + (f": {detail}" if detail else ""))
        self.session_id = session_id
        self.expected_version = expected_version


class UnsupportedValue(InvalidArgument, TypeError):
    """A value the event encoding cannot carry; raised before anything is written."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"unsupported value at {path}: {reason}")
        self.path = path
        self.reason = reason


class EventTooLarge(InvalidArgument):
    """An encoded event is larger than SessionConfig.max_event_bytes."""

    def __init__(self, session_id: str, event_type: str, size: int, limit: int) -> None:
        super().__init__(
            f"{event_type} of session {session_id} encodes to {size} bytes, "
            f"above max_event_bytes={limit}"
        )
        self.size = size
        self.limit = limit


class StorageError(SessionLedgerError):
    """The database cannot be reached, opened or used (bad URL, refused connection, not a db)."""


class CorruptedData(SessionLedgerError):
    """Stored bytes that do not decode: the store was damaged or written by something else."""

    def __init__(self, session_id: str, version: int | None, detail: str) -> None:
        where = f"session {session_id}" + (f" version {version}" if version is not None else "")
        super().__init__(f"corrupted data in {where}: {detail}")
        self.session_id = session_id
        self.version = version


class SnapshotCorrupted(CorruptedData):
    """A stored snapshot that does not decompress, decode or match its digest."""


class SnapshotVersionError(SessionLedgerError):
    """A snapshot written in a format newer than this release reads."""

    def __init__(self, session_id: str, version: int, format_version: int, readable: int) -> None:
        super().__init__(
            f"snapshot format {format_version} of session {session_id} is newer than this "
            f"release reads (up to {readable}): upgrade sessionledger or rebuild snapshots "
            f"(snapshot at version {version})"
        )
        self.session_id = session_id
        self.version = version
        self.format_version = format_version
