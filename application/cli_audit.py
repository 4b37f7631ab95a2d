"""The replay-query verbs of the `sessionledger` command.

    sessionledger show ID --at VERSION|TIME
    sessionledger diff ID A B
    sessionledger history ID [--type T ...] [--since TIME] [--until TIME] [--actor NAME]
    sessionledger timeline [--since TIME] [--until TIME] [--type T ...] [--limit N]
    sessionledger blame ID KEY

Readable tables by default, `--json` for machines. A TIME is ISO 8601: 2026-11-25T10:00:00Z,
2026-11-25T11:00:00+01:00, or a date alone (midnight UTC); a time without an offset is UTC.
Windows are half-open: since <= time < until. Bad input raises a SessionLedgerError, which
cli.main() prints as one line before exiting 1. Numbers are ASCII digits. In JSON, float NaN and
infinities are the strings "NaN", "Infinity" and "-Infinity" (bare NaN is not JSON), bytes are
hex, and datetimes, UUIDs and Decimals are strings.

Wiring (cli.build_parser): ``add_audit_verbs(verbs, common)``; on the `show` parser
``add_show_options(show)`` and ``set_defaults(run=show_at)``; on the `history` parser
``add_history_options(history)`` and ``set_defaults(run=history_filtered)``.
"""

from __future__ import annotations

import argparse
import codecs
import itertools
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from sessionledger.domain.errors import InvalidArgument, SessionLedgerError
from sessionledger.domain.events import SessionEvent
from sessionledger.domain.session import Session
from sessionledger.domain.values import decimal_digits, escaped_unprintable
from sessionledger.projections.audit import Change, StateDiff

from .audit import parse_time

if TYPE_CHECKING:  # the engine imports the CLI's modules, never the other way round at run time
    from .engine import SessionEngine

TIME_HELP = ("ISO 8601 (2026-11-25T10:00:00Z, 2026-11-25T11:00:00+01:00 or 2026-11-25; "
             "UTC if no offset)")


# -- parsing -------------------------------------------------------------------------------


class OptionError(SessionLedgerError):
    """A command-line value refused by an argparse `type=` function. Not a ValueError, which
    argparse would turn into a usage message and exit 2: cli.main() prints it as one line."""


def parse_count(text: str, what: str, *, least: int = 0, most: int = sys.maxsize,
                clamp: bool = False) -> int:
    """A whole number in least..most from the command line (InvalidArgument otherwise); with
    `clamp`, one past `most` is `most`. ASCII digits only: int() also reads '١٢', '+1' and '1_0'.
    """
    digits = text.strip()
    if not decimal_digits(digits):
        raise InvalidArgument(f"{what} must be a whole number, got {text!r}")
    digits = digits.lstrip("0") or "0"
    # a number longer than `most` is past it: int() would refuse 4,300 digits
    value = int(digits) if len(digits) <= len(str(most)) else most + 1
    if clamp:
        value = min(value, most)
    if not least <= value <= most:
        raise InvalidArgument(f"{what} must be in {least}..{most}, got {text!r}")
    return value


def count_option(option: str, *, least: int = 0, most: int = sys.maxsize,
                 clamp: bool = False) -> Callable[[str], int]:
    """An argparse `type=` reading `option`'s value with parse_count (OptionError otherwise)."""
    def parse(text: str) -> int:
        try:
            return parse_count(text, option, least=least, most=most, clamp=clamp)
        except InvalidArgument as error:
            raise OptionError(str(error)) from None
    return parse


def parse_version(text: str, what: str = "version") -> int:
    """A version number from the command line (InvalidArgument otherwise)."""
    if not decimal_digits(text.strip()):
        raise InvalidArgument(f"{what} must be a version number, got {text!r}")
    return parse_count(text, what)


def parse_version_or_time(text: str) -> int | datetime:
    """`--at`: digits are a version, anything else an ISO 8601 time."""
    stripped = text.strip()
    if decimal_digits(stripped):
        return parse_version(stripped, "--at")
    return parse_time(stripped, "--at")


def _types(values: Sequence[str] | None) -> list[str] | None:
    """Repeated --type options, each possibly a comma-separated list."""
    if not values:
        return None
    types = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if not types:  # `--type ,` would otherwise match no event at all
        raise InvalidArgument(f"--type names no event type: {','.join(values)!r}")
    return types


# -- output --------------------------------------------------------------------------------


def jsonable(value: Any) -> Any:
    """`value` with datetimes, UUIDs, Decimals and bytes as JSON-friendly strings, and float NaN
    and infinities as "NaN", "Infinity" and "-Infinity" (bare NaN is not valid JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, UUID | Decimal):
        return str(value)
    if isinstance(value, bytes):
        return value.hex()
    return value


#: characters a terminal acts on that JSON (ensure_ascii=False) leaves raw: DEL and the C1
#: controls (U+009B is an 8-bit CSI, as ESC [ is; U+0085 a line break)
_RAW_CONTROLS = re.compile("[\x7f-\x9f]")
#: the events a `diff` table lists for one key (--json lists every one)
_EVENTS_SHOWN = 10


def stdout_speaks_utf8() -> bool:
    """True when stdout encodes UTF-8 (else JSON goes out as ASCII with \\u escapes, still
    valid and lossless: a cp1252 file on Windows, an ASCII locale)."""
    encoding = getattr(sys.stdout, "encoding", None)
    if not isinstance(encoding, str):
        return False
    try:
        return codecs.lookup(encoding).name == "utf-8"
    except LookupError:
        return False


def _json(value: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    """JSON of `value` as the CLI prints it: readable Unicode, but every control character
    escaped (JSON escapes C0 itself), so printed data never drives the terminal."""
    text = json.dumps(jsonable(value), indent=indent, ensure_ascii=not stdout_speaks_utf8(),
                      sort_keys=sort_keys)
    return _RAW_CONTROLS.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def _dumps(value: Any, indent: int | None = 2) -> str:
    return _json(value, indent)


def _print_json_array(items: Iterable[Any]) -> None:
    """A JSON array, one item per line, each written as it comes."""
    print("[")
    separator = ""
    for item in items:
        print(separator + _dumps(item, indent=None), end="")
        separator = ",\n"
    print("\n]" if separator else "]")


def compact(value: Any, limit: int = 70) -> str:
    text = _json(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def terminal_text(value: object) -> str:
    """Text for the terminal (a table cell, a line of verify) with what it would act on
    escaped (a newline splits a row, an escape sequence can clear the screen): state keys,
    names and a tampered row's ids are any text."""
    return escaped_unprintable(str(value))


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[terminal_text(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def table_time(moment: datetime) -> str:
    # the stored microseconds: a time copied from a table into --at, --since or --until
    # must name the same instant (milliseconds fell before the event they came from)
    return moment.isoformat(timespec="microseconds")


def _event_dict(event: SessionEvent) -> dict[str, Any]:
    return {"version": event.version, "type": event.type, "timestamp": event.timestamp,
            "actor": event.actor, "correlation_id": event.correlation_id, "data": event.data}


def _session_dict(session: Session) -> dict[str, Any]:
    return {
        "id": session.id, "name": session.name, "status": session.status.value,
        "version": session.version, "tags": session.tags, "metadata": session.metadata,
        "parent": session.parent, "created_at": session.created_at,
        "updated_at": session.updated_at, "checkpoints": session.checkpoints,
        "state": session.state,
    }


def print_session(session: Session, as_json: bool) -> None:
    """A session as `show` prints it."""
    info = _session_dict(session)
    if as_json:
        print(_dumps(info))
        return
    info["created_at"], info["updated_at"] = (table_time(session.created_at),
                                              table_time(session.updated_at))
    for key in ("id", "name", "status", "version", "parent", "created_at", "updated_at"):
        print(f"{key:12} {terminal_text(info[key]) if info[key] is not None else '-'}")
    print(f"{'tags':12} {terminal_text(', '.join(session.tags)) or '-'}")
    print(f"{'metadata':12} {compact(session.metadata, 200)}")
    checkpoints = ", ".join(f"{label}@{v}" for label, v in session.checkpoints.items())
    print(f"{'checkpoints':12} {terminal_text(checkpoints) or '-'}")
    print("state:")
    print(_json(session.state, indent=2, sort_keys=True))


def print_events(events: Sequence[SessionEvent], as_json: bool) -> None:
    """A session's events as `history` prints them."""
    if as_json:  # written event by event: no second copy of a long history in memory
        _print_json_array(_event_dict(e) for e in events)
        return
    print(table(
        ["VERSION", "TIME", "TYPE", "ACTOR", "DATA"],
        [[e.version, table_time(e.timestamp), e.type, e.actor or "-", compact(e.data)]
         for e in events],
    ))


def diff_dict(diff: StateDiff) -> dict[str, Any]:
    """A StateDiff as plain JSON-ready data."""

    def changes(group: dict[str, Change]) -> dict[str, Any]:
        return {key: {"old": c.old, "new": c.new, "changes": [
            {"version": t.version, "timestamp": t.timestamp, "actor": t.actor, "type": t.type}
            for t in c.changes]} for key, c in group.items()}

    return {"session_id": diff.session_id, "from_version": diff.from_version,
            "to_version": diff.to_version, "added": changes(diff.added),
            "changed": changes(diff.changed), "removed": changes(diff.removed)}


# -- verbs ---------------------------------------------------------------------------------


def show_at(engine: SessionEngine, args: argparse.Namespace) -> None:
    """`show ID [--at VERSION|TIME]`: the session now, or as it was at a version or time."""
    at = getattr(args, "at", None)
    if at is None:
        session = engine.get(args.session_id)
    else:
        # the engine's queries, not engine.audit's: a purged session is named as such
        target = parse_version_or_time(at)
        session = (engine.state_at(args.session_id, version=target) if isinstance(target, int)
                   else engine.state_at(args.session_id, at=target))
    print_session(session, args.json)


def history_filtered(engine: SessionEngine, args: argparse.Namespace) -> None:
    """`history ID [--type T ...] [--since TIME] [--until TIME] [--actor NAME]`."""
    events = engine.history(
        args.session_id, since=getattr(args, "since", None), until=getattr(args, "until", None),
        types=_types(getattr(args, "types", None)), actor=getattr(args, "actor", None),
    )
    print_events(events, args.json)


def cmd_diff(engine: SessionEngine, args: argparse.Namespace) -> None:
    """`diff ID A B`: state keys added, changed and removed from version A to version B."""
    diff = engine.diff(args.session_id, parse_version(args.a, "A"), parse_version(args.b, "B"))
    if args.json:
        print(_dumps(diff_dict(diff)))
        return
    print(f"session {diff.session_id}: version {diff.from_version} -> {diff.to_version}")
    if diff.empty:
        print("no differences")
        return
    rows: list[list[object]] = []
    for kind, group in (("added", diff.added), ("changed", diff.changed),
                        ("removed", diff.removed)):
        for key, change in group.items():
            touched = change.changes
            by = ", ".join(f"v{t.version} {t.type} by {t.actor or '-'}"
                           for t in touched[:_EVENTS_SHOWN])
            if len(touched) > _EVENTS_SHOWN:  # (a key changed 100,000 times: one line of MBs)
                by += f", and {len(touched) - _EVENTS_SHOWN:,} more (--json lists them all)"
            rows.append([kind, key, "-" if kind == "added" else compact(change.old, 40),
                         "-" if kind == "removed" else compact(change.new, 40), by])
    print(table(["CHANGE", "KEY", "OLD", "NEW", "EVENTS"], rows))


def cmd_blame(engine: SessionEngine, args: argparse.Namespace) -> None:
    """`blame ID KEY`: every change to one state key."""
    entries = engine.blame(args.session_id, args.key)
    if args.json:
        print(_dumps([{
            "version": b.version, "timestamp": b.timestamp, "actor": b.actor,
            "correlation_id": b.correlation_id, "type": b.type, "value": b.value,
            "deleted": b.deleted,
        } for b in entries]))
        return
    if not entries:
        print(f"state key {args.key!r} was never set in session {args.session_id}")
        return
    print(table(
        ["VERSION", "TIME", "TYPE", "ACTOR", "VALUE"],
        [[b.version, table_time(b.timestamp), b.type, b.actor or "-",
          "(deleted)" if b.deleted else compact(b.value)] for b in entries],
    ))


#: timeline columns (name, width, whether a longer value is cut): streamed rows cannot be
#: measured first, so the widths are fixed. Values meant to be copied into other commands
#: (position, time, session id, version) are never cut: a longer one pushes its row along.
_TIMELINE_COLUMNS = (("POSITION", 9, False), ("TIME", 32, False), ("SESSION", 36, False),
                     ("NAME", 20, True), ("VERSION", 7, False), ("TYPE", 16, True),
                     ("ACTOR", 12, True))


def _cell(text: str, width: int, cut: bool) -> str:
    return text if not cut or len(text) <= width else text[: width - 1] + "~"


def cmd_timeline(engine: SessionEngine, args: argparse.Namespace) -> None:
    """`timeline [--since] [--until] [--type ...] [--limit]`: every session's events in commit
    order, printed as they stream in (constant memory on any number of events)."""
    events = engine.timeline(since=args.since, until=args.until, types=_types(args.types))
    shown = events if args.limit is None else itertools.islice(events, args.limit)
    try:
        if args.json:
            _print_json_array({"position": e.position, "session_id": e.session_id,
                               "session_name": e.session_name, **_event_dict(e)}
                              for e in shown)
            return
        widths = [w for _, w, _ in _TIMELINE_COLUMNS]
        cuts = [cut for _, _, cut in _TIMELINE_COLUMNS]
        header = [name for name, _, _ in _TIMELINE_COLUMNS] + ["DATA"]
        print("  ".join(h.ljust(w) for h, w in zip(header, [*widths, 0], strict=True)).rstrip())
        for e in shown:
            cells = [str(e.position), table_time(e.timestamp), e.session_id, e.session_name or "-",
                     str(e.version), e.type, e.actor or "-"]
            print("  ".join(_cell(terminal_text(c), w, cut).ljust(w)
                            for c, w, cut in zip(cells, widths, cuts, strict=True))
                  + "  " + compact(e.data))
    finally:
        close = getattr(events, "close", None)
        if close is not None:
            close()  # release the scan's connection now, not when the generator is collected


# -- parser --------------------------------------------------------------------------------


#: the command's parser class (cli's own ArgumentParser subclass)
Parser = TypeVar("Parser", bound=argparse.ArgumentParser)


def add_show_options(parser: argparse.ArgumentParser) -> None:
    """`--at VERSION|TIME` on the `show` verb (run function: show_at)."""
    parser.add_argument("--at", metavar="VERSION|TIME", default=None,
                        help="show the session as it was at this version or time: " + TIME_HELP)


def add_history_options(parser: argparse.ArgumentParser) -> None:
    """`--type`, `--since`, `--until`, `--actor` on the `history` verb (run function:
    history_filtered)."""
    _add_window(parser)
    parser.add_argument("--actor", default=None, help="only events by this actor")


def _add_window(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--type", dest="types", action="append", metavar="TYPE",
                        help="only events of this type (repeatable, or comma-separated)")
    parser.add_argument("--since", metavar="TIME", default=None,
                        help="only events at or after TIME: " + TIME_HELP)
    parser.add_argument("--until", metavar="TIME", default=None,
                        help="only events before TIME (an event at exactly TIME is left out)")


def add_audit_verbs(verbs: argparse._SubParsersAction[Parser], common: Parser) -> None:
    """Add `diff`, `timeline` and `blame` to the `sessionledger` command's verbs; `common` is
    the parent parser carrying --url and --json."""
    diff = verbs.add_parser("diff", parents=[common],
                            help="state keys added, changed and removed between two versions")
    diff.add_argument("session_id", metavar="ID")
    diff.add_argument("a", metavar="A", help="from version (0: before the session started)")
    diff.add_argument("b", metavar="B", help="to version (below A: reads back in time)")
    diff.set_defaults(run=cmd_diff)

    timeline = verbs.add_parser("timeline", parents=[common],
                                help="every session's events in commit order, streamed")
    _add_window(timeline)
    timeline.add_argument("--limit", metavar="N", default=None,
                          type=count_option("--limit", clamp=True),
                          help=f"stop after N events (N past {sys.maxsize}: no limit)")
    timeline.set_defaults(run=cmd_timeline)

    blame = verbs.add_parser("blame", parents=[common],
                             help="every change to one state key: version, time, actor, value")
    blame.add_argument("session_id", metavar="ID")
    blame.add_argument("key", metavar="KEY")
    blame.set_defaults(run=cmd_blame)
