"""Fundus preprocessing, paired augmentation and patch grids: exact values, eager == tf.data."""

import cv2
import numpy as np
import pytest
import tensorflow as tf

from drkeras.data import augment as aug
from drkeras.data import patches, preprocess, synthetic


def _in_dataset(fn, *args):
    """Run ``fn(*args)`` inside ``tf.data.Dataset.map`` (graph mode) and return numpy."""
    ds = tf.data.Dataset.from_tensors(tuple(tf.convert_to_tensor(a) for a in args))
    return tf.nest.map_structure(lambda t: t.numpy(), next(iter(ds.map(fn))))


def _disc(h=64, w=80, centre=(40, 30), radius=20, colour=(200, 90, 30)):
    return cv2.circle(np.zeros((h, w, 3), np.uint8), centre, radius, colour, -1)


# --------------------------------------------------------------------------------------------
# preprocess


def _reference_box(image):
    """The documented rule in NumPy: rows/columns with >= max(3, 0.5 %) pixels above
    max(25, 0.1 * brightest max(R, G))."""
    intensity = np.maximum(image[..., 0], image[..., 1]).astype(np.float32)
    inside = intensity > max(25.0, 0.1 * intensity.max())
    h, w = inside.shape
    rows = np.flatnonzero(inside.sum(axis=1) >= max(3, 0.005 * w))
    cols = np.flatnonzero(inside.sum(axis=0) >= max(3, 0.005 * h))
    return [rows[0], cols[0], rows[-1] + 1, cols[-1] + 1]


def test_fov_box_of_a_drawn_disc_in_eager_and_tf_data():
    image = _disc()
    box = preprocess.fov_box(image).numpy().tolist()
    assert box == _reference_box(image) == [11, 21, 50, 60]
    # analytic extent of the radius-20 disc at (x=40, y=30), ends exclusive, within a pixel
    np.testing.assert_allclose(box, [10, 20, 51, 61], atol=1)
    assert _in_dataset(preprocess.fov_box, image).tolist() == box
    # stray bright pixels (text, dust) in the black surround do not stretch the box
    noisy = image.copy()
    noisy[1, 2:4] = 255
    noisy[60, 75] = 255
    assert preprocess.fov_box(noisy).numpy().tolist() == box
    rect = np.zeros((60, 90, 3), np.uint8)
    rect[10:50, 25:65] = 120
    assert preprocess.fov_box(rect).numpy().tolist() == [10, 25, 50, 65]
    f = synthetic.generate(2, size=80, grade=2, camera="dim")
    assert preprocess.fov_box(f.image).numpy().tolist() == _reference_box(f.image)


def test_fov_box_falls_back_to_the_whole_blank_image_and_handles_clipped_fovs():
    blank = np.full((30, 50, 3), 12, np.uint8)
    assert preprocess.fov_box(blank).numpy().tolist() == [0, 0, 30, 50]
    f = synthetic.generate(4, size=96, grade=0, camera="kowa")  # FOV cut at top and bottom
    y0, x0, y1, x1 = preprocess.fov_box(f.image).numpy().tolist()
    assert (y0, y1) == (0, 96)
    width = f.image.shape[1]
    fov_width = x1 - x0
    assert abs(fov_width - 2 * synthetic.CAMERAS["kowa"].fov_radius * 96) <= 4
    assert abs((x0 + x1) / 2 - width / 2) <= 0.03 * 96 + 2


def test_crop_and_resize_keeps_aspect_centres_and_keeps_mask_dtype():
    ones = np.ones((10, 20, 1), np.uint8)
    out = preprocess.crop_and_resize(ones, [0, 0, 10, 20], 8, method="nearest")
    assert out.dtype == tf.uint8
    assert out[..., 0].numpy().sum(axis=1).tolist() == [0, 0, 8, 8, 8, 8, 0, 0]
    image = np.full((10, 20, 3), 100, np.uint8)
    smooth = preprocess.crop_and_resize(image, [0, 0, 10, 20], 8)
    assert smooth.dtype == tf.float32
    np.testing.assert_allclose(smooth.numpy()[2:6], 100.0, atol=1e-4)
    np.testing.assert_allclose(smooth.numpy()[[0, 1, 6, 7]], 0.0)
    # enlarging works too, and a box crops before resizing
    crop = preprocess.crop_and_resize(image, [0, 5, 10, 15], 20)
    np.testing.assert_allclose(crop.numpy(), 100.0, atol=1e-3)
    graph = _in_dataset(lambda x: preprocess.crop_and_resize(x, [0, 0, 10, 20], 8), image)
    np.testing.assert_allclose(graph, smooth.numpy(), atol=1e-5)


def test_shrinking_averages_instead_of_skipping_small_lesions():
    image = np.zeros((400, 400, 3), np.uint8)
    image[201:203, 101:103] = 255  # a 2x2 bright dot, 1/40 of an output pixel after shrinking
    out = preprocess.crop_and_resize(image, [0, 0, 400, 400], 40).numpy()
    assert out.max() == pytest.approx(255 * 4 / 100, rel=1e-4)
    assert out.sum() == pytest.approx(255 * 4 * 3 / 100, rel=1e-4)


@pytest.mark.parametrize("sigma", [0.8, 2.5, 6.0])
def test_gaussian_blur_matches_opencv(sigma):
    image = np.random.default_rng(0).uniform(0, 255, (40, 36, 3)).astype(np.float32)
    ours = preprocess.gaussian_blur(image, sigma).numpy()
    np.testing.assert_allclose(ours, cv2.GaussianBlur(image, (0, 0), sigma), atol=2e-3)


def test_graham_matches_the_reference_formula_and_constant_images_give_128():
    image = np.random.default_rng(1).uniform(0, 255, (48, 48, 3)).astype(np.float32)
    sigma = 24 / 30
    ref = 4 * image - 4 * cv2.GaussianBlur(image, (0, 0), sigma) + 128
    ref = np.clip(ref, 0, 255)
    circle = np.zeros((48, 48), np.float32)
    yy, xx = np.mgrid[:48, :48]
    circle[np.hypot(yy - 23.5, xx - 23.5) <= 0.9 * 24] = 1
    ref = ref * circle[..., None] + 128 * (1 - circle[..., None])
    np.testing.assert_allclose(preprocess.graham(image).numpy(), ref, atol=1e-2)
    np.testing.assert_allclose(_in_dataset(preprocess.graham, image), ref, atol=1e-2)
    constant = preprocess.graham(np.full((32, 32, 3), 77, np.uint8)).numpy()
    np.testing.assert_allclose(constant, 128.0, atol=1e-3)
    batch = preprocess.graham(np.stack([image, image])).numpy()
    np.testing.assert_allclose(batch[1], ref, atol=1e-2)


def test_normalize_constants_and_keras_cross_checks():
    pixel = np.array([[[10.0, 20.0, 30.0]]], np.float32)
    cases = {
        "unit": [10 / 255, 20 / 255, 30 / 255],
        "imagenet_caffe": [30 - 103.939, 20 - 116.779, 10 - 123.68],
        "imagenet_torch": [
            (10 / 255 - 0.485) / 0.229,
            (20 / 255 - 0.456) / 0.224,
            (30 / 255 - 0.406) / 0.225,
        ],
        "max": [1 / 3, 2 / 3, 1.0],
        "symmetric": [10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1],
        "standardize": np.array([-10.0, 0.0, 10.0]) / np.sqrt(200 / 3),  # population std
    }
    for mode, expected in cases.items():
        got = preprocess.normalize(pixel, mode).numpy().ravel()
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=mode)
        graph = _in_dataset(lambda x, m=mode: preprocess.normalize(x, m), pixel).ravel()
        np.testing.assert_allclose(graph, got, rtol=1e-6, err_msg=mode)
    batch = np.random.default_rng(2).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(
        preprocess.normalize(batch, "imagenet_caffe").numpy(),
        tf.keras.applications.vgg16.preprocess_input(batch.copy()),
        atol=1e-4,
    )
    np.testing.assert_allclose(
        preprocess.normalize(batch, "imagenet_torch").numpy(),
        tf.keras.applications.imagenet_utils.preprocess_input(batch.copy(), mode="torch"),
        atol=1e-5,
    )
    per_image = preprocess.normalize(batch, "max").numpy()
    assert per_image[0].max() == pytest.approx(1.0) and per_image[1].max() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="normalization must be one of"):
        preprocess.normalize(pixel, "zscore")


def test_denormalize_inverts_normalize():
    image = np.random.default_rng(3).uniform(0, 255, (5, 5, 3)).astype(np.float32)
    for mode in ("unit", "imagenet_caffe", "imagenet_torch", "symmetric"):
        back = preprocess.denormalize(preprocess.normalize(image, mode), mode).numpy()
        np.testing.assert_allclose(back, image, atol=1e-3, err_msg=mode)
    stretched = preprocess.denormalize(preprocess.normalize(image, "max"), "max").numpy()
    assert stretched.min() == pytest.approx(0.0) and stretched.max() == pytest.approx(255.0)


def test_prepare_image_batch_and_masks_agree_eager_and_in_tf_data():
    f = synthetic.generate(8, size=72, grade=3, camera="topcon")
    kwargs = dict(size=32, fov_crop=True, graham=True, normalization="symmetric")
    eager = preprocess.prepare_image(f.image, **kwargs).numpy()
    assert eager.shape == (32, 32, 3) and eager.dtype == np.float32
    assert -1.0 <= eager.min() and eager.max() <= 1.0
    graph = _in_dataset(lambda x: preprocess.prepare_image(x, **kwargs), f.image)
    np.testing.assert_allclose(graph, eager, atol=1e-4)
    batch = preprocess.prepare_batch(np.stack([f.image, f.image[:, ::-1]]), **kwargs).numpy()
    np.testing.assert_allclose(batch[0], eager, atol=1e-4)
    serving = tf.function(lambda x: preprocess.prepare_batch(x, **kwargs))(f.image[None])
    np.testing.assert_allclose(serving.numpy()[0], eager, atol=1e-4)

    box = preprocess.fov_box(f.image)
    masks = preprocess.prepare_example_masks(f.masks, box, 32).numpy()
    assert masks.shape == (32, 32, 5) and masks.dtype == np.uint8
    np.testing.assert_array_equal(
        _in_dataset(lambda m, b: preprocess.prepare_example_masks(m, b, 32), f.masks, box), masks
    )
    # the disc mask lands on the bright disc of the prepared image
    plain = preprocess.prepare_image(f.image, size=32).numpy().mean(axis=-1)
    assert plain[masks[..., 4] > 0].mean() > plain[plain > 0.1].mean()
    with pytest.raises(ValueError, match="normalization must be one of"):
        preprocess.prepare_image(f.image, size=32, normalization="bogus")


# --------------------------------------------------------------------------------------------
# augment


def _square_example(size=48, top=8, left=12, side=12):
    image = np.full((size, size, 3), 40.0, np.float32)
    image[top : top + side, left : left + side] = 250.0
    masks = np.zeros((size, size, 5), np.uint8)
    masks[top : top + side, left : left + side, 2] = 1
    return image, masks


def test_mask_stays_aligned_with_its_image_after_augmentation():
    image, masks = _square_example()
    params = aug.AugmentParams(rotation_deg=20, zoom=0.15, shift=0.1, shear_deg=8)
    moved = 0
    for s in range(12):
        out, out_masks = aug.augment(image, masks, seed=[s, 7], params=params)
        out, out_masks = out.numpy(), out_masks.numpy()
        assert out_masks.dtype == np.uint8 and set(np.unique(out_masks)) <= {0, 1}
        bright = out.mean(axis=-1) > 150
        mask = out_masks[..., 2] > 0
        iou = (bright & mask).sum() / max((bright | mask).sum(), 1)
        assert iou > 0.75, (s, iou)
        moved += not np.array_equal(mask, masks[..., 2] > 0)
    assert moved >= 10  # the draws really move the square


def test_augmentation_is_reproducible_per_seed_and_same_in_tf_data():
    image, masks = _square_example()
    a = aug.augment(image, masks, seed=[3, 4])
    b = aug.augment(image, masks, seed=[3, 4])
    c = aug.augment(image, masks, seed=[3, 5])
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    np.testing.assert_array_equal(a[1].numpy(), b[1].numpy())
    assert not np.array_equal(a[0].numpy(), c[0].numpy())
    graph = _in_dataset(
        lambda x, m, s: aug.augment(x, m, seed=s), image, masks, np.array([3, 4], np.int64)
    )
    np.testing.assert_allclose(graph[0], a[0].numpy(), atol=1e-3)
    np.testing.assert_array_equal(graph[1], a[1].numpy())


def test_no_augment_is_identity_and_quarter_turns_are_exact():
    image, masks = _square_example()
    out, out_masks = aug.augment(image, masks, seed=[0, 1], params=aug.NO_AUGMENT)
    np.testing.assert_allclose(out.numpy(), image, atol=1e-3)
    np.testing.assert_array_equal(out_masks.numpy(), masks)
    turns = aug.AugmentParams(
        flip_horizontal=False,
        flip_vertical=False,
        rotation_deg=0,
        zoom=0,
        shift=0,
        shear_deg=0,
        brightness=0,
        contrast=0,
        saturation=0,
        hue=0,
    )
    seen = set()
    for s in range(16):
        _, rotated = aug.augment(image, masks, seed=[s, 0], params=turns)
        rotated = rotated.numpy()[..., 2]
        matches = [k for k in range(4) if np.array_equal(rotated, np.rot90(masks[..., 2], k))]
        assert len(matches) == 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


def test_colour_jitter_keeps_grey_grey_and_stays_in_range():
    grey = np.full((6, 6, 3), 120.0, np.float32)
    colour = aug.AugmentParams(brightness=0, contrast=0, saturation=0.5, hue=0.3)
    for s in range(5):
        np.testing.assert_allclose(aug.color_jitter(grey, [s, 0], colour).numpy(), 120, atol=1e-3)
    red = np.zeros((6, 6, 3), np.float32)
    red[..., 0] = 255
    shifted = aug.color_jitter(red, [1, 2], aug.DEFAULT_AUGMENT).numpy()
    assert shifted.min() >= 0 and shifted.max() <= 255
    bright = aug.AugmentParams(brightness=0.5, contrast=0, saturation=0, hue=0)
    scaled = aug.color_jitter(grey, [4, 4], bright).numpy()
    factor = scaled[0, 0, 0] / 120.0
    assert 0.5 <= factor <= 1.5 and np.allclose(scaled, scaled[0, 0, 0])
    with pytest.raises(ValueError, match="must be >= 0"):
        aug.AugmentParams(zoom=-0.1)


def test_random_and_center_crop_take_the_same_window_from_image_and_masks():
    image, masks = _square_example(size=32)
    for s in range(4):
        crop, crop_masks = aug.random_crop(image, masks, 20, seed=[s, 9])
        assert crop.shape == (20, 20, 3) and crop_masks.shape == (20, 20, 5)
        bright = crop.numpy().mean(axis=-1) > 150
        np.testing.assert_array_equal(bright, crop_masks.numpy()[..., 2] > 0)
    centre, _ = aug.center_crop(np.arange(16.0).reshape(4, 4, 1), None, 2)
    assert centre[..., 0].numpy().tolist() == [[5.0, 6.0], [9.0, 10.0]]


# --------------------------------------------------------------------------------------------
# patches


def test_patches_are_row_major_and_downsampled_by_area():
    x = np.zeros((16, 16, 1), np.float32)
    x[8:, :8] = 1.0
    x[0, 8:10] = 4.0  # two pixels of the top-right patch
    out = patches.image_patches(x, grid=2, patch_size=4).numpy()
    assert out.shape == (4, 4, 4, 1)
    assert out[:, 1, 1, 0].tolist() == [0.0, 0.0, 1.0, 0.0]
    assert out[1, 0, 0, 0] == pytest.approx(8.0 / 4)  # area average of a 2x2 block
    np.testing.assert_array_equal(
        patches.patch_grid(np.arange(4), grid=2).numpy(), [[0, 1], [2, 3]]
    )
    with pytest.raises(ValueError, match="divisible by grid"):
        patches.image_patches(np.zeros((10, 10, 1)), grid=4)


def test_patch_labels_match_a_numpy_reference_and_ignore_the_optic_disc():
    rng = np.random.default_rng(5)
    masks = (rng.random((64, 64, 5)) > 0.995).astype(np.uint8)
    masks[..., 4] = 1  # the optic disc everywhere must not make patches diseased
    union = masks[..., :4].max(axis=-1)
    expected = union.reshape(8, 8, 8, 8).transpose(0, 2, 1, 3).reshape(64, -1).max(axis=1)
    image = np.full((64, 64, 3), 90, np.uint8)
    got_patches, got = patches.patch_example(
        image, masks, image_size=64, grid=8, patch_size=4, fov_crop=False
    )
    np.testing.assert_array_equal(got.numpy(), expected)
    np.testing.assert_allclose(got_patches.numpy(), 1.0)  # normalised by the image maximum
    graph = _in_dataset(
        lambda x, m: patches.patch_example(
            x, m, image_size=64, grid=8, patch_size=4, fov_crop=False
        )[1],
        image,
        masks,
    )
    np.testing.assert_array_equal(graph, expected)


def test_a_one_pixel_lesion_in_a_large_image_still_marks_its_patch():
    masks = np.zeros((1000, 1000, 5), np.uint8)
    masks[730, 160, 0] = 1  # one microaneurysm pixel
    image = np.full((1000, 1000, 3), 90, np.uint8)
    _, labels = patches.patch_example(image, masks, image_size=512, fov_crop=False)
    row, col = int(730 * 512 / 1000) // 64, int(160 * 512 / 1000) // 64
    assert np.flatnonzero(labels.numpy()).tolist() == [row * 8 + col]
    _, unknown = patches.patch_example(image, None, image_size=64, grid=8)
    assert set(unknown.numpy().tolist()) == {-1}
