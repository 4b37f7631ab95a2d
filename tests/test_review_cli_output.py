"""Review round 17 (packaging and CLI): the command's output where it cannot be written as is,
and database URLs whose text was read as something else.

Run as a real process (the console script, without PYTHONUNBUFFERED, as a user's shell has it):
output left in stdout's buffer was flushed at the interpreter's exit, outside the command's
error handling, so a reader gone (`| head`) ended it with status 120 and "Exception ignored"
(verify's status 2 lost), and a stdout that cannot encode a name ended it with a traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sessionledger import SessionEngine, StorageError

SCRIPT = Path(sys.executable).parent / "sessionledger"
NAME = "研究-ünïcödé-run"


def run(*args: str, stdout: int | None = subprocess.PIPE, **env: str
        ) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items()
                   if k not in ("PYTHONUNBUFFERED", "PYTHONIOENCODING")}
    environment.update(env)
    return subprocess.run([str(SCRIPT), *args], stdout=stdout, stderr=subprocess.PIPE,
                          encoding=env.get("PYTHONIOENCODING", "utf-8"), timeout=120,
                          env=environment)


def closed_pipe() -> int:
    """The write end of a pipe whose reader has already gone."""
    read, write = os.pipe()
    os.close(read)
    return write


@pytest.fixture
def tampered(tmp_path: Path) -> tuple[str, list[str]]:
    """A SQLite file of 40 sessions, one with a changed event."""
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    with SessionEngine(url) as engine:
        sids = [engine.create(f"{NAME}-{i}", state={"i": i}) for i in range(40)]
    import sqlite3

    db = sqlite3.connect(tmp_path / "db.sqlite")
    db.execute("UPDATE sl_events SET actor = 'mallory' WHERE session_id = ?", (sids[7],))
    db.commit()
    db.close()
    return url, sids


def test_verify_keeps_status_2_when_its_reader_is_gone(tampered: tuple[str, list[str]]) -> None:
    url, _ = tampered
    write = closed_pipe()
    try:
        done = run("verify", "--url", url, stdout=write)
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (2, "")


@pytest.mark.parametrize("verb", [["ls"], ["ls", "--json"], ["verify"]])
def test_a_command_whose_reader_is_gone_ends_quietly(
    tampered: tuple[str, list[str]], verb: list[str],
) -> None:
    url, _ = tampered
    write = closed_pipe()
    try:
        done = run(*verb, "--url", url, stdout=write)
    finally:
        os.close(write)
    assert "Exception ignored" not in done.stderr and "Traceback" not in done.stderr
    assert done.returncode == (2 if verb == ["verify"] else 0), done.stderr


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("verb", [["ls"], ["verify"]])
def test_output_to_a_full_disk_is_one_line(tampered: tuple[str, list[str]],
                                           verb: list[str]) -> None:
    url, _ = tampered
    with open("/dev/full", "w") as full:
        done = run(*verb, "--url", url, stdout=full.fileno())
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], done.stderr
    assert done.returncode == (2 if verb == ["verify"] else 1)


@pytest.mark.parametrize("encoding", ["cp1252", "ascii"])
def test_names_a_stdout_cannot_encode_print_escaped_and_json_stays_exact(
    tampered: tuple[str, list[str]], encoding: str,
) -> None:
    url, sids = tampered
    shown = run("show", sids[0], "--url", url, PYTHONIOENCODING=encoding)
    assert shown.returncode == 0 and "Traceback" not in shown.stderr, shown.stderr
    assert "\\u7814" in shown.stdout  # 研, backslash-escaped in the table
    for verb in (["show", sids[0]], ["history", sids[0]], ["timeline"], ["ls"]):
        done = run(*verb, "--json", "--url", url, PYTHONIOENCODING=encoding)
        assert done.returncode == 0, (verb, done.stderr)
        assert done.stdout.isascii()
        assert NAME in json.dumps(json.loads(done.stdout), ensure_ascii=False), verb


def test_a_bare_path_is_that_file_never_url_text(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("a%41.db", "q?x=1.db", "h#ash.db"):
        with SessionEngine(name) as engine:
            engine.create("s")
        assert (tmp_path / name).is_file(), name
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(("-wal", "-shm"))
                  ) == ["a%41.db", "h#ash.db", "q?x=1.db"]


def test_an_unencoded_at_in_a_password_shows_no_part_of_it() -> None:
    url = "postgresql+psycopg://postgres:p@ssPW@127.0.0.1:1/db"
    with pytest.raises(StorageError) as raised:
        SessionEngine(url)
    assert "ssPW" not in str(raised.value) and "%40" in str(raised.value)
    done = run("ls", "--url", url)
    assert done.returncode == 1 and "ssPW" not in done.stderr + done.stdout


def test_masked_url_text_hides_a_password_holding_an_at() -> None:
    from sessionledger.infrastructure.store import masked_url_text

    assert "ssPW" not in masked_url_text("postgresql://u:p@ssPW@host/db ?")


def test_a_missing_postgresql_driver_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg: ModuleNotFoundError
    with pytest.raises(StorageError, match=r"pip install 'sessionledger\[postgres\]'"):
        SessionEngine("postgresql+psycopg://postgres@127.0.0.1:1/db")


def test_version_prints_the_installed_release() -> None:
    from importlib.metadata import version

    import sessionledger

    done = run("--version")
    release = version("sessionledger")
    assert (done.returncode, done.stdout.strip()) == (0, f"sessionledger {release}")
    assert sessionledger.__version__ == version("sessionledger")


def test_a_misspelt_password_parameter_is_hidden_too() -> None:
    with pytest.raises(StorageError) as raised:
        SessionEngine("postgresql+psycopg://postgres@127.0.0.1:1/db?passwd=SECRET")
    assert "SECRET" not in str(raised.value) and "passwd=***" in str(raised.value)


@pytest.mark.parametrize("url", ["sqlite://host/file.db", "sqlite://u:pw@/f.db",
                                 "sqlite://:5/f.db"])
def test_a_sqlite_url_with_a_host_is_one_clear_line(url: str) -> None:
    done = run("ls", "--url", url)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "names no host or user" in done.stderr
    assert "pw" not in done.stderr


def test_cleanup_without_a_rule_names_the_options(tmp_path: Path) -> None:
    done = run("cleanup", "--url", str(tmp_path / "db.sqlite"))
    assert (done.returncode, done.stderr) == (
        1, "sessionledger: error: cleanup needs --max-age, --keep-last or both\n")


@pytest.mark.parametrize("url", [
    "postgresql://u:se/cret@host:bad/db", "postgresql://u:se?cret@host:bad/db",
    "postgresql://u:se#cret@127.0.0.1:bad/db", "postgresql://u:Sx@b/cret@127.0.0.1:5432/db",
    "postgresql://u:Sx@b:cret@127.0.0.1:5432/db",
])
def test_no_part_of_a_password_with_unencoded_characters_shows(url: str) -> None:
    """(Review 17, adversarial.) '/', '?' and '#' in a password stopped the mask, and an '@'
    followed by them slipped past the check for an '@' in the host."""
    with pytest.raises(StorageError) as raised:
        SessionEngine(url)
    assert "cret" not in str(raised.value), str(raised.value)


def test_a_file_colon_name_without_uri_is_a_plain_file(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for url in ("file:plain.db", "sqlite:///file:plain2.db"):
        with SessionEngine(url) as engine:
            engine.create("s")
    assert (tmp_path / "file:plain.db").is_file() and (tmp_path / "file:plain2.db").is_file()


@pytest.mark.parametrize("verb", [["ls"], ["verify"]])
def test_a_closed_stdout_keeps_the_decided_status(tampered: tuple[str, list[str]],
                                                  verb: list[str]) -> None:
    url, _ = tampered
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run(f"{SCRIPT} {verb[0]} --url {url} >&-", shell=True, text=True,
                          stderr=subprocess.PIPE, timeout=120, env=environment)
    assert (done.returncode, done.stderr) == (2 if verb == ["verify"] else 0, "")
