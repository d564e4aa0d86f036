"""The Zhou et al. 2019 experiment: presets hold the paper's settings, and a tiny end-to-end run
on synthetic IDRiD, EyePACS and Messidor layouts fills Tables 1-3, draws Fig. 4-5 and exports
the generator and the grader."""

import csv
import dataclasses
import json
import math

import numpy as np
import pytest

from drkeras import keys
from drkeras.config import resolve_preset
from drkeras.data import augment as aug
from drkeras.data import pipeline
from drkeras.export import load_exported
from experiments.collaborative import (
    COLLABORATIVE_AUGMENT,
    MESSIDOR_COLUMNS,
    PAPER_MESSIDOR,
    PAPER_SEGMENTATION,
    PAPER_TABLE1,
    Collaborative,
    main,
)


def test_paper_preset_holds_section_3_4():
    config = resolve_preset(Collaborative.presets, "paper")
    method = config.method
    assert config.data.image_size == 640 and config.data.batch_size == 16
    assert config.train.epochs == 50
    assert (method.pretrain_seg_epochs, method.pretrain_seg_batch) == (60, 32)
    assert (method.pretrain_grade_epochs, method.pretrain_grade_batch) == (30, 128)
    assert method.lambda_ce == 10.0
    assert method.lesions == ("MA", "HE", "EX", "SE")
    for name in ("generator", "discriminator", "grader"):
        optimizer = config.optimizers[name]
        assert (optimizer.name, optimizer.learning_rate, optimizer.beta_1) == ("adam", 2e-4, 0.5)
    assert method.generator_widths == (32, 64, 128, 256, 512)
    assert config.model.encoder_weights is None


def test_presets_preprocess_augment_and_test_as_section_4_1():
    for preset in ("paper", "smoke"):
        config = resolve_preset(Collaborative.presets, preset)
        # Pre-processing based on [43]: the local-average colour subtraction (Graham's form).
        assert config.data.graham and config.data.augment, preset
        # EyePACS tested on Public + Private (53,576 images): the converter's val and test.
        assert pipeline.split_names(config.method.eyepacs_test_split) == ("val", "test"), preset
    # Flips and rotations (any angle: k x 90 degrees + U(-45, 45)), nothing else.
    flips_and_rotations = dict(
        flip_horizontal=True, flip_vertical=True, rotate90=True, rotation_deg=45.0
    )
    assert COLLABORATIVE_AUGMENT == dataclasses.replace(aug.NO_AUGMENT, **flips_and_rotations)


def _results(path):
    with open(path) as handle:
        return {(r["table"], r["row"], r["column"]): r for r in csv.DictReader(handle)}


def test_tiny_run_fills_every_table_exports_and_draws(tmp_path):
    out = tmp_path / "run"
    overrides = [
        "data.image_size=32",
        "data.batch_size=4",
        "data.synthetic_size=64",
        "data.synthetic_scale=0.5",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "train.verbose=0",
        "method.pretrain_seg_epochs=1",
        "method.pretrain_grade_epochs=1",
        "method.fig4_images=1",
        # Two lesion types: three grading-trunk passes instead of five (the networks and the
        # trainer are tested with four); halves the stage-2 steps and the exports.
        "method.lesions=MA,EX",
    ]
    argv = ["--out", str(out)] + [arg for o in overrides for arg in ("--set", o)]
    assert main(Collaborative(), argv) == 0
    cells = _results(out / "results.csv")

    expected = []
    for dataset, name in (("idrid", "IDRiD"), ("eyepacs", "EyePACS")):
        for row, (acc, kappa) in PAPER_TABLE1[dataset].items():
            expected += [
                ("table1", row, f"{name} Acc.", acc),
                ("table1", row, f"{name} Kappa", kappa),
            ]
    for row, values in PAPER_MESSIDOR.items():
        expected += [("table2", row, c, v) for c, v in zip(MESSIDOR_COLUMNS, values)]
    for row, values in PAPER_SEGMENTATION.items():
        for lesion, (roc, pr) in zip(("MA", "HE", "EX", "SE"), values):
            if lesion not in ("MA", "EX"):
                continue
            name = keys.LESION_NAMES[lesion]
            expected += [
                ("table3", row, f"{name} AUC ROC", roc),
                ("table3", row, f"{name} AUC PR", pr),
            ]
    for table, row, column, paper in expected:
        cell = cells[(table, row, column)]
        assert float(cell["paper"]) == pytest.approx(paper)
        ours = float(cell["ours_mean"])
        # Kappa is NaN only if a model predicts a single grade for every test image.
        assert math.isnan(ours) or -1.0 <= ours <= 1.0, (table, row, column)
        if "Kappa" not in column:
            assert 0.0 <= ours <= 1.0, (table, row, column)

    with open(out / "history.csv") as handle:
        stages = {r["stage"] for r in csv.DictReader(handle)}
    assert {
        "pretrain_ce1",
        "pretrain_ce2",
        "idrid_ori",
        "idrid_lesion_pretrained",
        "idrid_semi",
        "idrid_semi_adv",
        "eyepacs_semi_adv",
    } <= stages
    with open(out / "history.csv") as handle:
        columns = set(next(csv.reader(handle)))
    assert {"ce_loss", "seg_loss", "adv_loss", "d_loss", "grade_loss"} <= columns

    images = np.random.default_rng(0).integers(0, 255, size=(2, 40, 48, 3), dtype=np.uint8)
    # export_model reloaded both SavedModels and compared them with the Keras models; the
    # generator's check is read back, the grader is loaded again here.
    check = json.loads(
        (
            out / "export" / "collaborative_generator" / "assets.extra" / "export_check.json"
        ).read_text()
    )
    assert check["ok"] and set(check["per_output"]) == {keys.LESION_PROBS}
    exported = load_exported(out / "export" / "collaborative_grader")
    # The exports apply the training pre-processing, Graham's step included (the reload check
    # above compared them with the Keras models on prepare_batch of this metadata).
    assert exported.meta["preprocess"] == {
        "fov_crop": True,
        "graham": True,
        "normalization": "unit",
        "quantize": True,
    }
    grader = exported.predict(images)
    np.testing.assert_allclose(grader[keys.GRADE_PROBS].sum(-1), 1.0, atol=1e-5)
    assert grader[keys.ATTENTION].shape == grader[keys.LESION_PROBS].shape == (2, 32, 32, 2)
    for name in ("fig4_comparison.png", "fig5_roc_pr.png", "training_curves.png"):
        assert (out / name).stat().st_size > 10_000, name
    assert not any(c[2].startswith("haemorrhages") for c in cells)
    markdown = (out / "results.md").read_text()
    assert "Table 2: Messidor" in markdown and "CE2+Semi+Adv" in markdown
    assert "EyePACS val+test" in markdown


def test_pretrained_weights_are_refused(tmp_path):
    argv = ["--out", str(tmp_path), "--set", "model.encoder_weights=imagenet"]
    with pytest.raises(ValueError, match="no pretrained weights"):
        main(Collaborative(), argv)


@pytest.mark.slow  # `make test-slow`; tests/test_stages.py dry-runs toy stages
def test_dry_run_steps_every_declared_stage_at_batches_1_and_2(tmp_path):
    """``--dry-run 1`` on the tiny run restricted to IDRiD (every kind of stage; the EyePACS
    ones are the same four kinds and run in the tiny run above): every declared stage is listed
    in ``dry_run.json`` with one fit at per-replica batches 1 and 2, and ``plan.json`` has one
    row per stage, in order, with the networks, steps and batches the stages declare."""
    out = tmp_path / "dry"
    overrides = [
        "data.image_size=32",
        "data.batch_size=4",
        "data.synthetic_size=64",
        "data.synthetic_scale=0.5",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "train.verbose=0",
        "method.pretrain_seg_epochs=1",
        "method.pretrain_grade_epochs=1",
        "method.fig4_images=1",
        "method.lesions=MA,EX",
        "method.datasets=idrid",
    ]
    argv = ["--out", str(out), "--dry-run", "1"]
    argv += [arg for o in overrides for arg in ("--set", o)]
    assert main(Collaborative(), argv) == 0

    declared = ["pretrain_ce1", "pretrain_ce2"]
    declared += [f"idrid_{s}" for s in ("ori", "lesion_pretrained", "semi", "semi_adv")]
    dry = json.loads((out / "dry_run.json").read_text())
    assert [s["stage"] for s in dry["stages"]] == declared
    assert dry["declared_stages_not_reached"] == []
    for stage in dry["stages"]:
        # No stage repeats a fold or a run: every one trains (its own group).
        assert stage["trained"] and stage["group"] == stage["stage"], stage["stage"]
        assert [f["fit"] for f in stage["fits"]] == [stage["stage"]]
        (fit,) = stage["fits"]
        assert set(fit["batches"]) == {"1", "2"}, stage["stage"]
        for batch in ("1", "2"):
            assert len(fit["batches"][batch]["step_seconds"]) == 1, (stage["stage"], batch)
            assert fit["batches"][batch]["peak_rss_gb"] > 0

    plan = json.loads((out / "plan.json").read_text())
    rows = {row["stage"]: row for row in plan["stages"]}
    assert [row["stage"] for row in plan["stages"]] == declared
    expected_nets = {
        "pretrain_ce1": (["generator_ce1"], 4),
        "pretrain_ce2": (["generator_ce2"], 4),
        "idrid_ori": (["base_grader"], 8),
        "idrid_lesion_pretrained": (["generator_ce2", "grader_mask_weighted"], 4),
        "idrid_semi": (["generator_ce2", "grader_attentive"], 4),
        "idrid_semi_adv": (["generator_ce2", "grader_attentive", "discriminator"], 4),
    }
    for name, (networks, batch) in expected_nets.items():
        row = rows[name]
        assert row["networks"] == networks, name
        assert (row["steps_per_epoch"], row["epochs"], row["global_batch"]) == (1, 1, batch)
        assert row["parameters"] > 0 and row["flops_per_step"] > 0, name
    # The runner chose a cache for every dataset key the stages declare, and only for those.
    assert set(plan["cache"]) == {
        "idrid_seg_train_b4",
        "idrid_seg_test",
        "idrid_grade_train_b8",
        "idrid_grade_train_b4",
        "idrid_grade_test",
        "idrid_mixed",
    }
    assert (out / "export" / "collaborative_grader").is_dir()
    assert (out / "fig4_comparison.png").stat().st_size > 10_000
