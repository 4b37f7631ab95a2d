"""python -m benchmarks: measure sessionledger against its targets and print one table.

    python -m benchmarks                      # full run (about 1-2 minutes)
    python -m benchmarks --quick              # a shorter, noisier run
    python -m benchmarks --json results.json  # also dump every figure as JSON
    python -m benchmarks --postgres postgresql+psycopg://postgres@127.0.0.1:5432/test

The PostgreSQL rows use --postgres, else $SESSIONLEDGER_BENCH_POSTGRES_URL, else
$SESSIONLEDGER_TEST_POSTGRES_URL; without any of them they are skipped (with a note). They run in
a schema created for the run and dropped at the end. SQLite files live in a temporary directory
(under --dir if given) that is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from . import catalog_bench, snapshots_bench, suite
from .machine import facts
from .report import render
from .results import Row

PG_ENV = ("SESSIONLEDGER_BENCH_POSTGRES_URL", "SESSIONLEDGER_TEST_POSTGRES_URL")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations (noisier)")
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON to PATH")
    parser.add_argument("--postgres", metavar="URL",
                        help="PostgreSQL URL for the PostgreSQL rows (default: $"
                             + " or $".join(PG_ENV) + ")")
    parser.add_argument("--dir", metavar="DIR",
                        help="where to put the temporary SQLite files (default: the system "
                             "temp directory; fsync cost depends on its filesystem)")
    parser.add_argument("--strict", action="store_true",
                        help="exit with status 1 when a target fails")
    return parser.parse_args(argv)


_START = time.perf_counter()


def progress(message: str) -> None:
    elapsed = time.perf_counter() - _START
    print(f"  [{elapsed:5.1f} s] measuring: {message} ...", file=sys.stderr, flush=True)


def settings_note(durability: str, settings: dict[str, tuple[str, str]]) -> str:
    shown = ", ".join(f"{who} {mode}/{sync}" for who, (mode, sync) in settings.items())
    same = len(set(settings.values())) == 1
    return (f"SQLite settings read back for durability={durability} (journal_mode/synchronous): "
            f"{shown}" + ("" if same else " — WARNING: NOT THE SAME"))


ES_NOTE = ("eventsourcing.sqlite sets journal_mode=WAL on file databases but never sets "
           "synchronous, so its connections run at SQLite's default (read back above); for the "
           "synchronous=NORMAL rows the benchmark sets PRAGMA synchronous=NORMAL on each "
           "connection of its pool. sessionledger sets both PRAGMAs from SessionConfig.durability; "
           "the raw floor sets them by hand.")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = suite.Plan.quick() if args.quick else suite.Plan.default()
    pg_url = args.postgres or next((os.environ[v] for v in PG_ENV if os.environ.get(v)), None)
    started = time.perf_counter()
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="slbench-", dir=args.dir) as tmp:
        machine = facts(tmp)
        if args.quick:
            machine["mode"] = "--quick (fewer samples; expect more noise)"
        for durability in ("full", "normal"):
            written, settings = suite.sqlite_writes(tmp, durability, plan, progress)
            rows.extend(written)
            notes.append(settings_note(durability, settings))
        notes.append(ES_NOTE)
        rows.extend(suite.sqlite_loads(tmp, plan, progress))
        rows.extend(snapshots_bench.rows(tmp, plan, progress))
        rows.extend(catalog_bench.rows(tmp, plan, progress))
    if pg_url:
        machine["postgresql"] = suite.postgres_version(pg_url)
        rows.extend(suite.postgres(pg_url, plan, progress))
    else:
        notes.append("PostgreSQL rows skipped: no --postgres URL and neither "
                     + " nor ".join(PG_ENV) + " is set.")
    rows.extend(suite.micro(plan, progress))
    elapsed = time.perf_counter() - started
    machine["run time"] = f"{elapsed:.0f} s"

    print(render(machine, rows, notes))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump({"machine": machine, "notes": notes, "quick": args.quick,
                       "rows": [row.as_dict() for row in rows]}, out, indent=2,
                      ensure_ascii=False)
            out.write("\n")
        print(f"\nresults written to {args.json}", file=sys.stderr)
    failed = any(row.passed is False for row in rows)
    return 1 if failed and args.strict else 0


if __name__ == "__main__":
    sys.exit(main())
