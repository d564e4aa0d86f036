"""Networks of the patch SSL-GAN (Lecouat et al. 2018, Tables 3-4), weight norm, image scores."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys, metrics
from drkeras.models import ssl_gan as nets
from drkeras.training.ssl_gan import choose_threshold, localisation_map


def _pre_activation(model, name, x):
    probe = keras.Model(model.inputs, model.get_layer(name).output)
    return probe(x, training=False).numpy()


def test_discriminator_is_table3():
    d = nets.build_discriminator(input_shape=(32, 32, 3))
    shapes = {
        "disc_stage1_conv3": (None, 16, 16, 96),
        "disc_stage2_conv1": (None, 16, 16, 192),
        "disc_stage2_conv3": (None, 8, 8, 192),
        "disc_stage3_conv1": (None, 3, 3, 192),  # 3x3, no padding, stride 2
        "disc_stage3_conv2": (None, 1, 1, 192),
        "disc_nin2": (None, 1, 1, 192),
        "disc_dense": (None, 2),
    }
    for name, shape in shapes.items():
        assert d.get_layer(name).output_shape == shape, name
    wn = nets.weight_norm_layers(d)
    # 10 weight-normalised convolutions (8 3x3 + 2 NiN) and the dense layer
    assert len(wn) == 11 and all(isinstance(layer, nets.WeightNorm) for layer in wn)
    assert [layer.layer.kernel_size for layer in wn[:10]] == [(3, 3)] * 8 + [(1, 1)] * 2
    slopes = {
        round(float(lay.alpha), 3) for lay in d.layers if isinstance(lay, keras.layers.LeakyReLU)
    }
    assert slopes == {0.2}
    rates = [lay.rate for lay in d.layers if isinstance(lay, keras.layers.Dropout)]
    assert rates == [0.2, 0.5, 0.5]
    assert isinstance(d.get_layer("disc_global_pool"), keras.layers.GlobalAveragePooling2D)
    assert sorted(d.output) == ["class_logits", "features", "patch_logits"]
    assert d.output["features"].shape.as_list() == [None, 1, 1, 192]
    assert all(layer.name for layer in d.layers)
    with pytest.raises(ValueError, match="at least 32"):
        nets.build_discriminator(input_shape=(16, 16, 3))
    with pytest.raises(ValueError, match="num_classes"):
        nets.build_discriminator(num_classes=1)


def test_generator_is_table4_and_outputs_unit_range_patches():
    g = nets.build_generator()
    assert g.input_shape == (None, 100)
    assert g.get_layer("gen_dense").output_shape == (None, 6 * 6 * 512)
    for name, shape in (
        ("gen_up1", (None, 12, 12, 256)),
        ("gen_up2", (None, 24, 24, 128)),
        ("gen_up3", (None, 48, 48, 128)),
        ("gen_out", (None, 96, 96, 3)),
        ("gen_downsample", (None, 32, 32, 3)),
    ):
        assert g.get_layer(name).output_shape == shape, name
    for name in ("gen_dense_bn", "gen_up1_bn", "gen_up2_bn", "gen_up3_bn"):
        assert isinstance(g.get_layer(name), keras.layers.BatchNormalization)
    assert g.get_layer("gen_up1").kernel_size == 5
    (out,) = nets.weight_norm_layers(g)
    assert out.name == "gen_out" and tuple(out.g.shape) == (3,)  # per OUTPUT channel
    small = nets.build_generator(width=1 / 32)
    x = small(tf.random.uniform([3, 100]), training=False).numpy()
    assert x.shape == (3, 32, 32, 3) and x.min() >= 0.0 and x.max() <= 1.0
    with pytest.raises(ValueError, match="divide"):
        nets.build_generator(output_size=40)


def test_transposed_conv_matches_keras_conv2d_transpose():
    ours = nets.TransposedConv2D(4, 5, strides=2, name="t")
    x = tf.random.uniform([2, 3, 3, 2])
    y = ours(x)
    ref = keras.layers.Conv2DTranspose(4, 5, strides=2, padding="same")
    ref.build(x.shape)
    ref.set_weights([np.transpose(ours.kernel.numpy(), [0, 1, 3, 2]), ours.bias.numpy()])
    np.testing.assert_allclose(y.numpy(), ref(x).numpy(), atol=1e-5)
    clone = nets.TransposedConv2D.from_config(ours.get_config())
    assert clone.get_config() == ours.get_config()


def test_data_dependent_init_standardises_every_weight_norm_layer():
    d = nets.build_discriminator(input_shape=(32, 32, 3), width=1 / 16)
    x = tf.random.uniform([64, 32, 32, 3], seed=1)
    nets.initialize_weight_norm(d, x)
    for layer in nets.weight_norm_layers(d):
        pre = _pre_activation(d, layer.name, x)
        axes = tuple(range(pre.ndim - 1))
        np.testing.assert_allclose(pre.mean(axis=axes), 0.0, atol=1e-4, err_msg=layer.name)
        np.testing.assert_allclose(pre.std(axis=axes), 1.0, rtol=1e-3, err_msg=layer.name)
        assert bool(layer._initialized.numpy())
    before = [w.numpy() for w in d.weights]
    nets.initialize_weight_norm(d, x * 0.3)  # already initialised: nothing changes
    for a, b in zip(before, d.weights):
        np.testing.assert_array_equal(a, b.numpy())

    g = nets.build_generator(width=1 / 32)
    z = tf.random.uniform([64, 100], seed=2)
    nets.initialize_weight_norm(g, z, training=True)
    probe = keras.Model(g.inputs, g.get_layer("gen_out").output)
    pre = probe(z, training=True).numpy()
    np.testing.assert_allclose(pre.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(pre.std(axis=(0, 1, 2)), 1.0, rtol=1e-3)


def test_tfa_data_init_alone_is_off_by_the_kernel_norm():
    """Why initialize_weight_norm rescales v first: tfa's own data init standardises v . x,
    but the layer computes (v / ||v||) . x, so its outputs have std 1 / ||v||."""
    layer = nets.WeightNorm(
        keras.layers.Dense(3, kernel_initializer=keras.initializers.RandomNormal(stddev=0.05))
    )
    x = tf.random.uniform([256, 20], seed=3)
    y = layer(x).numpy()  # the first call runs tfa's data-dependent init
    norms = np.linalg.norm(layer.v.numpy(), axis=0)
    np.testing.assert_allclose(y.std(axis=0), 1.0 / norms, rtol=1e-3)
    assert np.all(np.abs(y.std(axis=0) - 1.0) > 0.5)


def test_uninitialised_weight_norm_fails_clearly_in_replica_context(two_replicas):
    with two_replicas.scope():
        layer = nets.WeightNorm(keras.layers.Dense(2), name="wn_dense")
        layer.build((None, 4))
    x = tf.ones([4, 4])
    with pytest.raises(tf.errors.InvalidArgumentError, match="initialize_weight_norm"):
        two_replicas.run(tf.function(lambda t: layer(t)), args=(x,))
    with two_replicas.scope():
        nets.initialize_weight_norm(keras.Sequential([layer]), tf.random.uniform([8, 4]))
    values = two_replicas.experimental_local_results(
        two_replicas.run(tf.function(lambda t: layer(t)), args=(x,))
    )
    np.testing.assert_allclose(values[0].numpy(), values[1].numpy())


def _constant_logit_classifier(patch_size=32):
    """A 'patch classifier' whose logit is 10 * (mean pixel value) - 5, hand-computable."""
    patch = keras.Input((patch_size, patch_size, 3))
    mean = keras.layers.GlobalAveragePooling2D()(patch)
    logit = keras.layers.Lambda(lambda t: 10.0 * tf.reduce_mean(t, axis=-1) - 5.0)(mean)
    return keras.Model(patch, {keys.PATCH_LOGITS: logit})


def test_image_scorer_sums_patch_sigmoids_in_grid_order():
    grid, size = 4, 128
    values = np.linspace(0.0, 1.0, grid * grid, dtype=np.float32).reshape(grid, grid)
    image = np.kron(values, np.ones((size // grid, size // grid), np.float32))
    image = np.repeat(image[None, ..., None], 3, axis=-1)
    scorer = nets.build_image_scorer(_constant_logit_classifier(), image_size=size, grid=grid)
    out = scorer(image)
    expected_logits = 10.0 * values - 5.0
    # float32 means of 1024 pixels times 10: exact to ~1e-4
    np.testing.assert_allclose(out[keys.PATCH_LOGITS][0].numpy(), expected_logits, atol=5e-4)
    np.testing.assert_allclose(
        out[nets.PATCH_PROBS][0].numpy(), 1 / (1 + np.exp(-expected_logits)), atol=1e-4
    )
    expected_score = float(np.sum(1 / (1 + np.exp(-expected_logits))))
    np.testing.assert_allclose(out[keys.IMAGE_SCORE].numpy(), [expected_score], rtol=1e-5)
    np.testing.assert_allclose(
        metrics.image_scores_from_patches(expected_logits[None]), [expected_score], rtol=1e-6
    )
    # logits of 0 everywhere: 64 patches at p = 1/2
    flat = np.full((1, 64, 64, 3), 0.5, np.float32)
    half = nets.build_image_scorer(_constant_logit_classifier(8), image_size=64, grid=8)
    np.testing.assert_allclose(half(flat)[keys.IMAGE_SCORE].numpy(), [32.0], rtol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        nets.build_image_scorer(_constant_logit_classifier(), image_size=100, grid=8)


def test_resnet_baselines_have_named_logit_outputs():
    patch = nets.build_resnet_patch_classifier(depth=18, name="resnet18_patch")
    assert patch(tf.zeros([2, 32, 32, 3]))[keys.PATCH_LOGITS].shape == (2,)
    image = nets.build_resnet_image_classifier(input_shape=(32, 32, 3))
    assert image(tf.zeros([2, 32, 32, 3]))[keys.PATCH_LOGITS].shape == (2,)
    with pytest.raises(ValueError, match="depth"):
        nets.build_resnet_patch_classifier(depth=20)


def test_localisation_map_and_threshold_hand_cases():
    m = localisation_map(np.array([[1.0, 0.0], [0.0, 0.0]]), 4, blur=0.0)
    np.testing.assert_array_equal(m, [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    blurred = localisation_map(np.array([[1.0, 0.0], [0.0, 0.0]]), 32, blur=0.5)
    assert blurred[0, 0] > blurred[8, 8] > blurred[31, 31] and 0 < blurred.max() < 1.0
    np.testing.assert_allclose(blurred.sum(), 256.0, rtol=0.05)  # mass kept (reflect borders)
    with pytest.raises(ValueError, match="divisible"):
        localisation_map(np.zeros((3, 3)), 8)
    assert choose_threshold([1.0, 2.0, 5.0, 6.0], [0, 0, 1, 1]) == 3.5
    # balanced accuracy, not accuracy: one positive among many negatives still counts
    assert choose_threshold([1.0, 2.0, 3.0, 4.0, 9.0], [0, 0, 0, 0, 1]) == 6.5
