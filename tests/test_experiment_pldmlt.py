"""The PLDMLT experiment: fold splits, the mDice/mIoU reading, presets and one tiny full run.

The full run replaces the four grading networks (ResNeXt-101/50, NASNet, DenseNet-201) by a
small CNN with the same contract as ``drkeras.models.baselines.build_grader`` (input
``image``, outputs ``grade_logits``/``grade_probs``, a 4-D feature map for Grad-CAM): building
and stepping the real ones eagerly takes minutes on 2 CPU cores. The test checks that the
experiment asks for exactly the paper's graders; the real networks are tested in
``tests/test_baselines.py`` and run in ``make reproduce``. Every other network is the real one.
"""

import csv
import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, jaccard_score
from tensorflow import keras

import experiments.pldmlt as pldmlt_experiment
from drkeras import keys
from drkeras.cam_figure import plot_class_cams
from drkeras.config import resolve_preset
from drkeras.data.pipeline import kfold_split
from drkeras.export import load_exported
from drkeras.models import blocks
from drkeras.models.pldmlt import FUSED_CLASSES
from experiments.pldmlt import (
    PAPER_ABLATION,
    PAPER_ACCURACY,
    PAPER_SEGMENTATION,
    PLDMLT,
    SEG_READINGS,
    FusedSegmentationScore,
    SegSource,
    main,
    split_sources,
)
from tests.conftest import stand_in_context

MA, HE, EX, SE, OD = range(5)


def _sources():
    return [
        SegSource(pathlib.Path("a"), "train", tuple(f"a-train-{i}" for i in range(7))),
        SegSource(pathlib.Path("a"), "test", tuple(f"a-test-{i}" for i in range(3))),
        SegSource(pathlib.Path("b"), "train", tuple(f"b-train-{i}" for i in range(5))),
        SegSource(pathlib.Path("b"), "val", ()),
    ]


def test_official_split_trains_on_train_and_tests_on_test():
    train, test = split_sources(_sources(), folds=1)
    assert [(str(s.records_dir), s.split, len(s.ids)) for s in train] == [
        ("a", "train", 7),
        ("b", "train", 5),
    ]
    assert [(str(s.records_dir), s.split, len(s.ids)) for s in test] == [("a", "test", 3)]


def test_kfold_split_partitions_pooled_images_and_keeps_pipeline_order():
    sources = _sources()
    every = [i for s in sources for i in s.ids]
    grades = {i: k % 3 for k, i in enumerate(every)}
    held_out = []
    for fold in range(3):
        train, test = split_sources(sources, folds=3, fold=fold, seed=4, grades=grades)
        train_ids = [i for s in train for i in s.ids]
        test_ids = [i for s in test for i in s.ids]
        assert not set(train_ids) & set(test_ids)
        assert sorted(train_ids + test_ids) == sorted(every)
        assert len(test_ids) == 5  # 15 images in 3 folds
        # the fold is drkeras' k-fold split of the pooled ids, stratified by the grades
        stratify = [grades[i] for i in every]
        assert sorted(test_ids) == kfold_split(every, 3, fold, seed=4, stratify=stratify)[1]
        for part in train + test:
            original = next(
                s for s in sources if (s.records_dir, s.split) == (part.records_dir, part.split)
            )
            positions = [original.ids.index(i) for i in part.ids]
            assert positions == sorted(positions)  # ids stay in pipeline (record) order
        held_out += test_ids
    assert sorted(held_out) == sorted(every)  # every image is held out exactly once
    again = split_sources(sources, folds=3, fold=1, seed=4, grades=grades)
    assert again == split_sources(sources, folds=3, fold=1, seed=4, grades=grades)


def test_mdice_includes_background_on_a_hand_case():
    # 2x2 image: MA at (0, 0), HE at (1, 0); the optic disc at (1, 1) is background.
    masks = np.zeros((1, 2, 2, 5), np.uint8)
    masks[0, 0, 0, MA] = 1
    masks[0, 1, 0, HE] = 1
    masks[0, 1, 1, OD] = 1
    # Predicted classes: MA at (0, 0) and (0, 1), background at (1, 0) and (1, 1).
    probs = np.zeros((1, 2, 2, 5), np.float32)
    probs[0, 0, :, 1] = 0.9
    probs[0, 1, :, 0] = 0.9
    score = FusedSegmentationScore()
    score.update(probs, masks, np.ones((1, 5), bool))
    result = score.result()
    # background: tp 1, fp 1, fn 1 -> Dice 1/2, IoU 1/3; MA: tp 1, fp 1 -> 2/3, 1/2;
    # HE: fn 1 -> 0, 0; EX and SE: empty in both -> left out of the means.
    assert result["mdice"] == pytest.approx((1 / 2 + 2 / 3 + 0) / 3)
    assert result["miou"] == pytest.approx((1 / 3 + 1 / 2 + 0) / 3)
    assert result["lesion_mdice"] == pytest.approx((2 / 3 + 0) / 2)
    assert math.isnan(result["dice"]["EX"]) and math.isnan(result["dice"]["SE"])


def test_mdice_matches_sklearn_macro_f1_and_jaccard_on_random_masks():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=(3, 8, 8))
    masks = np.zeros((3, 8, 8, 5), np.uint8)
    for lesion in range(4):  # fused class k + 1 is lesion k (MA, HE, EX, SE)
        masks[..., lesion] = labels == lesion + 1
    probs = rng.random((3, 8, 8, 5)).astype(np.float32)
    score = FusedSegmentationScore()
    score.update(probs[:2], masks[:2])
    score.update(probs[2:], masks[2:])  # streaming over batches = one pooled count
    result = score.result()
    truth, pred = labels.ravel(), probs.argmax(-1).ravel()
    assert result["mdice"] == pytest.approx(f1_score(truth, pred, average="macro"))
    assert result["miou"] == pytest.approx(jaccard_score(truth, pred, average="macro"))
    per_class = f1_score(truth, pred, average=None, labels=[1, 2, 3, 4])
    assert result["lesion_mdice"] == pytest.approx(per_class.mean())


def test_presets_resolve_and_the_paper_preset_is_the_papers():
    paper = resolve_preset(PLDMLT.presets, "paper")
    assert paper.data.image_size == 1024
    assert paper.model.encoder_weights == "imagenet" and paper.model.width == 1.0
    assert paper.optimizers["model"].name == "adam"
    assert paper.optimizers["model"].learning_rate == 5e-5
    assert paper.train.epochs == 100 and paper.train.folds == 5
    assert (paper.method.beta_idrid, paper.method.beta_ddr) == (0.8, 0.95)
    assert (paper.method.focal_alpha, paper.method.focal_gamma) == (0.25, 2.0)
    assert paper.method.datasets == ("idrid", "ddr") and paper.method.use_diaretdb1
    assert not paper.method.run_eagerly
    smoke = resolve_preset(PLDMLT.presets, "smoke", ["method.datasets=idrid", "train.folds=2"])
    assert smoke.method.datasets == ("idrid",) and smoke.train.folds == 2


def _results(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


def _small_grader(requested):
    def build(name, *, input_shape, num_grades=5, encoder_weights=None, dropout=0.0, **kwargs):
        assert encoder_weights is None
        requested.append(name)
        image = keras.Input(input_shape, name=keys.IMAGE)
        x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="conv1")(image)
        x = keras.layers.Conv2D(8, 3, activation="relu", name="conv2")(x)
        return keras.Model(
            image,
            blocks.grading_head(x, num_grades=num_grades, pooling="avg", dropout=dropout),
            name=name,
        )

    return build


def test_tiny_run_fills_every_table_exports_and_draws(tmp_path, monkeypatch):
    requested = []
    monkeypatch.setattr(pldmlt_experiment, "build_grader", _small_grader(requested))
    out = tmp_path / "run"
    overrides = [
        "data.image_size=32",
        "data.batch_size=2",
        "data.synthetic_size=64",
        "data.synthetic_scale=0.5",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "train.verbose=0",
        "method.overlays=1",
        "method.fig6_images=1",
    ]
    argv = ["--out", str(out)] + [arg for o in overrides for arg in ("--set", o)]
    assert main(PLDMLT(), argv) == 0
    # the paper's graders: built once for the plan, then in each dataset's stage (its initial
    # weights drawn from the seed, the same for IDRiD and DDR)
    graders = ["densenet201", "nasnet_mobile", "resnext101", "resnext50"]
    assert sorted(requested) == sorted(graders * 3)

    rows = _results(out / "results.csv")
    cells = {(r["table"], r["row"], r["column"]): r for r in rows}
    expected = []
    # every mDice/mIoU reading side by side, each beside the paper's pair
    readings = [(f"mDice {name} (%)", f"mIoU {name} (%)") for name, _, _ in SEG_READINGS]
    for number, dataset in ((1, "idrid"), (2, "ddr")):
        for row, (dice, iou) in PAPER_SEGMENTATION[dataset].items():
            for dice_column, iou_column in readings:
                expected += [
                    (f"table{number}_segmentation", row, dice_column, dice),
                    (f"table{number}_segmentation", row, iou_column, iou),
                ]
        for row, accuracy in PAPER_ACCURACY[dataset].items():
            expected.append((f"table{number}_grading", row, "Accuracy (%)", accuracy))
    for row, (dice, iou) in PAPER_ABLATION.items():
        for dice_column, iou_column in readings:
            expected += [
                ("table3_ablation", row, dice_column, dice),
                ("table3_ablation", row, iou_column, iou),
            ]
    for table, row, column, paper in expected:
        cell = cells[(table, row, column)]
        assert float(cell["paper"]) == pytest.approx(paper)
        assert 0.0 <= float(cell["ours_mean"]) <= 100.0, (table, row, column)
    # Table 3's "+ Weight" is the Ours run of Table 1.
    assert (
        cells[("table3_ablation", "+ Weight", "mDice 5-class (%)")]["ours_mean"]
        == cells[("table1_segmentation", "Ours", "mDice 5-class (%)")]["ours_mean"]
    )
    # Stage 1 on synthetic IDRiD-S: 6 images (4 train + 2 test), true grades known.
    assert float(cells[("stage1_pseudo_grades", "IDRiD-S", "images")]["ours_mean"]) == 6
    for column in ("accuracy before refinement (%)", "accuracy after refinement (%)"):
        assert 0.0 <= float(cells[("stage1_pseudo_grades", "IDRiD-S", column)]["ours_mean"]) <= 100
    changed = float(
        cells[("stage1_pseudo_grades", "IDRiD-S", "changed by refinement")]["ours_mean"]
    )
    assert 0 <= changed <= 6

    markdown = (out / "results.md").read_text()
    assert "DiaRetDB1 not used: it has no synthetic layout" in markdown
    assert "the paper does not define them" in markdown
    assert "(no reading: no mean lies there): FPN" in markdown  # IDRiD's FPN pair

    exported = load_exported(out / "export" / "pldmlt")
    images = np.random.default_rng(0).integers(0, 255, size=(2, 40, 48, 3), dtype=np.uint8)
    outputs = exported.predict(images)
    assert outputs[keys.GRADE_PROBS].shape == (2, 5)
    np.testing.assert_allclose(outputs[keys.GRADE_PROBS].sum(-1), 1.0, atol=1e-5)
    assert outputs[keys.SEG_PROBS].shape == (2, 32, 32, 5)
    for name in ("fig6_cams.png", "training_curves.png"):
        assert (out / name).stat().st_size > 10_000
    assert len(list(out.glob("overlay_*.png"))) == 1
    with open(out / "history.csv") as handle:
        stages = {r["stage"] for r in csv.DictReader(handle)}
    expected_stages = {"idrid_resnext101", "idrid_deeplabv3plus", "idrid_ls_lc_updnet", "ddr_ours"}
    assert expected_stages <= stages


@pytest.mark.slow  # `make test-slow`; tests/test_stages.py dry-runs toy stages
def test_dry_run_declares_every_stage_trains_one_per_group_and_plans_each(tmp_path, monkeypatch):
    monkeypatch.setattr(pldmlt_experiment, "build_grader", _small_grader([]))
    out = tmp_path / "dry"
    overrides = [
        "data.image_size=32",
        "data.batch_size=2",
        "data.synthetic_size=64",
        "data.synthetic_scale=0.5",
        "train.epochs=1",
        "train.steps_per_epoch=1",
        "train.verbose=0",
        "method.overlays=1",
        "method.fig6_images=1",
        "method.datasets=idrid",
        "train.folds=2",
    ]
    argv = ["--out", str(out), "--dry-run", "1"] + [a for o in overrides for a in ("--set", o)]
    assert main(PLDMLT(), argv) == 0
    rows = ["unet", "linknet", "deeplabv3plus", "fpn", "mtunet", "ours", "ls", "ls_lc"]
    folds = [f"idrid_fold{k}_{row}" for k in (0, 1) for row in rows + ["ls_lc_updnet"]]
    graders = ["idrid_resnext101", "idrid_resnext50", "idrid_stage1", "idrid_nasnet_mobile"]
    declared = graders + ["idrid_densenet201"] + folds
    plan = json.loads((out / "plan.json").read_text())
    assert [row["stage"] for row in plan["stages"]] == declared
    steps = {row["stage"]: row["steps_per_epoch"] for row in plan["stages"]}
    assert steps["idrid_stage1"] == 0 and all(steps[s] == 1 for s in declared if s != graders[2])
    groups = {row["stage"]: row["group"] for row in plan["stages"]}
    # stages that differ by fold (or dataset, or run) share a group: one trains in a dry run
    assert groups["idrid_fold0_ours"] == groups["idrid_fold1_ours"] == "ours"
    # "+ Upd-Net" is Ours with another beta: its stage builds its data only
    assert groups["idrid_fold0_ls_lc_updnet"] == "ours"
    assert groups["idrid_stage1"] == "stage1" and groups["idrid_resnext101"] == "resnext101"

    dry = json.loads((out / "dry_run.json").read_text())
    assert [entry["stage"] for entry in dry["stages"]] == declared
    assert dry["declared_stages_not_reached"] == []
    for entry in dry["stages"]:
        name = entry["stage"]
        # fold 1 and "+ Upd-Net" only build their data
        skipped = name.startswith("idrid_fold1_") or name.endswith("_ls_lc_updnet")
        assert entry["trained"] is not skipped, name
        fits = entry.get("fits", [])
        if skipped or name == "idrid_stage1":
            assert fits == [], name
            continue
        assert [fit["fit"] for fit in fits] == [name]
        assert set(fits[0]["batches"]) == {"1", "2"}
        for batch in fits[0]["batches"].values():
            assert len(batch["step_seconds"]) == 1 and batch["peak_rss_gb"] > 0

    # the report holds fold 0 only: the skipped fold leaves no value (nothing fabricated)
    cells = {(r["table"], r["row"], r["column"]): r for r in _results(out / "results.csv")}
    ours = cells[("table1_segmentation", "Ours", "mDice 5-class (%)")]
    assert int(ours["n_runs"]) == 1 and 0.0 <= float(ours["ours_mean"]) <= 100.0
    assert int(cells[("table1_grading", "ResNeXt-101", "Accuracy (%)")]["n_runs"]) == 1
    assert (out / "export" / "pldmlt").is_dir() and (out / "fig6_cams.png").is_file()


def test_fig6_figure_has_the_documented_size_and_rejects_bad_shapes(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(2, 16, 16, 3), dtype=np.uint8)
    label_maps = rng.integers(0, 5, size=(2, 8, 8))
    cams = rng.random((2, 5, 4, 4)).astype(np.float32)
    path = plot_class_cams(
        images,
        label_maps,
        cams,
        tmp_path / "fig6.png",
        label_names=FUSED_CLASSES,
        notes=[["overlap 0.10"] * 5] * 2,
        row_titles=["a", "b"],
    )
    with Image.open(path) as png:
        assert png.size == (round(2.2 * 7 * 100), round((2.5 * 2 + 0.8) * 100))
    with pytest.raises(ValueError, match="class_names"):
        plot_class_cams(images, label_maps, cams[:, :4], tmp_path / "x.png", label_names="ab")
    with pytest.raises(ValueError, match="label ids"):
        plot_class_cams(images, label_maps + 5, cams, tmp_path / "x.png", label_names=FUSED_CLASSES)
    with pytest.raises(ValueError, match="notes"):
        plot_class_cams(
            images, label_maps, cams, tmp_path / "x.png", label_names=FUSED_CLASSES, notes=[[]]
        )


def test_stage1_chunks_span_sources_in_order():
    # Two pipeline batches (3 and 4 images) regrouped into a chunk of 5 and a rest of 2.
    def part(first, count):
        ids = [f"id{i}" for i in range(first, first + count)]
        values = np.arange(first, first + count)
        return ids, values[:, None], values[:, None, None], values.astype(bool)

    buffer = [part(0, 3), part(3, 4)]
    ids, images, masks, present = pldmlt_experiment._Run._merge(buffer, 5)
    assert ids == ["id0", "id1", "id2", "id3", "id4"]
    np.testing.assert_array_equal(images[:, 0], [0, 1, 2, 3, 4])
    assert masks.shape == (5, 1, 1) and present.shape == (5,)
    assert len(buffer) == 1 and buffer[0][0] == ["id5", "id6"]
    np.testing.assert_array_equal(buffer[0][1][:, 0], [5, 6])


# --- input scaling (issue 16 item 1) -------------------------------------------------------------


def _tiny_multitask(size):
    image = keras.Input((size, size, 3), name=keys.IMAGE)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(image)
    seg = keras.layers.Conv2D(5, 1, activation="softmax", name=keys.SEG_PROBS)(x)
    outputs = blocks.grading_head(x, num_grades=5, pooling="avg", dropout=0.0)
    outputs[keys.SEG_PROBS] = seg
    return keras.Model(image, outputs, name="tiny")


def _offline_paper_run(tmp_path, monkeypatch, size=32):
    """The paper preset's ``_Run`` (ImageNet weights) with tiny models, no training and fake
    pipelines recording what the experiment asks of them: ``(run, seen, calls, exported)``,
    ``seen`` as ``(pipeline, normalization)``, ``calls`` the keyword arguments."""

    import tensorflow as tf

    config = resolve_preset(PLDMLT.presets, "paper", [f"data.image_size={size}"])
    assert config.model.encoder_weights == "imagenet"
    run = pldmlt_experiment._Run(stand_in_context(config, tmp_path))
    seen, calls = [], []  # (pipeline, normalization) and the arguments of every dataset built

    def fake_segmentation(records_dir, split, *, ids, normalization, repeat=False, **kwargs):
        seen.append(("segmentation", normalization))
        calls.append(dict(kwargs, pipeline="segmentation", repeat=repeat))
        n = len(ids)
        element = (
            tf.zeros([n, size, size, 3]),
            {keys.MASKS: tf.zeros([n, size, size, 5]), keys.MASK_PRESENT: tf.ones([n, 5])},
        )
        ds = tf.data.Dataset.from_tensors(element)
        return ds.repeat() if repeat else ds

    def fake_grading(records_dir, split, *, batch_size, normalization, **kwargs):
        seen.append(("grading", normalization))
        calls.append(dict(kwargs, pipeline="grading"))
        return tf.data.Dataset.from_tensors((tf.zeros([batch_size, size, size, 3]), [0]))

    exported = {}
    monkeypatch.setattr(pldmlt_experiment.pipeline, "segmentation_dataset", fake_segmentation)
    monkeypatch.setattr(pldmlt_experiment.pipeline, "grading_dataset", fake_grading)
    monkeypatch.setattr(pldmlt_experiment, "export_model", lambda *a, **k: exported.update(k))
    monkeypatch.setattr(run, "_model", lambda key, seed, build: _tiny_multitask(size))
    monkeypatch.setattr(run, "_fit", lambda *args, **kwargs: None)
    monkeypatch.setattr(run, "_grading_count", lambda *args: 4)
    return run, seen, calls, exported


def _pseudo_labels(ids):
    labels = pldmlt_experiment._PseudoLabels()
    n = len(ids)
    labels.add(ids, {"grades": [1] * n, "initial_grades": [1] * n, "allowed": np.ones((n, 5))})
    return labels


def test_each_network_gets_the_input_scaling_of_its_imagenet_weights(tmp_path, monkeypatch):
    from drkeras.models.input_scaling import IMAGENET_SCALING

    size = 32
    run, seen, _, exported = _offline_paper_run(tmp_path, monkeypatch, size)

    # the graders: stage 1's ResNeXts (image-classifiers, raw 0-255), NASNet, DenseNet-201
    expected = {
        "resnext101": "raw",
        "resnext50": "raw",
        "nasnet_large": "symmetric",
        "densenet201": "imagenet_torch",
    }
    for arch, mode in expected.items():
        seen.clear()
        run.train_grader(arch, tmp_path, f"stage_{arch}", seed=0)
        assert seen == [("grading", mode)], arch
        assert mode == IMAGENET_SCALING[arch]

    # the pixel-level rows: VGG16 (caffe) for ours and the VGG16-UNets, each segmenter its encoder's
    source = SegSource(tmp_path, "train", ("a", "b"))
    labels = _pseudo_labels(["a", "b"])
    rows = {
        "UNet": "imagenet_caffe",  # vgg16
        "LinkNet": "raw",  # resnet18 (image-classifiers)
        "FPN": "raw",  # resnet50
        "DeepLabv3+": "unit",  # keras-cv ResNet50V2
        "MTUnet": "imagenet_caffe",
        "L_S": "imagenet_caffe",
    }
    for row, mode in rows.items():
        seen.clear()
        run.train_pixel_model(row, [source], labels, f"stage_{row}", seed=0, beta=0.8)
        assert seen == [("segmentation", mode)], row
    assert len({mode for mode in rows.values()}) == 3  # not one scaling for every network

    # the export of Ours serves the VGG16 scaling it was trained with, not ResNeXt's
    run._export_and_overlays(_tiny_multitask(size), [])
    assert exported["preprocess"]["normalization"] == "imagenet_caffe"
    assert exported["preprocess"]["normalization"] != expected["resnext101"]

    # evaluation: stage 1 reads the pixel-level images with the graders' scaling
    seen.clear()
    next(run._pixel_chunks([source], run._scaling("resnext101")))
    assert seen == [("segmentation", "raw")]


# --- augmentation (issue 16 item 6) ----------------------------------------------------------


def test_augmentation_is_section_4_1s_rotation_flips_and_cropping(tmp_path, monkeypatch):
    params = pldmlt_experiment.PLDMLT_AUGMENT
    assert params.flip_horizontal and params.flip_vertical
    assert params.rotation_deg > 0 and 0 < params.crop < 1
    # nothing the paper does not name: no zoom, shift, shear, colour
    for name in ("zoom", "shift", "shear_deg", "brightness", "contrast", "saturation", "hue"):
        assert getattr(params, name) == 0, name
    assert params.channel_shift == 0 and not params.rotate90
    # every training pipeline of the experiment draws from it; evaluation is not augmented
    run, _, calls, _ = _offline_paper_run(tmp_path, monkeypatch)
    run.train_grader("resnext50", tmp_path, "grader", seed=0)
    source = SegSource(tmp_path, "train", ("a",))
    run.train_pixel_model("L_S", [source], _pseudo_labels(["a"]), "ls", seed=0, beta=0.8)
    run._evaluate_segmentation(_tiny_multitask(32), [source], "imagenet_caffe")
    training = [c for c in calls if c["augment"]]
    assert {c["pipeline"] for c in training} == {"grading", "segmentation"}
    assert all(c["augment_params"] == params for c in training)
    assert any(not c["augment"] for c in calls if c["pipeline"] == "segmentation")
