"""Figures of a run: training curves, ROC/PR curves, confusion matrices and image overlays.

Every ``plot_*(..., path)`` draws with Matplotlib's Agg canvas (no display, no global ``pyplot``
state, safe in tests and on servers), writes one PNG and returns its path. The PNG size is
fixed by the figure size and ``dpi`` (no tight bounding box), so callers know it in advance:
``width = figsize[0] * dpi`` pixels.

Colours of mask overlays: true positives green, false negatives (missed lesion) red, false
positives (spurious lesion) blue.

The figures follow the papers: Zhou et al. 2019 Fig. 5 (per-lesion ROC and PR curves), Lecouat
et al. 2018 Fig. 2 (patch abnormality scores smoothed by a Gaussian blur over the image), Zhou
et al. 2019 Fig. 4 and PLDMLT Fig. 7 (attention maps and segmentations over the fundus).
"""

from __future__ import annotations

import math
import pathlib
from typing import Mapping, Optional, Sequence, Tuple

import cv2
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from drkeras import keys

__all__ = [
    "OVERLAY_COLORS",
    "display_image",
    "error_overlay",
    "new_figure",
    "plot_confusion_matrix",
    "plot_heatmap_overlay",
    "plot_history",
    "plot_mask_overlay",
    "plot_patch_scores",
    "plot_roc_pr",
    "plot_roc_pr_comparison",
    "resize_array",
    "save_figure",
]

DPI = 100
OVERLAY_COLORS = {
    "true positive": (0.1, 0.85, 0.1),
    "false negative": (0.95, 0.1, 0.1),
    "false positive": (0.15, 0.35, 1.0),
}


def new_figure(figsize: Tuple[float, float]):
    """A headless matplotlib figure (Agg canvas, no pyplot state) at the module's DPI."""
    fig = Figure(figsize=figsize, dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path) -> pathlib.Path:
    """Write ``fig`` as PNG to ``path`` (parent folders created) and return the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


def display_image(image) -> np.ndarray:
    """An RGB float image in [0, 1] for display (uint8, unit floats or normalised floats)."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    lo, hi = float(image.min()), float(image.max())
    if lo >= 0.0 and hi <= 1.0:
        return image
    # Normalised network inputs (e.g. mean/std standardised): stretch to [0, 1] to show them.
    return (image - lo) / max(hi - lo, 1e-6)


def resize_array(array: np.ndarray, size_hw: Tuple[int, int], interpolation) -> np.ndarray:
    """``array`` resized to ``size_hw`` with the OpenCV ``interpolation`` (unchanged if equal)."""
    h, w = size_hw
    if array.shape[:2] == (h, w):
        return array
    return cv2.resize(array, (w, h), interpolation=interpolation)


# ----------------------------------------------------------------------------------------------


def plot_history(history_csv, path, *, keys_to_plot: Optional[Sequence[str]] = None):
    """Training curves from a run's ``history.csv`` (``drkeras.training.callbacks.HistoryCSV``).

    One panel per logged quantity, the training value and its ``val_`` counterpart together;
    the x axis counts epochs over all stages, and dashed vertical lines mark stage changes.
    Each panel is 4 x 3 inches, up to 3 panels per row.

    Args:
        history_csv: the CSV (columns ``stage``, ``epoch`` and the log keys).
        path: output PNG.
        keys_to_plot: log keys to draw (default: every key; ``val_`` keys join their base key).

    Example::

        plot_history(run_dir / "history.csv", run_dir / "history.png")
    """
    frame = pd.read_csv(history_csv)
    if "epoch" not in frame.columns:
        raise ValueError(f"{history_csv}: expected a history.csv with an 'epoch' column")
    metric_cols = [c for c in frame.columns if c not in ("stage", "epoch")]
    bases = []
    for col in metric_cols:
        base = col[4:] if col.startswith("val_") else col
        if base not in bases and (keys_to_plot is None or base in keys_to_plot):
            bases.append(base)
    if not bases:
        raise ValueError(f"{history_csv}: no logged values to plot")
    ncols = min(3, len(bases))
    nrows = math.ceil(len(bases) / ncols)
    fig = new_figure((4.0 * ncols, 3.0 * nrows))
    x = np.arange(1, len(frame) + 1)
    boundaries = []
    if "stage" in frame.columns:
        stage = frame["stage"].astype(str).to_numpy()
        boundaries = [i + 0.5 for i in range(1, len(stage)) if stage[i] != stage[i - 1]]
    for i, base in enumerate(bases):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for col, style in ((base, "-"), (f"val_{base}", "--")):
            if col in frame.columns and frame[col].notna().any():
                ax.plot(x, frame[col].to_numpy(float), style, marker=".", label=col)
        for b in boundaries:
            ax.axvline(b, color="0.6", linestyle=":", linewidth=1)
        ax.set_title(base, fontsize=10)
        ax.set_xlabel("epoch (all stages)", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_roc_pr(curves: Mapping, path, *, title: Optional[str] = None, pr_kind: str = "ap"):
    """Per-lesion ROC (left) and precision-recall (right) curves, AUCs in the legends.

    Zhou et al. 2019, Fig. 5. Figure 10 x 4.5 inches.

    Args:
        curves: ``{name: PixelCurveAccumulator}`` or a ``drkeras.metrics.PerLesionCurves``.
        path: output PNG.
        title: figure title.
        pr_kind: AUC-PR estimator shown in the legend (``"ap"`` or ``"trapezoid"``).

    Example::

        plot_roc_pr(per_lesion_curves, out / "roc_pr.png", title="IDRiD test")
    """
    accumulators = getattr(curves, "accumulators", curves)
    fig = new_figure((10.0, 4.5))
    ax_roc = fig.add_subplot(1, 2, 1)
    ax_pr = fig.add_subplot(1, 2, 2)
    for name, acc in accumulators.items():
        if acc.num_positives == 0 or acc.num_negatives == 0:
            continue
        c = acc.curves()
        label = keys.LESION_NAMES.get(name, name)
        ax_roc.plot(c["fpr"], c["tpr"], label=f"{label} (AUC {acc.roc_auc():.3f})")
        ax_pr.plot(c["recall"], c["precision"], label=f"{label} (AUC {acc.pr_auc(pr_kind):.3f})")
    ax_roc.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    ax_pr.set(xlabel="recall", ylabel="precision", title=f"precision-recall ({pr_kind})")
    for ax in (ax_roc, ax_pr):
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, loc="lower right" if ax is ax_roc else "upper right")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_confusion_matrix(
    cm,
    path,
    *,
    class_names: Optional[Sequence[str]] = None,
    normalize: bool = True,
    title: Optional[str] = None,
):
    """Confusion matrix (rows = true grade, columns = predicted) with counts in every cell.

    Colours show row-normalised rates when ``normalize`` (each true grade sums to 1), so rare
    grades stay visible; the cells print ``count`` and the rate. Figure 6 x 5.5 inches.

    Example::

        plot_confusion_matrix(confusion_matrix(y, probs, 5), out / "confusion.png")
    """
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"plot_confusion_matrix: expected a square matrix, got shape {cm.shape}")
    k = cm.shape[0]
    if class_names is None:
        class_names = keys.GRADE_NAMES if k == keys.NUM_GRADES else [str(i) for i in range(k)]
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    shown = rates if normalize else cm
    fig = new_figure((6.0, 5.5))
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(shown, cmap="Blues", vmin=0, vmax=1 if normalize else max(cm.max(), 1))
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    for i in range(k):
        for j in range(k):
            dark = shown[i, j] > (0.5 if normalize else cm.max() / 2)
            ax.text(
                j,
                i,
                f"{int(cm[i, j])}\n{rates[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if dark else "black",
            )
    ax.set_xticks(range(k), class_names, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(k), class_names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or f"confusion matrix (n = {int(cm.sum())})")
    fig.tight_layout()
    return save_figure(fig, path)


def error_overlay(image, pred, target, *, alpha: float = 0.7) -> np.ndarray:
    """The image (float RGB) with TP/FN/FP pixels of one binary mask painted in their colours."""
    out = display_image(image).copy()
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    for mask, color in (
        (pred & target, OVERLAY_COLORS["true positive"]),
        (~pred & target, OVERLAY_COLORS["false negative"]),
        (pred & ~target, OVERLAY_COLORS["false positive"]),
    ):
        out[mask] = (1 - alpha) * out[mask] + alpha * np.asarray(color, np.float32)
    return out


def plot_mask_overlay(
    image,
    pred,
    target,
    path,
    *,
    names: Optional[Sequence[str]] = None,
    threshold: float = 0.5,
    present=None,
    title: Optional[str] = None,
):
    """Prediction vs ground truth per lesion: TP green, FN red, FP blue over the image.

    Args:
        image: ``[H, W, 3]`` RGB (uint8 or float); resized to the mask size when they differ.
        pred: ``[h, w, C]`` probabilities (thresholded at ``threshold``) or booleans.
        target: ``[h, w, C]`` ground truth in ``{0, 1}``.
        path: output PNG.
        names: lesion names of the channels (default ``drkeras.keys.LESIONS``).
        present: ``[C]`` flags; unannotated lesions are drawn without a ground-truth overlay.
        title: figure title (e.g. the image id).

    The figure has the image plus one panel per lesion, 3 x 3.4 inches each, up to 3 per row.

    Example::

        plot_mask_overlay(image, lesion_probs[0], masks[0], out / "overlay_IDRiD_55.png")
    """
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.ndim == 2:
        pred, target = pred[..., None], target[..., None]
    if pred.shape != target.shape:
        raise ValueError(f"plot_mask_overlay: prediction {pred.shape} and mask {target.shape}")
    c = pred.shape[-1]
    names = list(names) if names is not None else list(keys.LESIONS[:c])
    present = np.ones(c, bool) if present is None else np.asarray(present, bool)
    img = resize_array(display_image(image), pred.shape[:2], cv2.INTER_AREA)
    binary = pred if pred.dtype == bool else pred >= threshold
    panels = c + 1
    ncols = min(3, panels)
    nrows = math.ceil(panels / ncols)
    fig = new_figure((3.0 * ncols, 3.4 * nrows))
    ax = fig.add_subplot(nrows, ncols, 1)
    ax.imshow(img)
    ax.set_title("image", fontsize=9)
    ax.axis("off")
    for i in range(c):
        ax = fig.add_subplot(nrows, ncols, i + 2)
        truth = target[..., i].astype(bool) if present[i] else np.zeros_like(binary[..., i])
        ax.imshow(error_overlay(img, binary[..., i], truth))
        label = keys.LESION_NAMES.get(names[i], names[i])
        ax.set_title(label if present[i] else f"{label} (not annotated)", fontsize=9)
        ax.axis("off")
    handles = [Patch(color=col, label=lab) for lab, col in OVERLAY_COLORS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    # Explicit spacing: tight_layout ignores the titles of axes that are switched off.
    height = 3.4 * nrows
    fig.subplots_adjust(
        left=0.02, right=0.98, bottom=0.4 / height, top=1 - 0.6 / height, wspace=0.05, hspace=0.2
    )
    return save_figure(fig, path)


def _heat_panels(image, heat, path, *, alpha, title, vmin, vmax, label):
    img = display_image(image)
    fig = new_figure((8.0, 4.0))
    ax = fig.add_subplot(1, 2, 1)
    ax.imshow(img)
    ax.set_title("image", fontsize=9)
    ax.axis("off")
    ax = fig.add_subplot(1, 2, 2)
    ax.imshow(img)
    im = ax.imshow(heat, cmap="jet", alpha=alpha, vmin=vmin, vmax=vmax)
    ax.set_title(label, fontsize=9)
    ax.axis("off")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_heatmap_overlay(
    image,
    heatmap,
    path,
    *,
    alpha: float = 0.45,
    normalize: bool = True,
    title: Optional[str] = None,
    label: str = "heat map",
):
    """A Grad-CAM or attention map over the image (image left, overlay right; 8 x 4 inches).

    Args:
        image: ``[H, W, 3]`` RGB.
        heatmap: ``[h, w]`` (or ``[h, w, 1]``) map at any resolution, resized bilinearly.
        path: output PNG.
        alpha: opacity of the heat map.
        normalize: stretch the map to ``[0, 1]`` (Grad-CAM's usual display); else show raw
            values on their own range.
        title, label: figure title and panel title.

    Example::

        plot_heatmap_overlay(image, cam, out / "gradcam_0.png", label="Grad-CAM, PDR")
    """
    heat = np.asarray(heatmap, np.float32)
    if heat.ndim == 3 and heat.shape[-1] == 1:
        heat = heat[..., 0]
    if heat.ndim != 2:
        raise ValueError(f"plot_heatmap_overlay: expected a 2-D map, got shape {heat.shape}")
    img = display_image(image)
    heat = resize_array(heat, img.shape[:2], cv2.INTER_LINEAR)
    if normalize:
        lo, hi = float(heat.min()), float(heat.max())
        heat = (heat - lo) / max(hi - lo, 1e-12)
        vmin, vmax = 0.0, 1.0
    else:
        vmin, vmax = float(heat.min()), float(heat.max())
    return _heat_panels(
        img, heat, path, alpha=alpha, title=title, vmin=vmin, vmax=vmax, label=label
    )


def plot_patch_scores(
    image,
    patch_scores,
    path,
    *,
    blur: float = 0.5,
    alpha: float = 0.45,
    vmin: float = 0.0,
    vmax: float = 1.0,
    title: Optional[str] = None,
):
    """Patch abnormality scores (e.g. ``sigmoid`` of 8 x 8 patch logits) over the image.

    Lecouat et al. 2018, Fig. 2: each patch's score fills its cell of the grid, then the map is
    smoothed with a Gaussian blur of standard deviation ``blur`` patch widths (0 = no blur) and
    overlaid on the image with a fixed colour range ``[vmin, vmax]`` so images compare.
    Figure 8 x 4 inches.

    Example::

        plot_patch_scores(image, tf.sigmoid(patch_logits[0]).numpy(), out / "patches_0.png")
    """
    scores = np.asarray(patch_scores, np.float32)
    if scores.ndim != 2:
        raise ValueError(f"plot_patch_scores: expected a [rows, cols] grid, got {scores.shape}")
    img = display_image(image)
    h, w = img.shape[:2]
    heat = cv2.resize(scores, (w, h), interpolation=cv2.INTER_NEAREST)
    if blur > 0:
        sigma = blur * min(h / scores.shape[0], w / scores.shape[1])
        heat = cv2.GaussianBlur(heat, (0, 0), sigmaX=sigma, sigmaY=sigma)
    return _heat_panels(
        img, heat, path, alpha=alpha, title=title, vmin=vmin, vmax=vmax, label="patch scores"
    )


def plot_roc_pr_comparison(
    curves_by_method: Mapping,
    path,
    *,
    title: Optional[str] = None,
    pr_kind: str = "ap",
):
    """ROC (top row) and precision-recall (bottom row) curves per lesion, methods overlaid.

    Zhou et al. 2019, Fig. 5: one column per lesion, one line per method, AUCs in the legends.
    Lesions without positive or negative pixels are left blank. Figure ``3.2 * lesions`` x 6.4
    inches.

    Args:
        curves_by_method: ``{method: PerLesionCurves}`` (or ``{method: {lesion:
            PixelCurveAccumulator}}``); lesions are the first method's, in its order.
        path: output PNG.
        title: figure title.
        pr_kind: AUC-PR estimator shown in the legends (``"ap"`` or ``"trapezoid"``).

    Example::

        plot_roc_pr_comparison({"CE1": ce1_curves, "CE2": ce2_curves}, out / "fig5.png")
    """
    methods = {m: getattr(c, "accumulators", c) for m, c in curves_by_method.items()}
    if not methods:
        raise ValueError("plot_roc_pr_comparison: no methods given")
    lesions = list(next(iter(methods.values())))
    fig = new_figure((3.2 * len(lesions), 6.4))
    for col, lesion in enumerate(lesions):
        ax_roc = fig.add_subplot(2, len(lesions), col + 1)
        ax_pr = fig.add_subplot(2, len(lesions), len(lesions) + col + 1)
        for method, accumulators in methods.items():
            acc = accumulators.get(lesion)
            if acc is None or acc.num_positives == 0 or acc.num_negatives == 0:
                continue
            c = acc.curves()
            ax_roc.plot(c["fpr"], c["tpr"], label=f"{method} ({acc.roc_auc():.3f})")
            ax_pr.plot(c["recall"], c["precision"], label=f"{method} ({acc.pr_auc(pr_kind):.3f})")
        ax_roc.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
        ax_roc.set_title(keys.LESION_NAMES.get(lesion, lesion), fontsize=10)
        ax_roc.set_xlabel("false positive rate", fontsize=8)
        ax_pr.set_xlabel("recall", fontsize=8)
        if col == 0:
            ax_roc.set_ylabel("true positive rate", fontsize=8)
            ax_pr.set_ylabel(f"precision ({pr_kind})", fontsize=8)
        for ax in (ax_roc, ax_pr):
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.02)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if len(ax.lines) > (1 if ax is ax_roc else 0):
                ax.legend(fontsize=6, loc="lower right" if ax is ax_roc else "upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
