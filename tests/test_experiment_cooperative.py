"""The JointSeg experiment: presets, the mIoU reading, partial random labels and a tiny full run.

The full run replaces VGG-19 and InceptionV3 (``build_reference_grader``) by a small CNN with
the same contract (input ``image``, outputs ``grade_logits``/``grade_probs``): tracing and
stepping the real ones takes minutes on 2 CPU cores. The test checks that the experiment asks
for exactly those two; the real networks are built in ``tests/test_models_cooperative.py``.
Every other network (JointSeg, FCN-8s, the inception UNet, the pre-training classifiers) is the
real one.
"""

import csv
import json

import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import jaccard_score
from tensorflow import keras

import experiments.cooperative as coop_experiment
from drkeras import keys
from drkeras.config import resolve_preset
from drkeras.data import pipeline, records
from drkeras.export import load_exported
from drkeras.models import blocks
from experiments.cooperative import (
    PAPER_TABLE1,
    PAPER_TABLE2,
    PAPER_TABLE3,
    PAPER_TABLE4,
    JointSegExperiment,
    SegmentationIoU,
    main,
    write_partial_random_labels,
)

MA, HE, EX, SE, OD = range(5)


def test_presets_hold_the_papers_settings():
    paper = resolve_preset(JointSegExperiment.presets, "paper")
    m = paper.method
    assert (m.lr_ratio, m.batch_ratio, m.true_label_fraction) == (30.0, 32, 0.2)
    assert (paper.data.image_size, m.resize_size) == (224, 256)
    assert paper.data.normalization == "standardize" and paper.data.augment
    seg = paper.optimizers["segmentation"]
    assert (seg.name, seg.nesterov, seg.schedule) == ("sgd", True, "polynomial")
    assert m.graders == ("vgg19", "inception_v3") and m.cls_dataset == "eyepacs"
    smoke = resolve_preset(JointSegExperiment.presets, "smoke", ["method.batch_ratio=2"])
    assert smoke.method.batch_ratio == 2 and smoke.model.encoder_weights is None
    assert smoke.data.image_size >= 75  # InceptionV3's smallest input


def test_eyepacs_is_tested_on_public_and_private():
    # Section III: the ~55K EyePACS test images, Kaggle's Public (converted as val) and Private
    # (test) parts together; both read as one set by pipeline.evaluation_dataset.
    for preset in ("paper", "smoke"):
        method = resolve_preset(JointSegExperiment.presets, preset).method
        assert method.cls_dataset == "eyepacs", preset
        assert pipeline.split_names(method.cls_test_split) == ("val", "test"), preset


def test_miou_includes_background_on_a_hand_case():
    # 2x2 image: MA at (0, 0), HE at (1, 0); the optic disc at (1, 1) is background here.
    masks = np.zeros((1, 2, 2, 5), np.uint8)
    masks[0, 0, 0, MA] = 1
    masks[0, 1, 0, HE] = 1
    masks[0, 1, 1, OD] = 1
    probs = np.zeros((1, 2, 2, 5), np.float32)
    probs[0, 0, :, 1] = 0.9  # MA predicted at (0, 0) and (0, 1)
    probs[0, 1, :, 0] = 0.9  # background at (1, 0) and (1, 1)
    score = SegmentationIoU("lesions")
    score.update(probs, masks, np.ones((1, 5), bool))
    result = score.result()
    # background: tp 1, fp 1, fn 1 -> 1/3; MA: tp 1, fp 1 -> 1/2; HE: fn 1 -> 0; EX, SE: absent
    assert result["miou"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert result["lesion_miou"] == pytest.approx((1 / 2 + 0) / 2)
    assert np.isnan(result["iou"]["EX"])
    with pytest.raises(ValueError, match="seg_probs"):
        score.update(probs[..., :4], masks)


def test_miou_matches_sklearn_macro_jaccard_on_random_masks():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=(3, 8, 8))
    masks = np.zeros((3, 8, 8, 5), np.uint8)
    for lesion in range(4):
        masks[..., lesion] = labels == lesion + 1
    probs = rng.random((3, 8, 8, 5)).astype(np.float32)
    score = SegmentationIoU("lesions")
    score.update(probs[:2], masks[:2])
    score.update(probs[2:], masks[2:])
    truth, pred = labels.ravel(), probs.argmax(-1).ravel()
    assert score.result()["miou"] == pytest.approx(jaccard_score(truth, pred, average="macro"))


def _write_graded(folder, grades):
    folder.mkdir(parents=True)
    with tf.io.TFRecordWriter(str(folder / "train-00000.tfrecord")) as writer:
        for i, grade in enumerate(grades):
            writer.write(
                records.encode_example(
                    id=f"x-train-{i:02d}",
                    dataset="x",
                    split="train",
                    image=np.full((8, 8, 3), i, np.uint8),
                    masks=None,
                    mask_present=[False] * 5,
                    grade=int(grade),
                    lossless=True,
                )
            )


def test_partial_random_labels_keep_a_stratified_fifth_and_randomise_the_rest(tmp_path):
    grades = np.array([0] * 10 + [1] * 5 + [2] * 5 + [-1] * 2)
    src = tmp_path / "src"
    _write_graded(src, grades)
    out = tmp_path / "partial"
    stats = write_partial_random_labels(src, "train", out, true_fraction=0.2, seed=4)
    assert stats["images"] == 20 and stats["true_labels"] == 4
    before, after = pipeline.read_labels(src, "train"), pipeline.read_labels(out, "train")
    np.testing.assert_array_equal(before[keys.ID], after[keys.ID])
    ungraded = before[keys.GRADE] < 0
    np.testing.assert_array_equal(after[keys.GRADE][ungraded], -1)
    assert set(after[keys.GRADE][~ungraded]) <= set(range(5))
    same = after[keys.GRADE][~ungraded] == before[keys.GRADE][~ungraded]
    assert stats["correct"] == pytest.approx(same.mean())
    assert same.sum() >= 4  # the kept labels, plus random hits
    # the kept labels: 20 % of each grade (stratified), chosen by fraction_split
    kept, _ = pipeline.fraction_split(
        [str(i) for i in before[keys.ID][~ungraded]],
        0.2,
        seed=4,
        stratify=before[keys.GRADE][~ungraded].tolist(),
    )
    index = {str(i): k for k, i in enumerate(before[keys.ID])}
    for example_id in kept:
        assert after[keys.GRADE][index[example_id]] == before[keys.GRADE][index[example_id]]
    assert sorted(before[keys.GRADE][[index[i] for i in kept]].tolist()) == [0, 0, 1, 2]
    # images are copied unchanged; the same seed gives the same labels
    image = next(iter(records.records_dataset(out, "train")))[keys.IMAGE].numpy()
    assert image.shape == (8, 8, 3)
    again = tmp_path / "again"
    write_partial_random_labels(src, "train", again, true_fraction=0.2, seed=4)
    np.testing.assert_array_equal(
        pipeline.read_labels(again, "train")[keys.GRADE], after[keys.GRADE]
    )
    with pytest.raises(ValueError, match="true_fraction"):
        write_partial_random_labels(src, "train", out, true_fraction=1.5)


def _small_grader(requested):
    def build(name, *, input_shape, num_grades=5, encoder_weights=None, dropout=0.0):
        assert encoder_weights is None
        requested.append(name)
        image = keras.Input(input_shape, name=keys.IMAGE)
        x = keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="conv1")(image)
        return keras.Model(
            image,
            blocks.grading_head(x, num_grades=num_grades, pooling="avg", dropout=dropout),
            name=name,
        )

    return build


# The smallest configuration of the experiment (seconds per stage on 2 CPU cores).
TINY = [
    "data.image_size=32",
    "method.resize_size=36",
    "data.batch_size=2",
    "method.batch_ratio=2",
    "data.synthetic_size=64",
    "data.synthetic_scale=0.5",
    "method.encoder_widths=4",
    "method.classifier_widths=4",
    "method.fc_units=64",
    "model.width=0.0625",
    "train.steps_per_epoch=1",
    "train.verbose=0",
    "method.figure_images=1",
    "method.run_eagerly=true",
]


def test_tiny_run_fills_every_table_exports_and_draws(tmp_path, monkeypatch):
    requested = []
    monkeypatch.setattr(coop_experiment, "build_reference_grader", _small_grader(requested))
    out = tmp_path / "run"
    argv = ["--out", str(out)] + [arg for o in TINY for arg in ("--set", o)]
    assert main(JointSegExperiment(), argv) == 0
    # built once each for the resource plan, then once each by its stage
    assert requested == ["vgg19", "inception_v3"] * 2

    with open(out / "results.csv") as handle:
        cells = {(r["table"], r["row"], r["column"]): r for r in csv.DictReader(handle)}
    for table, paper in (
        ("table1", PAPER_TABLE1),
        ("table2", PAPER_TABLE2),
        ("table3", PAPER_TABLE3),
        ("table4", PAPER_TABLE4),
    ):
        for row, columns in paper.items():
            for column, value in columns.items():
                cell = cells[(table, row, column)]
                assert float(cell["paper"]) == pytest.approx(value)
                assert 0.0 <= float(cell["ours_mean"]) <= 100.0, (table, row, column)
    # JointSeg is one network: the same number in Tables I and II
    assert (
        cells[("table1", "JointSeg [This work]", "mIoU (%)")]["ours_mean"]
        == cells[("table2", "JointSeg [This work]", "mIoU (%)")]["ours_mean"]
    )
    partial = [k for k in cells if k[0] == "partial_labels"]
    assert {row for _, row, _ in partial} == {
        "JointSeg, all classifier labels true",
        "JointSeg, 20 % true classifier labels",
    }
    correct = float(
        cells[
            (
                "partial_labels",
                "JointSeg, 20 % true classifier labels",
                "correct classifier labels (%)",
            )
        ]["ours_mean"]
    )
    assert 20.0 <= correct < 100.0
    assert "human performance: 95.1" in (out / "results.md").read_text()

    exported = load_exported(out / "export" / "cooperative")
    images = np.random.default_rng(0).integers(0, 255, size=(2, 40, 48, 3), dtype=np.uint8)
    outputs = exported.predict(images)
    assert outputs[keys.GRADE_PROBS].shape == (2, 5)
    assert outputs[keys.SEG_PROBS].shape == (2, 32, 32, 5)
    for name in ("fig6_segmentation.png", "training_curves.png"):
        assert (out / name).stat().st_size > 10_000
    with open(out / "history.csv") as handle:
        stages = {r["stage"] for r in csv.DictReader(handle)}
    assert {
        "run0_jointseg",
        "run0_jointseg_partial_labels",
        "run0_fcn8s_encoder_classifier",
        "run0_fcn8s_pretrained",
        "run0_fcn8s_random",
        "run0_unet_encoder_classifier",
        "run0_unet_pretrained",
        "run0_unet_random",
        "run0_vgg19",
        "run0_inception_v3",
    } == stages


RUN_STAGES = [
    "jointseg",
    "jointseg_partial_labels",
    "fcn8s_encoder_classifier",
    "fcn8s_pretrained",
    "fcn8s_random",
    "unet_encoder_classifier",
    "unet_pretrained",
    "unet_random",
    "vgg19",
    "inception_v3",
]


@pytest.mark.slow  # `make test-slow` (5 minutes); tests/test_stages.py dry-runs toy stages
def test_dry_run_steps_every_stage_at_batches_1_and_2_and_plans_each(tmp_path, monkeypatch):
    # Two runs: run 1's stages repeat run 0's (same groups), so the dry run only builds their
    # data, and the report fills every cell from run 0 alone.
    monkeypatch.setattr(coop_experiment, "build_reference_grader", _small_grader([]))
    out = tmp_path / "dry"
    argv = ["--out", str(out), "--dry-run", "1"]
    argv += [arg for o in TINY + ["train.runs=2"] for arg in ("--set", o)]
    assert main(JointSegExperiment(), argv) == 0

    declared = [f"run{r}_{name}" for r in range(2) for name in RUN_STAGES]
    dry = json.loads((out / "dry_run.json").read_text())
    assert [s["stage"] for s in dry["stages"]] == declared
    assert dry["declared_stages_not_reached"] == []
    for entry in dry["stages"]:
        assert entry["trained"] == entry["stage"].startswith("run0_"), entry["stage"]
        if entry["trained"]:
            (fit,) = entry["fits"]
            assert fit["fit"] == entry["stage"]
            assert set(fit["batches"]) == {"1", "2"}
            for batch in ("1", "2"):
                assert len(fit["batches"][batch]["step_seconds"]) == 1
                assert fit["batches"][batch]["peak_rss_gb"] > 0
        else:
            assert "fits" not in entry
    plan = json.loads((out / "plan.json").read_text())
    assert [row["stage"] for row in plan["stages"]] == declared
    rows = {row["stage"]: row for row in plan["stages"]}
    # segmentation batch 2, classification batch 2 x 2; the pre-trained UNet's encoder comes
    # from its classifier stage
    assert rows["run0_jointseg"]["global_batch"] == 2
    assert rows["run0_vgg19"]["global_batch"] == 4
    assert rows["run0_unet_pretrained"]["group"] == rows["run1_unet_pretrained"]["group"]
    assert plan["cache"]["run0_cls_train"] == "memory"

    with open(out / "results.csv") as handle:
        cells = {(r["table"], r["row"], r["column"]): r for r in csv.DictReader(handle)}
    # one value per cell: run 1 was not trained, and left its cells empty
    for key in (
        ("table1", "JointSeg [This work]", "mIoU (%)"),
        ("table2", "UNet", "mIoU (%)"),
        ("table3", "VGG", "Top-1 (%)"),
        (
            "partial_labels",
            "JointSeg, 20 % true classifier labels",
            "correct classifier labels (%)",
        ),
    ):
        assert cells[key]["n_runs"] == "1", key
        assert 0.0 <= float(cells[key]["ours_mean"]) <= 100.0, key
    assert (out / "export" / "cooperative").is_dir()
