"""The leaderboard CLI: its cells are evaluate's numbers, missing outputs stay empty, bad
arguments are refused before anything runs."""

import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

from drkeras import evaluate, keys
from drkeras import leaderboard as L
from drkeras.export import PATCH_EXPORT_FILE, export_model
from tests.conftest import (
    REPO,
    TINY_MODEL_SIZE,
    TINY_PREPROCESS,
    TINY_RED_YELLOW,
    tiny_joint_model,
    write_synthetic_test_records,
)

LESIONS = ("MA", "HE", "EX", "SE")
# Where evaluate's metrics.csv holds each cell, written out here independently of the module.
EXPECTED_SOURCE = {
    "grading_accuracy": ("grading", "accuracy", "all"),
    "grading_kappa": ("grading", "kappa", "all"),
    "referable_auc": ("screening", "referable_auc", "icdrs"),
    **{f"{x}_pr_auc": (keys.LESION_PROBS, "pr_auc_ap", x) for x in LESIONS},
    **{f"{x}_roc_auc": (keys.LESION_PROBS, "roc_auc", x) for x in LESIONS},
    **{f"{x}_dice": (keys.LESION_PROBS, "dice_pooled", x) for x in LESIONS},
}
SEGMENTATION_COLUMNS = [c for c in EXPECTED_SOURCE if c.split("_")[0] in LESIONS]
SETTINGS = ["--batch-size", "3", "--num-thresholds", "200", "--overlays", "1"]


def _export(run_dir, name, seed, outputs, channels=None):
    tf.keras.utils.set_random_seed(seed)
    return export_model(
        tiny_joint_model(),
        run_dir / "export" / name,
        image_size=TINY_MODEL_SIZE,
        preprocess=TINY_PREPROCESS,
        output_names=outputs,
        channels=channels,
    )


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    """Two runs (grading + segmentation; grading only), the records, one leaderboard run."""
    root = tmp_path_factory.mktemp("lb")
    joint = _export(
        root / "joint_run",
        "joint",
        1,
        [keys.GRADE_PROBS, keys.LESION_PROBS, keys.SEG_PROBS],
        {keys.SEG_PROBS: TINY_RED_YELLOW},
    )
    grader = _export(root / "grader_run", "grader", 2, [keys.GRADE_PROBS])
    data = write_synthetic_test_records(root / "records")
    out = root / "board"
    # the grader is named by its export folder, the joint model by its run folder
    argv = [str(root / "joint_run"), str(grader), "--data", str(data), "--out", str(out)]
    code = L.main(argv + SETTINGS + ["--latency-images", "3", "--no-progress"])
    assert code == 0
    return {"root": root, "data": data, "out": out, "exports": {"joint": joint, "grader": grader}}


@pytest.fixture(scope="module")
def references(board, tmp_path_factory):
    """evaluate's own metrics.csv of each model, run through its CLI with the same settings."""
    frames = {}
    for name, path in board["exports"].items():
        out = tmp_path_factory.mktemp(f"ref_{name}")
        argv = ["--model", str(path), "--data", str(board["data"]), "--out", str(out)]
        assert evaluate.main(argv + SETTINGS + ["--no-progress"]) == 0
        frames[name] = pd.read_csv(out / "metrics.csv", keep_default_na=False, na_values=[""])
    return frames


def _ref_value(frame, task, metric, target):
    hit = frame[(frame.task == task) & (frame.metric == metric) & (frame.target == target)]
    assert len(hit) <= 1
    return float(hit.value.iloc[0]) if len(hit) else None


def _md_rows(md):
    """The leaderboard table of the markdown as {run: {header: cell}}."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    headers = [h.strip() for h in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(headers, cells))
    return rows


def test_cells_equal_evaluate_output(board, references):
    out = board["out"]
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.png"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*tmp"))  # the staging folder is gone
    table = pd.read_csv(out / "leaderboard.csv", dtype=str, keep_default_na=False)
    assert list(table["run"]) == ["joint_run", "grader_run"]
    assert list(table["export"]) == ["joint", "grader"]
    md = (out / "leaderboard.md").read_text()
    md_rows = _md_rows(md)
    labels = {c.name: c.label for c in L.COLUMNS}
    for name, run in (("joint", "joint_run"), ("grader", "grader_run")):
        row = table[table.run == run].iloc[0]
        ref = references[name]
        # the per-model folder is evaluate's full output, the same numbers
        kept = pd.read_csv(out / "models" / f"{run}__{name}" / "metrics.csv")
        assert (out / "models" / f"{run}__{name}" / "metrics.md").is_file()
        pd.testing.assert_frame_equal(kept, ref)
        for column, source in EXPECTED_SOURCE.items():
            expected = _ref_value(ref, *source)
            cell, md_cell = row[column], md_rows[run][labels[column]]
            if expected is None:
                assert (cell, md_cell) == ("", "—"), (name, column)
            elif math.isnan(expected):
                assert (cell, md_cell) == ("", "n/a"), (name, column)
            else:
                assert float(cell) == pytest.approx(expected, rel=1e-9, abs=1e-12), (name, column)
                assert md_cell == f"{expected:.4f}", (name, column)
        # neither model serves an image score
        assert row["image_auc"] == "" and md_rows[run]["image AUC"] == "—"
        assert float(row["latency_ms_per_image"]) > 0
    joint = table[table.run == "joint_run"].iloc[0]
    assert joint["lesion_outputs"] == keys.LESION_PROBS
    assert sum(not math.isnan(float(joint[c] or "nan")) for c in SEGMENTATION_COLUMNS) >= 6
    assert (table[table.run == "grader_run"][SEGMENTATION_COLUMNS] == "").all(axis=None)
    assert "Records `" in md and "split `test`, 6 images" in md
    assert f"os.cpu_count() = {os.cpu_count()}" in md and "Median of 3 calls" in md
    assert "`joint_run__joint`: seg_probs channel red = MA + HE" in md
    with Image.open(out / "leaderboard.png") as img:
        assert img.size == (1200, 800)


def test_models_at_chance_are_named(board, references):
    """Each model's chance line follows the rules applied here to evaluate's own numbers."""
    md = (board["out"] / "leaderboard.md").read_text()
    majority = 0.2  # known grades 0, 1, 2, 3, 4 once each
    assert "share of the most frequent grade, here 0.200 (grade 0)" in md
    for name, run in (("joint", "joint_run"), ("grader", "grader_run")):
        ref = references[name]
        kappa = _ref_value(ref, "grading", "kappa", "all")
        accuracy = _ref_value(ref, "grading", "accuracy", "all")
        aucs = [_ref_value(ref, "screening", "referable_auc", "icdrs")]
        aucs += [_ref_value(ref, keys.LESION_PROBS, "roc_auc", x) for x in LESIONS]
        at_chance = (
            abs(kappa) <= 0.05
            or accuracy <= majority
            or any(v is not None and abs(v - 0.5) <= 0.02 for v in aucs)
        )
        assert (f"- `{run}__{name}` is at chance:" in md) == at_chance, name
        if abs(kappa) <= 0.05:
            assert f"grading kappa {kappa:.3f} within ±0.05 of 0" in md


def test_chance_rules_on_hand_values():
    assert L.chance_notes({"grading_kappa": -0.05}) == ["grading kappa -0.050 within ±0.05 of 0"]
    assert L.chance_notes({"grading_kappa": 0.051, "grading_accuracy": 0.41}, (0, 0.4)) == []
    assert L.chance_notes({"grading_accuracy": 0.4}, (2, 0.4)) == [
        "grading accuracy 0.400 not above the share of the most frequent grade (2: 0.400)"
    ]
    notes = L.chance_notes({"MA_roc_auc": 0.515, "HE_roc_auc": 0.525, "image_auc": 0.49})
    assert notes == [
        "image AUC 0.490 within 0.5±0.02",
        "MA pixel AUC-ROC 0.515 within 0.5±0.02",
    ]
    # missing outputs and undefined values are never at chance
    assert L.chance_notes({"grading_kappa": None, "EX_roc_auc": float("nan")}, (0, 0.5)) == []


def test_values_from_a_metrics_frame():
    frame = pd.DataFrame(
        [
            ("screening", "referable_auc", "messidor", 0.8),
            ("image_score", "abnormal_auc", "all", 0.7),
            (keys.SEG_PROBS, "pr_auc_ap", "red", 0.9),
            (keys.SEG_PROBS, "pr_auc_ap", "exudates", 0.6),
            (keys.SEG_PROBS, "roc_auc", "exudates", float("nan")),
            (keys.SEG_PROBS, "dice_pooled", "exudates", 0.3),
        ],
        columns=list(evaluate.METRIC_COLUMNS),
    )
    meta = {
        "outputs": {
            keys.GRADE_PROBS: {"shape": [None, 5], "channels": None},
            keys.SEG_PROBS: {
                "shape": [None, 8, 8, 3],
                "channels": [["background", []], ["red", ["MA", "HE"]], ["exudates", ["EX"]]],
            },
        }
    }
    sources, joined = L.lesion_sources(meta)
    assert sources == {"EX": (keys.SEG_PROBS, "exudates")}
    assert joined == ["seg_probs channel red = MA + HE"]
    values = L.leaderboard_values(frame, sources)
    assert values["referable_auc"] == 0.8  # messidor scale: the target is the scale
    assert values["image_auc"] == 0.7
    assert values["grading_kappa"] is None and values["grading_accuracy"] is None
    assert values["EX_pr_auc"] == 0.6 and values["EX_dice"] == 0.3
    assert math.isnan(values["EX_roc_auc"])
    assert all(values[f"{x}_{m}"] is None for x in ("MA", "HE", "SE") for m in ("pr_auc", "dice"))
    # lesion_probs is preferred over seg_probs for the same lesion
    meta["outputs"][keys.LESION_PROBS] = {"shape": [None, 8, 8, 1], "channels": [["EX", ["EX"]]]}
    assert L.lesion_sources(meta)[0] == {"EX": (keys.LESION_PROBS, "EX")}
    twice = pd.concat([frame, frame.iloc[:1]])
    with pytest.raises(ValueError, match="2 rows for column referable_auc"):
        L.leaderboard_values(twice, sources)


def test_figure_leaves_missing_values_out(tmp_path, monkeypatch):
    nan = float("nan")
    row = {c.name: None for c in L.COLUMNS}
    full = dict(row, grading_accuracy=0.5, grading_kappa=-0.2, MA_pr_auc=0.3, MA_dice=nan)
    table = pd.DataFrame(
        [
            {"run": "a", "export": "x", **full, L.LATENCY: 4.0},
            {"run": "b", "export": "y", **row, "grading_kappa": 0.1, L.LATENCY: None},
        ],
        dtype=object,
    )
    figures = []
    real_save = L.plots.save_figure
    monkeypatch.setattr(
        L.plots, "save_figure", lambda fig, path: figures.append(fig) or real_save(fig, path)
    )
    path = L.plot_leaderboard(table, tmp_path / "lb.png")
    with Image.open(path) as img:
        assert img.size == (1200, 800)
    axes = figures[0].axes
    bars = {ax.get_title(): [p.get_height() for p in ax.patches] for ax in axes[:3]}
    assert sorted(bars["image level"]) == pytest.approx([-0.2, 0.1, 0.5])
    assert bars["pixel AUC-PR (average precision)"] == pytest.approx([0.3])
    assert bars["Dice (pooled over the split)"] == []  # NaN and missing: no bar, not 0
    assert axes[3].get_title() == "latency"
    assert [p.get_width() for p in axes[3].patches] == pytest.approx([4.0])  # b not measured


def test_find_exports(tmp_path):
    def fake_export(path):
        path.mkdir(parents=True)
        (path / "saved_model.pb").write_bytes(b"")
        return path

    a = fake_export(tmp_path / "run_a" / "export" / "m1")
    fake_export(tmp_path / "run_a" / "export" / "m2")
    fake_export(tmp_path / "run_a" / "export" / "m3.tmp")  # an export cut short
    loose = fake_export(tmp_path / "elsewhere" / "m9")
    found = L.find_exports([tmp_path / "run_a", a, tmp_path / "run_a" / "export", loose])
    assert [e.key for e in found] == ["run_a__m1", "run_a__m2", "elsewhere__m9"]
    fake_export(tmp_path / "other" / "run_a" / "export" / "m1")
    with pytest.raises(ValueError, match="both be reported as 'run_a__m1'"):
        L.find_exports([tmp_path / "run_a", tmp_path / "other" / "run_a"])
    # a run's patch classifier (SSL-GAN) serves patches, not photographs: left out of a run
    patches = fake_export(tmp_path / "run_a" / "export" / "m0_patches")
    (patches / "assets.extra").mkdir()
    (patches / PATCH_EXPORT_FILE).write_text("{}")
    assert [e.key for e in L.find_exports([tmp_path / "run_a"])] == ["run_a__m1", "run_a__m2"]


def test_bad_arguments_exit_2_before_any_evaluation(board, tmp_path, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(L.evaluation, "evaluate", lambda *a, **k: calls.append(a))
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    out = tmp_path / "out"
    good = str(board["root"] / "joint_run")
    for bad, what in ((empty, "holds no exported model"), (tmp_path / "gone", "does not exist")):
        code = L.main([good, str(bad), "--data", str(board["data"]), "--out", str(out)])
        assert code == 2
        err = capsys.readouterr().err
        assert f"{bad} {what}" in err and "export/<name>/saved_model.pb" in err
        assert not out.exists()
    assert calls == []


def test_bad_records_leave_no_output(board, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [str(board["root"] / "grader_run"), "--data", str(tmp_path / "none"), "--out", str(out)]
    assert L.main(argv + ["--no-progress"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()
    # evaluate's own checks reach the command line: exit 2, nothing left
    good = [str(board["root"] / "grader_run"), "--data", str(board["data"]), "--out", str(out)]
    for bad, message in (
        (["--batch-size", "0"], "batch_size must be at least 1, got 0"),
        (["--latency-images", "-1"], "latency_images must be 0 or more, got -1"),
    ):
        assert L.main(good + ["--no-progress"] + bad) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_command_line_refusal(tmp_path):
    """``python -m drkeras.leaderboard`` itself: exit code 2 and the path in the message."""
    empty = tmp_path / "empty_run"
    empty.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "drkeras.leaderboard", str(empty), "--data", "x", "--out", "y"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert f"error: {empty} holds no exported model" in proc.stderr
    assert not (tmp_path / "y").exists()


def test_latency_is_a_median_of_single_image_calls():
    class Fake:
        def __init__(self):
            self.batches = []
            self.signatures = {"serving_default": self.serve}

        def serve(self, images):
            self.batches.append(images.shape)
            return {"grade_probs": tf.zeros([1, 5])}

    fake = Fake()
    images = [np.zeros((20, 30, 3), np.uint8), np.zeros((24, 24, 3), np.uint8)]
    assert L.serving_latency_ms(fake, images) > 0
    # one warm-up call, then one call per image, each a batch of one
    assert [tuple(s) for s in fake.batches] == [(1, 20, 30, 3), (1, 20, 30, 3), (1, 24, 24, 3)]
    assert L.serving_latency_ms(fake, []) is None
