"""Candidate readings of PLDMLT's mDice / mIoU (issue 16 item 3) on hand-computable cases."""

import math

import numpy as np
import pytest

from drkeras import metrics
from experiments.pldmlt import (
    PAPER_ABLATION,
    PAPER_SEGMENTATION,
    SEG_COLUMNS,
    FusedSegmentationScore,
    paper_pairs_note,
)

MA, HE, EX, SE, OD = range(5)


def _two_images():
    """2 images of 4 x 4 pixels as fused class maps (0 background, 1 MA, 2 HE, 3 EX, 4 SE)."""
    true = np.zeros((2, 4, 4), int)
    pred = np.zeros((2, 4, 4), int)
    true[0, 0, 0] = true[0, 0, 1] = MA + 1  # image 1: two MA pixels and one EX pixel
    true[0, 3, 3] = EX + 1
    pred[0, 0, 0] = MA + 1  # one MA found, the other called HE, the EX missed
    pred[0, 0, 1] = HE + 1
    true[1, 1, 1:3] = HE + 1  # image 2: two HE pixels, predicted with one pixel too many
    pred[1, 1, 1:4] = HE + 1
    masks = np.zeros((2, 4, 4, 5), np.uint8)
    for lesion in (MA, HE, EX, SE):
        masks[..., lesion] = true == lesion + 1
    probs = np.eye(5, dtype=np.float32)[pred]
    return probs, masks


def test_every_reading_on_two_4x4_images():
    probs, masks = _two_images()
    score = FusedSegmentationScore()
    score.update(probs[:1], masks[:1], np.ones((1, 5), bool))
    score.update(probs[1:], masks[1:], np.ones((1, 5), bool))
    r = score.result()
    # pooled per class: background tp 26 fp 1 fn 1; MA tp 1 fn 1; HE tp 2 fp 2; EX fn 1; SE none
    assert r["mdice"] == pytest.approx((26 / 27 + 2 / 3 + 2 / 3 + 0) / 4)
    assert r["miou"] == pytest.approx((13 / 14 + 1 / 2 + 1 / 2 + 0) / 4)
    assert r["lesion_mdice"] == pytest.approx(4 / 9)
    assert r["lesion_miou"] == pytest.approx(1 / 3)
    # any lesion vs background: tp 4, fp 1, fn 1
    assert r["binary_dice"] == pytest.approx(0.8)
    assert r["binary_iou"] == pytest.approx(2 / 3)
    # per image, then over images (empty-empty left out), then over classes:
    # background 26/27 twice; MA 2/3 (image 1); HE 0 and 4/5; EX 0 (image 1)
    assert r["image_mdice"] == pytest.approx((26 / 27 + 2 / 3 + 2 / 5 + 0) / 4)
    assert r["image_miou"] == pytest.approx((13 / 14 + 1 / 2 + 1 / 3 + 0) / 4)
    # all pixels: 29 of 32 right; Dice = pixel accuracy, IoU = 29 / (29 + 3)
    assert r["pixel_dice"] == pytest.approx(29 / 32)
    assert r["pixel_iou"] == pytest.approx(29 / 35)
    assert math.isnan(r["dice"]["SE"])
    # the single-pair readings satisfy J = D / (2 - D) exactly, the means do not
    for dice, iou in (("binary_dice", "binary_iou"), ("pixel_dice", "pixel_iou")):
        assert metrics.iou_of_dice(r[dice]) == pytest.approx(r[iou])
    for dice, iou in (("mdice", "miou"), ("lesion_mdice", "lesion_miou")):
        assert r[iou] > metrics.iou_of_dice(r[dice]) + 0.01  # Jensen: a mean lies above


def test_binary_reading_counts_only_images_with_every_lesion_annotated():
    probs, masks = _two_images()
    present = np.ones((2, 5), bool)
    present[1, EX] = False  # image 2: exudates not annotated
    score = FusedSegmentationScore()
    score.update(probs, masks, present)
    r = score.result()
    assert r["binary_dice"] == pytest.approx(2 * 2 / (2 * 2 + 1))  # image 1 only: tp 2, fn 1


def test_micro_dice_iou_pools_images_and_channels_where_annotated():
    counter = metrics.SegmentationCounter(["a", "b"])
    pred = np.zeros((2, 1, 2, 2), np.uint8)
    target = np.zeros((2, 1, 2, 2), np.uint8)
    pred[0, 0, 0, 0] = target[0, 0, 0, 0] = 1  # a: tp
    pred[0, 0, 1, 1] = 1  # b: fp
    target[1, 0, 0, 1] = 1  # image 2, b: fn (not annotated below)
    pred[1, 0, 1, 0] = 1  # image 2, a: fp
    counter.update(pred, target, present=np.array([[True, True], [True, False]]))
    assert metrics.micro_dice_iou(counter) == pytest.approx({"dice": 2 / 4, "iou": 1 / 3})
    assert metrics.micro_dice_iou(counter, ["a"]) == pytest.approx({"dice": 2 / 3, "iou": 1 / 2})
    with pytest.raises(ValueError, match="unknown channel"):
        metrics.micro_dice_iou(counter, ["c"])


def test_iou_of_dice_and_the_relation_of_published_pairs():
    assert metrics.iou_of_dice(2 / 3) == pytest.approx(0.5)
    np.testing.assert_allclose(metrics.iou_of_dice([0.0, 1.0]), [0.0, 1.0])
    relation = metrics.dice_iou_relation
    assert relation(98.897, 97.820, decimals=3) == "single"  # DDR Ours: 97.818
    assert relation(96.949, 94.164, decimals=3) == "mean"  # IDRiD Ours: 94.079 < 94.164
    assert relation(95.897, 87.101, decimals=3) == "none"  # IDRiD FPN: 92.117 > 87.101
    assert relation(0.5, 1 / 3, decimals=6, percent=False) == "single"
    # every DDR pair is a single-pair one, IDRiD's only for DeepLabv3+
    groups = {
        ds: {r: relation(d, j, decimals=3) for r, (d, j) in rows.items()}
        for ds, rows in PAPER_SEGMENTATION.items()
    }
    assert set(groups["ddr"].values()) == {"single"}
    assert groups["idrid"] == {
        "UNet": "mean",
        "LinkNet": "mean",
        "DeepLabv3+": "single",
        "FPN": "none",
        "MTUnet": "mean",
        "Ours": "mean",
    }
    ablation = {r: relation(d, j, decimals=2) for r, (d, j) in PAPER_ABLATION.items()}
    assert ablation == {"L_S": "mean", "+ L_C": "single", "+ Upd-Net": "none", "+ Weight": "single"}


def test_tables_show_five_readings_and_say_which_paper_pairs_fit():
    assert len(SEG_COLUMNS) == 10
    note = paper_pairs_note(PAPER_SEGMENTATION["idrid"], decimals=3)
    assert "(2 - mDice) (one Dice/IoU pair" in note and ": DeepLabv3+;" in note
    assert note.endswith("no mean lies there): FPN")
