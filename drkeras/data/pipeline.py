"""tf.data pipelines from converted records to batches shaped for Keras ``fit``.

Every builder takes a records directory (written by ``python -m data_prep``) and a split, plus
plain keyword arguments, and returns a ``tf.data.Dataset`` of ``(inputs, targets)`` tuples.
Shapes below are per batch (``B`` = ``batch_size``, or the per-replica batch when an
``input_context`` is given; ``S`` = ``size``, or ``crop_size`` when set; ``L`` = number of
``lesions``, 1 with ``merge_lesions``):

- ``segmentation_dataset``: ``(image f32 [B,S,S,3], {"masks": f32 [B,S,S,L],
  "mask_present": f32 [B,L]})``
- ``grading_dataset``: ``(image f32 [B,S,S,3], label int32 [B])`` (``label``: grade or dme)
- ``mixed_dataset``: ``(image, {"masks", "mask_present", "mask_valid": f32 [B],
  "grade": int32 [B]})``
- ``two_stream_dataset``: ``({"seg_image": f32 [B,S,S,3], "cls_image": f32 [kB,S,S,3]},
  {"masks": [B,S,S,L], "mask_present": [B,L], "grade": int32 [kB]})``
- ``patch_dataset(mode="patches")``: ``(patch f32 [B,P,P,3], label int32 [B])`` (-1 unlabelled)
- ``patch_dataset(mode="images")``: ``(patches f32 [B,G*G,P,P,3], {"patch_labels": int32
  [B,G*G], "grade": int32 [B], "image_label": int32 [B]})``

``mask_present`` says which lesion types are annotated for an example (not annotated differs
from empty); ``mask_valid`` is 1 when the example carries pixel-level labels at all, so a
semi-supervised loss can mask the segmentation term per example. ``grade`` is -1 when unknown.

The steps, in order: read shards (sharded per input pipeline for multi-worker training) ->
filter on the light fields (ids, grade, annotation) before any image is decoded -> decode ->
field-of-view crop and resize to the training size (:mod:`drkeras.data.preprocess`) -> cache
(uint8, at training size) -> shuffle -> repeat -> class-balanced resampling (optional) ->
paired augmentation with one stateless seed per example (:mod:`drkeras.data.augment`) ->
Graham (optional) -> normalisation -> batch -> prefetch. Parallel maps use ``AUTOTUNE`` and
keep a deterministic order, so a seed reproduces a run.

Splits for experiments: :func:`kfold_split` and :func:`fraction_split` work on ids (read with
:func:`read_labels`, without decoding images) and are deterministic for a seed; pass the result
as ``ids=`` to any builder. :func:`evaluation_dataset` reads several splits as one evaluation set
(``"val+test"``: EyePACS' Public and Private test images).

Example::

    >>> ds = segmentation_dataset("records/idrid", "train", size=256, batch_size=4,
    ...                           augment=True, repeat=True)  # doctest: +SKIP
    >>> image, targets = next(iter(ds))  # doctest: +SKIP
    >>> image.shape, targets["masks"].shape  # doctest: +SKIP
    (TensorShape([4, 256, 256, 3]), TensorShape([4, 256, 256, 5]))
"""

from __future__ import annotations

import os
from typing import Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import tensorflow as tf

from drkeras import keys
from drkeras.data import augment as aug
from drkeras.data import patches as patch_ops
from drkeras.data import preprocess, records

__all__ = [
    "CLS_IMAGE",
    "IMAGE_LABEL",
    "MASK_VALID",
    "PATCH_LABELS",
    "SEG_IMAGE",
    "distribution_options",
    "evaluation_dataset",
    "fraction_split",
    "grading_dataset",
    "kfold_split",
    "mixed_dataset",
    "patch_dataset",
    "read_labels",
    "segmentation_dataset",
    "split_names",
    "two_stream_dataset",
]

# Element keys added by the pipelines (record fields come from drkeras.keys).
MASK_VALID = "mask_valid"
SEG_IMAGE = "seg_image"
CLS_IMAGE = "cls_image"
PATCH_LABELS = "patch_labels"
IMAGE_LABEL = "image_label"

PathLike = Union[str, os.PathLike]
AUTOTUNE = tf.data.AUTOTUNE

# JPEGs are decoded already scaled down (libjpeg's DCT scaling) while their short side stays at
# least this many times the training size: a fundus field of view spans >= ~0.9 of the short
# side, so it is still shrunk (area-averaged), never enlarged, to the training size.
_DECODE_MARGIN = 1.25


def _decode_min_side(size: int) -> int:
    return int(round(_DECODE_MARGIN * size))


# --------------------------------------------------------------------------------------------
# Ids, labels and splits


def _parse_light(serialized: tf.Tensor) -> dict:
    labels = records.parse_labels(serialized)
    return {name: labels[name] for name in (keys.ID, keys.GRADE, keys.DME, keys.MASK_PRESENT)}


def read_labels(records_dir: PathLike, split: str) -> Dict[str, np.ndarray]:
    """Ids and labels of every example of a split, without decoding any image.

    Returns:
        ``{"id": str [N], "grade": int [N], "dme": int [N], "mask_present": bool [N, 5]}``
        in record order.

    Example::

        >>> labels = read_labels("records/idrid", "train")  # doctest: +SKIP
        >>> labels["id"][:2], labels["grade"][:2]  # doctest: +SKIP
    """
    ds = tf.data.TFRecordDataset(records.list_shards(records_dir, split))
    ds = ds.map(_parse_light, num_parallel_calls=AUTOTUNE).batch(4096)
    parts = {keys.ID: [], keys.GRADE: [], keys.DME: [], keys.MASK_PRESENT: []}
    for batch in ds.as_numpy_iterator():
        for name in parts:
            parts[name].append(batch[name])
    out = {name: np.concatenate(values) if values else None for name, values in parts.items()}
    if out[keys.ID] is None:
        return {
            keys.ID: np.zeros(0, object),
            keys.GRADE: np.zeros(0, np.int32),
            keys.DME: np.zeros(0, np.int32),
            keys.MASK_PRESENT: np.zeros((0, keys.NUM_LESIONS), bool),
        }
    out[keys.ID] = np.array([i.decode() for i in out[keys.ID]], dtype=object)
    return out


def _check_ids(ids: Sequence[str]) -> list:
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("ids must be unique")
    return ids


def _groups(ids: list, seed: int, stratify: Optional[Sequence]) -> list:
    """Ids split by stratum (one group without ``stratify``), each group in a seeded random
    order; the result does not depend on the order of ``ids``."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    rng = np.random.default_rng(seed)
    if stratify is None:
        return [[ids[i] for i in rng.permutation(order)]]
    if len(stratify) != len(ids):
        raise ValueError(f"stratify has {len(stratify)} labels for {len(ids)} ids")
    groups: Dict[object, list] = {}
    for i in order:
        groups.setdefault(stratify[i], []).append(ids[i])
    return [list(rng.permutation(groups[label])) for label in sorted(groups, key=str)]


def kfold_split(
    ids: Sequence[str],
    k: int,
    fold: int,
    *,
    seed: int = 0,
    stratify: Optional[Sequence] = None,
) -> Tuple[list, list]:
    """Deterministic k-fold cross-validation split of example ids.

    Args:
        ids: unique example ids (any order: they are sorted before shuffling).
        k: number of folds (>= 2).
        fold: which fold is held out, in ``[0, k)``.
        seed: shuffling seed; the same seed and ids give the same folds.
        stratify: optional labels aligned with ``ids`` (e.g. grades) spread evenly over folds.

    Returns:
        ``(train_ids, held_out_ids)``, sorted; the k held-out sets partition ``ids``.

    Example::

        >>> kfold_split(["a", "b", "c", "d"], 2, 0, seed=1)[1]  # doctest: +SKIP
        ['b', 'c']
    """
    ids = _check_ids(ids)
    if k < 2 or not 0 <= fold < k:
        raise ValueError(f"need k >= 2 and 0 <= fold < k, got k={k}, fold={fold}")
    # dealing the strata one after the other round-robin spreads every stratum evenly
    order = [i for group in _groups(ids, seed, stratify) for i in group]
    held = set(order[fold::k])
    return sorted(set(ids) - held), sorted(held)


def fraction_split(
    ids: Sequence[str],
    fraction: float,
    *,
    seed: int = 0,
    stratify: Optional[Sequence] = None,
) -> Tuple[list, list]:
    """Deterministic label-fraction split: ``round(fraction * N)`` ids (at least one when
    ``fraction > 0``) are selected, e.g. the labelled images of a semi-supervised run
    (Lecouat et al. 2018 vary the labelled share from 10 to 100 %).

    Args:
        ids: unique example ids.
        fraction: share to select, in [0, 1].
        seed: selection seed; larger fractions with the same seed select supersets.
        stratify: optional labels aligned with ``ids`` kept in proportion.

    Returns:
        ``(selected_ids, rest_ids)``, sorted.

    Example::

        >>> sel, rest = fraction_split([f"x{i}" for i in range(10)], 0.3, seed=0)
        >>> len(sel), len(rest)
        (3, 7)
    """
    ids = _check_ids(ids)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    n = int(round(fraction * len(ids)))
    if fraction > 0 and ids:
        n = max(1, n)
    # rank every id by its relative position in its stratum: any prefix of that ranking
    # holds each stratum in proportion (and a larger fraction selects a superset)
    rng = np.random.default_rng([seed, 1])
    keyed = []
    for group in _groups(ids, seed, stratify):
        offset = rng.uniform()
        keyed += [((rank + offset) / len(group), i) for rank, i in enumerate(group)]
    order = [i for _, i in sorted(keyed)]
    return sorted(order[:n]), sorted(order[n:])


# --------------------------------------------------------------------------------------------
# Shared stages


def distribution_options(deterministic: bool = True) -> tf.data.Options:
    """Options set on every pipeline: data-level auto-sharding (records come in few files, so
    file-level sharding would leave workers without data) and a deterministic order.

    Example::

        >>> opts = distribution_options()
        >>> opts.experimental_distribute.auto_shard_policy == (
        ...     tf.data.experimental.AutoShardPolicy.DATA)
        True
    """
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    options.deterministic = deterministic
    return options


def _lesion_index(lesions: Sequence[str]) -> list:
    unknown = [name for name in lesions if name not in keys.LESIONS]
    if unknown or not lesions:
        raise ValueError(f"lesions must be a non-empty subset of {keys.LESIONS}, got {lesions}")
    return [keys.LESIONS.index(name) for name in lesions]


def _id_table(ids: Sequence[str]) -> tf.lookup.StaticHashTable:
    ids = [str(i) for i in ids]
    init = tf.lookup.KeyValueTensorInitializer(
        tf.constant(ids, tf.string), tf.ones([len(ids)], tf.int32)
    )
    return tf.lookup.StaticHashTable(init, default_value=0)


def _records(
    records_dir: PathLike,
    split: str,
    *,
    keep: Optional[Callable[[dict], tf.Tensor]],
    ids: Optional[Sequence[str]],
    exclude_ids: Optional[Sequence[str]],
    max_examples: int,
    input_context: Optional[tf.distribute.InputContext],
) -> tf.data.Dataset:
    """Serialized records of a split, filtered on light fields before any decoding."""
    ds = tf.data.TFRecordDataset(records.list_shards(records_dir, split))
    if input_context is not None and input_context.num_input_pipelines > 1:
        ds = ds.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    predicates = []
    if ids is not None:
        table = _id_table(ids)
        predicates.append(lambda light: table.lookup(light[keys.ID]) > 0)
    if exclude_ids is not None and len(exclude_ids):
        excluded = _id_table(exclude_ids)
        predicates.append(lambda light: excluded.lookup(light[keys.ID]) == 0)
    if keep is not None:
        predicates.append(keep)
    if predicates:

        def wanted(serialized):
            light = _parse_light(serialized)
            ok = tf.constant(True)
            for predicate in predicates:
                ok = tf.logical_and(ok, predicate(light))
            return ok

        ds = ds.filter(wanted)
    if max_examples:
        ds = ds.take(max_examples)
    return ds


def _parse_without_masks(serialized: tf.Tensor, size: int) -> dict:
    """The image and labels of a record, for a model input of ``size`` pixels: the masks are
    not decoded (five full-size channels cost more than the photograph) and a large JPEG is
    decoded already scaled down (:func:`drkeras.data.records.parse_example` ``min_side``)."""
    ex = records.parse_example(serialized, masks=False, min_side=_decode_min_side(size))
    return {name: ex[name] for name in (keys.ID, keys.IMAGE, keys.GRADE, keys.DME)}


def _decode_resize(size: int, fov_crop: bool, lesion_index: Optional[list], merge: bool):
    """Record -> example at training size (image kept uint8 so the cache stays small).
    ``lesion_index=None``: no masks (grading)."""

    def fn(serialized):
        ex = (
            _parse_without_masks(serialized, size)
            if lesion_index is None
            else records.parse_example(serialized, masks="encoded")
        )
        image = ex[keys.IMAGE]
        box = preprocess.fov_box(image) if fov_crop else preprocess._full_box(image)
        resized = preprocess.crop_and_resize(image, box, size)
        out = {
            keys.ID: ex[keys.ID],
            keys.IMAGE: tf.cast(tf.round(resized), tf.uint8),
            keys.GRADE: ex[keys.GRADE],
            keys.DME: ex[keys.DME],
        }
        if lesion_index is not None:
            height, width = tf.shape(image)[0], tf.shape(image)[1]
            encoded = tf.gather(ex[keys.MASKS], lesion_index)
            channels_in = len(lesion_index)
            channels = 1 if merge else channels_in

            def shrunk():
                # channel planes stacked first (plain copies; empty ones are zeros, never
                # decoded), cropped and shrunk together, transposed once small
                planes = tf.stack(
                    [records.decode_mask(encoded[k], height, width) for k in range(channels_in)]
                )
                if merge:
                    planes = tf.reduce_max(planes, axis=0, keepdims=True)
                return preprocess.prepare_example_masks(planes, box, size, channels_first=True)

            out[keys.MASKS] = tf.cond(
                tf.reduce_any(tf.strings.length(encoded) > 0),
                shrunk,
                lambda: tf.zeros([size, size, channels], tf.uint8),
            )
            present = tf.gather(ex[keys.MASK_PRESENT], lesion_index)
            if merge:
                # a union is only known where every merged type is annotated
                present = tf.reduce_all(present, keepdims=True)
            out[keys.MASK_PRESENT] = present
        return out

    return fn


def _augment_stage(
    *,
    augment: bool,
    params: aug.AugmentParams,
    crop_size: Optional[int],
    graham: bool,
    normalization: str,
    out_size: int,
):
    """Per-example augmentation, crop, Graham and normalisation on ``(index, example)``."""
    preprocess._check_mode(normalization)

    def fn(seed, ex):
        image = ex[keys.IMAGE]
        masks = ex.get(keys.MASKS)
        if augment:
            # the cached uint8 image: resampled in uint8, ~3x cheaper than in float32
            image, masks = aug.augment(image, masks, seed=seed, params=params)
        image = tf.cast(image, tf.float32)
        if crop_size is not None:
            if augment:
                image, masks = aug.random_crop(image, masks, crop_size, seed=seed)
            else:
                image, masks = aug.center_crop(image, masks, crop_size)
        image = tf.ensure_shape(image, [out_size, out_size, 3])
        if graham:
            image = preprocess.graham(image)
        out = dict(ex)
        out[keys.IMAGE] = preprocess.normalize(image, normalization)
        if masks is not None:
            out[keys.MASKS] = masks  # uint8 until batched (see _uint8_to_float)
        return out

    return fn


def _uint8_to_float(*element):
    """Batched masks to float32: batching them as uint8 moves a quarter of the bytes.
    (``Dataset.map`` passes the parts of a tuple element as separate arguments.)"""
    out = tf.nest.map_structure(
        lambda t: tf.cast(t, tf.float32) if t.dtype == tf.uint8 else t, element
    )
    return out if len(out) > 1 else out[0]


def _finish(
    ds: tf.data.Dataset,
    *,
    to_element: Callable,
    batch_size: int,
    size: int,
    augment: bool,
    augment_params: Optional[aug.AugmentParams],
    crop_size: Optional[int],
    graham: bool,
    normalization: str,
    cache: Union[bool, str],
    shuffle: bool,
    shuffle_buffer: int,
    seed: int,
    repeat: bool,
    drop_remainder: bool,
    input_context: Optional[tf.distribute.InputContext],
    balance_counts: Optional[Dict[int, int]] = None,
    balance_key: str = keys.GRADE,
) -> tf.data.Dataset:
    if cache:
        ds = ds.cache(cache if isinstance(cache, str) else "")
    if shuffle:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat or balance_counts is not None:
        ds = ds.repeat()
    if balance_counts is not None:
        ds = _balance(ds, balance_counts, balance_key, seed)
    if crop_size is not None and not 0 < crop_size <= size:
        raise ValueError(f"crop_size must be in (0, size={size}], got {crop_size}")
    out_size = crop_size or size
    stage = _augment_stage(
        augment=augment,
        params=augment_params or aug.DEFAULT_AUGMENT,
        crop_size=crop_size,
        graham=graham,
        normalization=normalization,
        out_size=out_size,
    )
    # one stateless seed per example, from the run seed and the example's position in the
    # stream: reproducible, and different in every epoch
    base = tf.constant(seed, tf.int64)
    ds = ds.enumerate().map(
        lambda i, ex: to_element(stage(tf.stack([base, i]), ex)),
        num_parallel_calls=AUTOTUNE,
    )
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE)
    ds = ds.map(_uint8_to_float, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE).with_options(distribution_options())


def _balance(ds, counts: Dict[int, int], key: str, seed: int) -> tf.data.Dataset:
    """Thin an infinite stream so every class present is drawn equally often: an example of
    class ``c`` is kept with probability ``n_min / n_c`` (rejection sampling with the known
    class counts; the draw is a stateless function of the seed and the stream position)."""
    present = {c: n for c, n in counts.items() if n > 0}
    if not present:
        raise ValueError("class-balanced sampling found no labelled example")
    n_min = min(present.values())
    accept = tf.constant(
        [n_min / present[c] if c in present else 0.0 for c in range(max(present) + 1)],
        tf.float32,
    )
    base = tf.constant(seed, tf.int64)

    def kept(i, ex):
        draw_seed = tf.random.experimental.stateless_fold_in(tf.stack([base, i]), 1)
        return tf.random.stateless_uniform([], draw_seed) < tf.gather(accept, ex[key])

    return ds.enumerate().filter(kept).map(lambda i, ex: ex)


def _default_shuffle(shuffle: Optional[bool], split: str) -> bool:
    """Builders shuffle the training split only, unless told otherwise."""
    return split == "train" if shuffle is None else bool(shuffle)


# --------------------------------------------------------------------------------------------
# Builders


def segmentation_dataset(
    records_dir: PathLike,
    split: str,
    *,
    size: int = 256,
    batch_size: int = 8,
    lesions: Sequence[str] = keys.LESIONS,
    merge_lesions: bool = False,
    augment: bool = False,
    augment_params: Optional[aug.AugmentParams] = None,
    crop_size: Optional[int] = None,
    normalization: str = "unit",
    fov_crop: bool = True,
    graham: bool = False,
    shuffle: Optional[bool] = None,
    shuffle_buffer: int = 256,
    seed: int = 0,
    repeat: bool = False,
    cache: Union[bool, str] = True,
    drop_remainder: bool = False,
    ids: Optional[Sequence[str]] = None,
    exclude_ids: Optional[Sequence[str]] = None,
    max_examples: int = 0,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
    """Images with lesion masks, for segmentation: ``(image, {"masks", "mask_present"})``.

    Only examples with at least one of ``lesions`` annotated are kept.

    Args:
        records_dir, split: the converted dataset and split to read.
        size: training resolution (square).
        batch_size: global batch size (divided per replica with an ``input_context``).
        lesions: lesion types (channels, in this order), a subset of ``keys.LESIONS``.
        merge_lesions: one channel, the union of ``lesions`` (PLDMLT fuses SE, EX, HE and MA
            into one lesion mask, section "Datasets").
        augment: paired augmentation with ``augment_params`` (default ranges otherwise).
        crop_size: random (training) / central (evaluation) crop after resizing to ``size``.
        normalization: :func:`drkeras.data.preprocess.normalize` mode.
        fov_crop: crop to the field of view before resizing.
        graham: Graham's local-average subtraction.
        shuffle: shuffle (default: only the ``train`` split); ``shuffle_buffer`` examples.
        seed: seed of shuffling, augmentation and resampling.
        repeat: repeat forever (set ``steps_per_epoch``).
        cache: cache decoded examples at training size in memory (True) or in this file.
        drop_remainder: drop a last partial batch.
        ids / exclude_ids: keep only / drop these example ids (see :func:`kfold_split`).
        max_examples: read at most this many examples (0 = all), for quick runs.
        input_context: from ``strategy.distribute_datasets_from_function``; shards records
            per input pipeline and batches per replica.

    Example::

        >>> ds = segmentation_dataset("records/idrid", "train", size=64, batch_size=2,
        ...                           lesions=("EX", "HE"))  # doctest: +SKIP
    """
    index = _lesion_index(lesions)
    shuffle = _default_shuffle(shuffle, split)
    wanted = tf.constant(index, tf.int32)
    ds = _records(
        records_dir,
        split,
        keep=lambda light: tf.reduce_any(tf.gather(light[keys.MASK_PRESENT], wanted)),
        ids=ids,
        exclude_ids=exclude_ids,
        max_examples=max_examples,
        input_context=input_context,
    )
    ds = ds.map(_decode_resize(size, fov_crop, index, merge_lesions), num_parallel_calls=AUTOTUNE)

    def to_element(ex):
        return ex[keys.IMAGE], {
            keys.MASKS: ex[keys.MASKS],
            keys.MASK_PRESENT: tf.cast(ex[keys.MASK_PRESENT], tf.float32),
        }

    return _finish(
        ds,
        to_element=to_element,
        batch_size=batch_size,
        size=size,
        augment=augment,
        augment_params=augment_params,
        crop_size=crop_size,
        graham=graham,
        normalization=normalization,
        cache=cache,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        repeat=repeat,
        drop_remainder=drop_remainder,
        input_context=input_context,
    )


def grading_dataset(
    records_dir: PathLike,
    split: str,
    *,
    size: int = 256,
    batch_size: int = 8,
    label: str = keys.GRADE,
    num_classes: int = keys.NUM_GRADES,
    class_balanced: bool = False,
    augment: bool = False,
    augment_params: Optional[aug.AugmentParams] = None,
    crop_size: Optional[int] = None,
    normalization: str = "unit",
    fov_crop: bool = True,
    graham: bool = False,
    shuffle: Optional[bool] = None,
    shuffle_buffer: int = 256,
    seed: int = 0,
    repeat: bool = False,
    cache: Union[bool, str] = True,
    drop_remainder: bool = False,
    ids: Optional[Sequence[str]] = None,
    exclude_ids: Optional[Sequence[str]] = None,
    max_examples: int = 0,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
    """Images with an image-level label, for grading: ``(image, label int32)``.

    Examples whose label is unknown (-1) or outside ``[0, num_classes)`` are dropped.

    Args:
        label: ``keys.GRADE`` (DR grade) or ``keys.DME`` (risk of macular oedema, 3 classes).
        num_classes: labels kept are ``0 .. num_classes - 1``.
        class_balanced: resample so every class present is drawn equally often (rejection
            sampling with the class counts read from the records, see :func:`read_labels`); the
            dataset is then infinite, whatever ``repeat`` says.
        (other arguments as in :func:`segmentation_dataset`)

    Example::

        >>> ds = grading_dataset("records/eyepacs", "train", size=128, batch_size=16,
        ...                      class_balanced=True)  # doctest: +SKIP
    """
    if label not in (keys.GRADE, keys.DME):
        raise ValueError(f"label must be {keys.GRADE!r} or {keys.DME!r}, got {label!r}")
    shuffle = _default_shuffle(shuffle, split)

    def keep(light):
        return tf.logical_and(light[label] >= 0, light[label] < num_classes)

    counts = None
    if class_balanced:
        counts = _class_counts(records_dir, split, label, num_classes, ids, exclude_ids)
    ds = _records(
        records_dir,
        split,
        keep=keep,
        ids=ids,
        exclude_ids=exclude_ids,
        max_examples=max_examples,
        input_context=input_context,
    )
    ds = ds.map(_decode_resize(size, fov_crop, None, False), num_parallel_calls=AUTOTUNE)
    return _finish(
        ds,
        to_element=lambda ex: (ex[keys.IMAGE], ex[label]),
        batch_size=batch_size,
        size=size,
        augment=augment,
        augment_params=augment_params,
        crop_size=crop_size,
        graham=graham,
        normalization=normalization,
        cache=cache,
        shuffle=shuffle,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        repeat=repeat,
        drop_remainder=drop_remainder,
        input_context=input_context,
        balance_counts=counts,
        balance_key=label,
    )


def _class_counts(records_dir, split, label, num_classes, ids, exclude_ids) -> Dict[int, int]:
    labels = read_labels(records_dir, split)
    keep = np.ones(len(labels[keys.ID]), bool)
    if ids is not None:
        keep &= np.isin(labels[keys.ID], np.asarray(list(ids), dtype=object))
    if exclude_ids is not None:
        keep &= ~np.isin(labels[keys.ID], np.asarray(list(exclude_ids), dtype=object))
    values = labels[label][keep]
    return {c: int((values == c).sum()) for c in range(num_classes)}


def mixed_dataset(
    records_dir: PathLike,
    split: str,
    *,
    image_level_dir: Optional[PathLike] = None,
    image_level_split: Optional[str] = None,
    mask_ids: Optional[Sequence[str]] = None,
    pixel_fraction: Optional[float] = None,
    size: int = 256,
    batch_size: int = 8,
    lesions: Sequence[str] = keys.LESIONS,
    merge_lesions: bool = False,
    augment: bool = False,
    augment_params: Optional[aug.AugmentParams] = None,
    crop_size: Optional[int] = None,
    normalization: str = "unit",
    fov_crop: bool = True,
    graham: bool = False,
    shuffle: Optional[bool] = None,
    shuffle_buffer: int = 256,
    seed: int = 0,
    repeat: bool = False,
    cache: Union[bool, str] = True,
    drop_remainder: bool = False,
    ids: Optional[Sequence[str]] = None,
    exclude_ids: Optional[Sequence[str]] = None,
    max_examples: int = 0,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
    """Pixel-level and image-level examples in the same batches, for semi-supervised joint
    training (Zhou et al. 2019 collaborative learning; MTUnet's and PLDMLT's pseudo-mask
    stages): ``(image, {"masks", "mask_present", "mask_valid", "grade"})``.

    An example is pixel-level (``mask_valid`` 1) when one of ``lesions`` is annotated and, if
    ``mask_ids`` is given, its id is in it (hide the masks of the others to simulate a labelled
    fraction, see :func:`fraction_split`). Image-level examples have zero masks, zero
    ``mask_present`` and ``mask_valid`` 0; their ``grade`` may still be -1 (unlabelled).

    Args:
        image_level_dir / image_level_split: a second converted dataset (e.g. EyePACS) whose
            examples all enter as image-level ones (``image_level_split`` defaults to ``split``).
        mask_ids: ids allowed to keep their masks.
        pixel_fraction: expected share of pixel-level examples per batch; the two kinds are
            then drawn as two streams with these weights. ``None`` with one directory keeps the
            records' own mix; ``None`` with two directories weighs the streams by their sizes.
        (other arguments as in :func:`segmentation_dataset`; ``ids``, ``exclude_ids`` and
        ``max_examples`` apply to each directory)

    Example::

        >>> ds = mixed_dataset("records/idrid", "train", image_level_dir="records/eyepacs",
        ...                    pixel_fraction=0.25, size=128, repeat=True)  # doctest: +SKIP
    """
    if pixel_fraction is not None and not 0.0 < pixel_fraction < 1.0:
        raise ValueError(f"pixel_fraction must be in (0, 1), got {pixel_fraction}")
    index = _lesion_index(lesions)
    shuffle = _default_shuffle(shuffle, split)
    wanted = tf.constant(index, tf.int32)
    mask_table = _id_table(mask_ids) if mask_ids is not None else None

    def has_pixels(light):
        ok = tf.reduce_any(tf.gather(light[keys.MASK_PRESENT], wanted))
        if mask_table is not None:
            ok = tf.logical_and(ok, mask_table.lookup(light[keys.ID]) > 0)
        return ok

    decode = _decode_resize(size, fov_crop, index, merge_lesions)

    def as_image_level(ex):
        ex = dict(ex)
        ex[keys.MASKS] = tf.zeros_like(ex[keys.MASKS])
        ex[keys.MASK_PRESENT] = tf.zeros_like(ex[keys.MASK_PRESENT])
        return ex

    def with_mask_table(ex):
        if mask_table is None:
            return ex
        return tf.cond(mask_table.lookup(ex[keys.ID]) > 0, lambda: ex, lambda: as_image_level(ex))

    def read(directory, split_name, keep):
        return _records(
            directory,
            split_name,
            keep=keep,
            ids=ids,
            exclude_ids=exclude_ids,
            max_examples=max_examples,
            input_context=input_context,
        )

    def prepared(ds, transform, stream):
        ds = ds.map(decode, num_parallel_calls=AUTOTUNE).map(transform, num_parallel_calls=AUTOTUNE)
        # one file per stream: a cache file holds one pipeline's elements
        return ds.cache(f"{cache}_{stream}" if isinstance(cache, str) else "") if cache else ds

    two_streams = pixel_fraction is not None or image_level_dir is not None
    if not two_streams:
        ds = prepared(read(records_dir, split, None), with_mask_table, "all")
    else:
        pixel = prepared(read(records_dir, split, has_pixels), lambda ex: ex, "pixel")
        image = prepared(
            read(records_dir, split, lambda light: tf.logical_not(has_pixels(light))),
            as_image_level,
            "image",
        )
        if image_level_dir is not None:
            other = prepared(
                read(image_level_dir, image_level_split or split, None), as_image_level, "other"
            )
            image = image.concatenate(other)
        weights = _stream_weights(
            pixel_fraction,
            records_dir,
            split,
            image_level_dir,
            image_level_split or split,
            index,
            mask_ids,
        )
        streams = []
        for i, stream in enumerate((pixel, image)):
            if shuffle:
                stream = stream.shuffle(shuffle_buffer, seed=seed + i)
            streams.append(stream.repeat() if repeat else stream)
        ds = tf.data.Dataset.sample_from_datasets(streams, weights=weights, seed=seed)

    def to_element(ex):
        present = tf.cast(ex[keys.MASK_PRESENT], tf.float32)
        return ex[keys.IMAGE], {
            keys.MASKS: ex[keys.MASKS],
            keys.MASK_PRESENT: present,
            MASK_VALID: tf.reduce_max(present),
            keys.GRADE: ex[keys.GRADE],
        }

    return _finish(
        ds,
        to_element=to_element,
        batch_size=batch_size,
        size=size,
        augment=augment,
        augment_params=augment_params,
        crop_size=crop_size,
        graham=graham,
        normalization=normalization,
        cache=False,  # cached per stream above
        shuffle=shuffle and not two_streams,
        shuffle_buffer=shuffle_buffer,
        seed=seed,
        repeat=repeat and not two_streams,
        drop_remainder=drop_remainder,
        input_context=input_context,
    )


def _stream_weights(fraction, records_dir, split, image_dir, image_split, index, mask_ids):
    if fraction is not None:
        return [fraction, 1.0 - fraction]
    labels = read_labels(records_dir, split)
    pixel = labels[keys.MASK_PRESENT][:, index].any(axis=1)
    if mask_ids is not None:
        pixel &= np.isin(labels[keys.ID], np.asarray(list(mask_ids), dtype=object))
    n_pixel = int(pixel.sum())
    n_image = len(pixel) - n_pixel + len(read_labels(image_dir, image_split)[keys.ID])
    total = max(n_pixel + n_image, 1)
    return [n_pixel / total, n_image / total]


def two_stream_dataset(
    seg_dir: PathLike,
    seg_split: str,
    cls_dir: PathLike,
    cls_split: str,
    *,
    seg_batch_size: int = 1,
    ratio: int = 32,
    size: int = 224,
    lesions: Sequence[str] = keys.LESIONS,
    seed: int = 0,
    repeat: bool = True,
    input_context: Optional[tf.distribute.InputContext] = None,
    seg_options: Optional[Mapping] = None,
    cls_options: Optional[Mapping] = None,
    **common,
) -> tf.data.Dataset:
    """A segmentation stream and a grading stream with ``ratio`` times its batch size, zipped
    (the cooperative-learning paper: "The batch size used for the classifier agent is 32 times
    than that of the segmentation agent"): ``({"seg_image", "cls_image"}, {"masks",
    "mask_present", "grade"})``.

    Both streams repeat by default, so the zip never ends early on the smaller dataset; set
    ``steps_per_epoch``.

    Args:
        seg_dir / seg_split: records with lesion masks.
        cls_dir / cls_split: records with grades (may be the same folder).
        seg_batch_size: segmentation batch; the classifier batch is ``ratio * seg_batch_size``.
        ratio: classifier-to-segmentation batch ratio k.
        size, lesions, seed, repeat, input_context: as in :func:`segmentation_dataset`.
        seg_options / cls_options: keywords for one stream only, over ``common`` (e.g.
            ``cls_options={"augment_params": with_colour}``: the cooperative-learning paper
            jitters hue, contrast and saturation of the classification images only).
        **common: any other keyword of :func:`segmentation_dataset` / :func:`grading_dataset`
            (``augment``, ``normalization``, ``crop_size``, ...), applied to both streams.

    Example::

        >>> ds = two_stream_dataset("records/idrid", "train", "records/eyepacs", "train",
        ...                         seg_batch_size=1, ratio=8, size=128)  # doctest: +SKIP
    """
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    seg = segmentation_dataset(
        seg_dir,
        seg_split,
        size=size,
        batch_size=seg_batch_size,
        lesions=lesions,
        seed=seed,
        repeat=repeat,
        input_context=input_context,
        **{**common, **(seg_options or {})},
    )
    cls = grading_dataset(
        cls_dir,
        cls_split,
        size=size,
        batch_size=ratio * seg_batch_size,
        seed=seed + 1,
        repeat=repeat,
        input_context=input_context,
        **{**common, **(cls_options or {})},
    )

    def merge(seg_element, cls_element):
        (seg_image, seg_targets), (cls_image, grade) = seg_element, cls_element
        inputs = {SEG_IMAGE: seg_image, CLS_IMAGE: cls_image}
        targets = {
            keys.MASKS: seg_targets[keys.MASKS],
            keys.MASK_PRESENT: seg_targets[keys.MASK_PRESENT],
            keys.GRADE: grade,
        }
        return inputs, targets

    ds = tf.data.Dataset.zip((seg, cls)).map(merge)
    return ds.prefetch(AUTOTUNE).with_options(distribution_options())


def patch_dataset(
    records_dir: PathLike,
    split: str,
    *,
    mode: str = "patches",
    labeled: bool = True,
    image_size: int = 1024,
    grid: int = 8,
    patch_size: int = 32,
    lesions: Sequence[str] = patch_ops.ABNORMAL_LESIONS,
    normalization: str = "max",
    batch_size: int = 64,
    augment: bool = False,
    fov_crop: bool = True,
    shuffle: Optional[bool] = None,
    shuffle_buffer: int = 1024,
    seed: int = 0,
    repeat: bool = False,
    cache: Union[bool, str] = True,
    drop_remainder: bool = False,
    ids: Optional[Sequence[str]] = None,
    exclude_ids: Optional[Sequence[str]] = None,
    max_examples: int = 0,
    input_context: Optional[tf.distribute.InputContext] = None,
) -> tf.data.Dataset:
    """The patch grid of Lecouat et al. 2018 (:mod:`drkeras.data.patches`).

    ``mode="patches"`` (training) streams single patches ``(patch, label)``;
    ``mode="images"`` (evaluation, image-level scores) keeps each image's grid together:
    ``(patches [G*G, P, P, 3], {"patch_labels", "grade", "image_label"})`` where
    ``image_label`` is 1 when any patch is diseased (or, without masks, when grade > 0).

    Args:
        labeled: keep only images with every type of ``lesions`` annotated and return their
            patch labels; ``False`` reads every image and returns labels -1 (the unlabelled
            pool of the semi-supervised GAN).
        image_size, grid, patch_size: 1024, 8 and 32 in the paper.
        lesions: lesion types whose union defines a diseased patch.
        normalization: whole-image normalisation before patching (``max`` in the paper).
        augment: random flips and random crops (shifts up to ``patch_size // 8`` pixels,
            reflected borders) of training patches ("random cropping and flipping",
            Supplement 1).
        (other arguments as in :func:`segmentation_dataset`; ``batch_size`` counts patches in
        ``patches`` mode and images in ``images`` mode)

    Example::

        >>> ds = patch_dataset("records/idrid", "train", image_size=256, grid=8,
        ...                    patch_size=32, batch_size=64)  # doctest: +SKIP
    """
    if mode not in ("patches", "images"):
        raise ValueError(f"mode must be 'patches' or 'images', got {mode!r}")
    index = _lesion_index(lesions)
    shuffle = _default_shuffle(shuffle, split)
    wanted = tf.constant(index, tf.int32)

    def keep(light):
        return tf.reduce_all(tf.gather(light[keys.MASK_PRESENT], wanted))

    ds = _records(
        records_dir,
        split,
        keep=keep if labeled else None,
        ids=ids,
        exclude_ids=exclude_ids,
        max_examples=max_examples,
        input_context=input_context,
    )

    def to_patches(serialized):
        ex = (
            records.parse_example(serialized)
            if labeled
            else _parse_without_masks(serialized, image_size)
        )
        masks = ex[keys.MASKS] if labeled else None
        patches, labels = patch_ops.patch_example(
            ex[keys.IMAGE],
            masks,
            image_size=image_size,
            grid=grid,
            patch_size=patch_size,
            fov_crop=fov_crop,
            normalization=normalization,
            lesions=lesions,
        )
        if labeled:
            image_label = tf.reduce_max(labels)
        else:
            image_label = tf.where(ex[keys.GRADE] >= 0, tf.cast(ex[keys.GRADE] > 0, tf.int32), -1)
        return {
            "patches": patches,
            PATCH_LABELS: labels,
            keys.GRADE: ex[keys.GRADE],
            IMAGE_LABEL: image_label,
        }

    ds = ds.map(to_patches, num_parallel_calls=AUTOTUNE)
    if cache:
        ds = ds.cache(cache if isinstance(cache, str) else "")
    if mode == "images":
        if shuffle:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        ds = ds.map(
            lambda ex: (
                ex["patches"],
                {
                    PATCH_LABELS: ex[PATCH_LABELS],
                    keys.GRADE: ex[keys.GRADE],
                    IMAGE_LABEL: ex[IMAGE_LABEL],
                },
            )
        )
    else:
        ds = ds.flat_map(
            lambda ex: tf.data.Dataset.from_tensor_slices((ex["patches"], ex[PATCH_LABELS]))
        )
        if shuffle:
            ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()
        if augment:
            flips = aug.AugmentParams(
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
            pad = max(1, patch_size // 8)  # 4 px for the paper's 32 px patches
            base = tf.constant(seed, tf.int64)

            def jitter(i, patch, label):
                seed_i = tf.stack([base, i])
                padded = tf.pad(patch, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
                patch, _ = aug.random_crop(padded, None, patch_size, seed=seed_i)
                # flips only: the geometric transform never resamples between pixels here
                patch = aug.apply_transform(
                    patch,
                    aug.sample_transform(seed_i, patch_size, patch_size, flips),
                    interpolation="nearest",
                )
                return patch, label

            ds = ds.enumerate().map(lambda i, pair: jitter(i, *pair), num_parallel_calls=AUTOTUNE)
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE).with_options(distribution_options())


# --------------------------------------------------------------------------------------------
# Evaluation sets that span several splits

SPLIT_JOIN = "+"


def split_names(split: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """The split names in ``split``: one name, names joined by ``+`` or a sequence of names.

    Raises:
        ValueError: an empty name (``"val+"``) or a split named twice.

    Example::

        >>> split_names("val+test"), split_names("test"), split_names(["val", "test"])
        (('val', 'test'), ('test',), ('val', 'test'))
    """
    parts = split.split(SPLIT_JOIN) if isinstance(split, str) else [str(s) for s in split]
    names = tuple(part.strip() for part in parts)
    if not names or any(not name for name in names) or len(set(names)) != len(names):
        raise ValueError(
            f"split {split!r}: expected split names joined by {SPLIT_JOIN!r} (e.g. 'val+test'), "
            "each non-empty and named once"
        )
    return names


def evaluation_dataset(
    builder: Callable[..., tf.data.Dataset],
    records_dir: PathLike,
    split: Union[str, Sequence[str]],
    **kwargs,
) -> tf.data.Dataset:
    """One evaluation set read from one or several splits of a records directory, in order.

    A paper's test set can span several converted splits: EyePACS' Kaggle test set is converted
    as ``val`` (its Public part, 10,906 images) and ``test`` (Private, 42,670); Zhou et al. 2019
    and the cooperative-learning paper test on both (53,576), ``split="val+test"``. Each split is
    read by ``builder`` with the same arguments and the batches follow one another (the last
    batch of each split may be short; ``max_examples`` caps each split).

    Args:
        builder: a pipeline builder called as ``builder(records_dir, split, **kwargs)``, e.g.
            :func:`grading_dataset` or :func:`segmentation_dataset`.
        records_dir: the converted dataset.
        split: see :func:`split_names`; a missing split raises ``FileNotFoundError`` naming the
            folder and the splits it holds.
        **kwargs: the builder's arguments; ``repeat=True`` and ``shuffle=True`` are refused (the
            first split would never end, or the splits would not be read once each in order). A
            file ``cache`` becomes one file per split (``<cache>_<split>``).

    Example::

        >>> ds = evaluation_dataset(grading_dataset, "records/eyepacs", "val+test", size=640,
        ...                         batch_size=16)  # doctest: +SKIP
    """
    for name in ("repeat", "shuffle"):
        if kwargs.get(name):
            raise ValueError(
                f"evaluation_dataset reads each split once, in order: {name}=True is not allowed"
            )
    kwargs["shuffle"] = False
    names = split_names(split)
    cache = kwargs.pop("cache", None)

    def cache_of(name):  # one file per split: one cache file holds one pipeline's elements
        if isinstance(cache, str) and len(names) > 1:
            return {"cache": f"{cache}_{name}"}
        return {} if cache is None else {"cache": cache}

    parts = [builder(records_dir, name, **kwargs, **cache_of(name)) for name in names]
    ds = parts[0]
    for part in parts[1:]:
        ds = ds.concatenate(part)
    return ds
