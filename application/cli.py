"""The `sessionledger` command: demo, ls, show, history, diff, timeline, blame, verify, rebuild,
snapshots, cleanup and subscribers (the audit verbs' parsing and printing are in cli_audit).

Every verb takes `--url` (default: $SESSIONLEDGER_URL, else ./sessionledger.db) and `--json`,
before or after the verb; a database written with an integrity key is read with the key in
$SESSIONLEDGER_INTEGRITY_KEY. Errors print one line and exit 1 (`verify` exits 2 when it finds a
problem); no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from sessionledger.domain.errors import InvalidArgument, SessionLedgerError
from sessionledger.domain.values import utf8_encodable
from sessionledger.infrastructure.store import resolve_url, safe_url
from sessionledger.projections.catalog import SessionSummary
from sessionledger.projections.snapshots import CURRENT_FORMAT

from .cli_audit import (
    OptionError,
    add_audit_verbs,
    add_history_options,
    add_show_options,
    count_option,
    history_filtered,
    jsonable,
    show_at,
    table,
    table_time,
    terminal_text,
)
from .config import SessionConfig
from .engine import SessionEngine
from .parallel_verify import MAX_WORKERS
from .retention import RetentionPolicy
from .verify import VerifyReport


def cmd_ls(engine: SessionEngine, args: argparse.Namespace) -> None:
    page = engine.find(status=args.status, tags=args.tag, name=args.name, parent=args.parent,
                       limit=args.limit, cursor=args.cursor)
    if args.json:
        print(json.dumps({"sessions": [jsonable(_summary_dict(s)) for s in page],
                          "next_cursor": page.next_cursor}, indent=2))
        return
    if not len(page):
        print(f"no sessions in {engine.url}")
        return
    print(table(
        ["ID", "NAME", "STATUS", "VERSION", "TAGS", "UPDATED"],
        [[s.id, s.name, s.status.value, s.version, ",".join(s.tags), table_time(s.updated_at)]
         for s in page],
    ))
    if page.next_cursor:
        print(f"more: {_next_page_command(args, page.next_cursor)}")


def _next_page_command(args: argparse.Namespace, cursor: str) -> str:
    """The `ls` command line of the next page: this one's database and filters, that cursor
    (run as printed, it lists what this listing would go on to)."""
    # --option=value: a value that starts with "-" (a name "-x") is not read as an option
    words = ["sessionledger", "ls"]
    if args.url is not None:  # else $SESSIONLEDGER_URL or ./sessionledger.db, as for this one
        # a password is never printed: the line then asks for the same --url
        url = resolve_url(args.url)
        words.append(f"--url={args.url}" if safe_url(url) == url.render_as_string(
            hide_password=False) else "--url=URL")
    words += [f"--status={status}" for status in args.status or ()]
    words += [f"--tag={tag}" for tag in args.tag or ()]
    if args.name is not None:
        words.append(f"--name={args.name}")
    if args.parent is not None:
        words.append(f"--parent={args.parent}")
    words += [f"--limit={args.limit}", f"--cursor={cursor}"]
    return shlex.join(words)


def _summary_dict(summary: SessionSummary) -> dict[str, Any]:
    return {
        "id": summary.id, "name": summary.name, "status": summary.status.value,
        "version": summary.version, "tags": summary.tags, "parent": summary.parent,
        "created_by": summary.created_by, "created_at": summary.created_at,
        "updated_at": summary.updated_at, "event_count": summary.event_count,
        "last_checkpoint": summary.last_checkpoint,
    }


def cmd_snapshots_rebuild(engine: SessionEngine, args: argparse.Namespace) -> None:
    written = engine.rebuild_snapshots()
    print(json.dumps({"snapshots_written": written}) if args.json
          else f"{written} snapshots written in format {CURRENT_FORMAT}")


_AGE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([dhms]?)")


def parse_age(text: str) -> float:
    """'30d', '12h', '15m', '45s' or plain seconds (ASCII digits, a decimal point), as seconds;
    OptionError otherwise (so no NaN, inf, sign or exponent). An age too long for a float is
    math.inf, which cleanup() takes to match no session."""
    match = _AGE.fullmatch(text.strip().lower())
    if match is None:
        raise OptionError(f"invalid --max-age {text!r}: use 30d, 12h, 15m, 45s or seconds")
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}
    return float(match[1]) * units[match[2]]


def cmd_cleanup(engine: SessionEngine, args: argparse.Namespace) -> None:
    if args.max_age is None and args.keep_last is None:
        raise InvalidArgument("cleanup needs --max-age, --keep-last or both")
    policy = RetentionPolicy(max_age=args.max_age, keep_last=args.keep_last,
                             purge=args.purge, dry_run=args.dry_run)
    report = engine.cleanup(policy)
    if args.json:
        print(json.dumps({"action": report.action, "dry_run": report.dry_run,
                          "sessions": report.session_ids}, indent=2))
        return
    verb = {"archive": "archived", "purge": "purged"}[report.action]
    if report.dry_run:
        print(f"dry run: would have {verb} {len(report)} sessions")
    else:
        print(f"{verb} {len(report)} sessions")
    for sid in report.session_ids:
        print(f"  {sid}")


def cmd_verify(engine: SessionEngine, args: argparse.Namespace) -> int:
    # the console script guards its entry point: its workers do not run it again
    workers = args.workers
    if workers is None and args.session_id is None:
        workers = engine._auto_verify_workers()
    report = engine.verify(args.session_id, workers=workers)
    # the status stands even if the output cannot be written (`verify | head` closes the pipe)
    args.decided_status = 0 if report.ok else 2
    if args.json:
        print(json.dumps(_verify_dict(report), indent=2))
    else:
        print(f"checked {report.sessions} sessions, {report.events} events, "
              f"{report.snapshots} snapshots: {'ok' if report.ok else 'PROBLEMS'}")
        for problem in report.problems:
            # (a tampered row is what verify is for: its session id may hold escape sequences)
            print(f"  {terminal_text(problem)}")
    return 0 if report.ok else 2


def _verify_dict(report: VerifyReport) -> dict[str, Any]:
    return {"ok": report.ok, "sessions": report.sessions, "events": report.events,
            "snapshots": report.snapshots,
            "problems": [{"session_id": p.session_id, "version": p.version, "what": p.what}
                         for p in report.problems]}


def cmd_rebuild(engine: SessionEngine, args: argparse.Namespace) -> None:
    started = time.perf_counter()
    bar = ProgressBar(sys.stderr, enabled=not args.json and sys.stderr.isatty())
    folded = engine.rebuild(args.projection, progress=bar.update)
    bar.close()
    elapsed = time.perf_counter() - started
    rate = folded / elapsed if elapsed > 0 else 0.0
    if args.json:
        print(json.dumps({"projection": args.projection, "events": folded,
                          "seconds": round(elapsed, 3)}))
    else:
        print(f"rebuilt {args.projection}: {folded} events in {elapsed:.2f} s "
              f"({rate:,.0f} events/s)")


class ProgressBar:
    """A one-line progress bar with events per second and time left (on a terminal only)."""

    def __init__(self, out: Any, enabled: bool, width: int = 30) -> None:
        self.out = out
        self.enabled = enabled
        self.width = width
        self.start: int | None = None

    def update(self, done: int, head: int, rate: float) -> None:
        if self.start is None:
            self.start = done
        if not self.enabled:
            return
        total = max(head - self.start, 1)
        fraction = min(max(done - self.start, 0) / total, 1.0)
        filled = int(fraction * self.width)
        left = (head - done) / rate if rate > 0 else 0.0
        self.out.write(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {fraction:6.1%} "
                       f"{rate:,.0f} events/s, {left:,.0f} s left ")
        self.out.flush()

    def close(self) -> None:
        if self.enabled:
            self.out.write("\n")
            self.out.flush()


def cmd_subscribers(engine: SessionEngine, args: argparse.Namespace) -> None:
    statuses = engine.subscribers()
    if args.json:
        print(json.dumps([{"name": s.name, "position": s.position, "lag": s.lag}
                          for s in statuses], indent=2))
        return
    print(table(["NAME", "POSITION", "LAG"], [[s.name, s.position, s.lag] for s in statuses]))


def cmd_subscribers_run(engine: SessionEngine, args: argparse.Namespace) -> None:
    for target in args.setup or ():
        run_setup(target, engine)
    if args.until_idle:
        delivered = engine.run_subscribers(until_idle=True)
        print(json.dumps(delivered) if args.json else
              ", ".join(f"{name}: {n} events" for name, n in delivered.items()))
        return
    names = ", ".join(s.name for s in engine.subscribers() if s.registered)
    print(f"running subscribers ({names}) on {engine.url}; Ctrl-C stops", file=sys.stderr)
    handle = engine.run_subscribers()
    # Ctrl-C ends this loop; closing the engine (main's `with`) stops the runner, once
    while handle.running:
        time.sleep(0.5)


def load_setup(target: str) -> Any:
    """The callable named by 'module:function' (it registers subscribers on the engine)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise InvalidArgument(f"--setup {target!r}: expected module:function")
    # the current directory first, as `python -m` and `celery -A` have it: the console script
    # puts only its own bin directory on sys.path, where the user's module is not
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
        setup = getattr(module, attribute)
    except Exception as error:  # importing runs the user's module: it may raise anything
        raise InvalidArgument(f"--setup {target!r}: {type(error).__name__}: {error}") from None
    if not callable(setup):
        raise InvalidArgument(f"--setup {target!r} is not callable")
    return setup


def run_setup(target: str, engine: SessionEngine) -> None:
    """Call the setup function named by 'module:function' with the engine; whatever it raises
    is one InvalidArgument naming the function (it is the user's code, not sessionledger's)."""
    setup = load_setup(target)
    try:
        result = setup(engine)
    except Exception as error:
        raise InvalidArgument(f"--setup {target!r} failed: {type(error).__name__}: "
                              f"{error}") from None
    if inspect.isawaitable(result):  # an async function: nothing it would do has run
        getattr(result, "close", lambda: None)()
        raise InvalidArgument(f"--setup {target!r} is async: expected a plain "
                              f"function(engine)")


def cmd_demo(engine: SessionEngine, args: argparse.Namespace) -> None:
    from .demo import run_demo

    if not args.json:
        run_demo(engine)
        return
    result = run_demo(engine, say=lambda _line: None)
    sessions = [engine.get(sid) for sid in result.session_ids]
    print(json.dumps(jsonable({
        "url": engine.url, "durability": engine.config.durability,
        "commands": result.commands, "seconds": round(result.seconds, 3),
        "sessions": [{"id": s.id, "name": s.name, "status": s.status.value,
                      "version": s.version, "parent": s.parent, "tags": s.tags}
                     for s in sessions],
        "verify": _verify_dict(result.report),
        "events_total": engine.metrics().get("events_total"),
    }), indent=2))


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 1, like any other bad input
    (argparse's own exit 2 is what `verify` means by "problems found")."""

    def error(self, message: str) -> NoReturn:
        raise OptionError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    # --url and --json before the verb or after it (the later wins): the defaults live on the
    # top parser only, since argparse would copy a verb's defaults over what came before it
    parser = _Parser(
        prog="sessionledger", description="An event-sourced session engine.",
        epilog=f"A database written with an integrity key is read with the key in ${KEY_VARIABLE}.",
        parents=[_common_options(url=None, as_json=False)],
    )
    from sessionledger import __version__

    parser.add_argument("--version", action="version", version=f"sessionledger {__version__}")
    common = _common_options(url=argparse.SUPPRESS, as_json=argparse.SUPPRESS)
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    demo = verbs.add_parser("demo", parents=[common],
                            help="run a realistic scenario and print what happened")
    demo.set_defaults(run=cmd_demo)
    ls = verbs.add_parser("ls", parents=[common],
                          help="list sessions from the catalog, most recently updated first")
    ls.add_argument("--status", action="append", help="ACTIVE, SUSPENDED, ... (repeatable)")
    ls.add_argument("--tag", action="append", help="sessions with this tag (repeatable: all)")
    ls.add_argument("--name", help="exact session name")
    ls.add_argument("--parent", metavar="ID", help="children of this session")
    ls.add_argument("--limit", type=count_option("--limit", least=1, most=10_000), default=100,
                    metavar="N", help="sessions per page, 1..10000 (default 100)")
    ls.add_argument("--cursor", help="the next page (printed after a full page)")
    ls.set_defaults(run=cmd_ls)
    show = verbs.add_parser("show", parents=[common], help="show one session")
    show.add_argument("session_id", metavar="ID")
    history = verbs.add_parser("history", parents=[common], help="list a session's events")
    history.add_argument("session_id", metavar="ID")
    add_show_options(show)
    show.set_defaults(run=show_at)
    add_history_options(history)
    history.set_defaults(run=history_filtered)
    add_audit_verbs(verbs, common)

    snapshots = verbs.add_parser("snapshots", parents=[common], help="snapshot maintenance")
    snapshot_verbs = snapshots.add_subparsers(dest="snapshots_verb", required=True,
                                              metavar="VERB")
    rebuild_snapshots = snapshot_verbs.add_parser(
        "rebuild", parents=[common], help="rewrite every session's snapshots in this format")
    rebuild_snapshots.set_defaults(run=cmd_snapshots_rebuild)

    cleanup = verbs.add_parser("cleanup", parents=[common],
                               help="archive (or purge) ended sessions by age and count")
    cleanup.add_argument("--max-age", type=parse_age, metavar="AGE",
                         help="last event older than this: 30d, 12h, 15m, 45s")
    cleanup.add_argument("--keep-last", type=count_option("--keep-last", clamp=True),
                         metavar="N", help="always keep the N sessions that ended last")
    cleanup.add_argument("--purge", action="store_true",
                         help="delete events and snapshots for good (a tombstone stays) "
                              "instead of archiving")
    cleanup.add_argument("--dry-run", action="store_true", help="list, touch nothing")
    cleanup.set_defaults(run=cmd_cleanup)

    verify = verbs.add_parser("verify", parents=[common],
                              help="check hash chains and snapshots; exit 2 on a problem")
    verify.add_argument("session_id", metavar="ID", nargs="?", help="one session (default all)")
    verify.add_argument("--workers", metavar="N",
                        type=count_option("--workers", least=1, most=MAX_WORKERS),
                        help="processes to check the log with (default: up to 4 for a log of "
                             "more than 200,000 events)")
    verify.set_defaults(run=cmd_verify)

    rebuild = verbs.add_parser("rebuild", parents=[common],
                               help="rebuild a read model from the whole log")
    rebuild.add_argument("projection", choices=["catalog"])
    rebuild.set_defaults(run=cmd_rebuild)

    subscribers = verbs.add_parser("subscribers", parents=[common],
                                   help="list durable subscribers with position and lag")
    subscribers.set_defaults(run=cmd_subscribers)
    subscriber_verbs = subscribers.add_subparsers(dest="subscribers_verb", metavar="VERB")
    run = subscriber_verbs.add_parser(
        "run", parents=[common], help="run the durable subscribers in this process")
    run.add_argument("--setup", action="append", metavar="MODULE:FUNCTION",
                     help="a function(engine) that registers subscribers (repeatable)")
    run.add_argument("--until-idle", action="store_true",
                     help="deliver what is pending and exit")
    run.set_defaults(run=cmd_subscribers_run)
    return parser


def _common_options(url: str | None, as_json: bool | str) -> _Parser:
    """A parent parser with --url and --json, with these defaults (argparse.SUPPRESS: none)."""
    parser = _Parser(add_help=False)
    parser.add_argument(
        "--url", default=url,
        help="database URL (sqlite:///FILE, postgresql+psycopg://...); "
             "default $SESSIONLEDGER_URL, else ./sessionledger.db",
    )
    parser.add_argument("--json", action="store_true", default=as_json,
                        help="print JSON for machines")
    return parser


def _argument_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each argument's dest -> how the command line spells it (--type, ID), in every verb."""
    names: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for verb in action.choices.values():
                names.update(_argument_names(verb))
        elif action.option_strings:
            names[action.dest] = action.option_strings[-1]
        else:
            names[action.dest] = action.metavar if isinstance(action.metavar, str) else action.dest
    return names


#: the environment variable that holds the integrity key of a keyed database
KEY_VARIABLE = "SESSIONLEDGER_INTEGRITY_KEY"


def check_text(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """InvalidArgument naming the option for text that is not valid Unicode: bytes the system
    could not decode come in argv as lone surrogates, which no database driver can take."""
    names = _argument_names(parser)
    given = [(names.get(dest, dest), value) for dest, value in vars(args).items()]
    if args.url is None:
        given.append(("$SESSIONLEDGER_URL", os.environ.get("SESSIONLEDGER_URL")))
    for name, value in given:
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str) and not utf8_encodable(text):
                # (a URL is not repeated: it may hold a password)
                shown = "" if name in ("--url", "$SESSIONLEDGER_URL") else f" {text!r}"
                raise InvalidArgument(f"{name}{shown} is not valid text (bytes the system "
                                      f"could not decode as Unicode)")


def _tolerant_stdout() -> None:
    """Text stdout cannot encode (a cp1252 or ASCII stdout and a name in another script)
    printed as backslash escapes instead of ending the command with UnicodeEncodeError."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None:
        # (a closed or detached stream refuses: there is nothing to print to anyway)
        with contextlib.suppress(OSError, ValueError):
            reconfigure(errors="backslashreplace")


def _settle_stdout() -> None:
    """Flush stdout; when it cannot take what is left (the reader of a pipe went away, a full
    disk), point it at os.devnull: the interpreter's own flush at exit would fail again, print
    "Exception ignored" and end with status 120."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, sys.stdout.fileno())
            finally:
                os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sessionledger` command; returns the exit status."""
    args: argparse.Namespace | None = None
    _tolerant_stdout()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)  # OptionError: a value its `type=` function refused
        check_text(parser, args)
        # a keyed database's key, from the environment: never an option, which would show in
        # the shell history and the process list
        key = os.environ.get(KEY_VARIABLE) or None
        with SessionEngine(args.url, SessionConfig(integrity_key=key)) as engine:
            status = args.run(engine, args)
        # what is still buffered, written here: a reader gone now is handled below, not at
        # the interpreter's exit (no stdout at all, `>&-`: None, and nothing to write)
        if sys.stdout is not None:
            sys.stdout.flush()
    except SessionLedgerError as error:
        print(f"sessionledger: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sessionledger: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): what was decided stands
        _settle_stdout()
        return getattr(args, "decided_status", 0)
    except OSError as error:  # output that could not be written (a full disk): one line
        print(f"sessionledger: error: {error}", file=sys.stderr)
        _settle_stdout()
        return getattr(args, "decided_status", 0) or 1
    except RecursionError:  # printing a value no command writes (a forged or damaged event)
        print("sessionledger: error: a stored value is nested too deeply to print (no command "
              "writes one: a forged or damaged event; `sessionledger verify` checks the chains)",
              file=sys.stderr)
        return 1
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
