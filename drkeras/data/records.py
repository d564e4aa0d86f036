"""The one TFRecord schema shared by every dataset (docs/design.md section 3, "Records").

Each example holds:

- ``id``, ``dataset``, ``split``: strings (``split`` is one of ``keys.SPLITS``);
- ``image``: the encoded photograph (JPEG or PNG bytes; original bytes are kept when the
  converter did not have to re-encode);
- ``masks``: five encoded single-channel PNGs in the order ``keys.LESIONS`` (MA, HE, EX, SE, OD),
  lesion pixels stored as 255 so the files are viewable; an empty string stands for an all-zero
  mask, which saves decoding time on the many images without some lesion type;
- ``mask_present``: one flag per lesion type; ``False`` means the type is not annotated for this
  image, which is not the same as an annotated but empty mask;
- ``grade`` (ICDRS 0-4, Messidor 0-3, -1 unknown) and ``dme`` (risk of macular oedema 0-2,
  -1 unknown).

Shards are named ``{split}-{k:05d}.tfrecord`` and written under a temporary name first, so a
reader never sees a half-written file. Each converted folder also holds ``manifest.json``
(written by ``data_prep``).

Example::

    >>> import numpy as np
    >>> blob = encode_example(id="x-train-1", dataset="x", split="train",
    ...                       image=np.zeros((8, 8, 3), np.uint8), masks=None,
    ...                       mask_present=[False] * 5, lossless=True)
    >>> ex = parse_example(blob)
    >>> ex["image"].shape.as_list(), ex["masks"].shape.as_list(), int(ex["grade"])
    ([8, 8, 3], [8, 8, 5], -1)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re
import signal
import threading
from typing import Callable, Optional, Sequence, Union

import numpy as np
import tensorflow as tf
from PIL import Image

from drkeras import keys

__all__ = [
    "LABEL_FIELDS",
    "MANIFEST",
    "UNREADABLE_RECORD",
    "ShardWriter",
    "decode_mask",
    "encode_example",
    "image_size_of",
    "list_shards",
    "parse_example",
    "parse_labels",
    "read_manifest",
    "records_dataset",
    "terminate_as_exception",
]

MANIFEST = "manifest.json"
JPEG_QUALITY = 95
MAX_DME = 2
_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-(?P<index>\d{5})\.tfrecord$")
_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

PathLike = Union[str, os.PathLike]


# --------------------------------------------------------------------------------------------
# Writing


def image_size_of(encoded: bytes) -> tuple:
    """``(height, width)`` of encoded JPEG/PNG bytes, read from the header only.

    Raises ``ValueError`` when the bytes are neither JPEG nor PNG.

    Example::

        >>> import cv2, numpy as np
        >>> image_size_of(cv2.imencode(".png", np.zeros((3, 5), np.uint8))[1].tobytes())
        (3, 5)
    """
    if not (encoded.startswith(_JPEG_MAGIC) or encoded.startswith(_PNG_MAGIC)):
        raise ValueError(
            f"encoded image must be JPEG or PNG bytes, got bytes starting with {encoded[:8]!r}"
        )
    with Image.open(io.BytesIO(encoded)) as img:
        width, height = img.size
    return height, width


# Pillow, not OpenCV, encodes: converters call this in forked worker processes, and OpenCV's
# thread pool inherited through fork can deadlock the child.
def _encode_rgb(image: np.ndarray, lossless: bool) -> bytes:
    buf = io.BytesIO()
    if lossless:
        Image.fromarray(image, "RGB").save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(image, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _encode_mask(channel: np.ndarray) -> bytes:
    if not channel.any():
        return b""
    buf = io.BytesIO()
    Image.fromarray(np.where(channel > 0, 255, 0).astype(np.uint8), "L").save(
        buf, format="PNG", compress_level=1
    )
    return buf.getvalue()


def _check_label(name: str, value, low: int, high: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be in [{low}, {high}] (-1 = unknown), got {value}")
    return int(value)


def _bytes_feature(values: Sequence[bytes]) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _int_feature(values: Sequence[int]) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in values]))


def encode_example(
    *,
    id: str,
    dataset: str,
    split: str,
    image: Union[np.ndarray, bytes],
    masks: Optional[np.ndarray],
    mask_present: Sequence[bool],
    grade: int = keys.UNKNOWN,
    dme: int = keys.UNKNOWN,
    lossless: bool = False,
) -> bytes:
    """Serialise one example of the record schema (docs/design.md section 3) as a
    ``tf.train.Example``.

    Args:
        id: unique example id, e.g. ``"idrid-grading-test-IDRiD_001"``.
        dataset: source dataset name (``"idrid"``, ``"messidor"``, ...); evaluation uses it to
            interpret grades (Messidor grades are 0-3).
        split: one of ``keys.SPLITS``.
        image: uint8 ``HxWx3`` RGB array (encoded as JPEG quality 95, or PNG when ``lossless``),
            or already-encoded JPEG/PNG bytes, stored unchanged.
        masks: uint8 (or bool) ``HxWx5`` array with values {0, 1} in the order ``keys.LESIONS``,
            the same ``HxW`` as the image; ``None`` means all zero. Each channel is stored as
            its own lossless PNG.
        mask_present: five flags; ``False`` = that lesion type is not annotated for this image
            (its channel must then be empty).
        grade: DR grade (ICDRS 0-4; Messidor 0-3), -1 = unknown.
        dme: risk of macular oedema 0-2, -1 = unknown.
        lossless: encode an array image as PNG instead of JPEG.

    Returns:
        The serialised example.

    Raises:
        ValueError: on a wrong shape, dtype, value range or split, naming what was expected.

    Example::

        >>> import numpy as np
        >>> masks = np.zeros((4, 6, 5), np.uint8); masks[1, 2, 1] = 1
        >>> blob = encode_example(id="a", dataset="idrid", split="train",
        ...                       image=np.full((4, 6, 3), 90, np.uint8), masks=masks,
        ...                       mask_present=[True, True, True, False, True], grade=2)
        >>> int(parse_example(blob)["masks"][1, 2, 1])
        1
    """
    for name, value in (("id", id), ("dataset", dataset)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string, got {value!r}")
    if split not in keys.SPLITS:
        raise ValueError(f"split must be one of {keys.SPLITS}, got {split!r}")
    grade = _check_label("grade", grade, keys.UNKNOWN, keys.NUM_GRADES - 1)
    dme = _check_label("dme", dme, keys.UNKNOWN, MAX_DME)

    present = [bool(p) for p in mask_present]
    if len(present) != keys.NUM_LESIONS:
        raise ValueError(
            f"mask_present must have {keys.NUM_LESIONS} flags (one per {keys.LESIONS}), "
            f"got {len(present)}"
        )

    if isinstance(image, (bytes, bytearray, memoryview)):
        encoded_image = bytes(image)
        height, width = image_size_of(encoded_image)
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(
                f"image must be a uint8 HxWx3 RGB array, got dtype {image.dtype} "
                f"shape {image.shape}"
            )
        height, width = image.shape[:2]
        if height == 0 or width == 0:
            raise ValueError(f"image must not be empty, got shape {image.shape}")
        encoded_image = _encode_rgb(image, lossless)
    else:
        raise ValueError(
            f"image must be a uint8 HxWx3 array or JPEG/PNG bytes, got {type(image).__name__}"
        )

    expected = (height, width, keys.NUM_LESIONS)
    if masks is None:
        encoded_masks = [b""] * keys.NUM_LESIONS
    else:
        masks = np.asarray(masks)
        if masks.dtype not in (np.uint8, np.bool_) or masks.shape != expected:
            raise ValueError(
                f"masks must be a uint8 array of shape {expected} (image HxW, one channel per "
                f"lesion {keys.LESIONS}), got dtype {masks.dtype} shape {masks.shape}"
            )
        if masks.dtype == np.uint8 and masks.max(initial=0) > 1:
            raise ValueError(
                f"masks must hold values {{0, 1}}, got values up to {int(masks.max())}"
            )
        encoded_masks = []
        for i, lesion in enumerate(keys.LESIONS):
            channel = masks[..., i]
            if not present[i] and channel.any():
                raise ValueError(
                    f"mask channel {lesion} has lesion pixels but mask_present[{i}] is False"
                )
            encoded_masks.append(_encode_mask(channel))

    features = {
        keys.ID: _bytes_feature([id.encode()]),
        keys.DATASET: _bytes_feature([dataset.encode()]),
        keys.SPLIT: _bytes_feature([split.encode()]),
        keys.IMAGE: _bytes_feature([encoded_image]),
        keys.MASKS: _bytes_feature(encoded_masks),
        keys.MASK_PRESENT: _int_feature(present),
        keys.GRADE: _int_feature([grade]),
        keys.DME: _int_feature([dme]),
    }
    example = tf.train.Example(features=tf.train.Features(feature=features))
    return example.SerializeToString()


# --------------------------------------------------------------------------------------------
# Parsing

_FEATURES = {
    keys.ID: tf.io.FixedLenFeature([], tf.string),
    keys.DATASET: tf.io.FixedLenFeature([], tf.string),
    keys.SPLIT: tf.io.FixedLenFeature([], tf.string),
    keys.IMAGE: tf.io.FixedLenFeature([], tf.string),
    keys.MASKS: tf.io.FixedLenFeature([keys.NUM_LESIONS], tf.string),
    keys.MASK_PRESENT: tf.io.FixedLenFeature([keys.NUM_LESIONS], tf.int64),
    keys.GRADE: tf.io.FixedLenFeature([], tf.int64, default_value=keys.UNKNOWN),
    keys.DME: tf.io.FixedLenFeature([], tf.int64, default_value=keys.UNKNOWN),
}


# The light fields: everything but the encoded image and masks.
LABEL_FIELDS = (keys.ID, keys.DATASET, keys.SPLIT, keys.GRADE, keys.DME, keys.MASK_PRESENT)
# Scale factors libjpeg decodes to directly in the DCT domain (tf.io.decode_jpeg's ``ratio``).
_JPEG_RATIOS = (2, 4, 8)


def _typed(parsed: dict) -> dict:
    """Parsed features in the types :func:`parse_example` promises, the labels checked: a record
    written by another tool (or damaged) with a grade, DME risk or mask flag out of the schema's
    range raises ``InvalidArgumentError`` naming the field, the range and the record's id,
    instead of reaching a metric as an index out of range."""
    checks = []
    for name, low, high in (
        (keys.GRADE, keys.UNKNOWN, keys.NUM_GRADES - 1),
        (keys.DME, keys.UNKNOWN, MAX_DME),
        (keys.MASK_PRESENT, 0, 1),
    ):
        if name not in parsed:
            continue
        value = parsed[name]
        ok = tf.reduce_all(tf.logical_and(value >= low, value <= high))
        checks.append(
            tf.debugging.Assert(
                ok,
                [
                    f"record field '{name}' must be in [{low}, {high}]"
                    + (" (-1 = unknown)" if low < 0 else "")
                    + "; record id and value:",
                    # a damaged id may not be UTF-8: TensorFlow could not build the message
                    tf.strings.unicode_transcode(
                        parsed.get(keys.ID, tf.constant("?")), "UTF-8", "UTF-8", errors="replace"
                    ),
                    value,
                ],
            )
        )
    casts = {keys.GRADE: tf.int32, keys.DME: tf.int32, keys.MASK_PRESENT: tf.bool}
    with tf.control_dependencies(checks):
        return {
            name: tf.cast(v, casts[name]) if name in casts else tf.identity(v)
            for name, v in parsed.items()
        }


UNREADABLE_RECORD = (
    "a record cannot be parsed: its bytes are corrupted (TensorFlow quoted them in its error "
    "message and could not decode that message as UTF-8); expected a complete tf.train.Example "
    "of the drkeras schema"
)


def _eager_errors(parse: Callable[[], dict]) -> dict:
    """``parse()``, with the error TensorFlow cannot build turned into the one it meant.

    Some TensorFlow parse errors quote the record's raw bytes; when those are not UTF-8, Python
    fails while decoding the message and raises ``UnicodeDecodeError`` instead of the
    ``InvalidArgumentError``. Eagerly, this raises ``InvalidArgumentError`` with
    :data:`UNREADABLE_RECORD`; inside ``tf.data`` the error surfaces at the iterator, where the
    caller (``drkeras.evaluate``) names the shard and record.
    """
    if not tf.executing_eagerly():
        return parse()
    try:
        return parse()
    except UnicodeDecodeError:
        raise tf.errors.InvalidArgumentError(None, None, UNREADABLE_RECORD) from None


def parse_labels(serialized: tf.Tensor) -> dict:
    """The light fields of one record, without decoding the image or the masks.

    What the pipelines filter on (ids, labels, which lesion types are annotated) before they
    pay for any decoding. Works eagerly and in ``Dataset.map``.

    Args:
        serialized: a scalar string tensor (one record).

    Returns:
        ``{keys.ID / keys.DATASET / keys.SPLIT: tf.string, keys.GRADE: int32, keys.DME: int32,
        keys.MASK_PRESENT: bool [5]}``, typed as in :func:`parse_example`.

    Example::

        >>> blob = encode_example(id="x-train-1", dataset="x", split="train", grade=2,
        ...                       image=np.zeros((8, 8, 3), np.uint8), masks=None,
        ...                       mask_present=[False] * 5, lossless=True)
        >>> int(parse_labels(blob)["grade"])
        2
    """
    return _eager_errors(
        lambda: _typed(
            tf.io.parse_single_example(serialized, {name: _FEATURES[name] for name in LABEL_FIELDS})
        )
    )


def _decode_reduced(encoded: tf.Tensor, min_side: int) -> tf.Tensor:
    """Decode a JPEG scaled down by the largest of 2, 4, 8 that keeps its short side at least
    ``min_side`` pixels; other formats (PNG) are decoded at full size."""

    def jpeg():
        shape = tf.io.extract_jpeg_shape(encoded)
        short = tf.minimum(shape[0], shape[1])
        # ceil(short / r) >= min_side whenever short >= r * min_side; the ratios are increasing
        index = tf.add_n([tf.cast(short >= r * min_side, tf.int32) for r in _JPEG_RATIOS])
        branches = [
            lambda r=r: tf.io.decode_jpeg(encoded, channels=3, ratio=r) for r in (1,) + _JPEG_RATIOS
        ]
        return tf.switch_case(index, branches)

    def other():
        return tf.io.decode_image(encoded, channels=3, expand_animations=False)

    is_jpeg = tf.equal(tf.strings.substr(encoded, 0, len(_JPEG_MAGIC)), _JPEG_MAGIC)
    return tf.cond(is_jpeg, jpeg, other)


def decode_mask(encoded: tf.Tensor, height, width) -> tf.Tensor:
    """One lesion channel of a record as uint8 ``[height, width]`` in {0, 1}.

    An empty string (how records store an all-zero channel) gives zeros without decoding
    anything; a PNG whose size is not ``height x width`` (the photograph's) raises an
    ``InvalidArgumentError`` naming both sizes.

    Args:
        encoded: scalar string, one element of a record's encoded masks (see
            :func:`parse_example` with ``masks="encoded"``).
        height, width: the photograph's size.

    Example::

        >>> decode_mask(tf.constant(b""), 2, 3).numpy().tolist()
        [[0, 0, 0], [0, 0, 0]]
    """

    def decode():
        mask = tf.io.decode_png(encoded, channels=1)[..., 0]
        check = tf.debugging.assert_equal(
            tf.shape(mask),
            tf.cast(tf.stack([height, width]), tf.int32),
            message="a record's mask PNG must have its photograph's height and width",
        )
        with tf.control_dependencies([check]):
            # stored as 0/255 for viewing; the schema promises {0, 1}
            return tf.minimum(mask, 1)

    return tf.cond(
        tf.strings.length(encoded) > 0,
        decode,
        lambda: tf.zeros(tf.stack([height, width]), tf.uint8),
    )


def _decode_masks(encoded: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """``[H, W, 5]`` uint8 in {0, 1} from the five encoded channels of a record.

    Empty channels are never decoded; when every channel is empty (every image of a grading
    dataset) the result is one block of zeros, with no per-channel work at all: stacking five
    full-size channels costs several times the JPEG's decoding.
    """
    return tf.cond(
        tf.reduce_any(tf.strings.length(encoded) > 0),
        lambda: tf.stack(
            [decode_mask(encoded[i], height, width) for i in range(keys.NUM_LESIONS)], axis=-1
        ),
        lambda: tf.zeros(tf.stack([height, width, keys.NUM_LESIONS]), tf.uint8),
    )


def parse_example(
    serialized: tf.Tensor,
    *,
    masks: Union[bool, str] = True,
    min_side: Optional[int] = None,
) -> dict:
    """Decode one serialised example into a dict of tensors; works eagerly and in ``Dataset.map``.

    Args:
        serialized: a scalar string tensor (one record).
        masks: ``True``: decode the lesion masks (``[H, W, 5]``); ``False``: leave
            ``keys.MASKS`` out (grading pipelines never pay for them); ``"encoded"``: return
            the five encoded channels (string ``[5]``, empty = all zero) for callers that
            decode, crop and resize channel by channel with :func:`decode_mask`, without ever
            holding five full-size channels.
        min_side: decode JPEG photographs already scaled down by 2, 4 or 8 (libjpeg's
            DCT-domain scaling, several times faster than a full decode of a 4288 x 2848
            photograph) as long as the short side stays at least ``min_side`` pixels; ``None``
            decodes the full size. Needs ``masks=False``: masks are stored at full size.

    Returns:
        ``{keys.IMAGE: uint8 [H, W, 3], keys.MASKS: uint8 [H, W, 5] in {0, 1} (order
        keys.LESIONS), keys.MASK_PRESENT: bool [5], keys.GRADE: int32, keys.DME: int32,
        keys.ID / keys.DATASET / keys.SPLIT: tf.string}``.

    Raises:
        tf.errors.InvalidArgumentError: the record is not a tf.train.Example of the schema (a
            field missing, bytes corrupted: eagerly :data:`UNREADABLE_RECORD` when TensorFlow's
            own message cannot be decoded), the image or a mask does not decode, a mask's size
            differs from the image's, or a label is out of range (the message names the field,
            the range and the record's id). In ``Dataset.map`` these surface at the iterator,
            the corrupted-bytes case as ``UnicodeDecodeError`` (``drkeras.evaluate`` catches
            both and names the shard and the record's position).

    Example::

        >>> ds = tf.data.TFRecordDataset(list_shards("records/idrid", "train"))  # doctest: +SKIP
        >>> ds = ds.map(parse_example)  # doctest: +SKIP
    """
    if masks not in (True, False, "encoded"):
        raise ValueError(f"parse_example: masks must be True, False or 'encoded', got {masks!r}")
    if masks is not False and min_side is not None:
        raise ValueError(
            "parse_example: min_side (reduced JPEG decoding) needs masks=False, because the "
            "masks are stored at the photograph's full size"
        )
    return _eager_errors(lambda: _parse_example(serialized, masks, min_side))


def _parse_example(serialized: tf.Tensor, masks: Union[bool, str], min_side: Optional[int]):
    spec = {name: _FEATURES[name] for name in LABEL_FIELDS + (keys.IMAGE,)}
    if masks is not False:
        spec[keys.MASKS] = _FEATURES[keys.MASKS]
    parsed = tf.io.parse_single_example(serialized, spec)
    if min_side is None:
        image = tf.io.decode_image(parsed[keys.IMAGE], channels=3, expand_animations=False)
    else:
        image = _decode_reduced(parsed[keys.IMAGE], int(min_side))
    image = tf.ensure_shape(image, [None, None, 3])
    out = _typed({name: parsed[name] for name in LABEL_FIELDS})
    out[keys.IMAGE] = image
    if masks == "encoded":
        out[keys.MASKS] = parsed[keys.MASKS]
    elif masks:
        height, width = tf.shape(image)[0], tf.shape(image)[1]
        out[keys.MASKS] = tf.ensure_shape(
            _decode_masks(parsed[keys.MASKS], height, width), [None, None, keys.NUM_LESIONS]
        )
    return out


# --------------------------------------------------------------------------------------------
# Shards

_term_lock = threading.Lock()
_term_depth = 0
_term_previous = None


class Terminated(SystemExit):
    """Raised in the main thread when the process receives SIGTERM inside
    :func:`terminate_as_exception`, so ``finally`` blocks and context managers clean up."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


@contextlib.contextmanager
def terminate_as_exception():
    """Turn SIGTERM into a :class:`Terminated` exception while the block runs (main thread only).

    Python's default SIGTERM action kills the process without running ``finally`` blocks, which
    would leave temporary shard files behind. Re-entrant: nested uses install the handler once.

    Example::

        >>> with terminate_as_exception():
        ...     pass
    """
    global _term_depth, _term_previous
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    with _term_lock:
        if _term_depth == 0:
            _term_previous = signal.signal(signal.SIGTERM, _raise_terminated)
        _term_depth += 1
    try:
        yield
    finally:
        with _term_lock:
            _term_depth -= 1
            if _term_depth == 0:
                signal.signal(signal.SIGTERM, _term_previous)
                _term_previous = None


class ShardWriter:
    """Write serialised examples of one split into ``{split}-{k:05d}.tfrecord`` shards.

    Each shard is written as ``<name>.tmp`` and renamed once it holds ``examples_per_shard``
    examples (or when the writer closes). If the ``with`` block ends with an exception
    (including ``KeyboardInterrupt`` and SIGTERM, which the writer turns into an exception while
    open) the temporary file *and the shards this writer completed* are deleted: a split that was
    not written to the end leaves nothing behind.

    Args:
        out_dir: folder of the converted dataset (created if needed).
        split: one of ``keys.SPLITS``.
        examples_per_shard: examples per shard file.

    Attributes:
        shards: file names (not paths) of the completed shards, in order.
        count: examples written so far.

    Example::

        >>> with ShardWriter("records/x", "train", examples_per_shard=2) as writer:
        ...     writer.write(blob)  # doctest: +SKIP
    """

    def __init__(self, out_dir: PathLike, split: str, *, examples_per_shard: int = 256):
        if split not in keys.SPLITS:
            raise ValueError(f"split must be one of {keys.SPLITS}, got {split!r}")
        if int(examples_per_shard) < 1:
            raise ValueError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
        self.out_dir = pathlib.Path(out_dir)
        self.split = split
        self.examples_per_shard = int(examples_per_shard)
        self.shards = []
        self.count = 0
        self._writer = None
        self._tmp_path = None
        self._in_shard = 0
        self._closed = False
        self._term = None

    def __enter__(self) -> ShardWriter:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self._term = terminate_as_exception()
        self._term.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.close()
            else:
                self.abort()
        finally:
            term, self._term = self._term, None
            if term is not None:
                term.__exit__(None, None, None)

    def _shard_name(self, index: int) -> str:
        return f"{self.split}-{index:05d}.tfrecord"

    def write(self, serialized: bytes) -> None:
        """Append one serialised example, starting a new shard when the current one is full."""
        if self._closed:
            raise RuntimeError(f"ShardWriter for split {self.split!r} is already closed")
        if self._writer is None:
            name = self._shard_name(len(self.shards))
            self._tmp_path = self.out_dir / (name + ".tmp")
            self._writer = tf.io.TFRecordWriter(str(self._tmp_path))
            self._in_shard = 0
        self._writer.write(serialized)
        self._in_shard += 1
        self.count += 1
        if self._in_shard >= self.examples_per_shard:
            self._finish_shard()

    def _finish_shard(self) -> None:
        self._writer.close()
        self._writer = None
        final = self.out_dir / self._shard_name(len(self.shards))
        os.replace(self._tmp_path, final)
        self._tmp_path = None
        self.shards.append(final.name)

    def close(self) -> None:
        """Complete the current shard (rename it to its final name)."""
        if self._closed:
            return
        if self._writer is not None:
            self._finish_shard()
        self._closed = True

    def abort(self) -> None:
        """Delete the temporary shard and every shard this writer completed."""
        self._closed = True
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.close()
            self._writer = None
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
            self._tmp_path = None
        for name in self.shards:
            (self.out_dir / name).unlink(missing_ok=True)
        self.shards = []


# --------------------------------------------------------------------------------------------
# Reading


def _splits_found(records_dir: pathlib.Path) -> list:
    found = set()
    for path in records_dir.iterdir():
        match = _SHARD_RE.match(path.name)
        if match:
            found.add(match.group("split"))
    return sorted(found)


def list_shards(records_dir: PathLike, split: str) -> list:
    """Sorted paths (strings) of the complete shards of ``split`` in ``records_dir``.

    Raises:
        FileNotFoundError: when the folder does not exist or holds no shard of ``split``; the
            message names the folder and the splits it does hold.

    Example::

        >>> list_shards("records/idrid", "train")  # doctest: +SKIP
        ['records/idrid/train-00000.tfrecord']
    """
    folder = pathlib.Path(records_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"records folder {folder} does not exist")
    shards = sorted(
        str(p)
        for p in folder.iterdir()
        if (m := _SHARD_RE.match(p.name)) is not None and m.group("split") == split
    )
    if not shards:
        found = _splits_found(folder)
        raise FileNotFoundError(
            f"no {split}-NNNNN.tfrecord shards in {folder} (splits found there: "
            f"{', '.join(found) if found else 'none'})"
        )
    return shards


def read_manifest(records_dir: PathLike) -> dict:
    """The ``manifest.json`` written by the converter of ``records_dir``.

    Raises ``FileNotFoundError`` naming the expected file when it is missing.

    Example::

        >>> read_manifest("records/idrid")["counts"]  # doctest: +SKIP
        {'train': 54, 'test': 27}
    """
    path = pathlib.Path(records_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {records_dir} is not a converted dataset (run "
            f"`python -m data_prep <dataset> --src RAW --out {records_dir}` first)"
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def records_dataset(
    records_dir: PathLike,
    split: str,
    *,
    deterministic: bool = True,
    shuffle_shards: bool = False,
    seed: Optional[int] = None,
    cycle_length: int = 4,
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of parsed examples (see :func:`parse_example`) of one split.

    Shards are read interleaved (``cycle_length`` at a time) and parsed with
    ``num_parallel_calls=tf.data.AUTOTUNE``.

    Args:
        records_dir: a folder written by ``python -m data_prep``.
        split: one of ``keys.SPLITS``.
        deterministic: the same element order on every run despite parallel reading (shards
            are interleaved element by element; ``cycle_length=1`` reads them one after the
            other, in the order they were written).
        shuffle_shards: shuffle the shard order (each epoch) before interleaving.
        seed: seed of the shard shuffle.
        cycle_length: shards read concurrently.

    Example::

        >>> ds = records_dataset("records/idrid", "train")  # doctest: +SKIP
        >>> next(iter(ds))["masks"].shape  # doctest: +SKIP
        TensorShape([2848, 4288, 5])
    """
    shards = list_shards(records_dir, split)
    files = tf.data.Dataset.from_tensor_slices(shards)
    if shuffle_shards:
        files = files.shuffle(len(shards), seed=seed, reshuffle_each_iteration=True)
    ds = files.interleave(
        tf.data.TFRecordDataset,
        cycle_length=max(1, min(cycle_length, len(shards))),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    return ds.map(parse_example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
