"""Baselines of the MTUnet/PLDMLT papers: the segmenter and grader registries.

Graders are built at their smallest allowed input. NASNetLarge (about 12 s to build here) and
ResNeXt-101 (about 15 s) are checked through their registry entries, with the shared code path
built on their smaller siblings NASNetMobile and ResNeXt-50; DenseNet-201 is built itself.
"""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.models import baselines, blocks

SIZE = 64


def _inbound(model, layer_name):
    node = model.get_layer(layer_name)._inbound_nodes[0]
    return [layer.name for layer in tf.nest.flatten(node.inbound_layers)]


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("unet", dict(backbone="vgg16", decoder_filters=(16, 16, 8, 8, 8))),
        ("linknet", dict(backbone="resnet18")),
        ("fpn", dict(backbone="vgg16", pyramid_block_filters=16)),
        (
            "deeplabv3plus",
            dict(
                backbone="resnet18_v2",
                width=0.125,
                aspp_filters=8,
                projection_filters=8,
                head_filters=8,
            ),
        ),
    ],
)
def test_segmenters_build_with_named_softmax_outputs(name, kwargs):
    model = baselines.build_segmenter(name, input_shape=(SIZE, SIZE, 3), num_classes=4, **kwargs)
    assert model.name == name
    assert sorted(model.output_names) == [keys.LESION_LOGITS, keys.SEG_PROBS]
    out = model(tf.random.uniform((1, SIZE, SIZE, 3)))
    assert out[keys.SEG_PROBS].shape == (1, SIZE, SIZE, 4)
    np.testing.assert_allclose(
        out[keys.SEG_PROBS], tf.nn.softmax(out[keys.LESION_LOGITS]), atol=1e-6
    )
    np.testing.assert_allclose(tf.reduce_sum(out[keys.SEG_PROBS], -1), 1.0, atol=1e-5)


def test_segmenter_sigmoid_output_and_passthrough_arguments():
    model = baselines.build_segmenter(
        "unet",
        input_shape=(SIZE, SIZE, 3),
        num_classes=5,
        activation="sigmoid",
        backbone="resnet18",
        decoder_filters=(16, 16, 8, 8, 4),
        model_name="unet_lesions",
    )
    assert model.name == "unet_lesions"
    assert sorted(model.output_names) == [keys.LESION_LOGITS, keys.LESION_PROBS]
    # The passed decoder width reached the last decoder stage (4 filters).
    assert model.get_layer("decoder_stage4b_conv").filters == 4
    out = model(tf.random.uniform((2, SIZE, SIZE, 3)))
    np.testing.assert_allclose(
        out[keys.LESION_PROBS], tf.sigmoid(out[keys.LESION_LOGITS]), atol=1e-6
    )


def test_deeplab_uses_aspp_on_stride_32_and_low_level_stride_4_features():
    model = baselines.build_deeplabv3plus(
        input_shape=(SIZE, SIZE, 3),
        num_classes=3,
        backbone="resnet18_v2",
        width=0.25,
        aspp_filters=8,
        aspp_dilation_rates=(2, 4, 6),
        projection_filters=4,
        head_filters=8,
    )
    head = model.get_layer(_inbound(model, keys.LESION_LOGITS)[0])
    aspp = model.get_layer("aspp")
    assert list(aspp.dilation_rates) == [2, 4, 6]
    assert aspp.input_shape[1:3] == (SIZE // 32, SIZE // 32)
    # The v3+ decoder: ASPP output upsampled onto the stride-4 features, projected to 4 channels.
    assert head.name == "segmentation_head"
    assert head.input_shape == (None, SIZE // 4, SIZE // 4, 8 + 4)
    assert model.output_shape[keys.SEG_PROBS] == (None, SIZE, SIZE, 3)


def test_segmenter_errors():
    with pytest.raises(ValueError, match="choose one of"):
        baselines.build_segmenter("segnet", input_shape=(SIZE, SIZE, 3), num_classes=4)
    with pytest.raises(ValueError, match="divisible by 32"):
        baselines.build_segmenter("unet", input_shape=(48, 48, 3), num_classes=4)
    with pytest.raises(ValueError, match="divisible by 32"):
        baselines.build_segmenter("deeplabv3plus", input_shape=(40, 40, 3), num_classes=4)
    with pytest.raises(ValueError, match="unknown segmentation-models backbone 'vgg17'"):
        baselines.build_segmenter(
            "fpn", input_shape=(SIZE, SIZE, 3), num_classes=4, backbone="vgg17"
        )
    with pytest.raises(ValueError, match="resnet50_v2' at width=1.0 only"):
        baselines.build_segmenter(
            "deeplabv3plus",
            input_shape=(SIZE, SIZE, 3),
            num_classes=4,
            backbone="resnet18_v2",
            encoder_weights="imagenet",
        )
    with pytest.raises(ValueError, match=r"model\.encoder_weights='places365'"):
        baselines.build_segmenter(
            "linknet", input_shape=(SIZE, SIZE, 3), num_classes=4, encoder_weights="places365"
        )


def test_segmenter_offline_imagenet_names_the_option(monkeypatch):
    from keras.src.utils import data_utils  # where keras.applications looks up get_file

    def offline(*args, **kwargs):
        raise Exception("URL fetch failure on https://...: None -- [Errno -3] name resolution")

    monkeypatch.setattr(data_utils, "get_file", offline)
    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(blocks.PretrainedWeightsUnavailable, match=r"model\.encoder_weights=none"):
        baselines.build_segmenter(
            "unet", input_shape=(SIZE, SIZE, 3), num_classes=4, encoder_weights="imagenet"
        )


@pytest.mark.parametrize(
    "name, size, features",
    [
        ("nasnet_mobile", 32, 1056),
        ("densenet201", 32, 1920),
        ("inception_resnet_v2", 75, 1536),
        ("resnext50", 32, 2048),
    ],
)
def test_graders_build_at_their_minimum_size(name, size, features):
    assert baselines.GRADERS[name].min_size == size
    model = baselines.build_grader(name, input_shape=(size, size, 3), num_grades=5)
    assert model.name == name
    assert sorted(model.output_names) == [keys.GRADE_LOGITS, keys.GRADE_PROBS]
    assert model.input.name == keys.IMAGE
    # The grading head pools the architecture's last feature map (its classifier is dropped).
    assert model.get_layer("grade_pool").input_shape[-1] == features
    assert not [layer.name for layer in model.layers if "predictions" in layer.name]
    assert isinstance(model.get_layer("grade_pool"), keras.layers.GlobalAveragePooling2D)
    probs = model(tf.random.uniform((1, size, size, 3)))[keys.GRADE_PROBS]
    assert probs.shape == (1, 5)
    np.testing.assert_allclose(tf.reduce_sum(probs, -1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match=f"at least {size}"):
        baselines.build_grader(name, input_shape=(size - 1, size - 1, 3))


class _Recorder:
    """Stands in for an architecture constructor: records its arguments, builds a tiny base."""

    def __init__(self, offline=False):
        self.calls = []
        self.offline = offline

    def __call__(self, input_tensor=None, include_top=True, weights=None, **kwargs):
        self.calls.append(dict(include_top=include_top, weights=weights, **kwargs))
        if self.offline and weights == "imagenet":
            raise Exception("URL fetch failure on https://...: None -- [Errno -3] no network")
        x = keras.layers.Conv2D(3, 3, strides=2, name="base_conv")(input_tensor)
        return keras.Model(input_tensor, x)


def test_large_graders_are_wired_to_their_architectures(monkeypatch):
    from classification_models.tfkeras import Classifiers

    nasnet_large = _Recorder()
    monkeypatch.setattr(keras.applications, "NASNetLarge", nasnet_large)
    resnext101 = _Recorder()
    real_get = Classifiers.get
    monkeypatch.setattr(
        Classifiers,
        "get",
        lambda name: (resnext101, None) if name == "resnext101" else real_get(name),
    )
    for name, recorder, paper_name in [
        ("nasnet_large", nasnet_large, "NASNet (Large)"),
        ("resnext101", resnext101, "ResNeXt-101"),
    ]:
        spec = baselines.GRADERS[name]
        assert spec.paper_name == paper_name and spec.min_size == 32
        model = baselines.build_grader(name, input_shape=(32, 32, 3), num_grades=4, pooling="max")
        assert recorder.calls == [dict(include_top=False, weights=None)]
        assert _inbound(model, "grade_pool") == ["base_conv"]
        assert model.output_shape[keys.GRADE_PROBS] == (None, 4)


def test_grader_errors_and_offline_imagenet(monkeypatch):
    with pytest.raises(ValueError, match="unknown grader 'vgg19'"):
        baselines.build_grader("vgg19", input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match=r"at least 75"):
        baselines.build_grader("inception_resnet_v2", input_shape=(64, 64, 3))
    offline = _Recorder(offline=True)
    monkeypatch.setattr(keras.applications, "DenseNet201", offline)
    with pytest.raises(blocks.PretrainedWeightsUnavailable) as err:
        baselines.build_grader("densenet201", input_shape=(64, 64, 3), encoder_weights="imagenet")
    assert "DenseNet-201" in str(err.value) and "model.encoder_weights=none" in str(err.value)
    assert offline.calls == [dict(include_top=False, weights="imagenet")]
    # Errors that are not downloads pass through unchanged.
    monkeypatch.setattr(
        keras.applications, "DenseNet201", lambda **kw: (_ for _ in ()).throw(KeyError("x"))
    )
    with pytest.raises(KeyError):
        baselines.build_grader("densenet201", input_shape=(64, 64, 3))
