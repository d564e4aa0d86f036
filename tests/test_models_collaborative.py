"""Zhou et al. 2019 networks: generator shapes at two input sizes (odd skips), discriminator,
the lesion attentive grader's wiring of Eqs. 5-6, shared weights and gradients."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.models.collaborative import (
    REAL_LOGIT,
    REAL_PROB,
    build_base_grader,
    build_collaborative_model,
    build_discriminator,
    build_lesion_attentive_grader,
    build_xception_unet,
)

L = 4
WIDTH = 1 / 8  # tuple widths 4, 8, 16, 32, 64


def _layer_types(model, prefix):
    return {type(layer).__name__ for layer in model.layers if layer.name.startswith(prefix)}


@pytest.mark.parametrize(
    "size, skips",
    [
        (64, [32, 16, 8, 4, 2]),
        # 75 px: odd input and odd skips (38, 19, 10, 5, 3); the decoder crops its x2 up-samplings
        (75, [38, 19, 10, 5, 3]),
    ],
)
def test_generator_shapes_and_tuples(size, skips):
    g = build_xception_unet(input_shape=(size, size, 3), num_lesions=L, width=WIDTH)
    x = tf.random.uniform((2, size, size, 3))
    out = g(x, training=False)
    assert out[keys.LESION_PROBS].shape == (2, size, size, L)
    np.testing.assert_allclose(
        out[keys.LESION_PROBS].numpy(), tf.sigmoid(out[keys.LESION_LOGITS]).numpy(), atol=1e-6
    )
    # Nine tuples: five encoder, four decoder, the encoder halving the side each time.
    adds = sorted(layer.name for layer in g.layers if layer.name.endswith("_add"))
    assert adds == [f"decoder_tuple{i}_add" for i in range(1, 5)] + [
        f"encoder_tuple{i}_add" for i in range(1, 6)
    ]
    widths = [4, 8, 16, 32, 64]
    for i, (side, width) in enumerate(zip(skips, widths), start=1):
        assert g.get_layer(f"encoder_tuple{i}_add").output.shape[1:] == (side, side, width)
    for i in range(1, 5):
        assert g.get_layer(f"decoder_tuple{i}_add").output.shape[1:] == (
            skips[i - 1],
            skips[i - 1],
            widths[i - 1],
        )
    # Tuple 1 plain convolutions, the others Xception modules (separable convolutions).
    assert "SeparableConv2D" not in _layer_types(g, "encoder_tuple1_conv")
    for prefix in ("encoder_tuple2_conv", "encoder_tuple5_conv", "decoder_tuple1_conv"):
        assert _layer_types(g, prefix) == {"SeparableConv2D"}
    assert all(layer.name for layer in g.layers)


def test_generator_plain_variant_any_size_and_paper_widths():
    plain = build_xception_unet(input_shape=(None, None, 3), width=WIDTH, separable=False)
    assert not any(isinstance(layer, keras.layers.SeparableConv2D) for layer in plain.layers)
    # Any size at call time, odd and non-square.
    assert plain(tf.zeros((1, 71, 45, 3)))[keys.LESION_PROBS].shape == (1, 71, 45, 4)
    # Fig. 2's widths: 640 px -> 320*320*32 ... 20*20*512; at 64 px the same channels.
    paper = build_xception_unet(input_shape=(64, 64, 3))
    assert paper.get_layer("encoder_tuple1_add").output.shape[-1] == 32
    assert paper.get_layer("encoder_tuple5_add").output.shape[1:] == (2, 2, 512)
    with pytest.raises(ValueError, match="at least 32"):
        build_xception_unet(input_shape=(16, 16, 3))
    with pytest.raises(ValueError, match="5 tuple widths"):
        build_xception_unet(input_shape=(64, 64, 3), widths=(8, 16))


def test_discriminator_shapes():
    d = build_discriminator(input_shape=(75, 75, 3), num_lesions=L, width=WIDTH)
    out = d({keys.IMAGE: tf.zeros((3, 75, 75, 3)), keys.MASKS: tf.ones((3, 75, 75, L))})
    assert out[REAL_LOGIT].shape == (3, 1)
    np.testing.assert_allclose(out[REAL_PROB].numpy(), tf.sigmoid(out[REAL_LOGIT]).numpy())
    assert d.get_layer("disc_concat").output.shape[-1] == 3 + L
    assert d.get_layer("disc_tuple5_pool").output.shape[1:3] == (3, 3)
    convs = [layer for layer in d.layers if isinstance(layer, keras.layers.Conv2D)]
    assert len(convs) == 10 and all(layer.kernel_size == (3, 3) for layer in convs)


def _graders(size=32, attention=True):
    base = build_base_grader(input_shape=(size, size, 3), width=WIDTH)
    return base, build_lesion_attentive_grader(
        base, num_lesions=L, attention=attention, width=WIDTH
    )


def test_attention_follows_eqs_5_and_6_and_shares_the_base_weights():
    base, grader = _graders()
    rng = np.random.default_rng(0)
    image = tf.constant(rng.uniform(0, 1, (2, 32, 32, 3)), tf.float32)
    masks = tf.constant(rng.uniform(0, 1, (2, 32, 32, L)), tf.float32)
    out = grader({keys.IMAGE: image, keys.MASKS: masks})
    assert out[keys.GRADE_PROBS].shape == (2, 5)
    assert out[keys.ATTENTION].shape == (2, 32, 32, L)
    # Shared sub-networks: the grader holds the base grader's trunk, not a copy.
    assert grader.get_layer("grader_trunk") is base.get_layer("grader_trunk")
    assert grader.get_layer("grader_low") is base.get_layer("grader_low")
    # Eq. 5-6 by hand for lesion HE (index 1).
    f_low = base.get_layer("grader_low")(image)
    f_high = grader.get_layer("attention_context")(base.get_layer("grader_trunk")(f_low))
    low = grader.get_layer("attention_HE_low")
    concat = tf.concat([masks[..., 1:2], f_low], axis=-1)
    f_att = tf.nn.relu(tf.nn.conv2d(concat, low.kernel, 1, "SAME") + low.bias)
    high = grader.get_layer("attention_HE_map")
    alpha = tf.sigmoid(
        tf.nn.conv2d(f_att * f_high[:, None, None, :], high.kernel, 1, "SAME") + high.bias
    )
    np.testing.assert_allclose(out[keys.ATTENTION][..., 1:2].numpy(), alpha.numpy(), atol=1e-5)
    # The classifier reads the L attentive feature vectors through the shared trunk.
    trunk_width = base.get_layer("grader_trunk").output_shape[-1]
    assert grader.get_layer("fusion").input_shape[-1] == L * trunk_width == 4 * 128
    # The masks change the attention maps and the grade.
    other = grader({keys.IMAGE: image, keys.MASKS: 1.0 - masks})
    assert not np.allclose(other[keys.ATTENTION].numpy(), out[keys.ATTENTION].numpy())


def test_every_grader_variable_gets_a_gradient_from_the_grade_loss():
    _, grader = _graders()
    rng = np.random.default_rng(1)
    image = tf.constant(rng.uniform(0, 1, (2, 32, 32, 3)), tf.float32)
    masks = tf.Variable(rng.uniform(0, 1, (2, 32, 32, L)).astype(np.float32))
    with tf.GradientTape() as tape:
        probs = grader({keys.IMAGE: image, keys.MASKS: masks}, training=True)[keys.GRADE_PROBS]
        loss = -tf.reduce_mean(tf.math.log(probs[:, 2]))
    variables = grader.trainable_variables
    grads = tape.gradient(loss, variables + [masks])
    for var, grad in zip(variables + [masks], grads):
        assert grad is not None and float(tf.reduce_max(tf.abs(grad))) > 0, var.name


def test_mask_weighted_baseline_and_inference_model():
    base, grader = _graders(attention=False)
    assert not any(layer.name.startswith("attention_MA_low") for layer in grader.layers)
    masks = tf.random.uniform((1, 32, 32, L))
    out = grader({keys.IMAGE: tf.zeros((1, 32, 32, 3)), keys.MASKS: masks})
    # "Lesion (Pretrained)": the masks themselves weight the features.
    np.testing.assert_array_equal(out[keys.ATTENTION].numpy(), masks.numpy())
    generator = build_xception_unet(input_shape=(32, 32, 3), num_lesions=L, width=WIDTH)
    model = build_collaborative_model(generator, grader)
    x = tf.random.uniform((2, 32, 32, 3))
    got = model(x)
    assert set(got) == {keys.LESION_PROBS, keys.GRADE_LOGITS, keys.GRADE_PROBS, keys.ATTENTION}
    np.testing.assert_allclose(
        got[keys.ATTENTION].numpy(), generator(x)[keys.LESION_PROBS].numpy(), atol=1e-6
    )
    with pytest.raises(ValueError, match="build_base_grader"):
        build_lesion_attentive_grader(generator)
    with pytest.raises(ValueError, match="build_lesion_attentive_grader"):
        build_collaborative_model(generator, base)
