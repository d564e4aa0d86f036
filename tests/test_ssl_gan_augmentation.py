"""Augmentation of the SSL-GAN experiment's supervised networks (Lecouat et al. 2018): the
ConvNet gets Supplement A's random cropping and flipping (as the SSL-GAN's patch stream), the
ResNets Table 5's rotations, flips and shifts."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from experiments.ssl_gan import SUPERVISED_AUGMENTATION, supervised_augmentation

SIZE = 16


def _windows(patch, pad):
    """Every flip of every ``SIZE`` window of the reflect-padded ``patch``."""
    padded = np.pad(patch, [(pad, pad), (pad, pad), (0, 0)], mode="reflect")
    out = []
    for y in range(2 * pad + 1):
        for x in range(2 * pad + 1):
            w = padded[y : y + SIZE, x : x + SIZE]
            out += [w, w[::-1], w[:, ::-1], w[::-1, ::-1]]
    return out


def test_recipes_per_network():
    assert SUPERVISED_AUGMENTATION == {
        "ConvNet": "crop_flip",
        "ResNet34": "table5",
        "ResNet50": "table5",
    }
    table5 = supervised_augmentation("table5", 32)
    kinds = {type(layer) for layer in table5.layers}
    assert kinds == {
        keras.layers.RandomRotation,
        keras.layers.RandomFlip,
        keras.layers.RandomTranslation,
    }
    rotate = table5.get_layer("aug_rotate")
    assert rotate.lower == -0.5 and rotate.upper == 0.5  # +-180 degrees
    assert table5.get_layer("aug_shift").height_factor == 0.3
    crop_flip = supervised_augmentation("crop_flip", 32)
    assert not any(isinstance(layer, keras.layers.RandomRotation) for layer in crop_flip.layers)
    with pytest.raises(ValueError, match="table5"):
        supervised_augmentation("rotate", 32)


def test_crop_flip_is_a_flipped_window_of_the_reflect_padded_patch():
    patch = np.arange(SIZE * SIZE * 3, dtype=np.float32).reshape(SIZE, SIZE, 3)
    batch = np.stack([patch] * 16)
    aug = supervised_augmentation("crop_flip", SIZE)
    np.testing.assert_array_equal(aug(batch, training=False).numpy(), batch)  # inference
    out = aug(batch, training=True).numpy()
    candidates = _windows(patch, SIZE // 8)
    distinct = set()
    for sample in out:
        # no resampling: every output is exactly one flipped window (no rotation, no blend)
        matches = [i for i, c in enumerate(candidates) if np.array_equal(sample, c)]
        assert matches, "not a flipped crop of the padded patch"
        distinct.add(matches[0])
    assert len(distinct) > 4  # random crops and flips, not one fixed transform
    assert not np.array_equal(out, batch)


@pytest.fixture(autouse=True)
def _eager_random():
    tf.keras.utils.set_random_seed(1)
