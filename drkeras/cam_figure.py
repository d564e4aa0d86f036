"""A figure of one Grad-CAM map per class beside the image and its label map (PLDMLT Fig. 6).

PLDMLT (section 4.2, Fig. 6) shows, for a pixel-level labelled fundus image, the photograph, its
lesion mask and the Grad-CAM heat map of every DR severity level, and reads off which levels look
at the lesions. :func:`plot_class_cams` draws that figure for one or several images: one row per
image, columns ``image | label map | CAM of class 0 | ... | CAM of class C-1``; each CAM panel
can carry a short note (e.g. its lesion overlap and whether the grade was allowed).

Drawn like :mod:`drkeras.plots` (Agg canvas, no global ``pyplot`` state, fixed PNG size:
``2.2 * (C + 2)`` by ``2.5 * N + 0.8`` inches at ``drkeras.plots.DPI``).
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import cv2
import numpy as np
from matplotlib import colormaps
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from drkeras import keys
from drkeras.plots import display_image, new_figure, resize_array, save_figure

__all__ = ["plot_class_cams"]

# Background black, then one distinct colour per label id (tab10 skips its grey).
_LABEL_COLORS = ((0.0, 0.0, 0.0),) + tuple(colormaps["tab10"].colors[i] for i in (3, 1, 8, 9, 2, 4))


def plot_class_cams(
    images,
    label_maps,
    cams,
    path,
    *,
    label_names: Sequence[str],
    class_names: Sequence[str] = keys.GRADE_NAMES,
    notes: Optional[Sequence[Sequence[str]]] = None,
    row_titles: Optional[Sequence[str]] = None,
    alpha: float = 0.5,
) -> pathlib.Path:
    """Image, label map and one Grad-CAM overlay per class, one row per image (PLDMLT Fig. 6).

    Args:
        images: ``[N, H, W, 3]`` RGB images (uint8 or float; floats outside [0, 1] are stretched).
        label_maps: ``[N, h, w]`` integer label ids (0 = background), e.g. the fused lesion mask
            of :func:`drkeras.models.pldmlt.fuse_lesion_masks`; resized (nearest) to the image.
        cams: ``[N, C, h', w']`` maps in [0, 1] (:meth:`drkeras.explain.gradcam.GradCAM.
            all_classes`); resized (bilinear) to the image.
        path: output PNG.
        label_names: name of each label id (``label_names[0]`` is the background), for the legend.
        class_names: title of each CAM column (default: the five ICDRS grades).
        notes: optional ``[N][C]`` strings printed under each CAM panel's title.
        row_titles: optional title of each row (e.g. the image id and its pseudo grade).
        alpha: opacity of the heat maps.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        ValueError: when the shapes of images, label maps, CAMs, names or notes disagree.

    Example::

        stage1 = generate_pseudo_grades([resnext101, resnext50], images, masks)
        plot_class_cams(images, fuse_lesion_masks(masks).numpy(), stage1["cams"],
                        run_dir / "fig6_cams.png", label_names=FUSED_CLASSES)
    """
    images = np.asarray(images)
    label_maps = np.asarray(label_maps)
    cams = np.asarray(cams, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"plot_class_cams: images must be [N, H, W, 3], got {images.shape}")
    count = images.shape[0]
    if label_maps.shape[:1] != (count,) or label_maps.ndim != 3:
        raise ValueError(
            f"plot_class_cams: label_maps must be [{count}, h, w] integer ids, got "
            f"{label_maps.shape}"
        )
    if cams.ndim != 4 or cams.shape[0] != count:
        raise ValueError(f"plot_class_cams: cams must be [{count}, C, h, w], got {cams.shape}")
    num_classes = cams.shape[1]
    if len(class_names) != num_classes:
        raise ValueError(
            f"plot_class_cams: {len(class_names)} class_names for {num_classes} CAMs per image"
        )
    if int(label_maps.max(initial=0)) >= len(label_names) or label_maps.min(initial=0) < 0:
        raise ValueError(
            f"plot_class_cams: label ids must lie in [0, {len(label_names)}) (one name each), "
            f"got ids up to {int(label_maps.max(initial=0))}"
        )
    if len(label_names) > len(_LABEL_COLORS):
        raise ValueError(f"plot_class_cams: at most {len(_LABEL_COLORS)} labels can be coloured")
    if notes is not None and (len(notes) != count or any(len(row) != num_classes for row in notes)):
        raise ValueError(f"plot_class_cams: notes must be [{count}][{num_classes}] strings")
    if row_titles is not None and len(row_titles) != count:
        raise ValueError(f"plot_class_cams: {len(row_titles)} row_titles for {count} images")

    label_cmap = ListedColormap(_LABEL_COLORS[: len(label_names)])
    columns = num_classes + 2
    height = 2.5 * count + 0.8
    fig = new_figure((2.2 * columns, height))
    for row in range(count):
        image = display_image(images[row])
        size = image.shape[:2]
        labels = resize_array(label_maps[row].astype(np.uint8), size, cv2.INTER_NEAREST)
        ax = fig.add_subplot(count, columns, row * columns + 1)
        ax.imshow(image)
        ax.set_title(row_titles[row] if row_titles else "image", fontsize=7)
        ax.axis("off")
        ax = fig.add_subplot(count, columns, row * columns + 2)
        ax.imshow(labels, cmap=label_cmap, vmin=-0.5, vmax=len(label_names) - 0.5)
        ax.set_title("lesion mask", fontsize=7)
        ax.axis("off")
        for c in range(num_classes):
            heat = resize_array(cams[row, c], size, cv2.INTER_LINEAR)
            ax = fig.add_subplot(count, columns, row * columns + 3 + c)
            ax.imshow(image)
            ax.imshow(heat, cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0)
            title = f"{c}: {class_names[c]}"
            if notes is not None and notes[row][c]:
                title += "\n" + notes[row][c]
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    handles = [
        Patch(color=_LABEL_COLORS[i], label=name) for i, name in enumerate(label_names) if i > 0
    ]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=7, frameon=False)
    # Room above each row for two-line panel titles, and below the last one for the legend.
    fig.subplots_adjust(
        left=0.01, right=0.99, bottom=0.4 / height, top=1 - 0.45 / height, wspace=0.05, hspace=0.4
    )
    return save_figure(fig, path)
