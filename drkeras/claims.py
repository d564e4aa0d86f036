"""The papers' directional claims, checked over seeds: mean ± std, a paired test and a verdict.

Each experiment declares its paper's claims as :class:`Claim` values (``CLAIMS`` in
``experiments/<paper>.py``): in one results table and column, one row above (or below) others.
Several runs of the same preset with different ``--seed`` each write ``results.csv``
(:func:`drkeras.results.write_results`); :func:`check_claims` reads the cell of every run and
compares the rows seed by seed:

- the difference ``better - other`` per seed (sign flipped when lower is better), its mean and
  sample standard deviation;
- a one-sided paired t-test (``scipy.stats.ttest_rel``) of the claimed direction, and of the
  opposite one;
- the verdict: ``holds`` when the claimed direction has p < ``alpha`` (0.05), ``reversed`` when
  the opposite one has, ``not shown`` otherwise (also when fewer than two seeds have both
  values); ``no values`` when no run has one of the two rows (a row the preset does not
  run). When every seed gives the same non-zero difference the t statistic is undefined; the
  direction is then taken as shown (p reported as 0).

Three seeds give a paired t-test two degrees of freedom: a claim "holds" only when its three
differences agree closely. The verdicts are reported as they come; nothing is tuned towards them.

Command::

    python -m drkeras.claims --experiment mtunet runs/evidence/mtunet_seed0 \\
        runs/evidence/mtunet_seed1 runs/evidence/mtunet_seed2 --out claims_mtunet.md
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import pathlib
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Claim", "check_claims", "claims_markdown", "main", "read_cells"]

VERDICTS = ("holds", "not shown", "reversed", "no values")


@dataclasses.dataclass(frozen=True)
class Claim:
    """One directional claim of a paper.

    Attributes:
        source: where the paper makes it (``Table 1``, ``section 4.3``).
        text: the claim in a few words.
        table, column: the results table (``ResultsTable.name``) and column compared.
        better: the row the paper finds better.
        than: the rows it is better than (one comparison each).
        lower_is_better: the column is an error (lower wins).
    """

    source: str
    text: str
    table: str
    column: str
    better: str
    than: Tuple[str, ...]
    lower_is_better: bool = False


def read_cells(run_dir) -> Dict[Tuple[str, str, str], float]:
    """``{(table, row, column): ours_mean}`` of ``<run_dir>/results.csv`` (empty cells left out).

    Raises:
        FileNotFoundError: naming the run directory without ``results.csv``.
        ValueError: naming the file when it lacks the results columns.
    """
    import pandas as pd

    path = pathlib.Path(run_dir) / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.csv (has the run finished?)")
    frame = pd.read_csv(path, keep_default_na=True)
    needed = {"table", "row", "column", "ours_mean"}
    if not needed <= set(frame.columns):
        raise ValueError(
            f"{path}: expected the columns {sorted(needed)}, got {list(frame.columns)}"
        )
    cells = {}
    for table, row, column, value in frame[["table", "row", "column", "ours_mean"]].itertuples(
        index=False
    ):
        if isinstance(value, (int, float)) and math.isfinite(value):
            cells[(str(table), str(row), str(column))] = float(value)
    return cells


def _one_sided_p(differences: np.ndarray) -> float:
    """p of the paired t-test that the mean difference is > 0 (0 when all differences are
    equal and positive, 1 when equal and not positive)."""
    from scipy import stats

    if np.all(differences == differences[0]):
        return 0.0 if differences[0] > 0 else 1.0
    return float(stats.ttest_1samp(differences, 0.0, alternative="greater").pvalue)


def check_claims(claims: Sequence[Claim], run_dirs: Sequence, *, alpha: float = 0.05) -> List[dict]:
    """One entry per comparison (``claim.better`` against each row of ``claim.than``).

    Each entry holds the claim, the rows, the values per seed (``None`` where a run has no
    value), mean and std of both rows and of the difference, the p-values of both directions,
    the number of seeds compared and the verdict (module docstring).
    """
    cells = [read_cells(d) for d in run_dirs]
    out = []
    for claim in claims:
        for other in claim.than:
            a = [c.get((claim.table, claim.better, claim.column)) for c in cells]
            b = [c.get((claim.table, other, claim.column)) for c in cells]
            pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
            entry = {
                "claim": claim,
                "better": claim.better,
                "other": other,
                "values_better": a,
                "values_other": b,
                "seeds": len(pairs),
                "mean_better": _mean([x for x, _ in pairs]),
                "std_better": _std([x for x, _ in pairs]),
                "mean_other": _mean([y for _, y in pairs]),
                "std_other": _std([y for _, y in pairs]),
                "mean_difference": None,
                "std_difference": None,
                "p_claimed": None,
                "p_opposite": None,
                "verdict": "not shown",
            }
            if not any(v is not None for v in a) or not any(v is not None for v in b):
                # a misspelt row, or a row this preset does not run: shown, never hidden
                entry["verdict"] = "no values"
            elif len(pairs) >= 2:
                sign = -1.0 if claim.lower_is_better else 1.0
                diff = sign * np.array([x - y for x, y in pairs], dtype=np.float64)
                p_claimed, p_opposite = _one_sided_p(diff), _one_sided_p(-diff)
                entry.update(
                    mean_difference=float(diff.mean()),
                    std_difference=_std(list(diff)),
                    p_claimed=p_claimed,
                    p_opposite=p_opposite,
                )
                if p_claimed < alpha:
                    entry["verdict"] = "holds"
                elif p_opposite < alpha:
                    entry["verdict"] = "reversed"
            out.append(entry)
    return out


def _mean(values: Sequence[float]) -> Optional[float]:
    return float(np.mean(values)) if values else None


def _std(values: Sequence[float]) -> Optional[float]:
    return float(np.std(values, ddof=1)) if len(values) > 1 else None


def _fmt(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "—"
    return _fmt(mean) + ("" if std is None else f" ± {_fmt(std)}")


def claims_markdown(title: str, results: Sequence[dict], runs: Sequence, note: str = "") -> str:
    """A markdown table of :func:`check_claims`' entries, headed by ``title`` and the runs."""
    lines = [f"## {title}", ""]
    lines.append(f"Runs ({len(runs)}): " + ", ".join(f"`{r}`" for r in runs) + ".")
    if note:
        lines += ["", note]
    lines += [
        "",
        "| source | claim | table, column | better row | other row | seeds | better | other "
        "| difference (claimed direction) | p (one-sided, paired t) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in results:
        c = e["claim"]
        arrow = " (lower is better)" if c.lower_is_better else ""
        lines.append(
            "| "
            + " | ".join(
                [
                    c.source,
                    c.text,
                    f"{c.table}, {c.column}{arrow}",
                    e["better"],
                    e["other"],
                    str(e["seeds"]),
                    _pm(e["mean_better"], e["std_better"]),
                    _pm(e["mean_other"], e["std_other"]),
                    _pm(e["mean_difference"], e["std_difference"]),
                    _fmt(e["p_claimed"], 3),
                    f"**{e['verdict']}**",
                ]
            )
            + " |"
        )
    counts = {v: sum(e["verdict"] == v for e in results) for v in VERDICTS}
    lines += ["", "Verdicts: " + ", ".join(f"{n} {v}" for v, n in counts.items()) + "."]
    return "\n".join(lines) + "\n"


def experiment_claims(name: str) -> Tuple[str, Tuple[Claim, ...]]:
    """``(title, CLAIMS)`` of ``experiments/<name>.py``."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    module = importlib.import_module(f"experiments.{name}")
    claims = getattr(module, "CLAIMS", None)
    if not claims:
        raise ValueError(f"experiments/{name}.py declares no CLAIMS")
    return module.__doc__.strip().splitlines()[0], tuple(claims)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m drkeras.claims",
        description="Check an experiment's paper claims over runs with different seeds.",
    )
    parser.add_argument("--experiment", required=True, help="mtunet, pldmlt, collaborative, ...")
    parser.add_argument("runs", nargs="+", help="run directories (each with results.csv)")
    parser.add_argument("--out", required=True, help="markdown file to write")
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args(argv)
    try:
        title, claims = experiment_claims(args.experiment)
        results = check_claims(claims, args.runs, alpha=args.alpha)
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = claims_markdown(title, results, args.runs)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
