"""`sessionledger demo`: several sessions through their whole lifecycle, printed as they go."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

from sessionledger.domain.errors import InvalidTransition

from .engine import SessionEngine
from .verify import VerifyReport


@dataclass(frozen=True)
class DemoResult:
    """What the demo did: its sessions, the commands it ran, how long they took, verify()."""

    session_ids: list[str]
    commands: int
    seconds: float
    report: VerifyReport


def run_demo(engine: SessionEngine, say: Callable[[str], object] = print) -> DemoResult:
    """Run the scenario on `engine`, telling `say` what happened, and return what it did."""
    say(f"sessionledger demo on {engine.url}\n")
    # an in-process hook: every committed lifecycle event, after its commit
    seen: list[str] = []
    engine.hooks.subscribe(lambda event: seen.append(event.type),
                           events=["SessionStarted", "SessionEnded", "SessionArchived"])
    started = time.perf_counter()
    commands = 0

    # 1. An LLM agent run: tool calls, a checkpoint, a bad branch rolled back, a save, the end.
    agent = engine.create(
        "research-run", tags=["agent", "demo"], metadata={"model": "demo-model-1"},
        state={"step": 0, "findings": []}, actor="alice",
    )
    say(f"agent run {agent} started by alice")
    engine.record(agent, "tool_call", {"tool": "search", "q": "event sourcing"}, actor="agent")
    engine.update(agent, {"step": 1, "findings": ["append-only logs"]}, actor="agent")
    v = engine.checkpoint(agent, "before-merge", actor="agent")
    say(f"  checkpoint 'before-merge' at version {v}")
    engine.update(agent, {"step": 2, "findings": ["a hallucinated fact"]}, actor="agent")
    say(f"  state went wrong: {engine.get(agent).state}")
    v = engine.restore(agent, checkpoint="before-merge", actor="alice")
    say(f"  restored to 'before-merge' (now version {v}): {engine.get(agent).state}")
    engine.update(agent, {"step": 3, "cost_usd": Decimal("0.0042")}, actor="agent")
    engine.save(agent, actor="agent")
    v = engine.end(agent, outcome="completed", actor="agent")
    commands += 8
    say(f"  completed at version {v}")

    # 2. A workflow with a child session: suspended while waiting, resumed, failed, archived.
    workflow = engine.create("invoice-approval", tags=["workflow"], state={"invoice": 1042},
                             actor="scheduler")
    child = engine.create("fetch-invoice", parent=workflow, state={"attempt": 1},
                          actor="scheduler")
    engine.end(child, outcome="completed", actor="worker-7")
    engine.suspend(workflow, reason="waiting for manager approval", actor="scheduler")
    say(f"\nworkflow {workflow} suspended (child {child} completed)")
    engine.resume(workflow, actor="manager")
    engine.update(workflow, {"approved": False}, actor="manager")
    engine.end(workflow, outcome="failed", actor="scheduler")
    v = engine.archive(workflow, actor="janitor")
    commands += 8
    say(f"  failed, then archived at version {v}")

    # 3. A user's working session that is cancelled; what the engine refuses, and retries.
    user = engine.create("alice-notebook", tags=["user"], state={"cells": 3}, actor="alice")
    engine.update(user, {"cells": 4}, actor="alice", idempotency_key="cell-4")
    again = engine.update(user, {"cells": 4}, actor="alice", idempotency_key="cell-4")
    engine.end(user, outcome="cancelled", actor="alice")
    commands += 4
    say(f"\nuser session {user}: a retried command (same idempotency key) wrote nothing, "
        f"returned version {again}")
    try:
        engine.update(user, {"cells": 5}, actor="alice")
    except InvalidTransition as refused:
        say(f"  refused as it should be: {refused}")

    elapsed = time.perf_counter() - started
    say(f"\n{commands} commands in {elapsed * 1000:.1f} ms "
        f"({engine.config.durability} durability)\n")
    say(f"{'SESSION':38} {'NAME':18} {'STATUS':10} VERSION")
    for sid in (agent, workflow, child, user):
        s = engine.get(sid)
        say(f"{s.id:38} {s.name:18} {s.status.value:10} {s.version}")
    say(f"\nhistory of {agent}:")
    for event in engine.history(agent):
        say(f"  v{event.version:<3} {event.type:17} {event.actor or '-':6} {event.data}")

    # audit: any past state, what changed, who did it
    before = engine.state_at(agent, version=4)
    say(f"\naudit: state at version 4 was {before.state}")
    changes = engine.diff(agent, 4, engine.get(agent).version)
    for key, change in {**changes.added, **changes.changed}.items():
        who = ", ".join(f"v{t.version} {t.actor}" for t in change.changes)
        say(f"  {key}: {change.old!r} -> {change.new!r} ({who})")
    for entry in engine.blame(agent, "step"):
        say(f"  blame step: v{entry.version} by {entry.actor}: {entry.value!r}")

    # the catalog read model, a batch save, integrity
    ended = engine.find(status=["completed", "failed", "cancelled", "archived"], limit=1000)
    say(f"\ncatalog: {len(ended)} ended sessions in this database; "
        f"agent runs: {len(engine.find(tags=['agent'], limit=1000))}")
    report = engine.verify()
    say(f"verify: {report.sessions} sessions, {report.events} events, {report.snapshots} "
        f"snapshots checked: {'ok' if report.ok else report.problems}")
    say(f"hooks saw {len(seen)} lifecycle events; metrics: "
        f"{engine.metrics()['events_total']}")
    say("\nread it again: sessionledger ls, sessionledger show ID [--at N], sessionledger "
        "history ID, sessionledger diff ID A B, sessionledger blame ID KEY, sessionledger "
        "verify")
    return DemoResult([agent, workflow, child, user], commands, elapsed, report)
