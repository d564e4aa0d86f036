"""Input quality flags: is a photograph fit to be graded at all?

A network grades whatever it is given: an all-black frame, a 5 x 5 thumbnail or a JPEG cut off
after a third of its bytes get a grade and lesion maps that look like any other. These checks
say, next to every prediction, what is wrong with its input. They are written once, here, and
used by ``python -m drkeras.predict`` (the ``quality`` column of ``predictions.csv``, the overlay
caption, ``--strict``) and by the exported SavedModels (:mod:`drkeras.export`: the signatures'
``fov_fraction`` and ``quality`` outputs), so a serving client can refuse an image the same way.

Flags (:data:`FLAGS`, in this order; ``quality`` is ``"ok"`` or the flags joined by ``";"``):

- ``truncated``: the encoded file ends without its end marker (JPEG ``FF D9`` end-of-image, PNG
  ``IEND`` chunk) in its last :data:`TAIL_BYTES` bytes: a cut-off download, which decoders fill
  with grey or repeat rows instead of failing;
- ``bit_depth_converted``: a 16-bit PNG (or TIFF with more than 8 bits per sample) reduced to the
  8 bits the networks take;
- ``too_small``: the short side is below :data:`MIN_SIDE` pixels;
- ``no_fov``: less than :data:`MIN_FOV_FRACTION` of the pixels are in the field of view that the
  preprocessing's detector finds (:func:`drkeras.data.preprocess.fov_fraction`; 0 for a black
  frame);
- ``uniform``: the grey levels' standard deviation is below :data:`MIN_STD` (a blank, flat frame);
- ``no_colour``: the mean spread ``max(R, G, B) - min(R, G, B)`` is below
  :data:`MIN_COLOUR_SPREAD` grey levels (a grayscale file, or channels equal).

The first two need the encoded file (:func:`encoded_flags`; JPEG and PNG in the graph, plus TIFF
bit depths in :func:`assess`); the other four need only the decoded pixels (:func:`pixel_flags`).
Everything but the TIFF header check is plain TensorFlow, so it runs eagerly and inside a
serving signature.

Measured on real photographs (tests/fixtures/idrid_mini, scikit-image's retina.jpg): field of view
0.69-0.77 of the frame, grey-level standard deviation 28-51, colour spread 90-114; an all-black
frame has 0, 0 and 0.

Example::

    >>> import numpy as np
    >>> assess(None, np.zeros((600, 800, 3), np.uint8)).flags
    ['no_fov', 'uniform', 'no_colour']
"""

from __future__ import annotations

import dataclasses
import io
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import tensorflow as tf

from drkeras.data import preprocess

__all__ = [
    "ENCODED_FLAGS",
    "FLAGS",
    "FLAG_TEXT",
    "MIN_COLOUR_SPREAD",
    "MIN_FOV_FRACTION",
    "MIN_SIDE",
    "MIN_STD",
    "OK",
    "PIXEL_FLAGS",
    "Assessment",
    "assess",
    "describe",
    "encoded_flags",
    "join_flags",
    "pixel_flags",
    "pixel_measures",
    "thresholds",
]

OK = "ok"
SEPARATOR = ";"
ENCODED_FLAGS = ("truncated", "bit_depth_converted")
PIXEL_FLAGS = ("too_small", "no_fov", "uniform", "no_colour")
FLAGS = ENCODED_FLAGS + PIXEL_FLAGS
FLAG_TEXT = {
    "truncated": "truncated or corrupt file (no end marker)",
    "bit_depth_converted": "more than 8 bits per sample, converted to 8",
    "too_small": "image smaller than the minimum",
    "no_fov": "no field of view found",
    "uniform": "nearly uniform image",
    "no_colour": "no colour (grayscale or channels equal)",
}

# The short side below which a photograph is too small to grade (lesions of a few pixels at
# 1000-4000 px vanish long before this; the networks' inputs are 224-1024 px).
MIN_SIDE = 128
# Fraction of the frame in the detected field of view (real photographs: 0.55-0.8).
MIN_FOV_FRACTION = 0.1
# Standard deviation of the grey levels (0-255; real photographs: 28-51).
MIN_STD = 3.0
# Mean of max(R, G, B) - min(R, G, B) over the frame (0-255; real photographs: 90-114).
MIN_COLOUR_SPREAD = 2.0
# The end marker must lie within this many bytes of the end (some writers pad after it).
TAIL_BYTES = 16

_JPEG_MAGIC = (0xFF, 0xD8, 0xFF)
_PNG_MAGIC = (0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A)
_IEND = tuple(b"IEND")
_IHDR = tuple(b"IHDR")
_HEAD_BYTES = 32


def thresholds() -> Dict[str, float]:
    """The thresholds in force (recorded in export metadata and documented in README)."""
    return {
        "min_side": MIN_SIDE,
        "min_fov_fraction": MIN_FOV_FRACTION,
        "min_std": MIN_STD,
        "min_colour_spread": MIN_COLOUR_SPREAD,
        "tail_bytes": TAIL_BYTES,
    }


# --------------------------------------------------------------------------------------------
# Pixels


def pixel_measures(image) -> Dict[str, tf.Tensor]:
    """What :func:`pixel_flags` judges, from a decoded photograph.

    Args:
        image: ``[H, W, 3]`` uint8 (or float in [0, 255]) RGB.

    Returns:
        float32 scalars: ``height``, ``width``, ``fov_fraction`` (share of the pixels in the
        field of view), ``intensity_std`` (standard deviation of the mean of the channels) and
        ``colour_spread`` (mean of ``max - min`` over the channels).

    Example::

        >>> import numpy as np
        >>> m = pixel_measures(np.full((4, 6, 3), 90, np.uint8))
        >>> [float(m[k]) for k in ("height", "width", "fov_fraction", "intensity_std")]
        [4.0, 6.0, 1.0, 0.0]
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    pixels = tf.cast(image, tf.float32)
    high = tf.reduce_max(pixels, axis=-1)
    low = tf.reduce_min(pixels, axis=-1)
    grey = tf.reduce_mean(pixels, axis=-1)
    empty = tf.equal(tf.size(grey), 0)

    def stat(fn, values):
        return tf.cond(empty, lambda: tf.constant(0.0), lambda: fn(values))

    return {
        "height": tf.cast(shape[0], tf.float32),
        "width": tf.cast(shape[1], tf.float32),
        "fov_fraction": stat(preprocess.fov_fraction, image),
        "intensity_std": stat(tf.math.reduce_std, grey),
        "colour_spread": stat(tf.reduce_mean, high - low),
    }


def pixel_flags(measures: Mapping[str, tf.Tensor]) -> tf.Tensor:
    """bool ``[4]``: :data:`PIXEL_FLAGS` (``too_small``, ``no_fov``, ``uniform``, ``no_colour``)
    from :func:`pixel_measures`."""
    short = tf.minimum(measures["height"], measures["width"])
    return tf.stack(
        [
            short < MIN_SIDE,
            measures["fov_fraction"] < MIN_FOV_FRACTION,
            measures["intensity_std"] < MIN_STD,
            measures["colour_spread"] < MIN_COLOUR_SPREAD,
        ]
    )


# --------------------------------------------------------------------------------------------
# Encoded bytes


def _bytes_at(encoded: tf.Tensor, pos: tf.Tensor, length: int) -> tf.Tensor:
    """int32 ``[length]``: ``length`` bytes of ``encoded`` from ``pos``, zero-padded at the end."""
    part = tf.io.decode_raw(tf.strings.substr(encoded, pos, length), tf.uint8)
    part = tf.cast(part, tf.int32)
    return tf.concat([part, tf.zeros([length], tf.int32)], axis=0)[:length]


def _starts_with(values: tf.Tensor, magic: Sequence[int]) -> tf.Tensor:
    return tf.reduce_all(tf.equal(values[: len(magic)], tf.constant(magic, tf.int32)))


def _contains(values: tf.Tensor, pattern: Sequence[int]) -> tf.Tensor:
    n = len(pattern)
    windows = tf.stack([values[i : TAIL_BYTES - n + 1 + i] for i in range(n)], axis=1)
    return tf.reduce_any(tf.reduce_all(tf.equal(windows, tf.constant(pattern, tf.int32)), axis=1))


def encoded_flags(encoded) -> tf.Tensor:
    """bool ``[2]``: :data:`ENCODED_FLAGS` (``truncated``, ``bit_depth_converted``) of one encoded
    JPEG or PNG file, read from its first 32 and last :data:`TAIL_BYTES` bytes only (other
    formats: both ``False``).

    Args:
        encoded: a scalar string (the file's bytes).

    Example::

        >>> import cv2, numpy as np
        >>> jpeg = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))[1].tobytes()
        >>> encoded_flags(jpeg).numpy().tolist(), encoded_flags(jpeg[:-2]).numpy().tolist()
        ([False, False], [True, False])
    """
    encoded = tf.convert_to_tensor(encoded, tf.string)
    size = tf.strings.length(encoded)
    head = _bytes_at(encoded, 0, _HEAD_BYTES)
    # pos clamped to 0: a file shorter than the tail is read whole (then zero-padded at the end)
    tail_pos = tf.maximum(size - TAIL_BYTES, 0)
    tail = _bytes_at(encoded, tail_pos, TAIL_BYTES)
    is_jpeg = tf.logical_and(size >= len(_JPEG_MAGIC), _starts_with(head, _JPEG_MAGIC))
    is_png = tf.logical_and(size >= len(_PNG_MAGIC), _starts_with(head, _PNG_MAGIC))
    truncated = tf.logical_or(
        tf.logical_and(is_jpeg, tf.logical_not(_contains(tail, (0xFF, 0xD9)))),
        tf.logical_and(is_png, tf.logical_not(_contains(tail, _IEND))),
    )
    # PNG: signature (8), IHDR length (4), "IHDR" (4), width (4), height (4), bit depth (1)
    has_ihdr = tf.reduce_all(tf.equal(head[12:16], tf.constant(_IHDR, tf.int32)))
    deep_png = tf.logical_and(tf.logical_and(is_png, has_ihdr), head[24] > 8)
    return tf.stack([truncated, deep_png])


def _deep_tiff(data: bytes) -> bool:
    """A TIFF with more than 8 bits per sample (header only; TensorFlow cannot decode TIFF)."""
    if not data.startswith((b"II*\x00", b"MM\x00*")):
        return False
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            bits = img.tag_v2.get(258, (8,))
            bits = bits if isinstance(bits, tuple) else (bits,)
            return img.mode in ("I", "F") or img.mode.startswith("I;16") or max(bits) > 8
    except Exception:  # the decoder reports an unreadable file; this only reads a header
        return False


# --------------------------------------------------------------------------------------------
# Flags as text


def join_flags(flags, names: Sequence[str]) -> tf.Tensor:
    """A scalar string: ``"ok"`` when no flag is set, else the set ``names`` joined by ``";"``
    (graph version of ``";".join(...)``, as the export's ``quality`` output)."""
    chosen = tf.boolean_mask(tf.constant(list(names)), flags)
    joined = tf.strings.reduce_join(chosen, separator=SEPARATOR)
    return tf.where(tf.size(chosen) > 0, joined, tf.constant(OK))


@dataclasses.dataclass
class Assessment:
    """The quality of one photograph: its flags (in :data:`FLAGS` order) and measures."""

    flags: List[str]
    measures: Dict[str, float]

    @property
    def ok(self) -> bool:
        return not self.flags

    @property
    def text(self) -> str:
        """``"ok"`` or the flags joined by ``";"`` (the ``quality`` column)."""
        return SEPARATOR.join(self.flags) if self.flags else OK


def assess(data: Optional[bytes], image: np.ndarray) -> Assessment:
    """Every flag of one photograph: :func:`encoded_flags` of its file's bytes (``None``: not
    known, no encoded flag), TIFF bit depth, and :func:`pixel_flags` of the decoded pixels.

    Args:
        data: the file's bytes, or ``None``.
        image: the decoded ``[H, W, 3]`` uint8 RGB photograph.

    Returns:
        An :class:`Assessment`.
    """
    measures = {k: float(v) for k, v in pixel_measures(image).items()}
    set_flags = dict(zip(PIXEL_FLAGS, (bool(v) for v in pixel_flags(measures).numpy())))
    if data is not None:
        truncated, deep = (bool(v) for v in encoded_flags(tf.constant(data)).numpy())
        set_flags["truncated"] = truncated
        set_flags["bit_depth_converted"] = deep or _deep_tiff(data)
    return Assessment([f for f in FLAGS if set_flags.get(f)], measures)


def describe(assessment: Assessment) -> str:
    """A sentence for people (skipped.csv, logs): each flag with the measure behind it.

    Example::

        >>> import numpy as np
        >>> describe(assess(None, np.zeros((4, 4, 3), np.uint8)))  # doctest: +ELLIPSIS
        'image smaller than the minimum (4 x 4 px, short side below 128); no field of view ...'
    """
    m = assessment.measures
    detail = {
        "too_small": f"{m['width']:.0f} x {m['height']:.0f} px, short side below {MIN_SIDE}",
        "no_fov": f"{m['fov_fraction']:.1%} of the image in it, minimum {MIN_FOV_FRACTION:.0%}",
        "uniform": f"grey-level std {m['intensity_std']:.2f}, minimum {MIN_STD}",
        "no_colour": f"colour spread {m['colour_spread']:.2f}, minimum {MIN_COLOUR_SPREAD}",
    }
    parts = [FLAG_TEXT[f] + (f" ({detail[f]})" if f in detail else "") for f in assessment.flags]
    return "; ".join(parts) if parts else OK
