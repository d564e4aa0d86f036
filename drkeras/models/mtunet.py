"""MTUnet (Foo et al. 2020) and its variants; the VGG16-UNet multi-task builder shared with PLDMLT.

Foo, Hsu, Lee, Lim, Wong. "Multi-Task Learning for Diabetic Retinopathy Grading and Lesion
Segmentation", AAAI 2020. The paper compares three ways of adding DR grading to a UNet:

- variant A (Fig. 2): a grading output at the end of the decoder (:func:`build_mtunet_variant_a`);
- variant B (Fig. 3): two steps, the UNet's masks feed a grading network
  (:func:`build_mtunet_variant_b`, trained with :func:`compile_two_step`);
- variant C = MTUnet (Fig. 4, 5): VGG16 encoder whose end (global max pooling + dense) grades,
  mirrored transposed-convolution decoder that segments (:func:`build_vgg16_unet`).

``build_vgg16_unet`` is also the multi-task network of PLDMLT (section 3.2: VGG16 encoder, pooling
+ fully connected grading head at the end of the encoder, segmentation at the end of the decoder),
with ``grade_pooling="avg"``; its signature is a contract other modules rely on.

Pixel classes. Eq. (1) speaks of an ``h x w x 5`` output but the results are reported for red
lesions (MA + HE) and yellow lesions (EX + SE) (Table 2) and Fig. 6 paints red lesions, yellow
lesions and the optic disc. We read that as four mutually exclusive classes, ``background / red /
yellow / optic_disc`` (:data:`DEFAULT_CLASS_SET`, "red_yellow_od"); the other readings are
available as ``class_set`` values (:data:`CLASS_SETS`). Overlaps in the record masks are resolved
by the record's lesion order, MA > HE > EX > SE > OD: the earliest annotated lesion type of a pixel
decides its class, so red beats yellow beats optic disc. Rationale: the rarer, smaller and more
grade-defining lesions must not vanish under a large structure (a haemorrhage on the disc stays a
haemorrhage), and red lesions alone define mild DR.

Loss: ``L = L_B + alpha * L_C`` (Eq. 3, alpha = 1): binary cross-entropy over pixels and classes
(Eq. 1) plus categorical cross-entropy on the grade (Eq. 2), as Keras ``loss_weights``; MTUnet has
no custom trainer, it trains with ``fit`` (:func:`compile_mtunet`). Keras averages Eq. (1) over
pixels and classes where the paper writes a sum; the mean is what a Keras implementation with
``binary_crossentropy`` (the paper's framework) optimises, and keeps alpha = 1 meaningful.
It is computed on the probabilities (:class:`PixelBinaryCrossentropy`): Keras 2's own
``BinaryCrossentropy`` silently swaps a softmax output for a sigmoid of its logits.

Example::

    model = build_mtunet(input_shape=(512, 512, 3), encoder_weights="imagenet")
    compile_mtunet(model, alpha=1.0, lr=1e-5)
    # dataset elements: (image, {"seg_probs": one-hot HxWx4, "grade_probs": int grade})
    model.fit(dataset, epochs=50)
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import tensorflow as tf
from tensorflow import keras

from drkeras import keys, losses
from drkeras.models import blocks

__all__ = [
    "CLASS_SETS",
    "DEFAULT_CLASS_SET",
    "PixelBinaryCrossentropy",
    "VARIANTS",
    "build_mtunet",
    "build_mtunet_variant_a",
    "build_mtunet_variant_b",
    "build_vgg16_unet",
    "class_names",
    "classes_annotated",
    "compile_mtunet",
    "compile_two_step",
    "lesion_class_indices",
    "masks_to_classes",
]

# Each class set: ordered (class name, record lesion types that make the class). Class 0 is
# always the background (no lesion type of the set present).
CLASS_SETS: Dict[str, Tuple[Tuple[str, Tuple[str, ...]], ...]] = {
    "red_yellow_od": (
        ("background", ()),
        ("red", ("MA", "HE")),
        ("yellow", ("EX", "SE")),
        ("optic_disc", ("OD",)),
    ),
    "red_yellow": (("background", ()), ("red", ("MA", "HE")), ("yellow", ("EX", "SE"))),
    "lesions": (("background", ()),) + tuple((t, (t,)) for t in keys.LESIONS if t != "OD"),
    "lesions_od": (("background", ()),) + tuple((t, (t,)) for t in keys.LESIONS),
}
DEFAULT_CLASS_SET = "red_yellow_od"
VARIANTS = ("A", "B", "C")
# Lesion types that are signs of DR (the optic disc is anatomy, present in every eye).
_DR_LESIONS = ("MA", "HE", "EX", "SE")


def _class_set(class_set: str):
    if class_set not in CLASS_SETS:
        raise ValueError(f"unknown class_set {class_set!r}; choose one of {sorted(CLASS_SETS)}")
    return CLASS_SETS[class_set]


def class_names(class_set: str = DEFAULT_CLASS_SET) -> Tuple[str, ...]:
    """The pixel-class names of ``class_set``, in channel order.

    Example: ``class_names("red_yellow_od") == ("background", "red", "yellow", "optic_disc")``.
    """
    return tuple(name for name, _ in _class_set(class_set))


def lesion_class_indices(class_set: str = DEFAULT_CLASS_SET) -> Tuple[int, ...]:
    """Channels of ``class_set`` made of DR lesions (MA, HE, EX, SE), i.e. not background/disc.

    These are the outputs ignored for grade-0 images in the semi-supervised process (Fig. 7).
    Example: ``lesion_class_indices("red_yellow_od") == (1, 2)``.
    """
    return tuple(
        i
        for i, (_, sources) in enumerate(_class_set(class_set))
        if any(t in _DR_LESIONS for t in sources)
    )


def masks_to_classes(masks, class_set: str = DEFAULT_CLASS_SET) -> tf.Tensor:
    """One-hot pixel classes from the 5-channel record masks (MA, HE, EX, SE, OD).

    A pixel takes the class of its earliest annotated lesion type in the record order
    MA > HE > EX > SE > OD (so red > yellow > optic disc); lesion types the class set does not
    use are ignored; a pixel with none is background (class 0). Works eagerly and in
    ``tf.data``, on one mask ``(H, W, 5)`` or a batch ``(B, H, W, 5)``; any value > 0.5 counts
    as present (``{0, 1}`` uint8, ``{0, 255}``, bool or resized float masks).

    Args:
        masks: ``(..., H, W, 5)`` masks in ``drkeras.keys.LESIONS`` order.
        class_set: a key of :data:`CLASS_SETS`.

    Returns:
        float32 ``(..., H, W, len(class_names(class_set)))`` one-hot.

    Raises:
        ValueError: the last dimension is not 5.

    Example::

        m = np.zeros((1, 2, 5), np.uint8); m[0, 0, [1, 2]] = 1; m[0, 1, 4] = 1   # HE+EX | OD
        masks_to_classes(m)  # [[[0, 1, 0, 0], [0, 0, 0, 1]]]: red wins over yellow
    """
    spec = _class_set(class_set)
    masks = tf.convert_to_tensor(masks)
    if masks.shape.rank is not None and masks.shape.rank < 3:
        raise ValueError(
            f"masks_to_classes: expected masks of shape (..., H, W, {keys.NUM_LESIONS}), "
            f"got shape {masks.shape}"
        )
    if masks.shape[-1] != keys.NUM_LESIONS:
        raise ValueError(
            f"masks_to_classes: expected {keys.NUM_LESIONS} mask channels in the order "
            f"{keys.LESIONS}, got shape {masks.shape}"
        )
    present = tf.cast(masks, tf.float32) > 0.5
    class_of = {t: i for i, (_, sources) in enumerate(spec) for t in sources}
    labels = tf.zeros(tf.shape(masks)[:-1], tf.int32)
    # Paint from the lowest priority to the highest so the earliest lesion type wins.
    for channel in reversed(range(keys.NUM_LESIONS)):
        lesion = keys.LESIONS[channel]
        if lesion in class_of:
            labels = tf.where(present[..., channel], class_of[lesion], labels)
    return tf.one_hot(labels, len(spec), dtype=tf.float32)


def classes_annotated(mask_present, class_set: str = DEFAULT_CLASS_SET) -> tf.Tensor:
    """Which classes of ``class_set`` an example's masks can be trusted for.

    A class is annotated when every lesion type it is made of is annotated (``mask_present``);
    the background is annotated only when every lesion type of the set is (a missing OD mask
    would otherwise turn the disc into background).

    Args:
        mask_present: bool ``(..., 5)`` in ``drkeras.keys.LESIONS`` order.

    Returns:
        bool ``(..., num_classes)``.

    Example: with OD not annotated, ``classes_annotated([1, 1, 1, 1, 0])`` is
    ``[False, True, True, False]`` for "red_yellow_od".
    """
    spec = _class_set(class_set)
    present = tf.cast(tf.convert_to_tensor(mask_present), tf.bool)
    if present.shape[-1] != keys.NUM_LESIONS:
        raise ValueError(
            f"classes_annotated: expected mask_present with {keys.NUM_LESIONS} entries "
            f"{keys.LESIONS}, got shape {present.shape}"
        )

    def all_of(types):
        idx = [keys.LESIONS.index(t) for t in types]
        return tf.reduce_all(tf.gather(present, idx, axis=-1), axis=-1)

    used = sorted({t for _, sources in spec for t in sources}, key=keys.LESIONS.index)
    columns = [all_of(sources) if sources else all_of(used) for _, sources in spec]
    return tf.stack(columns, axis=-1)


def _vgg16_unet(
    *,
    input_shape,
    num_seg_classes,
    seg_activation,
    num_grades,
    grade_pooling,
    grade_hidden,
    encoder_weights,
    width,
    dropout,
    grade_from,
    name,
) -> keras.Model:
    """The VGG16-UNet with the grading head on the encoder (variant C) or decoder (variant A)."""
    if encoder_weights is not None and width != 1.0:
        raise ValueError(
            f"{name}: {blocks.WEIGHTS_OPTION}={encoder_weights!r} needs width=1.0 (the pretrained "
            f"VGG16 has fixed widths), got width={width}; set model.width=1.0 or "
            f"{blocks.WEIGHTS_OPTION}=none"
        )
    shape = blocks.check_input_shape(
        input_shape,
        what=name,
        min_size=blocks.VGG16_DOWNSAMPLING,
        multiple=blocks.VGG16_DOWNSAMPLING,
        channels=3 if encoder_weights is not None else None,
    )
    blocks.seg_output_name(seg_activation)
    # Fetch and check the weights before building, so a bad option fails fast.
    weights_file = blocks.vgg16_weights_file(encoder_weights)
    inputs = keras.Input(shape, name=keys.IMAGE)
    skips, bottom = blocks.vgg16_encoder(inputs, width=width)
    features = blocks.vgg16_decoder(bottom, skips, width=width)
    outputs = blocks.segmentation_head(
        features, num_classes=num_seg_classes, activation=seg_activation
    )
    if num_grades is not None:
        outputs.update(
            blocks.grading_head(
                bottom if grade_from == "encoder" else features,
                num_grades=num_grades,
                pooling=grade_pooling,
                hidden=tuple(grade_hidden),
                dropout=dropout,
            )
        )
    model = keras.Model(inputs, outputs, name=name)
    blocks.load_vgg16_encoder_weights(model, weights_file)
    return model


def build_vgg16_unet(
    *,
    input_shape: Sequence[Optional[int]],
    num_seg_classes: int,
    seg_activation: str = "softmax",
    num_grades: Optional[int] = keys.NUM_GRADES,
    grade_pooling: str = "max",
    grade_hidden: Sequence[int] = (),
    encoder_weights: Optional[str] = None,
    width: float = 1.0,
    dropout: float = 0.0,
    name: str = "vgg16_unet",
) -> keras.Model:
    """The VGG16-UNet multi-task network: MTUnet (variant C) and PLDMLT's network.

    Encoder: VGG16's five convolutional blocks with ``keras.applications.VGG16`` layer names;
    skips are taken before every max-pool (``block1_conv2`` .. ``block5_conv3``). Grading:
    global max (MTUnet) or average (PLDMLT) pooling of ``block5_pool`` ("at the end of the 5th
    VGG-16 convolutional block"), optional hidden dense layers, dense softmax. Decoder: five
    stages mirroring VGG16 with 3x3 transposed convolutions, He-normal init. Segmentation:
    1x1 convolution with softmax (mutually exclusive pixel classes, MTUnet) or sigmoid.
    (Foo et al. 2020, "Proposed Network", Fig. 4-5; PLDMLT section 3.2, Fig. 4.)

    Args:
        input_shape: ``(H, W, C)``, ``H`` and ``W`` multiples of 32 (or ``None``); the paper
            uses ``(512, 512, 3)``, PLDMLT ``(1024, 1024, 3)``.
        num_seg_classes: pixel classes (``len(class_names(class_set))`` for MTUnet).
        seg_activation: ``"softmax"`` (output ``keys.SEG_PROBS``) or ``"sigmoid"``
            (``keys.LESION_PROBS``).
        num_grades: grades of the grading head; ``None`` builds a segmentation-only UNet.
        grade_pooling: ``"max"`` (MTUnet) or ``"avg"`` (PLDMLT).
        grade_hidden: units of hidden ReLU dense layers of the grading head.
        encoder_weights: ``None``, ``"imagenet"`` (downloaded once; offline this fails with
            :class:`~drkeras.models.blocks.PretrainedWeightsUnavailable` naming
            ``model.encoder_weights``) or a path to VGG16 HDF5 weights; needs ``width=1.0``.
        width: filter multiplier of encoder and decoder (1.0 = VGG16).
        dropout: dropout rate in the grading head.
        name: model name.

    Returns:
        A functional model from ``keys.IMAGE`` to a dict with ``keys.LESION_LOGITS``, the
        segmentation probabilities (``keys.SEG_PROBS`` or ``keys.LESION_PROBS``) and, with a
        grading head, ``keys.GRADE_LOGITS`` and ``keys.GRADE_PROBS``.

    Example::

        model = build_vgg16_unet(input_shape=(64, 64, 3), num_seg_classes=4, width=0.125)
        out = model(tf.zeros((1, 64, 64, 3)))
        out["seg_probs"].shape, out["grade_probs"].shape   # (1, 64, 64, 4), (1, 5)
    """
    return _vgg16_unet(
        input_shape=input_shape,
        num_seg_classes=num_seg_classes,
        seg_activation=seg_activation,
        num_grades=num_grades,
        grade_pooling=grade_pooling,
        grade_hidden=grade_hidden,
        encoder_weights=encoder_weights,
        width=width,
        dropout=dropout,
        grade_from="encoder",
        name=name,
    )


def build_mtunet_variant_a(
    *,
    input_shape: Sequence[Optional[int]],
    num_seg_classes: int,
    seg_activation: str = "softmax",
    num_grades: int = keys.NUM_GRADES,
    grade_pooling: str = "max",
    grade_hidden: Sequence[int] = (),
    encoder_weights: Optional[str] = None,
    width: float = 1.0,
    dropout: float = 0.0,
    name: str = "mtunet_variant_a",
) -> keras.Model:
    """Variant A (Foo et al. 2020, Fig. 2): the grading output at the end of the decoder.

    The same VGG16-UNet as :func:`build_vgg16_unet`, but the grading head pools the last
    decoder feature map (``decoder_stage1_conv2``) instead of ``block5_pool``. Arguments and
    outputs as :func:`build_vgg16_unet`.

    Example: ``build_mtunet_variant_a(input_shape=(64, 64, 3), num_seg_classes=4, width=0.125)``.
    """
    if num_grades is None:
        raise ValueError("variant A is a multi-task network: num_grades cannot be None")
    return _vgg16_unet(
        input_shape=input_shape,
        num_seg_classes=num_seg_classes,
        seg_activation=seg_activation,
        num_grades=num_grades,
        grade_pooling=grade_pooling,
        grade_hidden=grade_hidden,
        encoder_weights=encoder_weights,
        width=width,
        dropout=dropout,
        grade_from="decoder",
        name=name,
    )


def build_mtunet_variant_b(
    *,
    input_shape: Sequence[Optional[int]],
    num_seg_classes: int,
    seg_activation: str = "softmax",
    num_grades: int = keys.NUM_GRADES,
    grade_pooling: str = "max",
    grade_hidden: Sequence[int] = (),
    encoder_weights: Optional[str] = None,
    width: float = 1.0,
    dropout: float = 0.0,
    grader_inputs: str = "image_and_masks",
    name: str = "mtunet_variant_b",
) -> keras.Model:
    """Variant B (Foo et al. 2020, Fig. 3): a two-step network, UNet masks feed a grader.

    Two sub-models: ``segmenter`` (the segmentation-only VGG16-UNet of
    :func:`build_vgg16_unet`) and ``grader`` (a VGG16-topology encoder plus the same grading
    head) that reads the segmenter's probabilities, concatenated to the image by default
    (``grader_inputs="image_and_masks"``; ``"masks"`` gives it the masks alone). The grader's
    first convolution sees ``3 + num_seg_classes`` channels, so it starts from random weights;
    ``encoder_weights`` initialise the segmenter's encoder. Train in the paper's two steps
    with :func:`compile_two_step` (``step=1``: segmentation, ``step=2``: grading with the
    segmenter frozen).

    Returns:
        A model with the same named outputs as :func:`build_vgg16_unet`; its layers
        ``segmenter`` and ``grader`` are the sub-models.

    Example::

        model = build_mtunet_variant_b(input_shape=(64, 64, 3), num_seg_classes=4, width=0.125)
        compile_two_step(model, step=1); model.fit(data)   # segmentation
        compile_two_step(model, step=2); model.fit(data)   # grading
    """
    if grader_inputs not in ("image_and_masks", "masks"):
        raise ValueError(
            f"grader_inputs must be 'image_and_masks' or 'masks', got {grader_inputs!r}"
        )
    if num_grades is None:
        raise ValueError("variant B is a multi-task network: num_grades cannot be None")
    segmenter = build_vgg16_unet(
        input_shape=input_shape,
        num_seg_classes=num_seg_classes,
        seg_activation=seg_activation,
        num_grades=None,
        encoder_weights=encoder_weights,
        width=width,
        name="segmenter",
    )
    seg_name = blocks.seg_output_name(seg_activation)
    height, width_px, channels = segmenter.input_shape[1:]
    grader_channels = num_seg_classes + (channels if grader_inputs == "image_and_masks" else 0)
    grader_in = keras.Input((height, width_px, grader_channels), name="grader_input")
    _, grader_bottom = blocks.vgg16_encoder(grader_in, width=width)
    grader = keras.Model(
        grader_in,
        blocks.grading_head(
            grader_bottom,
            num_grades=num_grades,
            pooling=grade_pooling,
            hidden=tuple(grade_hidden),
            dropout=dropout,
        ),
        name="grader",
    )

    inputs = keras.Input(segmenter.input_shape[1:], name=keys.IMAGE)
    seg = segmenter(inputs)
    if grader_inputs == "image_and_masks":
        grader_x = keras.layers.Concatenate(name="image_and_masks")([inputs, seg[seg_name]])
    else:
        grader_x = seg[seg_name]
    grade = grader(grader_x)
    # Identity layers give the outputs top-level names: Keras names losses and logs after them.
    outputs = {
        key: keras.layers.Activation("linear", dtype="float32", name=key)(tensor)
        for key, tensor in {**seg, **grade}.items()
    }
    return keras.Model(inputs, outputs, name=name)


def build_mtunet(
    *,
    input_shape: Sequence[Optional[int]] = (512, 512, 3),
    variant: str = "C",
    class_set: str = DEFAULT_CLASS_SET,
    num_grades: int = keys.NUM_GRADES,
    grade_hidden: Sequence[int] = (),
    encoder_weights: Optional[str] = None,
    width: float = 1.0,
    dropout: float = 0.0,
    name: Optional[str] = None,
) -> keras.Model:
    """MTUnet or one of its variants with the paper's choices (softmax pixels, max pooling).

    Args:
        input_shape: ``(512, 512, 3)`` in the paper ("Performance Study").
        variant: ``"A"``, ``"B"`` or ``"C"`` (= MTUnet), Foo et al. 2020 Fig. 2-4.
        class_set: a key of :data:`CLASS_SETS`; sets the number of pixel classes.
        num_grades, grade_hidden, encoder_weights, width, dropout: as in
            :func:`build_vgg16_unet`.
        name: model name (default ``"mtunet"`` / ``"mtunet_variant_{a,b}"``).

    Example::

        model = build_mtunet(input_shape=(64, 64, 3), variant="C", width=0.125)
        sorted(model.output_names)   # grade_logits, grade_probs, lesion_logits, seg_probs
    """
    builders = {"A": build_mtunet_variant_a, "B": build_mtunet_variant_b, "C": build_vgg16_unet}
    if variant not in builders:
        raise ValueError(f"unknown MTUnet variant {variant!r}; choose one of {VARIANTS}")
    default_names = {"A": "mtunet_variant_a", "B": "mtunet_variant_b", "C": "mtunet"}
    return builders[variant](
        input_shape=input_shape,
        num_seg_classes=len(class_names(class_set)),
        seg_activation="softmax",
        num_grades=num_grades,
        grade_pooling="max",
        grade_hidden=grade_hidden,
        encoder_weights=encoder_weights,
        width=width,
        dropout=dropout,
        name=name or default_names[variant],
    )


def _seg_key(model: keras.Model) -> str:
    found = [k for k in (keys.SEG_PROBS, keys.LESION_PROBS) if k in model.output_names]
    if len(found) != 1 or keys.GRADE_PROBS not in model.output_names:
        raise ValueError(
            f"model {model.name!r} has outputs {model.output_names}; expected one of "
            f"{keys.SEG_PROBS!r}/{keys.LESION_PROBS!r} and {keys.GRADE_PROBS!r}"
        )
    return found[0]


@keras.saving.register_keras_serializable(package="drkeras")
class PixelBinaryCrossentropy(keras.losses.Loss):
    """Binary cross-entropy of pixel probabilities, Eq. (1) of Foo et al. 2020 (as a mean).

    ``L_B = -mean_{i,j,k} [Y log S + (1 - Y) log(1 - S)]`` over the pixels and classes of each
    image, computed on the probabilities ``S`` themselves by
    :func:`drkeras.losses.binary_crossentropy`, then averaged over the batch. Keras 2's
    ``BinaryCrossentropy`` cannot be used on a softmax output: it finds the softmax's input
    logits (``_keras_logits``) and computes a *sigmoid* cross-entropy of them, a different loss
    from Eq. (1).

    Example::

        loss = PixelBinaryCrossentropy()
        loss([[[[0.0, 1.0]]]], [[[[0.2, 0.8]]]])   # -(log 0.8 + log 0.8) / 2 = 0.2231
    """

    def __init__(self, name: str = "pixel_binary_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)

    def call(self, y_true, y_pred):
        return losses.binary_crossentropy(y_true, y_pred)


def _losses(seg_key: str) -> dict:
    # Eq. (1): binary cross-entropy on the pixel probabilities; Eq. (2): categorical
    # cross-entropy on the grade, with integer grades as targets (Keras computes it from the
    # softmax's logits, which is the same quantity, computed stably).
    return {
        seg_key: PixelBinaryCrossentropy(name="seg_loss"),
        keys.GRADE_PROBS: keras.losses.SparseCategoricalCrossentropy(name="grade_loss"),
    }


def compile_mtunet(
    model: keras.Model,
    *,
    alpha: float = 1.0,
    lr: float = 1e-5,
    optimizer: Optional[keras.optimizers.Optimizer] = None,
    **compile_kwargs,
) -> keras.Model:
    """Compile a multi-task model with ``L = L_B + alpha * L_C`` (Foo et al. 2020, Eq. 1-3).

    ``L_B``: binary cross-entropy between the pixel probabilities and the one-hot (or
    multi-label) masks; ``L_C``: categorical cross-entropy of the grade, given as an integer
    target; combined with Keras ``loss_weights={seg: 1, grade: alpha}``. Adam with learning rate
    1e-5 is the paper's optimiser ("Performance Study"). The logits outputs get no loss.

    Args:
        model: from :func:`build_mtunet` / :func:`build_vgg16_unet` (variants A, C; B trains
            in two steps with :func:`compile_two_step`, or jointly with this).
        alpha: weight of the grading loss (1 in the paper).
        lr: Adam learning rate, used when ``optimizer`` is None.
        optimizer: a built optimizer (e.g. ``drkeras.training.optim.build_optimizer(cfg)``).
        **compile_kwargs: passed to ``model.compile`` (``metrics``, ``jit_compile``, ...).

    Returns:
        ``model``, compiled; ``fit`` then logs ``loss``, ``<seg>_loss`` and ``grade_probs_loss``.

    Example::

        compile_mtunet(model, alpha=1.0)
        model.fit(images, {"seg_probs": masks, "grade_probs": grades}, epochs=50)
    """
    seg_key = _seg_key(model)
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(lr),
        loss=_losses(seg_key),
        loss_weights={seg_key: 1.0, keys.GRADE_PROBS: float(alpha)},
        **compile_kwargs,
    )
    return model


def compile_two_step(
    model: keras.Model,
    *,
    step: int,
    lr: float = 1e-5,
    optimizer: Optional[keras.optimizers.Optimizer] = None,
    **compile_kwargs,
) -> keras.Model:
    """Compile variant B for one of its two training steps (Foo et al. 2020, Fig. 3).

    Step 1 trains the ``segmenter`` on the segmentation loss (the ``grader`` frozen); step 2
    freezes the segmenter and trains the ``grader`` on the grading loss. Losses as in
    :func:`compile_mtunet`. Recompile (this function) between steps, as Keras requires after
    changing ``trainable``.

    Example::

        compile_two_step(model, step=1); model.fit(data, epochs=50)
        compile_two_step(model, step=2); model.fit(data, epochs=50)
    """
    if step not in (1, 2):
        raise ValueError(f"step must be 1 (segmentation) or 2 (grading), got {step!r}")
    seg_key = _seg_key(model)
    try:
        segmenter, grader = model.get_layer("segmenter"), model.get_layer("grader")
    except ValueError:
        raise ValueError(
            f"model {model.name!r} has no 'segmenter'/'grader' sub-models; compile_two_step "
            "is for build_mtunet_variant_b (use compile_mtunet for the others)"
        ) from None
    segmenter.trainable = step == 1
    grader.trainable = step == 2
    loss = _losses(seg_key)
    trained = seg_key if step == 1 else keys.GRADE_PROBS
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(lr),
        loss={trained: loss[trained]},
        **compile_kwargs,
    )
    return model
