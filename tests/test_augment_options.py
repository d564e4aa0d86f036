"""Augmentation options added for issue 16 item 6: Keras ImageDataGenerator's channel shift,
per-axis zoom and nearest fill (MTUnet), and random cropping (PLDMLT)."""

import dataclasses

import numpy as np
import pytest
from keras.src.preprocessing.image import apply_channel_shift

from drkeras.data import augment as aug


def _image(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return rng.uniform(40, 200, size=(size, size, 3)).astype(np.float32)


def test_shared_channel_shift_is_keras_apply_channel_shift():
    params = dataclasses.replace(aug.NO_AUGMENT, channel_shift=50.0, channel_shift_shared=True)
    image = _image()
    for seed in range(5):
        out, _ = aug.augment(image, None, seed=[seed, 1], params=params)
        out = out.numpy()
        offsets = (out - image)[(out > image.min()) & (out < image.max())]
        intensity = float(np.median(offsets))
        assert 0 < abs(intensity) <= 50.0
        np.testing.assert_allclose(out, apply_channel_shift(image, intensity, 2), atol=1e-3)
        # the pure-TF colour path agrees
        colour_seed = aug._seeds([seed, 1])[aug._COLOUR]  # augment's colour sub-seed
        tf_out = aug.color_jitter(image, colour_seed, params)
        np.testing.assert_allclose(tf_out.numpy(), out, atol=1e-3)


def test_default_channel_shift_still_draws_one_offset_per_channel():
    params = dataclasses.replace(aug.NO_AUGMENT, channel_shift=50.0)
    image = np.full((8, 8, 3), 100.0, np.float32)
    out, _ = aug.augment(image, None, seed=[3, 1], params=params)
    offsets = out.numpy()[0, 0] - 100.0
    assert len(set(np.round(offsets, 3))) == 3  # a colour cast: three different offsets


def test_zoom_per_axis_draws_x_and_y_apart():
    iso = dataclasses.replace(aug.NO_AUGMENT, zoom=0.3)
    per_axis = dataclasses.replace(iso, zoom_per_axis=True)
    for seed in range(4):
        t = aug.sample_transform([seed, 2], 16, 16, iso).numpy()
        assert t[0] == pytest.approx(t[4]) and t[1] == t[3] == 0
        t = aug.sample_transform([seed, 2], 16, 16, per_axis).numpy()
        assert t[0] != pytest.approx(t[4], abs=1e-4)
        assert 1 / 1.3 <= t[0] <= 1 / 0.7 and 1 / 1.3 <= t[4] <= 1 / 0.7


def test_nearest_fill_repeats_the_edge_for_image_and_masks():
    shift = dataclasses.replace(aug.NO_AUGMENT, shift=0.4, fill="nearest")
    image = _image(size=20)
    masks = np.zeros((20, 20, 2), np.uint8)
    masks[:, :10, 0] = 1  # left half of channel 0
    out, out_masks = aug.augment(image, masks, seed=[1, 1], params=shift)
    out, out_masks = out.numpy(), out_masks.numpy()
    assert out.min() >= image.min() - 1e-3  # no black fill
    constant = dataclasses.replace(shift, fill="constant")
    black, black_masks = aug.augment(image, masks, seed=[1, 1], params=constant)
    assert black.numpy().min() == 0.0  # the same draw with the constant fill shows black
    # the masks follow the image: where the image is filled from the edge, so is the mask
    moved = np.argwhere(black.numpy().sum(-1) == 0)
    assert len(moved) > 0
    for y, x in moved[:10]:
        assert out_masks[y, x, 0] in (0, 1)
    assert out_masks[..., 0].sum() > black_masks.numpy()[..., 0].sum()
    with pytest.raises(ValueError, match="fill must be one of"):
        aug.AugmentParams(fill="reflect")


def test_crop_takes_a_window_inside_the_image_and_resizes_it_back():
    params = dataclasses.replace(aug.NO_AUGMENT, crop=0.4)
    size = 32
    ramp = np.tile(np.arange(size, dtype=np.float32)[None, :, None] * 4 + 20, (size, 1, 3))
    sides = []
    for seed in range(12):
        t = aug.sample_transform([seed, 5], size, size, params).numpy()
        side = t[0]  # output pixel -> input pixel scale: the window side as a fraction
        assert t[4] == pytest.approx(side) and t[1] == t[3] == 0
        assert 0.6 - 1e-6 <= side <= 1.0
        # the corner pixels sample inside the image: no border is ever shown
        for y in (0, size - 1):
            for x in (0, size - 1):
                sx, sy = t[0] * x + t[2], t[4] * y + t[5]
                assert -1e-3 <= sx <= size - 1 + 1e-3
                assert -1e-3 <= sy <= size - 1 + 1e-3
        sides.append(side)
        out, _ = aug.augment(ramp, None, seed=[seed, 5], params=params)
        assert out.shape == ramp.shape and out.numpy().min() >= 20 - 1e-3
    assert min(sides) < 0.8 and max(sides) > 0.8  # the window side varies
    with pytest.raises(ValueError, match="crop must be < 1"):
        aug.AugmentParams(crop=1.0)
