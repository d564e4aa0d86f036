"""Networks of the cooperative joint segmentation and classification paper, and its baselines.

Paper: "Rethinking Convolutional Semantic Segmentation Learning", arXiv:1710.07991 (2017), whose
abstract proposes joint cooperative end-to-end learning (fidelity table:
``docs/papers/cooperative.md``): a shared encoder ``M`` feeds a
classifier agent ``C`` and a segmentation agent ``S`` (Eq. 1, Fig. 1, Fig. 5); the algorithm that
trains them with two optimizers is :class:`drkeras.training.cooperative.CooperativeTrainer`.

Networks (every layer named, functional, dict outputs keyed by :mod:`drkeras.keys`):

- :func:`residual_inception_block`: Fig. 2, and with ``factorized=True`` Fig. 3.
- :func:`build_shared_encoder` (``M``): a stem, then per level ``blocks`` cascaded residual
  inception blocks followed by a stride-2 convolution (section II-B: "strided convolution is used
  to down-sample"). Outputs ``encoder_output`` and the per-level maps ``E_i`` (``encoder_level{i}``,
  taken before each down-sampling, as Fig. 4 defines them).
- :func:`build_classifier_agent` (``C``): factorised residual inception blocks per level, global
  pooling and a dense layer (``grade_logits``, ``grade_probs``).
- :func:`build_segmentation_agent` (``S``): per stage a 2x2 stride-2 transposed convolution
  followed by partial attention (:func:`partial_attention`, Eq. 3), then a 1x1 softmax
  (``lesion_logits``, ``seg_probs``).
- :func:`build_cooperative_model`: the joint inference network ``image -> {grade_*, seg_*}``
  holding ``M``, ``C``, ``S`` as nested models named ``shared_encoder``, ``classifier_agent``,
  ``segmentation_agent`` (:func:`cooperative_agents` returns them).

Baselines of section III-A (Tables I-IV):

- :func:`build_inception_unet`: the paper's "UNet with the improved inception block": the same
  residual inception encoder with a UNet decoder (transposed convolution, concatenation of the
  encoder map of the same size, residual inception blocks).
- :func:`build_fcn8s`: FCN-8s (Long et al. 2015) on a VGG16 encoder whose fully connected layers
  are convolutions (``fc6`` 7x7, ``fc7`` 1x1), with the pool4/pool3 skips and bilinear-initialised
  transposed convolutions.
- :func:`build_encoder_classifier`: a classifier on a given encoder (global average pooling and a
  dense layer), the "pre-trained model trained on the eyepacs classification set" of Table I:
  train it, then build the segmenter on the *same* encoder instance.
- :func:`build_reference_grader`: VGG-19 and InceptionV3 from ``keras.applications`` with the
  drkeras grading head (Tables III-IV).

Reading choices (the paper gives no widths, depths or branch sizes; Figs. 2-5 are not in our
copy): each of the four inception branches has ``filters // 4`` filters; the branch with the
"additional convolution before max-pooling" is a 3x3 convolution then a 3x3 stride-1 max-pool;
every convolution is followed by batch normalisation (section III "Training procedure") and
ReLU, except the 3x3 merge convolution and the 1x1 residual, which are added before the ReLU.
Batch normalisation built under a multi-replica strategy is synchronised across replicas (one
replica or N give the same update). The
partial attention concatenates the decoder output with the switched-on encoder maps.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.models import blocks

__all__ = [
    "CLASSIFIER_AGENT",
    "ENCODER_OUTPUT",
    "REFERENCE_GRADERS",
    "SEGMENTATION_AGENT",
    "SHARED_ENCODER",
    "VGG16_FCN_ENCODER",
    "build_classifier_agent",
    "build_cooperative_model",
    "build_encoder_classifier",
    "build_fcn8s",
    "build_inception_unet",
    "build_reference_grader",
    "build_segmentation_agent",
    "build_shared_encoder",
    "build_vgg16_fcn_encoder",
    "cooperative_agents",
    "encoder_level",
    "partial_attention",
    "partial_attention_plan",
    "residual_inception_block",
]

ENCODER_OUTPUT = "encoder_output"
SHARED_ENCODER = "shared_encoder"
CLASSIFIER_AGENT = "classifier_agent"
SEGMENTATION_AGENT = "segmentation_agent"
VGG16_FCN_ENCODER = "vgg16_fcn_encoder"
# keras.applications constructors of the Table III-IV graders and their smallest input side.
REFERENCE_GRADERS: Dict[str, Tuple[str, str, int]] = {
    "vgg19": ("VGG19", "VGG-19", 32),
    "inception_v3": ("InceptionV3", "InceptionV3", 75),
}


def encoder_level(i: int) -> str:
    """Output key of the encoder map ``E_i`` (``i`` from 1, full resolution first)."""
    return f"encoder_level{i}"


def _bn(name: str) -> keras.layers.Layer:
    # Built inside a strategy with several replicas, batch norm synchronises its statistics:
    # the batch mean over the GLOBAL batch, so the update does not depend on how many replicas
    # share the batch. With one replica the plain (fused) layer computes the same and is
    # cheaper to run and to export.
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return keras.layers.BatchNormalization(synchronized=replicas > 1, name=name)


def _conv_bn(x, filters: int, kernel, *, name: str, strides=1, activation: bool = True):
    """Convolution (no bias) -> batch norm -> optional ReLU, named ``{name}_conv/_bn/_relu``."""
    x = keras.layers.Conv2D(
        filters,
        kernel,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_conv",
    )(x)
    x = _bn(f"{name}_bn")(x)
    if activation:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def _conv_nxn(x, filters: int, n: int, *, factorized: bool, name: str, activation: bool = True):
    """An ``n x n`` convolution, or with ``factorized`` its ``1 x n`` then ``n x 1`` factorisation
    (Szegedy et al. 2016, the paper's ref. [9]); a 5x5 is first split into two 3x3."""
    if not factorized or n == 1:
        return _conv_bn(x, filters, n, name=name, activation=activation)
    if n == 5:
        x = _conv_nxn(x, filters, 3, factorized=True, name=f"{name}a")
        return _conv_nxn(x, filters, 3, factorized=True, name=f"{name}b", activation=activation)
    x = _conv_bn(x, filters, (1, n), name=f"{name}_1x{n}")
    return _conv_bn(x, filters, (n, 1), name=f"{name}_{n}x1", activation=activation)


def residual_inception_block(
    x: tf.Tensor, *, filters: int, factorized: bool = False, name: str
) -> tf.Tensor:
    """The improved residual inception block (Fig. 2), or its factorised version (Fig. 3).

    Four inception branches (Szegedy et al. 2015, the paper's ref. [7]), each ``filters // 4``
    filters: 1x1; 1x1 -> 3x3; 1x1 -> 5x5; and a 3x3 convolution before a 3x3 stride-1 max-pool
    ("an additional convolution was used before max-pooling"). Their concatenation goes through
    a 3x3 convolution ("to reduce aliasing") and is added to the 1x1-convolved block input, both
    with ``filters`` outputs, then ReLU. ``factorized=True`` (the classifier agent) replaces each
    ``n x n`` (n > 1) convolution by ``1 x n`` then ``n x 1``, a 5x5 by two such 3x3.

    Args:
        x: input feature map ``(batch, h, w, c)``.
        filters: output channels (at least 4).
        factorized: Fig. 3 instead of Fig. 2.
        name: prefix of every layer (``{name}_branch3x3_conv``, ``{name}_merge_bn``, ...).

    Returns:
        ``(batch, h, w, filters)``.

    Example::

        y = residual_inception_block(x, filters=64, name="encoder_level1_block1")
    """
    if filters < 4:
        raise ValueError(f"{name}: filters must be >= 4 (four inception branches), got {filters}")
    f = filters // 4
    fac = dict(factorized=factorized)
    b1 = _conv_bn(x, f, 1, name=f"{name}_branch1x1")
    b3 = _conv_bn(x, f, 1, name=f"{name}_branch3x3_reduce")
    b3 = _conv_nxn(b3, f, 3, name=f"{name}_branch3x3", **fac)
    b5 = _conv_bn(x, f, 1, name=f"{name}_branch5x5_reduce")
    b5 = _conv_nxn(b5, f, 5, name=f"{name}_branch5x5", **fac)
    bp = _conv_nxn(x, f, 3, name=f"{name}_branchpool", **fac)
    bp = keras.layers.MaxPooling2D(3, strides=1, padding="same", name=f"{name}_branchpool_pool")(bp)
    merged = keras.layers.Concatenate(name=f"{name}_concat")([b1, b3, b5, bp])
    merged = _conv_nxn(merged, filters, 3, name=f"{name}_merge", activation=False, **fac)
    residual = _conv_bn(x, filters, 1, name=f"{name}_residual", activation=False)
    out = keras.layers.Add(name=f"{name}_add")([merged, residual])
    return keras.layers.ReLU(name=f"{name}_out")(out)


def _scaled(widths: Sequence[int], width: float) -> Tuple[int, ...]:
    return tuple(max(4, blocks.scaled_filters(w, width)) for w in widths)


def build_shared_encoder(
    *,
    input_shape: Sequence[Optional[int]],
    widths: Sequence[int] = (32, 64, 128, 256),
    blocks_per_level: int = 2,
    output_width: Optional[int] = None,
    name: str = SHARED_ENCODER,
) -> keras.Model:
    """The shared encoder ``M`` (Eq. 1; section II-B, Fig. 5).

    A 3x3 stem convolution, then for level ``i`` = 1..L (``L = len(widths)``):
    ``blocks_per_level`` cascaded residual inception blocks of ``widths[i-1]`` filters
    (``encoder_level{i}_block{b}``), whose last output is ``E_i``, then a 3x3 stride-2
    convolution (``encoder_level{i}_down``) to the next level's width (the last one to
    ``output_width``, default ``widths[-1]``).

    Args:
        input_shape: ``(H, W, C)`` with ``H``, ``W`` multiples of ``2**L``.
        widths: filters per level.
        blocks_per_level: cascaded blocks per level.
        output_width: channels of ``encoder_output``.
        name: model name.

    Returns:
        A model ``image -> {"encoder_output": (H/2**L, W/2**L, output_width),
        "encoder_level{i}": E_i (H/2**(i-1), W/2**(i-1), widths[i-1])}``.

    Example::

        encoder = build_shared_encoder(input_shape=(224, 224, 3))
        encoder(images)["encoder_level2"].shape   # (batch, 112, 112, 64)
    """
    levels = len(widths)
    if levels < 1 or blocks_per_level < 1:
        raise ValueError(f"{name}: need at least one level and one block per level")
    shape = blocks.check_input_shape(input_shape, what=name, min_size=2**levels, multiple=2**levels)
    image = keras.Input(shape, name=keys.IMAGE)
    x = _conv_bn(image, widths[0], 3, name="encoder_stem")
    outputs = {}
    for i, filters in enumerate(widths, start=1):
        for b in range(1, blocks_per_level + 1):
            x = residual_inception_block(x, filters=filters, name=f"encoder_level{i}_block{b}")
        outputs[encoder_level(i)] = x
        next_width = widths[i] if i < levels else (output_width or widths[-1])
        x = _conv_bn(x, next_width, 3, strides=2, name=f"encoder_level{i}_down")
    outputs[ENCODER_OUTPUT] = x
    return keras.Model(image, outputs, name=name)


def build_classifier_agent(
    *,
    input_shape: Sequence[int],
    widths: Sequence[int] = (256, 512),
    blocks_per_level: int = 2,
    num_grades: int = keys.NUM_GRADES,
    dropout: float = 0.0,
    name: str = CLASSIFIER_AGENT,
) -> keras.Model:
    """The classifier agent ``C`` (private parameters ``theta_2``, Eq. 1-2; section II-B).

    Per level ``i``: ``blocks_per_level`` factorised residual inception blocks (Fig. 3) of
    ``widths[i-1]`` filters (``classifier_level{i}_block{b}``), a 3x3 stride-2 convolution between
    levels, then global average pooling and a dense layer over the grades
    (:func:`drkeras.models.blocks.grading_head`).

    Args:
        input_shape: shape of the encoder output ``(h, w, c)``.
        widths, blocks_per_level: filters per level and blocks per level.
        num_grades: classes of the classifier.
        dropout: dropout before the dense layer.
        name: model name.

    Returns:
        A model ``encoder_output -> {grade_logits, grade_probs}``.

    Example: ``build_classifier_agent(input_shape=(14, 14, 256))``.
    """
    features = keras.Input(tuple(input_shape), name=ENCODER_OUTPUT)
    x = features
    for i, filters in enumerate(widths, start=1):
        if i > 1:
            x = _conv_bn(x, filters, 3, strides=2, name=f"classifier_level{i}_down")
        for b in range(1, blocks_per_level + 1):
            x = residual_inception_block(
                x, filters=filters, factorized=True, name=f"classifier_level{i}_block{b}"
            )
    outputs = blocks.grading_head(x, num_grades=num_grades, pooling="avg", dropout=dropout)
    return keras.Model(features, outputs, name=name)


def partial_attention_plan(
    encoder_sizes: Mapping[str, Sequence[int]], decoder_size: Sequence[int]
) -> Dict[str, Optional[int]]:
    """Eq. 3: which encoder maps a decoder stage attends to, and with which pooling stride.

    ``a_i = min(h_Ei, w_Ei) / min(h_Ui, w_Ui)``: a map with ``a_i >= 1`` is switched on and
    max-pooled with stride ``a_i`` (identity for ``a_i = 1``) to the decoder output's size; a
    smaller map (``a_i < 1``) is switched off.

    Args:
        encoder_sizes: ``{key: (h, w)}`` of the encoder maps ``E_i``.
        decoder_size: ``(h, w)`` of the upsampled decoder output ``U``.

    Returns:
        ``{key: a_i}`` for the switched-on maps, ``{key: None}`` for the others, in input order.

    Raises:
        ValueError: an unknown size, or a switched-on map that ``a_i``-pooling does not bring
            exactly to ``decoder_size`` (non-integer ratio, or different ratios per axis).

    Example::

        >>> partial_attention_plan({"E1": (64, 64), "E2": (32, 32), "E3": (16, 16)}, (32, 32))
        {'E1': 2, 'E2': 1, 'E3': None}
    """
    h_u, w_u = (int(s) if s is not None else None for s in decoder_size)
    if h_u is None or w_u is None:
        raise ValueError("partial attention needs a static decoder size (give input_shape H, W)")
    plan: Dict[str, Optional[int]] = {}
    for key, size in encoder_sizes.items():
        h_e, w_e = (int(s) if s is not None else None for s in size)
        if h_e is None or w_e is None:
            raise ValueError(f"partial attention needs static encoder sizes; {key} is {size}")
        ratio = min(h_e, w_e) / min(h_u, w_u)
        if ratio < 1:
            plan[key] = None
            continue
        a = int(round(ratio))
        if a != ratio or h_e != a * h_u or w_e != a * w_u:
            raise ValueError(
                f"partial attention: encoder map {key} of size {(h_e, w_e)} cannot be max-pooled "
                f"to the decoder size {(h_u, w_u)} (a_i = {ratio:g}); use an input size that is a "
                "multiple of 2**levels"
            )
        plan[key] = a
    return plan


def partial_attention(
    upsampled: tf.Tensor, encoder_maps: Mapping[str, tf.Tensor], *, name: str
) -> tf.Tensor:
    """The partial attention block ``G`` (Eq. 3, Fig. 4) after one decoder upsampling.

    Every encoder map at least as large as ``upsampled`` (:func:`partial_attention_plan`) is
    max-pooled with stride ``a_i`` (``{name}_{key}_pool{a_i}``; max-pooling "ensures maximally
    activated features"), the others are switched off; the decoder output and the switched-on
    maps are concatenated (``{name}_concat``).

    Example::

        u = Conv2DTranspose(64, 2, strides=2)(x)
        g = partial_attention(u, {"encoder_level1": e1, "encoder_level2": e2}, name="stage3")
    """
    sizes = {key: tuple(t.shape[1:3]) for key, t in encoder_maps.items()}
    plan = partial_attention_plan(sizes, tuple(upsampled.shape[1:3]))
    parts = [upsampled]
    for key, a in plan.items():
        if a is None:
            continue
        t = encoder_maps[key]
        if a > 1:
            t = keras.layers.MaxPooling2D(a, strides=a, name=f"{name}_{key}_pool{a}")(t)
        parts.append(t)
    return keras.layers.Concatenate(name=f"{name}_concat")(parts)


def _encoder_inputs(encoder_shapes: Mapping[str, Sequence[int]]) -> Dict[str, tf.Tensor]:
    if ENCODER_OUTPUT not in encoder_shapes:
        raise ValueError(
            f"encoder_shapes must include {ENCODER_OUTPUT!r}, got {list(encoder_shapes)}"
        )
    return {key: keras.Input(tuple(shape), name=key) for key, shape in encoder_shapes.items()}


def _levels(encoder_shapes: Mapping) -> int:
    levels = 0
    while encoder_level(levels + 1) in encoder_shapes:
        levels += 1
    if levels == 0:
        raise ValueError(f"encoder_shapes has no {encoder_level(1)!r}: {list(encoder_shapes)}")
    return levels


def _upconv(x, filters: int, name: str):
    """2x2 transposed convolution with stride 2 (section II-B), batch norm, ReLU."""
    x = keras.layers.Conv2DTranspose(
        filters,
        2,
        strides=2,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        name=f"{name}_upconv",
    )(x)
    x = _bn(f"{name}_upconv_bn")(x)
    return keras.layers.ReLU(name=f"{name}_upconv_relu")(x)


def build_segmentation_agent(
    *,
    encoder_shapes: Mapping[str, Sequence[int]],
    widths: Optional[Sequence[int]] = None,
    num_classes: int,
    name: str = SEGMENTATION_AGENT,
) -> keras.Model:
    """The segmentation agent ``S`` (the decoder, private parameters ``theta_3``; Fig. 4-5).

    From ``encoder_output``, L stages (``L`` = number of encoder levels): stage ``j`` upsamples
    by a 2x2 stride-2 transposed convolution (``decoder_stage{j}_upconv``, ``widths[j-1]``
    filters) and applies partial attention over all encoder maps ``E_i``
    (``decoder_stage{j}_attention_*``), so early stages see several pooled maps and the last
    stage only ``E_1``. A 1x1 convolution and softmax give the pixel classes.

    Args:
        encoder_shapes: ``{key: (h, w, c)}`` of the encoder outputs (``encoder_output`` and
            ``encoder_level{i}``), e.g. from :func:`build_shared_encoder`'s outputs.
        widths: filters of the stages (default: the encoder level widths, deepest first).
        num_classes: pixel classes (background included).
        name: model name.

    Returns:
        A model ``{encoder outputs} -> {lesion_logits, seg_probs}`` at the input resolution.

    Example::

        shapes = {k: v.shape[1:] for k, v in encoder.output.items()}
        segmenter = build_segmentation_agent(encoder_shapes=shapes, num_classes=5)
    """
    inputs = _encoder_inputs(encoder_shapes)
    levels = _levels(encoder_shapes)
    if widths is None:
        widths = [int(encoder_shapes[encoder_level(i)][-1]) for i in range(levels, 0, -1)]
    if len(widths) != levels:
        raise ValueError(f"{name}: {levels} decoder stages need {levels} widths, got {widths}")
    maps = {encoder_level(i): inputs[encoder_level(i)] for i in range(1, levels + 1)}
    x = inputs[ENCODER_OUTPUT]
    for j, filters in enumerate(widths, start=1):
        x = _upconv(x, filters, f"decoder_stage{j}")
        x = partial_attention(x, maps, name=f"decoder_stage{j}_attention")
    outputs = blocks.segmentation_head(x, num_classes=num_classes, activation="softmax")
    return keras.Model(inputs, outputs, name=name)


def build_cooperative_model(
    *,
    input_shape: Sequence[Optional[int]],
    num_seg_classes: int,
    num_grades: int = keys.NUM_GRADES,
    encoder_widths: Sequence[int] = (32, 64, 128, 256),
    encoder_blocks: int = 2,
    classifier_widths: Sequence[int] = (256, 512),
    classifier_blocks: int = 2,
    decoder_widths: Optional[Sequence[int]] = None,
    dropout: float = 0.0,
    width: float = 1.0,
    name: str = "cooperative",
) -> keras.Model:
    """The joint segmentation and classification network (Eq. 1, Fig. 5): ``M``, ``C``, ``S``.

    ``y_clf = C(M(x))``, ``y_seg = S(M(x))``. The three parts are nested models named
    ``shared_encoder``, ``classifier_agent``, ``segmentation_agent`` (see
    :func:`cooperative_agents`); train them with
    :class:`drkeras.training.cooperative.CooperativeTrainer`.

    Args:
        input_shape: ``(H, W, 3)``, ``H``/``W`` multiples of ``2**len(encoder_widths)`` (224 in the
            paper).
        num_seg_classes: pixel classes (background included).
        num_grades: classifier classes (5 DR grades).
        encoder_widths, encoder_blocks: see :func:`build_shared_encoder`.
        classifier_widths, classifier_blocks: see :func:`build_classifier_agent`.
        decoder_widths: see :func:`build_segmentation_agent`.
        dropout: dropout of the classifier head.
        width: multiplier of every width (for tests and quick runs).
        name: model name.

    Returns:
        A model ``image -> {grade_logits, grade_probs, lesion_logits, seg_probs}``.

    Example::

        model = build_cooperative_model(input_shape=(224, 224, 3), num_seg_classes=5)
        encoder, classifier, segmenter = cooperative_agents(model)
    """
    encoder_widths = _scaled(encoder_widths, width)
    classifier_widths = _scaled(classifier_widths, width)
    if decoder_widths is not None:
        decoder_widths = _scaled(decoder_widths, width)
    encoder = build_shared_encoder(
        input_shape=input_shape, widths=encoder_widths, blocks_per_level=encoder_blocks
    )
    shapes = {key: tuple(t.shape[1:]) for key, t in encoder.output.items()}
    classifier = build_classifier_agent(
        input_shape=shapes[ENCODER_OUTPUT],
        widths=classifier_widths,
        blocks_per_level=classifier_blocks,
        num_grades=num_grades,
        dropout=dropout,
    )
    segmenter = build_segmentation_agent(
        encoder_shapes=shapes, widths=decoder_widths, num_classes=num_seg_classes
    )
    image = keras.Input(encoder.input_shape[1:], name=keys.IMAGE)
    features = encoder(image)
    outputs = dict(classifier(features[ENCODER_OUTPUT]))
    outputs.update(segmenter(features))
    return keras.Model(image, outputs, name=name)


def cooperative_agents(model: keras.Model) -> Tuple[keras.Model, keras.Model, keras.Model]:
    """``(M, C, S)`` of a :func:`build_cooperative_model` network, by layer name."""
    try:
        return tuple(
            model.get_layer(n) for n in (SHARED_ENCODER, CLASSIFIER_AGENT, SEGMENTATION_AGENT)
        )
    except ValueError as err:
        raise ValueError(
            f"{model.name!r} is not a cooperative model: it needs nested models "
            f"{SHARED_ENCODER!r}, {CLASSIFIER_AGENT!r} and {SEGMENTATION_AGENT!r} ({err})"
        ) from None


# ----------------------------------------------------------------------------------- baselines


def build_encoder_classifier(
    encoder: keras.Model,
    *,
    feature: str = ENCODER_OUTPUT,
    num_grades: int = keys.NUM_GRADES,
    dropout: float = 0.0,
    name: Optional[str] = None,
) -> keras.Model:
    """A classifier on ``encoder``'s ``feature`` output: global average pooling and a dense
    layer. Training it on the grading data is the classification pre-training of Table I;
    a segmenter then built on the same ``encoder`` instance starts from those weights.

    Example::

        encoder = build_shared_encoder(input_shape=(224, 224, 3))
        pretrain = build_encoder_classifier(encoder)      # fit on EyePACS grades
        unet = build_inception_unet(input_shape=(224, 224, 3), num_seg_classes=5,
                                    encoder=encoder)
    """
    image = keras.Input(encoder.input_shape[1:], name=keys.IMAGE)
    features = encoder(image)[feature]
    outputs = blocks.grading_head(features, num_grades=num_grades, pooling="avg", dropout=dropout)
    return keras.Model(image, outputs, name=name or f"{encoder.name}_classifier")


def build_inception_unet(
    *,
    input_shape: Sequence[Optional[int]],
    num_seg_classes: int,
    encoder_widths: Sequence[int] = (32, 64, 128, 256),
    encoder_blocks: int = 2,
    decoder_blocks: int = 1,
    width: float = 1.0,
    encoder: Optional[keras.Model] = None,
    name: str = "inception_unet",
) -> keras.Model:
    """UNet with the improved residual inception block (section III-A, Tables I-II).

    The encoder is :func:`build_shared_encoder` (named ``{name}_encoder``, or the given
    ``encoder``, e.g. one pre-trained as a classifier); decoder stage ``j`` upsamples by a 2x2
    stride-2 transposed convolution, concatenates the encoder map of the same size (the UNet
    skip, ``decoder_stage{j}_concat``) and applies ``decoder_blocks`` residual inception blocks.

    Example::

        unet = build_inception_unet(input_shape=(224, 224, 3), num_seg_classes=5)
    """
    if encoder is None:
        encoder = build_shared_encoder(
            input_shape=input_shape,
            widths=_scaled(encoder_widths, width),
            blocks_per_level=encoder_blocks,
            name=f"{name}_encoder",
        )
    image = keras.Input(encoder.input_shape[1:], name=keys.IMAGE)
    features = encoder(image)
    levels = _levels(features)
    x = features[ENCODER_OUTPUT]
    for j, level in enumerate(range(levels, 0, -1), start=1):
        skip = features[encoder_level(level)]
        filters = int(skip.shape[-1])
        x = _upconv(x, filters, f"decoder_stage{j}")
        x = keras.layers.Concatenate(name=f"decoder_stage{j}_concat")([x, skip])
        for b in range(1, decoder_blocks + 1):
            x = residual_inception_block(x, filters=filters, name=f"decoder_stage{j}_block{b}")
    outputs = blocks.segmentation_head(x, num_classes=num_seg_classes, activation="softmax")
    return keras.Model(image, outputs, name=name)


def build_vgg16_fcn_encoder(
    *,
    input_shape: Sequence[Optional[int]],
    width: float = 1.0,
    fc_units: int = 4096,
    name: str = VGG16_FCN_ENCODER,
) -> keras.Model:
    """VGG16 with its fully connected layers as convolutions (FCN, Long et al. 2015).

    The 13 convolutions of :func:`drkeras.models.blocks.vgg16_encoder` (``keras.applications``
    names), then ``fc6`` (7x7, ``fc_units * width``) and ``fc7`` (1x1), ReLU and dropout 0.5.

    Returns:
        A model ``image -> {"block3_pool", "block4_pool", "fc7"}`` (strides 8, 16, 32).
    """
    shape = blocks.check_input_shape(input_shape, what=name, min_size=32, multiple=32)
    image = keras.Input(shape, name=keys.IMAGE)
    _, pool5 = blocks.vgg16_encoder(image, width=width)
    # The pools by their keras.applications names (each layer is called once, so its output
    # is unambiguous).
    vgg = keras.Model(image, pool5)
    pool3 = vgg.get_layer("block3_pool").output
    pool4 = vgg.get_layer("block4_pool").output
    units = blocks.scaled_filters(fc_units, width)
    he = dict(activation="relu", kernel_initializer="he_normal")  # as the encoder's
    x = keras.layers.Conv2D(units, 7, padding="same", name="fc6", **he)(pool5)
    x = keras.layers.Dropout(0.5, name="fc6_dropout")(x)
    x = keras.layers.Conv2D(units, 1, name="fc7", **he)(x)
    x = keras.layers.Dropout(0.5, name="fc7_dropout")(x)
    return keras.Model(image, {"block3_pool": pool3, "block4_pool": pool4, "fc7": x}, name=name)


def _bilinear_kernel(factor: int, channels: int) -> np.ndarray:
    """Transposed-convolution kernel ``(2f, 2f, channels, channels)`` doing bilinear upsampling
    by ``factor`` per channel (FCN initialises its upsampling this way)."""
    size = 2 * factor
    centre = factor - 0.5
    grid = np.ogrid[:size, :size]
    weights = (1 - abs(grid[0] - centre) / factor) * (1 - abs(grid[1] - centre) / factor)
    kernel = np.zeros((size, size, channels, channels), np.float32)
    for c in range(channels):
        kernel[:, :, c, c] = weights
    return kernel


def _bilinear_upsample(x, channels: int, factor: int, name: str):
    layer = keras.layers.Conv2DTranspose(
        channels,
        2 * factor,
        strides=factor,
        padding="same",
        use_bias=False,
        kernel_initializer=keras.initializers.Constant(_bilinear_kernel(factor, channels)),
        name=name,
    )
    return layer(x)


def build_fcn8s(
    *,
    input_shape: Sequence[Optional[int]],
    num_seg_classes: int,
    width: float = 1.0,
    fc_units: int = 4096,
    encoder: Optional[keras.Model] = None,
    name: str = "fcn8s",
) -> keras.Model:
    """FCN-8s (Long et al. 2015; the paper's ref. [1], Tables I-II).

    Class scores of ``fc7`` (``score_fr``) upsampled x2 (``upscore2``) and added to the scores of
    ``block4_pool`` (``score_pool4``), upsampled x2 (``upscore_pool4``) and added to the scores of
    ``block3_pool`` (``score_pool3``), then upsampled x8 (``upscore8``); transposed convolutions
    start as bilinear interpolation. The encoder is :func:`build_vgg16_fcn_encoder`, or the given
    one (e.g. pre-trained as a classifier with :func:`build_encoder_classifier` on ``fc7``).

    Example::

        fcn = build_fcn8s(input_shape=(224, 224, 3), num_seg_classes=5)
    """
    if encoder is None:
        encoder = build_vgg16_fcn_encoder(
            input_shape=input_shape, width=width, fc_units=fc_units, name=f"{name}_encoder"
        )
    image = keras.Input(encoder.input_shape[1:], name=keys.IMAGE)
    feats = encoder(image)
    k = num_seg_classes

    def score(x, layer_name):
        return keras.layers.Conv2D(k, 1, kernel_initializer="zeros", name=layer_name)(x)

    x = score(feats["fc7"], "score_fr")
    x = _bilinear_upsample(x, k, 2, "upscore2")
    x = keras.layers.Add(name="fuse_pool4")([x, score(feats["block4_pool"], "score_pool4")])
    x = _bilinear_upsample(x, k, 2, "upscore_pool4")
    x = keras.layers.Add(name="fuse_pool3")([x, score(feats["block3_pool"], "score_pool3")])
    x = _bilinear_upsample(x, k, 8, "upscore8")
    logits = keras.layers.Activation("linear", dtype="float32", name=keys.LESION_LOGITS)(x)
    probs = keras.layers.Activation("softmax", dtype="float32", name=keys.SEG_PROBS)(logits)
    return keras.Model(image, {keys.LESION_LOGITS: logits, keys.SEG_PROBS: probs}, name=name)


def build_reference_grader(
    name: str,
    *,
    input_shape: Sequence[Optional[int]],
    num_grades: int = keys.NUM_GRADES,
    encoder_weights: Optional[str] = None,
    dropout: float = 0.0,
    model_name: Optional[str] = None,
) -> keras.Model:
    """VGG-19 (``"vgg19"``) or InceptionV3 (``"inception_v3"``) grader (Tables III-IV).

    ``keras.applications`` without its top, global average pooling and a dense softmax
    (:func:`drkeras.models.blocks.grading_head`), as the drkeras graders of
    :mod:`drkeras.models.baselines`. From random weights VGG-19's 16 ReLU convolutions start
    He-normal (:func:`drkeras.models.blocks.he_initialise`), as the project's VGG16: Keras's
    Glorot default would leave this baseline, which has no batch norm, with vanishing signal.

    Args:
        name: a key of :data:`REFERENCE_GRADERS`.
        input_shape: ``(H, W, 3)``, at least 32 (VGG-19) or 75 (InceptionV3) pixels a side.
        num_grades: classes.
        encoder_weights: ``None`` or ``"imagenet"`` (downloads; offline this raises
            :class:`~drkeras.models.blocks.PretrainedWeightsUnavailable`).
        dropout: dropout of the head.
        model_name: default ``name``.

    Example: ``build_reference_grader("inception_v3", input_shape=(224, 224, 3))``.
    """
    if name not in REFERENCE_GRADERS:
        raise ValueError(f"unknown grader {name!r}; choose one of {sorted(REFERENCE_GRADERS)}")
    constructor, paper_name, min_size = REFERENCE_GRADERS[name]
    if encoder_weights not in (None, "imagenet"):
        raise ValueError(
            f"{name}: encoder_weights={encoder_weights!r}; expected None or 'imagenet'"
        )
    shape = blocks.check_input_shape(
        input_shape, what=f"{name} ({paper_name})", min_size=min_size, channels=3
    )
    image = keras.Input(shape, name=keys.IMAGE)
    with blocks.pretrained_download_guard(paper_name):
        base = getattr(keras.applications, constructor)(
            include_top=False, weights=encoder_weights, input_tensor=image
        )
    if encoder_weights is None and constructor == "VGG19":
        blocks.he_initialise(base)
    outputs = blocks.grading_head(
        base.output, num_grades=num_grades, pooling="avg", dropout=dropout
    )
    return keras.Model(image, outputs, name=model_name or name)
