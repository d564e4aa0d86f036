"""experiments/mtunet.py (Foo et al. 2020): helpers, the paper preset, and one end-to-end run."""

import contextlib
import csv
import io
import json
import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import stats
from sklearn.metrics import f1_score

from drkeras import keys
from drkeras.config import resolve_preset
from drkeras.export import load_exported
from drkeras.models import mtunet as mtunet_models
from experiments import mtunet

# --- balanced EyePACS set (Performance Study, item 3) ------------------------------------------


def _labels(grades, prefix):
    return {
        keys.ID: np.array([f"{prefix}{i}" for i in range(len(grades))], dtype=object),
        keys.GRADE: np.array(grades),
    }


def test_balanced_grading_ids_keep_the_rarest_grade_count_over_pooled_splits():
    labels = {
        "train": _labels([0, 0, 0, 1, 1, 2, 2, 3, 4, -1], "tr"),
        "test": _labels([0, 1, 2, 3, 3, 4, 0], "te"),
    }
    chosen = mtunet.balanced_grading_ids(labels, seed=3)
    grade_of = {
        i: g for split in labels.values() for i, g in zip(split[keys.ID], split[keys.GRADE])
    }
    picked = [i for ids in chosen.values() for i in ids]
    # grade 4 has 2 images (one per split): every grade keeps 2, the unknown grade none.
    assert np.bincount([grade_of[i] for i in picked], minlength=5).tolist() == [2, 2, 2, 2, 2]
    assert len(set(picked)) == 10
    assert all(i.startswith("tr") for i in chosen["train"])
    assert all(i.startswith("te") for i in chosen["test"])
    assert {"tr8", "te5"} <= set(picked)  # the two grade-4 images are always kept
    assert mtunet.balanced_grading_ids(labels, seed=3) == chosen
    capped = mtunet.balanced_grading_ids(labels, seed=3, max_per_grade=1)
    assert sum(map(len, capped.values())) == 5
    with pytest.raises(ValueError, match="grade counts"):
        mtunet.balanced_grading_ids({"train": _labels([0, 1, 2, 3], "x")})


# --- Table 2 and its paired t-test --------------------------------------------------------------


def _dice_runs(values):
    return [{mtunet.RED: v, mtunet.YELLOW: v / 2} for v in values]


def test_dice_table_means_stds_and_paired_ttest():
    dice = {row: _dice_runs([50.0, 52.0, 54.0]) for row in mtunet.PAPER_TABLE2}
    dice["MTUNet"] = _dice_runs([55.0, 56.0, 60.0])
    dice[mtunet.SINGLE_TASK_ROW] = _dice_runs([10.0, 20.0, 30.0])
    table = mtunet.dice_table(dice, title="T2")
    assert table.rows() == list(mtunet.PAPER_TABLE2) + [mtunet.SINGLE_TASK_ROW, mtunet.TTEST_ROW]
    frame = table.to_frame().set_index(["row", "column"])
    single = frame.loc[(mtunet.SINGLE_TASK_ROW, mtunet.RED)]
    assert (single["ours_mean"], single["ours_std"]) == (20.0, 10.0)
    assert frame.loc[("LinkNet", mtunet.RED), "paper"] == 73.56
    # differences MTUNet - LinkNet: 5, 4, 6 -> t = 5 / (1 / sqrt(3)), two-sided, 2 dof
    p_red = stats.ttest_rel([55.0, 56.0, 60.0], [50.0, 52.0, 54.0]).pvalue
    assert table.values(mtunet.TTEST_ROW, mtunet.RED) == [pytest.approx(p_red)]
    t = 5.0 * math.sqrt(3.0)
    assert p_red == pytest.approx(2 * stats.t.sf(t, df=2))
    # halving both series leaves the t statistic, hence p, unchanged
    assert table.values(mtunet.TTEST_ROW, mtunet.YELLOW) == [pytest.approx(p_red)]

    same = {row: _dice_runs([40.0, 41.0]) for row in mtunet.PAPER_TABLE2}
    assert mtunet.dice_table(same, title="T2").values(mtunet.TTEST_ROW, mtunet.RED) == [1.0]

    one = mtunet.dice_table({row: _dice_runs([40.0]) for row in mtunet.PAPER_TABLE2}, title="T")
    assert mtunet.TTEST_ROW not in one.rows()
    assert one.title.endswith("paired t-test not computed (needs train.runs >= 2)")
    with pytest.raises(ValueError, match="no Dice for row"):
        mtunet.dice_table({"UNet": _dice_runs([1.0])}, title="T")


# --- Dice of the red and yellow lesion groups (Table 2) -----------------------------------------


def test_lesion_group_dice_hand_computed():
    # classes of red_yellow_od: 0 background, 1 red, 2 yellow, 3 optic disc
    true = np.array([[[1, 1, 0, 2], [3, 3, 0, 0]]])
    pred = np.array([[[1, 0, 1, 2], [3, 1, 0, 2]]])
    dice = mtunet.lesion_group_dice(pred, true)
    # red: TP 1, FP 2, FN 1 -> 2/(2+3); yellow: TP 1, FP 1, FN 0 -> 2/3
    assert dice["Red lesions"] == pytest.approx(2 / 5)
    assert dice["Yellow lesions"] == pytest.approx(2 / 3)
    # pooled over images, not averaged per image: the empty second image does not count 1
    two = mtunet.lesion_group_dice(
        np.concatenate([pred, np.zeros_like(pred)]), np.concatenate([true, np.zeros_like(true)])
    )
    assert two == dice
    # per-lesion class sets group MA+HE and EX+SE the same way
    per_lesion = mtunet.lesion_group_dice(
        np.array([[[1, 2, 3, 4]]]), np.array([[[2, 1, 4, 0]]]), "lesions"
    )
    assert per_lesion == {"Red lesions": 1.0, "Yellow lesions": pytest.approx(2 / 3)}


def test_lesion_group_dice_matches_sklearn_f1_on_random_maps():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, size=(3, 16, 16))
    true = rng.integers(0, 4, size=(3, 16, 16))
    dice = mtunet.lesion_group_dice(pred, true)
    assert dice["Red lesions"] == pytest.approx(f1_score((true == 1).ravel(), (pred == 1).ravel()))
    assert dice["Yellow lesions"] == pytest.approx(
        f1_score((true == 2).ravel(), (pred == 2).ravel())
    )
    with pytest.raises(ValueError, match="differ in shape"):
        mtunet.lesion_group_dice(pred, true[:2])


def test_each_network_gets_the_shared_tables_input_scaling(tmp_path):
    import types

    from drkeras.models.input_scaling import input_scaling

    config = resolve_preset(mtunet.MTUnetExperiment.presets, "paper")
    run = mtunet._Run(types.SimpleNamespace(config=config, out_dir=tmp_path))
    assert run._input_mode(mtunet.VGG16_ENCODER) == "imagenet_caffe"
    # DeepLab's keras-cv ResNet50V2 expects [0, 1]; the table is keyed by the backbone itself
    assert run.segmenter_family("deeplabv3plus") == config.method.deeplab_backbone
    assert run._input_mode(run.segmenter_family("deeplabv3plus")) == "unit"
    assert run._input_mode(run.segmenter_family("unet")) == "imagenet_caffe"  # vgg16 encoder
    scalings = {name: run._input_mode(name) for name in config.method.graders}
    assert scalings == {
        "nasnet_large": "symmetric",
        "densenet201": "imagenet_torch",
        "resnext101": "raw",
        "inception_resnet_v2": "symmetric",
    }
    for name, mode in scalings.items():  # the one table PLDMLT and the exports use
        assert mode == input_scaling(name, encoder_weights="imagenet", default="unit")
    smoke = resolve_preset(mtunet.MTUnetExperiment.presets, "smoke")
    run = mtunet._Run(types.SimpleNamespace(config=smoke, out_dir=tmp_path))
    assert run._input_mode("resnext50") == smoke.data.normalization  # no weights: the default


def test_augmentation_is_the_papers_list_with_keras_imagedatagenerator_conventions():
    params = mtunet.MTUNET_AUGMENT
    named = ("rotation_deg", "shift", "shear_deg", "zoom", "channel_shift")
    assert all(getattr(params, name) > 0 for name in named)
    assert params.flip_horizontal and params.flip_vertical
    for name in ("brightness", "contrast", "saturation", "hue", "crop"):
        assert getattr(params, name) == 0, name
    assert not params.rotate90
    # Keras: one channel-shift intensity for all channels, zx and zy apart, fill "nearest"
    assert params.channel_shift_shared and params.zoom_per_axis and params.fill == "nearest"


# --- presets -----------------------------------------------------------------------------------


def test_paper_preset_has_the_papers_hyper_parameters():
    config = resolve_preset(mtunet.MTUnetExperiment.presets, "paper")
    optimizer = config.optimizers["model"]
    assert (optimizer.name, optimizer.learning_rate, optimizer.schedule) == (
        "adam",
        1e-5,
        "constant",
    )
    assert config.data.image_size == 512
    assert config.model.encoder_weights == "imagenet" and config.model.width == 1.0
    assert config.data.normalization == "imagenet_caffe"
    assert config.method.alpha == 1.0
    assert config.train.epochs == 50 and config.method.seg_epochs == 50
    assert config.train.runs == 3
    assert config.method.class_set == "red_yellow_od"
    assert config.method.max_per_grade == 0  # balanced to the grade-4 count (1,914)
    assert config.method.grading_splits == ("train", "val", "test")
    assert config.method.external == "messidor2"
    assert config.method.graders == (
        "nasnet_large",
        "densenet201",
        "resnext101",
        "inception_resnet_v2",
    )
    smoke = resolve_preset(mtunet.MTUnetExperiment.presets, "smoke")
    assert smoke.data.source == "synthetic" and smoke.train.runs >= 2


# --- one complete run --------------------------------------------------------------------------

SIZE = 32
# The smoke preset shrunk: 32 px, half the synthetic images, one step per network, one run
# (the t-test and the std over runs are checked on dice_table above), and a small VGG16
# classifier in the four grader rows (the ImageNet graders take 5-30 s each just to build; the
# titles name the substitute).
TINY = [
    f"data.image_size={SIZE}",
    "data.batch_size=4",
    "data.synthetic_size=64",
    "data.synthetic_scale=0.5",
    "model.width=0.125",
    "method.seg_epochs=1",
    "method.max_per_grade=1",
    "method.graders=vgg16,vgg16,vgg16,vgg16",
    "method.segmenter_backbone=vgg16",
    "method.deeplab_backbone=resnet18_v2",
    "train.epochs=1",
    "train.steps_per_epoch=1",
    "train.runs=1",
    "train.verbose=0",
]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mtunet") / "run"
    argv = ["--out", str(out)]
    for item in TINY:
        argv += ["--set", item]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = mtunet.main(mtunet.MTUnetExperiment(), argv)
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return code, out, rows, printed.getvalue()


def _cells(rows, table):
    return {(r["row"], r["column"]): r for r in rows if r["table"] == table}


def test_run_fills_every_table_beside_the_papers_numbers(smoke_run):
    code, out, rows, printed = smoke_run
    assert code == 0

    t1 = _cells(rows, "table1")
    assert {r for r, _ in t1} == set(mtunet.PAPER_TABLE1)
    for row, paper in mtunet.PAPER_TABLE1.items():
        for column in (mtunet.DICE, mtunet.ROC):
            cell = t1[(row, column)]
            assert float(cell["paper"]) == paper[column]
            assert int(cell["n_runs"]) == 1
            assert 0.0 <= float(cell["ours_mean"]) <= 100.0

    t2 = _cells(rows, "table2")
    assert {r for r, _ in t2} == set(mtunet.PAPER_TABLE2) | {mtunet.SINGLE_TASK_ROW}
    for row in list(mtunet.PAPER_TABLE2) + [mtunet.SINGLE_TASK_ROW]:
        for column in (mtunet.RED, mtunet.YELLOW):
            cell = t2[(row, column)]
            assert int(cell["n_runs"]) == 1
            assert 0.0 <= float(cell["ours_mean"]) <= 100.0
            if row in mtunet.PAPER_TABLE2:
                assert float(cell["paper"]) == mtunet.PAPER_TABLE2[row][column][0]
            else:
                assert cell["paper"] == ""

    for table, paper in (("table3", mtunet.PAPER_TABLE3), ("table4", mtunet.PAPER_TABLE4)):
        cells = _cells(rows, table)
        assert {r for r, _ in cells} == set(paper)
        for row, values in paper.items():
            for k, column in enumerate(mtunet.GRADE_COLUMNS):
                cell = cells[(row, column)]
                assert float(cell["paper"]) == values[k][0]
                assert 0.0 <= float(cell["ours_mean"]) <= 100.0
                assert int(cell["n_runs"]) == 1

    markdown = (out / "results.md").read_text()
    assert "paired t-test not computed (needs train.runs >= 2)" in markdown
    assert "graders: NASNet = vgg16" in markdown  # substitutes are named in the titles
    assert "ddr test (instead of the private SiDRP14-15)" in markdown

    # The item-5 comparison is saved and agrees with Table 2.
    comparison = json.loads((out / "comparison.json").read_text())
    for row in (mtunet.MTUNET_T2_ROW, "UNet"):
        for column in (mtunet.RED, mtunet.YELLOW):
            assert comparison["dice_percent"][row][column]["mean"] == pytest.approx(
                float(t2[(row, column)]["ours_mean"])
            )
    assert set(comparison["mtunet_vs"].values()) <= {"not worse", "worse"}
    assert "MTUnet vs single-task UNet at equal budget" in printed
    red = comparison["dice_percent"][mtunet.MTUNET_T2_ROW][mtunet.RED]["mean"]
    assert f"MTUNet {red:.2f}" in printed
    assert markdown in printed


# The stages of one run, in order (each trains one network; history.csv names them run<r>_...).
PER_RUN_STAGES = (
    "initial_segmenter",
    "variant_a",
    "variant_b_step1",
    "variant_b_step2",
    "variant_c",
    "grader_nasnet",
    "grader_densenet_201",
    "grader_resnext_101",
    "grader_inceptionresnetv2",
    "unet",
    "linknet",
    "feature_pyramid",
    "deeplabv3",
    "mtunet_idrid_s",
)


def test_run_trains_every_network_of_every_run(smoke_run):
    _, out, _, _ = smoke_run
    with (out / "history.csv").open() as handle:
        stages = {r["stage"] for r in csv.DictReader(handle)}
    assert stages == {f"run0_{s}" for s in PER_RUN_STAGES}


def test_pseudo_masks_follow_the_grade_zero_rule(smoke_run):
    _, out, _, _ = smoke_run
    examples = list(
        tf.data.TFRecordDataset(str(out / "pseudo" / "run0.tfrecord")).map(mtunet._parse_pseudo)
    )
    grades = sorted(int(g) for _, g in examples)
    assert grades == [0, 1, 2, 3, 4]  # max_per_grade=1 of the balanced EyePACS set
    lesion = list(mtunet_models.lesion_class_indices("red_yellow_od"))
    for classes, grade in examples:
        assert classes.shape == (SIZE, SIZE)
        assert int(tf.reduce_max(classes)) < 4
        if int(grade) == 0:
            assert not np.isin(classes.numpy(), lesion).any()


def test_export_reloads_and_the_figure_exists(smoke_run):
    _, out, _, _ = smoke_run
    exported = load_exported(out / "export" / "mtunet")
    check = json.loads(
        (out / "export" / "mtunet" / "assets.extra" / "export_check.json").read_text()
    )
    assert check["ok"]
    photo = np.zeros((50, 70, 3), np.uint8)
    photo[5:45, 15:55] = 140
    result = exported.predict(photo[None])
    assert result[keys.GRADE_PROBS].shape == (1, 5)
    np.testing.assert_allclose(result[keys.GRADE_PROBS].sum(), 1.0, atol=1e-5)
    assert result[keys.SEG_PROBS].shape == (1, SIZE, SIZE, 4)
    channels = exported.meta["outputs"][keys.SEG_PROBS]["channels"]
    assert [c for c, _ in channels] == ["background", "red", "yellow", "optic_disc"]

    # Fig. 6: 2 images x (image, ground truth, 6 networks), 2.2 x 2.4 inches per panel.
    with Image.open(out / "fig6_segmentation.png") as figure:
        assert figure.size == (int(2.2 * 8 * 100), int((2.4 * 2 + 0.6) * 100))
    assert (out / "history.png").is_file()


@pytest.mark.slow  # `make test-slow`; tests/test_stages.py dry-runs toy stages
def test_dry_run_trains_run_0_of_every_stage_and_builds_the_data_of_run_1(tmp_path):
    out = tmp_path / "dry"
    argv = ["--out", str(out), "--dry-run", "1"]
    for item in [*TINY, "train.runs=2"]:
        argv += ["--set", item]
    with contextlib.redirect_stdout(io.StringIO()):
        assert mtunet.main(mtunet.MTUnetExperiment(), argv) == 0
    declared = [f"run{r}_{s}" for r in range(2) for s in PER_RUN_STAGES]

    plan = json.loads((out / "plan.json").read_text())
    assert [row["stage"] for row in plan["stages"]] == declared
    groups = {row["stage"]: row["group"] for row in plan["stages"]}
    assert all(groups[f"run1_{s}"] == groups[f"run0_{s}"] == s for s in PER_RUN_STAGES)

    dry = json.loads((out / "dry_run.json").read_text())
    entries = {entry["stage"]: entry for entry in dry["stages"]}
    assert sorted(entries) == sorted(declared) and not dry["declared_stages_not_reached"]
    for stage in PER_RUN_STAGES:
        trained, skipped = entries[f"run0_{stage}"], entries[f"run1_{stage}"]
        assert trained["trained"] and len(trained["fits"]) == 1, stage
        batches = trained["fits"][0]["batches"]
        assert sorted(batches) == ["1", "2"], stage
        assert all(len(b["step_seconds"]) == 1 for b in batches.values()), stage
        assert not skipped["trained"] and "fits" not in skipped, stage

    # Run 1 trained nothing: every cell holds run 0's number only, nothing is made up.
    with (out / "results.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["ours_mean"]]
    assert rows and {int(r["n_runs"]) for r in rows} == {1}
    assert not (out / "pseudo" / "run1.tfrecord").exists()
    assert (out / "pseudo" / "run0.tfrecord").is_file()
