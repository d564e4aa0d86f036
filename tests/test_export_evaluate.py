"""Export (signatures, metadata, reload check, input errors) and the evaluate CLI end to end."""

import json

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image
from sklearn import metrics as skm

from drkeras import keys
from drkeras import metrics as M
from drkeras.data import preprocess as prep
from drkeras.data import records, synthetic
from drkeras.evaluate import main
from drkeras.export import ExportMismatch, export_model, load_exported, verify_export
from tests.conftest import TINY_MODEL_SIZE as SIZE
from tests.conftest import TINY_PREPROCESS as PREPROCESS
from tests.conftest import TINY_RED_YELLOW as RED_YELLOW
from tests.conftest import tiny_joint_model, write_synthetic_test_records


def _fundus_batch(n=3, size=40):
    first = synthetic.generate(10, size=size, camera="square")
    images = [first.image] + [
        synthetic.generate(11 + i, size=size, camera="square").image for i in range(n - 1)
    ]
    return np.stack(images)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tf.keras.utils.set_random_seed(1)
    model = tiny_joint_model()
    path = export_model(
        model,
        tmp_path_factory.mktemp("export") / "tiny",
        image_size=SIZE,
        preprocess=PREPROCESS,
        output_names=[keys.GRADE_PROBS, keys.LESION_PROBS, keys.SEG_PROBS],
        channels={keys.SEG_PROBS: RED_YELLOW},
    )
    return model, path


def test_export_metadata_and_reload_check(exported):
    model, path = exported
    assert (path / "saved_model.pb").is_file()
    check = json.loads((path / "assets.extra" / "export_check.json").read_text())
    assert check["ok"] and check["max_abs_diff"] < 1e-4 and check["max_abs_diff_bytes"] < 1e-4
    loaded = load_exported(path)
    meta = loaded.meta
    assert meta["preprocess"] == PREPROCESS and meta["image_size"] == SIZE
    assert loaded.output_names == [keys.GRADE_PROBS, keys.LESION_PROBS, keys.SEG_PROBS]
    assert meta["outputs"][keys.LESION_PROBS]["shape"] == [None, SIZE, SIZE, 5]
    assert meta["outputs"][keys.LESION_PROBS]["channels"][1] == ["HE", ["HE"]]
    assert meta["outputs"][keys.SEG_PROBS]["channels"][1] == ["red", ["MA", "HE"]]
    assert set(loaded.signatures) == {"serving_default", "serve_bytes"}


def test_serving_signatures_match_keras_model(exported):
    model, path = exported
    loaded = load_exported(path)
    images = _fundus_batch(3)
    ref = model(prep.prepare_batch(images, size=SIZE, **PREPROCESS), training=False)
    out = loaded.predict(images)
    assert out[keys.LESION_PROBS].shape == (3, SIZE, SIZE, 5)  # the model's size, not 40x40
    for name in loaded.output_names:
        np.testing.assert_allclose(out[name], ref[name].numpy(), atol=1e-5)
    # serve_bytes: lossless PNGs of different sizes in one batch
    small = synthetic.generate(3, size=52, camera="canon").image
    blobs = []
    for img in (images[0], small):
        buf = tf.io.encode_png(img).numpy()
        blobs.append(buf)
    from_bytes = loaded.predict_bytes(blobs)
    ref_small = model(prep.prepare_batch(small[None], size=SIZE, **PREPROCESS), training=False)
    np.testing.assert_allclose(from_bytes[keys.GRADE_PROBS][0], out[keys.GRADE_PROBS][0], 1e-5)
    np.testing.assert_allclose(
        from_bytes[keys.SEG_PROBS][1], ref_small[keys.SEG_PROBS][0].numpy(), atol=1e-5
    )


def test_wrong_inputs_get_clear_errors(exported):
    _, path = exported
    loaded = load_exported(path)
    with pytest.raises(tf.errors.InvalidArgumentError, match="uint8"):
        loaded.signatures["serving_default"](images=tf.zeros([1, 8, 8, 3], tf.float32))
    with pytest.raises(TypeError, match="Can not cast TensorSpec"):
        loaded.module.serve(tf.zeros([8, 8, 3], tf.uint8))
    with pytest.raises(ValueError, match=r"expected uint8 RGB images .*float32"):
        loaded.predict(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[batch, height, width, 3\].*\[8, 8, 3\]"):
        loaded.predict(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="not a SavedModel folder"):
        load_exported(path.parent)


def test_export_rejects_unknown_outputs_and_detects_mismatch(exported, tmp_path):
    model, path = exported
    with pytest.raises(ValueError, match=r"\['grade_logits'\] not among the model's outputs"):
        export_model(
            model,
            tmp_path / "x",
            image_size=SIZE,
            preprocess=PREPROCESS,
            output_names=["grade_logits"],
        )
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['crop'\]"):
        export_model(
            model,
            tmp_path / "x",
            image_size=SIZE,
            preprocess={"crop": True},
            output_names=[keys.GRADE_PROBS],
        )
    with pytest.raises(ValueError, match="names 2 channels but the output has 3"):
        export_model(
            model,
            tmp_path / "x",
            image_size=SIZE,
            preprocess=PREPROCESS,
            output_names=[keys.SEG_PROBS],
            channels={keys.SEG_PROBS: RED_YELLOW[:2]},
        )
    # A model that differs from the export (changed weights) fails the reload check.
    other = tiny_joint_model()
    other.set_weights([w + 0.5 for w in model.get_weights()])
    report = verify_export(other, path, _fundus_batch(2))
    assert not report["ok"] and report["max_abs_diff"] > 1e-3
    assert report["per_output"][keys.GRADE_PROBS][0] > 0


def test_export_raises_on_mismatch(tmp_path, monkeypatch):
    import drkeras.export as E

    model = tiny_joint_model()
    real = E.verify_export

    def perturbed(m, path, sample, tolerance):
        # the exporter must act on a failed check: simulate a model changed after saving
        shifted = tiny_joint_model()
        shifted.set_weights([w + 1.0 for w in m.get_weights()])
        return real(shifted, path, sample, tolerance=tolerance)

    monkeypatch.setattr(E, "verify_export", perturbed)
    with pytest.raises(ExportMismatch, match="differs from the Keras model"):
        E.export_model(
            model,
            tmp_path / "m",
            image_size=SIZE,
            preprocess=PREPROCESS,
            output_names=[keys.GRADE_PROBS],
            sample=_fundus_batch(2),
        )


def _offline_predictions(path, root):
    loaded = load_exported(path)
    grade_probs, grades, lesion, seg, masks, present = [], [], [], [], [], []
    for ex in records.records_dataset(root, "test").as_numpy_iterator():
        out = loaded.predict(ex[keys.IMAGE][None])
        grade_probs.append(out[keys.GRADE_PROBS][0])
        grades.append(ex[keys.GRADE])
        lesion.append(out[keys.LESION_PROBS][0])
        seg.append(out[keys.SEG_PROBS][0])
        box = prep.fov_box(ex[keys.IMAGE])
        masks.append(prep.prepare_example_masks(ex[keys.MASKS], box, SIZE).numpy())
        present.append(ex[keys.MASK_PRESENT])
    return tuple(map(np.stack, (grade_probs, grades, lesion, seg, masks, present)))


def test_evaluate_cli_matches_offline_metrics(exported, tmp_path, capsys):
    _, path = exported
    root = write_synthetic_test_records(tmp_path / "records")
    out = tmp_path / "eval"
    code = main(
        ["--model", str(path), "--data", str(root), "--split", "test", "--out", str(out)]
        + ["--batch-size", "3", "--num-thresholds", "200", "--overlays", "2", "--no-progress"]
    )
    assert code == 0
    assert "## grading" in capsys.readouterr().out
    for name in (
        "metrics.csv",
        "metrics.md",
        "confusion_matrix.png",
        "roc_pr_lesion_probs.png",
        "roc_pr_seg_probs.png",
    ):
        assert (out / name).is_file(), name
    assert len(list(out.glob("overlay_lesion_probs_*.png"))) == 2
    with Image.open(out / "roc_pr_lesion_probs.png") as img:
        assert img.size == (1000, 450)

    frame = pd.read_csv(out / "metrics.csv", keep_default_na=False, na_values=[""])

    def value(task, metric, target):
        hit = frame[(frame.task == task) & (frame.metric == metric) & (frame.target == target)]
        assert len(hit) == 1, (task, metric, target)
        return float(hit.value.iloc[0])

    probs, grades, lesion, seg, masks, present = _offline_predictions(path, root)
    known = grades >= 0
    assert value("grading", "n", "all") == 5
    assert value("grading", "accuracy", "all") == pytest.approx(
        skm.accuracy_score(grades[known], probs[known].argmax(1))
    )
    assert value("grading", "kappa", "all") == pytest.approx(
        skm.cohen_kappa_score(
            grades[known], probs[known].argmax(1), weights="quadratic", labels=range(5)
        )
    )
    screening = M.screening_scores(probs, grades)
    assert value("screening", "referable_auc", "icdrs") == pytest.approx(screening["referable_auc"])

    # Per-lesion pixel AUCs and Dice on the lesion_probs output, SE skipped on image 2.
    for c, lesion_name in enumerate(keys.LESIONS):
        rows = present[:, c]
        p, t = lesion[rows, ..., c], masks[rows, ..., c]
        acc = M.PixelCurveAccumulator(200)
        acc.update(p, t)
        assert value("lesion_probs", "roc_auc", lesion_name) == pytest.approx(acc.roc_auc())
        assert value("lesion_probs", "pr_auc_ap", lesion_name) == pytest.approx(acc.pr_auc("ap"))
        dice = value("lesion_probs", "dice_pooled", lesion_name)
        if t.any() or (p >= 0.5).any():
            assert dice == pytest.approx(skm.f1_score(t.ravel(), (p >= 0.5).ravel()))
        per_image = M.dice_per_image(p[..., None], t[..., None])[:, 0].mean()
        assert value("lesion_probs", "dice_per_image", lesion_name) == pytest.approx(per_image)

    # seg_probs "red" channel (index 1) is scored against the union of MA and HE.
    red = np.maximum(masks[..., 0], masks[..., 1])
    acc = M.PixelCurveAccumulator(200)
    acc.update(seg[..., 1], red)
    assert value("seg_probs", "roc_auc", "red") == pytest.approx(acc.roc_auc())
    assert value("seg_probs", "images", "all") == 6
    yellow_rows = present[:, 2] & present[:, 3]  # SE not annotated on image 2
    yellow = np.maximum(masks[yellow_rows, ..., 2], masks[yellow_rows, ..., 3])
    pred = seg[yellow_rows, ..., 2] >= 0.5
    if yellow.any() or pred.any():
        assert value("seg_probs", "iou_pooled", "yellow") == pytest.approx(
            skm.jaccard_score(yellow.ravel(), pred.ravel())
        )
    md = (out / "metrics.md").read_text()
    assert "## lesion_probs" in md and "| kappa |" in md


def test_evaluate_cli_bad_paths(exported, tmp_path, capsys):
    _, path = exported
    code = main(["--model", str(path), "--data", str(tmp_path / "none"), "--out", str(tmp_path)])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_image_score_model_gets_its_abnormal_auc(tmp_path):
    # A model serving only an image score (the SSL-GAN's image export) has no grading output,
    # yet its abnormal-vs-normal AUC needs the grades: it was silently missing.
    image = tf.keras.Input((SIZE, SIZE, 3), name=keys.IMAGE)
    score = tf.keras.layers.Lambda(lambda x: tf.reduce_mean(x, axis=[1, 2, 3]))(image)
    model = tf.keras.Model(image, {keys.IMAGE_SCORE: score})
    path = export_model(
        model,
        tmp_path / "scorer",
        image_size=SIZE,
        preprocess=PREPROCESS,
        output_names=[keys.IMAGE_SCORE],
    )
    root = write_synthetic_test_records(tmp_path / "records")
    out = tmp_path / "eval"
    assert (
        main(["--model", str(path), "--data", str(root), "--out", str(out), "--no-progress"]) == 0
    )
    frame = pd.read_csv(out / "metrics.csv")
    got = frame[(frame.task == "image_score") & (frame.metric == "abnormal_auc")].value
    loaded = load_exported(path)
    scores, truth = [], []
    for ex in records.records_dataset(root, "test").as_numpy_iterator():
        if ex[keys.GRADE] >= 0:  # the unknown grade is left out
            scores.append(
                float(np.ravel(loaded.predict(ex[keys.IMAGE][None])[keys.IMAGE_SCORE])[0])
            )
            truth.append(ex[keys.GRADE] > 0)
    assert len(got) == 1 and got.iloc[0] == pytest.approx(skm.roc_auc_score(truth, scores))
