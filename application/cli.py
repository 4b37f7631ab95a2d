"""The `sessionledger` command: demo, ls, show, history.

Every verb takes `--url` (default: $SESSIONLEDGER_URL, else ./sessionledger.db). Errors print one
line and exit non-zero; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

from sessionledger.domain.errors import SessionLedgerError
from sessionledger.domain.session import Session

from .engine import SessionEngine


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID | Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


def _session_dict(session: Session) -> dict[str, Any]:
    return {
        "id": session.id,
        "name": session.name,
        "status": session.status.value,
        "version": session.version,
        "tags": session.tags,
        "metadata": session.metadata,
        "parent": session.parent,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "checkpoints": session.checkpoints,
        "state": session.state,
    }


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _short_time(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _compact(value: Any, limit: int = 70) -> str:
    text = json.dumps(_jsonable(value), ensure_ascii=False, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cmd_ls(engine: SessionEngine, args: argparse.Namespace) -> None:
    sessions = engine.list_sessions(limit=args.limit)
    if args.json:
        print(json.dumps([_jsonable(_session_dict(s)) for s in sessions], indent=2))
        return
    if not sessions:
        print(f"no sessions in {engine.url}")
        return
    print(_table(
        ["ID", "NAME", "STATUS", "VERSION", "TAGS", "UPDATED"],
        [[s.id, s.name, s.status.value, s.version, ",".join(s.tags), _short_time(s.updated_at)]
         for s in sessions],
    ))


def cmd_show(engine: SessionEngine, args: argparse.Namespace) -> None:
    session = engine.get(args.session_id)
    info = _session_dict(session)
    if args.json:
        print(json.dumps(_jsonable(info), indent=2))
        return
    for key in ("id", "name", "status", "version", "parent", "created_at", "updated_at"):
        print(f"{key:12} {info[key] if info[key] is not None else '-'}")
    print(f"{'tags':12} {', '.join(session.tags) or '-'}")
    print(f"{'metadata':12} {_compact(session.metadata, 200)}")
    checkpoints = ", ".join(f"{label}@{v}" for label, v in session.checkpoints.items())
    print(f"{'checkpoints':12} {checkpoints or '-'}")
    print("state:")
    print(json.dumps(_jsonable(session.state), indent=2, ensure_ascii=False, sort_keys=True))


def cmd_history(engine: SessionEngine, args: argparse.Namespace) -> None:
    events = engine.history(args.session_id)
    if args.json:
        print(json.dumps([_jsonable({
            "version": e.version, "type": e.type, "timestamp": e.timestamp, "actor": e.actor,
            "correlation_id": e.correlation_id, "data": e.data,
        }) for e in events], indent=2))
        return
    print(_table(
        ["VERSION", "TIME", "TYPE", "ACTOR", "DATA"],
        [[e.version, e.timestamp.isoformat(timespec="milliseconds"), e.type, e.actor or "-",
          _compact(e.data)] for e in events],
    ))


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
    ls = verbs.add_parser("ls", parents=[common], help="list sessions, newest first")
    ls.add_argument("--limit", type=int, default=100)
    ls.set_defaults(run=cmd_ls)
    show = verbs.add_parser("show", parents=[common], help="show one session")
    show.add_argument("session_id", metavar="ID")
    show.set_defaults(run=cmd_show)
    history = verbs.add_parser("history", parents=[common], help="list a session's events")
    history.add_argument("session_id", metavar="ID")
    history.set_defaults(run=cmd_history)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `sessionledger` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        with SessionEngine(args.url) as engine:
            args.run(engine, args)
    except SessionLedgerError as error:
        print(f"sessionledger: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("sessionledger: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
