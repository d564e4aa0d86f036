"""The papers' results tables: our numbers beside the published ones, as CSV and markdown.

Every experiment returns :class:`ResultsTable` objects; the runner (``drkeras.experiment``) writes
them with :func:`write_results` to ``results.csv`` (long format, one line per cell) and
``results.md`` (one table per paper table, "ours" and "paper" side by side).

Example::

    table = ResultsTable(
        "table2", "Table 2: Dice (%) of lesion segmentation, IDRiD",
        ["Red lesions", "Yellow lesions"],
        paper={"UNet": {"Red lesions": 62.25, "Yellow lesions": 76.03}},
        digits=2,
    )
    for run in range(3):
        table.add("UNet", "Red lesions", dice_red[run])     # one value per run
    write_results([table], out_dir, allow_missing=True)

Our numbers are entered in the unit the paper uses (percent where the paper prints percent).
"""

from __future__ import annotations

import math
import pathlib
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pandas as pd

from drkeras.metrics import mean_std

__all__ = ["ResultsTable", "write_results"]

MISSING = "—"
NOT_RUN = "not run"
CSV_COLUMNS = ("table", "row", "column", "ours_mean", "ours_std", "n_runs", "paper")


class ResultsTable:
    """One table of a paper: rows (methods, ablations) by columns (metrics, datasets).

    Args:
        name: short identifier, unique within a run (``table2``); the ``table`` column of the CSV.
        title: heading of the markdown table (``Table 2: Dice (%) ...``).
        columns: the column names, in order.
        row_header: heading of the first markdown column.
        paper: the paper's published numbers keyed ``[row][column]``; those rows come first.
        digits: decimals shown in markdown (the CSV keeps full precision).

    Example::

        >>> t = ResultsTable("t1", "Table 1", ["Acc"], paper={"ours": {"Acc": 0.9}})
        >>> t.add("ours", "Acc", [0.8, 0.9])
        >>> t.rows()
        ['ours']
    """

    def __init__(
        self,
        name: str,
        title: str,
        columns: Sequence[str],
        *,
        row_header: str = "Method",
        paper: Optional[Mapping[str, Mapping[str, float]]] = None,
        digits: int = 3,
    ):
        if not name or not isinstance(name, str):
            raise ValueError("ResultsTable needs a non-empty name")
        self.name = name
        self.title = title
        self.columns = [str(c) for c in columns]
        if len(set(self.columns)) != len(self.columns):
            raise ValueError(f"table {name!r}: duplicate column names in {self.columns}")
        if not self.columns:
            raise ValueError(f"table {name!r}: no columns")
        self.row_header = row_header
        self.digits = int(digits)
        self.paper: Dict[str, Dict[str, float]] = {}
        self._rows: List[str] = []
        self._values: Dict[Tuple[str, str], List[float]] = {}
        for row, cells in (paper or {}).items():
            self._add_row(row)
            for column, value in cells.items():
                self._check_column(column, "paper")
                self.paper.setdefault(row, {})[column] = float(value)

    def _add_row(self, row: str) -> None:
        if row not in self._rows:
            self._rows.append(row)

    def _check_column(self, column: str, where: str) -> None:
        if column not in self.columns:
            raise ValueError(
                f"table {self.name!r}: unknown column {column!r} in {where}; "
                f"columns are {self.columns}"
            )

    def add(self, row: str, column: str, value: Union[float, Sequence[float]]) -> None:
        """Record our value(s) for a cell; several values (or several calls) are several runs."""
        self._check_column(column, f"add({row!r}, ...)")
        values = np.asarray(value, np.float64).ravel().tolist()
        if not values:
            raise ValueError(f"table {self.name!r}: add({row!r}, {column!r}) got no values")
        self._add_row(row)
        self._values.setdefault((row, column), []).extend(values)

    def rows(self) -> List[str]:
        """Row names in insertion order: the paper's rows first, then rows only we have."""
        return list(self._rows)

    def values(self, row: str, column: str) -> List[float]:
        """Our recorded values (runs) of a cell, empty if none."""
        return list(self._values.get((row, column), []))

    def paper_value(self, row: str, column: str) -> float:
        """The paper's value of a cell, NaN when the paper does not report it."""
        return self.paper.get(row, {}).get(column, float("nan"))

    def missing(self) -> List[Tuple[str, str]]:
        """Cells the paper reports that have no value of ours, as ``(row, column)``."""
        return [
            (row, column)
            for row in self._rows
            for column in self.columns
            if column in self.paper.get(row, {}) and (row, column) not in self._values
        ]

    def to_frame(self) -> pd.DataFrame:
        """Long format: one line per cell that we or the paper report.

        Columns ``row, column, ours_mean, ours_std, n_runs, paper``; ``ours_std`` is the sample
        standard deviation (NaN for a single run), ``paper`` NaN when not published.
        """
        records = []
        for row in self._rows:
            for column in self.columns:
                ours = self._values.get((row, column), [])
                paper = self.paper_value(row, column)
                if not ours and math.isnan(paper):
                    continue
                mean, std = mean_std(ours) if ours else (float("nan"), float("nan"))
                records.append(
                    {
                        "row": row,
                        "column": column,
                        "ours_mean": mean,
                        "ours_std": std,
                        "n_runs": len(ours),
                        "paper": paper,
                    }
                )
        frame = pd.DataFrame.from_records(records, columns=list(CSV_COLUMNS[1:]))
        return frame.astype({"n_runs": "int64"})

    def _fmt(self, value: float) -> str:
        return f"{value:.{self.digits}f}"

    def _ours_cell(self, row: str, column: str) -> str:
        ours = self._values.get((row, column), [])
        if not ours:
            return NOT_RUN if column in self.paper.get(row, {}) else MISSING
        mean, std = mean_std(ours)
        if len(ours) > 1:
            return f"{self._fmt(mean)} ± {self._fmt(std)}"
        return self._fmt(mean)

    def to_markdown(self) -> str:
        """``### title`` and a markdown table; each column shows ``ours`` then ``paper``.

        Several runs show ``mean ± std``; a value the paper does not report shows ``—``; a
        paper value without ours shows ``not run``.
        """
        header = [self.row_header]
        for column in self.columns:
            header += [f"{column} (ours)", f"{column} (paper)"]
        lines = [f"### {self.title}", "", _md_row(header), _md_row(["---"] * len(header))]
        for row in self._rows:
            cells = [row]
            for column in self.columns:
                paper = self.paper_value(row, column)
                cells += [
                    self._ours_cell(row, column),
                    MISSING if math.isnan(paper) else self._fmt(paper),
                ]
            lines.append(_md_row(cells))
        return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|")


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(_escape(c) if c != "---" else c for c in cells) + " |"


def write_results(
    tables: Sequence[ResultsTable],
    out_dir,
    *,
    stem: str = "results",
    allow_missing: bool = False,
) -> Tuple[pathlib.Path, pathlib.Path]:
    """Write ``{stem}.csv`` (long format, all tables) and ``{stem}.md`` (all tables) to ``out_dir``.

    The CSV columns are ``table,row,column,ours_mean,ours_std,n_runs,paper``; NaN is written as
    an empty field. Raises ``ValueError`` listing every cell the paper reports that has no value
    of ours, unless ``allow_missing`` (then those cells read "not run" in the markdown), so a
    reproduction cannot silently drop a row of the paper's table.

    Returns:
        ``(csv_path, md_path)``.

    Example::

        >>> csv_path, md_path = write_results([table], "runs/mtunet_smoke")
    """
    tables = list(tables)
    names = [t.name for t in tables]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"write_results: duplicate table names {duplicates}")
    if not allow_missing:
        missing = [f"{t.name}[{r}, {c}]" for t in tables for r, c in t.missing()]
        if missing:
            raise ValueError(
                f"write_results: no result of ours for {len(missing)} cell(s) the paper reports: "
                + ", ".join(missing)
                + " (run them, or pass allow_missing=True to show them as 'not run')"
            )
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = [t.to_frame().assign(table=t.name) for t in tables]
    frame = (
        pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CSV_COLUMNS))
    )
    csv_path = out / f"{stem}.csv"
    md_path = out / f"{stem}.md"
    frame[list(CSV_COLUMNS)].to_csv(csv_path, index=False, lineterminator="\n")
    md_path.write_text("\n".join(t.to_markdown() for t in tables), encoding="utf-8")
    return csv_path, md_path
