"""Review round 5: the issues' names as written, and the CLI doing what the README says.

Each test here failed before its fix: `verify(sid=...)` (the audit issue's spelling), the
timeline table's times, the rebuild progress bar's first window, the `ls` next-page hint, usage
errors and a closed in-memory engine.
"""

from __future__ import annotations

import shlex
from datetime import datetime, timedelta

import pytest
from _helpers import Cli

from sessionledger import InvalidArgument, RetentionPolicy, SessionEngine, StorageError
from sessionledger.cli import ProgressBar, main


def test_verify_takes_the_session_as_sid(engine: SessionEngine) -> None:
    sid = engine.create("a")
    engine.update(sid, {"x": 1})
    report = engine.verify(sid=sid)
    assert report.ok and (report.sessions, report.events) == (1, 2)
    with pytest.raises(InvalidArgument, match="not both"):
        engine.verify(sid, sid=sid)


def test_typed_user_code_runs(engine: SessionEngine) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent / "typed_usage" / "public_api.py"
    spec = importlib.util.spec_from_file_location("typed_usage_public_api", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.exercise(engine, True, "prometheus")
    history, version, timeline, found = results[:4]
    assert len(history) == 2 and version == 2 and len(timeline) >= 2 and len(found) >= 1
    assert isinstance(results[5], str) and "events_total" in results[5]


def test_blame_entries_and_problems_answer_to_the_issues_words(engine: SessionEngine) -> None:
    sid = engine.create("a", actor="alice")
    engine.update(sid, {"x": 1}, actor="bob")
    (entry,) = engine.blame(sid, "x")
    assert entry.time == entry.timestamp and entry.actor == "bob"
    (touch,) = engine.diff(sid, 1, 2).added["x"].changes
    assert touch.time == touch.timestamp
    engine.update(sid, {"x": 2})
    engine._store._db.execute(  # a changed byte in version 2's payload
        engine._store._sql.adapt("UPDATE sl_events SET payload = ? WHERE session_id = ? "
                                 "AND version = 2"), (b"\x00\x02\x80", sid))
    if engine._store.dialect == "postgresql":
        engine._store._db.commit()
    (problem,) = engine.verify().problems
    assert (problem.session, problem.session_id, problem.version) == (sid, sid, 2)


def test_timeline_table_prints_whole_times_that_name_their_event(cli: Cli, url: str) -> None:
    with SessionEngine(url) as engine:
        first = engine.create("a")
        engine.update(first, {"x": 1})
        engine.update(first, {"x": 2})
        stored = [e.timestamp for e in engine.history(first)]
    lines = cli.ok("timeline").splitlines()[1:]
    assert len(lines) == 3
    times = [line.split()[1] for line in lines]
    assert [datetime.fromisoformat(t) for t in times] == stored
    # a time copied from the table names its event
    since = cli.ok("timeline", "--since", times[2]).splitlines()[1:]
    assert len(since) == 1 and since[0].split()[4] == "3"


def test_rebuild_progress_counts_the_first_window(engine: SessionEngine) -> None:
    sid = engine.create("a")
    for i in range(20):
        engine.update(sid, {"i": i})
    engine.run_subscribers(until_idle=True)
    calls: list[tuple[int, int]] = []
    engine.rebuild("catalog", progress=lambda done, head, rate: calls.append((done, head)))
    assert calls[0] == (0, 21) and calls[-1] == (21, 21)

    class Out:
        text = ""

        def write(self, s: str) -> None:
            self.text += s

        def flush(self) -> None:
            pass

    out = Out()
    bar = ProgressBar(out, enabled=True)
    for done, head in calls:
        bar.update(done, head, 1000.0)
    assert "100.0%" in out.text.split("\r")[-1]


def test_ls_next_page_hint_keeps_database_and_filters(cli: Cli, url: str) -> None:
    with SessionEngine(url) as engine:
        # (a value starting with "-" must not read as an option when the hint is run)
        tagged = [engine.create("-x", tags=["-keep"]) for i in range(3)]
        engine.create("other")
        engine.create("-x")
        engine.run_subscribers(until_idle=True)
    out = cli.ok("ls", "--tag=-keep", "--name=-x", "--limit", "2")
    hint = out.splitlines()[-1]
    assert hint.startswith("more: ")
    argv = shlex.split(hint.removeprefix("more: "))
    assert argv[:2] == ["sessionledger", "ls"] and f"--url={url}" in argv
    assert "--tag=-keep" in argv and "--name=-x" in argv
    rest = cli.ok(*argv[1:]).splitlines()
    listed = [line.split()[0] for line in rest[2:]]
    assert listed == [tagged[0]]  # the last of the three, no untagged session


def test_url_and_json_before_or_after_the_verb(cli: Cli, url: str, tmp_path: object) -> None:
    with SessionEngine(url) as engine:
        sid = engine.create("here")
        engine.run_subscribers(until_idle=True)
    other = f"sqlite:///{tmp_path}/other.db"
    assert sid in cli.ok("--url", url, "ls")
    assert sid in cli.ok("--url", other, "ls", "--url", url)  # the later wins
    assert sid not in cli.ok("--url", url, "ls", "--url", other)
    assert cli.ok("--json", "--url", url, "subscribers", "run", "--until-idle").startswith("{")


@pytest.mark.parametrize("argv", [
    ["verify", "--no-such-flag", "2"],
    ["--url", "sqlite://", "no-verb"],
    [],
    ["show"],
    ["snapshots"],
    ["no-such-verb"],
    ["ls", "--limit"],
])
def test_usage_errors_are_one_line_and_exit_1(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("sessionledger: error: ")
    assert "--help" in err


@pytest.mark.parametrize("use", [
    lambda e: e.find(),
    lambda e: e.run_subscribers(until_idle=True),
    lambda e: e.rebuild("catalog"),
    lambda e: e.save_all_active(),
    lambda e: e.restore_recent(1),
    lambda e: e.cleanup(RetentionPolicy(max_age=timedelta(0))),
])
def test_closed_memory_engine_says_it_is_closed(use: object) -> None:
    engine = SessionEngine("sqlite://")
    engine.create("a")
    engine.close()
    with pytest.raises(StorageError, match="closed"):
        use(engine)  # type: ignore[operator]
