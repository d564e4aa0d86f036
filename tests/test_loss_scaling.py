"""Dynamic loss scaling in every optimizer of every custom trainer (``train.mixed_precision``).

Under ``mixed_float16`` each trainer's ``compile`` wraps every optimizer it is given in a
``LossScaleOptimizer`` (:func:`drkeras.training.distribute.loss_scale_optimizer`), and each
``train_step`` scales the loss it differentiates by its own optimizer's scale and unscales the
gradients. Per trainer these tests check:

- every optimizer the trainer holds (:func:`drkeras.training.checkpoint.optimizers_of`) is a
  ``LossScaleOptimizer`` and the networks compute in float16;
- one float16 step gives finite logs and finite, non-zero updates of every network;
- with a loss scale of 2**40 (float16 gradients overflow) every optimizer skips its update and
  halves its scale: proof that the step differentiates the loss scaled by THAT optimizer (an
  unscaled step would update the weights and leave the scale alone).

The bilevel trainer's version (also compared with float32) is in tests/test_mixed_precision.py;
it is repeated here in the same form so the five trainers are checked alike. CPUs run float16
kernels, so these tests need no GPU.
"""

import numpy as np
import pytest
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.data.pipeline import CLS_IMAGE, MASK_VALID, SEG_IMAGE
from drkeras.models import ssl_gan as ssl_nets
from drkeras.models.collaborative import (
    build_base_grader,
    build_discriminator,
    build_lesion_attentive_grader,
    build_xception_unet,
)
from drkeras.models.cooperative import build_cooperative_model
from drkeras.models.pldmlt import build_label_update_net
from drkeras.training.adversarial import CollaborativeTrainer, GeneratorPretrainer
from drkeras.training.bilevel import BilevelMultiTaskTrainer
from drkeras.training.checkpoint import optimizers_of
from drkeras.training.cooperative import SEG_TARGET, CooperativeTrainer
from drkeras.training.ssl_gan import LABELED, UNLABELED, PatchSSLGANTrainer

LSO = keras.mixed_precision.LossScaleOptimizer
OVERFLOW = 2.0**40
STEPS = 6


def _sgd(scale=None):
    sgd = keras.optimizers.SGD(0.05)
    return sgd if scale is None else LSO(sgd, initial_scale=scale)


def _mixed(build):
    """``build()`` under the global ``mixed_float16`` policy (restored afterwards)."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        return build()
    finally:
        keras.mixed_precision.set_global_policy(None)


# ----------------------------------------------------------------------------- the trainers


def _bilevel(scale):
    from tiny_experiment import bilevel_data, build_tiny_multitask

    trainer = BilevelMultiTaskTrainer(
        _mixed(build_tiny_multitask),
        _mixed(lambda: build_label_update_net(input_shape=(16, 16, 3), widths=(4,), hidden=6)),
    )
    trainer.compile(
        model_optimizer=_sgd(scale), label_optimizer=_sgd(scale), virtual_lr=0.5, run_eagerly=True
    )
    data = bilevel_data(np.random.default_rng(0))
    return trainer, data, [trainer.multitask]


SIZE, LESIONS = 32, 2


def _collaborative_batch():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (4, SIZE, SIZE, 3)).astype(np.float32)
    masks = np.zeros((4, SIZE, SIZE, LESIONS), np.float32)
    masks[0, 4:10, 4:10, 0] = masks[1, 12:20, 8:14, 1] = 1.0
    image[masks[..., 0] + masks[..., 1] > 0] = 1.0
    valid = np.array([1, 1, 0, 0], np.float32)
    return image, {
        keys.MASKS: masks,
        keys.MASK_PRESENT: np.repeat(valid[:, None], LESIONS, axis=1),
        MASK_VALID: valid,
        keys.GRADE: np.array([-1, -1, 2, 0], np.int32),
    }


def _generator():
    return build_xception_unet(
        input_shape=(SIZE, SIZE, 3), num_lesions=LESIONS, width=1 / 8, sync_batchnorm=False
    )


def _generator_pretrainer(scale):
    generator = _mixed(_generator)
    trainer = GeneratorPretrainer(generator)
    trainer.compile(g_optimizer=_sgd(scale), run_eagerly=True)
    image, y = _collaborative_batch()
    data = (image[:2], {keys.MASKS: y[keys.MASKS][:2], keys.MASK_PRESENT: y[keys.MASK_PRESENT][:2]})
    return trainer, data, [generator]


def _collaborative(scale):
    def build():
        base = build_base_grader(input_shape=(SIZE, SIZE, 3), width=1 / 8, sync_batchnorm=False)
        grader = build_lesion_attentive_grader(base, num_lesions=LESIONS, width=1 / 8)
        discriminator = build_discriminator(
            input_shape=(SIZE, SIZE, 3), num_lesions=LESIONS, width=1 / 8, sync_batchnorm=False
        )
        return _generator(), grader, discriminator

    generator, grader, discriminator = _mixed(build)
    trainer = CollaborativeTrainer(generator, grader, discriminator)
    trainer.compile(
        g_optimizer=_sgd(scale), c_optimizer=_sgd(scale), d_optimizer=_sgd(scale), run_eagerly=True
    )
    return trainer, _collaborative_batch(), [generator, grader, discriminator]


def _cooperative(scale):
    network = _mixed(
        lambda: build_cooperative_model(
            input_shape=(16, 16, 3),
            num_seg_classes=3,
            encoder_widths=(4,),
            encoder_blocks=1,
            classifier_widths=(8,),
            classifier_blocks=1,
        )
    )
    trainer = CooperativeTrainer.from_model(network)
    trainer.compile(clf_optimizer=_sgd(scale), seg_optimizer=_sgd(scale), run_eagerly=True)
    rng = np.random.default_rng(0)
    classes = np.zeros((2, 16, 16), np.int64)
    classes[0, 2:8, 2:8], classes[1, 8:14, 6:12] = 1, 2
    x = {
        SEG_IMAGE: rng.normal(0, 1, (2, 16, 16, 3)).astype(np.float32),
        CLS_IMAGE: rng.normal(0, 1, (4, 16, 16, 3)).astype(np.float32),
    }
    y = {SEG_TARGET: np.eye(3, dtype=np.float32)[classes], keys.GRADE: np.array([0, 1, 2, 4])}
    return trainer, (x, y), [trainer.encoder, trainer.classifier, trainer.segmenter]


def _ssl_gan(scale):
    def build():
        def disc(name):
            return ssl_nets.build_discriminator(
                input_shape=(32, 32, 3), width=1 / 16, input_dropout=0.0, dropout=0.0, name=name
            )

        return disc("d"), ssl_nets.build_generator(width=1 / 32), disc("d_ema")

    d, g, ema = _mixed(build)
    trainer = PatchSSLGANTrainer(d, g, ema_discriminator=ema, noise_seed=3)
    trainer.compile(d_optimizer=_sgd(scale), g_optimizer=_sgd(scale), run_eagerly=True)
    rng = np.random.default_rng(0)
    patches = rng.uniform(0, 0.5, (8, 32, 32, 3)).astype(np.float32)
    patches[::2, 8:20, 8:20, 0] = 1.0
    trainer.initialize(rng.uniform(0, 1, (16, 32, 32, 3)).astype(np.float32))
    x = {LABELED: patches, UNLABELED: patches[::-1].copy()}
    return trainer, (x, np.arange(8, dtype=np.int32) % 2), [d, g]


TRAINERS = {
    "bilevel": _bilevel,
    "generator_pretrainer": _generator_pretrainer,
    "collaborative": _collaborative,
    "cooperative": _cooperative,
    "ssl_gan": _ssl_gan,
}


def _step(trainer, data):
    """One training step through ``fit`` (the cooperative trainer's two streams have different
    batch sizes, which ``train_on_batch`` refuses); returns the logs."""
    history = trainer.fit(tf.data.Dataset.from_tensors(data), epochs=1, verbose=0)
    return {k: v[-1] for k, v in history.history.items()}


def _values(networks):
    return [v.numpy().copy() for n in networks for v in n.trainable_variables]


def _moved_share(networks, before):
    """Per network, the share of its trainable variables that differ from ``before``."""
    share, start = {}, 0
    for network in networks:
        count = len(network.trainable_variables)
        now = [v.numpy() for v in network.trainable_variables]
        moved = [not np.array_equal(b, a) for b, a in zip(before[start : start + count], now)]
        share[network.name] = sum(moved) / count
        start += count
    return share


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_optimizer_is_loss_scaled_and_a_float16_step_updates(name):
    trainer, data, networks = TRAINERS[name](None)
    assert any(
        layer.compute_dtype == "float16" for n in networks for layer in n.layers if layer.weights
    )
    optimizers = optimizers_of(trainer)
    assert len(optimizers) >= 2  # Keras' `optimizer` plus the trainer's own
    for attr, optimizer in optimizers.items():
        assert isinstance(optimizer, LSO), f"{name}.{attr} is {type(optimizer).__name__}"
    assert trainer.optimizer in [o for a, o in optimizers.items() if a != "optimizer"]

    # Dynamic loss scaling starts at 2**15 and halves on every step whose float16 gradients
    # overflow (skipped); up to STEPS steps let every optimizer reach a scale that fits.
    before = _values(networks)
    for _ in range(STEPS):
        logs = _step(trainer, data)
        assert logs and all(np.isfinite(v) for v in logs.values()), logs
        moved = _moved_share(networks, before)
        if min(moved.values()) >= 0.75:
            break
    assert all(np.isfinite(a).all() for a in _values(networks))
    # every network moves (finite, non-zero updates), and most of its variables
    assert min(moved.values()) >= 0.75, f"{name}: share of variables moved {moved}"
    for attr, optimizer in optimizers.items():
        assert 2.0 ** (15 - STEPS) <= float(optimizer.loss_scale) <= 2.0**15, attr


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_overflowing_float16_gradients_skip_every_optimizer_step(name):
    trainer, data, networks = TRAINERS[name](OVERFLOW)
    before = _values(networks)
    logs = _step(trainer, data)
    # The logged training losses are unscaled and finite. (The bilevel meta loss is evaluated
    # after a virtual step along the overflowed gradients, so it is not finite in a skipped step.)
    assert all(np.isfinite(v) for k, v in logs.items() if k != "meta_loss"), logs
    for b, a in zip(before, _values(networks)):
        np.testing.assert_array_equal(a, b)
    for attr, optimizer in optimizers_of(trainer).items():
        assert float(optimizer.loss_scale) == OVERFLOW / 2, attr


@pytest.fixture(autouse=True)
def _default_policy():
    yield
    keras.mixed_precision.set_global_policy(None)
