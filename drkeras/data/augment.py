"""Paired image + mask augmentation: one random draw moves an image and its lesion masks
together, so every mask pixel stays on the lesion it outlines.

Geometry (flips, 90-degree and small-angle rotations, zoom, shift, shear) is composed into ONE
affine matrix per example and applied to the image (bilinear) and to the masks (nearest
neighbour, values stay {0, 1}); colour changes (brightness, contrast, saturation, hue, channel
shift) touch the image only and compose into ONE affine colour map (a 3x3 matrix and an
offset). This is what the papers list:
MTUnet "random rotations, width/height shifts, shear, zoom, vertical/horizontal flips and channel
shifts" (Foo et al. 2020, "Semi-supervised training"); the cooperative-learning paper's flips,
random crop and hue/contrast/saturation; Zhou et al. 2019's flips and rotations; Lecouat et al.
2018's random crops and flips.

Why not keras-cv layers: each keras-cv layer draws its own random numbers, so an image and a
mask passed separately would not share a draw, and chaining several layers resamples the image
several times. One sampled matrix resamples once and is reproducible from a stateless seed
(``tf.random.stateless_*``): the same ``seed`` gives the same augmentation in eager mode, in
``tf.data`` and across runs.

Speed: the random draws are TF ops, but :func:`augment` resamples with OpenCV
(``cv2.warpAffine``, ``cv2.transform``) inside one ``tf.numpy_function`` per example: on a 512 x
512 photograph that is ~1.5 ms instead of 8-19 ms for TF's ``ImageProjectiveTransformV3`` plus
~5 ms for the colour ops (measured on a 2-core CPU, ``python -m benchmarks``), and OpenCV
releases the GIL, so ``tf.data``'s parallel map runs it on every core. The result equals
:func:`apply_transform` + :func:`color_jitter` up to OpenCV's 1/32-pixel interpolation grid
(and, for uint8 images, rounding to whole grey levels).
:func:`apply_transform` and :func:`color_jitter` stay pure TF ops (usable anywhere TF runs).

Images are float in [0, 255] (what :func:`drkeras.data.preprocess.crop_and_resize` returns),
before normalisation.

Example::

    >>> import numpy as np
    >>> image = np.zeros((32, 32, 3), np.float32); image[4:12, 4:12] = 255.0
    >>> masks = np.zeros((32, 32, 5), np.uint8); masks[4:12, 4:12, 2] = 1
    >>> out, out_masks = augment(image, masks, seed=[1, 2])
    >>> out.shape.as_list(), out_masks.dtype.name
    ([32, 32, 3], 'uint8')
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Tuple

import cv2
import numpy as np
import tensorflow as tf

__all__ = [
    "DEFAULT_AUGMENT",
    "FILL_MODES",
    "NO_AUGMENT",
    "AugmentParams",
    "apply_transform",
    "augment",
    "center_crop",
    "color_jitter",
    "random_crop",
    "sample_transform",
]

# Sub-seed slots: fixed, so adding a parameter never changes the draws of the others.
_FLIP_H, _FLIP_V, _ROT90, _ANGLE, _ZOOM, _SHIFT, _SHEAR = range(7)
_BRIGHT, _CONTRAST, _SAT, _HUE, _CHANNEL, _GEOMETRY, _COLOUR, _CROP = range(7, 15)
_N_SEEDS = 15


FILL_MODES = ("constant", "nearest")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Ranges of the random augmentation (0 or False switches a transform off).

    Attributes:
        flip_horizontal: mirror left-right with probability 1/2.
        flip_vertical: mirror up-down with probability 1/2.
        rotate90: rotate by a uniformly drawn multiple of 90 degrees.
        rotation_deg: extra rotation drawn uniformly in [-rotation_deg, rotation_deg].
        zoom: scale drawn uniformly in [1 - zoom, 1 + zoom].
        shift: translation drawn uniformly in [-shift, shift] times the side, per axis.
        shear_deg: shear angle drawn uniformly in [-shear_deg, shear_deg].
        brightness: intensity factor in [1 - brightness, 1 + brightness] (multiplicative, so
            the black surround of the field of view stays black, as with a camera's exposure).
        contrast: contrast factor in [1 - contrast, 1 + contrast] around the image mean.
        saturation: chroma factor in [1 - saturation, 1 + saturation].
        hue: hue rotation in [-hue, hue] turns of the colour circle.
        channel_shift: offset in [-channel_shift, channel_shift] on the 0-255 scale, drawn per
            channel (a colour cast), or once for all channels with ``channel_shift_shared``.
        channel_shift_shared: Keras ``ImageDataGenerator(channel_shift_range=...)``'s channel
            shift: ONE offset added to every channel, the result clipped to the image's own
            [min, max] (``keras.preprocessing.image.apply_channel_shift``).
        zoom_per_axis: draw the zoom of x and y independently, each in [1 - zoom, 1 + zoom]
            (Keras ``ImageDataGenerator(zoom_range=...)``); False: one isotropic zoom.
        fill: what the resampling puts where the source ends: ``"constant"`` (0, the black
            surround of a fundus photograph) or ``"nearest"`` (the nearest edge pixel, Keras
            ``ImageDataGenerator``'s default ``fill_mode``); images and masks alike.
        crop: random cropping: a square window of side drawn in [1 - crop, 1] times the image
            side (aspect kept), at a uniformly drawn position inside the image, resized back to
            the full size, so the network input size is unchanged and no border is shown. Part
            of the one affine draw, applied before the other geometric transforms.

    Example::

        >>> AugmentParams(rotation_deg=0.0, shear_deg=0.0).rotate90
        True
    """

    flip_horizontal: bool = True
    flip_vertical: bool = True
    rotate90: bool = True
    rotation_deg: float = 15.0
    zoom: float = 0.1
    shift: float = 0.05
    shear_deg: float = 5.0
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hue: float = 0.02
    channel_shift: float = 0.0
    channel_shift_shared: bool = False
    zoom_per_axis: bool = False
    fill: str = "constant"
    crop: float = 0.0

    def __post_init__(self):
        for name in (
            "rotation_deg",
            "zoom",
            "shift",
            "shear_deg",
            "brightness",
            "contrast",
            "saturation",
            "hue",
            "channel_shift",
            "crop",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"AugmentParams.{name} must be >= 0, got {getattr(self, name)}")
        if self.zoom >= 1 or self.brightness >= 1 or self.contrast >= 1 or self.saturation >= 1:
            raise ValueError("AugmentParams zoom/brightness/contrast/saturation must be < 1")
        if self.hue > 0.5:
            raise ValueError(f"AugmentParams.hue must be <= 0.5, got {self.hue}")
        if self.crop >= 1:
            raise ValueError(
                f"AugmentParams.crop must be < 1 (window side 1 - crop), got {self.crop}"
            )
        if self.fill not in FILL_MODES:
            raise ValueError(f"AugmentParams.fill must be one of {FILL_MODES}, got {self.fill!r}")


DEFAULT_AUGMENT = AugmentParams()
NO_AUGMENT = AugmentParams(
    flip_horizontal=False,
    flip_vertical=False,
    rotate90=False,
    rotation_deg=0.0,
    zoom=0.0,
    shift=0.0,
    shear_deg=0.0,
    brightness=0.0,
    contrast=0.0,
    saturation=0.0,
    hue=0.0,
)


def _seeds(seed) -> tf.Tensor:
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.random.experimental.stateless_split(seed, num=_N_SEEDS)


def _uniform(seed, low: float, high: float) -> tf.Tensor:
    return tf.random.stateless_uniform([], seed, minval=low, maxval=high)


def _coin(seed) -> tf.Tensor:
    return _uniform(seed, 0.0, 1.0) < 0.5


def sample_transform(seed, height, width, params: AugmentParams = DEFAULT_AUGMENT) -> tf.Tensor:
    """Draw one affine transform and return it in ``ImageProjectiveTransformV3`` form.

    The forward map (input to output, about the image centre) is
    ``p_out = R(angle) @ Shear @ Zoom @ Flip @ p_in + shift``; the returned 8 numbers are its
    inverse (output pixel -> input pixel), which is what the resampling op wants.

    Args:
        seed: int ``[2]`` stateless seed.
        height, width: image size (python ints or scalar tensors).
        params: the ranges to draw from.

    Returns:
        float32 ``[8]``.

    Example::

        >>> t = sample_transform([0, 0], 8, 8, NO_AUGMENT)
        >>> t.numpy().tolist()
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    """
    s = _seeds(seed)
    one = tf.constant(1.0)
    fx = tf.where(_coin(s[_FLIP_H]), -one, one) if params.flip_horizontal else one
    fy = tf.where(_coin(s[_FLIP_V]), -one, one) if params.flip_vertical else one
    angle = tf.constant(0.0)
    if params.rotate90:
        k = tf.random.stateless_uniform([], s[_ROT90], minval=0, maxval=4, dtype=tf.int32)
        angle += tf.cast(k, tf.float32) * (math.pi / 2)
    if params.rotation_deg:
        r = math.radians(params.rotation_deg)
        angle += _uniform(s[_ANGLE], -r, r)
    zoom = _uniform(s[_ZOOM], 1.0 - params.zoom, 1.0 + params.zoom) if params.zoom else one
    zoom_y = zoom
    if params.zoom and params.zoom_per_axis:  # Keras ImageDataGenerator: zx, zy apart
        zooms = tf.random.stateless_uniform([2], s[_ZOOM], 1.0 - params.zoom, 1.0 + params.zoom)
        zoom, zoom_y = zooms[0], zooms[1]
    shear = tf.constant(0.0)
    if params.shear_deg:
        r = math.radians(params.shear_deg)
        shear = _uniform(s[_SHEAR], -r, r)
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    if params.shift:
        t = tf.random.stateless_uniform([2], s[_SHIFT], -params.shift, params.shift)
        tx, ty = t[0] * w, t[1] * h
    else:
        tx = ty = tf.constant(0.0)

    cos, sin = tf.cos(angle), tf.sin(angle)
    rotation = tf.reshape(tf.stack([cos, -sin, sin, cos]), [2, 2])
    shear_m = tf.reshape(tf.stack([one, tf.tan(shear), 0.0 * one, one]), [2, 2])
    scale = tf.reshape(tf.stack([zoom * fx, 0.0 * one, 0.0 * one, zoom_y * fy]), [2, 2])
    forward = rotation @ shear_m @ scale
    if params.crop:
        # q -> (q - d) / c first (window of side c, centre d from the image centre), so the
        # whole map is q_out = (forward / c) q_in + (t - (forward / c) d). |d| stays within
        # (1 - c) (side - 1) / 2: every output pixel centre samples between input centres.
        draw = tf.random.stateless_uniform([3], s[_CROP], 0.0, 1.0)
        side = 1.0 - params.crop * draw[0]
        room = (1.0 - side) / 2.0
        d = tf.stack(
            [(2.0 * draw[1] - 1.0) * room * (w - 1.0), (2.0 * draw[2] - 1.0) * room * (h - 1.0)]
        )
        forward = forward / side
        moved = tf.linalg.matvec(forward, d)
        tx, ty = tx - moved[0], ty - moved[1]
    inverse = tf.linalg.inv(forward)
    centre = tf.stack([(w - 1.0) / 2.0, (h - 1.0) / 2.0])
    offset = centre - tf.linalg.matvec(inverse, centre + tf.stack([tx, ty]))
    return tf.stack(
        [inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1], 0.0, 0.0]
    )


def apply_transform(
    image, transform, *, interpolation: str = "bilinear", fill: str = "constant"
) -> tf.Tensor:
    """Resample ``[H, W, C]`` (or ``[B, H, W, C]`` with ``[B, 8]`` transforms) through a
    transform from :func:`sample_transform`; outside the source is filled with 0 (black,
    like the surround of a fundus photograph), or with the nearest edge pixel with
    ``fill="nearest"``. Masks: ``interpolation="nearest"``.

    Example::

        >>> import numpy as np
        >>> x = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
        >>> apply_transform(x, [1, 0, 0, 0, 1, 0, 0, 0])[..., 0].numpy()[0].tolist()
        [0.0, 1.0, 2.0, 3.0]
    """
    image = tf.convert_to_tensor(image)
    batched = image.shape.rank == 4
    x = image if batched else image[None]
    transforms = tf.reshape(tf.cast(transform, tf.float32), [-1, 8])
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=x,
        transforms=transforms,
        output_shape=tf.shape(x)[1:3],
        fill_value=tf.constant(0.0, tf.float32),
        interpolation=interpolation.upper(),
        fill_mode=fill.upper(),
    )
    return out if batched else out[0]


# RGB <-> YIQ (NTSC): hue is an angle in the (I, Q) chroma plane, luma Y is untouched.
_RGB_TO_YIQ = (
    (0.299, 0.587, 0.114),
    (0.595716, -0.274453, -0.321263),
    (0.211456, -0.522591, 0.311135),
)
_LUMA = _RGB_TO_YIQ[0]


def _colour_matrix(saturation: tf.Tensor, hue: tf.Tensor) -> tf.Tensor:
    """3x3 matrix scaling chroma by ``saturation`` and rotating hue by ``hue`` turns.

    Grey pixels (R = G = B) have no chroma, so both leave them unchanged."""
    to_yiq = tf.constant(_RGB_TO_YIQ, tf.float32)
    angle = 2.0 * math.pi * hue
    cos, sin = tf.cos(angle) * saturation, tf.sin(angle) * saturation
    one, zero = tf.ones_like(cos), tf.zeros_like(cos)
    chroma = tf.reshape(tf.stack([one, zero, zero, zero, cos, -sin, zero, sin, cos]), [3, 3])
    return tf.linalg.inv(to_yiq) @ chroma @ to_yiq


def _colour_terms(seed, params: AugmentParams):
    """Draw the colour jitter as one affine map of RGB values.

    Brightness ``b``, contrast ``c`` around the per-channel mean ``m`` of the input, the chroma
    matrix ``C`` (saturation and hue) and the channel shift ``s``, applied in that order, give
    ``x' = C ((c x + (1 - c) m) b) + s = (b c C) x + C ((1 - c) b m) + s``: one linear map plus
    an offset that depends on the image only through ``m``.

    Returns:
        ``(gain, mean_weight, matrix, shift)``: scalar ``b c``, scalar ``(1 - c) b``, float32
        ``[3, 3]`` ``C`` and float32 ``[3]`` ``s``, so that ``x' = gain * C x + C (mean_weight
        * m) + s``.
    """
    s = _seeds(seed)
    one = tf.constant(1.0)
    bright = one
    if params.brightness:
        bright = _uniform(s[_BRIGHT], 1.0 - params.brightness, 1.0 + params.brightness)
    contrast = one
    if params.contrast:
        contrast = _uniform(s[_CONTRAST], 1.0 - params.contrast, 1.0 + params.contrast)
    matrix = tf.eye(3)
    if params.saturation or params.hue:
        sat = one
        if params.saturation:
            sat = _uniform(s[_SAT], 1.0 - params.saturation, 1.0 + params.saturation)
        hue = _uniform(s[_HUE], -params.hue, params.hue) if params.hue else tf.constant(0.0)
        matrix = _colour_matrix(sat, hue)
    shift = tf.zeros([3])
    if params.channel_shift:
        c = params.channel_shift
        if params.channel_shift_shared:  # Keras: one intensity for every channel
            shift = tf.fill([3], _uniform(s[_CHANNEL], -c, c))
        else:
            shift = tf.random.stateless_uniform([3], s[_CHANNEL], -c, c)
    return bright * contrast, (1.0 - contrast) * bright, matrix, shift


def _has_colour(params: AugmentParams) -> bool:
    return any(
        (params.brightness, params.contrast, params.saturation, params.hue, params.channel_shift)
    )


def _has_geometry(params: AugmentParams) -> bool:
    return any(
        (
            params.flip_horizontal,
            params.flip_vertical,
            params.rotate90,
            params.rotation_deg,
            params.zoom,
            params.shift,
            params.shear_deg,
            params.crop,
        )
    )


def color_jitter(image, seed, params: AugmentParams = DEFAULT_AUGMENT) -> tf.Tensor:
    """Random brightness, contrast, saturation, hue and channel shift of a float [0, 255]
    RGB image; returns float32 in [0, 255].

    Saturation and hue are applied together as one 3x3 colour matrix in YIQ space (chroma
    scaled by the saturation factor and rotated by the hue shift, luma kept): the linear
    counterpart of the HSV adjustments of ``tf.image``, about 10x cheaper per image, and grey
    stays grey. All five adjustments compose into one affine map (:func:`_colour_terms`), so
    the image is read once.

    Example::

        >>> import numpy as np
        >>> x = np.full((4, 4, 3), 100.0, np.float32)
        >>> bool(np.allclose(color_jitter(x, [0, 1], NO_AUGMENT), x))
        True
    """
    x = tf.cast(image, tf.float32)
    low, high = _clip_range(x, params)
    gain, mean_weight, matrix, shift = _colour_terms(seed, params)
    offset = shift
    if params.contrast:
        mean = tf.reduce_mean(x, axis=[0, 1])
        offset = offset + tf.linalg.matvec(matrix, mean_weight * mean)
    if params.saturation or params.hue:
        x = tf.tensordot(x, tf.transpose(matrix) * gain, 1)
    elif params.brightness or params.contrast:
        x = x * gain
    return tf.clip_by_value(x + offset, low, high)


def _clip_range(x: tf.Tensor, params: AugmentParams):
    """Bounds of the colour-jittered image: [0, 255], or the image's own [min, max] for
    Keras' shared channel shift (``apply_channel_shift`` clips there)."""
    if params.channel_shift and params.channel_shift_shared:
        return tf.reduce_min(x), tf.reduce_max(x)
    return 0.0, 255.0


# Mask dtypes cv2.warpAffine resamples; others go through apply_transform.
_CV2_DTYPES = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


_CV2_BORDERS = {"constant": cv2.BORDER_CONSTANT, "nearest": cv2.BORDER_REPLICATE}


def _cv2_warp(
    array: np.ndarray, transform: np.ndarray, flags: int, fill: str = "constant"
) -> np.ndarray:
    """``array [H, W, C]`` resampled through an affine ``transform`` of
    :func:`sample_transform` (output pixel -> input pixel, as ``WARP_INVERSE_MAP`` reads it),
    zeros outside. One call for all channels (OpenCV takes any count; five uint8 mask channels
    cost about one colour image)."""
    height, width = array.shape[:2]
    warped = cv2.warpAffine(
        np.ascontiguousarray(array),
        np.asarray(transform[:6], np.float64).reshape(2, 3),
        (width, height),
        flags=flags | cv2.WARP_INVERSE_MAP,
        borderMode=_CV2_BORDERS[fill],
        borderValue=0,
    )
    return warped.reshape(array.shape)  # OpenCV drops a single channel axis


def _numpy_warp_colour(image, transform, colour, fill="constant", own_range=False):
    """The OpenCV body of :func:`augment` for the image: bilinear warp (skipped when
    ``transform`` is empty), then the affine colour map of :func:`_colour_terms` packed as
    ``[gain, mean_weight, C (9, row-major), s (3)]``, clipped to [0, 255]. Works in the image's
    dtype: a uint8 image stays uint8 (``cv2.transform`` rounds and saturates, which is the
    clip), so every pass reads and writes a quarter of the bytes."""
    if transform.size:
        image = _cv2_warp(image, transform, cv2.INTER_LINEAR, fill)
    gain, mean_weight = float(colour[0]), float(colour[1])
    matrix, shift = colour[2:11].reshape(3, 3), colour[11:14]
    identity = gain == 1.0 and mean_weight == 0.0 and not shift.any()
    if identity and np.array_equal(matrix, np.eye(3, dtype=matrix.dtype)):
        return image if image.dtype == np.uint8 else np.clip(image, 0.0, 255.0)
    offset = shift + matrix @ (mean_weight * np.asarray(cv2.mean(image)[:3], np.float32))
    affine = np.concatenate([gain * matrix, offset[:, None]], axis=1).astype(np.float32)
    out = cv2.transform(np.ascontiguousarray(image), affine)
    if own_range:  # Keras' shared channel shift: clipped to the image's own [min, max]
        return np.clip(out, image.min(), image.max(), out=out)
    return out if out.dtype == np.uint8 else np.clip(out, 0.0, 255.0, out=out)


def _numpy_warp_nearest(masks, transform, fill="constant"):
    return _cv2_warp(masks, transform, cv2.INTER_NEAREST, fill)


def augment(
    image,
    masks=None,
    *,
    seed,
    params: AugmentParams = DEFAULT_AUGMENT,
) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
    """Augment one example: the same geometric draw for ``image`` and ``masks``, colour on the
    image only.

    Args:
        image: ``[H, W, 3]`` float in [0, 255], or uint8: a uint8 image is augmented in
            uint8 (resampled and colour-jittered values rounded to whole grey levels, as a
            stored photograph is; ~3x cheaper than in float32).
        masks: ``[H, W, K]`` masks (any dtype, dtype kept) or ``None``.
        seed: int ``[2]`` stateless seed; the pipelines derive one per example.
        params: the ranges to draw from.

    Returns:
        ``(image float32 [H, W, 3], masks or None)``.

    Example::

        >>> import numpy as np
        >>> x, m = augment(np.zeros((8, 8, 3), np.uint8), None, seed=[3, 4])
        >>> m is None, x.dtype.name
        (True, 'float32')
    """
    image = tf.convert_to_tensor(image)
    if image.dtype != tf.uint8:
        image = tf.cast(image, tf.float32)
    s = _seeds(seed)
    shape = tf.shape(image)
    transform = tf.zeros([0])  # no geometric transform switched on: nothing to resample
    if _has_geometry(params):
        transform = sample_transform(s[_GEOMETRY], shape[0], shape[1], params)
    if _has_geometry(params) or _has_colour(params):
        gain, mean_weight, matrix, shift = _colour_terms(s[_COLOUR], params)
        colour = tf.concat([tf.stack([gain, mean_weight]), tf.reshape(matrix, [9]), shift], 0)
        own_range = bool(params.channel_shift and params.channel_shift_shared)
        warp = functools.partial(_numpy_warp_colour, fill=params.fill, own_range=own_range)
        out = tf.numpy_function(warp, [image, transform, colour], image.dtype, stateful=False)
        image = tf.cast(tf.ensure_shape(out, image.shape), tf.float32)
    else:
        image = tf.clip_by_value(tf.cast(image, tf.float32), 0.0, 255.0)
    if masks is not None:
        masks = tf.convert_to_tensor(masks)
    if masks is not None and _has_geometry(params):
        if masks.dtype.as_numpy_dtype in _CV2_DTYPES:
            warp_masks = functools.partial(_numpy_warp_nearest, fill=params.fill)
            warped = tf.numpy_function(warp_masks, [masks, transform], masks.dtype, stateful=False)
            masks = tf.ensure_shape(warped, masks.shape)
        else:
            masks = apply_transform(masks, transform, interpolation="nearest", fill=params.fill)
    return image, masks


def random_crop(image, masks, size: int, *, seed) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
    """The same random ``size x size`` window of ``image`` and ``masks`` (e.g. 224 of 256,
    the cooperative-learning paper's "randomly cropped patch").

    Example::

        >>> import numpy as np
        >>> x, _ = random_crop(np.zeros((8, 8, 3), np.float32), None, 5, seed=[0, 1])
        >>> x.shape.as_list()
        [5, 5, 3]
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    s = _seeds(seed)[_CROP]
    y0 = tf.random.stateless_uniform([], s, 0, shape[0] - size + 1, dtype=tf.int32)
    x0 = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(s, 1), 0, shape[1] - size + 1, tf.int32
    )
    image = image[y0 : y0 + size, x0 : x0 + size]
    if masks is not None:
        masks = tf.convert_to_tensor(masks)[y0 : y0 + size, x0 : x0 + size]
    return image, masks


def center_crop(image, masks, size: int) -> Tuple[tf.Tensor, Optional[tf.Tensor]]:
    """The central ``size x size`` window (evaluation counterpart of :func:`random_crop`).

    Example::

        >>> import numpy as np
        >>> x, _ = center_crop(np.arange(16.0).reshape(4, 4, 1), None, 2)
        >>> x[..., 0].numpy().tolist()
        [[5.0, 6.0], [9.0, 10.0]]
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    y0, x0 = (shape[0] - size) // 2, (shape[1] - size) // 2
    image = image[y0 : y0 + size, x0 : x0 + size]
    if masks is not None:
        masks = tf.convert_to_tensor(masks)[y0 : y0 + size, x0 : x0 + size]
    return image, masks
