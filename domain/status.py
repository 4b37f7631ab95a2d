"""The session status machine."""

from __future__ import annotations

from enum import Enum


class SessionStatus(str, Enum):
    """Where a session is in its life."""

    ACTIVE = "ACTIVE"
    SUSPENDED = "SUSPENDED"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    ARCHIVED = "ARCHIVED"

    @property
    def is_ended(self) -> bool:
        """True for COMPLETED, FAILED and CANCELLED (not ARCHIVED)."""
        return self in ENDED

    def __str__(self) -> str:
        return self.value


ENDED = frozenset({SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.CANCELLED})

#: outcome argument of end() -> status it leads to
OUTCOMES = {
    "completed": SessionStatus.COMPLETED,
    "failed": SessionStatus.FAILED,
    "cancelled": SessionStatus.CANCELLED,
}
