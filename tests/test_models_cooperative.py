"""Networks of the cooperative-learning paper: partial attention (Eq. 3) on shapes and values,
the residual inception blocks (Figs. 2-3), the joint model's agents, and the baselines."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.models import cooperative as coop


def test_partial_attention_plan_eq3_on_shapes():
    sizes = {"E1": (64, 64), "E2": (32, 32), "E3": (16, 16), "E4": (8, 8)}
    # a_i = min(h_E, w_E) / min(h_U, w_U): 4, 2, 1 (identity), 1/2 (switched off)
    assert coop.partial_attention_plan(sizes, (16, 16)) == {"E1": 4, "E2": 2, "E3": 1, "E4": None}
    assert coop.partial_attention_plan(sizes, (64, 64)) == {
        "E1": 1,
        "E2": None,
        "E3": None,
        "E4": None,
    }
    assert coop.partial_attention_plan(sizes, (4, 4)) == {"E1": 16, "E2": 8, "E3": 4, "E4": 2}
    # non-square maps: the ratio of the short sides, and both axes must match after pooling
    assert coop.partial_attention_plan({"E": (32, 64)}, (16, 32)) == {"E": 2}
    with pytest.raises(ValueError, match="cannot be max-pooled"):
        coop.partial_attention_plan({"E": (48, 48)}, (32, 32))  # a_i = 1.5
    with pytest.raises(ValueError, match="cannot be max-pooled"):
        coop.partial_attention_plan({"E": (32, 48)}, (16, 16))  # a_i = 2 but 48 / 2 != 16
    with pytest.raises(ValueError, match="static"):
        coop.partial_attention_plan({"E": (32, 32)}, (None, 16))


def test_partial_attention_pools_switched_on_maps_and_drops_the_others():
    rng = np.random.default_rng(0)
    u = keras.Input((8, 8, 3), name="u")
    maps = {
        "E1": keras.Input((32, 32, 2), name="E1"),
        "E2": keras.Input((8, 8, 5), name="E2"),
        "E3": keras.Input((4, 4, 7), name="E3"),
    }
    out = coop.partial_attention(u, maps, name="stage")
    model = keras.Model([u, *maps.values()], out)
    assert out.shape[1:] == (8, 8, 3 + 2 + 5)  # E3 (a = 1/2) is switched off
    names = {layer.name for layer in model.layers}
    assert "stage_E1_pool4" in names and "stage_concat" in names
    assert not any(n.startswith("stage_E2_pool") or n.startswith("stage_E3") for n in names)
    values = [rng.normal(size=(2,) + tuple(t.shape[1:])).astype(np.float32) for t in model.inputs]
    got = model(values).numpy()
    np.testing.assert_array_equal(got[..., :3], values[0])
    pooled = values[1].reshape(2, 8, 4, 8, 4, 2).max(axis=(2, 4))  # 4x4 max-pool, stride 4
    np.testing.assert_array_equal(got[..., 3:5], pooled)
    np.testing.assert_array_equal(got[..., 5:], values[2])  # a = 1: identity


def _tiny_joint(**kwargs):
    options = dict(
        input_shape=(32, 32, 3),
        num_seg_classes=3,
        encoder_widths=(4, 8, 8),
        encoder_blocks=1,
        classifier_widths=(8, 8),
        classifier_blocks=1,
    )
    options.update(kwargs)
    return coop.build_cooperative_model(**options)


def test_segmentation_agent_attends_to_the_maps_eq3_selects():
    model = _tiny_joint()
    encoder, classifier, segmenter = coop.cooperative_agents(model)
    shapes = {k: tuple(v.shape[1:]) for k, v in encoder.output.items()}
    assert shapes == {
        "encoder_level1": (32, 32, 4),
        "encoder_level2": (16, 16, 8),
        "encoder_level3": (8, 8, 8),
        "encoder_output": (4, 4, 8),
    }
    names = {layer.name for layer in segmenter.layers}
    # stage 1 upsamples 4 -> 8: E1 pooled by 4, E2 by 2, E3 identity
    assert {
        "decoder_stage1_attention_encoder_level1_pool4",
        "decoder_stage1_attention_encoder_level2_pool2",
    } <= names
    # stage 2 (16 px): E1 pooled by 2, E2 identity, E3 switched off; stage 3 (32 px): E1 only
    assert "decoder_stage2_attention_encoder_level1_pool2" in names
    concat_inputs = {
        j: len(segmenter.get_layer(f"decoder_stage{j}_attention_concat").input) for j in (1, 2, 3)
    }
    assert concat_inputs == {1: 4, 2: 3, 3: 2}
    for j, size in ((1, 8), (2, 16), (3, 32)):
        assert segmenter.get_layer(f"decoder_stage{j}_upconv").kernel.shape[:2] == (2, 2)
        assert segmenter.get_layer(f"decoder_stage{j}_upconv").strides == (2, 2)
        assert segmenter.get_layer(f"decoder_stage{j}_attention_concat").output.shape[1] == size


def test_joint_model_outputs_agents_and_private_parameters():
    model = _tiny_joint()
    x = tf.random.normal((2, 32, 32, 3))
    out = model(x)
    assert set(out) == {keys.GRADE_LOGITS, keys.GRADE_PROBS, keys.LESION_LOGITS, keys.SEG_PROBS}
    assert out[keys.GRADE_PROBS].shape == (2, 5)
    assert out[keys.SEG_PROBS].shape == (2, 32, 32, 3)
    np.testing.assert_allclose(out[keys.SEG_PROBS].numpy().sum(-1), 1.0, atol=1e-5)
    encoder, classifier, segmenter = coop.cooperative_agents(model)
    ids = [{id(v) for v in m.trainable_variables} for m in (encoder, classifier, segmenter)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(map(len, ids)) == len(model.trainable_variables)
    # the classifier agent is made of factorised blocks: no square kernel larger than 1x1
    kernels = [
        tuple(layer.kernel.shape[:2])
        for layer in classifier.layers
        if isinstance(layer, keras.layers.Conv2D) and "down" not in layer.name
    ]
    assert (1, 3) in kernels and (3, 1) in kernels
    assert all(k[0] == 1 or k[1] == 1 for k in kernels)
    with pytest.raises(ValueError, match="not a cooperative model"):
        coop.cooperative_agents(classifier)


def test_residual_inception_block_fig2_and_its_factorisation_fig3():
    x = keras.Input((8, 8, 6))
    plain = keras.Model(x, coop.residual_inception_block(x, filters=16, name="b"))
    fac = keras.Model(x, coop.residual_inception_block(x, filters=16, factorized=True, name="f"))
    assert plain.output.shape[1:] == fac.output.shape[1:] == (8, 8, 16)
    kernels = {
        layer.name: tuple(layer.kernel.shape) for layer in plain.layers if "conv" in layer.name
    }
    assert kernels["b_branch5x5_conv"] == (5, 5, 4, 4)  # four branches of 16 // 4 filters
    assert kernels["b_branchpool_conv"] == (3, 3, 6, 4)  # the convolution before max-pooling
    assert kernels["b_merge_conv"] == (3, 3, 16, 16)  # 3x3 over the concatenation
    assert kernels["b_residual_conv"] == (1, 1, 6, 16)  # 1x1 residual, same filters
    assert plain.count_params() > fac.count_params()
    assert isinstance(plain.get_layer("b_add"), keras.layers.Add)
    # the residual path: with every branch and merge weight at zero the block is
    # relu(BN(conv1x1(x))), i.e. relu of the 1x1 convolution at initial BN statistics
    for layer in plain.layers:
        if isinstance(layer, keras.layers.Conv2D) and layer.name != "b_residual_conv":
            layer.kernel.assign(tf.zeros_like(layer.kernel))
    data = tf.random.normal((2, 8, 8, 6))
    residual = tf.nn.conv2d(data, plain.get_layer("b_residual_conv").kernel, 1, "SAME")
    expected = tf.nn.relu(residual / np.sqrt(1.0 + 1e-3))  # BN at init: x / sqrt(1 + eps)
    np.testing.assert_allclose(plain(data).numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="filters must be >= 4"):
        coop.residual_inception_block(x, filters=3, name="tiny")


def test_bad_shapes_give_clear_errors():
    with pytest.raises(ValueError, match="divisible by 8"):
        _tiny_joint(input_shape=(36, 36, 3))
    with pytest.raises(ValueError, match="widths"):
        coop.build_segmentation_agent(
            encoder_shapes={"encoder_output": (4, 4, 8), "encoder_level1": (8, 8, 4)},
            widths=(4, 4),
            num_classes=2,
        )
    with pytest.raises(ValueError, match="unknown grader"):
        coop.build_reference_grader("resnet", input_shape=(64, 64, 3))
    with pytest.raises(ValueError, match="at least 75"):
        coop.build_reference_grader("inception_v3", input_shape=(64, 64, 3))


def test_baselines_share_a_pretrained_encoder_and_predict_full_size_maps():
    enc = coop.build_vgg16_fcn_encoder(input_shape=(32, 32, 3), width=1 / 16, fc_units=64)
    assert {k: tuple(v.shape[1:3]) for k, v in enc.output.items()} == {
        "block3_pool": (4, 4),
        "block4_pool": (2, 2),
        "fc7": (1, 1),
    }
    classifier = coop.build_encoder_classifier(enc, feature="fc7", num_grades=5)
    fcn = coop.build_fcn8s(input_shape=(32, 32, 3), num_seg_classes=3, encoder=enc)
    shared = {id(v) for v in enc.weights}
    assert shared <= {id(v) for v in classifier.weights}
    assert shared <= {id(v) for v in fcn.weights}
    x = tf.random.normal((2, 32, 32, 3))
    assert classifier(x)[keys.GRADE_PROBS].shape == (2, 5)
    probs = fcn(x)[keys.SEG_PROBS]
    assert probs.shape == (2, 32, 32, 3)
    # score layers start at zero, so FCN-8s starts uniform; the x8 upsampling is bilinear
    np.testing.assert_allclose(probs.numpy(), 1 / 3, atol=1e-6)
    up8 = keras.Sequential([keras.Input((4, 4, 3)), fcn.get_layer("upscore8")])
    ramp = np.arange(4, dtype=np.float32).reshape(1, 1, 4, 1).repeat(4, axis=1).repeat(3, axis=3)
    out = up8(ramp).numpy()[0, 8, :, 0]
    np.testing.assert_allclose(np.diff(out[4:28]), 1 / 8, atol=1e-5)  # linear interpolation

    unet_encoder = coop.build_shared_encoder(input_shape=(32, 32, 3), widths=(4, 8))
    unet = coop.build_inception_unet(
        input_shape=(32, 32, 3), num_seg_classes=3, encoder=unet_encoder
    )
    assert {id(v) for v in unet_encoder.weights} <= {id(v) for v in unet.weights}
    assert unet(x)[keys.SEG_PROBS].shape == (2, 32, 32, 3)
    assert unet.get_layer("decoder_stage2_concat").output.shape[1:] == (32, 32, 8)
    own = coop.build_inception_unet(
        input_shape=(32, 32, 3), num_seg_classes=3, encoder_widths=(4, 8)
    )
    assert own.get_layer("inception_unet_encoder") is not None


def test_reference_graders_are_keras_applications_with_the_grading_head():
    for name, size, marker in (("vgg19", 32, "block5_conv4"), ("inception_v3", 75, "mixed10")):
        model = coop.build_reference_grader(name, input_shape=(size, size, 3), num_grades=5)
        assert model.get_layer(marker) is not None
        out = model(tf.random.uniform((1, size, size, 3)))
        assert out[keys.GRADE_PROBS].shape == (1, 5)
        np.testing.assert_allclose(out[keys.GRADE_PROBS].numpy().sum(), 1.0, atol=1e-5)


def test_random_vgg_networks_start_he_normal_and_keep_their_signal():
    # VGG-19 (Table III) and the FCN-8s encoder have no batch norm: from random weights their
    # ReLU convolutions start He-normal, so the last block's activations keep the spread of the
    # first (Keras's Glorot default shrinks it about 2x per convolution, ~1e-4 over VGG-19's 16).
    keras.utils.set_random_seed(0)
    x = np.random.RandomState(0).uniform(-1, 1, (2, 64, 64, 3)).astype("float32")
    vgg = coop.build_reference_grader("vgg19", input_shape=(64, 64, 3), num_grades=5)
    probe = keras.Model(
        vgg.input, [vgg.get_layer(n).output for n in ("block1_conv1", "block5_conv4")]
    )
    first, last = (float(tf.math.reduce_std(t)) for t in probe(x))
    assert last > first / 4, (first, last)
    fcn = coop.build_vgg16_fcn_encoder(input_shape=(64, 64, 3), width=0.125, fc_units=256)
    for name in ("fc6", "fc7"):
        assert isinstance(fcn.get_layer(name).kernel_initializer, keras.initializers.HeNormal)
