"""Result rows, targets and verdicts."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from .timing import Stats


@dataclass(frozen=True)
class Target:
    """A limit for sessionledger's median: absolute, or above the floor measured in the run."""

    limit_us: float
    above_floor: bool = False

    def text(self) -> str:
        limit = f"{self.limit_us:g} µs" if self.limit_us < 1000 else f"{self.limit_us / 1000:g} ms"
        return f"≤ floor + {limit}" if self.above_floor else f"≤ {limit}"


@dataclass
class Row:
    """One operation: sessionledger next to its raw floor and plain eventsourcing."""

    key: str
    operation: str
    setting: str
    sl: Stats | None = None
    floor: Stats | None = None
    es: Stats | None = None
    target: Target | None = None
    #: per interleaving round: median(sessionledger) - median(floor), µs
    round_deltas_us: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def over_floor_us(self) -> float | None:
        if self.sl is None or self.floor is None:
            return None
        return self.sl.median_us - self.floor.median_us

    @property
    def delta_quartiles_us(self) -> tuple[float, float] | None:
        """Interquartile range of the per-round deltas: how steady "over floor" was."""
        if len(self.round_deltas_us) < 4:
            return None
        q = statistics.quantiles(self.round_deltas_us, n=4)
        return q[0], q[2]

    @property
    def measured_us(self) -> float | None:
        """The number the target is about (median, or median above the floor)."""
        if self.target is None or self.sl is None:
            return None
        return self.over_floor_us if self.target.above_floor else self.sl.median_us

    @property
    def margin_us(self) -> float | None:
        """Positive: that much to spare; negative: missed by that much."""
        measured = self.measured_us
        if measured is None or self.target is None:
            return None
        return self.target.limit_us - measured

    @property
    def passed(self) -> bool | None:
        margin = self.margin_us
        return None if margin is None else margin >= 0

    def as_dict(self) -> dict[str, Any]:
        quartiles = self.delta_quartiles_us
        return {
            "key": self.key,
            "operation": self.operation,
            "setting": self.setting,
            "sessionledger": None if self.sl is None else self.sl.as_dict(),
            "raw_floor": None if self.floor is None else self.floor.as_dict(),
            "eventsourcing": None if self.es is None else self.es.as_dict(),
            "over_floor_us": _rounded(self.over_floor_us),
            "over_floor_round_iqr_us": None if quartiles is None else [
                round(quartiles[0], 3), round(quartiles[1], 3)],
            "target": None if self.target is None else {
                "limit_us": self.target.limit_us,
                "above_floor": self.target.above_floor,
                "text": self.target.text(),
            },
            "measured_us": _rounded(self.measured_us),
            "margin_us": _rounded(self.margin_us),
            "passed": self.passed,
            "sl_over_floor_ratio": _ratio(self.sl, self.floor),
            "es_over_sl_ratio": _ratio(self.es, self.sl),
            "note": self.note,
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _ratio(a: Stats | None, b: Stats | None) -> float | None:
    if a is None or b is None or b.median_us <= 0:
        return None
    return round(a.median_us / b.median_us, 3)
