"""The network-to-input-scaling table agrees with each library's own preprocessing."""

import numpy as np
import pytest
from tensorflow import keras

from drkeras.data import preprocess
from drkeras.models import baselines
from drkeras.models.input_scaling import IMAGENET_SCALING, RAW, input_scaling


@pytest.fixture(scope="module")
def image():
    """A random uint8 RGB batch as float (what the pipelines hold before scaling)."""
    rng = np.random.default_rng(7)
    return rng.integers(0, 256, size=(2, 6, 5, 3), dtype=np.uint8).astype(np.float32)


def _ours(image, network):
    mode = input_scaling(network, encoder_weights="imagenet", default="unit")
    return preprocess.normalize(image, mode).numpy()


def _library_preprocessing():
    """``{network: the library's preprocess_input}`` for every library behind our networks."""
    import segmentation_models as sm
    from classification_models.tfkeras import Classifiers

    out = {"vgg16": [keras.applications.vgg16.preprocess_input]}
    for name, spec in baselines.GRADERS.items():
        out.setdefault(name, []).append(spec.preprocess_input)
    for name in ("resnext50", "resnext101"):
        out[name].append(Classifiers.get(name)[1])  # image-classifiers' own function
    for backbone in sm.get_available_backbone_names():
        out.setdefault(backbone, []).append(sm.get_preprocessing(backbone))
    return out


def test_table_matches_each_librarys_preprocess_input(image):
    library = _library_preprocessing()
    for network, functions in library.items():
        assert network in IMAGENET_SCALING, f"{network} has no entry in the table"
        for function in functions:
            expected = np.asarray(function(image.copy()), np.float32)
            np.testing.assert_allclose(
                _ours(image, network), expected, rtol=1e-6, atol=1e-4, err_msg=network
            )
    # the distinctions the issue is about: not one scaling for every network
    assert {
        IMAGENET_SCALING[n] for n in ("vgg16", "resnext101", "nasnet_large", "densenet201")
    } == {
        "imagenet_caffe",
        RAW,
        "symmetric",
        "imagenet_torch",
    }
    # segmentation-models' SE-ResNet-50+ use torch scaling, SE-ResNet-18/34 none
    assert (
        IMAGENET_SCALING["seresnet50"] == "imagenet_torch" and IMAGENET_SCALING["seresnet18"] == RAW
    )


def test_deeplab_resnetv2_backbones_expect_keras_cvs_own_rescaling(image):
    import keras_cv

    assert set(baselines.DEEPLAB_BACKBONES) <= set(IMAGENET_SCALING)
    backbone = keras_cv.models.ResNetV2Backbone(
        stackwise_filters=[8, 8, 8, 8],
        stackwise_blocks=[2, 2, 2, 2],
        stackwise_strides=[1, 2, 2, 2],
        block_type="block",
        include_rescaling=True,
        input_shape=(6, 5, 3),
    )
    rescaling = [layer for layer in backbone.layers if isinstance(layer, keras.layers.Rescaling)]
    assert len(rescaling) == 1  # keras-cv's include_rescaling: the scaling its presets learnt
    for network in baselines.DEEPLAB_BACKBONES:
        np.testing.assert_allclose(
            _ours(image, network), rescaling[0](image).numpy(), rtol=1e-6, err_msg=network
        )


def test_without_weights_every_network_gets_the_default_and_unknown_names_fail():
    assert input_scaling("resnext101", encoder_weights=None, default="max") == "max"
    assert input_scaling("vgg16", encoder_weights="imagenet", default="max") == "imagenet_caffe"
    with pytest.raises(ValueError, match="no ImageNet input scaling known for 'alexnet'"):
        input_scaling("alexnet", encoder_weights=None, default="unit")


def test_raw_mode_is_the_identity_and_round_trips(image):
    np.testing.assert_array_equal(preprocess.normalize(image, RAW).numpy(), image)
    np.testing.assert_array_equal(preprocess.denormalize(image, RAW).numpy(), image)
    photo = np.zeros((20, 20, 3), np.uint8)
    photo[4:16, 4:16] = 200
    out = preprocess.prepare_image(photo, size=8, normalization=RAW)
    assert float(out.numpy().max()) == 200.0
