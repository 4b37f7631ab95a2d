"""Durable subscribers: named consumers of the global event order, tracked in the database.

Two delivery guarantees, chosen per subscriber:

- ``transactional=True``: the handler is called as ``handler(event, connection)`` inside the
  transaction that also moves the subscriber's tracked position. What it writes through that
  SQLAlchemy connection commits with the position, or neither does: **exactly once**.
- otherwise: ``handler(event)`` is called, and the position is recorded after each batch. A crash
  between the two delivers the events of that batch again: **at least once**; ``event.position``
  is unique and increasing, so a handler can deduplicate.

A failing handler stops its subscriber at the event before (at least once) or at the start of
its batch (exactly once: the batch rolls back); the error is raised by ``run_subscribers(
until_idle=True)`` and logged and retried by the background runner.
"""

from __future__ import annotations

import abc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy.engine import Connection

from sessionledger.domain.errors import SessionLedgerError
from sessionledger.domain.events import SessionEvent, checked_event_types, event_time
from sessionledger.domain.values import checked_text
from sessionledger.infrastructure.codec import PayloadCodec, blob
from sessionledger.infrastructure.subscriptions import FeedRow, SubscriptionStore, Waker
from sessionledger.projections.hooks import checked_plain_callable
from sessionledger.projections.replay import current_data

from .session_names import SessionNames

log = logging.getLogger("sessionledger.subscribers")
#: a failing subscriber on the background runner is retried after 1 s, then after twice the
#: pause before, up to a minute (a database that is down fails every subscriber at once)
_FIRST_RETRY = 1.0
_LAST_RETRY = 60.0

DEFAULT_BATCH = 1000
#: the largest batch run_subscribers() takes (a batch is held in memory whole)
MAX_BATCH = 1_000_000


class SubscriberFailed(SessionLedgerError):
    """A durable subscriber's handler raised; its position stays before the failed event."""

    def __init__(self, name: str, position: int, error: BaseException) -> None:
        super().__init__(
            f"subscriber {name!r} failed at position {position}: "
            f"{type(error).__name__}: {error}"
        )
        self.name = name
        self.position = position


class BatchConsumer(Protocol):
    """A named, tracked consumer the runner hands batches of decoded feed rows (a user's
    durable subscriber)."""

    name: str
    types: tuple[str, ...] | None
    transactional: bool

    def handle(self, rows: Sequence[FeedRow], conn: Connection | None) -> int:
        """Handle `rows` (in order); return how many were handled before any failure."""


class WindowConsumer(abc.ABC):
    """A named, tracked consumer that folds whole windows of positions in SQL, inside the
    transaction that moves its position: exactly once, and no row reaches Python unless it must
    (the catalog)."""

    name: str

    @abc.abstractmethod
    def handle_window(self, conn: Connection, after: int, upto: int) -> int:
        """Fold the events with positions in (after, upto]; return how many there were."""


#: what the runner drives
Consumer = BatchConsumer | WindowConsumer


def decode_feed_row(payloads: PayloadCodec, row: FeedRow, names: SessionNames) -> SessionEvent:
    """A feed row as the SessionEvent subscribers receive (data in the current schema, the
    session's name from `names`, prepared for the row's batch)."""
    position, sid, version, event_type, micros, actor, correlation, payload = row
    schema, raw = payloads.decode(blob(payload), sid, version)
    data = current_data(sid, version, event_type, schema, raw)
    return SessionEvent(sid, version, event_type, event_time(sid, version, micros), actor,
                        correlation, data, position, names.name(sid, event_type, data))


@dataclass
class HandlerSubscriber:
    """A user's handler behind the Consumer protocol."""

    name: str
    handler: Callable[..., Any]
    types: tuple[str, ...] | None
    transactional: bool
    payloads: PayloadCodec
    #: the names of the sessions its events belong to (SessionEvent.session_name)
    names: SessionNames

    def handle(self, rows: Sequence[FeedRow], conn: Connection | None) -> int:
        handled = 0
        transactional = self.transactional
        names = self.names
        names.prepare(rows)
        for row in rows:
            try:
                event = decode_feed_row(self.payloads, row, names)
                if transactional:
                    self.handler(event, conn)
                else:
                    self.handler(event)
            except Exception as error:
                raise _PartialBatch(handled, error) from error
            handled += 1
        names.trim()
        return handled


class _PartialBatch(Exception):
    """An at-least-once handler failed after `handled` events of its batch."""

    def __init__(self, handled: int, error: BaseException) -> None:
        super().__init__(handled, error)
        self.handled = handled
        self.error = error


def checked_subscription(
    name: object, handler: object, events: object
) -> tuple[str, tuple[str, ...] | None]:
    """Validated (name, event types) of a durable subscription."""
    text = checked_text(name, "subscriber name")
    checked_plain_callable(handler, f"handler of subscriber {text!r}",
                           "async subscribers are not supported")
    wanted = checked_event_types(events, "events")
    return text, None if wanted is None else tuple(sorted(wanted))


class SubscriberRunner:
    """Delivers pending events to consumers, in batches, tracking each consumer's position."""

    def __init__(self, subscriptions: SubscriptionStore, batch_size: int = DEFAULT_BATCH) -> None:
        self.subscriptions = subscriptions
        self.batch_size = batch_size

    def step(self, consumer: Consumer) -> int:
        """Deliver one batch to `consumer`; return how many events it handled (0: idle)."""
        subs = self.subscriptions
        name = consumer.name
        if isinstance(consumer, WindowConsumer):
            return self._step_window(consumer)
        if consumer.transactional:
            with subs.transaction(name, calls_back=True) as (conn, position):
                head = subs.head_in(conn)
                if head <= position:
                    return 0
                rows = subs.read(position, head, self.batch_size, consumer.types, conn)
                try:
                    consumer.handle(rows, conn)
                except _PartialBatch as partial:
                    # the whole batch rolls back: the position stays where it was
                    raise SubscriberFailed(
                        name, rows[partial.handled][0], partial.error
                    ) from partial.error
                # a filtered read that came back short has seen the whole window up to head
                done = rows[-1][0] if len(rows) == self.batch_size else head
                subs.advance(conn, name, done)
                return len(rows) if rows else 0
        # its handler running it again would deliver the batch under way again, and again (its
        # position moves only after the batch), until the recursion limit
        with subs.running_here(name, "its own handler is delivering a batch on this thread, "
                                     "which it would deliver again"):
            position = subs.position(name)
            head = subs.head()
            if head <= position:
                return 0
            rows = subs.read(position, head, self.batch_size, consumer.types)
            try:
                consumer.handle(rows, None)
            except _PartialBatch as partial:
                if partial.handled:
                    subs.advance_now(name, rows[partial.handled - 1][0])
                raise SubscriberFailed(
                    name, rows[partial.handled][0], partial.error
                ) from partial.error
            done = rows[-1][0] if len(rows) == self.batch_size else head
            subs.advance_now(name, done)
            return len(rows)

    def _step_window(self, consumer: WindowConsumer) -> int:
        """A consumer that folds whole position windows in SQL (the catalog): exactly once."""
        subs = self.subscriptions
        if subs.store.holds_write_lock_here() and subs.position(consumer.name) >= subs.head():
            # nothing to fold, seen without a transaction: find() from a transactional
            # handler on SQLite works while the catalog is current (a transaction here could
            # only be refused)
            return 0
        # no purge may commit between reading a window and writing its sessions' rows
        with subs.transaction(consumer.name, hold_off_purges=True) as (conn, position):
            head = subs.head_in(conn)
            if head <= position:
                return 0
            # positions are dense but for rolled-back or purged ones: a window of batch_size
            # positions holds at most batch_size events
            upto = min(head, position + self.batch_size)
            handled: int = consumer.handle_window(conn, position, upto)
            subs.advance(conn, consumer.name, upto)
            return max(handled, 1)

    def catch_up(self, consumer: Consumer, stop: Callable[[], bool] | None = None) -> int:
        """Deliver to `consumer` everything committed before this call; return how many events
        it handled. Events committed meanwhile may be delivered too, but are not waited for:
        with another process appending without pause, "up to the head" is never reached (on
        PostgreSQL, find() ran for as long as the writers did). `stop`, asked after each
        batch: True ends the catch-up there."""
        target = self.subscriptions.head()
        total = 0
        # behind first, with plain reads: a consumer already at the head opens no write
        # transaction (a read-only role's find() could not, and SQLite took its write lock)
        while self._behind(consumer, target):
            total += self.step(consumer)
            if stop is not None and stop():
                break
        return total

    def _behind(self, consumer: Consumer, target: int) -> bool:
        # below the head too: a purge can delete the events up to `target`
        head = min(target, self.subscriptions.head())
        return self.subscriptions.position(consumer.name) < head


#: how long a fork waits for a background runner to finish the round it is in
FORK_WAIT_SECONDS = 10.0
#: the same, for a fork from a thread that holds the runner's engine's command lock
HOOK_FORK_WAIT_SECONDS = 0.5
#: the background runners of this process whose threads run
_live_runners: weakref.WeakSet[SubscriberThread] = weakref.WeakSet()
#: the runners' in_round locks a fork under way holds
_held_for_fork: list[threading.RLock] = []
#: [the runners that fork gave up waiting for]
_not_paused = [0]


def _pause_runners_for_fork() -> None:
    """Before this process forks: wait until every background runner is between rounds (at
    most FORK_WAIT_SECONDS each). A fork in the middle of a round left the child a SQLite
    connection another thread was using: the child hung for good closing it (its mutex held
    by a thread that does not exist there), or, forked during a batch's transaction, found
    the database locked at every write.

    A runner whose engine's command lock the forking thread holds (a fork from a hook) is
    waited for HOOK_FORK_WAIT_SECONDS only: a round that reads finishes in that time, and
    one still running then waits for that lock (a transactional batch on SQLite, a handler
    calling the engine), outside SQLite, where the fork is safe. (Waited for in full, a fork
    from a hook took 10 s whenever the runner was in such a round.)"""
    for runner in list(_live_runners):
        held_here = runner.engine_lock_held_here()
        if runner.in_round.acquire(timeout=HOOK_FORK_WAIT_SECONDS if held_here
                                   else FORK_WAIT_SECONDS):
            _held_for_fork.append(runner.in_round)
        elif not held_here:
            _not_paused[0] += 1


def _resume_runners_after_fork() -> None:
    while _held_for_fork:
        _held_for_fork.pop().release()
    if _not_paused[0]:
        log.warning("the process forked while %d subscriber runner(s) still ran a round after "
                    "%.0f s: a SQLite child may hang or find the database locked (stop the "
                    "runners before forking)", _not_paused[0], FORK_WAIT_SECONDS)
        _not_paused[0] = 0


def _forget_runners_in_child() -> None:
    _not_paused[0] = 0  # (said in the parent)
    _resume_runners_after_fork()  # (this thread holds them in the child too)
    _live_runners.clear()  # their threads did not come along


os.register_at_fork(before=_pause_runners_for_fork, after_in_parent=_resume_runners_after_fork,
                    after_in_child=_forget_runners_in_child)


class SubscriberThread:
    """The background runner run_subscribers() starts: stop() ends it and waits."""

    def __init__(
        self, runner: SubscriberRunner, consumers: Callable[[], list[Consumer]],
        waker: Waker, max_wait: float = 1.0,
        engine_lock_held_here: Callable[[], bool] = lambda: False,
    ) -> None:
        self._runner = runner
        #: True when the calling thread holds the engine's command lock (see the fork gate)
        self.engine_lock_held_here = engine_lock_held_here
        self._consumers = consumers
        self._waker = waker
        self._max_wait = max_wait
        self._stopping = threading.Event()
        #: the last failure of each subscriber (it is retried after a pause)
        self.errors: dict[str, BaseException] = {}
        #: called on the runner's thread as it ends (engine.close() from one of its handlers)
        self.after_stop: Callable[[], None] | None = None
        #: held while the runner uses the database (a round over its subscribers), free while
        #: it waits: a fork of this process takes it first (see _pause_runners_for_fork)
        self.in_round = threading.RLock()
        self._thread = threading.Thread(target=self._run, name="sessionledger-subscribers",
                                        daemon=True)
        _live_runners.add(self)
        self._thread.start()

    def _run(self) -> None:
        retry_at: dict[str, float] = {}
        delays: dict[str, float] = {}
        try:
            while not self._stopping.is_set():
                consumers = self._consumers()  # (takes the engine's lock: outside the gate)
                with self.in_round:
                    busy = self._round(consumers, retry_at, delays)
                if not busy:
                    wait = self._max_wait
                    if retry_at:  # (PostgreSQL waits for a NOTIFY: not past a retry's time)
                        wait = min(wait, max(0.0, min(retry_at.values()) - time.monotonic()))
                    self._waker.wait(wait)
        finally:
            _live_runners.discard(self)
            with self.in_round:
                self._waker.close()
            if self.after_stop is not None:
                self.after_stop()

    def _round(self, consumers: list[Consumer], retry_at: dict[str, float],
               delays: dict[str, float]) -> bool:
        """One batch for each subscriber that is due; True when any handled events."""
        busy = False
        if retry_at:
            # a failed subscriber unsubscribed since: its past retry time made every
            # idle wait 0 s (a busy loop), and its error stayed listed
            current = {consumer.name for consumer in consumers}
            for gone in [name for name in retry_at if name not in current]:
                del retry_at[gone], delays[gone]
                self.errors.pop(gone, None)
        for consumer in consumers:
            name = consumer.name
            if self._stopping.is_set():  # (stopped by a handler of this batch)
                break
            if retry_at.get(name, 0.0) > time.monotonic():
                continue
            try:
                busy = self._runner.step(consumer) > 0 or busy
            except BaseException as error:  # keep the others running; retry this later
                # (a SystemExit, GeneratorExit or asyncio's CancelledError out of a
                # handler, too: they ended this thread silently, and every subscriber
                # with it; signals, Ctrl-C included, only reach the main thread)
                delays[name] = min(delays.get(name, _FIRST_RETRY / 2) * 2, _LAST_RETRY)
                retry_at[name] = time.monotonic() + delays[name]
                self._log_failure(name, error, delays[name])
                continue
            if self.errors.pop(name, None) is not None:
                retry_at.pop(name, None)
                delays.pop(name, None)
                log.info("subscriber %s recovered", name, extra={"subscriber": name})
        return busy

    def _log_failure(self, name: str, error: BaseException, delay: float) -> None:
        """One ERROR with the traceback for a new failure; a line without it while the same
        failure repeats (a stuck subscriber logged a traceback every second, for good)."""
        previous = self.errors.get(name)
        self.errors[name] = error
        again = (previous is not None and type(previous) is type(error)
                 and str(previous) == str(error))
        text = str(error) if isinstance(error, SubscriberFailed) else (
            f"subscriber {name!r} failed: {type(error).__name__}: {error}")
        position = getattr(error, "position", None)
        log.log(logging.WARNING if again else logging.ERROR,
                "%s%s (retried in %.0f s)", text, " again" if again else "", delay,
                exc_info=not again, extra={"subscriber": name, "position": position})

    @property
    def on_its_thread(self) -> bool:
        """True when called from the runner's own thread (from one of its handlers)."""
        return self._thread is threading.current_thread()

    @property
    def running(self) -> bool:
        """True until stop() (or a fatal error) ended the thread."""
        return self._thread.is_alive()

    def request_stop(self) -> None:
        """Ask the runner to stop after its current batch, without waiting for it."""
        self._stopping.set()

    def stop(self, timeout: float | None = 10.0) -> bool:
        """Ask the runner to stop after its current batch, and wait for it (at most `timeout`
        seconds; None: for as long as it takes). True when it has stopped; False when its
        batch still runs (a handler that blocks): that batch may still commit, and the runner
        stops after it. A warning is logged then."""
        self.request_stop()
        if self.on_its_thread:
            return False  # asked by its own handler: it stops once this batch has committed
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("the subscriber runner did not stop within %s s: a handler still runs, "
                        "and its batch may still commit", timeout)
            return False
        return True

    def __enter__(self) -> SubscriberThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@dataclass(frozen=True, slots=True)
class SubscriberStatus:
    """A durable subscriber's progress: its position and how many events it is behind."""

    name: str
    position: int
    lag: int
    registered: bool
