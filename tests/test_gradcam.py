"""Grad-CAM: exact maps on a hand-built model, batched = one by one, peaks on the evidence."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.explain.gradcam import GradCAM, find_feature_tensor, grad_cam, select_output


def _multitask(size=16, grades=5, seg_classes=3):
    """A tiny dict-output network shaped like the VGG16-UNet (seg + grade outputs)."""
    image = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="enc_conv1")(image)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="enc_conv2")(x)
    pooled = keras.layers.MaxPooling2D(2, name="enc_pool")(x)
    grade = keras.layers.GlobalAveragePooling2D(name="grade_gap")(pooled)
    grade = keras.layers.Dense(grades, activation="softmax", name="grade_dense")(grade)
    up = keras.layers.UpSampling2D(2, name="dec_up")(pooled)
    seg = keras.layers.Conv2D(seg_classes, 1, activation="softmax", name="seg_head")(up)
    return keras.Model(image, {keys.SEG_PROBS: seg, keys.GRADE_PROBS: grade}, name="tiny_mt")


def test_output_and_layer_selection():
    model = _multitask()
    out = select_output(model, keys.GRADE_PROBS)
    assert out.shape[-1] == 5
    name, tensor = find_feature_tensor(model, out)
    # The last 4-D map on the grading path is the pooled encoder output, not the decoder.
    assert name == "enc_pool" and tensor.shape.rank == 4
    with pytest.raises(ValueError, match="pass output=<name>"):
        select_output(model)
    with pytest.raises(ValueError, match="no output 'nope'"):
        select_output(model, "nope")
    with pytest.raises(ValueError, match="4-D feature map"):
        GradCAM(model, output=keys.GRADE_PROBS, layer_name="grade_gap")
    # The decoder does not lead to the grade: it cannot explain it.
    with pytest.raises(ValueError, match="0 tensors on the path"):
        GradCAM(model, output=keys.GRADE_PROBS, layer_name="dec_up")
    assert GradCAM(model, output=keys.GRADE_PROBS, layer_name="enc_conv2").layer_name == "enc_conv2"


def test_exact_map_on_linear_gap_model():
    """features -> GAP -> Dense(softmax): alpha_k = W[k, c] / (h w), so the map is known."""
    image = keras.Input((4, 4, 2), name="image")
    feats = keras.layers.Activation("linear", name="feats")(image)
    gap = keras.layers.GlobalAveragePooling2D(name="gap")(feats)
    probs = keras.layers.Dense(2, activation="softmax", use_bias=False, name="dense")(gap)
    model = keras.Model(image, probs)
    kernel = np.array([[1.0, -1.0], [-2.0, 0.5]], np.float32)
    model.get_layer("dense").set_weights([kernel])
    x = np.random.default_rng(0).uniform(0, 1, (3, 4, 4, 2)).astype(np.float32)
    cam = GradCAM(model)
    assert cam.layer_name == "feats"
    maps = cam.all_classes(x)
    for c in range(2):
        expected = np.maximum(np.einsum("bhwk,k->bhw", x, kernel[:, c] / 16.0), 0.0)
        peak = expected.max(axis=(1, 2), keepdims=True)
        expected = np.where(peak > 0, expected / np.where(peak > 0, peak, 1.0), 0.0)
        np.testing.assert_allclose(maps[:, c], expected, atol=1e-5)


def test_batched_equals_one_by_one_and_all_classes():
    model = _multitask(size=16)
    x = np.random.default_rng(1).uniform(0, 1, (4, 16, 16, 3)).astype(np.float32)
    cam = GradCAM(model, output=keys.GRADE_PROBS)
    classes = np.array([0, 3, 1, 4])
    batched = cam(x, classes)
    assert batched.shape == (4, 16, 16)
    assert batched.min() >= 0.0 and batched.max() <= 1.0
    single = np.stack([cam(x[i : i + 1], int(classes[i]))[0] for i in range(4)])
    np.testing.assert_allclose(batched, single, atol=1e-5)
    chunked = cam(x, classes, batch_size=3)
    np.testing.assert_allclose(batched, chunked, atol=1e-5)
    every = cam.all_classes(x)
    assert every.shape == (4, 5, 16, 16)
    np.testing.assert_allclose(every[np.arange(4), classes], batched, atol=1e-5)
    # Per-image normalisation: each non-empty map reaches exactly 1.
    peaks = every.reshape(4, 5, -1).max(axis=-1)
    assert np.all((np.abs(peaks - 1.0) < 1e-5) | (peaks == 0.0))
    predicted = np.argmax(model(x)[keys.GRADE_PROBS].numpy(), axis=-1)
    np.testing.assert_allclose(cam(x), every[np.arange(4), predicted], atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        cam(x, 7)


def _patch_data(n, size, patch, rng):
    """Noise images with one bright patch whose colour channel decides the class."""
    images = rng.uniform(0.0, 0.3, (n, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    corners = rng.integers(0, size - patch + 1, (n, 2))
    for i, (r, c) in enumerate(corners):
        images[i, r : r + patch, c : c + patch, labels[i]] = 1.0
    return images, labels, corners


def test_cam_peaks_on_the_discriminative_patch():
    rng = np.random.default_rng(0)
    size, patch = 24, 5
    x, y, _ = _patch_data(192, size, patch, rng)
    image = keras.Input((size, size, 3), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(image)
    h = keras.layers.Conv2D(12, 3, padding="same", activation="relu", name="conv2")(h)
    g = keras.layers.GlobalMaxPooling2D(name="gmp")(h)
    out = keras.layers.Dense(3, activation="softmax", name="probs")(g)
    model = keras.Model(image, out)
    model.compile(keras.optimizers.Adam(0.02), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=32, epochs=6, verbose=0)
    xt, yt, corners = _patch_data(40, size, patch, rng)
    accuracy = np.mean(np.argmax(model.predict(xt, verbose=0), -1) == yt)
    assert accuracy > 0.9
    maps = grad_cam(model, xt, yt)
    hits = 0
    for m, (r, c) in zip(maps, corners):
        pr, pc = np.unravel_index(np.argmax(m), m.shape)
        hits += (r <= pr < r + patch) and (c <= pc < c + patch)
    # A map unrelated to the patch would hit it for ~25/576 of the images.
    assert hits / len(maps) >= 0.9


def test_uint8_single_output_grader_and_frozen_weights():
    image = keras.Input((16, 16, 3), name="image")
    h = keras.layers.Rescaling(1 / 255.0, name="scale")(image)
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(h)
    g = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    logits = keras.layers.Dense(5, name="logits")(g)
    probs = keras.layers.Softmax(name="probs")(logits)
    model = keras.Model(image, probs)
    model.trainable = False
    x = np.random.default_rng(2).integers(0, 255, (2, 16, 16, 3)).astype(np.float32)
    maps = GradCAM(model).all_classes(x)
    assert maps.shape == (2, 5, 16, 16)
    assert np.isfinite(maps).all() and maps.max() > 0.0
    # The softmax layer is skipped: explaining its logits equals explaining the logits model.
    logit_model = keras.Model(image, logits)
    np.testing.assert_allclose(
        maps, GradCAM(logit_model, layer_name="conv").all_classes(x), atol=1e-5
    )
    assert tf.reduce_all(tf.math.is_finite(maps))


def test_vgg16_unet_grade_output():
    from drkeras.models.mtunet import build_vgg16_unet

    model = build_vgg16_unet(
        input_shape=(64, 64, 3), num_seg_classes=5, width=1 / 16, grade_pooling="avg"
    )
    cam = GradCAM(model, output=keys.GRADE_PROBS)
    # The grading head pools block5_pool, so that is the map Grad-CAM explains.
    assert cam.layer_name == "block5_pool"
    x = np.random.default_rng(3).uniform(0, 1, (3, 64, 64, 3)).astype(np.float32)
    every = cam.all_classes(x)
    assert every.shape == (3, 5, 64, 64) and np.isfinite(every).all()
    # block5_pool is 2x2 at 64 px: the upsampled maps are not constant.
    assert every.std(axis=(2, 3)).max() > 0.05
    single = np.stack([cam.all_classes(x[i : i + 1])[0] for i in range(3)])
    np.testing.assert_allclose(every, single, atol=1e-5)
    # Pre-softmax scores: identical to explaining the grade_logits output directly.
    logits_cam = GradCAM(model, output=keys.GRADE_LOGITS, layer_name="block5_pool")
    np.testing.assert_allclose(every, logits_cam.all_classes(x), atol=1e-5)


def test_nested_backbone_is_explained_at_its_output():
    inner_in = keras.Input((16, 16, 3), name="backbone_input")
    h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="bb_conv")(inner_in)
    backbone = keras.Model(inner_in, h, name="backbone")
    image = keras.Input((16, 16, 3), name="image")
    g = keras.layers.GlobalAveragePooling2D(name="gap")(backbone(image))
    grader = keras.Model(image, keras.layers.Dense(5, activation="softmax", name="probs")(g))
    flat_in = keras.Input((16, 16, 3), name="image")
    flat_h = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(flat_in)
    flat_g = keras.layers.GlobalAveragePooling2D(name="gap")(flat_h)
    flat = keras.Model(flat_in, keras.layers.Dense(5, activation="softmax", name="probs")(flat_g))
    flat.set_weights(grader.get_weights())
    cam = GradCAM(grader)
    assert cam.layer_name == "backbone"
    by_name = GradCAM(grader, layer_name="backbone")
    x = np.random.default_rng(4).uniform(0, 1, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(cam.all_classes(list(x)), GradCAM(flat).all_classes(x), atol=1e-5)
    np.testing.assert_allclose(by_name.all_classes(x), cam.all_classes(x), atol=1e-6)
    with pytest.raises(ValueError, match="batch, height"):
        cam(x[0])
