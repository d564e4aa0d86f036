"""Metrics: hand-computable cases with exact values, cross-checks against scikit-learn/scipy."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import stats
from sklearn import metrics as skm

from drkeras import metrics as M

# ------------------------------------------------------------------------ pixel curves


def _random_pixels(rng, n=60_000, prevalence=0.05):
    labels = (rng.random(n) < prevalence).astype(np.uint8)
    # Scores informative but overlapping, so both AUCs are far from 0.5 and from 1.
    scores = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) + 1.5 * labels - 1.0)))
    return labels, scores


def test_pixel_accumulator_agrees_with_sklearn_across_updates():
    rng = np.random.default_rng(0)
    labels, scores = _random_pixels(rng)
    acc = M.PixelCurveAccumulator(num_thresholds=1000)
    # Several "images" of different shapes, like a test set of different resolutions.
    for chunk_l, chunk_s in zip(np.array_split(labels, 3), np.array_split(scores, 3)):
        acc.update(chunk_s.reshape(-1, 100), chunk_l.reshape(-1, 100))
    assert acc.num_positives == labels.sum()
    assert acc.num_negatives == labels.size - labels.sum()
    assert acc.roc_auc() == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-3)
    assert acc.pr_auc("ap") == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-3)
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    assert acc.pr_auc("trapezoid") == pytest.approx(skm.auc(recall, precision), abs=1e-3)


def test_pixel_accumulator_exact_on_quantised_scores_and_valid_mask():
    # Scores already on bin edges: the binned curves are exact, equal to sklearn to 1e-12.
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 10, size=(4, 50)) / 10.0
    labels = (rng.random((4, 50)) < 0.3 + 0.5 * scores).astype(np.uint8)
    valid = np.ones((4, 50), bool)
    valid[:, :10] = False
    acc = M.PixelCurveAccumulator(num_thresholds=10)
    acc.update(scores, labels, valid=valid)
    keep = valid.ravel()
    ls, ss = labels.ravel()[keep], scores.ravel()[keep]
    assert acc.roc_auc() == pytest.approx(skm.roc_auc_score(ls, ss), abs=1e-12)
    assert acc.pr_auc("ap") == pytest.approx(skm.average_precision_score(ls, ss), abs=1e-12)
    p, r, _ = skm.precision_recall_curve(ls, ss)
    assert acc.pr_auc("trapezoid") == pytest.approx(skm.auc(r, p), abs=1e-12)


def test_pixel_accumulator_hand_case_and_curves():
    acc = M.PixelCurveAccumulator(num_thresholds=4)
    # bins: 0.9 -> 3 (pos), 0.6 -> 2 (neg), 0.3 -> 1 (pos), 0.1 -> 0 (neg)
    acc.update(np.array([0.9, 0.6, 0.3, 0.1]), np.array([1, 0, 1, 0]))
    assert acc.roc_auc() == pytest.approx(0.75)  # 3 of 4 pos/neg pairs ordered correctly
    assert acc.pr_auc("ap") == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))
    c = acc.curves()
    np.testing.assert_allclose(c["fpr"], [0, 0, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(c["tpr"], [0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(c["recall"], [0, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(c["precision"], [1, 1, 0.5, 2 / 3, 0.5])
    # trapezoid: (0->.5: 1) + (.5: vertical) + (.5->1: (0.5 + 2/3)/2) -> 0.5 + 0.2917
    assert acc.pr_auc("trapezoid") == pytest.approx(0.5 + 0.5 * (0.5 + 2 / 3) / 2)


def test_pixel_accumulator_undefined_and_bad_input():
    acc = M.PixelCurveAccumulator(10)
    acc.update(np.array([0.2, 0.4]), np.array([0, 0]))
    assert np.isnan(acc.roc_auc()) and np.isnan(acc.pr_auc())
    with pytest.raises(ValueError, match="probabilities in \\[0, 1\\]"):
        acc.update(np.array([1.5]), np.array([1]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        acc.update(np.array([0.5]), np.array([255]))
    with pytest.raises(ValueError, match="same shape"):
        acc.update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_per_lesion_curves_skip_unannotated():
    rng = np.random.default_rng(2)
    probs = rng.random((3, 8, 8, 2))
    masks = (rng.random((3, 8, 8, 2)) < probs).astype(np.uint8)
    present = np.array([[True, True], [True, False], [False, True]])
    curves = M.PerLesionCurves(["MA", "EX"], num_thresholds=100)
    curves.update(probs, masks, present=present)
    ref = M.PixelCurveAccumulator(100)
    ref.update(probs[:2, ..., 0], masks[:2, ..., 0])
    assert curves.roc_auc()["MA"] == ref.roc_auc()
    ref = M.PixelCurveAccumulator(100)
    ref.update(probs[[0, 2], ..., 1], masks[[0, 2], ..., 1])
    assert curves.pr_auc()["EX"] == ref.pr_auc()


# ------------------------------------------------------------------------ Dice / IoU


def _mask(rows):
    return np.array(rows, np.uint8)[None, :, :, None]


def test_dice_iou_hand_values_and_empty_convention():
    pred = _mask([[1, 1, 0], [0, 0, 0]])
    target = _mask([[1, 0, 0], [1, 0, 0]])  # tp 1, fp 1, fn 1
    assert M.dice_per_image(pred, target)[0, 0] == pytest.approx(0.5)
    assert M.iou_per_image(pred, target)[0, 0] == pytest.approx(1 / 3)
    assert M.pixel_accuracy(pred, target)[0] == pytest.approx(4 / 6)
    empty = np.zeros_like(pred)
    assert M.dice_per_image(empty, empty)[0, 0] == 1.0
    assert M.iou_per_image(empty, empty)[0, 0] == 1.0
    assert np.isnan(M.dice_per_image(empty, empty, empty_score=np.nan)[0, 0])
    assert M.dice_per_image(pred, empty)[0, 0] == 0.0  # false positives on an empty image
    assert M.dice_per_image(empty, target)[0, 0] == 0.0


def test_per_image_mean_differs_from_pooled():
    # image 0: perfect on 1 pixel; image 1: 1 tp, 3 fp.
    pred = np.zeros((2, 2, 2, 1), np.float32)
    target = np.zeros((2, 2, 2, 1), np.uint8)
    pred[0, 0, 0, 0] = target[0, 0, 0, 0] = 1
    pred[1, :, :, 0] = 0.9
    target[1, 0, 0, 0] = 1
    per_image = M.dice_per_image(pred, target)[:, 0]
    np.testing.assert_allclose(per_image, [1.0, 2 / 5])
    assert M.dice_pooled(pred, target)[0] == pytest.approx(4 / 7)  # 2*2 / (2*2 + 3)
    assert M.iou_pooled(pred, target)[0] == pytest.approx(2 / 5)
    s = M.segmentation_scores(pred, target, names=["EX"])
    assert s["dice_per_image"]["EX"] == pytest.approx(0.7)
    assert s["dice_pooled"]["EX"] == pytest.approx(4 / 7)
    assert s["iou_per_image"]["EX"] == pytest.approx((1 + 1 / 4) / 2)


def test_mdice_miou_and_present_flags():
    rng = np.random.default_rng(3)
    pred = rng.random((4, 6, 6, 3))
    target = (rng.random((4, 6, 6, 3)) < 0.4).astype(np.uint8)
    present = np.ones((4, 3), bool)
    present[1, 2] = False
    s = M.segmentation_scores(pred, target, names=["a", "b", "c"], present=present)
    keep = np.array([0, 2, 3])
    d_c = M.dice_per_image(pred[keep, ..., 2:], target[keep, ..., 2:])[:, 0].mean()
    assert s["dice_per_image"]["c"] == pytest.approx(d_c)
    # Pooled IoU of channel a cross-checked with sklearn's Jaccard on flattened pixels.
    jac = skm.jaccard_score(target[..., 0].ravel(), (pred[..., 0] >= 0.5).ravel())
    assert s["iou_pooled"]["a"] == pytest.approx(jac)
    f1 = skm.f1_score(target[..., 1].ravel(), (pred[..., 1] >= 0.5).ravel())
    assert s["dice_pooled"]["b"] == pytest.approx(f1)
    assert s["mdice_pooled"] == pytest.approx(np.mean(list(s["dice_pooled"].values())))
    assert s["miou_per_image"] == pytest.approx(np.mean(list(s["iou_per_image"].values())))


# ------------------------------------------------------------------------ grading


def test_grading_metrics_against_sklearn():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 5, 300)
    logits = rng.normal(size=(300, 5)) + 2.0 * np.eye(5)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    pred = probs.argmax(1)
    assert M.accuracy(y, probs) == pytest.approx(skm.accuracy_score(y, pred))
    assert M.quadratic_weighted_kappa(y, probs, 5) == pytest.approx(
        skm.cohen_kappa_score(y, pred, weights="quadratic"), abs=1e-12
    )
    np.testing.assert_array_equal(M.confusion_matrix(y, pred, 5), skm.confusion_matrix(y, pred))
    assert M.top_k_accuracy(y, probs, 2) == pytest.approx(skm.top_k_accuracy_score(y, probs, k=2))
    ovr = M.one_vs_rest_auc(y, probs)
    for k in range(5):
        assert ovr[k] == pytest.approx(skm.roc_auc_score(y == k, probs[:, k]), abs=1e-12)
    g = M.grading_scores(np.concatenate([probs, probs[:2]]), np.concatenate([y, [-1, -1]]))
    assert g["n"] == 300 and g["kappa"] == pytest.approx(M.quadratic_weighted_kappa(y, pred, 5))
    assert g["auc"]["PDR"] == pytest.approx(ovr[4])


def test_kappa_hand_cases():
    assert M.quadratic_weighted_kappa([0, 1, 2], [0, 1, 2], 3) == 1.0
    # 2 classes: O = [[1, 1], [0, 0]], E = [[0, 1], [0, 0]] -> 1 - 1/1 = 0
    assert M.quadratic_weighted_kappa([0, 0], [0, 1], 2) == pytest.approx(0.0)
    assert np.isnan(M.quadratic_weighted_kappa([1, 1], [1, 1], 3))
    with pytest.raises(ValueError, match="unknown grades"):
        M.confusion_matrix([-1, 0], [0, 0], 2)


def test_roc_auc_ties_against_sklearn():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 500)
    scores = rng.integers(0, 5, 500).astype(float)  # many ties
    assert M.roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_screening_scores_icdrs_and_messidor():
    probs = np.array(
        [
            [0.7, 0.2, 0.1, 0.0, 0.0],  # p_ref 0.1, p_abn 0.3
            [0.2, 0.5, 0.2, 0.1, 0.0],  # p_ref 0.3, p_abn 0.8
            [0.1, 0.3, 0.4, 0.1, 0.1],  # p_ref 0.6, p_abn 0.9
            [0.6, 0.0, 0.4, 0.0, 0.0],  # p_ref 0.4, p_abn 0.4
        ]
    )
    s = M.screening_scores(probs, [0, 1, 2, 3])
    # referable truth [0,0,1,1]: scores .1 .3 .6 .4 -> all 4 pairs right
    assert s["referable_auc"] == 1.0
    assert s["referable_accuracy"] == 0.75  # the last case (0.4) is missed
    # abnormal truth [0,1,1,1]: scores .3 .8 .9 .4 -> 3/3 pairs right; predictions 0,1,1,0
    assert s["normal_auc"] == 1.0 and s["normal_accuracy"] == 0.75
    m = M.screening_scores(probs[:, :4], [0, 1, 2, 3], scale="messidor")
    assert m["referable_auc"] == 1.0 and m["n"] == 4
    with pytest.raises(ValueError, match="outside the messidor scale"):
        M.screening_scores(probs, [0, 1, 2, 4], scale="messidor")
    assert "Zhou et al. 2019" in M.SCREENING_SCALES["messidor"]["source"]


# ------------------------------------------------------------------------ patches, runs


def test_patch_and_image_auc():
    logits = np.array([[[2.0, -2.0], [0.0, 0.0]], [[-3.0, -3.0], [-3.0, 0.0]]])
    np.testing.assert_allclose(
        M.image_scores_from_patches(logits),
        [1.0 + 0.5 + 0.5, 3 / (1 + np.exp(3.0)) + 0.5],
    )
    assert M.image_auc(logits, [1, 0]) == 1.0
    assert M.image_auc(logits, [0, 1]) == 0.0
    labels = np.array([[[1, 0], [0, 1]], [[0, 0], [0, 1]]])
    expected = skm.roc_auc_score(labels.ravel(), logits.ravel())
    assert M.patch_auc(logits, labels) == pytest.approx(expected)


def test_mean_std_and_paired_ttest():
    assert M.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = M.mean_std([0.5])
    assert mean == 0.5 and np.isnan(std)
    a, b = [0.75, 0.76, 0.74, 0.78], [0.73, 0.73, 0.72, 0.74]
    ref = stats.ttest_rel(a, b)
    assert M.paired_ttest(a, b) == pytest.approx((ref.statistic, ref.pvalue))
    # by hand: differences .02 .03 .02 .04, mean .0275, sd .009574 -> t = 5.745
    assert M.paired_ttest(a, b)[0] == pytest.approx(5.7446, abs=1e-3)


# ------------------------------------------------------------------------ Keras metrics


def _grades_batch(rng, n=40):
    y = rng.integers(0, 5, n)
    probs = rng.random((n, 5)).astype(np.float32)
    return y, probs


def test_quadratic_kappa_metric_streaming_and_unknown():
    rng = np.random.default_rng(6)
    y, probs = _grades_batch(rng)
    m = M.QuadraticKappa(num_classes=5)
    assert m.name == "grade_kappa"
    m.update_state(y[:15], probs[:15])
    m.update_state(tf.one_hot(y[15:], 5), probs[15:])
    m.update_state(np.array([-1, -1]), probs[:2])  # unknown grades are ignored
    assert float(m.result()) == pytest.approx(
        skm.cohen_kappa_score(y, probs.argmax(1), weights="quadratic"), abs=1e-5
    )
    m.reset_state()
    assert float(tf.reduce_sum(m.confusion)) == 0.0
    clone = M.QuadraticKappa.from_config(m.get_config())
    assert clone.num_classes == 5 and clone.name == "grade_kappa"


def test_dice_metric_matches_offline_pooled():
    rng = np.random.default_rng(7)
    probs = rng.random((6, 8, 8, 3)).astype(np.float32)
    masks = (rng.random((6, 8, 8, 3)) < 0.3).astype(np.float32)
    masks[..., 2] = 0
    probs[..., 2] = 0.1  # an empty channel predicted empty counts as 1
    m = M.DiceMetric(num_classes=3)
    m.update_state(masks[:3], probs[:3])
    m.update_state(masks[3:], probs[3:])
    expected = M.dice_pooled(probs, masks.astype(np.uint8))
    assert expected[2] == 1.0
    assert float(m.result()) == pytest.approx(expected.mean(), abs=1e-6)
    # sample weight 0 on the second half equals updating with the first half only
    w = M.DiceMetric(num_classes=3)
    w.update_state(masks, probs, sample_weight=np.array([1, 1, 1, 0, 0, 0], np.float32))
    assert float(w.result()) == pytest.approx(M.dice_pooled(probs[:3], masks[:3]).mean(), 1e-6)


def test_streaming_metrics_under_mirrored_strategy(two_replicas):
    rng = np.random.default_rng(8)
    y, probs = _grades_batch(rng, 16)
    seg_p = rng.random((16, 4, 4, 2)).astype(np.float32)
    seg_t = (rng.random((16, 4, 4, 2)) < 0.5).astype(np.float32)
    with two_replicas.scope():
        kappa = M.QuadraticKappa(num_classes=5)
        dice = M.DiceMetric(num_classes=2)
    data = tf.data.Dataset.from_tensor_slices((y, probs, seg_t, seg_p)).batch(8)

    @tf.function
    def step(batch):
        def update(yb, pb, tb, sb):
            kappa.update_state(yb, pb)
            dice.update_state(tb, sb)

        two_replicas.run(update, args=batch)

    for batch in two_replicas.experimental_distribute_dataset(data):
        step(batch)
    assert float(kappa.result()) == pytest.approx(M.quadratic_weighted_kappa(y, probs, 5), abs=1e-5)
    assert float(dice.result()) == pytest.approx(
        M.dice_pooled(seg_p, seg_t.astype(np.uint8)).mean(), abs=1e-6
    )
