"""Which input scaling each network's ImageNet weights were trained with: one table.

A pretrained network only sees the images its weights know when its input is scaled as in its
ImageNet training. The libraries behind our networks disagree (checked by
``tests/test_input_scaling.py`` against each library's own ``preprocess_input`` on a random
uint8 image):

- ``imagenet_caffe`` (``keras.applications.vgg16`` "caffe": RGB to BGR, ImageNet mean
  subtracted): ``vgg16``, ``vgg19`` (our VGG16 encoder of MTUnet and PLDMLT; segmentation-models);
- ``imagenet_torch`` ("torch": /255, ImageNet mean and std): ``densenet*``,
  ``seresnet50/101/152``, ``seresnext50/101``, ``senet154``, ``efficientnetb0-7``;
- ``symmetric`` ("tf": [-1, 1]): ``nasnet_large``, ``nasnet_mobile``, ``inception_resnet_v2``,
  ``inceptionresnetv2``, ``inceptionv3``, ``mobilenet``, ``mobilenetv2``;
- ``raw`` (0-255 as it is; image-classifiers' ``preprocess_input`` is the identity, its networks
  normalise with a first batch-norm layer): ``resnet18..152``, ``seresnet18/34``,
  ``resnext50/101``;
- ``unit`` ([0, 1]; keras-cv's ``include_rescaling`` is ``Rescaling(1 / 255)``): the
  ``resnet*_v2`` ``ResNetV2Backbone`` of DeepLabv3+.

keras-cv's ``resnet50_v2_imagenet`` preset was trained by keras-cv with its ``include_rescaling``
layer (0-255 input, [0, 1] inside); :func:`drkeras.models.baselines.build_deeplabv3plus` builds
it with ``include_rescaling=False``, so the pipeline feeds [0, 1] (``unit``) itself.

Every value is a mode of :func:`drkeras.data.preprocess.normalize` (``raw`` is the identity on
0-255 RGB), so the same name serves the training pipelines, the evaluation and the exported
serving signature (:func:`drkeras.export.export_model` ``preprocess={"normalization": ...}``).

Without pretrained weights (``model.encoder_weights=none``) every network gets the experiment's
``data.normalization``: a comparison then differs only in the architecture.

Example::

    >>> input_scaling("resnext101", encoder_weights="imagenet", default="unit")
    'raw'
    >>> input_scaling("vgg16", encoder_weights=None, default="unit")
    'unit'
"""

from __future__ import annotations

from typing import Dict, Optional

__all__ = ["IMAGENET_SCALING", "RAW", "input_scaling"]

RAW = "raw"  # 0-255 RGB as it is (drkeras.data.preprocess.normalize mode "raw")

_CAFFE, _TORCH, _TF, _UNIT = "imagenet_caffe", "imagenet_torch", "symmetric", "unit"


def _each(names, mode: str) -> Dict[str, str]:
    return {name: mode for name in names}


# Network / backbone name -> preprocess.normalize mode of its ImageNet weights.
IMAGENET_SCALING: Dict[str, str] = {
    # keras.applications VGG16 layout and weights: drkeras.models.blocks.vgg16_encoder (the
    # VGG16-UNet of MTUnet and PLDMLT) and segmentation-models' vgg backbones.
    **_each(("vgg16", "vgg19"), _CAFFE),
    # keras.applications graders (drkeras.models.baselines.GRADERS)
    **_each(("nasnet_large", "nasnet_mobile", "inception_resnet_v2"), _TF),
    "densenet201": _TORCH,
    # image-classifiers graders and segmentation-models backbones
    **_each(("resnext50", "resnext101"), RAW),
    **_each(("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"), RAW),
    **_each(("seresnet18", "seresnet34"), RAW),
    **_each(
        ("seresnet50", "seresnet101", "seresnet152", "seresnext50", "seresnext101", "senet154"),
        _TORCH,
    ),
    **_each(("densenet121", "densenet169"), _TORCH),
    **_each(("inceptionresnetv2", "inceptionv3", "mobilenet", "mobilenetv2"), _TF),
    **_each(tuple(f"efficientnetb{i}" for i in range(8)), _TORCH),
    # keras-cv ResNetV2 backbones of DeepLabv3+ (drkeras.models.baselines.DEEPLAB_BACKBONES)
    **_each(("resnet18_v2", "resnet34_v2", "resnet50_v2", "resnet101_v2"), _UNIT),
}


def input_scaling(network: str, *, encoder_weights: Optional[str], default: str) -> str:
    """The input scaling a network is trained, evaluated and served with.

    Args:
        network: a key of :data:`IMAGENET_SCALING`: a grader registry name
            (:data:`drkeras.models.baselines.GRADERS`), a segmentation-models backbone, a
            DeepLabv3+ backbone (:data:`drkeras.models.baselines.DEEPLAB_BACKBONES`) or
            ``vgg16`` (our VGG16 encoder).
        encoder_weights: ``model.encoder_weights``: ``None`` or ``"imagenet"``.
        default: the scaling without pretrained weights (``data.normalization``).

    Returns:
        A mode of :func:`drkeras.data.preprocess.normalize`.

    Raises:
        ValueError: ``network`` is not in the table (named, with the known names).

    Example::

        >>> input_scaling("densenet201", encoder_weights="imagenet", default="unit")
        'imagenet_torch'
    """
    if network not in IMAGENET_SCALING:
        raise ValueError(
            f"no ImageNet input scaling known for {network!r} "
            f"(drkeras.models.input_scaling.IMAGENET_SCALING); known networks: "
            f"{sorted(IMAGENET_SCALING)}"
        )
    if encoder_weights is None:
        return default
    return IMAGENET_SCALING[network]
