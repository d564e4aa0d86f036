"""The patch SSL-GAN experiment (Lecouat et al. 2018): cohort, presets and one tiny full run."""

import csv
import json

import numpy as np
import pytest
import tensorflow as tf

from drkeras import keys
from drkeras.config import resolve_preset
from drkeras.data import pipeline
from drkeras.export import PATCH_EXPORT_FILE, load_exported
from drkeras.models.ssl_gan import PATCH_PROBS
from experiments.ssl_gan import (
    PAPER_TABLE1,
    PAPER_TABLE2,
    PAPER_TABLE7,
    SSLGAN,
    CohortImage,
    column_fraction,
    main,
    read_cohort,
    split_cohort,
)


def test_presets_hold_the_papers_settings():
    paper = resolve_preset(SSLGAN.presets, "paper")
    m = paper.method
    assert m.cohort_split == (149, 50, 50) and m.samplings == 5
    assert m.label_columns == ("10/149", "20/149", "40/149", "80/149", "149/149")
    assert (m.grid, m.patch_size, m.ema_decay, m.fm_norm) == (8, 32, 0.999, "l1")
    assert (paper.data.image_size, paper.data.batch_size, paper.data.normalization) == (
        1024,
        100,
        "max",
    )
    assert paper.train.epochs == 1200 and m.lr_decay_start_epoch == 1000
    for name in ("discriminator", "generator"):
        opt = paper.optimizers[name]
        assert (opt.name, opt.learning_rate, opt.beta_1, opt.schedule) == (
            "adam",
            3e-4,
            0.5,
            "linear_to_zero",
        )
    base = paper.optimizers["baseline"]
    assert (base.learning_rate, base.beta_1, m.baseline_batch) == (1e-5, 0.9, 32)
    assert (m.patience_stop, m.patience_lr, m.lr_factor) == (20, 10, 0.1)
    assert m.pretrained_weights == "imagenet"
    assert column_fraction("20/149") == pytest.approx(20 / 149)
    with pytest.raises(ValueError, match="n/N"):
        column_fraction("half")


def test_split_cohort_is_stratified_disjoint_and_proportional():
    cohort = [CohortImage("train", f"dr{i}", 1) for i in range(81)]
    cohort += [CohortImage("test", f"h{i}", 0) for i in range(168)]
    parts = split_cohort(cohort, (149, 50, 50), seed=3)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [149, 50, 50]
    ids = [c.id for part in parts.values() for c in part]
    assert sorted(ids) == sorted(c.id for c in cohort)
    for part in parts.values():  # 81 / 249 of each cohort is DR, +- rounding
        share = np.mean([c.label for c in part])
        assert abs(share - 81 / 249) < 0.03
    assert split_cohort(cohort, (149, 50, 50), seed=3) == parts
    small = split_cohort(cohort[:10] + cohort[-7:], (149, 50, 50), seed=0)
    assert [len(small[k]) for k in ("train", "val", "test")] == [11, 3, 3]
    with pytest.raises(ValueError, match="too small"):
        split_cohort(cohort[:3], (149, 50, 50), seed=0)


def test_tiny_run_fills_every_table_exports_and_draws(tmp_path):
    out = tmp_path / "run"
    overrides = [
        "method.label_columns=149/149",
        "method.samplings=1",
        "method.init_batch=64",
        "method.baseline_epochs=1",
        "method.baseline_steps_per_epoch=1",
        "method.localisation_size=64",
        "method.direct_image_size=32",
        "method.export_column=149/149",
        "data.synthetic_size=128",
        "data.synthetic_scale=1.0",
        "data.batch_size=16",
        "train.epochs=1",
        "train.steps_per_epoch=2",
        "train.verbose=0",
    ]
    argv = ["--out", str(out)] + [arg for o in overrides for arg in ("--set", o)]
    assert main(SSLGAN(), argv) == 0

    # The cohort of the synthetic IDRiD layout: 12 segmentation images (DR) and the grade-0
    # grading images (healthy).
    records = out / "data" / "records" / "idrid"
    cohort = read_cohort(records)
    healthy = sum(
        int(np.sum((labels[keys.GRADE] == 0) & ~labels[keys.MASK_PRESENT].any(axis=1)))
        for labels in (pipeline.read_labels(records, s) for s in ("train", "test"))
    )
    assert sum(c.label for c in cohort) == 12 and len(cohort) == 12 + healthy > 12

    with open(out / "results.csv") as handle:
        cells = {(r["table"], r["row"], r["column"]): r for r in csv.DictReader(handle)}
    for table, paper in (
        ("table1_patch_auc", PAPER_TABLE1),
        ("table2_image_auc", PAPER_TABLE2),
        ("table7_direct_image_auc", PAPER_TABLE7),
    ):
        for row in paper:
            for column in ("149/149",):
                cell = cells[(table, row, column)]
                assert float(cell["paper"]) == pytest.approx(paper[row][column])
                assert 0.0 <= float(cell["ours_mean"]) <= 100.0, (table, row, column)
                assert int(cell["n_runs"]) == 1
            assert (table, row, "20/149") not in cells  # only the columns that ran
    for row in ("SSL-GAN", "ConvNet", "ResNet34"):
        assert 0.0 <= float(cells[("localisation_auc", row, "localisation AUC (%)")]["ours_mean"])
        assert int(cells[("image_threshold_accuracy", row, "image accuracy (%)")]["n_runs"]) == 1
    gain = cells[("localisation_auc", "SSL-GAN", "gain of SSL-GAN (points)")]
    assert float(gain["paper"]) == pytest.approx(16.30) and gain["ours_mean"] != ""
    assert "WITHOUT pretrained weights" in (out / "results.md").read_text()

    exported = load_exported(out / "export" / "ssl_gan")
    images = np.random.default_rng(0).integers(0, 255, size=(2, 70, 90, 3), dtype=np.uint8)
    outputs = exported.predict(images)
    assert outputs[keys.PATCH_LOGITS].shape == (2, 8, 8)
    np.testing.assert_allclose(
        outputs[keys.IMAGE_SCORE], outputs[PATCH_PROBS].reshape(2, -1).sum(-1), rtol=1e-5
    )
    patches = tf.saved_model.load(str(out / "export" / "ssl_gan_patches"))
    served = patches.signatures["serving_default"](patches=tf.zeros([3, 32, 32, 3]))
    assert served[keys.PATCH_LOGITS].shape == (3,)
    marker = json.loads((out / "export" / "ssl_gan_patches" / PATCH_EXPORT_FILE).read_text())
    assert marker["format"] == "drkeras-patch-export/1" and marker["patch_size"] == 32
    assert len(list(out.glob("fig2_patch_scores_*.png"))) == 2
    assert (out / "training_curves.png").stat().st_size > 10_000
    with open(out / "history.csv") as handle:
        stages = {r["stage"] for r in csv.DictReader(handle)}
    assert {
        "149of149_s0_ssl_gan",
        "149of149_s0_convnet",
        "149of149_s0_resnet50_pretrained",
    } <= stages


@pytest.mark.slow  # `make test-slow`; tests/test_stages.py dry-runs toy stages
def test_dry_run_lists_every_declared_stage(tmp_path):
    import json

    out = tmp_path / "dry"
    overrides = [
        "method.label_columns=149/149",
        "method.samplings=2",  # the second sampling's stages: data built, not trained
        "method.init_batch=64",
        "method.baseline_epochs=1",
        "method.baseline_steps_per_epoch=1",
        "method.localisation_size=64",
        "method.direct_image_size=32",
        "method.export_column=149/149",
        "data.synthetic_scale=1.0",
        "data.batch_size=16",
        "train.epochs=1",
        "train.steps_per_epoch=2",
        "train.verbose=0",
    ]
    argv = ["--out", str(out), "--dry-run", "1"] + [a for o in overrides for a in ("--set", o)]
    assert main(SSLGAN(), argv) == 0

    networks = ("ssl_gan", "convnet", "resnet34", "resnet50_pretrained", "resnet50_resnet50")
    declared = ["cohort"] + [f"149of149_s{s}_{n}" for s in (0, 1) for n in networks]
    plan = json.loads((out / "plan.json").read_text())
    assert [row["stage"] for row in plan["stages"]] == declared
    groups = {row["stage"]: row["group"] for row in plan["stages"]}
    assert groups["149of149_s1_convnet"] == groups["149of149_s0_convnet"] == "149of149_convnet"
    # the cohort's patch grids are held from the first stage to the last one
    assert all(row["host_ram_parts_gb"]["held_by_experiment"] > 0 for row in plan["stages"])

    dry = json.loads((out / "dry_run.json").read_text())
    entries = {entry["stage"]: entry for entry in dry["stages"]}
    assert sorted(entries) == sorted(declared) and dry["declared_stages_not_reached"] == []
    trained = {name for name, entry in entries.items() if entry["trained"]}
    assert trained == {"cohort"} | {f"149of149_s0_{n}" for n in networks}
    for name in trained - {"cohort"}:
        (fit,) = entries[name]["fits"]
        assert fit["fit"] == name and set(fit["batches"]) == {"1", "2"}, name
        assert all(len(b["step_seconds"]) == 1 for b in fit["batches"].values())
    assert "fits" not in entries["cohort"]
    assert all("fits" not in entries[f"149of149_s1_{n}"] for n in networks)

    # the skipped sampling leaves its cells to the trained one: one run per cell, none invented
    with open(out / "results.csv") as handle:
        cells = {(r["table"], r["row"], r["column"]): r for r in csv.DictReader(handle)}
    for row in ("SSL-GAN", "ConvNet", "ResNet34"):
        assert int(cells[("table1_patch_auc", row, "149/149")]["n_runs"]) == 1
    assert int(cells[("table7_direct_image_auc", "ResNet50", "149/149")]["n_runs"]) == 1
    gain = cells[("localisation_auc", "SSL-GAN", "gain of SSL-GAN (points)")]
    assert int(gain["n_runs"]) == 1
    assert (out / "export" / "ssl_gan").is_dir()
