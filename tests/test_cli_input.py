"""The `sessionledger` command on bad or unusual input: every refusal is one line
(`sessionledger: error: ...`, exit 1), never a traceback or a usage message.

Backend tests run on a SQLite file and on PostgreSQL. `--setup test_cli_input:...` names
functions of this module (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _helpers import Cli, strict_json
from conftest import EngineFactory

from sessionledger import SessionEngine, SessionEvent
from sessionledger.cli import main

BIG = "9" * 5000  # past int()'s 4,300 digits


# --setup targets

SEEN: list[int] = []


def record_positions(engine: SessionEngine) -> None:
    def handler(event: SessionEvent) -> None:
        SEEN.append(event.version)
    engine.subscribe("cli-input-test", handler)


def broken_setup(engine: SessionEngine) -> None:
    raise RuntimeError("boom in setup")


async def async_setup(engine: SessionEngine) -> None:
    record_positions(engine)


# 1. --url / --json before a nested verb


def test_options_before_subscribers_run(engine_factory: EngineFactory, cli: Cli, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where ./sessionledger.db would appear
    engine = engine_factory()
    sid = engine.create("s")
    engine.update(sid, {"a": 1})
    SEEN.clear()
    delivered = strict_json(cli.ok("subscribers", "--url", cli.url, "--json", "run",
                                   "--setup", "test_cli_input:record_positions",
                                   "--until-idle"))
    assert delivered["cli-input-test"] == 2 and SEEN == [1, 2]
    # given at both levels, the later one wins
    other = f"sqlite:///{tmp_path / 'other.db'}"
    out = cli.ok("subscribers", "--url", other, "run", "--url", cli.url, "--until-idle")
    assert "catalog:" in out
    assert not (tmp_path / "other.db").exists()
    assert not (tmp_path / "sessionledger.db").exists()
    assert [s["name"] for s in strict_json(cli.ok("subscribers", "--url", cli.url, "--json"))
            ] == ["catalog", "cli-input-test"]


# 2. demo --json


def test_demo_json(engine_factory: EngineFactory, cli: Cli) -> None:
    report = cli.json("demo")
    engine = engine_factory()
    names = {s["name"]: s for s in report["sessions"]}
    assert list(names) == ["research-run", "invoice-approval", "fetch-invoice", "alice-notebook"]
    assert [(s["status"], s["version"]) for s in report["sessions"]] == [
        ("COMPLETED", 9), ("ARCHIVED", 6), ("COMPLETED", 2), ("CANCELLED", 3)]
    assert names["fetch-invoice"]["parent"] == names["invoice-approval"]["id"]
    for s in report["sessions"]:
        session = engine.get(s["id"])
        assert (session.status.value, session.version) == (s["status"], s["version"])
    assert report["verify"] == {"ok": True, "sessions": 4, "events": 20,
                                "snapshots": report["verify"]["snapshots"], "problems": []}
    assert report["commands"] == 20 and report["events_total"]["SessionStarted"] == 4
    text = cli.ok("demo")  # the text is as it was
    assert text.startswith("sessionledger demo on ") and "\nverify: 8 sessions" in text


# 3. numbers


@pytest.mark.parametrize(("argv", "match"), [
    (["ls", "--limit", "0"], "--limit must be in 1..10000"),
    (["ls", "--limit", "10001"], "--limit must be in 1..10000"),
    (["ls", "--limit", BIG], "--limit must be in 1..10000"),
    (["ls", "--limit", "-1"], "--limit must be a whole number"),
    (["ls", "--limit", "\u00b2"], "--limit must be a whole number"),
    (["ls", "--limit", "\u0661\u0662"], "--limit must be a whole number"),
    (["ls", "--limit", "1_0"], "--limit must be a whole number"),
    (["timeline", "--limit", "-1"], "--limit must be a whole number"),
    (["timeline", "--limit", "\u0661"], "--limit must be a whole number"),
    (["cleanup", "--keep-last", "x"], "--keep-last must be a whole number"),
    (["cleanup", "--keep-last", "\u0661"], "--keep-last must be a whole number"),
    (["cleanup", "--keep-last", "+1"], "--keep-last must be a whole number"),
    (["cleanup", "--max-age", "nan"], "invalid --max-age 'nan'"),
    (["cleanup", "--max-age", "inf"], "invalid --max-age 'inf'"),
    (["cleanup", "--max-age=-inf"], "invalid --max-age"),
    (["cleanup", "--max-age=-1d"], "invalid --max-age"),
    (["cleanup", "--max-age", "1e400d"], "invalid --max-age '1e400d'"),
    (["cleanup", "--max-age", "\u0661\u0662d"], "invalid --max-age"),
    (["cleanup", "--max-age", "\u00b2h"], "invalid --max-age"),
    (["cleanup", "--max-age", "d"], "invalid --max-age"),
])
def test_bad_numbers_are_one_line(cli: Cli, argv: list[str], match: str) -> None:
    cli.fails(*argv, match=match)


def test_version_numbers(engine_factory: EngineFactory, cli: Cli) -> None:
    engine = engine_factory()
    sid = engine.create("s")
    engine.update(sid, {"a": 1})
    cli.fails("diff", sid, "1", "\u0662", match="B must be a version number")
    cli.fails("diff", sid, "+1", "2", match="A must be a version number")
    cli.fails("diff", sid, "1", BIG, match=f"B must be in 0..{sys.maxsize}")
    cli.fails("diff", sid, "1", "9999999999", match="0..2")
    cli.fails("show", sid, "--at", BIG, match="--at must be in")
    cli.fails("show", sid, "--at", "\u0661", match="ISO 8601")
    assert cli.json("show", sid, "--at", "0001")["version"] == 1


def test_huge_limits_mean_no_limit(engine_factory: EngineFactory, cli: Cli) -> None:
    engine = engine_factory()
    sid = engine.create("s")
    engine.update(sid, {"a": 1})
    engine.end(sid)
    for limit in ("99999999999999999999", BIG, str(sys.maxsize)):
        assert len(cli.json("timeline", "--limit", limit)) == 3
    for keep in ("99999999999999999999", BIG):
        out = cli.json("cleanup", "--keep-last", keep, "--dry-run")
        assert out["sessions"] == []
    # an age older than any session matches none; a small one matches the ended session
    assert cli.json("cleanup", "--max-age", "9" * 400 + "d", "--dry-run")["sessions"] == []
    assert cli.json("cleanup", "--max-age", "0.0s", "--dry-run")["sessions"] == [sid]


# 4. --setup functions that fail


def test_setup_failures_are_one_line(cli: Cli) -> None:
    cli.fails("subscribers", "run", "--setup", "os:getcwd", "--until-idle",
              match="--setup 'os:getcwd' failed: TypeError")
    cli.fails("subscribers", "run", "--setup", "test_cli_input:broken_setup", "--until-idle",
              match="RuntimeError: boom in setup")
    cli.fails("subscribers", "run", "--setup", "test_cli_input:async_setup", "--until-idle",
              match="'test_cli_input:async_setup' is async")
    cli.fails("subscribers", "run", "--setup", ".relative:f", "--until-idle",
              match="--setup '.relative:f'")


# 5. an empty --type list


def test_empty_type_list_is_refused(engine_factory: EngineFactory, cli: Cli) -> None:
    sid = engine_factory().create("s")
    cli.fails("history", sid, "--type", ",", match="--type names no event type: ','")
    cli.fails("history", sid, "--type", " , ", "--type", "", match="--type names no event")
    cli.fails("timeline", "--type", ",,", match="--type names no event type")
    assert [e["version"] for e in cli.json("history", sid, "--type", ",SessionStarted,")] == [1]


# 6. NaN and infinities in JSON


def test_json_has_no_bare_nan(engine_factory: EngineFactory, cli: Cli) -> None:
    engine = engine_factory()
    sid = engine.create("s", state={"nan": math.nan, "blob": b"\x00\xff"})
    engine.update(sid, {"inf": math.inf, "ninf": -math.inf, "list": [math.nan, 1.5]})
    state = cli.json("show", sid)["state"]
    assert state == {"nan": "NaN", "blob": "00ff", "inf": "Infinity", "ninf": "-Infinity",
                     "list": ["NaN", 1.5]}
    history = cli.json("history", sid)
    assert history[0]["data"]["state"]["nan"] == "NaN"
    assert history[1]["data"]["set"]["inf"] == "Infinity"
    assert [e["data"] for e in cli.json("timeline")] == [e["data"] for e in history]
    assert cli.json("diff", sid, "1", "2")["added"]["ninf"]["new"] == "-Infinity"
    assert [b["value"] for b in cli.json("blame", sid, "nan")] == ["NaN"]
    assert '"NaN"' in cli.ok("show", sid)


# 7. text the system could not decode (lone surrogates in argv)


@pytest.mark.parametrize(("argv", "name"), [
    (["ls", "--name", "\udcff"], "--name"),
    (["ls", "--tag", "ok", "--tag", "a\udcff"], "--tag"),
    (["ls", "--parent", "\udcff"], "--parent"),
    (["show", "\udcff"], "ID"),
    (["history", "00000000-0000-0000-0000-000000000000", "--actor", "\udcff"], "--actor"),
    (["blame", "00000000-0000-0000-0000-000000000000", "k\udcff"], "KEY"),
])
def test_undecodable_text_is_one_line(cli: Cli, argv: list[str], name: str) -> None:
    cli.fails(*argv, match=f"{name} ")
    cli.fails(*argv, match="is not valid text")


def test_undecodable_url_is_one_line(cli: Cli, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    cli.fails("ls", "--url", f"{tmp_path}/\udcff.db", match="--url ")
    cli.fails("ls", "--url", f"sqlite:///{tmp_path}/\udcff.db", match="is not valid text")
    monkeypatch.setenv("SESSIONLEDGER_URL", f"{tmp_path}/\udcff.db")
    monkeypatch.chdir(tmp_path)
    cli.capsys.readouterr()
    code = main(["ls"])
    out, err = cli.capsys.readouterr()
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith("sessionledger: error: $SESSIONLEDGER_URL "), err
    assert list(tmp_path.iterdir()) == []


def test_the_console_script_imports_a_setup_module_from_the_current_directory(
        tmp_path: Path) -> None:
    """`sessionledger subscribers run --setup mymodule:register`, run where mymodule.py is (the
    README's example): the console script, unlike `python -m`, does not put the current
    directory on sys.path, and the module was not found."""
    script = Path(sys.executable).parent / "sessionledger"
    assert script.exists()
    (tmp_path / "mymodule_for_setup.py").write_text(
        "def register(engine):\n"
        "    engine.subscribe('printer', lambda event: print('seen', event.version))\n")
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with SessionEngine(url) as engine:
        engine.create("s")
    done = subprocess.run(
        [str(script), "subscribers", "run", "--until-idle", "--setup",
         "mymodule_for_setup:register", "--url", url],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert done.returncode == 0, done.stderr
    assert "seen 1" in done.stdout
