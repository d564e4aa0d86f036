"""Results tables: exact CSV and markdown contents of a small table."""

import math

import pandas as pd
import pytest

from drkeras.results import ResultsTable, write_results


def _table():
    t = ResultsTable(
        "table2",
        "Table 2: Dice (%)",
        ["Red", "Yellow"],
        paper={"UNet": {"Red": 62.25, "Yellow": 76.03}, "MTUnet": {"Red": 75.15}},
        digits=2,
    )
    t.add("UNet", "Red", [60.0, 62.0, 64.0])  # mean 62, sample std 2
    t.add("UNet", "Yellow", 70.5)
    t.add("MTUnet", "Red", 74.0)
    t.add("MTUnet", "Red", 76.0)  # a second run through a second call
    t.add("Ablation | no grading", "Yellow", 80.125)
    return t


def test_rows_order_and_frame():
    t = _table()
    assert t.rows() == ["UNet", "MTUnet", "Ablation | no grading"]
    frame = t.to_frame()
    assert list(frame.columns) == ["row", "column", "ours_mean", "ours_std", "n_runs", "paper"]
    assert len(frame) == 4  # MTUnet/Yellow and Ablation/Red have neither value
    unet_red = frame[(frame.row == "UNet") & (frame.column == "Red")].iloc[0]
    assert (unet_red.ours_mean, unet_red.ours_std, unet_red.n_runs, unet_red.paper) == (
        62.0,
        2.0,
        3,
        62.25,
    )
    mt = frame[frame.row == "MTUnet"].iloc[0]
    assert mt.ours_mean == 75.0 and mt.ours_std == pytest.approx(math.sqrt(2.0))
    abl = frame[frame.row == "Ablation | no grading"].iloc[0]
    assert math.isnan(abl.ours_std) and math.isnan(abl.paper) and abl.n_runs == 1


def test_markdown_exact():
    expected = (
        "### Table 2: Dice (%)\n"
        "\n"
        "| Method | Red (ours) | Red (paper) | Yellow (ours) | Yellow (paper) |\n"
        "| --- | --- | --- | --- | --- |\n"
        "| UNet | 62.00 ± 2.00 | 62.25 | 70.50 | 76.03 |\n"
        "| MTUnet | 75.00 ± 1.41 | 75.15 | — | — |\n"
        "| Ablation \\| no grading | — | — | 80.12 | — |\n"
    )
    assert _table().to_markdown() == expected


def test_write_results_exact_files(tmp_path):
    other = ResultsTable("t3", "Table 3", ["AUC"], row_header="Grade")
    other.add("No DR", "AUC", 0.5)
    csv_path, md_path = write_results([_table(), other], tmp_path, stem="res")
    assert csv_path == tmp_path / "res.csv" and md_path == tmp_path / "res.md"
    assert csv_path.read_text() == (
        "table,row,column,ours_mean,ours_std,n_runs,paper\n"
        "table2,UNet,Red,62.0,2.0,3,62.25\n"
        "table2,UNet,Yellow,70.5,,1,76.03\n"
        "table2,MTUnet,Red,75.0,1.4142135623730951,2,75.15\n"
        "table2,Ablation | no grading,Yellow,80.125,,1,\n"
        "t3,No DR,AUC,0.5,,1,\n"
    )
    assert md_path.read_text() == (
        _table().to_markdown()
        + "\n### Table 3\n\n| Grade | AUC (ours) | AUC (paper) |\n| --- | --- | --- |\n"
        "| No DR | 0.500 | — |\n"
    )
    back = pd.read_csv(csv_path)
    assert back.n_runs.tolist() == [3, 1, 2, 1, 1]


def test_missing_paper_cells_raise_unless_allowed(tmp_path):
    t = ResultsTable("t1", "Table 1", ["Acc", "Kappa"], paper={"Ours": {"Acc": 0.9, "Kappa": 0.8}})
    t.add("Ours", "Acc", 0.85)
    with pytest.raises(ValueError, match=r"1 cell\(s\).*t1\[Ours, Kappa\]"):
        write_results([t], tmp_path)
    assert not (tmp_path / "results.csv").exists()
    csv_path, md_path = write_results([t], tmp_path, allow_missing=True)
    assert "| Ours | 0.850 | 0.900 | not run | 0.800 |" in md_path.read_text()
    assert csv_path.read_text().splitlines()[2] == "t1,Ours,Kappa,,,0,0.8"


def test_bad_columns_and_names():
    with pytest.raises(ValueError, match="unknown column 'F1'"):
        ResultsTable("t", "T", ["Acc"], paper={"x": {"F1": 1.0}})
    t = ResultsTable("t", "T", ["Acc"])
    with pytest.raises(ValueError, match="unknown column 'AUC'"):
        t.add("x", "AUC", 1.0)
    with pytest.raises(ValueError, match="duplicate table names"):
        write_results([t, ResultsTable("t", "T2", ["Acc"])], "/nonexistent")
