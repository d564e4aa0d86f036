"""Claims over seeds: per-seed cells from results.csv, paired one-sided t-tests, verdicts."""

import numpy as np
import pytest
from scipy import stats

from drkeras.claims import Claim, check_claims, claims_markdown, main, read_cells
from drkeras.results import ResultsTable, write_results


def _run(tmp_path, name, cells):
    """A run directory whose results.csv holds ``{(row, column): value}`` of table ``t1``."""
    table = ResultsTable("t1", "Table 1", ["Dice", "Error"])
    for (row, column), value in cells.items():
        table.add(row, column, value)
    write_results([table], tmp_path / name, allow_missing=True)
    return tmp_path / name


def _runs(tmp_path, c_values, a_values, column="Dice"):
    return [
        _run(tmp_path, f"seed{k}", {("C", column): c, ("A", column): a})
        for k, (c, a) in enumerate(zip(c_values, a_values))
    ]


def test_read_cells_and_missing_file(tmp_path):
    run = _run(tmp_path, "r", {("C", "Dice"): 70.5, ("A", "Error"): 3.0})
    assert read_cells(run) == {("t1", "C", "Dice"): 70.5, ("t1", "A", "Error"): 3.0}
    with pytest.raises(FileNotFoundError, match="nowhere.*results.csv"):
        read_cells(tmp_path / "nowhere")


def test_paired_t_test_and_verdicts_by_hand(tmp_path):
    claim = Claim("Table 1", "C above A", "t1", "Dice", "C", ("A",))
    # differences 1, 2, 3: t = 2 / (1 / sqrt 3) = 3.464 with 2 degrees of freedom
    runs = _runs(tmp_path, [71.0, 62.0, 53.0], [70.0, 60.0, 50.0])
    (entry,) = check_claims([claim], runs)
    assert entry["seeds"] == 3
    assert entry["mean_difference"] == pytest.approx(2.0)
    assert entry["std_difference"] == pytest.approx(1.0)
    t = 2.0 / (1.0 / np.sqrt(3.0))
    assert entry["p_claimed"] == pytest.approx(stats.t.sf(t, df=2))
    expected = stats.ttest_rel([71.0, 62.0, 53.0], [70.0, 60.0, 50.0], alternative="greater")
    assert entry["p_claimed"] == pytest.approx(expected.pvalue)
    assert entry["p_claimed"] < 0.05 and entry["verdict"] == "holds"
    assert entry["mean_better"] == pytest.approx(62.0) and entry["std_better"] == pytest.approx(9.0)


def test_reversed_not_shown_and_lower_is_better(tmp_path):
    claim = Claim("Table 1", "C above A", "t1", "Dice", "C", ("A",))
    reversed_runs = _runs(tmp_path / "rev", [70.0, 60.0, 50.0], [71.0, 62.0, 53.0])
    assert check_claims([claim], reversed_runs)[0]["verdict"] == "reversed"
    mixed = _runs(tmp_path / "mixed", [71.0, 59.0, 52.0], [70.0, 60.0, 50.0])
    assert check_claims([claim], mixed)[0]["verdict"] == "not shown"
    # an error column: C's lower error is the claimed direction
    error = Claim("Table 1", "C errs less", "t1", "Error", "C", ("A",), lower_is_better=True)
    runs = _runs(tmp_path / "err", [1.0, 2.0, 3.0], [2.0, 4.0, 6.0], column="Error")
    (entry,) = check_claims([error], runs)
    assert entry["mean_difference"] == pytest.approx(2.0) and entry["verdict"] == "holds"


def test_equal_differences_and_too_few_seeds(tmp_path):
    claim = Claim("Table 1", "C above A", "t1", "Dice", "C", ("A",))
    same = _runs(tmp_path / "same", [71.0, 61.0], [70.0, 60.0])
    (entry,) = check_claims([claim], same)
    assert entry["p_claimed"] == 0.0 and entry["verdict"] == "holds"
    tied = _runs(tmp_path / "tied", [70.0, 60.0], [70.0, 60.0])
    assert check_claims([claim], tied)[0]["verdict"] == "not shown"
    one = _runs(tmp_path / "one", [90.0], [10.0])
    (entry,) = check_claims([claim], one)
    assert entry["seeds"] == 1 and entry["verdict"] == "not shown"
    assert entry["p_claimed"] is None
    # a run without the other row's value is left out of the pairs, never filled in
    runs = same + [_run(tmp_path, "partial", {("C", "Dice"): 99.0})]
    (entry,) = check_claims([claim], runs)
    assert entry["seeds"] == 2 and entry["values_other"][2] is None


def test_markdown_and_command_line(tmp_path, capsys):
    claim = Claim("Table 1", "C above A", "t1", "Dice", "C", ("A",))
    runs = _runs(tmp_path, [71.0, 62.0, 53.0], [70.0, 60.0, 50.0])
    text = claims_markdown("Paper", check_claims([claim], runs), runs)
    assert "| Table 1 | C above A | t1, Dice | C | A | 3 | 62.00 ± 9.00 | 60.00 ± 10.00 |" in text
    assert "**holds**" in text
    assert "Verdicts: 1 holds, 0 not shown, 0 reversed, 0 no values." in text
    absent = Claim("Table 1", "C above B", "t1", "Dice", "C", ("B",))
    assert check_claims([absent], runs)[0]["verdict"] == "no values"
    out = tmp_path / "c.md"
    missing = main(["--experiment", "mtunet", str(tmp_path / "absent"), "--out", str(out)])
    assert missing == 2 and "absent" in capsys.readouterr().err
    assert not out.exists()
