"""Less common uses of an engine found by review: close() with a background runner, an
interrupt out of a hook, two engines rebuilding the catalog at once."""

from __future__ import annotations

import time

import pytest
from conftest import EngineFactory

from sessionledger import SessionEngine, SessionEvent, StorageError


def test_close_stops_the_background_runner(engine_factory: EngineFactory) -> None:
    engine, other = engine_factory(), engine_factory()
    seen: list[int] = []
    engine.subscribe("counter", lambda event: seen.append(event.position))
    runner = engine.run_subscribers()
    other.create("before")
    deadline = time.monotonic() + 10
    while not seen and time.monotonic() < deadline:
        time.sleep(0.02)
    assert seen, "the runner delivered nothing"
    engine.close()
    assert not runner.running
    delivered = len(seen)
    other.create("after")  # nobody runs this engine's subscribers any more
    time.sleep(0.3)
    assert len(seen) == delivered and not runner.errors
    with pytest.raises(StorageError, match="closed"):
        list(engine.timeline())
    with pytest.raises(StorageError, match="closed"):
        engine.run_subscribers()


def test_an_interrupt_out_of_a_hook_does_not_leak_into_the_next_command(
    engine_factory: EngineFactory,
) -> None:
    engine = engine_factory(lifecycle_hooks=False)
    child = engine.create("child")
    parent = engine.create("parent")
    seen: list[tuple[str, int]] = []

    def hook(event: SessionEvent) -> None:
        seen.append((event.session_id, event.version))
        if event.session_id == parent and event.version == 2:
            engine.update(child, {"from": "hook"})  # queued behind this delivery
            raise KeyboardInterrupt

    engine.hooks.subscribe(hook)
    with pytest.raises(KeyboardInterrupt):
        engine.update(parent, {"x": 1})
    assert engine.get(child).version == 2  # the hook's command committed
    seen.clear()
    engine.update(parent, {"x": 2}, actor="next")
    assert seen == [(parent, 3)], "the interrupted delivery's queue reached this command"


def test_two_engines_rebuilding_the_catalog_at_once(engine_factory: EngineFactory) -> None:
    """The second engine swaps its rebuilt tables in while the first is half way: the first
    returns 0 (the catalog was rebuilt), not an error about a missing table."""
    first, second = engine_factory(), engine_factory()
    ids = [first.create(f"s{i}", tags=["t"]) for i in range(12)]
    first._catalog._rebuild_runner.batch_size = 4  # several batches
    swapped: list[int] = []

    def progress(done: int, head: int, rate: float) -> None:
        if not swapped:
            swapped.append(second.rebuild("catalog"))

    assert first.rebuild("catalog", progress=progress) == 0
    assert swapped == [8]  # it went on from where the first had got to (4 of 12)
    for engine in (first, second, engine_factory()):
        assert sorted(s.id for s in engine.find(tags=["t"])) == sorted(ids)
    assert first.rebuild("catalog") == 12  # and the next rebuild runs as usual


def test_a_closed_engine_refuses_every_read(engine_factory: EngineFactory) -> None:
    engine: SessionEngine = engine_factory()
    sid = engine.create("s")
    engine.close()
    for read in (lambda: engine.get(sid), lambda: engine.history(sid), engine.find,
                 lambda: list(engine.timeline()), engine.verify):
        with pytest.raises(StorageError, match="closed"):
            read()
