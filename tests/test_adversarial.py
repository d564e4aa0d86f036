"""Zhou et al. 2019 training (docs/design.md section 6): the masked cross-entropy, the stage-1
generator trainer and the stage-2 collaborative trainer (log keys, one optimizer per network
with disjoint variables, pseudo-mask targets, discriminator targets, loss going down, 1 vs 2
replicas)."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys, losses
from drkeras.data.pipeline import MASK_VALID
from drkeras.models.collaborative import (
    REAL_LOGIT,
    build_base_grader,
    build_discriminator,
    build_lesion_attentive_grader,
    build_xception_unet,
)
from drkeras.training.adversarial import (
    CollaborativeTrainer,
    GeneratorPretrainer,
    masked_lesion_crossentropy,
)

# Two lesion types keep the eager steps short (the networks are tested with four).
SIZE, L, WIDTH = 32, 2, 1 / 8
ADV_KEYS = {"seg_loss", "ce_loss", "grade_loss", "adv_loss", "d_loss"}


# ----------------------------------------------------------------------------- the loss


def test_masked_lesion_crossentropy_hand_values():
    # One example, 1 x 2 pixels, 2 lesions; logits 0 -> p = 0.5 -> log 2 for every pixel.
    masks = np.zeros((2, 1, 2, 2), np.float32)
    masks[1, 0, 0, 0] = 1.0
    logits = np.zeros((2, 1, 2, 2), np.float32)
    logits[1, 0, :, 1] = [np.log(3.0), -np.log(3.0)]  # p = 0.75, 0.25 on empty lesion 2
    got = masked_lesion_crossentropy(masks, logits).numpy()
    # lesion 2 of example 1: -log(0.25), -log(0.75) averaged
    second = 0.5 * (np.log(2.0) + 0.5 * (np.log(4.0) + np.log(4.0 / 3.0)))
    np.testing.assert_allclose(got, [np.log(2.0), second], rtol=1e-6)
    weighted = masked_lesion_crossentropy(masks, logits, [[1.0, 1.0], [1.0, 0.0]]).numpy()
    np.testing.assert_allclose(weighted, [np.log(2.0), np.log(2.0)], rtol=1e-6)
    # No annotated lesion: no loss.
    assert masked_lesion_crossentropy(masks, logits, [[0.0, 0.0], [0.0, 0.0]]).numpy().tolist() == [
        0.0,
        0.0,
    ]
    with pytest.raises(ValueError, match=r"\[B, H, W, L\]"):
        masked_lesion_crossentropy(masks[0], logits[0])


# ----------------------------------------------------------------------------- fixtures


def _batch(n=4, seed=0):
    """A mixed batch: the first half pixel-level (masks, grade -1), the rest image-level."""
    rng = np.random.default_rng(seed)
    image = rng.uniform(0, 1, (n, SIZE, SIZE, 3)).astype(np.float32)
    masks = np.zeros((n, SIZE, SIZE, L), np.float32)
    valid = np.array([1.0] * (n // 2) + [0.0] * (n - n // 2), np.float32)
    for i in range(n // 2):
        r, c = rng.integers(0, SIZE - 6, 2)
        masks[i, r : r + 6, c : c + 6, i % L] = 1.0
        image[i, r : r + 6, c : c + 6, 0] = 1.0
    present = np.repeat(valid[:, None], L, axis=1)
    present[0, -1] = 0.0  # the last lesion type is not annotated on the first image
    grade = np.array([-1] * (n // 2) + [g % 5 for g in range(n - n // 2)], np.int32)
    return image, {
        keys.MASKS: masks,
        keys.MASK_PRESENT: present,
        MASK_VALID: valid,
        keys.GRADE: grade,
    }


def _networks(adversarial=True, sync=False):
    common = dict(num_lesions=L, width=WIDTH, sync_batchnorm=sync)
    generator = build_xception_unet(input_shape=(SIZE, SIZE, 3), **common)
    base = build_base_grader(input_shape=(SIZE, SIZE, 3), width=WIDTH, sync_batchnorm=sync)
    grader = build_lesion_attentive_grader(base, num_lesions=L, width=WIDTH)
    discriminator = (
        build_discriminator(input_shape=(SIZE, SIZE, 3), **common) if adversarial else None
    )
    return generator, grader, discriminator


def _adam(lr):
    return keras.optimizers.Adam(lr, beta_1=0.5)


def _trainer(
    adversarial=True,
    *,
    g_lr=1e-3,
    c_lr=1e-3,
    d_lr=1e-3,
    networks=None,
    eager=True,
    sync=False,
    optimizer=_adam,
):
    trainer = CollaborativeTrainer(*(networks or _networks(adversarial, sync)))
    trainer.compile(
        g_optimizer=optimizer(g_lr),
        c_optimizer=optimizer(c_lr),
        d_optimizer=optimizer(d_lr) if adversarial else None,
        run_eagerly=eager,
    )
    return trainer


def _snapshot(trainer):
    return {g: [v.numpy() for v in vs] for g, vs in trainer.variable_groups().items()}


# ----------------------------------------------------------------------------- stage 1


# Traced (the paper preset's mode) and eager (the smoke preset's).
@pytest.mark.parametrize("run_eagerly", [True, False], ids=["eager", "traced"])
def test_generator_pretrainer_logs_steps_and_learns(run_eagerly):
    generator = build_xception_unet(
        input_shape=(SIZE, SIZE, 3), num_lesions=L, width=WIDTH, sync_batchnorm=False
    )
    trainer = GeneratorPretrainer(generator)
    with pytest.raises(TypeError, match="ambiguous"):
        trainer.compile(g_optimizer=keras.optimizers.Adam(), optimizer="adam")
    trainer.compile(g_optimizer=keras.optimizers.Adam(3e-3, beta_1=0.5), run_eagerly=run_eagerly)
    image, y = _batch()
    data = (image[:2], {keys.MASKS: y[keys.MASKS][:2], keys.MASK_PRESENT: y[keys.MASK_PRESENT][:2]})
    before_weights = [v.numpy() for v in generator.trainable_variables]
    assert set(trainer.evaluate(*data, verbose=0, return_dict=True)) == {"ce_loss"}

    def fresh_loss():
        # Training-mode forward pass (batch statistics): the inference-mode moving statistics
        # lag far behind after 20 steps at Keras' momentum 0.99.
        logits = generator(data[0], training=True)[keys.LESION_LOGITS]
        ce = masked_lesion_crossentropy(data[1][keys.MASKS], logits, data[1][keys.MASK_PRESENT])
        return float(tf.reduce_mean(ce))

    before = fresh_loss()
    logs = trainer.train_on_batch(*data, return_dict=True)
    assert set(logs) == {"ce_loss"} and np.isfinite(logs["ce_loss"])
    np.testing.assert_allclose(logs["ce_loss"], before, rtol=1e-4)
    assert int(trainer.g_optimizer.iterations) == 1
    for w0, v in zip(before_weights, generator.trainable_variables):
        assert not np.array_equal(w0, v.numpy()), v.name
    ds = tf.data.Dataset.from_tensors(data).repeat(15)
    trainer.fit(ds, epochs=1, verbose=0)
    assert fresh_loss() < 0.5 * before


# ----------------------------------------------------------------------------- stage 2


def test_stage2_ownership_targets_gradients_logs_and_steps():
    """One trainer (building the networks is the slow part): each check below is one of
    docs/design.md section 6's trainer checks."""
    trainer = _trainer()
    image, y = data = _batch()

    # One optimizer per network over disjoint variable sets covering every trainable variable.
    groups = trainer.variable_groups()
    ids = {g: {id(v) for v in vs} for g, vs in groups.items()}
    assert set(groups) == {"generator", "grader", "discriminator"}
    assert not ids["generator"] & ids["grader"]
    assert not ids["generator"] & ids["discriminator"]
    assert not ids["grader"] & ids["discriminator"]
    assert set().union(*ids.values()) == {id(v) for v in trainer.trainable_variables}
    names = [v.name for v in groups["grader"]]  # the attention model belongs to the grader
    assert any("attention_MA_low" in n for n in names) and any("trunk_tuple1" in n for n in names)
    # A discriminator reusing the grader's low-level features would be stepped twice.
    inputs = {
        keys.IMAGE: keras.Input((SIZE, SIZE, 3), name=keys.IMAGE),
        keys.MASKS: keras.Input((SIZE, SIZE, L), name=keys.MASKS),
    }
    low = trainer.grader.get_layer("grader_low")(inputs[keys.IMAGE])
    pooled = keras.layers.GlobalAveragePooling2D()(low)
    sharing = keras.Model(inputs, {REAL_LOGIT: keras.layers.Dense(1)(pooled)})
    with pytest.raises(ValueError, match="belongs to both the grader and the discriminator"):
        CollaborativeTrainer(trainer.generator, trainer.grader, sharing)

    # Targets (Eq. 1): ground truth for pixel-level images, attention maps for image-level ones.
    result = trainer.compute_gradients(data)
    out = trainer.generator(image, training=True)  # same batch statistics, same outputs
    graded = trainer.grader({keys.IMAGE: image, keys.MASKS: out[keys.LESION_PROBS]}, training=True)
    valid = y[MASK_VALID][:, None, None, None]
    targets = valid * y[keys.MASKS] + (1 - valid) * graded[keys.ATTENTION].numpy()
    weights = np.where(y[MASK_VALID][:, None] > 0, y[keys.MASK_PRESENT], 1.0)
    expected = masked_lesion_crossentropy(targets, out[keys.LESION_LOGITS], weights)
    np.testing.assert_allclose(result["ce"].numpy(), expected.numpy(), rtol=1e-4)
    wrong = masked_lesion_crossentropy(y[keys.MASKS], out[keys.LESION_LOGITS], weights)
    assert not np.allclose(result["ce"].numpy()[2:], wrong.numpy()[2:], rtol=1e-3)
    # Discriminator: "real" (1) for pixel-level images, "fake" (0) for image-level ones.
    logit = trainer.discriminator(
        {keys.IMAGE: image, keys.MASKS: out[keys.LESION_PROBS]}, training=True
    )[REAL_LOGIT].numpy()[:, 0]
    minus_log_d = np.log1p(np.exp(-np.abs(logit))) + np.maximum(0.0, -logit)
    expected_d = np.where(y[MASK_VALID] > 0, minus_log_d, minus_log_d + logit)
    # Eq. 3, each expectation over its own kind of image (here two of each).
    pixel = y[MASK_VALID] > 0
    np.testing.assert_allclose(
        result["d"].numpy().mean(), expected_d[pixel].mean() + expected_d[~pixel].mean(), rtol=1e-4
    )
    # G keeps both branches, D's targets swapped (non-saturating): -log D on X_I, -log(1 - D)
    # on X_P.
    expected_adv = np.where(pixel, minus_log_d + logit, minus_log_d)
    np.testing.assert_allclose(
        result["adv"].numpy().mean(),
        expected_adv[pixel].mean() + expected_adv[~pixel].mean(),
        rtol=1e-4,
    )
    # Grades of the pixel-level images are unknown (-1): no grading loss for them.
    np.testing.assert_array_equal(result["graded"].numpy(), [0, 0, 1, 1])
    np.testing.assert_array_equal(result["grade"].numpy()[:2], 0.0)
    # Every trainable variable gets a gradient from its own network's loss.
    for group, variables in groups.items():
        for v, g in zip(variables, result["grads"][group]):
            assert float(tf.reduce_max(tf.abs(g))) > 0.0, (group, v.name)

    # One step: exact log keys, finite, every optimizer stepped, every variable moved.
    before = _snapshot(trainer)
    logs = trainer.train_on_batch(*data, return_dict=True)
    assert set(logs) == ADV_KEYS
    assert all(np.isfinite(v) for v in logs.values())
    optimizers = {
        "generator": trainer.g_optimizer,
        "grader": trainer.c_optimizer,
        "discriminator": trainer.d_optimizer,
    }
    assert all(int(opt.iterations) == 1 for opt in optimizers.values())
    after = _snapshot(trainer)
    for group in before:
        for w0, w1 in zip(before[group], after[group]):
            assert not np.array_equal(w0, w1), group
    # L_Seg = L_Adv + lambda L_CE (Eq. 3): L_Adv with weight 1.
    np.testing.assert_allclose(
        logs["seg_loss"], 10.0 * logs["ce_loss"] + logs["adv_loss"], rtol=1e-4
    )

    # Each optimizer moves only its own network (e.g. the discriminator step only D).
    for only in optimizers:
        for name, optimizer in optimizers.items():
            optimizer.learning_rate = 1e-2 if name == only else 0.0
        before = _snapshot(trainer)
        trainer.train_on_batch(*data)
        after = _snapshot(trainer)
        for group in before:
            changed = [not np.array_equal(a, b) for a, b in zip(before[group], after[group])]
            assert all(changed) if group == only else not any(changed), (only, group)


def test_eq3_and_eq2_expectations_are_means_over_their_own_images():
    """An unbalanced batch (three pixel-level images, one image-level): each network's gradient
    is that of the paper's loss with every expectation a mean over its own kind of image,
    L_Seg = lambda mean(L_CE) + E_I[-log D(X_I, G(X_I))] + E_P[-log(1 - D(X_P, G(X_P)))],
    L_D = E_P[-log D] + E_I[-log(1 - D)], L_Cls = mean focal loss over the graded images;
    not sums divided by the whole batch (which would weigh L_Adv by the batch shares)."""
    trainer = _trainer()
    image, y = _batch(6)
    pick = [0, 1, 2, 3]  # mask_valid 1, 1, 1, 0
    image, y = image[pick], {k: v[pick] for k, v in y.items()}
    pixel = y[MASK_VALID] > 0
    assert pixel.tolist() == [True, True, True, False]
    result = trainer.compute_gradients((image, y))

    generator, grader, discriminator = trainer.generator, trainer.grader, trainer.discriminator
    with tf.GradientTape(persistent=True) as tape:
        out = generator(image, training=True)
        probs = out[keys.LESION_PROBS]
        graded = grader({keys.IMAGE: image, keys.MASKS: tf.stop_gradient(probs)}, training=True)
        valid = y[MASK_VALID][:, None, None, None]
        targets = valid * y[keys.MASKS] + (1 - valid) * tf.stop_gradient(graded[keys.ATTENTION])
        weights = np.where(pixel[:, None], y[keys.MASK_PRESENT], 1.0).astype(np.float32)
        ce = masked_lesion_crossentropy(targets, out[keys.LESION_LOGITS], weights)
        z = discriminator({keys.IMAGE: image, keys.MASKS: probs}, training=True)[REAL_LOGIT][:, 0]
        minus_log_d, minus_log_not_d = tf.nn.softplus(-z), tf.nn.softplus(z)
        adv = tf.reduce_mean(minus_log_d[~pixel]) + tf.reduce_mean(minus_log_not_d[pixel])
        seg = 10.0 * tf.reduce_mean(ce) + adv
        d_loss = tf.reduce_mean(minus_log_d[pixel]) + tf.reduce_mean(minus_log_not_d[~pixel])
        grades = y[keys.GRADE]
        focal = losses.categorical_focal_loss(
            tf.one_hot(np.maximum(grades, 0), 5), graded[keys.GRADE_PROBS], alpha=0.25, gamma=2.0
        )
        cls = tf.reduce_mean(focal[grades >= 0])
    expected = {"generator": seg, "discriminator": d_loss, "grader": cls}
    for group, variables in trainer.variable_groups().items():
        for v, got, want in zip(
            variables, result["grads"][group], tape.gradient(expected[group], variables)
        ):
            scale = float(tf.reduce_max(tf.abs(want)))
            np.testing.assert_allclose(
                got.numpy(), want.numpy(), rtol=1e-3, atol=1e-4 * scale, err_msg=v.name
            )
    # The logged values are the same losses: their batch means.
    np.testing.assert_allclose(float(tf.reduce_mean(result["seg"])), float(seg), rtol=1e-4)
    np.testing.assert_allclose(float(tf.reduce_mean(result["adv"])), float(adv), rtol=1e-4)
    np.testing.assert_allclose(float(tf.reduce_mean(result["d"])), float(d_loss), rtol=1e-4)


def test_semi_only_trainer_and_bad_arguments():
    generator, grader, discriminator = _networks()
    semi = CollaborativeTrainer(generator, grader)
    with pytest.raises(TypeError, match="no discriminator"):
        semi.compile(
            g_optimizer=keras.optimizers.Adam(),
            c_optimizer=keras.optimizers.Adam(),
            d_optimizer=keras.optimizers.Adam(),
        )
    with pytest.raises(TypeError, match="ambiguous"):
        semi.compile(
            g_optimizer=keras.optimizers.Adam(), c_optimizer=keras.optimizers.Adam(), loss="mse"
        )
    same = keras.optimizers.Adam()
    with pytest.raises(ValueError, match="own optimizer"):
        semi.compile(g_optimizer=same, c_optimizer=same)
    semi.compile(
        g_optimizer=keras.optimizers.Adam(),
        c_optimizer=keras.optimizers.Adam(),
        run_eagerly=True,
    )
    logs = semi.train_on_batch(*_batch(), return_dict=True)
    assert set(logs) == {"seg_loss", "ce_loss", "grade_loss"}
    assert set(semi.variable_groups()) == {"generator", "grader"}
    adversarial = CollaborativeTrainer(generator, grader, discriminator)
    with pytest.raises(TypeError, match="d_optimizer"):
        adversarial.compile(
            g_optimizer=keras.optimizers.Adam(), c_optimizer=keras.optimizers.Adam()
        )
    image, y = _batch()
    with pytest.raises(ValueError, match="mask_valid"):
        semi.compute_gradients((image, {k: v for k, v in y.items() if k != MASK_VALID}))
    with pytest.raises(ValueError, match="dict outputs"):
        CollaborativeTrainer(generator, generator)
    out = semi(image)
    assert out[keys.LESION_PROBS].shape == (4, SIZE, SIZE, L)
    assert out[keys.GRADE_PROBS].shape == (4, 5)


def test_fresh_evaluation_losses_go_down_after_15_steps():
    trainer = _trainer(g_lr=5e-3, c_lr=5e-3, d_lr=1e-3)
    data = _batch()
    assert set(trainer.evaluate(*data, verbose=0, return_dict=True)) == {"ce_loss", "grade_loss"}

    def fresh_losses():
        # Losses of a new forward pass (training-mode batch norm, nothing applied).
        result = trainer.compute_gradients(data)
        pixel = data[1][MASK_VALID] > 0
        grade = float(tf.reduce_sum(result["grade"]) / tf.reduce_sum(result["graded"]))
        return float(tf.reduce_mean(tf.boolean_mask(result["ce"], pixel))), grade

    ce_before, grade_before = fresh_losses()
    trainer.fit(tf.data.Dataset.from_tensors(data).repeat(15), epochs=1, verbose=0)
    ce_after, grade_after = fresh_losses()
    # Pixel-level images against their ground truth (L_Adv, weight 1 and both branches of Eq. 3,
    # competes with lambda L_CE while D is winning: about 0.63 x after 15 steps); image-level
    # grades.
    assert ce_after < 0.75 * ce_before
    assert grade_after < 0.5 * grade_before


def _check_replica_gradients(two_replicas, double, data, reference):
    """Each group's gradient summed over the replicas equals the one-device gradient (the
    replicas hold the pixel-level and the image-level half of the batch), and so do the
    per-example losses (the logged values). Eager only: traced, the synchronised two-replica
    step takes minutes to trace on 2 CPU cores; the Keras step of the traced test is checked
    against the same one-device gradients instead."""
    dist = two_replicas.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(data).unbatch().batch(4)
    )
    per_replica = two_replicas.run(double.compute_gradients, args=(next(iter(dist)),))
    for group, grads in reference["grads"].items():
        summed = two_replicas.reduce(tf.distribute.ReduceOp.SUM, per_replica["grads"][group], None)
        for a, b in zip(grads, summed):
            scale = float(tf.reduce_max(tf.abs(a)))
            np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-3, atol=1e-3 * scale)
    for key in ("seg", "ce", "d", "adv", "grade"):
        local = two_replicas.experimental_local_results(per_replica[key])
        np.testing.assert_allclose(
            np.concatenate([t.numpy() for t in local]), reference[key].numpy(), rtol=1e-4
        )


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "traced"])
def test_one_and_two_replicas_give_the_same_update(two_replicas, eager):
    data = _batch()
    # Synchronised batch norm: each replica normalises with the global batch's statistics.
    # SGD: Adam's first steps are ~lr * sign(gradient), which turns the rounding noise of
    # near-zero gradients into full-size differences.
    options = dict(
        sync=True, optimizer=keras.optimizers.SGD, g_lr=0.01, c_lr=0.01, d_lr=0.01, eager=eager
    )
    with tf.distribute.OneDeviceStrategy("/cpu:0").scope():
        single = _trainer(**options)
    start = single.get_weights()
    with two_replicas.scope():
        double = _trainer(**options)
        double.set_weights(start)
    start_groups = _snapshot(double)

    reference = single.compute_gradients(data)
    if eager:
        _check_replica_gradients(two_replicas, double, data, reference)

    # One Keras training step on the two replicas moves every network's variables by exactly
    # the one-device SGD step -lr * gradient.
    logs = double.train_on_batch(*data, return_dict=True)
    assert set(logs) == ADV_KEYS and all(np.isfinite(v) for v in logs.values())
    for group, variables in double.variable_groups().items():
        for v, w0, g in zip(variables, start_groups[group], reference["grads"][group]):
            scale = float(tf.reduce_max(tf.abs(g)))
            np.testing.assert_allclose(
                v.numpy() - w0, -0.01 * g.numpy(), rtol=1e-3, atol=1e-7 + 1e-5 * scale
            )
