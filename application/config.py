"""SessionConfig: the engine's settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import blake3

from sessionledger.domain.errors import InvalidArgument
from sessionledger.domain.values import checked_flag, utf8_encodable
from sessionledger.infrastructure.store import DURABILITY_PRAGMAS
from sessionledger.projections.hooks import ON_ERROR_MODES

# tuples: `in` on a tuple also answers for an unhashable value (a list given by mistake)
_DURABILITY = tuple(DURABILITY_PRAGMAS)
_HOOK_ERRORS = tuple(sorted(ON_ERROR_MODES))


@dataclass(frozen=True)
class SessionConfig:
    """Settings of a SessionEngine. Every field has a safe default.

    durability: "full" (default; on SQLite every commit survives power loss: synchronous=FULL)
        or "normal" (synchronous=NORMAL in WAL mode: a power cut may lose the last commits,
        never corrupt the database). PostgreSQL keeps its own settings.
    max_active_sessions: size of the working set of loaded sessions (an LRU); 0 disables it.
    retries: how many times a command that lost a race to another writer re-reads the session
        and applies again before it raises ConcurrencyConflict (commands given
        expected_version= never retry).
    max_event_bytes: the largest encoded event accepted (EventTooLarge above it).
    compress_threshold: event payloads larger than this many bytes are lz4-compressed when
        that makes them smaller.
    integrity_key: a secret (str or bytes) that keys the blake3 hash chain of each session.
    snapshot_every: a snapshot every this many events (0: only on save() and checkpoint(),
        which always write one).
    strict_snapshots: raise SnapshotVersionError / SnapshotCorrupted for a snapshot this
        release cannot use, instead of skipping it (with a warning) and loading from events.
    hook_errors: "isolate" (default: a failing in-process hook is logged and counted, the
        others still run) or "raise" (HookFailed reaches the caller after every hook ran; the
        command's data is committed either way).
    lifecycle_hooks: register the built-in LoggingHook and MetricsHook at construction.
    auto_rebuild: rebuild a read model (the catalog) at start-up when its stored version is
        not the code's; when False, queries of it raise ProjectionOutdated until
        `engine.rebuild("catalog")` ran.
    """

    durability: str = "full"
    max_active_sessions: int = 1000
    retries: int = 3
    max_event_bytes: int = 1024 * 1024
    compress_threshold: int = 1024
    # never in repr(): a config in a log line or a traceback must not give the key away
    integrity_key: str | bytes | None = field(default=None, repr=False)
    snapshot_every: int = 100
    strict_snapshots: bool = False
    hook_errors: str = "isolate"
    lifecycle_hooks: bool = True
    auto_rebuild: bool = True

    def __post_init__(self) -> None:
        if self.durability not in _DURABILITY:
            raise InvalidArgument(
                f"durability must be one of {', '.join(_DURABILITY)}, got {self.durability!r}"
            )
        if self.hook_errors not in _HOOK_ERRORS:
            raise InvalidArgument(
                f"hook_errors must be one of {', '.join(_HOOK_ERRORS)}, got {self.hook_errors!r}"
            )
        for name in ("max_active_sessions", "retries", "snapshot_every", "compress_threshold"):
            value = getattr(self, name)
            if type(value) is not int or value < 0:
                raise InvalidArgument(f"{name} must be an int >= 0, got {value!r}")
        if type(self.max_event_bytes) is not int or self.max_event_bytes < 64:
            raise InvalidArgument(f"max_event_bytes must be an int >= 64, got "
                                  f"{self.max_event_bytes!r}")
        for name in ("strict_snapshots", "lifecycle_hooks", "auto_rebuild"):
            checked_flag(getattr(self, name), name)
        if self.integrity_key is not None and (
            not isinstance(self.integrity_key, str | bytes) or not self.integrity_key
        ):
            raise InvalidArgument("integrity_key must be a non-empty str or bytes")
        # the key is its UTF-8 bytes
        if isinstance(self.integrity_key, str) and not utf8_encodable(self.integrity_key):
            raise InvalidArgument("integrity_key must be valid Unicode (it holds a lone surrogate)")

    def chain_key(self) -> bytes | None:
        """The 32-byte blake3 key derived from integrity_key (None when unset)."""
        if self.integrity_key is None:
            return None
        secret = self.integrity_key
        material = secret.encode() if isinstance(secret, str) else secret
        key: bytes = blake3.blake3(
            material, derive_key_context="sessionledger 2026 event chain key"
        ).digest()
        return key
