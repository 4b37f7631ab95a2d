"""The printed report: machine facts, one Markdown table, the notes and a verdict summary."""

from __future__ import annotations

from collections.abc import Sequence

from .results import Row
from .timing import Stats

HEADERS = ("operation", "setting", "raw floor", "sessionledger", "over floor", "target",
           "verdict", "eventsourcing", "sl ÷ floor", "es ÷ sl")


def fmt_us(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    sign = "+" if signed and value >= 0 else ""
    if abs(value) >= 1000:
        return f"{sign}{value / 1000:,.2f} ms"
    if abs(value) >= 100:
        return f"{sign}{value:,.0f} µs"
    return f"{sign}{value:.1f} µs"


def _median(stats: Stats | None) -> str:
    return "—" if stats is None else fmt_us(stats.median_us)


def _ratio(a: Stats | None, b: Stats | None) -> str:
    if a is None or b is None or b.median_us <= 0:
        return "—"
    return f"{a.median_us / b.median_us:.2f}x"


def verdict(row: Row) -> str:
    margin = row.margin_us
    if margin is None:
        return "info"
    if margin >= 0:
        return f"PASS ({fmt_us(margin)} to spare)"
    return f"FAIL (by {fmt_us(-margin)})"


def _over_floor(row: Row) -> str:
    delta = row.over_floor_us
    if delta is None:
        return "—"
    text = fmt_us(delta, signed=True)
    quartiles = row.delta_quartiles_us
    if quartiles is not None:
        text += f" [{quartiles[0]:.0f}…{quartiles[1]:.0f}]"
    return text


def cells(row: Row) -> list[str]:
    return [
        row.operation,
        row.setting,
        _median(row.floor),
        _median(row.sl),
        _over_floor(row),
        "—" if row.target is None else row.target.text(),
        verdict(row),
        _median(row.es),
        _ratio(row.sl, row.floor),
        _ratio(row.es, row.sl),
    ]


def markdown_table(rows: Sequence[Row]) -> str:
    body = [cells(row) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(HEADERS)]

    def line(values: Sequence[str]) -> str:
        return "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=True)) + " |"

    out = [line(HEADERS), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out.extend(line(r) for r in body)
    return "\n".join(out)


def render(facts: dict[str, str], rows: Sequence[Row], notes: Sequence[str]) -> str:
    parts = ["## sessionledger benchmark", ""]
    parts.extend(f"- {key}: {value}" for key, value in facts.items())
    parts += ["", markdown_table(rows), ""]
    parts.append("All figures are medians of single calls (µs = microseconds). \"over floor\" = "
                 "sessionledger median - raw floor median, measured interleaved in the same run; "
                 "[a…b] = interquartile range of that difference over the interleaving rounds. "
                 "Ratios: sl ÷ floor = sessionledger / raw floor, es ÷ sl = plain eventsourcing / "
                 "sessionledger (how many times faster sessionledger is).")
    row_notes = [f"{row.operation} ({row.setting}): {row.note}" for row in rows if row.note]
    if notes or row_notes:
        parts += ["", "Notes:"]
        parts.extend(f"- {note}" for note in [*notes, *row_notes])
    judged = [row for row in rows if row.passed is not None]
    failed = [row for row in judged if not row.passed]
    parts += ["", f"Targets: {len(judged) - len(failed)} of {len(judged)} pass."
              + (" Failing: " + "; ".join(f"{r.operation} ({r.setting}) {verdict(r)}"
                                          for r in failed) if failed else "")]
    return "\n".join(parts)
