"""Fundus preprocessing in TensorFlow ops: field-of-view crop, Graham's local-average
subtraction and input normalisation.

Everything here is plain TF (no ``numpy_function``), so the same code runs eagerly on numpy
arrays or tensors, inside ``tf.data`` maps and inside the ``tf.function`` of an exported model's
serving signature: what a model is trained on is exactly what it is served.

Conventions: images are ``[H, W, 3]`` RGB (uint8, or float in [0, 255]); boxes are int32
``(y0, x0, y1, x1)`` with the end exclusive; :func:`crop_and_resize` returns float32 in [0, 255]
for images and keeps the dtype for masks (nearest neighbour).

Example::

    >>> import numpy as np
    >>> photo = np.zeros((60, 90, 3), np.uint8); photo[10:50, 25:65] = 120
    >>> fov_box(photo).numpy().tolist()
    [10, 25, 50, 65]
    >>> prepare_image(photo, size=32, normalization="symmetric").shape.as_list()
    [32, 32, 3]
"""

from __future__ import annotations

import tensorflow as tf

__all__ = [
    "IMAGENET_CAFFE_MEAN_BGR",
    "IMAGENET_TORCH_MEAN",
    "IMAGENET_TORCH_STD",
    "NORMALIZATIONS",
    "crop_and_resize",
    "denormalize",
    "fov_box",
    "fov_fraction",
    "fov_mask",
    "gaussian_blur",
    "graham",
    "normalize",
    "prepare_batch",
    "prepare_example_masks",
    "prepare_image",
]

# keras.applications.vgg16.preprocess_input ("caffe" mode): BGR order, mean subtraction only.
IMAGENET_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# torchvision / keras "torch" mode: [0, 1] scaling, then per-channel mean and std (RGB).
IMAGENET_TORCH_MEAN = (0.485, 0.456, 0.406)
IMAGENET_TORCH_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = (
    "unit",
    "imagenet_caffe",
    "imagenet_torch",
    "max",
    "symmetric",
    "standardize",
    "raw",
)

# A pixel belongs to the field of view when max(R, G) exceeds this fraction of the image's
# brightest max(R, G), and at least FOV_ABS_FLOOR on the 0-255 scale (JPEG noise in the black
# surround of EyePACS photographs reaches ~20).
FOV_REL_THRESHOLD = 0.1
FOV_ABS_FLOOR = 25.0
# A row/column counts when this fraction of its pixels (and at least FOV_MIN_PIXELS) is in the
# FOV: a few stray bright pixels (text, dust, hot pixels) do not stretch the box.
FOV_MIN_FRACTION = 0.005
FOV_MIN_PIXELS = 3.0
# per-image statistics (max, standardize) reduce over H, W, C, so batches work too
_IMAGE_AXES = (-3, -2, -1)


def _as_float_image(image) -> tf.Tensor:
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.float32:
        image = tf.cast(image, tf.float32)
    return image


def fov_box(image) -> tf.Tensor:
    """Bounding box of the circular field of view of a fundus photograph.

    Thresholds ``max(red, green)`` (the blue channel of fundus photos is mostly noise) at
    ``max(FOV_ABS_FLOOR, FOV_REL_THRESHOLD * brightest)`` on the 0-255 scale, keeps the rows and
    columns with at least ``FOV_MIN_FRACTION`` of their pixels (and ``FOV_MIN_PIXELS``) above
    it, and returns the extent.
    Same idea as Graham's radius estimate (docs/datasets.md section 8), done in both directions so
    FOVs clipped at the top and bottom (IDRiD) are handled.

    Args:
        image: ``[H, W, 3]`` uint8 or float in [0, 255].

    Returns:
        int32 ``[4]``: ``(y0, x0, y1, x1)``, ends exclusive; the whole image when nothing is
        bright enough (a blank photograph).

    Example::

        >>> import numpy as np, cv2
        >>> disc = cv2.circle(np.zeros((64, 80, 3), np.uint8), (40, 30), 20, (200, 90, 30), -1)
        >>> fov_box(disc).numpy().tolist()  # the 1-pixel poles of the circle do not count
        [11, 21, 50, 60]
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    h, w = shape[0], shape[1]
    inside = tf.cast(fov_mask(image), tf.float32)
    min_in_row = tf.maximum(FOV_MIN_PIXELS, FOV_MIN_FRACTION * tf.cast(w, tf.float32))
    min_in_col = tf.maximum(FOV_MIN_PIXELS, FOV_MIN_FRACTION * tf.cast(h, tf.float32))
    rows = tf.where(tf.reduce_sum(inside, axis=1) >= min_in_row)[:, 0]
    cols = tf.where(tf.reduce_sum(inside, axis=0) >= min_in_col)[:, 0]
    found = tf.logical_and(tf.size(rows) > 0, tf.size(cols) > 0)
    return tf.cond(
        found,
        lambda: tf.cast(tf.stack([rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]), tf.int32),
        lambda: tf.stack([0, 0, h, w]),
    )


def fov_mask(image) -> tf.Tensor:
    """The pixels :func:`fov_box` counts as field of view: ``max(red, green)`` above
    ``max(FOV_ABS_FLOOR, FOV_REL_THRESHOLD * brightest)`` on the 0-255 scale.

    Args:
        image: ``[H, W, 3]`` uint8 or float in [0, 255].

    Returns:
        bool ``[H, W]``.
    """
    image = tf.convert_to_tensor(image)
    # one channel converted to float, not three: this runs on full-resolution photographs
    intensity = tf.cast(tf.maximum(image[..., 0], image[..., 1]), tf.float32)
    threshold = tf.maximum(FOV_ABS_FLOOR, FOV_REL_THRESHOLD * tf.reduce_max(intensity))
    return intensity > threshold


def fov_fraction(image) -> tf.Tensor:
    """The fraction of the photograph's pixels in its field of view (:func:`fov_mask`):
    0.0 for a blank photograph, where :func:`fov_box` falls back to the whole frame.

    Example::

        >>> import numpy as np
        >>> photo = np.zeros((10, 10, 3), np.uint8); photo[:5, :5] = 200
        >>> float(fov_fraction(photo))
        0.25
    """
    return tf.reduce_mean(tf.cast(fov_mask(image), tf.float32))


def crop_and_resize(image, box, size: int, *, method: str = "bilinear") -> tf.Tensor:
    """Crop ``box`` out of ``image``, scale its long side to ``size`` and pad the short side
    with zeros, centred, to a ``size x size`` square (the aspect is never distorted).

    ``method="bilinear"`` (the default) shrinks by area averaging (like OpenCV's
    ``INTER_AREA``: antialiased, so microaneurysms of a few pixels are averaged rather than
    skipped, and ~6x faster on CPU than TF's antialiased bilinear kernel) and enlarges
    bilinearly. Other ``tf.image.resize`` methods are used as they are (antialiased when not
    ``nearest``). Masks use ``method="nearest"``.

    Args:
        image: ``[H, W, C]`` (any C: images and 5-channel masks).
        box: int ``[4]`` ``(y0, x0, y1, x1)``, e.g. from :func:`fov_box`.
        size: output side.
        method: a ``tf.image.resize`` method.

    Returns:
        ``[size, size, C]``: float32 for interpolating methods, the input dtype for ``nearest``.

    Example::

        >>> import numpy as np
        >>> x = np.ones((10, 20, 1), np.uint8)
        >>> crop_and_resize(x, [0, 0, 10, 20], 8, method="nearest")[:, :, 0].numpy().sum(axis=1)
        array([0, 0, 8, 8, 8, 8, 0, 0], dtype=uint64)
    """
    image = tf.convert_to_tensor(image)
    box = tf.cast(tf.convert_to_tensor(box), tf.int32)
    new_h, new_w, scale = _target_size(box, size)
    target = tf.stack([new_h, new_w])
    if method in ("nearest", tf.image.ResizeMethod.NEAREST_NEIGHBOR):
        return _nearest_square(image, box, size, channels_first=False)
    elif method in ("bilinear", tf.image.ResizeMethod.BILINEAR):
        crop = tf.cast(image[box[0] : box[2], box[1] : box[3], :], tf.float32)
        resized = tf.cond(
            scale < 1.0,
            lambda: tf.image.resize(crop, target, method="area"),
            lambda: tf.image.resize(crop, target, method="bilinear"),
        )
    else:
        crop = image[box[0] : box[2], box[1] : box[3], :]
        resized = tf.image.resize(tf.cast(crop, tf.float32), target, method=method, antialias=True)
    out = tf.image.pad_to_bounding_box(
        resized, (size - new_h) // 2, (size - new_w) // 2, size, size
    )
    return tf.ensure_shape(out, [size, size, image.shape[-1]])


def _target_size(box: tf.Tensor, size: int):
    """``(new_h, new_w, scale)``: the box's size once its long side is ``size``."""
    ch = tf.cast(box[2] - box[0], tf.float32)
    cw = tf.cast(box[3] - box[1], tf.float32)
    scale = float(size) / tf.maximum(tf.maximum(ch, cw), 1.0)
    new_h = tf.clip_by_value(tf.cast(tf.round(ch * scale), tf.int32), 1, size)
    new_w = tf.clip_by_value(tf.cast(tf.round(cw * scale), tf.int32), 1, size)
    return new_h, new_w, scale


def _nearest_square(array: tf.Tensor, box: tf.Tensor, size: int, *, channels_first: bool):
    """Nearest-neighbour crop-and-resize of ``[H, W, C]`` (or ``[C, H, W]``) to a padded
    ``[size, size, C]``: the rows and columns ``tf.image.resize(crop, target, "nearest")``
    would pick, gathered straight from the full array, so the crop (a full-size copy of a
    4288 px mask) is never made."""
    new_h, new_w, _ = _target_size(box, size)
    rows = box[0] + _nearest_source(box[2] - box[0], new_h)
    cols = box[1] + _nearest_source(box[3] - box[1], new_w)
    first = 1 if channels_first else 0
    resized = tf.gather(tf.gather(array, rows, axis=first), cols, axis=first + 1)
    if channels_first:
        resized = tf.transpose(resized, [1, 2, 0])  # small now: [new_h, new_w, C]
    out = tf.image.pad_to_bounding_box(
        resized, (size - new_h) // 2, (size - new_w) // 2, size, size
    )
    channels = array.shape[0] if channels_first else array.shape[-1]
    return tf.ensure_shape(out, [size, size, channels])


def _nearest_source(length: tf.Tensor, out: tf.Tensor) -> tf.Tensor:
    """The source index of each of ``out`` samples of ``length`` pixels, exactly as TF's
    ``ResizeNearestNeighbor`` with half-pixel centres computes it (float32
    ``floor((i + 0.5) * length / out)``, at most ``length - 1``)."""
    scale = tf.cast(length, tf.float32) / tf.cast(out, tf.float32)
    index = tf.cast(tf.floor((tf.range(out, dtype=tf.float32) + 0.5) * scale), tf.int32)
    return tf.clip_by_value(index, 0, tf.maximum(length - 1, 0))


def _gaussian_kernel(sigma: float, radius: int) -> tf.Tensor:
    x = tf.range(-radius, radius + 1, dtype=tf.float32)
    k = tf.exp(-0.5 * tf.square(x / sigma))
    return k / tf.reduce_sum(k)


def gaussian_blur(image, sigma: float) -> tf.Tensor:
    """Separable Gaussian blur of ``[H, W, C]`` or ``[B, H, W, C]`` float images.

    The kernel reaches 4 sigma and borders are mirrored without repeating the edge pixel,
    which is what ``cv2.GaussianBlur(img, (0, 0), sigma)`` does on float images (its default
    ``BORDER_REFLECT_101``).

    Example::

        >>> import numpy as np
        >>> round(float(gaussian_blur(np.full((9, 9, 1), 3.0, np.float32), 1.5)[4, 4, 0]), 4)
        3.0
    """
    image = _as_float_image(image)
    batched = image.shape.rank == 4
    x = image if batched else image[None]
    radius = max(1, int(round(4.0 * float(sigma))))
    kernel = _gaussian_kernel(float(sigma), radius)
    channels = x.shape[-1]
    # Reflection needs the pad to be smaller than the side; clamp for tiny images.
    pad_h = tf.minimum(radius, tf.shape(x)[1] - 1)
    pad_w = tf.minimum(radius, tf.shape(x)[2] - 1)
    x = tf.pad(x, [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]], mode="REFLECT")
    # Sub-kernel when the pad had to be clamped: crop the kernel to the available reflection.
    k_h = kernel[radius - pad_h : radius + pad_h + 1]
    k_w = kernel[radius - pad_w : radius + pad_w + 1]
    k_h = k_h / tf.reduce_sum(k_h)
    k_w = k_w / tf.reduce_sum(k_w)
    kh = tf.tile(tf.reshape(k_h, [-1, 1, 1, 1]), [1, 1, channels, 1])
    kw = tf.tile(tf.reshape(k_w, [1, -1, 1, 1]), [1, 1, channels, 1])
    x = tf.nn.depthwise_conv2d(x, kh, [1, 1, 1, 1], "VALID")
    x = tf.nn.depthwise_conv2d(x, kw, [1, 1, 1, 1], "VALID")
    return x if batched else x[0]


def graham(image, *, scale_sigma_frac: float = 1.0 / 30.0) -> tf.Tensor:
    """Graham's preprocessing (Kaggle DR 2015 winner; docs/datasets.md section 8) on an image whose
    field of view fills it (e.g. after :func:`crop_and_resize` of the :func:`fov_box`).

    ``4 * img - 4 * GaussianBlur(img, sigma) + 128`` with ``sigma = scale_sigma_frac * r``,
    ``r`` = half the image side (the FOV radius), then everything outside a circle of radius
    ``0.9 r`` set to 128; the result is clipped to [0, 255] as ``cv2.addWeighted`` saturates.

    Args:
        image: ``[H, W, 3]`` or ``[B, H, W, 3]``, uint8 or float in [0, 255]; the image side
            must be static (it sets the blur width).
        scale_sigma_frac: blur sigma as a fraction of the FOV radius (Graham: 1/30).

    Returns:
        float32 in [0, 255], same shape.

    Example::

        >>> import numpy as np
        >>> out = graham(np.full((32, 32, 3), 77, np.uint8))
        >>> float(out[16, 16, 0]), float(out[0, 0, 0])
        (128.0, 128.0)
    """
    image = _as_float_image(image)
    h, w = image.shape[-3], image.shape[-2]
    if h is None or w is None:
        raise ValueError(f"graham needs a static image size, got shape {image.shape}")
    radius = min(h, w) / 2.0
    sigma = max(scale_sigma_frac * radius, 0.3)
    out = 4.0 * image - 4.0 * gaussian_blur(image, sigma) + 128.0
    out = tf.clip_by_value(out, 0.0, 255.0)
    yy = tf.range(h, dtype=tf.float32)[:, None] - (h - 1) / 2.0
    xx = tf.range(w, dtype=tf.float32)[None, :] - (w - 1) / 2.0
    circle = tf.cast(tf.sqrt(yy * yy + xx * xx) <= 0.9 * radius, tf.float32)[..., None]
    return out * circle + 128.0 * (1.0 - circle)


def normalize(image, mode: str) -> tf.Tensor:
    """Map a float image in [0, 255] to a network's input range.

    Modes:
        ``unit``: ``x / 255`` in [0, 1].
        ``imagenet_caffe``: RGB to BGR, minus ``IMAGENET_CAFFE_MEAN_BGR`` (as
            ``keras.applications.vgg16.preprocess_input``).
        ``imagenet_torch``: ``(x / 255 - IMAGENET_TORCH_MEAN) / IMAGENET_TORCH_STD``.
        ``max``: divided by the image's own maximum (Lecouat et al. 2018, section 3).
        ``symmetric``: ``x / 127.5 - 1`` in [-1, 1].
        ``standardize``: per-image zero mean and unit variance (the cooperative-learning paper,
            "standardized by its mean and dividing its standard deviation").
        ``raw``: unchanged, float in [0, 255] (networks that normalise their input themselves,
            e.g. image-classifiers' ResNet / ResNeXt; :mod:`drkeras.models.input_scaling`).

    Args:
        image: ``[..., H, W, 3]`` float (or uint8) in [0, 255]; per-image statistics are taken
            over the last three axes, so batches work.
        mode: one of ``NORMALIZATIONS``.

    Example::

        >>> import numpy as np
        >>> normalize(np.full((1, 1, 3), 255.0, np.float32), "symmetric").numpy().ravel()
        array([1., 1., 1.], dtype=float32)
    """
    x = _as_float_image(image)
    if mode == "unit":
        return x / 255.0
    if mode == "imagenet_caffe":
        return x[..., ::-1] - tf.constant(IMAGENET_CAFFE_MEAN_BGR, tf.float32)
    if mode == "imagenet_torch":
        mean = tf.constant(IMAGENET_TORCH_MEAN, tf.float32)
        std = tf.constant(IMAGENET_TORCH_STD, tf.float32)
        return (x / 255.0 - mean) / std
    if mode == "max":
        peak = tf.reduce_max(x, axis=_IMAGE_AXES, keepdims=True)
        return tf.math.divide_no_nan(x, peak)
    if mode == "symmetric":
        return x / 127.5 - 1.0
    if mode == "standardize":
        mean, var = tf.nn.moments(x, axes=list(_IMAGE_AXES), keepdims=True)
        # floor at one grey level so a blank image does not blow up
        return (x - mean) / tf.maximum(tf.sqrt(var), 1.0)
    if mode == "raw":
        return x
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def denormalize(image, mode: str) -> tf.Tensor:
    """Invert :func:`normalize` back to [0, 255] RGB for display (Grad-CAM overlays, plots).

    ``max`` and ``standardize`` discard the per-image scale; they are undone up to that scale
    by stretching the image's range to [0, 255].

    Example::

        >>> import numpy as np
        >>> x = np.full((1, 1, 3), 100.0, np.float32)
        >>> denormalize(normalize(x, "imagenet_torch"), "imagenet_torch").numpy().round(3).ravel()
        array([100., 100., 100.], dtype=float32)
    """
    x = _as_float_image(image)
    if mode == "unit":
        return x * 255.0
    if mode == "imagenet_caffe":
        return (x + tf.constant(IMAGENET_CAFFE_MEAN_BGR, tf.float32))[..., ::-1]
    if mode == "imagenet_torch":
        mean = tf.constant(IMAGENET_TORCH_MEAN, tf.float32)
        std = tf.constant(IMAGENET_TORCH_STD, tf.float32)
        return (x * std + mean) * 255.0
    if mode == "symmetric":
        return (x + 1.0) * 127.5
    if mode == "raw":
        return x
    if mode in ("max", "standardize"):
        axes = _IMAGE_AXES
        lo = tf.reduce_min(x, axis=axes, keepdims=True)
        hi = tf.reduce_max(x, axis=axes, keepdims=True)
        return tf.math.divide_no_nan(x - lo, hi - lo) * 255.0
    raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")


def _check_mode(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")


def prepare_image(
    image_uint8,
    *,
    size: int,
    fov_crop: bool = True,
    graham: bool = False,
    normalization: str = "unit",
) -> tf.Tensor:
    """The full input preprocessing of one photograph: FOV crop, square resize, optional
    Graham, normalisation. Training pipelines and exported serving signatures both call it.

    Args:
        image_uint8: ``[H, W, 3]`` uint8 RGB of any size.
        size: side of the square output.
        fov_crop: crop to :func:`fov_box` first (otherwise the whole frame is padded square).
        graham: apply :func:`graham` after resizing.
        normalization: a mode of :func:`normalize`.

    Returns:
        float32 ``[size, size, 3]``.

    Example::

        >>> import numpy as np
        >>> prepare_image(np.zeros((40, 60, 3), np.uint8), size=16).shape.as_list()
        [16, 16, 3]
    """
    _check_mode(normalization)
    image = tf.convert_to_tensor(image_uint8)
    box = fov_box(image) if fov_crop else _full_box(image)
    x = crop_and_resize(image, box, size)
    if graham:
        x = _graham(x)
    return normalize(x, normalization)


_graham = graham  # prepare_image's keyword argument shadows the function name


def _full_box(image: tf.Tensor) -> tf.Tensor:
    shape = tf.shape(image)
    return tf.stack([0, 0, shape[0], shape[1]])


def prepare_example_masks(masks, box, size: int, *, channels_first: bool = False) -> tf.Tensor:
    """Apply the crop and resize of :func:`prepare_image` to an example's masks (nearest
    neighbour, dtype kept).

    Args:
        masks: ``[H, W, K]`` (the record's uint8 {0, 1} masks), or ``[K, H, W]`` with
            ``channels_first``: channels decoded one by one stack along a new first axis with
            plain copies, where stacking them last interleaves every pixel (~0.2 s for five
            4288 x 2848 masks on a 2-core CPU); only the small result is transposed.
        box: the box used for the image (``fov_box(image)``).
        size: output side.
        channels_first: ``masks`` is ``[K, H, W]``.

    Returns:
        ``[size, size, K]`` either way.

    Example::

        >>> import numpy as np
        >>> m = np.zeros((40, 60, 5), np.uint8); m[10:30, 20:40, 1] = 1
        >>> int(prepare_example_masks(m, [0, 0, 40, 60], 30)[..., 1].numpy().sum())
        100
    """
    masks = tf.convert_to_tensor(masks)
    box = tf.cast(tf.convert_to_tensor(box), tf.int32)
    return _nearest_square(masks, box, size, channels_first=channels_first)


def prepare_batch(
    images_uint8,
    *,
    size: int,
    fov_crop: bool = True,
    graham: bool = False,
    normalization: str = "unit",
) -> tf.Tensor:
    """:func:`prepare_image` over a batch ``[B, H, W, 3]`` (each image gets its own FOV box).

    Example::

        >>> import numpy as np
        >>> prepare_batch(np.zeros((2, 40, 60, 3), np.uint8), size=16).shape.as_list()
        [2, 16, 16, 3]
    """
    _check_mode(normalization)
    images = tf.convert_to_tensor(images_uint8)

    def one(image):
        box = fov_box(image) if fov_crop else _full_box(image)
        return crop_and_resize(image, box, size)

    x = tf.map_fn(one, images, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
    if graham:
        x = _graham(x)
    return normalize(x, normalization)
