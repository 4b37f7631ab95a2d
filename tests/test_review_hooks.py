"""Review round 7: hooks, durable subscribers, metrics, retention and values, used adversarially.

Each test here failed before its fix: an async durable handler whose events were lost, a
transactional handler that ran its own subscriber again (PostgreSQL: waited for itself for
good), HookFailed without the failures of events the hooks' own commands queued, purged archived
sessions counted in ARCHIVED for good, keep_last ranking archived sessions by their archive, a
hook name that broke every Prometheus scrape, and dict/list subclasses refused. Two guard the
fixes' edges and passed before too: keep_last's population per run, and isolate mode's one log
record per failure.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict, defaultdict, namedtuple
from datetime import timedelta
from typing import Any

import pytest
from _helpers import Backend, Cli
from sqlalchemy.engine import make_url

from sessionledger import (
    InvalidArgument,
    RetentionPolicy,
    SessionConfig,
    SessionEngine,
    SessionEvent,
    SessionStatus,
    StorageError,
    SubscriberFailed,
)
from sessionledger.projections.hooks import HookFailed


def test_an_async_durable_handler_is_refused(engine: SessionEngine) -> None:
    async def mailer(event: SessionEvent) -> None:  # calling it runs nothing
        raise AssertionError("never awaited")

    class AsyncCallable:
        async def __call__(self, event: SessionEvent) -> None:
            raise AssertionError("never awaited")

    for handler in (mailer, AsyncCallable()):
        with pytest.raises(InvalidArgument, match="async subscribers are not supported"):
            engine.subscribe("mailer", handler)
    assert "mailer" not in {s.name for s in engine.subscribers()}


def _lock_timeout(backend: Backend) -> str:
    """The backend's URL, with a lock timeout on PostgreSQL: a wait for itself fails the test
    after 10 s instead of hanging it."""
    if backend.pg_schema is None:
        return backend.url
    options = f"-csearch_path={backend.pg_schema} -clock_timeout=10s"
    return make_url(backend.url).update_query_dict({"options": options}).render_as_string(
        hide_password=False)


def test_a_transactional_handler_running_its_own_subscriber_is_refused(
    backend: Backend,
) -> None:
    with SessionEngine(_lock_timeout(backend)) as engine:
        engine.create("x")
        nested: list[BaseException] = []

        def handler(event: SessionEvent, connection: Any) -> None:
            try:
                engine.run_subscribers(until_idle=True)
            except StorageError as error:
                nested.append(error)
                raise

        engine.subscribe("nested", handler, transactional=True)
        with pytest.raises(SubscriberFailed):
            engine.run_subscribers(until_idle=True)
        assert nested and "would wait for itself" in str(nested[0])
        # nothing moved: the batch rolled back, and the subscriber runs once the handler
        # stops calling back
        status = {s.name: s for s in engine.subscribers()}["nested"]
        assert status.position == 0 and status.lag == 1


def test_hook_failed_lists_the_failures_of_queued_events_too() -> None:
    config = SessionConfig(hook_errors="raise", lifecycle_hooks=False)
    with SessionEngine("sqlite://", config) as engine:
        sid = engine.create("s")

        def strict(event: SessionEvent) -> None:
            if event.type == "StateChanged":
                if event.data["set"].get("n") == 1:
                    engine.update(event.session_id, {"n": 2})  # queued behind this delivery
                raise RuntimeError(f"failed on {event.version}")

        engine.hooks.subscribe(strict)
        with pytest.raises(HookFailed) as raised:
            engine.update(sid, {"n": 1})
        failures = raised.value.failures
        assert [event.version for _, event, _ in failures] == [2, 3]
        assert engine.hooks.errors == 2
        assert isinstance(raised.value.__cause__, RuntimeError)
        assert str(raised.value.__cause__) == "failed on 2"
        assert "and 1 more hook failure" in str(raised.value)


def test_a_purged_archived_session_leaves_the_archived_count(engine: SessionEngine) -> None:
    ids = [engine.create(f"s{i}") for i in range(3)]
    for sid in ids:
        engine.end(sid, outcome="completed")
        engine.archive(sid)
    assert engine.metrics()["sessions"]["ARCHIVED"] == 3
    report = engine.cleanup(RetentionPolicy(max_age=0, purge=True))
    assert sorted(report.session_ids) == sorted(ids)
    figures = engine.metrics()["sessions"]
    assert figures["ARCHIVED"] == 0 and sum(figures.values()) == 0
    assert 'sessionledger_sessions{status="ARCHIVED"} 0.0' in engine.metrics(format="prometheus")


def test_keep_last_keeps_the_sessions_that_ended_last_in_a_purge_run(
    engine: SessionEngine,
) -> None:
    ids = [engine.create(f"s{i}") for i in range(5)]
    for sid in ids:
        engine.end(sid, outcome="completed")
    archived = engine.cleanup(RetentionPolicy(keep_last=2))
    assert sorted(archived.session_ids) == sorted(ids[:3])
    # archived later than s3 and s4 ended: they still ended first
    purged = engine.cleanup(RetentionPolicy(keep_last=2, purge=True))
    assert sorted(purged.session_ids) == sorted(ids[:3])
    assert [engine.get(sid).status for sid in ids[3:]] == [SessionStatus.COMPLETED] * 2


def test_keep_last_counts_the_run_s_own_population(engine: SessionEngine) -> None:
    ids = [engine.create(f"s{i}") for i in range(4)]
    for sid in ids:
        engine.end(sid, outcome="failed")
    engine.archive(ids[3])  # the one that ended last is archived already
    # an archive run judges unarchived ended sessions: the newest two of those stay
    run = engine.cleanup(RetentionPolicy(keep_last=2, dry_run=True))
    assert run.session_ids == [ids[0]]
    # a purge run judges archived ones too
    run = engine.cleanup(RetentionPolicy(keep_last=2, purge=True, dry_run=True))
    assert sorted(run.session_ids) == sorted(ids[:2])
    # more to keep than there are: nothing to do, and keep_last=0 keeps none
    assert engine.cleanup(RetentionPolicy(keep_last=10, purge=True)).session_ids == []
    run = engine.cleanup(RetentionPolicy(keep_last=0, purge=True, dry_run=True))
    assert sorted(run.session_ids) == sorted(ids)


def test_a_hook_name_that_would_break_prometheus_is_refused(memory_engine: SessionEngine) -> None:
    for name in ("audit-\udcff", " ", "x\x00y", "n" * 300):
        with pytest.raises(InvalidArgument, match="hook name"):
            memory_engine.hooks.subscribe(lambda event: None, name=name)
    memory_engine.hooks.subscribe(lambda event: None, name="audit-é")
    memory_engine.create("s")
    assert 'hook="audit-é"' in memory_engine.metrics(format="prometheus")


def test_dict_list_tuple_and_bytes_subclasses_are_stored_as_their_base_type(
    engine: SessionEngine,
) -> None:
    Point = namedtuple("Point", "x y")

    class Steps(list[int]):
        def __iter__(self) -> Any:  # not what is stored: the list's own items are
            return iter([0])

    class Blob(bytes):
        def __bytes__(self) -> bytes:
            return b"not this"

    state = {"ordered": OrderedDict(b=1, a=2), "default": defaultdict(list, k=[1]),
             "point": Point(1, 2), "steps": Steps([1, 2]), "blob": Blob(b"raw")}
    expected = {"ordered": {"b": 1, "a": 2}, "default": {"k": [1]}, "point": [1, 2],
                "steps": [1, 2], "blob": b"raw"}
    sid = engine.create("s", state=state)
    engine.update(sid, OrderedDict(more=OrderedDict(x=[Point(3, 4)])))
    expected["more"] = {"x": [[3, 4]]}
    held = engine.get(sid).state
    assert held == expected and type(held["ordered"]) is dict and type(held["blob"]) is bytes
    assert engine.get(sid, refresh=True).state == expected
    assert engine.verify(sid).ok


def test_a_failed_hook_is_still_logged_once_in_isolate_mode(
    memory_engine: SessionEngine, caplog: pytest.LogCaptureFixture,
) -> None:
    # (the merge of raise-mode failures must not change isolate mode: one record per failure)
    def failing(event: SessionEvent) -> None:
        raise RuntimeError("boom")

    memory_engine.hooks.subscribe(failing, events=["StateChanged"])
    sid = memory_engine.create("s")
    with caplog.at_level(logging.ERROR):
        memory_engine.update(sid, {"a": 1})
    assert sum("boom" in r.getMessage() or "boom" in str(r.exc_info) for r in caplog.records) == 1


def test_stop_says_whether_the_runner_stopped(
    backend: Backend, caplog: pytest.LogCaptureFixture,
) -> None:
    import threading

    release = threading.Event()
    entered = threading.Event()
    with SessionEngine(backend.url) as engine:
        def blocking(event: SessionEvent) -> None:
            entered.set()
            release.wait(10)

        engine.subscribe("slow", blocking)
        engine.create("s")
        runner = engine.run_subscribers()
        assert entered.wait(10)
        with caplog.at_level(logging.WARNING, logger="sessionledger.subscribers"):
            assert runner.stop(timeout=0.1) is False
        assert any("did not stop" in r.getMessage() for r in caplog.records)
        release.set()
        assert runner.stop(timeout=10) is True and not runner.running


def test_verify_from_an_unguarded_script_stays_in_one_process(tmp_path: Any) -> None:
    import subprocess
    import sys
    import textwrap

    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import sessionledger.engine
        from sessionledger import SessionEngine
        sessionledger.engine._PARALLEL_VERIFY_FROM = 0  # any log is "big"
        engine = SessionEngine("sqlite:///app.db")
        engine.create("made-by-app")  # the script's own work: once
        print("ok" if engine.verify().ok else "problems")
        engine.close()
    """))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    assert "RuntimeError" not in done.stderr
    with SessionEngine(f"sqlite:///{tmp_path / 'app.db'}") as engine:
        assert len(engine.list_sessions()) == 1


def test_spawn_reruns_main_tells_scripts_from_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    from sessionledger.parallel_verify import spawn_reruns_main

    def main_module(file: str | None, spec_name: str | None) -> types.ModuleType:
        module = types.ModuleType("__main__")
        if file is not None:
            module.__file__ = file
        module.__spec__ = (None if spec_name is None
                           else types.SimpleNamespace(name=spec_name))  # type: ignore[assignment]
        return module

    for file, spec_name, reruns in (("/x/app.py", None, True), ("/x/tool.py", "tool", True),
                                    ("/x/pkg/__main__.py", "pkg.__main__", False),
                                    (None, None, False)):
        monkeypatch.setitem(sys.modules, "__main__", main_module(file, spec_name))
        assert spawn_reruns_main() is reruns, (file, spec_name)


def test_verify_workers_are_bounded(memory_engine: SessionEngine) -> None:
    for workers in (0, 65, 2**70, 2.0, True):
        with pytest.raises(InvalidArgument, match="workers must be an int from 1 to 64"):
            memory_engine.verify(workers=workers)


def test_cli_verify_takes_workers(cli: Cli, backend: Backend) -> None:
    with SessionEngine(backend.url) as engine:
        for i in range(3):
            engine.update(engine.create(f"s{i}"), {"i": i})
    assert cli.ok("verify", "--workers", "2").startswith("checked 3 sessions, 6 events")
    cli.fails("verify", "--workers", "0", match="--workers")
    cli.fails("verify", "--workers", "65", match="--workers")


# -- review round 7, docs and inputs --------------------------------------------------------


def test_tags_are_bounded_so_the_catalog_row_always_holds_them(engine: SessionEngine) -> None:
    with pytest.raises(InvalidArgument, match="at most 64 tags"):
        engine.create("many", tags=[f"t{i}" for i in range(65)])
    with pytest.raises(InvalidArgument, match="characters together, at most 2048"):
        engine.create("long", tags=["x" * 253 + f"{i:03d}" for i in range(40)])
    # the most there can be, every character one JSON escapes: the catalog holds them all
    worst = [(('"' if i % 2 else "\\") * 31) + f"{i:01x}"[-1] for i in range(64)]
    worst = [f"{i:02d}" + tag[2:] for i, tag in enumerate(worst)]
    assert len(set(worst)) == 64 and sum(map(len, worst)) == 2048
    assert len(json.dumps(worst, ensure_ascii=False)) <= 8192  # a catalog made before the bound
    sid = engine.create("worst", tags=worst)
    engine.create("after")
    found = {summary.id: summary for summary in engine.find(limit=10)}
    assert found[sid].tags == worst
    assert [s.id for s in engine.find(tags=[worst[5], worst[63]])] == [sid]
    assert engine.verify().ok


def test_find_checks_a_single_tag_and_bounds_the_filters(engine: SessionEngine) -> None:
    engine.create("s", tags=["a"])
    for bad in ("x\x00y", "", "a\udcff", "t" * 300):
        with pytest.raises(InvalidArgument, match="tag"):
            engine.find(tags=bad)
        with pytest.raises(InvalidArgument, match="tag"):
            engine.find(tags=[bad])
    with pytest.raises(InvalidArgument, match="at most 64 tags"):
        engine.find(tags=[f"t{i}" for i in range(65)])
    assert len(engine.find(tags="a")) == 1
    # duplicates collapse: one clause, not 70,000
    assert len(engine.find(status=["ACTIVE"] * 70_000, tags=["a"] * 1000)) == 1


def test_a_cursor_or_a_stored_count_of_thousands_of_digits_is_refused_clearly(
    engine: SessionEngine, tmp_path: Any,
) -> None:
    import sqlite3

    from sessionledger.cli import main

    engine.create("s")
    with pytest.raises(InvalidArgument, match="invalid cursor"):
        engine.find(cursor="9" * 5000 + ".x")
    assert main(["ls", "--cursor", "9" * 5000, "--url", "sqlite://"]) == 1

    path = tmp_path / "meta.db"
    with SessionEngine(f"sqlite:///{path}") as damaged:
        damaged.create("x")
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE sl_meta SET value = ? WHERE key = 'schema_version'", ("9" * 5000,))
    with pytest.raises(StorageError, match="not a schema version"):
        SessionEngine(f"sqlite:///{path}")


def test_empty_type_filters_and_non_bool_flags_are_refused(engine: SessionEngine) -> None:
    sid = engine.create("s")
    for call in (lambda: engine.history(sid, types=[]), lambda: list(engine.timeline(types=[]))):
        with pytest.raises(InvalidArgument, match="types is an empty list"):
            call()
    with pytest.raises(InvalidArgument, match="events is an empty list"):
        engine.subscribe("none", lambda event: None, events=[])
    with pytest.raises(InvalidArgument, match="events is an empty list"):
        engine.hooks.subscribe(lambda event: None, events=[])
    with pytest.raises(InvalidArgument, match="unknown event type 'Nope'"):
        engine.subscribe("nope", lambda event: None, events=["Nope"])
    with pytest.raises(InvalidArgument, match="not a single str"):
        engine.subscribe("one", lambda event: None, events="SessionEnded")
    assert [e.type for e in engine.history(sid, types="SessionStarted")] == ["SessionStarted"]
    with pytest.raises(InvalidArgument, match="refresh must be a bool"):
        engine.get(sid, refresh="no")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="until_idle must be a bool"):
        engine.run_subscribers(until_idle="no")  # type: ignore[call-overload]


def test_find_with_many_tags_matches_sessions_holding_all_of_them(engine: SessionEngine) -> None:
    tags = [f"t{i}" for i in range(10)]
    every = engine.create("every", tags=tags)
    half = engine.create("half", tags=tags[:5])
    more = engine.create("more", tags=[*tags, "x"])
    engine.create("none", tags=["x"])
    engine.end(more, outcome="failed")

    def ids(**filters: Any) -> set[str]:
        found: set[str] = set()
        cursor = None
        while True:  # a page of one at a time: the cursor walks the grouped clause too
            page = engine.find(limit=1, cursor=cursor, **filters)
            found.update(summary.id for summary in page)
            cursor = page.next_cursor
            if cursor is None:
                return found

    assert ids(tags=tags) == {every, more}
    assert ids(tags=tags[:5]) == {every, half, more}  # five: one grouped clause
    assert ids(tags=tags[:4]) == {every, half, more}  # four: a clause each
    assert ids(tags=[*tags[:5], "x"]) == {more}
    assert ids(tags=tags, status="ACTIVE") == {every}
    assert ids(tags=[*tags, "missing"]) == set()


def test_find_time_bounds_are_strict(engine: SessionEngine) -> None:
    sid = engine.create("s")
    moment = engine.find()[0].updated_at
    assert [s.id for s in engine.find(updated_after=moment)] == []
    assert [s.id for s in engine.find(updated_before=moment)] == []
    later = moment + timedelta(microseconds=1)
    earlier = moment - timedelta(microseconds=1)
    assert [s.id for s in engine.find(updated_after=earlier, updated_before=later)] == [sid]
