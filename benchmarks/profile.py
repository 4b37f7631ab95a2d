"""python -m benchmarks.profile OP: cProfile one sessionledger operation (public API only).

    python -m benchmarks.profile append --durability normal
    python -m benchmarks.profile load1000 --top 15
    python -m benchmarks.profile create --postgres postgresql+psycopg://postgres@127.0.0.1/test

OP is append, create, load10 or load1000 (cold loads: max_active_sessions=0). cProfile inflates
small Python functions; read the output for proportions, and the benchmark table for times.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from . import engine as sl
from .suite import pg_schema

OPS = ("append", "create", "load10", "load1000")


@contextmanager
def database(postgres: str | None) -> Iterator[str]:
    if postgres:
        with pg_schema(postgres) as (_, engine_url, _schema):
            yield engine_url
    else:
        with tempfile.TemporaryDirectory(prefix="slprofile-") as tmp:
            yield "sqlite:///" + os.path.join(tmp, "profile.db")


Workload = tuple[Callable[[int], object], Callable[[], None]]


def workload(op: str, url: str, durability: str) -> Workload:
    """(one call of `op`, close) on a prepared database."""
    if op in ("load10", "load1000"):
        sid = sl.populate(url, 10 if op == "load10" else 1000)
        loader = sl.open_engine(url, durability, cached=False)
        return (lambda i: loader.get(sid)), loader.close
    engine = sl.open_engine(url, durability)
    if op == "append":
        sid = engine.create(sl.SESSION_NAME, state=dict(sl.INITIAL_STATE))
        return (lambda i: engine.update(sid, {"step": i + 1})), engine.close
    return (lambda i: engine.create(sl.SESSION_NAME, state=dict(sl.INITIAL_STATE))), engine.close


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("op", choices=OPS)
    parser.add_argument("--durability", choices=("full", "normal"), default="normal")
    parser.add_argument("--postgres", metavar="URL", help="profile on PostgreSQL instead")
    parser.add_argument("-n", type=int, default=0, help="calls (default: depends on OP)")
    parser.add_argument("--top", type=int, default=25, help="functions to show")
    parser.add_argument("--sort", default="tottime", help="pstats sort key (default tottime)")
    args = parser.parse_args(argv)
    calls = args.n or {"append": 20_000, "create": 10_000, "load10": 20_000, "load1000": 200}[
        args.op]
    with database(args.postgres) as url:
        call, close = workload(args.op, url, args.durability)
        try:
            for i in range(min(calls, 500)):  # warm-up
                call(i)
            profiler = cProfile.Profile()
            profiler.enable()
            for i in range(calls):
                call(calls + i)
            profiler.disable()
        finally:
            close()
    stats = pstats.Stats(profiler)
    stats.strip_dirs().sort_stats(args.sort).print_stats(args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
