"""Plots: each writes a valid PNG of the expected pixel size; overlay colours are right."""

import numpy as np
import pytest
from PIL import Image

from drkeras import metrics as M
from drkeras import plots as P


def _png_size(path):
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return img.size


def _fundus(size=48):
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size * 0.45) ** 2
    img = np.zeros((size, size, 3), np.uint8)
    img[disc] = (180, 80, 40)
    return img


def test_plot_history(tmp_path):
    csv = tmp_path / "history.csv"
    csv.write_text(
        "stage,epoch,loss,val_loss,grade_kappa\n"
        "pretrain,1,1.0,1.1,\npretrain,2,0.8,0.9,\njoint,1,0.7,0.8,0.2\njoint,2,0.5,0.7,0.4\n"
    )
    out = P.plot_history(csv, tmp_path / "h.png")
    assert out == tmp_path / "h.png"
    assert _png_size(out) == (800, 300)  # two panels (loss, grade_kappa), 4x3 in at 100 dpi
    with pytest.raises(ValueError, match="'epoch' column"):
        bad = tmp_path / "bad.csv"
        bad.write_text("a,b\n1,2\n")
        P.plot_history(bad, tmp_path / "x.png")


def test_plot_roc_pr(tmp_path):
    rng = np.random.default_rng(0)
    curves = M.PerLesionCurves(["MA", "EX"], num_thresholds=100)
    probs = rng.random((2, 16, 16, 2))
    curves.update(probs, (rng.random((2, 16, 16, 2)) < probs).astype(np.uint8))
    out = P.plot_roc_pr(curves, tmp_path / "roc_pr.png", title="test")
    assert _png_size(out) == (1000, 450)


def test_plot_confusion_matrix(tmp_path):
    cm = M.confusion_matrix([0, 1, 2, 3, 4, 4], [0, 1, 1, 3, 4, 2], 5)
    out = P.plot_confusion_matrix(cm, tmp_path / "cm.png")
    assert _png_size(out) == (600, 550)
    with pytest.raises(ValueError, match="square"):
        P.plot_confusion_matrix(np.zeros((2, 3)), tmp_path / "bad.png")


def test_error_overlay_colours():
    image = np.zeros((1, 4, 3), np.uint8)
    pred = np.array([[1, 1, 0, 0]], bool)
    target = np.array([[1, 0, 1, 0]], bool)
    out = P.error_overlay(image, pred, target, alpha=1.0)
    np.testing.assert_allclose(out[0, 0], P.OVERLAY_COLORS["true positive"])
    np.testing.assert_allclose(out[0, 1], P.OVERLAY_COLORS["false positive"])
    np.testing.assert_allclose(out[0, 2], P.OVERLAY_COLORS["false negative"])
    np.testing.assert_allclose(out[0, 3], 0.0)


def test_plot_mask_overlay(tmp_path):
    image = _fundus(64)
    pred = np.zeros((32, 32, 5), np.float32)
    target = np.zeros((32, 32, 5), np.uint8)
    pred[8:16, 8:16, 2] = 0.9
    target[10:20, 10:20, 2] = 1
    out = P.plot_mask_overlay(
        image, pred, target, tmp_path / "ov.png", present=[1, 1, 1, 0, 1], title="IDRiD_55"
    )
    assert _png_size(out) == (900, 680)  # 6 panels: 3 per row, 3 x 3.4 in each
    with pytest.raises(ValueError, match="prediction"):
        P.plot_mask_overlay(image, pred, target[..., :2], tmp_path / "bad.png")


def test_heatmap_and_patch_scores(tmp_path):
    image = _fundus(48)
    cam = np.outer(np.hanning(6), np.hanning(6))
    out = P.plot_heatmap_overlay(image, cam, tmp_path / "cam.png", label="Grad-CAM")
    assert _png_size(out) == (800, 400)
    scores = np.zeros((8, 8), np.float32)
    scores[2, 5] = 1.0
    out = P.plot_patch_scores(image, scores, tmp_path / "patches.png", title="patches")
    assert _png_size(out) == (800, 400)
    with pytest.raises(ValueError, match="RGB image"):
        P.plot_heatmap_overlay(np.zeros((4, 4, 2)), cam, tmp_path / "bad.png")
