"""The benchmark report: ``bench.json`` (everything measured) and ``bench.md`` (the tables and
the goal summary), both written to the output folder; the markdown is also what is printed.

Example::

    >>> from benchmarks.common import Section
    >>> s = Section("demo", "Demo", [("name", "what"), ("rate", "images/s")],
    ...             rows=[{"name": "loop", "rate": 41.234}],
    ...             goals=[Goal.at_least("speed-up", 3.2, 3)])
    >>> print(markdown_table(s.columns, s.rows))
    | what | images/s |
    |---|---|
    | loop | 41.2 |
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Iterable, Mapping, Sequence

from benchmarks.common import Section

__all__ = ["JSON_NAME", "MARKDOWN_NAME", "format_value", "markdown_table", "render", "write"]

JSON_NAME = "bench.json"
MARKDOWN_NAME = "bench.md"


def format_value(value) -> str:
    """A table cell: 3 significant digits for floats (no exponent below 1e6), ``-`` for
    missing values, ``yes``/``no`` for booleans.

    Example: ``[format_value(v) for v in (41.234, 0.01234, None, True)] ==
    ['41.2', '0.0123', '-', 'yes']``.
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            digits = max(0, 2 - int(math.floor(math.log10(abs(value))))) if value else 0
            return f"{value:.{digits}f}"
        return f"{value:.3g}"
    return str(value).replace("|", "/")


def markdown_table(columns: Sequence[tuple], rows: Iterable[Mapping]) -> str:
    """A markdown table of ``rows`` with ``columns`` = ``[(key, header), ...]``."""
    lines = [
        "| " + " | ".join(header for _, header in columns) + " |",
        "|" + "---|" * len(columns),
    ]
    for row in rows:
        lines.append("| " + " | ".join(format_value(row.get(key)) for key, _ in columns) + " |")
    return "\n".join(lines)


def _goal_rows(sections: Sequence[Section]) -> list:
    rows = []
    for section in sections:
        for goal in section.goals:
            rows.append(
                {
                    "section": section.title,
                    "goal": goal.name,
                    "value": goal.value,
                    "target": goal.target,
                    "met": "not measured" if goal.met is None else goal.met,
                    "note": goal.note,
                }
            )
    return rows


_GOAL_COLUMNS = (
    ("section", "section"),
    ("goal", "goal"),
    ("value", "measured"),
    ("target", "target"),
    ("met", "met"),
    ("note", "note"),
)


def render(sections: Sequence[Section], machine: Mapping, *, seconds: float) -> str:
    """The markdown report: machine, goal summary, then one table per section."""
    lines = [
        "# drkeras benchmarks",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('cpu_count')} logical CPUs, "
        f"{machine.get('memory_gb')} GB; {machine.get('os')}; Python {machine.get('python')}, "
        f"TensorFlow {machine.get('tensorflow')}, OpenCV {machine.get('opencv')}, oneDNN "
        f"{machine.get('onednn')}. Load average (1 min) at start {machine.get('load_start')}, "
        f"at end {machine.get('load_end')}. Total time {seconds / 60:.1f} min.",
        "",
        "Every figure below is a ratio of measurements taken in this run on this machine; "
        "absolute times are context only. `noise` = (slowest - fastest) / median of the "
        "repeated rounds.",
        "",
        "## Goals",
        "",
        markdown_table(_GOAL_COLUMNS, _goal_rows(sections)),
    ]
    for section in sections:
        lines += ["", f"## {section.title}", "", markdown_table(section.columns, section.rows)]
        if section.notes:
            lines.append("")
            lines += [f"- {note}" for note in section.notes]
        lines.append(f"- section time: {section.seconds:.0f} s")
    return "\n".join(lines) + "\n"


def write(out: pathlib.Path, sections: Sequence[Section], machine: Mapping, *, seconds: float):
    """Write ``bench.json`` and ``bench.md`` into ``out``; returns the markdown text."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": dict(machine),
        "seconds": round(seconds, 1),
        "goals": _goal_rows(sections),
        "sections": {section.name: section.as_dict() for section in sections},
    }
    (out / JSON_NAME).write_text(json.dumps(payload, indent=2, default=str) + "\n", "utf-8")
    text = render(sections, machine, seconds=seconds)
    (out / MARKDOWN_NAME).write_text(text, "utf-8")
    return text
