"""Median timing of single calls, with warm-up and interleaving of competing cases.

Every case is a callable taking the call index (0, 1, 2, ... per case, warm-up included), so a
case can write a new value or row on each call. One call is one sample, timed with
perf_counter_ns.

`interleave` runs the cases in alternating blocks (round 1: A B C, round 2: B C A, ...) so slow
drift on a noisy machine (other tenants, page-cache writeback, WAL checkpoints) touches every case
alike, and a target set "above the raw floor" compares numbers taken in the same minutes. The
cyclic garbage collector is paused while a block runs (as `timeit` does) and collects between
blocks.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

Case = Callable[[int], object]


@dataclass(frozen=True)
class Stats:
    """Summary of one case's samples, in microseconds."""

    n: int
    median_us: float
    p10_us: float
    p90_us: float
    mean_us: float
    min_us: float

    @classmethod
    def of(cls, samples_ns: list[int] | list[float]) -> Stats:
        if not samples_ns:
            raise ValueError("no samples")
        ordered = sorted(samples_ns)
        n = len(ordered)

        def pct(p: float) -> float:
            return ordered[min(n - 1, int(p * n))] / 1000.0

        return cls(
            n=n,
            median_us=statistics.median(ordered) / 1000.0,
            p10_us=pct(0.10),
            p90_us=pct(0.90),
            mean_us=statistics.fmean(ordered) / 1000.0,
            min_us=ordered[0] / 1000.0,
        )

    def as_dict(self) -> dict[str, float]:
        return {
            "n": self.n,
            "median_us": round(self.median_us, 3),
            "p10_us": round(self.p10_us, 3),
            "p90_us": round(self.p90_us, 3),
            "mean_us": round(self.mean_us, 3),
            "min_us": round(self.min_us, 3),
        }


@dataclass(frozen=True)
class Measured:
    """The result of an interleaved run: stats per case and the per-round medians."""

    stats: dict[str, Stats]
    round_medians_us: dict[str, list[float]]

    def round_deltas(self, case: str, baseline: str) -> list[float]:
        """Per round: median of `case` minus median of `baseline` (µs)."""
        return [
            a - b
            for a, b in zip(self.round_medians_us[case], self.round_medians_us[baseline],
                            strict=True)
        ]


def _block(case: Case, start: int, count: int, out: list[int]) -> None:
    clock = time.perf_counter_ns
    for i in range(start, start + count):
        t0 = clock()
        case(i)
        out.append(clock() - t0)


def interleave(
    cases: Mapping[str, Case],
    *,
    rounds: int,
    per_round: int | Mapping[str, int],
    warmup: int | Mapping[str, int] = 0,
) -> Measured:
    """Time each case rounds x per_round times, in rotating order, after `warmup` calls each."""
    names = list(cases)
    if not names:
        raise ValueError("no cases")

    def count(spec: int | Mapping[str, int], name: str) -> int:
        return spec if isinstance(spec, int) else spec[name]

    samples: dict[str, list[int]] = {name: [] for name in names}
    round_medians: dict[str, list[float]] = {name: [] for name in names}
    next_index = dict.fromkeys(names, 0)
    gc_was_enabled = gc.isenabled()
    try:
        for name in names:
            n = count(warmup, name)
            if n:
                gc.disable()
                _block(cases[name], 0, n, [])
                gc.enable()
                next_index[name] = n
        gc.collect()
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                n = count(per_round, name)
                block: list[int] = []
                gc.disable()
                _block(cases[name], next_index[name], n, block)
                gc.enable()
                next_index[name] += n
                samples[name].extend(block)
                round_medians[name].append(statistics.median(block) / 1000.0)
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
        else:  # pragma: no cover - the caller had paused the collector
            gc.disable()
    return Measured({name: Stats.of(samples[name]) for name in names}, round_medians)


def measure(case: Case, *, iterations: int, warmup: int = 0, rounds: int = 10) -> Stats:
    """Time one case alone (iterations split into `rounds` blocks)."""
    per_round = max(1, iterations // rounds)
    return interleave({"case": case}, rounds=rounds, per_round=per_round,
                      warmup=warmup).stats["case"]
