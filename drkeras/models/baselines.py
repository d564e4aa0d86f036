"""The comparison networks of the MTUnet and PLDMLT papers, behind two registries.

Segmenters (Foo et al. 2020 Table 2; PLDMLT Tables 1-2), :func:`build_segmenter`:

=================  ==========================================================  ============
name               network                                                     input H, W
=================  ==========================================================  ============
``unet``           ``segmentation_models.Unet`` (backbone ``vgg16`` default)  multiple of 32
``linknet``        ``segmentation_models.Linknet``                             multiple of 32
``fpn``            ``segmentation_models.FPN``                                 multiple of 32
``deeplabv3plus``  ``keras_cv.models.DeepLabV3Plus`` on a ResNetV2 backbone    multiple of 32
=================  ==========================================================  ============

DeepLab: the MTUnet paper compares with DeepLabv3, PLDMLT with DeepLabv3+. We use keras-cv
0.8.2's ``DeepLabV3Plus`` (DeepLabv3's atrous spatial pyramid pooling plus the v3+ low-level
decoder), which builds offline on a ``ResNetV2Backbone`` constructed from its stage
configuration (keras-cv's ``ResNet18V2Backbone``-style aliases fetch their configuration from
the network, so they are not used); ``width`` narrows the backbone for quick runs.

Graders (Foo et al. 2020 Tables 3-4), :func:`build_grader`; ImageNet architecture + global
average pooling + dense softmax (the same head as MTUnet's, :func:`blocks.grading_head`):

=======================  =============================================  =============
name                     network                                        min H, W (px)
=======================  =============================================  =============
``nasnet_large``         ``keras.applications.NASNetLarge``             32
``nasnet_mobile``        ``keras.applications.NASNetMobile``            32
``densenet201``          ``keras.applications.DenseNet201``             32
``inception_resnet_v2``  ``keras.applications.InceptionResNetV2``       75
``resnext50``            image-classifiers ``resnext50``                32
``resnext101``           image-classifiers ``resnext101``               32
=======================  =============================================  =============

The minimum sizes are what the architectures' valid-padded stems allow (measured:
InceptionResNetV2 fails at 74 px); ImageNet weights of NASNet additionally require keras'
default sizes (224 Mobile, 331 Large). Every builder returns a functional model with the named
outputs of :mod:`drkeras.keys` (segmenters: ``lesion_logits`` and ``seg_probs`` (softmax) or
``lesion_probs`` (sigmoid); graders: ``grade_logits``, ``grade_probs``). The networks take inputs
as the data pipeline normalises them; with ImageNet weights use the scaling the weights expect,
``GRADERS[name].preprocess_input`` (segmentation-models: ``sm.get_preprocessing(backbone)``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.models import blocks, upsampling

__all__ = [
    "DEEPLAB_BACKBONES",
    "GRADERS",
    "SEGMENTERS",
    "GraderSpec",
    "build_deeplabv3plus",
    "build_grader",
    "build_segmenter",
]

SEGMENTERS = ("unet", "linknet", "fpn", "deeplabv3plus")
_SM_ARCHITECTURES = {"unet": "Unet", "linknet": "Linknet", "fpn": "FPN"}
_SEGMENTER_MULTIPLE = 32


def _segmentation_models():
    # Imported late: segmentation-models picks its Keras at import time from SM_FRAMEWORK,
    # which importing drkeras sets.
    import segmentation_models as sm

    return sm


def _named_seg_outputs(logits: tf.Tensor, activation: str) -> Dict[str, tf.Tensor]:
    probs_name = blocks.seg_output_name(activation)
    logits = keras.layers.Activation("linear", dtype="float32", name=keys.LESION_LOGITS)(logits)
    probs = keras.layers.Activation(activation, dtype="float32", name=probs_name)(logits)
    return {keys.LESION_LOGITS: logits, probs_name: probs}


def _check_encoder_weights(encoder_weights: Optional[str], what: str) -> None:
    if encoder_weights not in (None, "imagenet"):
        raise ValueError(
            f"{what}: {blocks.WEIGHTS_OPTION}={encoder_weights!r}; expected None or 'imagenet'"
        )


# ---------------------------------------------------------------------------------------------
# DeepLabv3+

# Stage configurations of the ResNetV2 backbones (He et al. 2016, identity mappings).
DEEPLAB_BACKBONES: Dict[str, dict] = {
    "resnet18_v2": dict(stackwise_blocks=(2, 2, 2, 2), block_type="basic_block"),
    "resnet34_v2": dict(stackwise_blocks=(3, 4, 6, 3), block_type="basic_block"),
    "resnet50_v2": dict(stackwise_blocks=(3, 4, 6, 3), block_type="block"),
    "resnet101_v2": dict(stackwise_blocks=(3, 4, 23, 3), block_type="block"),
}
_RESNET_FILTERS = (64, 128, 256, 512)
_RESNET_STRIDES = (1, 2, 2, 2)


def build_deeplabv3plus(
    *,
    input_shape: Sequence[Optional[int]],
    num_classes: int,
    activation: str = "softmax",
    backbone: str = "resnet50_v2",
    encoder_weights: Optional[str] = None,
    width: float = 1.0,
    aspp_filters: int = 256,
    aspp_dilation_rates: Sequence[int] = (6, 12, 18),
    projection_filters: int = 48,
    head_filters: int = 256,
    name: str = "deeplabv3plus",
) -> keras.Model:
    """DeepLabv3+ (Chen et al. 2018) with ASPP (DeepLabv3, Chen et al. 2017) from keras-cv 0.8.2.

    Args:
        input_shape: ``(H, W, C)``, ``H``/``W`` multiples of 32 (the v3+ decoder upsamples the
            stride-32 ASPP output by 8 onto the stride-4 features, then by 4).
        num_classes: pixel classes.
        activation: ``"softmax"`` (output ``seg_probs``) or ``"sigmoid"`` (``lesion_probs``).
        backbone: a key of :data:`DEEPLAB_BACKBONES`.
        encoder_weights: ``None`` or ``"imagenet"`` (only ``resnet50_v2``: keras-cv's
            ``resnet50_v2_imagenet`` preset, downloaded; needs ``width=1.0``).
        width: multiplier of the backbone's stage filters (keras-cv fixes the stem at 64
            filters, and with basic blocks the first stage too).
        aspp_filters, aspp_dilation_rates: channels and rates of the atrous spatial pyramid.
        projection_filters: channels of the low-level (stride 4) feature projection.
        head_filters: channels of the 1x1 convolution before the classifier.
        name: model name.

    Example: ``build_deeplabv3plus(input_shape=(64, 64, 3), num_classes=4,
    backbone="resnet18_v2", width=0.25, aspp_filters=16, head_filters=16)``.
    """
    import keras_cv  # imported here: it is slow to import and only DeepLab needs it

    shape = blocks.check_input_shape(
        input_shape, what=name, min_size=_SEGMENTER_MULTIPLE, multiple=_SEGMENTER_MULTIPLE
    )
    if backbone not in DEEPLAB_BACKBONES:
        raise ValueError(
            f"{name}: unknown backbone {backbone!r}; choose one of {sorted(DEEPLAB_BACKBONES)}"
        )
    _check_encoder_weights(encoder_weights, name)
    if encoder_weights is not None:
        if backbone != "resnet50_v2" or width != 1.0:
            raise ValueError(
                f"{name}: ImageNet weights exist for backbone='resnet50_v2' at width=1.0 only "
                f"(got backbone={backbone!r}, width={width}); set {blocks.WEIGHTS_OPTION}=none"
            )
        with blocks.pretrained_download_guard("ResNet50V2 (keras-cv preset)"):
            encoder = keras_cv.models.ResNetV2Backbone.from_preset(
                "resnet50_v2_imagenet", input_shape=shape, include_rescaling=False
            )
    else:
        config = DEEPLAB_BACKBONES[backbone]
        filters = [blocks.scaled_filters(f, width) for f in _RESNET_FILTERS]
        if config["block_type"] == "basic_block":
            # keras-cv's first basic block adds its input (the fixed 64-channel stem) unprojected.
            filters[0] = _RESNET_FILTERS[0]
        encoder = keras_cv.models.ResNetV2Backbone(
            stackwise_filters=filters,
            stackwise_blocks=list(config["stackwise_blocks"]),
            stackwise_strides=list(_RESNET_STRIDES),
            block_type=config["block_type"],
            include_rescaling=False,
            input_shape=shape,
        )
    head = keras.Sequential(
        [
            keras.layers.Conv2D(head_filters, 1, use_bias=False, name="segmentation_head_conv"),
            keras.layers.BatchNormalization(name="segmentation_head_norm"),
            keras.layers.ReLU(name="segmentation_head_relu"),
            keras.layers.UpSampling2D(4, interpolation="bilinear", name="segmentation_head_up"),
            keras.layers.Conv2D(num_classes, 1, name="segmentation_head_logits"),
        ],
        name="segmentation_head",
    )
    deeplab = keras_cv.models.DeepLabV3Plus(
        backbone=encoder,
        num_classes=num_classes,
        projection_filters=projection_filters,
        spatial_pyramid_pooling=keras_cv.layers.SpatialPyramidPooling(
            dilation_rates=list(aspp_dilation_rates),
            num_channels=aspp_filters,
            name="aspp",
        ),
        segmentation_head=head,
    )
    return keras.Model(deeplab.input, _named_seg_outputs(deeplab.output, activation), name=name)


# ---------------------------------------------------------------------------------------------
# Segmenter registry


def build_segmenter(
    name: str,
    *,
    input_shape: Sequence[Optional[int]],
    num_classes: int,
    activation: str = "softmax",
    backbone: Optional[str] = None,
    encoder_weights: Optional[str] = None,
    model_name: Optional[str] = None,
    **kwargs,
) -> keras.Model:
    """A segmentation baseline by registry name (:data:`SEGMENTERS`) with named outputs.

    ``unet``, ``linknet`` and ``fpn`` come from segmentation-models 1.0.1 (Ronneberger et al.
    2015; Chaurasia & Culurciello 2017; Lin et al. 2017), built with a linear head so the
    logits and the softmax/sigmoid probabilities are both outputs; ``deeplabv3plus`` is
    :func:`build_deeplabv3plus`. Foo et al. 2020 Table 2, PLDMLT Tables 1-2.

    Args:
        name: ``"unet"``, ``"linknet"``, ``"fpn"`` or ``"deeplabv3plus"``.
        input_shape: ``(H, W, C)``, ``H`` and ``W`` multiples of 32.
        num_classes: pixel classes.
        activation: ``"softmax"`` (output ``seg_probs``) or ``"sigmoid"`` (``lesion_probs``).
        backbone: segmentation-models backbone (default ``"vgg16"``: the MTUnet encoder, for a
            like-for-like comparison) or, for DeepLab, a key of :data:`DEEPLAB_BACKBONES`
            (default ``"resnet50_v2"``).
        encoder_weights: ``None`` or ``"imagenet"`` (downloads; offline this raises
            :class:`~drkeras.models.blocks.PretrainedWeightsUnavailable`).
        model_name: the model's name (default: ``name``).
        **kwargs: passed to the architecture (``decoder_filters`` of Unet/Linknet,
            ``pyramid_block_filters`` of FPN, ``width``/``aspp_filters``/... of DeepLab).

    Example::

        model = build_segmenter("linknet", input_shape=(64, 64, 3), num_classes=4,
                                backbone="resnet18")
        model(images)["seg_probs"]    # (batch, 64, 64, 4)
    """
    if name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {name!r}; choose one of {SEGMENTERS}")
    model_name = model_name or name
    blocks.seg_output_name(activation)
    if name == "deeplabv3plus":
        return build_deeplabv3plus(
            input_shape=input_shape,
            num_classes=num_classes,
            activation=activation,
            backbone=backbone or "resnet50_v2",
            encoder_weights=encoder_weights,
            name=model_name,
            **kwargs,
        )
    shape = blocks.check_input_shape(
        input_shape, what=model_name, min_size=_SEGMENTER_MULTIPLE, multiple=_SEGMENTER_MULTIPLE
    )
    _check_encoder_weights(encoder_weights, model_name)
    backbone = backbone or "vgg16"
    sm = _segmentation_models()
    if backbone not in sm.get_available_backbone_names():
        raise ValueError(
            f"{model_name}: unknown segmentation-models backbone {backbone!r}; choose one of "
            f"{sm.get_available_backbone_names()}"
        )
    with blocks.pretrained_download_guard(f"the {backbone} encoder of {name}"):
        net = getattr(sm, _SM_ARCHITECTURES[name])(
            backbone,
            input_shape=shape,
            classes=num_classes,
            activation="linear",
            encoder_weights=encoder_weights,
            **kwargs,
        )
    # The decoders' nearest UpSampling2D has no deterministic GPU gradient in TF 2.15; the
    # same network with NearestUpSampling2D (same layers and weights) has.
    net = upsampling.replace_nearest_upsampling(net)
    return keras.Model(net.input, _named_seg_outputs(net.output, activation), name=model_name)


# ---------------------------------------------------------------------------------------------
# Grader registry


@dataclasses.dataclass(frozen=True)
class GraderSpec:
    """How to build one grading baseline.

    Attributes:
        paper_name: the name in the papers' tables.
        build_base: ``f(input_tensor, weights) -> keras.Model`` without its classifier.
        min_size: smallest input height/width the architecture accepts.
        preprocess_input: the input scaling its ImageNet weights expect.
    """

    paper_name: str
    build_base: Callable[[tf.Tensor, Optional[str]], keras.Model]
    min_size: int
    preprocess_input: Callable


def _applications(constructor: str) -> Callable:
    def build(input_tensor, weights):
        return getattr(keras.applications, constructor)(
            include_top=False, weights=weights, input_tensor=input_tensor
        )

    return build


def _image_classifiers(name: str) -> Callable:
    def build(input_tensor, weights):
        from classification_models.tfkeras import Classifiers

        constructor, _ = Classifiers.get(name)
        return constructor(input_tensor=input_tensor, include_top=False, weights=weights)

    return build


def _resnext_preprocess(x):
    # image-classifiers' ResNeXt normalises its input with a batch-norm layer of its own.
    return x


GRADERS: Dict[str, GraderSpec] = {
    "nasnet_large": GraderSpec(
        "NASNet (Large)",
        _applications("NASNetLarge"),
        32,
        keras.applications.nasnet.preprocess_input,
    ),
    "nasnet_mobile": GraderSpec(
        "NASNet (Mobile)",
        _applications("NASNetMobile"),
        32,
        keras.applications.nasnet.preprocess_input,
    ),
    "densenet201": GraderSpec(
        "DenseNet-201",
        _applications("DenseNet201"),
        32,
        keras.applications.densenet.preprocess_input,
    ),
    "inception_resnet_v2": GraderSpec(
        "InceptionResNetV2",
        _applications("InceptionResNetV2"),
        75,
        keras.applications.inception_resnet_v2.preprocess_input,
    ),
    "resnext50": GraderSpec("ResNeXt-50", _image_classifiers("resnext50"), 32, _resnext_preprocess),
    "resnext101": GraderSpec(
        "ResNeXt-101", _image_classifiers("resnext101"), 32, _resnext_preprocess
    ),
}


def build_grader(
    name: str,
    *,
    input_shape: Sequence[Optional[int]],
    num_grades: int = keys.NUM_GRADES,
    encoder_weights: Optional[str] = None,
    pooling: str = "avg",
    hidden: Sequence[int] = (),
    dropout: float = 0.0,
    model_name: Optional[str] = None,
) -> keras.Model:
    """A grading baseline by registry name (:data:`GRADERS`) with named outputs.

    The ImageNet architecture without its classifier, then global pooling and a dense softmax
    over the grades (:func:`drkeras.models.blocks.grading_head`). Foo et al. 2020 Tables 3-4
    (NASNet, DenseNet-201, ResNeXt-101, InceptionResNetV2); PLDMLT section 3.1 (ResNeXt-50/101
    pseudo-label models).

    Args:
        name: a key of :data:`GRADERS`.
        input_shape: ``(H, W, C)``, at least ``GRADERS[name].min_size`` pixels a side.
        num_grades: number of grades.
        encoder_weights: ``None`` or ``"imagenet"`` (downloads; offline this raises
            :class:`~drkeras.models.blocks.PretrainedWeightsUnavailable` naming
            ``model.encoder_weights``).
        pooling: ``"avg"`` (the architectures' own) or ``"max"``.
        hidden, dropout: hidden dense layers and dropout of the head.
        model_name: the model's name (default: ``name``).

    Returns:
        A functional model from ``keys.IMAGE`` to ``{grade_logits, grade_probs}``.

    Example::

        model = build_grader("resnext50", input_shape=(64, 64, 3))
        model(images)["grade_probs"]   # (batch, 5)
    """
    if name not in GRADERS:
        raise ValueError(f"unknown grader {name!r}; choose one of {sorted(GRADERS)}")
    spec = GRADERS[name]
    model_name = model_name or name
    _check_encoder_weights(encoder_weights, model_name)
    shape = blocks.check_input_shape(
        input_shape,
        what=f"{model_name} ({spec.paper_name})",
        min_size=spec.min_size,
        channels=3 if encoder_weights is not None else None,
    )
    inputs = keras.Input(shape, name=keys.IMAGE)
    with blocks.pretrained_download_guard(spec.paper_name):
        base = spec.build_base(inputs, encoder_weights)
    outputs = blocks.grading_head(
        base.output, num_grades=num_grades, pooling=pooling, hidden=tuple(hidden), dropout=dropout
    )
    return keras.Model(inputs, outputs, name=model_name)
