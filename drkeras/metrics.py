"""Every metric the five papers report: exact offline functions and streaming Keras metrics.

Offline functions take NumPy arrays (or anything ``np.asarray`` accepts) and are exact; they are
what ``python -m drkeras.evaluate`` and the experiments report. The Keras metrics
(:class:`QuadraticKappa`, :class:`DiceMetric`) are for training logs; their state variables are
summed across replicas, so they give the same value under a ``MirroredStrategy``.

Which paper reports what:

======================  ==================================================================
Foo et al. 2020         Dice per lesion group (Table 2, mean ± std of 3 runs, paired t-test),
(MTUnet)                one-vs-rest ROC AUC per DR grade (Tables 3-4)
PLDMLT                  grading accuracy, mDice and mIoU over lesions (Tables 1-2)
Zhou et al. 2019        per-lesion pixel AUC-ROC and AUC-PR pooled over the IDRiD test set
                        (Table 3), grading accuracy and quadratic weighted kappa (Tables 1, 4),
                        referable / normal AUC and accuracy on Messidor (Table 2)
Lecouat et al. 2018     patch-level and image-level ROC AUC, mean ± std over 5 samplings
Cooperative learning    mIoU (Tables I-II), classification accuracy
======================  ==================================================================

Conventions stated once here:

- **Empty-empty Dice/IoU.** When neither the prediction nor the ground truth has a positive
  pixel, Dice and IoU are 1 (perfect agreement) by default; pass ``empty_score=np.nan`` to leave
  such cases out of the means instead.
- **Per-image mean vs dataset-pooled.** ``*_per_image`` computes the score on each image and
  averages over images; ``*_pooled`` sums TP/FP/FN over every pixel of the dataset first (one
  score per lesion). Pooled is what the IDRiD challenge-style curves use; the papers' Dice tables
  do not say which one they use, so both are reported.
- **AUC-PR.** ``kind="ap"``: step-wise average precision ``sum_n (R_n - R_{n-1}) P_n``, equal to
  ``sklearn.metrics.average_precision_score``; ``kind="trapezoid"``: the area under the linearly
  interpolated PR curve, ``sklearn.metrics.auc(recall, precision)``, slightly optimistic. Zhou et
  al. 2019 (Table 3, "AUC of PR") do not name their estimator and compare with the IDRiD
  challenge leaderboard; we report ``"ap"`` as the default and ``"trapezoid"`` beside it.
- **Undefined values are NaN**, e.g. a ROC AUC when the ground truth has a single class.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from scipy import stats

from drkeras import keys

__all__ = [
    "DiceMetric",
    "PerLesionCurves",
    "PixelCurveAccumulator",
    "QuadraticKappa",
    "SCREENING_SCALES",
    "SegmentationCounter",
    "accuracy",
    "as_flat_dict",
    "confusion_matrix",
    "dice_iou_relation",
    "dice_per_image",
    "dice_pooled",
    "grading_scores",
    "image_auc",
    "image_scores_from_patches",
    "iou_of_dice",
    "iou_per_image",
    "iou_pooled",
    "kappa_from_confusion",
    "mean_std",
    "micro_dice_iou",
    "one_vs_rest_auc",
    "paired_ttest",
    "patch_auc",
    "pixel_accuracy",
    "quadratic_weighted_kappa",
    "roc_auc",
    "screening_scores",
    "segmentation_scores",
    "top_k_accuracy",
]


# ----------------------------------------------------------------------------------------------
# Pixel-level ROC / PR curves pooled over a whole test set
# ----------------------------------------------------------------------------------------------


class PixelCurveAccumulator:
    """ROC and PR curves of pixel probabilities pooled over a dataset, in O(bins) memory.

    The IDRiD-challenge way of scoring lesion segmentation (used by Zhou et al. 2019, Table 3):
    every pixel of every test image is one sample. Instead of keeping hundreds of full-resolution
    probability maps, each :meth:`update` adds the image's pixels to two histograms (positives and
    negatives per probability bin). Threshold ``k / num_thresholds`` calls a pixel positive when
    its bin index is ``>= k``, so the curves are exact for scores quantised to the bins: the
    areas agree with scikit-learn on continuous scores to within about ``1 / num_thresholds``.

    Args:
        num_thresholds: number of equal-width probability bins on ``[0, 1]``.

    Example::

        >>> acc = PixelCurveAccumulator(num_thresholds=1000)
        >>> for probs, mask in predictions:            # probs float [H, W], mask {0,1} [H, W]
        ...     acc.update(probs, mask, valid=fov)     # pixels outside ``valid`` are ignored
        >>> acc.roc_auc(), acc.pr_auc("ap"), acc.pr_auc("trapezoid")
    """

    def __init__(self, num_thresholds: int = 1000):
        if int(num_thresholds) < 2:
            raise ValueError(f"num_thresholds must be >= 2, got {num_thresholds}")
        self.num_thresholds = int(num_thresholds)
        self.positives = np.zeros(self.num_thresholds, np.int64)
        self.negatives = np.zeros(self.num_thresholds, np.int64)

    def update(self, probs, masks, valid=None) -> None:
        """Add pixels: ``probs`` in ``[0, 1]``, ``masks`` in ``{0, 1}`` of the same shape.

        ``valid`` (broadcastable to ``probs``) marks the pixels to count, e.g. the field of view.
        """
        probs = np.asarray(probs)
        masks = np.asarray(masks)
        if probs.shape != masks.shape:
            raise ValueError(
                f"PixelCurveAccumulator.update: probabilities {probs.shape} and masks "
                f"{masks.shape} must have the same shape"
            )
        if valid is not None:
            valid = np.broadcast_to(np.asarray(valid, bool), probs.shape)
            probs, masks = probs[valid], masks[valid]
        probs = probs.ravel().astype(np.float64)
        masks = masks.ravel()
        if probs.size == 0:
            return
        if not (np.all(probs >= 0.0) and np.all(probs <= 1.0)):
            raise ValueError(
                "PixelCurveAccumulator.update expects probabilities in [0, 1], got range "
                f"[{np.nanmin(probs):.4g}, {np.nanmax(probs):.4g}] (apply a sigmoid to logits)"
            )
        _check_binary(masks, "PixelCurveAccumulator.update: masks")
        bins = np.minimum((probs * self.num_thresholds).astype(np.int64), self.num_thresholds - 1)
        total = np.bincount(bins, minlength=self.num_thresholds)
        pos = np.bincount(bins[masks.astype(bool)], minlength=self.num_thresholds)
        self.positives += pos
        self.negatives += total - pos

    @property
    def num_positives(self) -> int:
        return int(self.positives.sum())

    @property
    def num_negatives(self) -> int:
        return int(self.negatives.sum())

    def _cumulative(self):
        """True/false positives at thresholds k = 0..num_thresholds (bin >= k is positive)."""
        tps = np.concatenate([np.cumsum(self.positives[::-1])[::-1], [0]]).astype(np.float64)
        fps = np.concatenate([np.cumsum(self.negatives[::-1])[::-1], [0]]).astype(np.float64)
        return tps, fps

    def curves(self) -> Dict[str, np.ndarray]:
        """The curves, ordered by decreasing threshold.

        Returns a dict with ``thresholds`` (``k / num_thresholds``, k = num_thresholds..0),
        ``fpr`` and ``tpr`` (ROC, from (0, 0) to (1, 1)), and ``recall`` / ``precision`` for the
        thresholds that select at least one pixel, followed by sklearn's end point (recall 0,
        precision 1) at the front so that recall increases along the arrays.
        """
        tps, fps = self._cumulative()
        n_pos, n_neg = tps[0], fps[0]
        thresholds = np.arange(self.num_thresholds, -1, -1) / self.num_thresholds
        tps, fps = tps[::-1], fps[::-1]
        with np.errstate(invalid="ignore", divide="ignore"):
            fpr = fps / n_neg if n_neg > 0 else np.full_like(fps, np.nan)
            tpr = tps / n_pos if n_pos > 0 else np.full_like(tps, np.nan)
            selected = (tps + fps) > 0
            precision = tps[selected] / (tps[selected] + fps[selected])
            recall = tps[selected] / n_pos if n_pos > 0 else np.full(selected.sum(), np.nan)
        return {
            "thresholds": thresholds,
            "fpr": fpr,
            "tpr": tpr,
            "pr_thresholds": thresholds[selected],
            "precision": np.concatenate([[1.0], precision]),
            "recall": np.concatenate([[0.0], recall]),
        }

    def roc_auc(self) -> float:
        """Area under the ROC curve (trapezoid over the binned thresholds; ties count 1/2)."""
        if self.num_positives == 0 or self.num_negatives == 0:
            return float("nan")
        c = self.curves()
        return float(np.trapz(c["tpr"], c["fpr"]))

    def pr_auc(self, kind: str = "ap") -> float:
        """Area under the precision-recall curve.

        Args:
            kind: ``"ap"`` (step-wise average precision, sklearn ``average_precision_score``) or
                ``"trapezoid"`` (linear interpolation, sklearn ``auc(recall, precision)``).
        """
        if kind not in ("ap", "trapezoid"):
            raise ValueError(f"pr_auc: kind must be 'ap' or 'trapezoid', got {kind!r}")
        if self.num_positives == 0:
            return float("nan")
        c = self.curves()
        recall, precision = c["recall"], c["precision"]
        if kind == "ap":
            # The leading (0, 1) point has no width: sum over the real thresholds only.
            return float(np.sum(np.diff(recall) * precision[1:]))
        return float(np.trapz(precision, recall))


class PerLesionCurves:
    """One :class:`PixelCurveAccumulator` per lesion channel, skipping unannotated images.

    Args:
        names: lesion names in channel order (default ``drkeras.keys.LESIONS``).
        num_thresholds: bins of each accumulator.

    Example::

        >>> curves = PerLesionCurves(["MA", "HE", "EX", "SE"])
        >>> curves.update(lesion_probs, masks, present=mask_present)   # [B, H, W, 4], [B, 4]
        >>> curves.roc_auc()["MA"], curves.pr_auc()["EX"]
    """

    def __init__(self, names: Sequence[str] = keys.LESIONS, num_thresholds: int = 1000):
        self.names = tuple(names)
        self.accumulators = {n: PixelCurveAccumulator(num_thresholds) for n in self.names}

    def update(self, probs, masks, present=None, valid=None) -> None:
        """Add a batch: ``probs``/``masks`` ``[B, ..., C]``; ``present`` ``[B, C]`` bool.

        Channel ``c`` of image ``b`` is skipped when ``present[b, c]`` is false (the lesion was
        not annotated, which differs from an empty mask). ``valid`` ``[B, ...]`` restricts pixels.
        """
        probs, masks = np.asarray(probs), np.asarray(masks)
        _check_channels(probs, masks, len(self.names), "PerLesionCurves.update")
        batch = probs.shape[0]
        present = _present(present, batch, len(self.names))
        for c, name in enumerate(self.names):
            rows = present[:, c]
            if not rows.any():
                continue
            v = None if valid is None else np.asarray(valid, bool)[rows]
            self.accumulators[name].update(probs[rows, ..., c], masks[rows, ..., c], valid=v)

    def roc_auc(self) -> Dict[str, float]:
        return {n: a.roc_auc() for n, a in self.accumulators.items()}

    def pr_auc(self, kind: str = "ap") -> Dict[str, float]:
        return {n: a.pr_auc(kind) for n, a in self.accumulators.items()}


# ----------------------------------------------------------------------------------------------
# Overlap metrics: Dice, IoU, pixel accuracy
# ----------------------------------------------------------------------------------------------


def _check_binary(values: np.ndarray, what: str) -> None:
    if values.dtype == bool:
        return
    if values.size and not np.all((values == 0) | (values == 1)):
        found = np.unique(values)[:6]
        raise ValueError(f"{what} must hold only 0 and 1, found values {found.tolist()}")


def _check_channels(pred: np.ndarray, target: np.ndarray, channels, what: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(
            f"{what}: predictions {pred.shape} and targets {target.shape} must have the same shape"
        )
    if pred.ndim < 2:
        raise ValueError(f"{what}: expected [B, ..., C] arrays, got shape {pred.shape}")
    if channels is not None and pred.shape[-1] != channels:
        raise ValueError(f"{what}: expected {channels} channels, got {pred.shape[-1]}")


def _present(present, batch: int, channels: int) -> np.ndarray:
    if present is None:
        return np.ones((batch, channels), bool)
    present = np.asarray(present, bool)
    if present.shape != (batch, channels):
        raise ValueError(f"present must have shape {(batch, channels)}, got {present.shape}")
    return present


def _binarize(pred, threshold: float) -> np.ndarray:
    pred = np.asarray(pred)
    if pred.dtype == bool:
        return pred
    return pred >= threshold


def _ratio(num, den, empty_score):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), empty_score)


def _dice(tp, fp, fn, empty_score):
    return _ratio(2.0 * tp, 2.0 * tp + fp + fn, empty_score)


def _iou(tp, fp, fn, empty_score):
    return _ratio(tp, tp + fp + fn, empty_score)


class SegmentationCounter:
    """Streaming TP/FP/FN/TN counts per image and per channel; Dice, IoU and accuracy from them.

    Holds one ``[C]`` row of counts per image (a few numbers, not the masks), so it scales to
    hundreds of full-resolution images. :func:`segmentation_scores` is this class applied once.

    Args:
        names: channel names (default ``drkeras.keys.LESIONS``).
        threshold: probability at or above which a pixel is predicted positive.
        empty_score: Dice/IoU when prediction and target are both empty (1.0, or ``np.nan`` to
            exclude such images from the per-image means).

    Example::

        >>> counter = SegmentationCounter(["MA", "HE"], threshold=0.5)
        >>> counter.update(probs, masks, present=mask_present)
        >>> counter.result()["dice_pooled"]["MA"]
    """

    def __init__(
        self, names: Sequence[str] = keys.LESIONS, *, threshold: float = 0.5, empty_score=1.0
    ):
        self.names = tuple(names)
        self.threshold = float(threshold)
        self.empty_score = empty_score
        self._rows = []  # one [4, C] array (tp, fp, fn, tn) per image
        self._present = []

    def update(self, pred, target, present=None) -> None:
        """Add ``[B, ..., C]`` predictions (probabilities or booleans) and ``{0,1}`` targets."""
        pred, target = np.asarray(pred), np.asarray(target)
        _check_channels(pred, target, len(self.names), "SegmentationCounter.update")
        _check_binary(target, "SegmentationCounter.update: targets")
        p = _binarize(pred, self.threshold)
        t = target.astype(bool)
        axes = tuple(range(1, pred.ndim - 1))
        tp = np.sum(p & t, axis=axes)
        fp = np.sum(p & ~t, axis=axes)
        fn = np.sum(~p & t, axis=axes)
        tn = np.sum(~p & ~t, axis=axes)
        counts = np.stack([tp, fp, fn, tn], axis=1).astype(np.int64)  # [B, 4, C]
        self._rows.extend(counts)
        self._present.extend(_present(present, pred.shape[0], len(self.names)))

    @property
    def num_images(self) -> int:
        return len(self._rows)

    def counts(self) -> Tuple[np.ndarray, np.ndarray]:
        """``([N, 4, C] int counts (tp, fp, fn, tn), [N, C] bool present)``."""
        c = len(self.names)
        if not self._rows:
            return np.zeros((0, 4, c), np.int64), np.zeros((0, c), bool)
        return np.stack(self._rows), np.stack(self._present)

    def result(self) -> Dict[str, object]:
        """Scores as a dict.

        Per-channel entries are dicts ``{name: value}``: ``dice_per_image``, ``iou_per_image``
        (mean over the images where the channel is annotated), ``dice_pooled``, ``iou_pooled``
        (counts summed over those images), ``pixel_accuracy`` (pooled). Scalars: ``mdice_*`` and
        ``miou_*`` are the means over channels (NaN channels skipped), ``pixel_accuracy_mean``.
        """
        counts, present = self.counts()
        tp, fp, fn, tn = (counts[:, i, :] for i in range(4))
        with np.errstate(invalid="ignore"):
            dice_img = np.where(present, _dice(tp, fp, fn, self.empty_score), np.nan)
            iou_img = np.where(present, _iou(tp, fp, fn, self.empty_score), np.nan)
            mask = present.astype(np.int64)
            stp, sfp, sfn, stn = ((x * mask).sum(axis=0) for x in (tp, fp, fn, tn))
            annotated = present.any(axis=0)
            dice_pool = np.where(annotated, _dice(stp, sfp, sfn, self.empty_score), np.nan)
            iou_pool = np.where(annotated, _iou(stp, sfp, sfn, self.empty_score), np.nan)
            acc = _ratio(stp + stn, stp + sfp + sfn + stn, np.nan)
        out = {
            "dice_per_image": _nanmean(dice_img, axis=0),
            "iou_per_image": _nanmean(iou_img, axis=0),
            "dice_pooled": dice_pool,
            "iou_pooled": iou_pool,
            "pixel_accuracy": acc,
        }
        result = {k: dict(zip(self.names, map(float, v))) for k, v in out.items()}
        result["mdice_per_image"] = _nanmean_scalar(out["dice_per_image"])
        result["miou_per_image"] = _nanmean_scalar(out["iou_per_image"])
        result["mdice_pooled"] = _nanmean_scalar(out["dice_pooled"])
        result["miou_pooled"] = _nanmean_scalar(out["iou_pooled"])
        result["pixel_accuracy_mean"] = _nanmean_scalar(out["pixel_accuracy"])
        return result


def micro_dice_iou(counter: SegmentationCounter, channels=None, *, empty_score=np.nan):
    """Dice and IoU with TP, FP and FN summed over the images AND the channels (micro average).

    Counts of a channel enter only for the images where it is annotated. On one-hot argmax
    maps over all the classes of a mutually exclusive set (background included), every wrong
    pixel is one FP of its predicted class and one FN of its true class, so this Dice is the
    pixel accuracy, ``TP / N``, and the IoU ``TP / (TP + wrong) = Dice / (2 - Dice)``.

    Args:
        counter: a filled :class:`SegmentationCounter`.
        channels: names of the channels pooled (default all).
        empty_score: value when nothing is predicted or true in those channels.

    Returns:
        ``{"dice": float, "iou": float}``.

    Example::

        >>> counter = SegmentationCounter(["bg", "fg"])
        >>> counter.update(np.array([[[[1, 0], [0, 1]]]]), np.array([[[[1, 0], [1, 0]]]]))
        >>> micro_dice_iou(counter)   # 1 of 2 pixels right: Dice 1/2, IoU 1/3
        {'dice': 0.5, 'iou': 0.333...}
    """
    counts, present = counter.counts()
    names = list(counter.names)
    wanted = names if channels is None else list(channels)
    unknown = [c for c in wanted if c not in names]
    if unknown:
        raise ValueError(f"micro_dice_iou: unknown channel(s) {unknown}; channels are {names}")
    index = [names.index(c) for c in wanted]
    mask = present[:, index].astype(np.int64)
    tp, fp, fn = ((counts[:, i, index] * mask).sum() for i in range(3))
    return {
        "dice": float(_dice(tp, fp, fn, empty_score)),
        "iou": float(_iou(tp, fp, fn, empty_score)),
    }


def iou_of_dice(dice):
    """The IoU of the prediction/target pair a Dice value comes from: ``J = D / (2 - D)``.

    Exact for ONE pair of sets (one class, or counts pooled into one pair, as
    :func:`micro_dice_iou`). ``J(D)`` is convex, so a mean over several classes or images has
    ``mean J >= J(mean D)`` (Jensen), with equality only when all its members are equal.

    Example::

        >>> iou_of_dice(2 / 3)   # tp 1, fp 1, fn 0: Dice 2/3, IoU 1/2
        0.5
    """
    dice = np.asarray(dice, np.float64)
    out = dice / (2.0 - dice)
    return float(out) if out.ndim == 0 else out


def dice_iou_relation(
    mdice: float, miou: float, *, decimals: int, percent: bool = True, slack: float = 2.0
) -> str:
    """What a published (mDice, mIoU) pair can be: which aggregations it is consistent with.

    Compares ``miou`` with :func:`iou_of_dice` of ``mdice``, allowing ``slack`` times the
    rounding of both printed values (half a unit of the last of ``decimals`` decimals each,
    the Dice error carried through ``dJ/dD = 2 / (2 - D)^2``; the default 2 also covers values
    computed from rounded intermediates):

    - ``"single"``: ``miou = mdice / (2 - mdice)``: one Dice/IoU pair (a binary lesion Dice,
      counts pooled over classes, or one class), or a mean of equal members;
    - ``"mean"``: ``miou`` above it: a mean over several classes or images with unequal
      members (not a single pair);
    - ``"none"``: ``miou`` below it: neither (no mean of Dice/IoU pairs lies there).

    Args:
        mdice, miou: the published values.
        decimals: decimals printed in the paper.
        percent: the values are percentages.
        slack: multiple of the rounding bound accepted as equality.

    Example::

        >>> dice_iou_relation(98.897, 97.820, decimals=3)   # 98.897 / (200 - 98.897) = 97.818
        'single'
    """
    scale = 100.0 if percent else 1.0
    d, j = float(mdice) / scale, float(miou) / scale
    half = 0.5 * 10.0 ** (-int(decimals)) / scale
    tolerance = float(slack) * (half + half * 2.0 / (2.0 - d) ** 2)
    residual = j - iou_of_dice(d)
    if abs(residual) <= tolerance:
        return "single"
    return "mean" if residual > 0 else "none"


def _nanmean(x, axis):
    x = np.asarray(x, np.float64)
    n = np.sum(~np.isnan(x), axis=axis)
    s = np.nansum(x, axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def _nanmean_scalar(x) -> float:
    return float(_nanmean(np.asarray(x, np.float64).ravel(), axis=0))


def _names_for(pred) -> Tuple[str, ...]:
    return tuple(f"class{i}" for i in range(np.asarray(pred).shape[-1]))


def segmentation_scores(
    pred,
    target,
    *,
    threshold: float = 0.5,
    names: Optional[Sequence[str]] = None,
    present=None,
    empty_score=1.0,
) -> Dict[str, object]:
    """Dice, IoU (per-image mean and pooled), their means over classes and pixel accuracy.

    Dice ``2|X n Y| / (|X| + |Y|)`` (Foo et al. 2020; PLDMLT Eq. 5) and IoU
    ``|X n Y| / |X u Y|``; mDice/mIoU (PLDMLT Tables 1-2, Cooperative learning Table I) are the
    means over classes. See :meth:`SegmentationCounter.result` for the keys.

    Args:
        pred: ``[B, ..., C]`` probabilities (thresholded at ``threshold``) or booleans.
        target: ``[B, ..., C]`` ground truth in ``{0, 1}``.
        names: channel names (default ``class0..``).
        present: optional ``[B, C]`` annotation flags.
        empty_score: score of an empty prediction on an empty target.

    Example::

        >>> pred = np.array([1, 1]).reshape(1, 1, 2, 1)
        >>> target = np.array([1, 0]).reshape(1, 1, 2, 1)
        >>> s = segmentation_scores(pred, target)
        >>> s["mdice_pooled"], s["miou_pooled"]   # 2*1/(2+1), 1/2
        (0.666..., 0.5)
    """
    counter = SegmentationCounter(
        names or _names_for(pred), threshold=threshold, empty_score=empty_score
    )
    counter.update(pred, target, present=present)
    return counter.result()


def dice_per_image(pred, target, *, threshold: float = 0.5, empty_score=1.0) -> np.ndarray:
    """Dice of each image and channel, ``[B, C]`` (average over axis 0 for the per-image mean).

    Example::

        >>> dice_per_image(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 1)))  # empty-empty
        array([[1.]])
    """
    tp, fp, fn, _ = _image_counts(pred, target, threshold)
    return _dice(tp, fp, fn, empty_score)


def iou_per_image(pred, target, *, threshold: float = 0.5, empty_score=1.0) -> np.ndarray:
    """IoU (Jaccard) of each image and channel, ``[B, C]``; empty-empty gives ``empty_score``."""
    tp, fp, fn, _ = _image_counts(pred, target, threshold)
    return _iou(tp, fp, fn, empty_score)


def dice_pooled(pred, target, *, threshold: float = 0.5, empty_score=1.0) -> np.ndarray:
    """Dice per channel with TP/FP/FN summed over all images (dataset-pooled), ``[C]``."""
    tp, fp, fn, _ = (x.sum(axis=0) for x in _image_counts(pred, target, threshold))
    return _dice(tp, fp, fn, empty_score)


def iou_pooled(pred, target, *, threshold: float = 0.5, empty_score=1.0) -> np.ndarray:
    """IoU per channel with TP/FP/FN summed over all images (dataset-pooled), ``[C]``."""
    tp, fp, fn, _ = (x.sum(axis=0) for x in _image_counts(pred, target, threshold))
    return _iou(tp, fp, fn, empty_score)


def pixel_accuracy(pred, target, *, threshold: float = 0.5) -> np.ndarray:
    """Fraction of correctly classified pixels per channel, pooled over images, ``[C]``."""
    tp, fp, fn, tn = (x.sum(axis=0) for x in _image_counts(pred, target, threshold))
    return _ratio(tp + tn, tp + fp + fn + tn, np.nan)


def _image_counts(pred, target, threshold):
    counter = SegmentationCounter(_names_for(pred), threshold=threshold)
    counter.update(pred, target)
    counts, _ = counter.counts()
    return tuple(counts[:, i, :] for i in range(4))


# ----------------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------------


def _labels(y, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D array of integer labels, got shape {y.shape}")
    if y.size and not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError(f"{what}: labels must be integers")
    return y.astype(np.int64)


def _predicted_labels(y_pred) -> np.ndarray:
    """Integer labels from labels ``[N]`` or from class scores ``[N, K]`` (argmax)."""
    y_pred = np.asarray(y_pred)
    if y_pred.ndim == 2:
        return np.argmax(y_pred, axis=1).astype(np.int64)
    return _labels(y_pred, "predicted labels")


def accuracy(y_true, y_pred) -> float:
    """Fraction of correct grades; ``y_pred`` are labels ``[N]`` or probabilities ``[N, K]``.

    Example::

        >>> accuracy([0, 1, 2], [[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
        0.666...
    """
    t = _labels(y_true, "accuracy: y_true")
    p = _predicted_labels(y_pred)
    if t.shape != p.shape:
        raise ValueError(f"accuracy: {t.shape[0]} labels but {p.shape[0]} predictions")
    return float(np.mean(t == p)) if t.size else float("nan")


def top_k_accuracy(y_true, probs, k: int = 2) -> float:
    """Fraction of examples whose true grade is among the ``k`` highest probabilities.

    Ties are broken towards the lower class index (stable sort), as ``argmax`` does.
    """
    t = _labels(y_true, "top_k_accuracy: y_true")
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] != t.shape[0]:
        raise ValueError(
            f"top_k_accuracy: expected probabilities [{t.shape[0]}, K], got {probs.shape}"
        )
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(order == t[:, None], axis=1)))


def confusion_matrix(y_true, y_pred, num_classes: Optional[int] = None) -> np.ndarray:
    """``[K, K]`` counts: row = true grade, column = predicted grade (labels or probabilities).

    Example::

        >>> confusion_matrix([0, 1, 1], [0, 0, 1], num_classes=2)
        array([[1, 0],
               [1, 1]])
    """
    t = _labels(y_true, "confusion_matrix: y_true")
    p = _predicted_labels(y_pred)
    if num_classes is None:
        y_pred = np.asarray(y_pred)
        num_classes = y_pred.shape[1] if y_pred.ndim == 2 else int(max(t.max(), p.max()) + 1)
    for what, y in (("true", t), ("predicted", p)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"confusion_matrix: {what} labels must lie in 0..{num_classes - 1}, found "
                f"{y.min()}..{y.max()} (unknown grades (-1) must be filtered out first)"
            )
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def kappa_from_confusion(cm) -> float:
    """Quadratic weighted kappa of a ``[K, K]`` confusion matrix (``quadratic_weighted_kappa``)."""
    cm = np.asarray(cm, np.float64)
    k = cm.shape[0]
    n = cm.sum()
    if n == 0:
        return float("nan")
    idx = np.arange(k)
    weights = (idx[:, None] - idx[None, :]) ** 2 / max(k - 1, 1) ** 2
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / n
    den = np.sum(weights * expected)
    if den == 0:
        return float("nan")
    return float(1.0 - np.sum(weights * cm) / den)


def quadratic_weighted_kappa(y_true, y_pred, num_classes: Optional[int] = None) -> float:
    """Cohen's kappa with quadratic weights ``(i - j)^2 / (K - 1)^2`` (Kaggle EyePACS metric).

    ``1 - sum(w O) / sum(w E)`` with ``O`` the confusion matrix and ``E`` the outer product of
    its marginals; reported by Zhou et al. 2019 (Tables 1 and 4). Equals
    ``sklearn.metrics.cohen_kappa_score(y_true, y_pred, weights="quadratic",
    labels=range(num_classes))``; NaN when both raters use a single class.

    Example::

        >>> quadratic_weighted_kappa([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
        1.0
    """
    return kappa_from_confusion(confusion_matrix(y_true, y_pred, num_classes))


def roc_auc(labels, scores) -> float:
    """Exact ROC AUC (Mann-Whitney U with average ranks for ties); NaN for a single class.

    Example::

        >>> roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
        0.75
    """
    labels = np.asarray(labels).ravel()
    scores = np.asarray(scores, np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"roc_auc: {labels.size} labels but {scores.size} scores")
    _check_binary(labels, "roc_auc: labels")
    labels = labels.astype(bool)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def one_vs_rest_auc(y_true, probs) -> np.ndarray:
    """ROC AUC of each grade against the others, ``[K]`` (Foo et al. 2020, Tables 3-4).

    Grade ``k``'s score is its probability ``probs[:, k]``; a grade absent from ``y_true`` gives
    NaN.
    """
    t = _labels(y_true, "one_vs_rest_auc: y_true")
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] != t.shape[0]:
        raise ValueError(
            f"one_vs_rest_auc: expected probabilities [{t.shape[0]}, K], got {probs.shape}"
        )
    return np.array([roc_auc(t == k, probs[:, k]) for k in range(probs.shape[1])])


def grading_scores(grade_probs, grades, *, names: Optional[Sequence[str]] = None) -> Dict:
    """All grading metrics at once; examples with unknown grade (-1) are left out.

    Returns a dict with ``accuracy``, ``top2_accuracy``, ``kappa`` (quadratic), ``auc`` (dict
    grade name -> one-vs-rest AUC), ``confusion`` (``[K, K]``) and ``n`` (examples used).
    """
    probs = np.asarray(grade_probs, np.float64)
    t = _labels(grades, "grading_scores: grades")
    known = t >= 0
    probs, t = probs[known], t[known]
    k = probs.shape[1]
    names = (
        tuple(names)
        if names is not None
        else (keys.GRADE_NAMES if k == keys.NUM_GRADES else tuple(str(i) for i in range(k)))
    )
    return {
        "accuracy": accuracy(t, probs),
        "top2_accuracy": top_k_accuracy(t, probs, 2),
        "kappa": quadratic_weighted_kappa(t, probs, k),
        "auc": dict(zip(names, map(float, one_vs_rest_auc(t, probs)))),
        "confusion": confusion_matrix(t, probs, k),
        "n": int(t.size),
    }


# ----------------------------------------------------------------------------------------------
# Screening tasks
# ----------------------------------------------------------------------------------------------

SCREENING_SCALES = {
    "icdrs": {
        "num_grades": 5,
        "referable_from": 2,
        "source": "ICDRS 0-4: referable = moderate NPDR or worse (grade >= 2), Gulshan et al. "
        "2016 (JAMA), the definition Foo et al. 2020 quote; normal = grade 0",
    },
    "messidor": {
        "num_grades": 4,
        "referable_from": 2,
        "source": "Messidor 0-3: 'Grades 0 and 1 are marked as non-referable, while Grades 2 and "
        "3 are considered referable. All grades other than Grade 0 indicate an abnormal case' "
        "(Zhou et al. 2019, Sec. 4.1, after Wang et al. 2017, Zoom-in-Net)",
    },
}


def screening_scores(grade_probs, grades, scale: str = "icdrs") -> Dict[str, float]:
    """Referable vs non-referable and normal vs abnormal: ROC AUC and accuracy.

    The model's probabilities are collapsed over its own grade columns (5 for an ICDRS model, 4
    for a Messidor model; a model trained on EyePACS is scored on Messidor this way, Zhou et al.
    2019 Table 2): ``p(referable) = sum_{g >= 2} p_g`` and ``p(abnormal) = 1 - p_0``. The true
    ``grades`` follow ``scale`` (see :data:`SCREENING_SCALES` for the cut-offs and their
    sources); unknown grades (-1) are left out. A case is predicted positive when its
    probability is at least 0.5.

    Returns:
        ``{"referable_auc", "referable_accuracy", "normal_auc", "normal_accuracy", "n"}``; the
        normal-vs-abnormal AUC scores "abnormal" as the positive class.

    Example::

        >>> s = screening_scores([[0.9, 0.1, 0, 0, 0], [0, 0.2, 0.8, 0, 0]], [0, 2])
        >>> s["referable_auc"], s["normal_accuracy"]
        (1.0, 1.0)
    """
    if scale not in SCREENING_SCALES:
        raise ValueError(f"screening_scores: scale must be one of {sorted(SCREENING_SCALES)}")
    spec = SCREENING_SCALES[scale]
    probs = np.asarray(grade_probs, np.float64)
    t = _labels(grades, "screening_scores: grades")
    if probs.ndim != 2 or probs.shape[0] != t.shape[0] or probs.shape[1] < 3:
        raise ValueError(
            "screening_scores: expected grade probabilities "
            f"[{t.shape[0]}, K>=3], got {probs.shape}"
        )
    known = t >= 0
    probs, t = probs[known], t[known]
    if t.size and t.max() >= spec["num_grades"]:
        raise ValueError(
            f"screening_scores: grade {t.max()} is outside the {scale} scale "
            f"0..{spec['num_grades'] - 1}"
        )
    cut = spec["referable_from"]
    p_ref = probs[:, cut:].sum(axis=1)
    p_abn = 1.0 - probs[:, 0]
    ref, abn = t >= cut, t > 0
    return {
        "referable_auc": roc_auc(ref, p_ref),
        "referable_accuracy": float(np.mean((p_ref >= 0.5) == ref)) if t.size else float("nan"),
        "normal_auc": roc_auc(abn, p_abn),
        "normal_accuracy": float(np.mean((p_abn >= 0.5) == abn)) if t.size else float("nan"),
        "n": int(t.size),
    }


# ----------------------------------------------------------------------------------------------
# Patch classifiers (Lecouat et al. 2018)
# ----------------------------------------------------------------------------------------------


def patch_auc(patch_logits, patch_labels) -> float:
    """Patch-level ROC AUC over all patches of all images (Lecouat et al. 2018, Table 1).

    ``patch_logits`` and ``patch_labels`` have the same shape, e.g. ``[N, 8, 8]`` or ``[N, 64]``.
    Logits and sigmoid probabilities rank identically, so logits are used directly.
    """
    logits, labels = np.asarray(patch_logits, np.float64), np.asarray(patch_labels)
    if logits.shape != labels.shape:
        raise ValueError(f"patch_auc: logits {logits.shape} and labels {labels.shape} differ")
    return roc_auc(labels, logits)


def image_scores_from_patches(patch_logits) -> np.ndarray:
    """Image abnormality score ``sum_j sigmoid(l_ij)`` over an image's patches (Lecouat Sec. 2).

    ``patch_logits``: ``[N, ...]``; every non-batch axis is summed. Returns ``[N]``.

    Example::

        >>> image_scores_from_patches(np.zeros((1, 8, 8)))   # 64 patches at p = 0.5
        array([32.])
    """
    logits = np.asarray(patch_logits, np.float64)
    probs = 0.5 * (1.0 + np.tanh(0.5 * logits))  # sigmoid without overflow for large |l|
    return probs.reshape(probs.shape[0], -1).sum(axis=1)


def image_auc(patch_logits, image_labels) -> float:
    """Image-level ROC AUC of the summed patch scores (Lecouat et al. 2018, Table 2)."""
    scores = image_scores_from_patches(patch_logits)
    labels = np.asarray(image_labels).ravel()
    if labels.shape[0] != scores.shape[0]:
        raise ValueError(f"image_auc: {scores.shape[0]} images but {labels.shape[0]} labels")
    return roc_auc(labels, scores)


# ----------------------------------------------------------------------------------------------
# Over runs and seeds
# ----------------------------------------------------------------------------------------------


def mean_std(values) -> Tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``) over runs; std is NaN for one run.

    The papers report "mean ± std" over 3 runs (Foo et al. 2020) or 5 samplings (Lecouat et al.
    2018) without naming the estimator; the sample standard deviation is the usual reading.
    NaN values (failed runs) are not ignored: they make the result NaN.

    Example::

        >>> mean_std([1.0, 2.0, 3.0])
        (2.0, 1.0)
    """
    v = np.asarray(values, np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_std: no values")
    mean = float(np.mean(v))
    std = float(np.std(v, ddof=1)) if v.size > 1 else float("nan")
    return mean, std


def paired_ttest(a, b) -> Tuple[float, float]:
    """Paired two-sided t-test of two methods over the same runs (Foo et al. 2020, Table 2).

    Returns ``(t, p)`` from ``scipy.stats.ttest_rel(a, b)``; ``t > 0`` when ``a`` is larger.

    Example::

        >>> t, p = paired_ttest([0.75, 0.76, 0.74], [0.73, 0.73, 0.72])
    """
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    if a.shape != b.shape or a.size < 2:
        raise ValueError(
            f"paired_ttest needs two equally long series of >= 2 runs, got {a.size} and {b.size}"
        )
    res = stats.ttest_rel(a, b)
    return float(res.statistic), float(res.pvalue)


# ----------------------------------------------------------------------------------------------
# Streaming Keras metrics for training logs
# ----------------------------------------------------------------------------------------------


@tf.keras.utils.register_keras_serializable(package="drkeras")
class QuadraticKappa(tf.keras.metrics.Metric):
    """Streaming quadratic weighted kappa over an epoch (log key ``grade_kappa``).

    Accumulates the ``[K, K]`` confusion matrix of ``argmax(y_pred)`` against the true grades
    and computes the same value as :func:`quadratic_weighted_kappa` from it. The matrix is a
    sum-aggregated, on-read-synchronised variable, so replicas of a ``MirroredStrategy`` add up
    their counts. ``y_true`` may be integer grades ``[B]``/``[B, 1]`` or one-hot ``[B, K]``;
    grades below 0 (unknown) are ignored.

    Example::

        model.compile(..., metrics={"grade_probs": [QuadraticKappa(num_classes=5)]})
    """

    def __init__(self, num_classes: int = keys.NUM_GRADES, name: str = "grade_kappa", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.confusion = self.add_weight(
            name="confusion", shape=(self.num_classes, self.num_classes), initializer="zeros"
        )

    def update_state(self, y_true, y_pred, sample_weight=None):
        k = self.num_classes
        y_pred = tf.convert_to_tensor(y_pred)
        y_true = tf.convert_to_tensor(y_true)
        if y_true.shape.rank == 2 and y_true.shape[-1] == k and k > 1:
            t = tf.argmax(y_true, axis=-1, output_type=tf.int32)
        else:
            t = tf.cast(tf.reshape(y_true, [-1]), tf.int32)
        p = tf.argmax(tf.reshape(y_pred, [-1, k]), axis=-1, output_type=tf.int32)
        w = tf.cast(t >= 0, self.dtype)
        if sample_weight is not None:
            w *= tf.cast(tf.reshape(sample_weight, [-1]), self.dtype)
        t = tf.maximum(t, 0)
        counts = tf.math.unsorted_segment_sum(w, t * k + p, k * k)
        self.confusion.assign_add(tf.reshape(counts, [k, k]))

    def result(self):
        cm = self.confusion
        k = self.num_classes
        n = tf.reduce_sum(cm)
        idx = tf.range(k, dtype=self.dtype)
        weights = tf.square(idx[:, None] - idx[None, :]) / float(max(k - 1, 1) ** 2)
        expected = tf.tensordot(tf.reduce_sum(cm, 1), tf.reduce_sum(cm, 0), axes=0) / tf.maximum(
            n, 1.0
        )
        den = tf.reduce_sum(weights * expected)
        # An undefined kappa (one class only) is logged as 0, not NaN, so NaN guards stay quiet.
        return tf.math.divide_no_nan(den - tf.reduce_sum(weights * cm), den)

    def reset_state(self):
        self.confusion.assign(tf.zeros_like(self.confusion))

    def get_config(self):
        return {**super().get_config(), "num_classes": self.num_classes}


@tf.keras.utils.register_keras_serializable(package="drkeras")
class DiceMetric(tf.keras.metrics.Metric):
    """Streaming dataset-pooled Dice over an epoch, averaged over channels (log key ``seg_dice``).

    Sums TP, FP and FN per channel of ``y_pred >= threshold`` against ``y_true`` over every batch
    (and every replica: the counters are sum-aggregated), then reports
    ``mean_c 2 TP_c / (2 TP_c + FP_c + FN_c)``, a channel with no positive pixel in prediction
    and target counting as 1 (the offline convention). Matches :func:`dice_pooled` averaged
    over channels.

    Example::

        model.compile(..., metrics={"lesion_probs": [DiceMetric(num_classes=5)]})
    """

    def __init__(
        self,
        num_classes: int = keys.NUM_LESIONS,
        threshold: float = 0.5,
        name: str = "seg_dice",
        **kwargs,
    ):
        super().__init__(name=name, **kwargs)
        self.num_classes = int(num_classes)
        self.threshold = float(threshold)
        shape = (self.num_classes,)
        self.tp = self.add_weight(name="tp", shape=shape, initializer="zeros")
        self.fp = self.add_weight(name="fp", shape=shape, initializer="zeros")
        self.fn = self.add_weight(name="fn", shape=shape, initializer="zeros")

    def update_state(self, y_true, y_pred, sample_weight=None):
        c = self.num_classes
        p = tf.cast(tf.reshape(y_pred, [-1, c]) >= self.threshold, self.dtype)
        t = tf.cast(tf.reshape(y_true, [-1, c]) > 0.5, self.dtype)
        if sample_weight is None:
            w = tf.ones_like(p[:, :1])
        else:
            # One weight per example, repeated over that example's pixels.
            sw = tf.cast(tf.reshape(sample_weight, [-1, 1]), self.dtype)
            w = tf.repeat(sw, tf.shape(p)[0] // tf.shape(sw)[0], axis=0)
        self.tp.assign_add(tf.reduce_sum(w * p * t, axis=0))
        self.fp.assign_add(tf.reduce_sum(w * p * (1.0 - t), axis=0))
        self.fn.assign_add(tf.reduce_sum(w * (1.0 - p) * t, axis=0))

    def result(self):
        num = 2.0 * self.tp
        den = num + self.fp + self.fn
        dice = tf.where(den > 0, num / tf.maximum(den, 1.0), tf.ones_like(den))
        return tf.reduce_mean(dice)

    def reset_state(self):
        for v in (self.tp, self.fp, self.fn):
            v.assign(tf.zeros_like(v))

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "threshold": self.threshold,
        }


def as_flat_dict(scores: Mapping, prefix: str = "") -> Dict[str, float]:
    """Flatten nested score dicts into ``{"a/b": value}`` (arrays and counts are skipped)."""
    out = {}
    for key, value in scores.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(as_flat_dict(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float, np.floating, np.integer)):
            out[name] = float(value)
    return out
