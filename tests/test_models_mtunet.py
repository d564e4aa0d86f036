"""MTUnet (Foo et al. 2020) networks: structure of variants A/B/C, pixel classes, loss weighting."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.models import blocks, mtunet

W = 0.125  # 8..64 filters instead of 64..512
SIZE = 32


def _inbound(model, layer_name):
    node = model.get_layer(layer_name)._inbound_nodes[0]
    return [layer.name for layer in tf.nest.flatten(node.inbound_layers)]


def _batch(n=2, size=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 1, (n, size, size, 3)).astype("float32")
    grades = np.array([0, 2, 4, 1] * n)[:n]  # lesions only in the images with DR
    masks = np.zeros((n, size, size, 5), np.uint8)
    masks[grades > 0, 4:12, 4:12, 1] = 1  # HE
    masks[grades > 1, 16:24, 16:28, 2] = 1  # EX
    masks[:, 20:30, 2:10, 4] = 1  # OD
    images[..., 0] += masks[..., 1] * 0.5
    images[..., 1] += masks[..., 2] * 0.5
    images[..., 2] += masks[..., 4] * 0.5
    seg = mtunet.masks_to_classes(masks).numpy()
    return images, {keys.SEG_PROBS: seg, keys.GRADE_PROBS: grades}


# --- structure ---------------------------------------------------------------------------------


def test_variant_c_outputs_skips_and_heads():
    model = mtunet.build_mtunet(input_shape=(64, 64, 3), variant="C", width=W)
    out = model(tf.random.uniform((2, 64, 64, 3)))
    assert sorted(out) == sorted(
        [keys.LESION_LOGITS, keys.SEG_PROBS, keys.GRADE_LOGITS, keys.GRADE_PROBS]
    )
    assert sorted(model.output_names) == sorted(out)
    assert out[keys.SEG_PROBS].shape == (2, 64, 64, 4)
    assert out[keys.GRADE_PROBS].shape == (2, 5)
    np.testing.assert_allclose(tf.reduce_sum(out[keys.SEG_PROBS], -1), 1.0, atol=1e-5)
    np.testing.assert_allclose(tf.reduce_sum(out[keys.GRADE_PROBS], -1), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        out[keys.SEG_PROBS], tf.nn.softmax(out[keys.LESION_LOGITS]), atol=1e-6
    )

    # Skips: before every max-pool, into the decoder stage of the same resolution.
    for block, skip in enumerate(blocks.VGG16_SKIP_LAYERS, start=1):
        assert _inbound(model, f"block{block}_pool") == [skip]
        assert _inbound(model, f"decoder_stage{block}_concat") == [
            f"decoder_stage{block}_upconv",
            skip,
        ]
        side = 64 // 2 ** (block - 1)
        assert model.get_layer(f"decoder_stage{block}_concat").output.shape[1:3] == (side, side)
    # Decoder mirrors VGG16: conv counts 2,2,3,3,3 and filters 64..512 (times width).
    for block, (filters, convs) in enumerate(blocks.VGG16_BLOCKS, start=1):
        names = [f"decoder_stage{block}_conv{j}" for j in range(1, convs + 1)]
        for name in names:
            layer = model.get_layer(name)
            assert layer.filters == int(filters * W)
            assert isinstance(layer.kernel_initializer, keras.initializers.HeNormal)
        with pytest.raises(ValueError):
            model.get_layer(f"decoder_stage{block}_conv{convs + 1}")
        upconv = model.get_layer(f"decoder_stage{block}_upconv")
        assert isinstance(upconv, keras.layers.Conv2DTranspose) and upconv.strides == (2, 2)
        assert isinstance(upconv.kernel_initializer, keras.initializers.HeNormal)
    # Grading head on the end of the 5th block, global max pooling, dense softmax.
    assert _inbound(model, "grade_pool") == ["block5_pool"]
    assert isinstance(model.get_layer("grade_pool"), keras.layers.GlobalMaxPooling2D)
    assert _inbound(model, keys.GRADE_LOGITS) == ["grade_pool"]
    assert _inbound(model, keys.LESION_LOGITS) == ["decoder_stage1_conv2"]
    # The paper blames batch norm for poor lesion features: none in this network.
    assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)


def test_encoder_matches_keras_applications_vgg16_names_and_shapes():
    ours = mtunet.build_vgg16_unet(input_shape=(SIZE, SIZE, 3), num_seg_classes=4)
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    convs = [layer for layer in vgg.layers if layer.weights]
    assert len(convs) == 13
    for layer in convs:
        assert [w.shape for w in ours.get_layer(layer.name).weights] == [
            w.shape for w in layer.weights
        ]


def test_random_encoder_keeps_the_signal_through_its_thirteen_relu_layers():
    # From random weights (mini preset, offline runs) the encoder is He-normal: Keras's default
    # Glorot initialisation halves the activations' spread at every ReLU convolution (measured at
    # quarter width, 128 px: std 0.13 after block 2 down to 0.003 after block 5), which left
    # MTUnet's segmenter predicting background only.
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64, 64, 3))
    skips, _ = blocks.vgg16_encoder(inputs, width=W)
    probe = keras.Model(inputs, skips)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    stds = [float(tf.math.reduce_std(s)) for s in probe(x)]
    for layer in probe.layers:
        if isinstance(layer, keras.layers.Conv2D):
            assert isinstance(layer.kernel_initializer, keras.initializers.HeNormal), layer.name
    # block 5's spread stays within a factor 4 of block 1's (Glorot: about 1/150 of it)
    assert stds[-1] > stds[0] / 4, stds


def test_pldmlt_configuration_avg_pool_sigmoid_hidden_and_segmentation_only():
    model = mtunet.build_vgg16_unet(
        input_shape=(SIZE, SIZE, 3),
        num_seg_classes=4,
        seg_activation="sigmoid",
        grade_pooling="avg",
        grade_hidden=(16, 8),
        dropout=0.25,
        width=W,
        name="pldmlt",
    )
    assert model.name == "pldmlt"
    assert sorted(model.output_names) == sorted(
        [keys.LESION_LOGITS, keys.LESION_PROBS, keys.GRADE_LOGITS, keys.GRADE_PROBS]
    )
    assert isinstance(model.get_layer("grade_pool"), keras.layers.GlobalAveragePooling2D)
    assert [model.get_layer(f"grade_dense{i}").units for i in (1, 2)] == [16, 8]
    assert _inbound(model, "grade_dropout0") == ["grade_pool"]
    assert _inbound(model, keys.GRADE_LOGITS) == ["grade_dropout2"]
    out = model(tf.random.uniform((1, SIZE, SIZE, 3)))
    np.testing.assert_allclose(
        out[keys.LESION_PROBS], tf.sigmoid(out[keys.LESION_LOGITS]), atol=1e-6
    )

    seg_only = mtunet.build_vgg16_unet(
        input_shape=(None, None, 3), num_seg_classes=3, num_grades=None, width=W
    )
    assert sorted(seg_only.output_names) == [keys.LESION_LOGITS, keys.SEG_PROBS]
    assert seg_only(tf.zeros((1, 64, 96, 3)))[keys.SEG_PROBS].shape == (1, 64, 96, 3)


def test_variant_a_grades_from_the_decoder():
    model = mtunet.build_mtunet(input_shape=(SIZE, SIZE, 3), variant="A", width=W)
    assert model.name == "mtunet_variant_a"
    assert _inbound(model, "grade_pool") == ["decoder_stage1_conv2"]
    assert _inbound(model, keys.LESION_LOGITS) == ["decoder_stage1_conv2"]
    out = model(tf.zeros((1, SIZE, SIZE, 3)))
    assert out[keys.GRADE_PROBS].shape == (1, 5) and out[keys.SEG_PROBS].shape[-1] == 4


def test_variant_b_masks_feed_the_grader():
    model = mtunet.build_mtunet(input_shape=(SIZE, SIZE, 3), variant="B", width=W)
    segmenter, grader = model.get_layer("segmenter"), model.get_layer("grader")
    assert sorted(segmenter.output_names) == [keys.LESION_LOGITS, keys.SEG_PROBS]
    assert grader.input_shape == (None, SIZE, SIZE, 3 + 4)
    assert _inbound(model, "image_and_masks") == [keys.IMAGE, "segmenter"]
    assert _inbound(model, "grader") == ["image_and_masks"]
    images = tf.random.uniform((2, SIZE, SIZE, 3))
    out = model(images)
    seg = segmenter(images)
    np.testing.assert_allclose(out[keys.SEG_PROBS], seg[keys.SEG_PROBS], atol=1e-6)
    expected = grader(tf.concat([images, seg[keys.SEG_PROBS]], -1))[keys.GRADE_PROBS]
    np.testing.assert_allclose(out[keys.GRADE_PROBS], expected, atol=1e-6)

    masks_only = mtunet.build_mtunet_variant_b(
        input_shape=(SIZE, SIZE, 3), num_seg_classes=3, width=W, grader_inputs="masks"
    )
    assert masks_only.get_layer("grader").input_shape == (None, SIZE, SIZE, 3)


# --- errors and weights ------------------------------------------------------------------------


def test_bad_arguments_give_clear_errors():
    with pytest.raises(ValueError, match="divisible by 32"):
        mtunet.build_vgg16_unet(input_shape=(48, 48, 3), num_seg_classes=4, width=W)
    with pytest.raises(ValueError, match=r"model\.width=1\.0 or model\.encoder_weights=none"):
        mtunet.build_vgg16_unet(
            input_shape=(SIZE, SIZE, 3), num_seg_classes=4, width=0.5, encoder_weights="imagenet"
        )
    with pytest.raises(ValueError, match="3 channels"):
        mtunet.build_vgg16_unet(
            input_shape=(SIZE, SIZE, 4), num_seg_classes=4, encoder_weights="imagenet"
        )
    with pytest.raises(ValueError, match="'softmax' or 'sigmoid'"):
        mtunet.build_vgg16_unet(
            input_shape=(SIZE, SIZE, 3), num_seg_classes=4, seg_activation="relu"
        )
    with pytest.raises(ValueError, match="'max' or 'avg'"):
        mtunet.build_vgg16_unet(
            input_shape=(SIZE, SIZE, 3), num_seg_classes=4, grade_pooling="sum", width=W
        )
    with pytest.raises(ValueError, match="variant"):
        mtunet.build_mtunet(input_shape=(SIZE, SIZE, 3), variant="D", width=W)
    with pytest.raises(ValueError, match="red_yellow_od"):
        mtunet.build_mtunet(input_shape=(SIZE, SIZE, 3), class_set="colours", width=W)
    with pytest.raises(ValueError, match="expected None, 'imagenet' or the path"):
        mtunet.build_vgg16_unet(
            input_shape=(SIZE, SIZE, 3), num_seg_classes=4, encoder_weights="/no/such/file.h5"
        )


def test_offline_imagenet_names_the_option(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception(
            "URL fetch failure on https://storage.googleapis.com/...: None -- "
            "[Errno -3] Temporary failure in name resolution"
        )

    monkeypatch.setattr(keras.utils, "get_file", offline)
    with pytest.raises(blocks.PretrainedWeightsUnavailable, match=r"model\.encoder_weights=none"):
        mtunet.build_mtunet(input_shape=(SIZE, SIZE, 3), encoder_weights="imagenet")


def test_vgg16_weights_load_by_layer_name(tmp_path, monkeypatch):
    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(SIZE, SIZE, 3))
    path = tmp_path / "vgg16_notop.h5"
    vgg.save_weights(str(path))
    expected = {layer.name: layer.get_weights() for layer in vgg.layers if layer.weights}
    requested = []

    def cached(fname, origin, **kwargs):
        requested.append((fname, origin, kwargs.get("cache_subdir")))
        return str(path)

    monkeypatch.setattr(keras.utils, "get_file", cached)
    for weights in ("imagenet", str(path)):
        model = mtunet.build_vgg16_unet(
            input_shape=(SIZE, SIZE, 3), num_seg_classes=4, encoder_weights=weights
        )
        for name, arrays in expected.items():
            for got, want in zip(model.get_layer(name).get_weights(), arrays):
                np.testing.assert_array_equal(got, want)
    assert requested == [
        (
            "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            blocks._VGG16_NOTOP_URL,
            "models",
        )
    ]
    # A file without VGG16's layers is refused, naming the file.
    other = keras.Sequential([keras.layers.Dense(2, input_shape=(3,), name="dense")])
    wrong = tmp_path / "other.h5"
    other.save_weights(str(wrong))
    with pytest.raises(ValueError, match=r"other\.h5: expected the VGG16 convolution layers"):
        mtunet.build_vgg16_unet(
            input_shape=(SIZE, SIZE, 3), num_seg_classes=4, encoder_weights=str(wrong)
        )


# --- pixel classes -----------------------------------------------------------------------------


def _pixels(*types):
    """One mask row, one pixel per tuple of lesion types present."""
    row = np.zeros((1, len(types), 5), np.uint8)
    for i, present in enumerate(types):
        for t in present:
            row[0, i, keys.LESIONS.index(t)] = 255
    return row


CASES = [(), ("MA",), ("HE", "EX"), ("EX",), ("SE", "OD"), ("OD",), ("MA", "OD"), keys.LESIONS]


@pytest.mark.parametrize(
    "class_set, expected",
    [
        ("red_yellow_od", [0, 1, 1, 2, 2, 3, 1, 1]),
        ("red_yellow", [0, 1, 1, 2, 2, 0, 1, 1]),
        ("lesions", [0, 1, 2, 3, 4, 0, 1, 1]),
        ("lesions_od", [0, 1, 2, 3, 4, 5, 1, 1]),
    ],
)
def test_masks_to_classes_priority_on_overlaps(class_set, expected):
    onehot = mtunet.masks_to_classes(_pixels(*CASES), class_set).numpy()
    n = len(mtunet.class_names(class_set))
    np.testing.assert_array_equal(onehot, np.eye(n, dtype="float32")[expected][None])


def test_masks_to_classes_batches_tf_data_and_errors():
    masks = np.stack([_pixels(*CASES), _pixels(*reversed(CASES))]) // 255  # {0, 1}, batched
    eager = mtunet.masks_to_classes(masks)
    assert eager.shape == (2, 1, len(CASES), 4) and eager.dtype == tf.float32
    np.testing.assert_array_equal(np.argmax(eager[1, 0], -1), [1, 1, 3, 2, 2, 1, 1, 0])
    ds = tf.data.Dataset.from_tensor_slices(masks).map(mtunet.masks_to_classes)
    np.testing.assert_array_equal(np.stack(list(ds.as_numpy_iterator())), eager.numpy())
    assert mtunet.class_names() == ("background", "red", "yellow", "optic_disc")
    assert mtunet.lesion_class_indices() == (1, 2)
    assert mtunet.lesion_class_indices("lesions_od") == (1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"expected 5 mask channels .*\(1, 2, 4\)"):
        mtunet.masks_to_classes(np.zeros((1, 2, 4)))


def test_classes_annotated():
    present = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 0, 1, 1, 1]], bool)
    np.testing.assert_array_equal(
        mtunet.classes_annotated(present),
        [[1, 1, 1, 1], [0, 1, 1, 0], [0, 0, 1, 1]],
    )
    np.testing.assert_array_equal(
        mtunet.classes_annotated(present[1], "red_yellow"), [True, True, True]
    )


# --- losses and training -----------------------------------------------------------------------


def test_loss_is_bce_plus_alpha_cross_entropy():
    images, targets = _batch()
    model = mtunet.build_mtunet(input_shape=(SIZE, SIZE, 3), width=W)
    mtunet.compile_mtunet(model, alpha=0.5)
    logs = model.evaluate(images, targets, verbose=0, return_dict=True)
    pred = model.predict(images, verbose=0)
    eps = keras.backend.epsilon()
    p = np.clip(pred[keys.SEG_PROBS], eps, 1 - eps)
    y = targets[keys.SEG_PROBS]
    bce = np.mean(-(y * np.log(p) + (1 - y) * np.log(1 - p)))
    g = np.clip(pred[keys.GRADE_PROBS], eps, 1 - eps)
    ce = np.mean(-np.log(g[np.arange(len(g)), targets[keys.GRADE_PROBS]]))
    np.testing.assert_allclose(logs[f"{keys.SEG_PROBS}_loss"], bce, rtol=1e-4)
    np.testing.assert_allclose(logs[f"{keys.GRADE_PROBS}_loss"], ce, rtol=1e-4)
    np.testing.assert_allclose(logs["loss"], bce + 0.5 * ce, rtol=1e-4)


def test_pixel_binary_crossentropy_hand_values():
    loss = mtunet.PixelBinaryCrossentropy()
    np.testing.assert_allclose(loss([[[[0.0, 1.0]]]], [[[[0.2, 0.8]]]]), -np.log(0.8), rtol=1e-6)
    # Mean over classes, then over pixels and batch; saturated probabilities stay finite.
    y = np.array([[[[1, 0, 0]], [[0, 0, 1]]]], "float32")
    p = np.array([[[[0.5, 0.25, 0.25]], [[0.0, 0.0, 1.0]]]], "float32")
    pixel0 = -(np.log(0.5) + 2 * np.log(0.75)) / 3
    pixel1 = -3 * np.log(1 - keras.backend.epsilon()) / 3
    np.testing.assert_allclose(loss(y, p), (pixel0 + pixel1) / 2, rtol=1e-5)


def test_alpha_zero_leaves_the_grading_head_alone_alpha_one_trains_it():
    images, targets = _batch()
    model = mtunet.build_mtunet(input_shape=(SIZE, SIZE, 3), width=W)
    head, encoder = model.get_layer(keys.GRADE_LOGITS), model.get_layer("block1_conv1")

    def step(alpha):
        before = [w.copy() for w in head.get_weights() + encoder.get_weights()]
        # Eager: one step needs no traced train function (saves seconds, same update).
        mtunet.compile_mtunet(model, alpha=alpha, lr=1e-3, run_eagerly=True)
        model.fit(images, targets, batch_size=2, epochs=1, verbose=0)
        after = head.get_weights() + encoder.get_weights()
        return [not np.array_equal(b, a) for b, a in zip(before, after)]

    head_kernel, head_bias, enc_kernel, _ = step(alpha=0.0)
    assert not head_kernel and not head_bias  # no gradient reaches the grading head
    assert enc_kernel  # the segmentation loss still trains the shared encoder
    head_kernel, head_bias, enc_kernel, _ = step(alpha=1.0)
    assert head_kernel and head_bias and enc_kernel


def test_variant_b_two_steps_train_one_sub_network_each():
    images, targets = _batch()
    model = mtunet.build_mtunet(input_shape=(SIZE, SIZE, 3), variant="B", width=W)
    segmenter, grader = model.get_layer("segmenter"), model.get_layer("grader")

    def changed(step):
        before = (
            [w.copy() for w in segmenter.get_weights()],
            [w.copy() for w in grader.get_weights()],
        )
        mtunet.compile_two_step(model, step=step, lr=1e-3, run_eagerly=True)
        model.fit(images, targets, batch_size=2, epochs=1, verbose=0)
        after = segmenter.get_weights(), grader.get_weights()
        return [
            any(not np.array_equal(b, a) for b, a in zip(old, new))
            for old, new in zip(before, after)
        ]

    assert changed(step=1) == [True, False]
    assert changed(step=2) == [False, True]
    with pytest.raises(ValueError, match="build_mtunet_variant_b"):
        mtunet.compile_two_step(mtunet.build_mtunet(input_shape=(SIZE, SIZE, 3), width=W), step=1)
    with pytest.raises(ValueError, match="step must be 1"):
        mtunet.compile_two_step(model, step=3)


def test_fit_lowers_the_loss_on_a_tiny_batch():
    # Compiled (graph) train function, as real training runs.
    images, targets = _batch(n=4)
    model = mtunet.build_mtunet(input_shape=(SIZE, SIZE, 3), width=W)
    mtunet.compile_mtunet(model, alpha=1.0, lr=2e-3)
    before = model.evaluate(images, targets, verbose=0, return_dict=True)
    history = model.fit(images, targets, batch_size=4, epochs=20, verbose=0)
    after = model.evaluate(images, targets, verbose=0, return_dict=True)
    assert set(history.history) == {"loss", "seg_probs_loss", "grade_probs_loss"}
    assert np.all(np.isfinite(history.history["loss"]))
    assert after["seg_probs_loss"] < 0.7 * before["seg_probs_loss"]
    assert after["grade_probs_loss"] < before["grade_probs_loss"]
    assert after["loss"] < 0.85 * before["loss"]
