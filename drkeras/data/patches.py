"""The 8x8 patch grid of Lecouat et al. 2018 ("Semi-supervised deep learning for abnormality
classification in retinal images", section 3 "Data").

"We resized the original images to 1024x1024 and normalized them by the maximum intensity value
in each image. We then subdivided the normalized image into non-overlapping 128x128 patches based
on a uniform 8x8 grid. [...] we combined segmentation masks for each of the abnormalities into a
single binary mask. Then, we labeled patches with 0 pixels overlapping the mask as healthy; and
denoted patches with at least 1 overlapping pixel as diseased." and (Supplement 1) "we
downsampled the patches to 32x32".

Here the resize to 1024 is :func:`drkeras.data.preprocess.crop_and_resize` of the field of view
(aspect kept, padded square) rather than a distorting stretch. Patch ``j`` is row ``j // grid``,
column ``j % grid`` (row-major), the order of :func:`patch_grid`.

Patch labels are exact at the mask's own resolution: the union mask is area-resized to the
working size and a patch is diseased when any output pixel has a non-zero fraction, i.e. when
any lesion pixel of the original mask falls inside the patch, however small (a 2-pixel
microaneurysm survives, where nearest-neighbour downsampling could drop it).

Example::

    >>> import numpy as np
    >>> image = np.full((256, 256, 3), 100, np.uint8)
    >>> masks = np.zeros((256, 256, 5), np.uint8); masks[0, 255, 2] = 1  # one EX pixel
    >>> patches, labels = patch_example(image, masks, image_size=256, fov_crop=False)
    >>> patches.shape.as_list(), int(labels[7]), int(labels.numpy().sum())
    ([64, 32, 32, 3], 1, 1)
"""

from __future__ import annotations

from typing import Sequence, Tuple

import tensorflow as tf

from drkeras import keys
from drkeras.data import preprocess

__all__ = [
    "ABNORMAL_LESIONS",
    "image_patches",
    "patch_example",
    "patch_grid",
    "patch_labels",
    "union_mask",
]

# The abnormalities whose union defines a diseased patch (the optic disc is anatomy).
ABNORMAL_LESIONS = ("MA", "HE", "EX", "SE")


def image_patches(image, *, grid: int = 8, patch_size: int = 32) -> tf.Tensor:
    """Split a square ``[S, S, C]`` image into ``grid x grid`` non-overlapping patches, each
    downsampled (area average) to ``patch_size``.

    Args:
        image: float ``[S, S, C]`` with ``S`` divisible by ``grid``.
        grid: patches per side (8 in the paper).
        patch_size: output patch side (32 in the paper).

    Returns:
        float32 ``[grid * grid, patch_size, patch_size, C]``, row-major.

    Example::

        >>> import numpy as np
        >>> x = np.zeros((16, 16, 1), np.float32); x[8:, :8] = 1.0  # bottom-left quarter
        >>> image_patches(x, grid=2, patch_size=4)[:, 0, 0, 0].numpy().tolist()
        [0.0, 0.0, 1.0, 0.0]
    """
    image = tf.cast(tf.convert_to_tensor(image), tf.float32)
    side = image.shape[0]
    if side is None or image.shape[1] != side or side % grid:
        raise ValueError(
            f"image_patches needs a static square image whose side is divisible by grid={grid}, "
            f"got shape {image.shape}"
        )
    p = side // grid
    channels = image.shape[-1]
    x = tf.reshape(image, [grid, p, grid, p, channels])
    x = tf.transpose(x, [0, 2, 1, 3, 4])
    x = tf.reshape(x, [grid * grid, p, p, channels])
    if p != patch_size:
        x = tf.image.resize(x, [patch_size, patch_size], method="area")
    return x


def union_mask(masks, lesions: Sequence[str] = ABNORMAL_LESIONS) -> tf.Tensor:
    """``[H, W, 1]`` float32 union (max) of the chosen lesion channels of ``[H, W, 5]`` masks.

    Example::

        >>> import numpy as np
        >>> m = np.zeros((2, 2, 5), np.uint8); m[0, 0, 0] = 1; m[1, 1, 4] = 1  # MA and OD
        >>> union_mask(m)[..., 0].numpy().tolist()
        [[1.0, 0.0], [0.0, 0.0]]
    """
    index = [keys.LESIONS.index(name) for name in lesions]
    masks = tf.cast(tf.convert_to_tensor(masks), tf.float32)
    return tf.reduce_max(tf.gather(masks, index, axis=-1), axis=-1, keepdims=True)


def patch_labels(mask, *, grid: int = 8) -> tf.Tensor:
    """Patch labels of a square ``[S, S, 1]`` (or ``[S, S]``) union mask: 1 when any pixel of
    the patch is non-zero.

    Returns:
        int32 ``[grid * grid]``, row-major.

    Example::

        >>> import numpy as np
        >>> m = np.zeros((8, 8), np.float32); m[5, 1] = 0.1
        >>> patch_labels(m, grid=2).numpy().tolist()
        [0, 0, 1, 0]
    """
    mask = tf.cast(tf.convert_to_tensor(mask), tf.float32)
    if mask.shape.rank == 2:
        mask = mask[..., None]
    per_patch = image_patches(mask, grid=grid, patch_size=mask.shape[0] // grid)
    return tf.cast(tf.reduce_max(per_patch, axis=[1, 2, 3]) > 0.0, tf.int32)


def patch_example(
    image_uint8,
    masks=None,
    *,
    image_size: int = 1024,
    grid: int = 8,
    patch_size: int = 32,
    fov_crop: bool = True,
    normalization: str = "max",
    lesions: Sequence[str] = ABNORMAL_LESIONS,
) -> Tuple[tf.Tensor, tf.Tensor]:
    """One photograph to its patch grid and patch labels (Lecouat et al. 2018, section 3).

    Args:
        image_uint8: ``[H, W, 3]`` uint8 photograph of any size.
        masks: ``[H, W, 5]`` {0, 1} masks of the same size, or ``None`` (labels all -1).
        image_size: working resolution (1024 in the paper); divisible by ``grid``.
        grid: patches per side.
        patch_size: output patch side.
        fov_crop: crop to the field of view before resizing.
        normalization: :func:`drkeras.data.preprocess.normalize` mode applied to the whole
            image before patching (``max``: divide by the image's maximum, as in the paper).
        lesions: lesion types whose union makes a patch diseased.

    Returns:
        ``(patches float32 [grid*grid, patch_size, patch_size, 3], labels int32 [grid*grid])``.

    Example::

        >>> import numpy as np
        >>> p, y = patch_example(np.zeros((300, 400, 3), np.uint8), image_size=64, grid=4)
        >>> p.shape.as_list(), y.numpy().tolist()[:3]
        ([16, 32, 32, 3], [-1, -1, -1])
    """
    if image_size % grid:
        raise ValueError(f"image_size={image_size} must be divisible by grid={grid}")
    image = tf.convert_to_tensor(image_uint8)
    box = (
        preprocess.fov_box(image)
        if fov_crop
        else tf.stack([0, 0, *tf.unstack(tf.shape(image)[:2])])
    )
    x = preprocess.crop_and_resize(image, box, image_size)
    x = preprocess.normalize(x, normalization)
    patches = image_patches(x, grid=grid, patch_size=patch_size)
    if masks is None:
        return patches, tf.fill([grid * grid], keys.UNKNOWN)
    union = union_mask(masks, lesions)
    # area resizing keeps any lesion pixel as a non-zero fraction (see the module docstring)
    union = preprocess.crop_and_resize(union, box, image_size, method="area")
    return patches, patch_labels(union, grid=grid)


def patch_grid(values, *, grid: int = 8) -> tf.Tensor:
    """Per-patch values ``[..., grid*grid]`` back to their ``[..., grid, grid]`` layout (for
    the paper's Figure 2 overlays of patch abnormality scores).

    Example::

        >>> patch_grid(tf.range(4), grid=2).numpy().tolist()
        [[0, 1], [2, 3]]
    """
    values = tf.convert_to_tensor(values)
    return tf.reshape(values, tf.concat([tf.shape(values)[:-1], [grid, grid]], axis=0))
