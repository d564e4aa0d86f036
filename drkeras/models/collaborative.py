"""Networks of Zhou et al., CVPR 2019: collaborative semi-supervised segmentation and grading.

"Collaborative Learning of Semi-Supervised Segmentation and Classification for Medical Images".
Three networks (the training algorithm is :mod:`drkeras.training.adversarial`):

- :func:`build_xception_unet`: the multi-lesion mask generator ``G`` (section 3.2, Fig. 2), a
  U-shaped network of nine feature-mapping tuples (five encoder, four decoder). The first
  encoder tuple uses plain convolutions, the others Xception modules: two 3x3 separable
  convolutions, each followed by batch norm and ReLU, then max-pooling, plus a 1x1 strided
  convolution shortcut. The decoder up-samples and concatenates the encoder's skip before each
  tuple. ``L`` sigmoid convolutions give the lesion masks. ``separable=False`` gives the
  plain-convolution variant (``CE1`` of Table 3).
- :func:`build_discriminator`: ``D`` (section 3.2): the image concatenated with the ``L``
  masks, five tuples of two 3x3 convolutions with batch norm and ReLU and a stride-2 max-pool,
  global average pooling, a dense layer and a sigmoid.
- :func:`build_base_grader` and :func:`build_lesion_attentive_grader`: the grading model ``C``
  and the lesion attention model ``att`` (section 3.3, Fig. 3, Eqs. 4-6).

Backbone of the grading model. The paper says only "a basic convolutional neural network"; we
use the generator's own tuples: a full-resolution 3x3 convolution stem giving the low-level
features ``f_low`` (32 channels, the size of Fig. 3's global context vector ``1*1*32``), then
five Xception-module tuples (64 ... 1024 channels) and global average pooling to the 1024-d
vector Fig. 3 shows. Why: the attention maps must have the masks' (input) resolution (Fig. 3:
``640*640*1``), so ``f_low`` is taken at full resolution, and the grading layers after ``f_low``
are applied ``L + 1`` times with shared weights (once to ``f_low`` for ``f_high``, once per
lesion to ``alpha_l * f_low``), which needs them as one reusable sub-network
(``grader_trunk``); an ImageNet backbone cannot be cut at a full-resolution layer. The paper
mentions no ImageNet pre-training, and none of these networks has pretrained weights.

Odd sizes. Max-pooling uses ``same`` padding, so a side ``n`` becomes ``ceil(n / 2)``; for input
sizes that are not multiples of 32 some skips are odd-sized (72 px: 36, 18, 9, 5, 3). The
decoder up-samples by 2 and crops to the skip's size (:class:`CropLike`), so any input size
works and the output has the input's size. The up-sampling is nearest-neighbour
(:class:`~drkeras.models.upsampling.NearestUpSampling2D`: ``UpSampling2D``'s function with a
gradient that TensorFlow can compute deterministically on a GPU).

Every layer is named (``encoder_tuple{i}_*``, ``decoder_tuple{i}_*``, ``disc_tuple{i}_*``,
``attention_{lesion}_*``); outputs are dicts keyed by :mod:`drkeras.keys`.

Example::

    generator = build_xception_unet(input_shape=(640, 640, 3), num_lesions=4)
    base = build_base_grader(input_shape=(640, 640, 3))
    grader = build_lesion_attentive_grader(base, num_lesions=4)
    model = build_collaborative_model(generator, grader)   # image -> grade, masks, attention
"""

from __future__ import annotations

from typing import Optional, Sequence

import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.models.blocks import check_input_shape, scaled_filters
from drkeras.models.upsampling import NearestUpSampling2D

__all__ = [
    "DISCRIMINATOR_WIDTHS",
    "GENERATOR_WIDTHS",
    "GRADER_LOW_CHANNELS",
    "GRADER_WIDTHS",
    "LESIONS",
    "REAL_LOGIT",
    "REAL_PROB",
    "CropLike",
    "Subsample2D",
    "build_base_grader",
    "build_collaborative_model",
    "build_discriminator",
    "build_lesion_attentive_grader",
    "build_xception_unet",
    "conv_tuple",
]

# The four lesions of the paper (section 4.1), in the record order of drkeras.keys.LESIONS.
LESIONS = ("MA", "HE", "EX", "SE")
# Fig. 2: encoder tuples 320*320*32 ... 20*20*512 for a 640 x 640 input.
GENERATOR_WIDTHS = (32, 64, 128, 256, 512)
# Fig. 2 draws the discriminator with the same five widths.
DISCRIMINATOR_WIDTHS = (32, 64, 128, 256, 512)
# Fig. 3: the global context vector is 1*1*32, the pooled grading features 1*1*1024.
GRADER_LOW_CHANNELS = 32
GRADER_WIDTHS = (64, 128, 256, 512, 1024)

# Discriminator outputs: "the predicted lesion maps are supervised by real (pixel-level) masks".
REAL_LOGIT = "real_logit"
REAL_PROB = "real_prob"

_MIN_SIZE = 32  # five stride-2 poolings leave at least a 1 x 1 map


class CropLike(keras.layers.Layer):
    """``x`` cropped to the spatial size of ``reference`` (top-left aligned).

    After ``same``-padded stride-2 pooling of an odd side ``n`` and a x2 up-sampling the
    decoder holds ``n + 1`` rows; cropping the last one restores the skip's size. Works with
    sizes known only at run time.

    Example: ``CropLike(name="decoder_tuple1_crop")([upsampled, skip])``.
    """

    def call(self, inputs):
        x, reference = inputs
        dynamic = tf.shape(reference)
        # Static sizes when known, so the output keeps a static shape.
        height = reference.shape[1] if reference.shape[1] is not None else dynamic[1]
        width = reference.shape[2] if reference.shape[2] is not None else dynamic[2]
        return x[:, :height, :width, :]

    def compute_output_shape(self, input_shapes):
        x, reference = (tf.TensorShape(s) for s in input_shapes)
        return tf.TensorShape([x[0], reference[1], reference[2], x[3]])


class Subsample2D(keras.layers.Layer):
    """Every other row and column, starting with the first: ``x[:, ::2, ::2, :]``.

    Followed by a 1x1 convolution it equals a 1x1 convolution with stride 2 and ``same``
    padding (output side ``ceil(n / 2)``). Example: ``Subsample2D(name="tuple2_sub")(x)``.
    """

    def call(self, inputs):
        return inputs[:, ::2, ::2, :]

    def compute_output_shape(self, input_shape):
        shape = tf.TensorShape(input_shape).as_list()
        half = [None if n is None else (n + 1) // 2 for n in shape[1:3]]
        return tf.TensorShape([shape[0]] + half + [shape[3]])


def _batchnorm(name: str, synchronized: bool, momentum: float = 0.99) -> keras.layers.Layer:
    # Synchronised statistics: under a MirroredStrategy every replica normalises with the
    # GLOBAL batch's mean and variance, so N replicas take the same step as one device
    # (docs/design.md section 4). On one device it computes the same as plain (fused) batch norm,
    # about twice as slowly when run eagerly, so builders let one-device runs switch it off.
    return keras.layers.BatchNormalization(synchronized=synchronized, momentum=momentum, name=name)


def conv_tuple(
    x: tf.Tensor,
    filters: int,
    *,
    separable: bool,
    pool: bool,
    name: str,
    sync_batchnorm: bool = True,
    bn_momentum: float = 0.99,
) -> tf.Tensor:
    """One feature-mapping tuple of Fig. 2 (Zhou et al. 2019, section 3.2).

    Two 3x3 convolutions (separable for an Xception module, plain otherwise), each followed by
    batch norm and ReLU, then (``pool``) a 3x3 stride-2 max-pool, plus a 1x1 convolution
    shortcut (stride 2 when pooling, with batch norm) added to the result, as in Chollet's
    Xception modules. ``same`` padding throughout.

    Args:
        x: input feature map ``[B, H, W, C]``.
        filters: output channels.
        separable: Xception module (depthwise separable convolutions) or plain convolutions.
        pool: halve the resolution (encoder tuples) or keep it (decoder tuples).
        name: prefix of the layer names (``{name}_conv1``, ``{name}_bn1``, ...).
        sync_batchnorm: batch statistics over the global batch of all replicas (needed for
            multi-replica training to equal one-device training; slower eagerly).
        bn_momentum: momentum of the batch-norm moving statistics (the paper does not say;
            Keras' 0.99 by default; a few-step run needs less to evaluate sensibly).

    Returns:
        ``[B, ceil(H/2), ceil(W/2), filters]`` when pooling, else ``[B, H, W, filters]``.
    """
    conv = keras.layers.SeparableConv2D if separable else keras.layers.Conv2D
    # A 1x1 stride-2 convolution is written as "every other pixel, then a 1x1 convolution",
    # which is exactly the same function: TensorFlow 2.15's oneDNN CPU kernel for the gradient
    # of strided 1x1 convolutions corrupted the heap (segfault) at 64 px here. No biases before
    # batch norm: they would have no effect and get only rounding noise as gradients, which
    # Adam turns into full-size random steps.
    shortcut = Subsample2D(name=f"{name}_shortcut_subsample")(x) if pool else x
    shortcut = keras.layers.Conv2D(
        filters, 1, padding="same", use_bias=False, name=f"{name}_shortcut"
    )(shortcut)
    shortcut = _batchnorm(f"{name}_shortcut_bn", sync_batchnorm, bn_momentum)(shortcut)
    y = x
    for j in (1, 2):
        y = conv(filters, 3, padding="same", use_bias=False, name=f"{name}_conv{j}")(y)
        y = _batchnorm(f"{name}_bn{j}", sync_batchnorm, bn_momentum)(y)
        y = keras.layers.ReLU(name=f"{name}_relu{j}")(y)
    if pool:
        y = keras.layers.MaxPooling2D(3, strides=2, padding="same", name=f"{name}_pool")(y)
    return keras.layers.Add(name=f"{name}_add")([y, shortcut])


def _widths(widths: Sequence[int], width: float, what: str) -> list:
    if len(widths) != 5:
        raise ValueError(f"{what}: expected 5 tuple widths (Fig. 2), got {tuple(widths)}")
    return [scaled_filters(int(w), width) for w in widths]


def _lesion_names(num_lesions: int) -> list:
    if num_lesions < 1:
        raise ValueError(f"num_lesions must be >= 1, got {num_lesions}")
    if num_lesions <= len(keys.LESIONS):
        return list(keys.LESIONS[:num_lesions])
    return [f"lesion{i}" for i in range(num_lesions)]


def build_xception_unet(
    *,
    input_shape: Sequence[Optional[int]],
    num_lesions: int = len(LESIONS),
    widths: Sequence[int] = GENERATOR_WIDTHS,
    width: float = 1.0,
    separable: bool = True,
    sync_batchnorm: bool = True,
    bn_momentum: float = 0.99,
    name: str = "xception_unet",
) -> keras.Model:
    """The multi-lesion mask generator ``G`` (Zhou et al. 2019, section 3.2, Fig. 2).

    Nine tuples (:func:`conv_tuple`): encoder tuples 1-5 halve the resolution (tuple 1 with
    plain convolutions, 2-5 Xception modules when ``separable``); decoder tuples 4..1 each
    up-sample x2, crop to the skip (:class:`CropLike`), concatenate the output of the encoder
    tuple of the same size and map to its width. A last x2 up-sampling returns to the input
    size and ``L`` 3x3 convolutions with a sigmoid give one mask per lesion.

    Args:
        input_shape: ``(H, W, 3)``; ``H``/``W`` may be ``None`` and need not be multiples of 32.
        num_lesions: ``L`` (4: MA, HE, EX, SE).
        widths: the five encoder widths (the decoder mirrors tuples 4..1).
        width: multiplier of every width (1.0 = the paper's).
        separable: Xception modules in tuples 2-9 (``CE2``) or plain convolutions (``CE1``).
        sync_batchnorm, bn_momentum: batch norm options (see :func:`conv_tuple`).
        name: model name.

    Returns:
        A model ``image -> {"lesion_logits", "lesion_probs"}``, both ``[B, H, W, L]``.

    Example::

        g = build_xception_unet(input_shape=(640, 640, 3))
        g(images)["lesion_probs"].shape    # (B, 640, 640, 4)
    """
    shape = check_input_shape(input_shape, what=name, min_size=_MIN_SIZE)
    filters = _widths(widths, width, name)
    image = keras.Input(shape, name=keys.IMAGE)
    x = image
    skips = []
    for i, f in enumerate(filters, start=1):
        # The first tuple "employs normal convolution operations" in both variants.
        x = conv_tuple(
            x,
            f,
            separable=separable and i > 1,
            pool=True,
            name=f"encoder_tuple{i}",
            sync_batchnorm=sync_batchnorm,
            bn_momentum=bn_momentum,
        )
        skips.append(x)
    for i in range(len(filters) - 1, 0, -1):
        skip = skips[i - 1]
        x = NearestUpSampling2D(2, name=f"decoder_tuple{i}_up")(x)
        x = CropLike(name=f"decoder_tuple{i}_crop")([x, skip])
        x = keras.layers.Concatenate(name=f"decoder_tuple{i}_concat")([x, skip])
        x = conv_tuple(
            x,
            filters[i - 1],
            separable=separable,
            pool=False,
            name=f"decoder_tuple{i}",
            sync_batchnorm=sync_batchnorm,
            bn_momentum=bn_momentum,
        )
    x = NearestUpSampling2D(2, name="output_up")(x)
    x = CropLike(name="output_crop")([x, image])
    logits = [
        keras.layers.Conv2D(1, 3, padding="same", name=f"lesion_{lesion}_conv")(x)
        for lesion in _lesion_names(num_lesions)
    ]
    logits = (
        keras.layers.Concatenate(name="lesion_concat")(logits) if len(logits) > 1 else logits[0]
    )
    logits = keras.layers.Activation("linear", dtype="float32", name=keys.LESION_LOGITS)(logits)
    probs = keras.layers.Activation("sigmoid", dtype="float32", name=keys.LESION_PROBS)(logits)
    return keras.Model(image, {keys.LESION_LOGITS: logits, keys.LESION_PROBS: probs}, name=name)


def build_discriminator(
    *,
    input_shape: Sequence[Optional[int]],
    num_lesions: int = len(LESIONS),
    widths: Sequence[int] = DISCRIMINATOR_WIDTHS,
    width: float = 1.0,
    sync_batchnorm: bool = True,
    bn_momentum: float = 0.99,
    name: str = "lesion_discriminator",
) -> keras.Model:
    """The multi-lesion discriminator ``D`` (Zhou et al. 2019, section 3.2).

    "The predicted multi-lesion masks are concatenated with the input images and then taken as
    inputs for the discriminator D which has five convolution mapping tuples. Each tuple
    consists of two convolutional layers with kernel size of 3 and one max-pooling layer with
    a stride of 2 ... ReLU activation and batch normalization. A global average pooling ... a
    dense connection and Sigmoid activation". The dense layer's logit is returned too, for the
    numerically stable losses.

    Args:
        input_shape: the image's ``(H, W, 3)``.
        num_lesions: ``L``, channels of the masks input.
        widths, width: the five tuple widths and their multiplier.
        sync_batchnorm, bn_momentum: batch norm options (see :func:`conv_tuple`).
        name: model name.

    Returns:
        A model ``{"image": [B, H, W, 3], "masks": [B, H, W, L]} -> {"real_logit",
        "real_prob"}`` (``[B, 1]``; 1 = masks of a pixel-level annotated image).

    Example::

        d = build_discriminator(input_shape=(640, 640, 3))
        d({"image": images, "masks": g(images)["lesion_probs"]})["real_prob"]
    """
    shape = check_input_shape(input_shape, what=name, min_size=_MIN_SIZE)
    filters = _widths(widths, width, name)
    image = keras.Input(shape, name=keys.IMAGE)
    masks = keras.Input(shape[:2] + (num_lesions,), name=keys.MASKS)
    x = keras.layers.Concatenate(name="disc_concat")([image, masks])
    for i, f in enumerate(filters, start=1):
        for j in (1, 2):
            x = keras.layers.Conv2D(
                f, 3, padding="same", use_bias=False, name=f"disc_tuple{i}_conv{j}"
            )(x)
            x = _batchnorm(f"disc_tuple{i}_bn{j}", sync_batchnorm, bn_momentum)(x)
            x = keras.layers.ReLU(name=f"disc_tuple{i}_relu{j}")(x)
        x = keras.layers.MaxPooling2D(2, strides=2, padding="same", name=f"disc_tuple{i}_pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="disc_gap")(x)
    logit = keras.layers.Dense(1, dtype="float32", name=REAL_LOGIT)(x)
    prob = keras.layers.Activation("sigmoid", dtype="float32", name=REAL_PROB)(logit)
    return keras.Model(
        {keys.IMAGE: image, keys.MASKS: masks}, {REAL_LOGIT: logit, REAL_PROB: prob}, name=name
    )


LOW_FEATURES = "grader_low"
TRUNK = "grader_trunk"


def build_base_grader(
    *,
    input_shape: Sequence[Optional[int]],
    num_grades: int = keys.NUM_GRADES,
    low_channels: int = GRADER_LOW_CHANNELS,
    widths: Sequence[int] = GRADER_WIDTHS,
    width: float = 1.0,
    dropout: float = 0.0,
    sync_batchnorm: bool = True,
    bn_momentum: float = 0.99,
    name: str = "base_grader",
) -> keras.Model:
    """The basic disease grading CNN ``C`` (Zhou et al. 2019, section 3.3; Table 1 "Ori").

    ``image -> grader_low -> grader_trunk -> dense softmax``:

    - ``grader_low`` (sub-model): a full-resolution 3x3 convolution, batch norm and ReLU, the
      low-level features ``f_low`` ``[B, H, W, low_channels]`` of Eq. 5;
    - ``grader_trunk`` (sub-model, any spatial size): five Xception-module tuples
      (:func:`conv_tuple`) and global average pooling, the pooled top features
      ``[B, widths[-1]]`` (1024 in Fig. 3);
    - ``base_grade_logits``: dropout and a dense layer.

    The two sub-models are reused, with their weights, by :func:`build_lesion_attentive_grader`.
    See the module docstring for why this backbone.

    Args:
        input_shape: ``(H, W, 3)``.
        num_grades: classes (5 ICDRS grades).
        low_channels: channels of ``f_low`` (and of ``f_high``).
        widths, width: the five trunk widths and their multiplier.
        dropout: dropout before the classifier.
        sync_batchnorm, bn_momentum: batch norm options (see :func:`conv_tuple`).
        name: model name.

    Returns:
        A model ``image -> {"grade_logits", "grade_probs"}``.

    Example::

        base = build_base_grader(input_shape=(640, 640, 3))
        base.compile("adam", {"grade_probs": drkeras.losses.CategoricalFocalLoss()})
    """
    shape = check_input_shape(input_shape, what=name, min_size=_MIN_SIZE)
    filters = _widths(widths, width, name)
    low = scaled_filters(low_channels, width)

    low_in = keras.Input(shape, name=keys.IMAGE)
    f_low = keras.layers.Conv2D(low, 3, padding="same", use_bias=False, name="low_conv")(low_in)
    f_low = _batchnorm("low_bn", sync_batchnorm, bn_momentum)(f_low)
    f_low = keras.layers.ReLU(name="low_relu")(f_low)
    low_model = keras.Model(low_in, f_low, name=LOW_FEATURES)

    trunk_in = keras.Input((None, None, low), name="features")
    x = trunk_in
    for i, f in enumerate(filters, start=1):
        x = conv_tuple(
            x,
            f,
            separable=True,
            pool=True,
            name=f"trunk_tuple{i}",
            sync_batchnorm=sync_batchnorm,
            bn_momentum=bn_momentum,
        )
    x = keras.layers.GlobalAveragePooling2D(name="trunk_gap")(x)
    trunk = keras.Model(trunk_in, x, name=TRUNK)

    image = keras.Input(shape, name=keys.IMAGE)
    pooled = trunk(low_model(image))
    if dropout:
        pooled = keras.layers.Dropout(dropout, name="base_dropout")(pooled)
    logits = keras.layers.Dense(num_grades, dtype="float32", name="base_grade_logits")(pooled)
    logits = keras.layers.Activation("linear", dtype="float32", name=keys.GRADE_LOGITS)(logits)
    probs = keras.layers.Activation("softmax", dtype="float32", name=keys.GRADE_PROBS)(logits)
    return keras.Model(image, {keys.GRADE_LOGITS: logits, keys.GRADE_PROBS: probs}, name=name)


def build_lesion_attentive_grader(
    base_grader: keras.Model,
    *,
    num_lesions: int = len(LESIONS),
    attention: bool = True,
    fusion_units: int = 1024,
    width: float = 1.0,
    dropout: float = 0.0,
    name: str = "lesion_attentive_grader",
) -> keras.Model:
    """The lesion attentive grading model (Zhou et al. 2019, section 3.3, Fig. 3, Eqs. 4-6).

    Built on a (pre-trained) :func:`build_base_grader`, whose ``grader_low`` and
    ``grader_trunk`` sub-models are SHARED (same weights). For image ``x`` and the
    generator's masks ``m`` (``[B, H, W, L]``):

    - ``f_low = grader_low(x)``; ``f_high = W_ctx trunk(f_low) + b``, the global context vector
      (a 1x1 convolution over the top features, taken after the average pooling, which it
      commutes with), with ``f_low``'s channel count;
    - Eq. 5, per lesion ``l``: ``f_low_att_l = ReLU(W_low_l * concat(m_l, f_low) + b)`` (3x3
      convolution, Fig. 3);
    - Eq. 6: ``alpha_l = sigmoid(W_high_l * (f_low_att_l . f_high) + b)`` (1x1 convolution),
      the attention map ``[B, H, W, 1]``, the pseudo mask of lesion ``l`` for image-level data;
    - ``v_l = trunk(alpha_l . f_low)``: the attentive features through the shared grading layers;
    - ``concat(v_1..v_L)`` -> 1x1 convolution (dense, ``fusion_units``, ReLU) -> dense softmax.

    ``attention=False`` is the "Lesion (Pretrained)" baseline of Table 1: "the initially
    generated multi-lesion masks are weighted on image feature maps ... without the lesion
    attention model": ``alpha_l = m_l``.

    Args:
        base_grader: a model from :func:`build_base_grader` (its layers are reused).
        num_lesions: ``L``.
        attention: learn attention maps (Eqs. 5-6) or weight by the masks directly.
        fusion_units, width: units of the fusion layer (1024 in Fig. 3) and their multiplier.
        dropout: dropout before the classifier.
        name: model name.

    Returns:
        A model ``{"image": [B, H, W, 3], "masks": [B, H, W, L]} -> {"grade_logits",
        "grade_probs", "attention"}`` (``attention`` ``[B, H, W, L]``).

    Example::

        grader = build_lesion_attentive_grader(base, num_lesions=4)
        out = grader({"image": images, "masks": generator(images)["lesion_probs"]})
        out["attention"]      # the pseudo masks of section 3.3
    """
    try:
        low_model = base_grader.get_layer(LOW_FEATURES)
        trunk = base_grader.get_layer(TRUNK)
    except ValueError:
        raise ValueError(
            f"base_grader {base_grader.name!r} must have the sub-models {LOW_FEATURES!r} and "
            f"{TRUNK!r}; build it with build_base_grader"
        ) from None
    num_grades = int(base_grader.output[keys.GRADE_PROBS].shape[-1])
    shape = tuple(base_grader.input_shape[1:])
    low = int(low_model.output_shape[-1])
    image = keras.Input(shape, name=keys.IMAGE)
    masks = keras.Input(shape[:2] + (num_lesions,), name=keys.MASKS)
    f_low = low_model(image)
    if attention:
        f_high = keras.layers.Dense(low, name="attention_context")(trunk(f_low))
        f_high = keras.layers.Reshape((1, 1, low), name="attention_context_map")(f_high)
    maps, pooled = [], []
    for index, lesion in enumerate(_lesion_names(num_lesions)):
        m = keras.layers.Lambda(
            lambda t, k=index: t[..., k : k + 1], name=f"attention_{lesion}_mask"
        )(masks)
        if attention:
            fused = keras.layers.Concatenate(name=f"attention_{lesion}_concat")([m, f_low])
            f_att = keras.layers.Conv2D(
                low, 3, padding="same", activation="relu", name=f"attention_{lesion}_low"
            )(fused)
            gated = keras.layers.Multiply(name=f"attention_{lesion}_gate")([f_att, f_high])
            alpha = keras.layers.Conv2D(1, 1, activation="sigmoid", name=f"attention_{lesion}_map")(
                gated
            )
        else:
            alpha = m
        maps.append(alpha)
        weighted = keras.layers.Multiply(name=f"attention_{lesion}_features")([alpha, f_low])
        pooled.append(trunk(weighted))
    join = keras.layers.Concatenate
    attention_maps = join(name="attention_concat")(maps) if len(maps) > 1 else maps[0]
    attention_maps = keras.layers.Activation("linear", dtype="float32", name=keys.ATTENTION)(
        attention_maps
    )
    x = join(name="fusion_concat")(pooled) if len(pooled) > 1 else pooled[0]
    x = keras.layers.Dense(scaled_filters(fusion_units, width), activation="relu", name="fusion")(x)
    if dropout:
        x = keras.layers.Dropout(dropout, name="fusion_dropout")(x)
    logits = keras.layers.Dense(num_grades, dtype="float32", name="attentive_grade_logits")(x)
    logits = keras.layers.Activation("linear", dtype="float32", name=keys.GRADE_LOGITS)(logits)
    probs = keras.layers.Activation("softmax", dtype="float32", name=keys.GRADE_PROBS)(logits)
    return keras.Model(
        {keys.IMAGE: image, keys.MASKS: masks},
        {keys.GRADE_LOGITS: logits, keys.GRADE_PROBS: probs, keys.ATTENTION: attention_maps},
        name=name,
    )


def build_collaborative_model(
    generator: keras.Model, grader: keras.Model, *, name: str = "collaborative"
) -> keras.Model:
    """Inference of the whole method: ``image -> G -> masks -> C(image, masks)``.

    Args:
        generator: from :func:`build_xception_unet`.
        grader: from :func:`build_lesion_attentive_grader` (same input size and ``L``).
        name: model name.

    Returns:
        A model ``image -> {"lesion_probs", "grade_logits", "grade_probs", "attention"}``, the
        network exported as the grader (its serving signature takes only images).

    Example::

        model = build_collaborative_model(generator, grader)
        model(images)["grade_probs"]
    """
    shape = tuple(generator.input_shape[1:])
    inputs = grader.input
    if not isinstance(inputs, dict) or {keys.IMAGE, keys.MASKS} - set(inputs):
        raise ValueError(
            f"grader {grader.name!r} must take {{{keys.IMAGE!r}, {keys.MASKS!r}}} inputs; build "
            "it with build_lesion_attentive_grader"
        )
    grader_shape = tuple(inputs[keys.IMAGE].shape[1:])
    if grader_shape != shape:
        raise ValueError(f"generator input {shape} and grader image input {grader_shape} differ")
    image = keras.Input(shape, name=keys.IMAGE)
    masks = generator(image)[keys.LESION_PROBS]
    graded = grader({keys.IMAGE: image, keys.MASKS: masks})
    outputs = {}
    for key in (keys.GRADE_LOGITS, keys.GRADE_PROBS, keys.ATTENTION):
        outputs[key] = keras.layers.Activation("linear", dtype="float32", name=key)(graded[key])
    outputs[keys.LESION_PROBS] = keras.layers.Activation(
        "linear", dtype="float32", name=keys.LESION_PROBS
    )(masks)
    return keras.Model(image, outputs, name=name)
