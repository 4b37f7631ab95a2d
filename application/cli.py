"""The `sessionledger` command: demo, ls, show, history.

Every verb takes `--url` (default: $SESSIONLEDGER_URL, else ./sessionledger.db). Errors print one
line and exit non-zero; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sessionledger.domain.errors import InvalidArgument, SessionLedgerError
from sessionledger.projections.catalog import SessionSummary
from sessionledger.projections.snapshots import CURRENT_FORMAT

from .cli_audit import (
    add_audit_verbs,
    add_history_options,
    add_show_options,
    history_filtered,
    jsonable,
    show_at,
    table,
)
from .engine import SessionEngine
from .retention import RetentionPolicy


def _short_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


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
        [[s.id, s.name, s.status.value, s.version, ",".join(s.tags), _short_time(s.updated_at)]
         for s in page],
    ))
    if page.next_cursor:
        print(f"more: sessionledger ls --cursor {page.next_cursor}")


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


def parse_age(text: str) -> float:
    """'30d', '12h', '15m', '45s' or plain seconds, as seconds."""
    units = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}
    value = text.strip().lower()
    factor = units.get(value[-1:])
    number = value[:-1] if factor is not None else value
    try:
        seconds = float(number) * (factor or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid age {text!r}: use 30d, 12h, 15m, 45s or seconds") from None
    if seconds < 0:
        raise argparse.ArgumentTypeError("an age is never negative")
    return seconds


def cmd_cleanup(engine: SessionEngine, args: argparse.Namespace) -> None:
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
    report = engine.verify(args.session_id)
    if args.json:
        print(json.dumps({"ok": report.ok, "sessions": report.sessions, "events": report.events,
                          "snapshots": report.snapshots,
                          "problems": [{"session_id": p.session_id, "version": p.version,
                                        "what": p.what} for p in report.problems]}, indent=2))
    else:
        print(f"checked {report.sessions} sessions, {report.events} events, "
              f"{report.snapshots} snapshots: {'ok' if report.ok else 'PROBLEMS'}")
        for problem in report.problems:
            print(f"  {problem}")
    return 0 if report.ok else 2


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
        load_setup(target)(engine)
    if args.until_idle:
        delivered = engine.run_subscribers(until_idle=True)
        print(json.dumps(delivered) if args.json else
              ", ".join(f"{name}: {n} events" for name, n in delivered.items()))
        return
    names = ", ".join(s.name for s in engine.subscribers() if s.registered)
    print(f"running subscribers ({names}) on {engine.url}; Ctrl-C stops", file=sys.stderr)
    handle = engine.run_subscribers()
    try:
        while handle.running:
            time.sleep(0.5)
    finally:
        handle.stop()


def load_setup(target: str) -> Any:
    """The callable named by 'module:function' (it registers subscribers on the engine)."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise InvalidArgument(f"--setup {target!r}: expected module:function")
    try:
        module = importlib.import_module(module_name)
        setup = getattr(module, attribute)
    except (ImportError, AttributeError) as error:
        raise InvalidArgument(f"--setup {target!r}: {error}") from None
    if not callable(setup):
        raise InvalidArgument(f"--setup {target!r} is not callable")
    return setup


def cmd_demo(engine: SessionEngine, args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(engine)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sessionledger", description="An event-sourced session engine."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=None,
        help="database URL (sqlite:///FILE, postgresql+psycopg://...); "
             "default $SESSIONLEDGER_URL, else ./sessionledger.db",
    )
    common.add_argument("--json", action="store_true", help="print JSON for machines")
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
    ls.add_argument("--limit", type=int, default=100)
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

    snapshots = verbs.add_parser("snapshots", help="snapshot maintenance")
    snapshot_verbs = snapshots.add_subparsers(dest="snapshots_verb", required=True,
                                              metavar="VERB")
    rebuild_snapshots = snapshot_verbs.add_parser(
        "rebuild", parents=[common], help="rewrite every session's snapshots in this format")
    rebuild_snapshots.set_defaults(run=cmd_snapshots_rebuild)

    cleanup = verbs.add_parser("cleanup", parents=[common],
                               help="archive (or purge) ended sessions by age and count")
    cleanup.add_argument("--max-age", type=parse_age, metavar="AGE",
                         help="ended longer ago than this: 30d, 12h, 15m, 45s")
    cleanup.add_argument("--keep-last", type=int, metavar="N",
                         help="always keep the newest N ended sessions")
    cleanup.add_argument("--purge", action="store_true",
                         help="delete events and snapshots for good (a tombstone stays) "
                              "instead of archiving")
    cleanup.add_argument("--dry-run", action="store_true", help="list, touch nothing")
    cleanup.set_defaults(run=cmd_cleanup)

    verify = verbs.add_parser("verify", parents=[common],
                              help="check hash chains and snapshots; exit 2 on a problem")
    verify.add_argument("session_id", metavar="ID", nargs="?", help="one session (default all)")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sessionledger` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with SessionEngine(args.url) as engine:
            status = args.run(engine, args)
    except SessionLedgerError as error:
        print(f"sessionledger: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sessionledger: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return status if isinstance(status, int) else 0


if __name__ == "__main__":
    sys.exit(main())
