"""Cost of in-process hooks per delivered event: python -m benchmarks.hooks_bench

Dispatches N pre-built events through a HookRegistry with:

- no subscribers (the baseline: the loop and the dispatch call alone),
- one no-op hook (target: at most 2 µs per event above the baseline),
- the built-in LoggingHook (its logger has only a NullHandler, propagate False, level INFO)
  and MetricsHook, with the registry's latency and error observers wired to the MetricsHook
  as the engine wires them (target: at most 10 µs per event above the baseline),
- each built-in hook alone, for the breakdown (no target).

By default each event is dispatched in its own call, as the engine does for a transaction that
writes one event (the common case, and the dearest per event); ``--batch`` dispatches several
events per call. The cases run interleaved, in rotating order, with the garbage collector paused,
for several rounds; the figures are medians over rounds, and "over baseline" is the median of
the per-round differences, so drift on a noisy machine touches every case alike.

``measure()`` returns the rows for the main benchmark.
"""

from __future__ import annotations

import argparse
import gc
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sessionledger.domain.events import SessionEvent
from sessionledger.projections.hooks import HookRegistry, LoggingHook
from sessionledger.projections.metrics import MetricsHook

#: case -> limit in µs above the baseline (None: shown for the breakdown only)
TARGETS: dict[str, float | None] = {
    "no subscribers (baseline)": None,
    "one no-op hook": 2.0,
    "LoggingHook + MetricsHook": 10.0,
    "LoggingHook alone": None,
    "MetricsHook alone": None,
}

#: the life of one benchmark session: (event type, data)
_LIFE: list[tuple[str, dict[str, Any]]] = [
    ("SessionStarted", {"name": "bench", "tags": [], "metadata": {}, "parent": None,
                        "state": {"step": 0}}),
    *[("StateChanged", {"set": {"step": i}, "delete": []}) for i in range(1, 6)],
    ("EventRecorded", {"kind": "tool_call", "payload": {"tool": "search"}}),
    ("CheckpointTaken", {"label": "cp"}),
    ("SessionSaved", {}),
    ("SessionSuspended", {"reason": None}),
    ("SessionResumed", {}),
    ("SessionEnded", {"outcome": "completed"}),
    ("SessionArchived", {}),
]


def build_events(n: int) -> list[SessionEvent]:
    """N events of whole session lifecycles (a realistic mix of types), in commit order."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    events: list[SessionEvent] = []
    while len(events) < n:
        sid = str(uuid.uuid4())
        for version, (event_type, data) in enumerate(_LIFE, start=1):
            position = len(events) + 1
            events.append(SessionEvent(
                session_id=sid, version=version, type=event_type,
                timestamp=start + timedelta(milliseconds=position), actor="bench",
                correlation_id=None, data=data, position=position, session_name="bench",
            ))
    return events[:n]


def _null_logger() -> logging.Logger:
    # a private logger configured as the issue states: NullHandler only, no propagation, INFO
    logger = logging.getLogger("sessionledger.bench.hooks_events")
    logger.handlers[:] = [logging.NullHandler()]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


def _registries() -> dict[str, HookRegistry]:
    def noop(event: SessionEvent) -> None:
        pass

    cases: dict[str, HookRegistry] = {}
    cases["no subscribers (baseline)"] = HookRegistry()
    cases["one no-op hook"] = HookRegistry()
    cases["one no-op hook"].subscribe(noop)
    for case, logging_hook, metrics_hook in (
        ("LoggingHook + MetricsHook", True, True),
        ("LoggingHook alone", True, False),
        ("MetricsHook alone", False, True),
    ):
        registry = HookRegistry()
        metrics = MetricsHook()
        registry.latency_observer = metrics.observe_latency
        registry.error_observer = metrics.observe_error
        if logging_hook:
            registry.subscribe(LoggingHook(_null_logger()), name="LoggingHook")
        if metrics_hook:
            registry.subscribe(metrics, name="MetricsHook")
        cases[case] = registry
    return cases


def _time_dispatch(dispatch: Callable[[Sequence[SessionEvent]], None],
                   batches: list[list[SessionEvent]]) -> int:
    clock = time.perf_counter_ns
    started = clock()
    for batch in batches:
        dispatch(batch)
    return clock() - started


def measure(n: int = 20000, rounds: int = 7, batch: int = 1) -> list[dict[str, Any]]:
    """Per-event cost of each case (µs): median over `rounds`, and its median excess over the
    baseline with its target. `batch` events go to each dispatch call."""
    if n < 1 or rounds < 1 or batch < 1:
        raise ValueError("n, rounds and batch must be positive")
    events = build_events(n)
    batches = [events[i:i + batch] for i in range(0, n, batch)]
    registries = _registries()
    names = list(registries)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    gc_was_enabled = gc.isenabled()
    try:
        for name in names:  # warm-up: caches, dict sizes, the logger's level cache
            _time_dispatch(registries[name].dispatch, batches[: max(1, len(batches) // 10)])
        gc.collect()
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                gc.disable()
                elapsed = _time_dispatch(registries[name].dispatch, batches)
                gc.enable()
                per_round[name].append(elapsed / n / 1000.0)
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
        else:  # pragma: no cover - the caller had paused the collector
            gc.disable()

    baseline = per_round[names[0]]
    rows: list[dict[str, Any]] = []
    for name in names:
        deltas = [a - b for a, b in zip(per_round[name], baseline, strict=True)]
        over = statistics.median(deltas)
        target = TARGETS[name]
        rows.append({
            "key": "hooks." + name.split(" (")[0].lower().replace(" + ", "+").replace(" ", "_"),
            "case": name,
            "per_event_us": round(statistics.median(per_round[name]), 3),
            "over_baseline_us": round(over, 3),
            "over_baseline_range_us": (round(min(deltas), 3), round(max(deltas), 3)),
            "target_us": target,
            "passed": None if target is None else over <= target,
            "n": n,
            "rounds": rounds,
            "batch": batch,
        })
    return rows


def render(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as a text table."""
    lines = [
        f"hook dispatch: {rows[0]['n']} events, {rows[0]['batch']} per dispatch call, "
        f"median of {rows[0]['rounds']} rounds",
        f"{'case':<28} {'µs/event':>9} {'over baseline':>14} {'(min..max)':>16}  target",
    ]
    for row in rows:
        low, high = row["over_baseline_range_us"]
        target = row["target_us"]
        verdict = "" if target is None else (
            f"≤ {target:g} µs  {'PASS' if row['passed'] else 'FAIL'}")
        lines.append(
            f"{row['case']:<28} {row['per_event_us']:>9.3f} {row['over_baseline_us']:>14.3f} "
            f"{f'({low:.3f}..{high:.3f})':>16}  {verdict}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: print the table; with --strict exit 1 when a target fails."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hooks_bench",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=20000, help="events per round (default 20000)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (default 7)")
    parser.add_argument("--batch", type=int, default=1,
                        help="events per dispatch call (default 1, as one-event transactions)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)
    rows = measure(args.n, args.rounds, args.batch)
    print(render(rows))
    failed = any(row["passed"] is False for row in rows)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
