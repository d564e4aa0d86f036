"""Pseudo segmentation masks for image-level data: the semi-supervised process of MTUnet.

Foo et al. 2020, "Semi-Supervised Training" and Fig. 7: a segmentation network is first trained
on the few images with lesion masks (IDRiD-S); it then predicts masks for the images that only
have a DR grade (Kaggle/EyePACS), and "if an image in the training dataset has a severity level
of 0, then we ignore the red and yellow lesion outputs from the initial network" — a grade-0
pixel can only be background or optic disc. The multi-task network then trains on
``(image, pseudo_mask, grade)``.

Here, for every pixel the pseudo mask is the segmenter's most probable class (softmax outputs,
one-hot masks) or every channel above ``threshold`` (sigmoid outputs); for images whose grade is
``healthy_grade`` (0) the lesion classes (:func:`drkeras.models.mtunet.lesion_class_indices`)
are removed before that decision, so such pixels fall to the best remaining class. Unknown
grades (-1) are left as predicted.

Example::

    segmenter = build_vgg16_unet(input_shape=(512, 512, 3), num_seg_classes=4, num_grades=None)
    segmenter.fit(idrid_s, epochs=...)                      # step 1: masks from IDRiD-S
    labelled = pseudo_label_dataset(segmenter, kaggle_batches)   # (image, mask, grade)
    train = labelled.map(lambda x, m, g: (x, {"seg_probs": m, "grade_probs": g}))
    compile_mtunet(mtunet); mtunet.fit(train, epochs=50)    # step 2: the multi-task network
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import tensorflow as tf

from drkeras import keys
from drkeras.models.mtunet import DEFAULT_CLASS_SET, class_names, lesion_class_indices

__all__ = [
    "pseudo_label_batch",
    "pseudo_label_dataset",
    "pseudo_masks_from_probs",
]

HEALTHY_GRADE = 0


def pseudo_masks_from_probs(
    probs,
    grades,
    *,
    class_set: str = DEFAULT_CLASS_SET,
    activation: str = "softmax",
    threshold: float = 0.5,
    healthy_grade: int = HEALTHY_GRADE,
    lesion_channels: Optional[Sequence[int]] = None,
) -> tf.Tensor:
    """Hard pseudo masks from predicted pixel probabilities, with the grade-0 rule of Fig. 7.

    Args:
        probs: ``(B, H, W, C)`` segmenter probabilities, channels in ``class_set`` order.
        grades: ``(B,)`` or ``(B, 1)`` integer grades of the images.
        class_set: the pixel classes of the channels (``drkeras.models.mtunet.CLASS_SETS``).
        activation: ``"softmax"``: one-hot argmax masks; ``"sigmoid"``: ``probs > threshold``.
        threshold: decision threshold of sigmoid outputs.
        healthy_grade: images with this grade get no lesion pixels (0 = no DR).
        lesion_channels: channels to ignore on healthy images (default: the lesion classes of
            ``class_set``).

    Returns:
        float32 ``(B, H, W, C)`` masks with values in {0, 1}.

    Example::

        probs = [[[[0.1, 0.6, 0.0, 0.3]]]]          # one pixel: red lesion most likely
        pseudo_masks_from_probs(probs, [0])          # [[[[0, 0, 0, 1]]]]: optic disc next
        pseudo_masks_from_probs(probs, [2])          # [[[[0, 1, 0, 0]]]]
    """
    probs = tf.convert_to_tensor(probs, tf.float32)
    num_classes = len(class_names(class_set))
    if probs.shape.rank != 4 or probs.shape[-1] != num_classes:
        raise ValueError(
            f"pseudo masks: expected probabilities of shape (batch, H, W, {num_classes}) for "
            f"class_set {class_set!r} {class_names(class_set)}, got shape {probs.shape}"
        )
    if lesion_channels is None:
        lesion_channels = lesion_class_indices(class_set)
    grades = tf.reshape(tf.cast(grades, tf.int32), [-1])
    healthy = tf.equal(grades, healthy_grade)[:, None, None, None]
    if any(not 0 <= c < num_classes for c in lesion_channels):
        raise ValueError(
            f"lesion_channels {lesion_channels} out of range for {num_classes} classes"
        )
    is_lesion = tf.constant([c in set(lesion_channels) for c in range(num_classes)])
    suppress = tf.logical_and(healthy, is_lesion)  # broadcast to (B, 1, 1, C)
    if activation == "softmax":
        # Ignored channels can never win the argmax: probabilities are >= 0 > -1.
        scores = tf.where(suppress, -1.0, probs)
        return tf.one_hot(tf.argmax(scores, axis=-1), num_classes, dtype=tf.float32)
    if activation == "sigmoid":
        masks = tf.cast(probs > threshold, tf.float32)
        return tf.where(suppress, 0.0, masks)
    raise ValueError(f"activation must be 'softmax' or 'sigmoid', got {activation!r}")


def _probs_of(outputs, activation: Optional[str]) -> Tuple[tf.Tensor, str]:
    if isinstance(outputs, dict):
        for key, act in ((keys.SEG_PROBS, "softmax"), (keys.LESION_PROBS, "sigmoid")):
            if key in outputs:
                return outputs[key], activation or act
        raise ValueError(
            f"segmenter outputs {sorted(outputs)} have neither {keys.SEG_PROBS!r} nor "
            f"{keys.LESION_PROBS!r}"
        )
    return outputs, activation or "softmax"


def pseudo_label_batch(
    segmenter,
    images,
    grades,
    *,
    class_set: str = DEFAULT_CLASS_SET,
    activation: Optional[str] = None,
    threshold: float = 0.5,
    healthy_grade: int = HEALTHY_GRADE,
) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """Run ``segmenter`` on a batch and return ``(images, pseudo_masks, grades)``.

    Args:
        segmenter: a Keras model (or callable) mapping ``(B, H, W, 3)`` images to pixel
            probabilities, either a tensor or a dict with ``keys.SEG_PROBS`` (softmax) or
            ``keys.LESION_PROBS`` (sigmoid), e.g. :func:`build_vgg16_unet` with
            ``num_grades=None`` or a :func:`build_segmenter` baseline.
        images: ``(B, H, W, 3)`` images, preprocessed as the segmenter was trained.
        grades: ``(B,)`` integer grades.
        class_set, threshold, healthy_grade: as :func:`pseudo_masks_from_probs`.
        activation: override the activation inferred from the output key (a bare tensor
            output is taken as softmax).

    Returns:
        ``(images, masks, grades)`` with ``masks`` float32 ``(B, H, W, C)``.

    Example: ``x, m, g = pseudo_label_batch(segmenter, images, grades)``.
    """
    probs, act = _probs_of(segmenter(images, training=False), activation)
    masks = pseudo_masks_from_probs(
        probs,
        grades,
        class_set=class_set,
        activation=act,
        threshold=threshold,
        healthy_grade=healthy_grade,
    )
    return images, masks, grades


def pseudo_label_dataset(
    segmenter,
    dataset: tf.data.Dataset,
    *,
    class_set: str = DEFAULT_CLASS_SET,
    image_key: str = keys.IMAGE,
    grade_key: str = keys.GRADE,
    activation: Optional[str] = None,
    threshold: float = 0.5,
    healthy_grade: int = HEALTHY_GRADE,
    cache: Optional[str] = None,
) -> tf.data.Dataset:
    """Label an image-level ``tf.data`` dataset with pseudo masks: ``(image, mask, grade)``.

    Feed it the un-augmented images (batched or not) and augment the resulting triples with a
    paired image+mask augmentation, so masks are predicted once per image, and with ``cache``
    (a file prefix, or ``""`` for memory) predicted once for all epochs, as in the paper where
    the masks are a fixed label set.

    Args:
        segmenter: as :func:`pseudo_label_batch`.
        dataset: elements are dicts with ``image_key`` and ``grade_key`` (the pipelines'
            examples) or ``(image, grade)`` tuples; batched ``(B, H, W, 3)`` or single images.
        class_set, activation, threshold, healthy_grade: as :func:`pseudo_label_batch`.
        image_key, grade_key: field names of dict elements.
        cache: ``None`` (predict on every pass), ``""`` (cache in memory) or a file prefix.

    Returns:
        A dataset of ``(image, pseudo_mask, grade)`` with the input's batching.

    Example::

        triples = pseudo_label_dataset(segmenter, eyepacs.batch(8))
        for images, masks, grades in triples.take(1): ...
    """
    spec = dataset.element_spec
    if isinstance(spec, dict):
        missing = [k for k in (image_key, grade_key) if k not in spec]
        if missing:
            raise ValueError(
                f"pseudo_label_dataset: dataset elements have fields {sorted(spec)}; expected "
                f"{image_key!r} and {grade_key!r} (missing {missing})"
            )
        image_spec = spec[image_key]
    elif isinstance(spec, tuple) and len(spec) == 2:
        image_spec = spec[0]
    else:
        raise ValueError(
            "pseudo_label_dataset: expected dataset elements as dicts with "
            f"{image_key!r}/{grade_key!r} or (image, grade) tuples, got {spec}"
        )
    if image_spec.shape.rank not in (3, 4):
        raise ValueError(
            f"pseudo_label_dataset: expected images (H, W, C) or (B, H, W, C), got {image_spec}"
        )
    batched = image_spec.shape.rank == 4

    def label(*element):
        if isinstance(spec, dict):
            image, grade = element[0][image_key], element[0][grade_key]
        else:
            image, grade = element
        images, grades = (image, grade) if batched else (image[None], grade[None])
        _, masks, _ = pseudo_label_batch(
            segmenter,
            tf.cast(images, tf.float32),
            grades,
            class_set=class_set,
            activation=activation,
            threshold=threshold,
            healthy_grade=healthy_grade,
        )
        return image, (masks if batched else masks[0]), grade

    labelled = dataset.map(label)
    return labelled if cache is None else labelled.cache(cache)
