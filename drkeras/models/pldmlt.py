"""PLDMLT networks (section 3.3, Fig. 5): the label update network and the fused lesion mask.

The multi-task network of PLDMLT is the VGG16-UNet of MTUnet
(:func:`drkeras.models.mtunet.build_vgg16_unet`); this module adds what PLDMLT needs besides it:

- :func:`build_label_update_net`: ``u_psi(x, y_hat)``, which turns an image and its stage-1
  pseudo grade into corrected grade probabilities through the mask softmax of Eq. 4: a
  correction, zero at initialisation, added to the logits of the label-smoothed pseudo grade
  (:func:`pseudo_grade_prior`), so stage 2 starts from the stage-1 labels;
- :func:`masked_softmax` / :class:`MaskedSoftmax`: Eq. 4;
- :func:`fuse_lesion_masks`: the single multi-class lesion mask of section 4.1 (class ids in
  ``FUSED_CLASSES``).

Trained together with the multi-task network by
:class:`drkeras.training.bilevel.BilevelMultiTaskTrainer` (Algorithm 1).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.models import mtunet
from drkeras.models.upsampling import NearestUpSampling2D

__all__ = [
    "CORRECTED_GRADE",
    "DEFAULT_SMOOTHING",
    "FUSED_CLASSES",
    "FUSED_CLASS_SET",
    "GRADE_MASK",
    "NUM_FUSED_CLASSES",
    "PSEUDO_GRADE",
    "MaskedSoftmax",
    "PseudoGradePrior",
    "build_label_update_net",
    "fuse_lesion_masks",
    "make_training_pair",
    "masked_softmax",
    "pseudo_grade_prior",
]

# Inputs and output of the label update network (not in drkeras.keys: only PLDMLT uses them).
PSEUDO_GRADE = "pseudo_grade"  # one-hot stage-1 pseudo grade y_hat, [B, num_grades]
GRADE_MASK = "grade_mask"  # binary mask M of Eq. 4 (allowed grades), [B, num_grades]
CORRECTED_GRADE = "corrected_grade"  # y_grad = u_psi(x, y_hat), [B, num_grades]

# Label smoothing of the stage-1 grade that the label update network starts from (the usual
# 0.1 of Szegedy et al. 2016; see build_label_update_net).
DEFAULT_SMOOTHING = 0.1

# Section 4.1 fuses soft and hard exudates, haemorrhages and microaneurysms into one mask: the
# "lesions" pixel-class set of drkeras.models.mtunet, whose class ids are 0 background, 1 MA,
# 2 HE, 3 EX, 4 SE ("lesions_od" adds 5 optic disc).
FUSED_CLASS_SET = "lesions"
FUSED_CLASSES = mtunet.class_names(FUSED_CLASS_SET)
NUM_FUSED_CLASSES = len(FUSED_CLASSES)


def _closing(mask, size: int):
    """Binary closing (dilation then erosion) with a ``size`` x ``size`` square, [B, H, W, C]."""
    # Zero padding makes the outside of the image background for the erosion too; pooling's
    # own SAME padding would ignore it and let the dilation leak into the image border.
    padded = tf.pad(mask, [[0, 0], [size, size], [size, size], [0, 0]])
    dilated = tf.nn.max_pool2d(padded, size, 1, "SAME")
    closed = -tf.nn.max_pool2d(-dilated, size, 1, "SAME")
    return closed[:, size:-size, size:-size, :]


def fuse_lesion_masks(
    masks,
    *,
    class_set: str = FUSED_CLASS_SET,
    closing_size: int = 0,
    one_hot: bool = False,
):
    """Fuse a record's per-lesion masks into one multi-class mask (PLDMLT section 4.1).

    Class ids (``FUSED_CLASSES``): 0 background, 1 MA, 2 HE, 3 EX, 4 SE; the optic disc is not a
    lesion and stays background unless ``class_set="lesions_od"`` (id 5). Where lesions
    overlap, the earlier one in the record order MA > HE > EX > SE wins, as in
    :func:`drkeras.models.mtunet.masks_to_classes`, which does the fusing: microaneurysms are
    the smallest lesions and would otherwise vanish under a haemorrhage. Masks not annotated
    for a record are all-zero in ``parse_example`` and so count as empty.

    The paper fuses the masks "using morphological methods"; ``closing_size > 1`` first applies
    a binary closing with that square to each lesion mask, joining fragments split by a pixel
    or two (the paper gives no structuring element; ``0`` keeps the masks as annotated).

    Works eagerly and inside ``tf.data``.

    Args:
        masks: ``[H, W, 5]`` or ``[B, H, W, 5]`` masks in the record order ``drkeras.keys.LESIONS``
            (values ``{0, 1}``, ``{0, 255}`` or bool).
        class_set: ``"lesions"`` or ``"lesions_od"`` (a class set of ``mtunet.CLASS_SETS``).
        closing_size: side of the closing's square structuring element (0 or 1: none).
        one_hot: return float32 one-hot ``[..., H, W, num_classes]`` instead of ids.

    Returns:
        ``uint8`` class ids ``[..., H, W]``, or the one-hot tensor (the segmentation target).

    Example::

        target = fuse_lesion_masks(example["masks"], one_hot=True)   # [H, W, 5]
    """
    masks = tf.convert_to_tensor(masks)
    rank = masks.shape.rank
    if rank not in (3, 4) or masks.shape[-1] != keys.NUM_LESIONS:
        raise ValueError(
            f"masks must be [H, W, {keys.NUM_LESIONS}] or [B, H, W, {keys.NUM_LESIONS}] in the "
            f"order {keys.LESIONS}; got shape {masks.shape}"
        )
    if closing_size > 1:
        binary = tf.cast(tf.cast(masks, tf.float32) > 0.5, tf.float32)
        closed = _closing(binary if rank == 4 else binary[None], int(closing_size))
        masks = closed if rank == 4 else closed[0]
    classes = mtunet.masks_to_classes(masks, class_set)
    if one_hot:
        return classes
    return tf.cast(tf.argmax(classes, axis=-1), tf.uint8)


def make_training_pair(
    image,
    masks,
    pseudo_grade,
    grade_mask=None,
    *,
    num_grades: int = keys.NUM_GRADES,
    class_set: str = FUSED_CLASS_SET,
    closing_size: int = 0,
):
    """One ``(x, y)`` element for :class:`drkeras.training.bilevel.BilevelMultiTaskTrainer`.

    ``x = {IMAGE: image, PSEUDO_GRADE: one-hot y_hat, GRADE_MASK: M}`` and ``y`` the fused
    one-hot lesion mask (:func:`fuse_lesion_masks`). Works on one example or a batch, eagerly
    and in ``tf.data``.

    Args:
        image: preprocessed ``[..., H, W, 3]`` float image(s).
        masks: record-order ``[..., H, W, 5]`` lesion masks at the image size.
        pseudo_grade: integer stage-1 grade(s) (``refine_pseudo_grades(...)["grades"]``).
        grade_mask: allowed grades ``[..., num_grades]`` (``refine_pseudo_grades(...)
            ["allowed"]``); ``None`` allows every grade.
        num_grades, class_set, closing_size: as in :func:`fuse_lesion_masks`.

    Example::

        ds = tf.data.Dataset.from_tensor_slices((images, masks, stage1["grades"],
                                                 stage1["allowed"])).map(make_training_pair)
    """
    pseudo = tf.one_hot(tf.cast(pseudo_grade, tf.int32), num_grades, dtype=tf.float32)
    allowed = tf.ones_like(pseudo) if grade_mask is None else tf.cast(grade_mask, tf.float32)
    x = {keys.IMAGE: image, PSEUDO_GRADE: pseudo, GRADE_MASK: allowed}
    y = fuse_lesion_masks(masks, class_set=class_set, closing_size=closing_size, one_hot=True)
    return x, y


def masked_softmax(logits, mask, axis: int = -1):
    """Softmax restricted to the entries where ``mask`` is 1 (PLDMLT Eq. 4).

    ``p_i = M_i exp(z_i) / sum_j M_j exp(z_j)``: the grades outside the binary mask ``M``
    (built from the pseudo grade and the grading hierarchy, see
    :func:`drkeras.pseudo_grades.refine_pseudo_grades`) get probability 0. Eq. 4 is printed as
    ``exp(M * z) / sum exp(M * z)``, which would give masked entries ``exp(0) / Z`` rather than
    0; we follow the mask softmax of meta auxiliary learning (Liu et al. 2019, MAXL), whose
    notation ``M = B(y, psi)`` the paper reuses (its ref. [26]), where masked entries are
    exactly 0. With ``M`` all ones (every grade allowed, the five-grade hierarchy of Sec. 3.3.2
    that ``experiments/pldmlt.py`` uses by default) both forms are the plain softmax. A row
    whose mask is all zero is left unconstrained (plain softmax).

    Implemented as ``softmax(z + (M - 1) * 1e9)``: allowed logits are used exactly, the others
    underflow to probability 0, and the result is smooth in ``z`` (the second-order
    meta-gradient of Algorithm 1 differentiates through it).

    Example::

        masked_softmax(tf.constant([[0.0, 0.0, 5.0]]), tf.constant([[1.0, 1.0, 0.0]]))
        # -> [[0.5, 0.5, 0.0]]
    """
    logits = tf.convert_to_tensor(logits)
    mask = tf.cast(mask, logits.dtype)
    unconstrained = tf.logical_not(tf.reduce_any(mask > 0, axis=axis, keepdims=True))
    mask = tf.where(unconstrained, tf.ones_like(mask), mask)
    return tf.nn.softmax(logits + (mask - 1.0) * tf.constant(1e9, logits.dtype), axis=axis)


@keras.saving.register_keras_serializable(package="drkeras")
class MaskedSoftmax(keras.layers.Layer):
    """Keras layer for :func:`masked_softmax`: ``MaskedSoftmax()([logits, mask])`` (Eq. 4).

    :func:`build_label_update_net` gives it the float type ``keras.backend.floatx()`` (float32
    under a mixed-precision policy), since its output is a training target.
    """

    def __init__(self, axis: int = -1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis

    def call(self, inputs):
        logits, mask = inputs
        return masked_softmax(tf.cast(logits, self.compute_dtype), mask, axis=self.axis)

    def get_config(self):
        return {**super().get_config(), "axis": self.axis}


def pseudo_grade_prior(pseudo, smoothing: float = DEFAULT_SMOOTHING):
    """Logits of the label-smoothed stage-1 grade: ``log((1 - s) y_hat + s / G)``.

    Their softmax is ``(1 - s) y_hat + s / G``: the pseudo grade with probability
    ``1 - s + s / G``, every other grade ``s / G`` (``G`` = last axis of ``pseudo``).

    Example::

        pseudo_grade_prior(tf.one_hot([2], 5), 0.1)   # softmax -> [[.02, .02, .92, .02, .02]]
    """
    if not 0.0 < float(smoothing) < 1.0:
        raise ValueError(
            f"smoothing of the label update network's prior must be in (0, 1), got {smoothing} "
            "(0 would start from a one-hot, saturated label that cannot move)"
        )
    pseudo = tf.convert_to_tensor(pseudo)
    count = tf.cast(tf.shape(pseudo)[-1], pseudo.dtype)
    return tf.math.log((1.0 - smoothing) * pseudo + smoothing / count)


@keras.saving.register_keras_serializable(package="drkeras")
class PseudoGradePrior(keras.layers.Layer):
    """Keras layer for :func:`pseudo_grade_prior` (``label_prior`` of the label update network).

    Built with the float type ``keras.backend.floatx()`` by :func:`build_label_update_net`.
    """

    def __init__(self, smoothing: float = DEFAULT_SMOOTHING, **kwargs):
        super().__init__(**kwargs)
        pseudo_grade_prior(tf.ones((1, 2)), smoothing)  # validates smoothing
        self.smoothing = float(smoothing)

    def call(self, pseudo):
        return pseudo_grade_prior(tf.cast(pseudo, self.compute_dtype), self.smoothing)

    def get_config(self):
        return {**super().get_config(), "smoothing": self.smoothing}


def build_label_update_net(
    *,
    input_shape: Tuple[int, int, int],
    num_grades: int = keys.NUM_GRADES,
    widths: Sequence[int] = (16, 32, 64),
    hidden: int = 64,
    smoothing: float = DEFAULT_SMOOTHING,
    name: str = "label_update_net",
) -> keras.Model:
    """The label update network ``y_grad = u_psi(x, y_hat)`` of PLDMLT (section 3.3, Fig. 5).

    Fig. 5 is not in our copy of the paper. Its text fixes three things: the network *updates*
    the stage-1 pseudo label ``y_hat`` (Sec. 3.3.1, ``y_grad = u(x, y_grad, psi)``), its output
    goes through the mask softmax of Eq. 4, and it learns through the multi-task network
    (Algorithm 1, the meta-auxiliary-learning scheme of its ref. [26]). Our design is a residual
    correction of the stage-1 label:

        ``logits = log((1 - s) y_hat + s / G) + c_psi(x, y_hat)``,
        ``y_grad = masked_softmax(logits, M)`` (Eq. 4),

    1. the prior ``log((1 - s) y_hat + s / G)`` (``label_prior``, :class:`PseudoGradePrior`):
       the stage-1 grade label-smoothed by ``s = smoothing`` over the ``G`` grades, so the
       pseudo grade starts with probability ``1 - s + s / G`` (0.92 for ``s = 0.1``, ``G = 5``)
       and every other grade with ``s / G`` (renormalised over the allowed grades ``M``);
    2. the correction ``c_psi`` (``label_correction``): the image, standardised per image and
       channel inside the network (``label_input_norm``, so caffe-, torch- or [0, 1]-scaled
       inputs all reach the convolutions at unit scale), concatenated with the one-hot
       ``y_hat`` broadcast to every pixel (``H x W x (3 + G)``); ``len(widths)`` blocks of 3x3
       convolution + ReLU + 2x2 max pooling (``label_block{i}_conv``, ``label_block{i}_pool``),
       global average pooling, a ReLU dense layer of ``hidden`` units concatenated with
       ``y_hat``, and a dense layer of ``G`` outputs whose kernel and bias start at zero.

    Why: at initialisation the output is exactly the smoothed stage-1 label (within ``M``), so
    stage 2 starts from the labels of stage 1, as Sec. 3.3.1 says, and never from a grade chosen
    by the random initialisation; the smoothing keeps the softmax away from saturation (its
    derivative ``p (1 - p)`` is about 0.07 at the pseudo grade, not ~0 as for a one-hot target
    or for random logits of spread 8-17), so the second-order meta-gradient of Algorithm 1 moves
    the label from the first step. Without the input standardisation, caffe-scaled pixels
    (values of order 100) gave random logits of that spread and a meta-gradient of about 2e-9.
    The zero-initialised last layer is the usual way to start a residual branch at the
    identity: in the first step only it receives a gradient, from the second step on the
    whole branch does.

    Args:
        input_shape: image shape ``(H, W, 3)``; must be static (the grade is broadcast to it).
        num_grades: number of grades ``G`` (5 for ICDRS).
        widths: filters of the convolution blocks.
        hidden: units of the dense layer.
        smoothing: ``s`` of the prior, in (0, 1); 0 would be a one-hot, saturated start.
        name: model name.

    Returns:
        a functional model with dict inputs ``{IMAGE, PSEUDO_GRADE, GRADE_MASK}`` and dict
        output ``{CORRECTED_GRADE: [B, num_grades]}`` (probabilities, zero outside ``M``).

    Example::

        u_psi = build_label_update_net(input_shape=(64, 64, 3), widths=(8, 16))
        y_grad = u_psi({"image": x, "pseudo_grade": y_hat, "grade_mask": m})["corrected_grade"]
    """
    height, width, _ = input_shape
    if height is None or width is None:
        raise ValueError(f"build_label_update_net needs a static input_shape, got {input_shape}")
    image = keras.Input(input_shape, name=keys.IMAGE)
    pseudo = keras.Input((num_grades,), name=PSEUDO_GRADE)
    grade_mask = keras.Input((num_grades,), name=GRADE_MASK)
    # Per image and channel over H x W: the scale of the input normalisation does not matter.
    x = keras.layers.LayerNormalization(
        axis=(1, 2), center=False, scale=False, epsilon=1e-6, name="label_input_norm"
    )(image)
    grade_map = keras.layers.Reshape((1, 1, num_grades), name="label_grade_reshape")(pseudo)
    grade_map = NearestUpSampling2D((height, width), name="label_grade_broadcast")(grade_map)
    x = keras.layers.Concatenate(name="label_input_concat")([x, grade_map])
    for i, filters in enumerate(widths, start=1):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", activation="relu", name=f"label_block{i}_conv"
        )(x)
        x = keras.layers.MaxPooling2D(2, name=f"label_block{i}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="label_gap")(x)
    x = keras.layers.Dense(hidden, activation="relu", name="label_hidden")(x)
    x = keras.layers.Concatenate(name="label_head_concat")([x, pseudo])
    correction = keras.layers.Dense(
        num_grades, kernel_initializer="zeros", bias_initializer="zeros", name="label_correction"
    )(x)
    floatx = keras.backend.floatx()
    prior = PseudoGradePrior(smoothing, dtype=floatx, name="label_prior")(pseudo)
    # Added in floatx (a float16 correction is cast up by the layer's autocasting).
    logits = keras.layers.Add(dtype=floatx, name="label_logits")([prior, correction])
    corrected = MaskedSoftmax(dtype=floatx, name=CORRECTED_GRADE)([logits, grade_mask])
    return keras.Model(
        {keys.IMAGE: image, PSEUDO_GRADE: pseudo, GRADE_MASK: grade_mask},
        {CORRECTED_GRADE: corrected},
        name=name,
    )
