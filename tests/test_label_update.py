"""PLDMLT's label update network (Sec. 3.3): it starts at the stage-1 label, and the bilevel
update of Algorithm 1 moves it towards the grade that helps the segmentation."""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys, losses
from drkeras.data import synthetic
from drkeras.data.preprocess import normalize
from drkeras.models.mtunet import build_vgg16_unet
from drkeras.models.pldmlt import (
    CORRECTED_GRADE,
    DEFAULT_SMOOTHING,
    GRADE_MASK,
    PSEUDO_GRADE,
    PseudoGradePrior,
    build_label_update_net,
    make_training_pair,
    pseudo_grade_prior,
)
from drkeras.training.bilevel import BilevelMultiTaskTrainer, stateless_call
from tests.conftest import stand_in_context

SIZE = 16
EX = 3  # fused class id of hard exudates


def _smoothed(grade, allowed, smoothing=DEFAULT_SMOOTHING):
    """The smoothed one-hot label restricted to the allowed grades, by hand."""
    prior = np.full(5, smoothing / 5)
    prior[grade] += 1.0 - smoothing
    prior = prior * np.asarray(allowed, float)
    return prior / prior.sum()


def test_label_update_net_starts_at_the_smoothed_stage1_label_whatever_the_input_scaling():
    net = build_label_update_net(input_shape=(SIZE, SIZE, 3), widths=(4, 8), hidden=8)
    rng = np.random.default_rng(0)
    # Caffe-scaled pixels (order 100): the scale that saturated the former design.
    image = normalize(rng.uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32), "imagenet_caffe")
    grades = [0, 2, 4, 3]
    allowed = np.array(
        [[1, 1, 1, 1, 1], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 0]], np.float32
    )
    inputs = {keys.IMAGE: image, PSEUDO_GRADE: tf.one_hot(grades, 5), GRADE_MASK: allowed}
    probs = net(inputs)[CORRECTED_GRADE].numpy()
    for row, (grade, mask) in enumerate(zip(grades, allowed)):
        np.testing.assert_allclose(probs[row], _smoothed(grade, mask), atol=1e-6)
    np.testing.assert_allclose(probs[0, 0], 1.0 - DEFAULT_SMOOTHING + DEFAULT_SMOOTHING / 5)
    assert np.all(probs[allowed == 0] == 0.0)

    # The correction sees the image standardised per image and channel: another scaling and
    # shift of each channel (caffe's mean subtraction, torch's, [0, 1] or [-1, 1] pixels) gives
    # the same corrected label.
    for var in net.get_layer("label_correction").trainable_variables:
        var.assign(rng.normal(0.0, 1.0, var.shape).astype(np.float32))
    corrected = net(inputs)[CORRECTED_GRADE].numpy()
    assert np.abs(corrected - probs).max() > 1e-2  # the correction now acts ...
    rescaled = dict(inputs, **{keys.IMAGE: image * [0.01, 0.5, 2.0] + [0.3, -1.0, 7.0]})
    np.testing.assert_allclose(net(rescaled)[CORRECTED_GRADE].numpy(), corrected, atol=1e-5)

    # The layers serialise.
    clone = keras.Model.from_config(net.get_config())
    clone.set_weights(net.get_weights())
    np.testing.assert_allclose(clone(inputs)[CORRECTED_GRADE].numpy(), corrected, atol=1e-6)
    assert clone.get_layer("label_prior").smoothing == DEFAULT_SMOOTHING
    np.testing.assert_allclose(
        tf.nn.softmax(pseudo_grade_prior(tf.one_hot([1], 4), 0.2)).numpy(),
        [[0.05, 0.85, 0.05, 0.05]],
    )
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match=r"smoothing .* must be in \(0, 1\)"):
            PseudoGradePrior(bad)


# ---------------------------------------------------- the update moves towards the right grade


def _lesion_feature_multitask():
    """A multi-task network whose grade and segmentation heads read one shared "lesion" feature
    ``f`` (a 1x1 convolution of the image): the logit of grade ``k`` is ``(k - 2) mean(f)`` and
    exudate-vs-background is ``+-f``. Training it towards a higher grade raises ``f`` and so the
    exudate probability everywhere; on an image covered by exudates, that lowers the
    segmentation loss."""
    image = keras.Input((SIZE, SIZE, 3), name=keys.IMAGE)
    feature = keras.layers.Conv2D(1, 1, name="enc")(image)
    pooled = keras.layers.GlobalAveragePooling2D(name="grade_pool")(feature)
    grade = keras.layers.Dense(5, activation="softmax", name=keys.GRADE_PROBS)(pooled)
    seg = keras.layers.Conv2D(5, 1, activation="softmax", name=keys.SEG_PROBS)(feature)
    model = keras.Model(image, {keys.SEG_PROBS: seg, keys.GRADE_PROBS: grade}, name="lesion_mt")
    model.get_layer("enc").set_weights([np.full((1, 1, 3, 1), 1 / 3), np.array([-0.5])])
    model.get_layer(keys.GRADE_PROBS).set_weights([np.arange(-2.0, 3.0)[None], np.zeros(5)])
    seg_kernel = np.zeros((1, 1, 1, 5))
    seg_kernel[..., 0], seg_kernel[..., EX] = -1.0, 1.0
    model.get_layer(keys.SEG_PROBS).set_weights([seg_kernel, np.array([0.0, -3, -3, 0, -3])])
    return model


def _seg_loss_after_virtual_step(trainer, data, labels):
    """``L_S(f_theta*(x))`` with ``theta* = theta - eps grad_theta L(theta, labels)``: the meta
    loss of Algorithm 1 for given grade labels (computed here independently of the trainer)."""
    x, y = data
    theta = trainer.multitask.trainable_variables
    with tf.GradientTape() as tape:
        out = trainer.multitask(x[keys.IMAGE], training=True)
        seg = losses.categorical_focal_loss(y, out[keys.SEG_PROBS], alpha=0.25, gamma=2.0)
        grade = losses.categorical_focal_loss(labels, out[keys.GRADE_PROBS], alpha=0.25, gamma=2.0)
        inner = tf.reduce_mean(seg + trainer.beta * grade)
    step = tape.gradient(inner, theta)
    fast = [w - trainer.virtual_lr * g for w, g in zip(theta, step)]
    out = stateless_call(trainer.multitask, theta, fast, x[keys.IMAGE], training=True)
    seg = losses.categorical_focal_loss(y, out[keys.SEG_PROBS], alpha=0.25, gamma=2.0)
    return float(tf.reduce_mean(seg))


@pytest.mark.parametrize(
    "allowed, best", [([1, 1, 1, 1, 1], 4), ([1, 1, 1, 0, 0], 2)], ids=["all_grades", "grades_0-2"]
)
def test_label_moves_towards_the_allowed_grade_that_lowers_the_segmentation_loss(allowed, best):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (1, SIZE, SIZE, 3)).astype(np.float32)
    masks = np.zeros((1, SIZE, SIZE, 5), np.uint8)
    masks[:, 4:, :, 2] = 1  # hard exudates on 3/4 of the image (record order MA HE EX SE OD)
    # Stage 1 said grade 0 (no DR): the lesions contradict it.
    allowed = np.array([allowed], np.float32)
    data = make_training_pair(images, masks, [0], allowed)

    trainer = BilevelMultiTaskTrainer(
        _lesion_feature_multitask(),
        build_label_update_net(input_shape=(SIZE, SIZE, 3), widths=(4,), hidden=6),
    )
    trainer.compile(
        model_optimizer=keras.optimizers.SGD(0.0),  # theta fixed: a stationary meta objective
        # Algorithm 1's plain gradient step for theta_1 (Adam would rescale each logit's step).
        label_optimizer=keras.optimizers.SGD(100.0),
        beta=1.0,
        virtual_lr=0.2,
    )
    start = trainer.corrected_grades(data[0]).numpy()
    np.testing.assert_allclose(start[0], _smoothed(0, allowed[0]), atol=1e-6)

    # Which allowed grade lowers the segmentation loss after the virtual step? Computed for
    # each allowed one-hot label: the higher the grade, the lower the loss.
    grades = np.flatnonzero(allowed[0])
    scores = [
        _seg_loss_after_virtual_step(trainer, data, np.eye(5)[grade][None]) for grade in grades
    ]
    assert np.all(np.diff(scores) < 0), scores
    assert int(grades[np.argmin(scores)]) == best

    theta = [w.numpy() for w in trainer.multitask.trainable_variables]
    labels, meta_losses = [start[0]], []
    for _ in range(6):
        meta_losses.append(trainer.train_on_batch(*data, return_dict=True)["meta_loss"])
        labels.append(trainer.corrected_grades(data[0]).numpy()[0])
    labels = np.stack(labels)  # [steps + 1, 5]
    towards = labels[:, best]
    assert np.all(np.diff(towards) >= -1e-6), towards  # never away from it ...
    assert towards[-1] > 0.7 and labels[-1].argmax() == best, labels  # ... and now on it
    assert labels[-1, 0] < 0.1  # the stage-1 grade is left
    assert np.all(labels[:, allowed[0] == 0] == 0.0)  # never a grade outside the allowed set
    # The segmentation loss after the virtual step went down with the label.
    assert np.all(np.diff(meta_losses) <= 1e-7) and meta_losses[-1] < meta_losses[0], meta_losses
    for before, after in zip(theta, trainer.multitask.trainable_variables):
        np.testing.assert_array_equal(before, after.numpy())


# ------------------------------------------------------------ the paper's scales and settings


def test_meta_gradient_moves_the_label_at_the_papers_learning_rates():
    """Caffe-scaled fundus photographs, the paper preset's label network widths, a VGG16-UNet,
    Adam 5e-5 (epsilon 1e-12) for both networks and the virtual step 5e-5 (``PAPER``)."""
    size, steps = 32, 4
    keras.utils.set_random_seed(0)
    photos = [
        synthetic.generate(i, size=size, grade=g, camera="square") for i, g in enumerate([1, 3])
    ]
    raw = np.stack([p.image for p in photos]).astype(np.float32)
    images = normalize(raw, "imagenet_caffe")
    data = make_training_pair(images, np.stack([p.masks for p in photos]), [0, 1])
    net = build_vgg16_unet(
        input_shape=(size, size, 3), num_seg_classes=5, width=1 / 16, grade_pooling="avg"
    )
    # ImageNet weights are calibrated to caffe inputs (0-255 less the mean pixel); the random
    # He-normal stand-in is not: its first layer is scaled down by the spread of caffe inputs
    # over that of [-1, 1] inputs, so its activations have the spread a calibrated network's
    # have (unscaled, the grading head saturated and the meta-gradient was exactly 0).
    spread = float(tf.math.reduce_std(images) / tf.math.reduce_std(normalize(raw, "symmetric")))
    first = net.get_layer("block1_conv1")
    first.kernel.assign(first.kernel / spread)
    label_net = build_label_update_net(input_shape=(size, size, 3), widths=(16, 32, 64), hidden=64)
    trainer = BilevelMultiTaskTrainer(net, label_net)
    trainer.compile(
        model_optimizer=keras.optimizers.Adam(5e-5),
        label_optimizer=keras.optimizers.Adam(5e-5, epsilon=1e-12),
        beta=0.8,
        run_eagerly=True,
    )
    start = trainer.corrected_grades(data[0]).numpy()
    np.testing.assert_allclose(
        start, [_smoothed(0, np.ones(5)), _smoothed(1, np.ones(5))], atol=1e-6
    )
    adam_epsilon = 1e-12
    for _ in range(steps):
        grads = trainer.bilevel_gradients(data)["label_grads"]
        # The meta-gradient is many orders above Adam's epsilon, so each step moves the label
        # network's weights by about the full learning rate (the former design started
        # saturated: about 2e-9 at the paper's size, labels that stayed put or flipped).
        assert max(float(tf.reduce_max(tf.abs(g))) for g in grads) > 1e4 * adam_epsilon
        trainer.train_on_batch(*data)
    moved = np.abs(trainer.corrected_grades(data[0]).numpy() - start).max()
    # Each step moves the labels a little, neither nothing nor a jump: a 100-epoch run of
    # thousands of steps can move them by a grade, a single step cannot.
    assert 2e-5 < moved < 1e-2, moved


# ------------------------------------------------------------------- the experiment's wiring


def test_experiment_gives_the_label_network_its_mask_smoothing_and_meta_weight(
    tmp_path, monkeypatch
):
    import experiments.pldmlt as pldmlt_experiment
    from drkeras.config import resolve_preset

    size = 32
    # Stage 1: image "a" grade 1 with allowed {1}, image "b" grade 2 with allowed {2, 3, 4}.
    allowed_of = {1: np.eye(5)[1], 2: np.array([0.0, 0, 1, 1, 1])}
    labels = pldmlt_experiment._PseudoLabels()
    labels.add(
        ["a", "b"],
        {
            "grades": [1, 2],
            "initial_grades": [1, 2],
            "allowed": np.stack(list(allowed_of.values())),
        },
    )
    source = pldmlt_experiment.SegSource(tmp_path, "train", ("a", "b"))

    def fake_segmentation(records_dir, split, *, ids, repeat=False, **kwargs):
        n = len(ids)
        element = (
            tf.random.uniform([n, size, size, 3]),
            {keys.MASKS: tf.zeros([n, size, size, 5]), keys.MASK_PRESENT: tf.ones([n, 5])},
        )
        ds = tf.data.Dataset.from_tensors(element)
        return ds.repeat() if repeat else ds

    monkeypatch.setattr(pldmlt_experiment.pipeline, "segmentation_dataset", fake_segmentation)

    def run_for(*overrides):
        config = resolve_preset(
            pldmlt_experiment.PLDMLT.presets,
            "smoke",
            [f"data.image_size={size}", "data.augment=false", *overrides],
        )
        return pldmlt_experiment._Run(stand_in_context(config, tmp_path))

    # The default: M of Eq. 4 is every grade (Sec. 3.3.2), so a single allowed stage-1 grade
    # no longer freezes the label; "allowed" restricts M to the stage-1 allowed grades.
    for setting, smoothing in (("all", DEFAULT_SMOOTHING), ("allowed", 0.2)):
        overrides = [] if setting == "all" else [f"method.label_mask={setting}"]
        if smoothing != DEFAULT_SMOOTHING:
            overrides += [f"method.label_smoothing={smoothing}", "method.meta_grade_weight=0.5"]
        run = run_for(*overrides)
        fitted = []
        monkeypatch.setattr(run, "_fit", lambda *args, into=fitted: into.append(args[:2]))
        run.train_pixel_model("Ours", [source], labels, f"ours_{setting}", seed=0, beta=0.8)
        trainer, data = fitted[0]
        assert trainer.meta_grade_weight == (0.0 if setting == "all" else 0.5)
        x, _ = next(iter(data))
        grades = x[PSEUDO_GRADE].numpy().argmax(-1)
        assert set(grades) == {1, 2}
        for grade, mask in zip(grades, x[GRADE_MASK].numpy()):
            want = np.ones(5) if setting == "all" else allowed_of[grade]
            np.testing.assert_array_equal(mask, want)
        assert trainer.label_network.get_layer("label_prior").smoothing == smoothing
        start = trainer.corrected_grades(x).numpy()
        for grade, mask, probs in zip(grades, x[GRADE_MASK].numpy(), start):
            np.testing.assert_allclose(probs, _smoothed(grade, mask, smoothing), atol=1e-6)

    for bad, message in (
        ("method.label_mask=lesions", "method.label_mask"),
        ("method.label_smoothing=0", "method.label_smoothing"),
    ):
        with pytest.raises(ValueError, match=message):
            run_for(bad)
