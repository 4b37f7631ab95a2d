"""sessionledger: an event-sourced session engine.

Each session is an aggregate whose lifecycle (start, state changes, records, checkpoints,
saves, restores, suspend/resume, end, archive) is a stream of immutable events in SQLite
(default) or PostgreSQL::

    from sessionledger import SessionEngine

    with SessionEngine("sqlite:///sessions.db") as engine:
        sid = engine.create("research-run", state={"step": 0}, actor="alice")
        engine.update(sid, {"step": 1})
        print(engine.get(sid).state)
"""

from sessionledger.domain.errors import (
    CheckpointNotFound,
    ConcurrencyConflict,
    CorruptedData,
    EventTooLarge,
    InvalidArgument,
    InvalidSessionId,
    InvalidTransition,
    SessionLedgerError,
    SessionNotFound,
    SessionPurged,
    SnapshotCorrupted,
    SnapshotVersionError,
    StorageError,
    UnsupportedValue,
)
from sessionledger.domain.events import EVENT_TYPES, SessionEvent
from sessionledger.domain.session import Session
from sessionledger.domain.status import SessionStatus
from sessionledger.projections.audit import BlameEntry, Change, KeyTouch, StateDiff
from sessionledger.projections.catalog import SessionSummary
from sessionledger.projections.hooks import HookFailed, HookSubscription, LoggingHook
from sessionledger.projections.metrics import MetricsHook

from .catalog import Page, ProjectionOutdated
from .config import SessionConfig
from .engine import SessionEngine
from .retention import CleanupReport, RetentionPolicy
from .subscribers import SubscriberFailed, SubscriberStatus, SubscriberThread
from .verify import Problem, VerifyReport

__version__ = "0.1.0"

__all__ = [
    "EVENT_TYPES",
    "BlameEntry",
    "Change",
    "CheckpointNotFound",
    "CleanupReport",
    "ConcurrencyConflict",
    "CorruptedData",
    "EventTooLarge",
    "HookFailed",
    "HookSubscription",
    "InvalidArgument",
    "InvalidSessionId",
    "InvalidTransition",
    "KeyTouch",
    "LoggingHook",
    "MetricsHook",
    "Page",
    "Problem",
    "ProjectionOutdated",
    "RetentionPolicy",
    "Session",
    "SessionConfig",
    "SessionEngine",
    "SessionEvent",
    "SessionLedgerError",
    "SessionNotFound",
    "SessionPurged",
    "SessionStatus",
    "SessionSummary",
    "SnapshotCorrupted",
    "SnapshotVersionError",
    "StateDiff",
    "StorageError",
    "SubscriberFailed",
    "SubscriberStatus",
    "SubscriberThread",
    "UnsupportedValue",
    "VerifyReport",
    "__version__",
]
