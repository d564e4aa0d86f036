"""A tiny deterministic experiment on the real runner, for the scale-out tests.

Run as ``python tests/tiny_experiment.py --out DIR [--set method.hang_at_step=10] ...`` (the
resume and multi-worker tests start it as a subprocess) or in-process with ``main(Tiny(), argv)``
(the NaN and mixed-precision tests). Seconds on a CPU. Two stages, each exercising one kind of
training:

1. ``pretrain``: a compiled Keras MLP (Dense - Dropout - Dense, Adam, an ``accuracy`` metric)
   trained by ``fit`` on a finite, reshuffled dataset;
2. ``joint``: :class:`TwoOptimizerTrainer`, a custom ``train_step`` with two optimizers (Adam for
   the classifier, which starts from the pretrained encoder, and SGD with momentum for an
   auxiliary regressor), losses reduced over the global batch.

Writes ``weights.npz`` (every model weight, and every optimizer variable of the last stage, in
a fixed order) to the run directory, and a one-row results table. The pretrain stage's optimizer
is left out: a finished stage keeps only its weights, so a resumed run never restores it.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.config import Config, DataConfig, OptimizerConfig, TrainConfig
from drkeras.experiment import Experiment, main
from drkeras.models.pldmlt import make_training_pair
from drkeras.results import ResultsTable
from drkeras.stages import Data, Net, Stage
from drkeras.training.checkpoint import optimizers_of
from drkeras.training.optim import build_optimizer

FEATURES = 8


@dataclasses.dataclass(frozen=True)
class TinyMethod:
    """``nan_at_step``: the joint stage's batch (0-based, global) whose inputs become inf;
    ``hang_at_step``: the joint stage hangs before this batch, once per run directory, so a
    test can kill it at a known point."""

    samples: int = 64
    pretrain_epochs: int = 2
    dropout: float = 0.25
    nan_at_step: int = -1
    hang_at_step: int = -1
    checkpoint_steps: int = 2


class TwoOptimizerTrainer(keras.Model):
    """Test trainer: ``classifier`` (binary cross-entropy, ``c_optimizer``) and ``regressor``
    (squared error on the feature sum, ``r_optimizer``), one tape per optimizer."""

    def __init__(self, classifier, regressor, name="two_optimizer_trainer"):
        super().__init__(name=name)
        self.classifier = classifier
        self.regressor = regressor
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.reg_loss_tracker = keras.metrics.Mean(name="reg_loss")

    @property
    def metrics(self):
        return [self.loss_tracker, self.reg_loss_tracker]

    def compile(self, *, c_optimizer, r_optimizer, **kwargs):
        super().compile(optimizer=c_optimizer, **kwargs)
        self.c_optimizer = c_optimizer
        self.r_optimizer = r_optimizer

    def call(self, x, training=False):
        return self.classifier(x, training=training)

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        context = tf.distribute.get_replica_context()
        global_batch = tf.shape(x)[0] * context.num_replicas_in_sync
        target = tf.reduce_sum(x, axis=-1, keepdims=True)
        with tf.GradientTape() as c_tape:
            prob = tf.cast(self.classifier(x, training=True), tf.float32)
            per_example = keras.losses.binary_crossentropy(y[:, None], prob)
            c_loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch)
        c_vars = self.classifier.trainable_variables
        self.c_optimizer.apply_gradients(zip(c_tape.gradient(c_loss, c_vars), c_vars))
        with tf.GradientTape() as r_tape:
            pred = tf.cast(self.regressor(x, training=True), tf.float32)
            r_per_example = tf.reduce_mean(tf.square(pred - target), axis=-1)
            r_loss = tf.nn.compute_average_loss(r_per_example, global_batch_size=global_batch)
        r_vars = self.regressor.trainable_variables
        self.r_optimizer.apply_gradients(zip(r_tape.gradient(r_loss, r_vars), r_vars))
        self.loss_tracker.update_state(per_example)
        self.reg_loss_tracker.update_state(r_per_example)
        return {m.name: m.result() for m in self.metrics}


def build_tiny_multitask(size: int = 16) -> keras.Model:
    """A small stand-in for PLDMLT's VGG16-UNet: dict outputs ``seg_probs`` (5 classes) and
    ``grade_probs``; twice differentiable (no nearest upsampling) for the bilevel trainer."""
    image = keras.Input((size, size, 3), name=keys.IMAGE)
    x = keras.layers.Conv2D(4, 3, padding="same", activation="tanh", name="enc")(image)
    pooled = keras.layers.AveragePooling2D(2, name="enc_pool")(x)
    grade = keras.layers.GlobalAveragePooling2D(name="grade_pool")(pooled)
    grade = keras.layers.Dense(5, name="grade_logits")(grade)
    grade = keras.layers.Activation("softmax", dtype="float32", name=keys.GRADE_PROBS)(grade)
    up = keras.layers.Conv2DTranspose(4, 3, strides=2, padding="same", name="dec_up")(pooled)
    seg = keras.layers.Concatenate(name="dec_concat")([up, x])
    seg = keras.layers.Conv2D(5, 1, name="seg_logits")(seg)
    seg = keras.layers.Activation("softmax", dtype="float32", name=keys.SEG_PROBS)(seg)
    return keras.Model(image, {keys.SEG_PROBS: seg, keys.GRADE_PROBS: grade}, name="tiny_mt")


def bilevel_data(rng, n: int = 8, size: int = 16):
    """``(x, y)`` for the bilevel trainer: images, one lesion square each, random grades."""
    masks = np.zeros((n, size, size, 5), np.uint8)
    for i in range(n):
        r, c = rng.integers(0, size - 4, 2)
        masks[i, r : r + 4, c : c + 4, i % 4] = 1
    images = rng.uniform(0, 1, (n, size, size, 3)).astype("float32")
    return make_training_pair(images, masks, rng.integers(0, 5, n))


class Hang(keras.callbacks.Callback):
    """Hang before the stage's global batch ``step`` (after the checkpoint of the previous one),
    the first time only: ``marker`` records that it happened."""

    def __init__(self, step, marker):
        super().__init__()
        self.step, self.marker = step, marker
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if self.epoch * self.params["steps"] + batch == self.step and not self.marker.exists():
            self.marker.touch()
            time.sleep(3600)


def make_data(seed: int, samples: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, FEATURES)).astype("float32")
    y = (x[:, :4].sum(axis=1) > x[:, 4:].sum(axis=1)).astype("float32")
    return x, y


def build_mlp(dropout: float, name: str) -> keras.Model:
    inputs = keras.Input((FEATURES,), name=f"{name}_x")
    hidden = keras.layers.Dense(16, activation="relu", name=f"{name}_dense")(inputs)
    hidden = keras.layers.Dropout(dropout, name=f"{name}_dropout")(hidden)
    out = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=f"{name}_out")(hidden)
    return keras.Model(inputs, out, name=name)


def weights_of(*models, optimizers_from=()) -> dict:
    """Every weight of ``models`` and every optimizer variable of ``optimizers_from``, keyed in a
    fixed order."""
    out = {}
    for m, model in enumerate(models):
        for i, w in enumerate(model.weights):
            out[f"m{m}_w{i}"] = w.numpy()
        if model not in optimizers_from:
            continue
        for name, opt in sorted(optimizers_of(model).items()):
            for i, v in enumerate(opt.variables):
                out[f"m{m}_{name}_v{i}"] = v.numpy()
    return out


class Tiny(Experiment):
    name = "tiny"
    title = "Tiny two-stage experiment (tests)"
    presets = {
        "smoke": Config(
            method=TinyMethod(),
            data=DataConfig(batch_size=8),
            optimizers={
                "model": OptimizerConfig(name="adam", learning_rate=0.02),
                "regressor": OptimizerConfig(name="sgd", learning_rate=0.02, momentum=0.9),
            },
            train=TrainConfig(epochs=3, verbose=0),
        )
    }

    def prepare(self, ctx):
        return _TinyRun(ctx)


class _TinyRun:
    """Two declared stages: ``pretrain`` (Keras fit) and ``joint`` (a two-optimizer trainer
    starting from the pretrained weights)."""

    def __init__(self, ctx):
        self.ctx = ctx
        cfg, method = ctx.config, ctx.config.method
        self.x, self.y = make_data(cfg.seed, method.samples)
        self.table = ResultsTable("tiny", "Tiny", ["loss"], paper={"joint": {"loss": 0.0}})

    def _dataset(self, cache):
        # One pipeline per stage: reshuffling draws from state shared by every use of a
        # dataset object (see RunContext.fit).
        cfg, method = self.ctx.config, self.ctx.config.method
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        return (
            tf.data.Dataset.from_tensor_slices((self.x, self.y))
            .shuffle(method.samples, seed=cfg.seed, reshuffle_each_iteration=True)
            .batch(cfg.data.batch_size, drop_remainder=True)
            .with_options(options)
        )

    def stages(self):
        cfg, method = self.ctx.config, self.ctx.config.method
        batch = cfg.data.batch_size
        steps = method.samples // batch

        def data(key):
            return Data(key, self._dataset, examples=method.samples, size=1, batch=batch,
                        cached=False, train=True)  # fmt: skip

        return [
            Stage(
                "pretrain",
                run=self.pretrain,
                nets=[Net("mlp", lambda: build_mlp(method.dropout, "mlp"))],
                data=[data("pretrain")],
                steps=steps,
                epochs=method.pretrain_epochs,
                batch=batch,
            ),
            Stage(
                "joint",
                run=self.joint,
                nets=[
                    Net("mlp", lambda: build_mlp(method.dropout, "mlp")),
                    Net("regressor", lambda: build_mlp(0.0, "regressor"), optimizer="sgd"),
                ],
                data=[data("joint")],
                steps=steps,
                epochs=cfg.train.epochs,
                batch=batch,
                consumes=["pretrain"],
            ),
        ]

    def pretrain(self, inputs):
        ctx, cfg, method = self.ctx, self.ctx.config, self.ctx.config.method
        with ctx.strategy.scope():
            mlp = build_mlp(method.dropout, "mlp")
            mlp.compile(
                optimizer=build_optimizer(cfg.optimizers["model"]),
                loss="binary_crossentropy",
                metrics=["accuracy"],
            )
        ctx.fit(
            mlp,
            ctx.data("pretrain"),
            epochs=method.pretrain_epochs,
            checkpoint_steps=method.checkpoint_steps,
        )
        return mlp

    def joint(self, inputs):
        ctx, cfg, method = self.ctx, self.ctx.config, self.ctx.config.method
        mlp = inputs["pretrain"]
        nan_at = method.nan_at_step

        def poison(index, batch):
            bx, by = batch
            bx = tf.where(index == nan_at, bx * np.inf, bx)
            return bx, by

        data = ctx.data("joint")
        joint_data = data.repeat().enumerate().map(poison).with_options(data.options())
        with ctx.strategy.scope():
            classifier = build_mlp(method.dropout, "classifier")
            classifier.set_weights(mlp.get_weights())
            regressor = build_mlp(0.0, "regressor")
            trainer = TwoOptimizerTrainer(classifier, regressor)
            trainer.compile(
                c_optimizer=build_optimizer(cfg.optimizers["model"]),
                r_optimizer=build_optimizer(cfg.optimizers["regressor"]),
            )
        hang = Hang(method.hang_at_step, ctx.out_dir / "hung_once")
        history = ctx.fit(
            trainer,
            joint_data,
            steps_per_epoch=method.samples // cfg.data.batch_size,
            callbacks=[hang] if method.hang_at_step >= 0 else [],
            checkpoint_steps=method.checkpoint_steps,
        )
        weights = weights_of(mlp, trainer, optimizers_from=(trainer,))
        np.savez(ctx.out_dir / "weights.npz", **weights)
        self.table.add("joint", "loss", float(history.history["loss"][-1]))

    def report(self):
        return [self.table]


if __name__ == "__main__":
    raise SystemExit(main(Tiny()))
