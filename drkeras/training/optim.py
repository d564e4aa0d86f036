"""Optimizers and learning-rate schedules built from :class:`drkeras.config.OptimizerConfig`."""

from __future__ import annotations

import tensorflow as tf

from drkeras.config import OptimizerConfig


class HoldThenLinearDecay(tf.keras.optimizers.schedules.LearningRateSchedule):
    """Constant ``initial`` for ``hold_steps`` steps, then linear decay to zero at ``total_steps``.

    The schedule of Lecouat et al. 2018 (learning rate decayed linearly to zero after 1000 of
    1200 epochs). Example: ``HoldThenLinearDecay(3e-4, hold_steps=1000, total_steps=1200)``.
    """

    def __init__(self, initial: float, hold_steps: int, total_steps: int):
        if total_steps <= hold_steps:
            raise ValueError(f"decay_steps ({total_steps}) must exceed hold_steps ({hold_steps})")
        self.initial = float(initial)
        self.hold_steps = int(hold_steps)
        self.total_steps = int(total_steps)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        span = float(self.total_steps - self.hold_steps)
        fraction = tf.clip_by_value((step - self.hold_steps) / span, 0.0, 1.0)
        return self.initial * (1.0 - fraction)

    def get_config(self):
        return {
            "initial": self.initial,
            "hold_steps": self.hold_steps,
            "total_steps": self.total_steps,
        }


def learning_rate(cfg: OptimizerConfig):
    """The learning rate (a float or a schedule) that ``cfg.schedule`` describes."""
    if cfg.schedule == "constant":
        return cfg.learning_rate
    if cfg.decay_steps <= 0:
        raise ValueError(f"schedule {cfg.schedule!r} needs decay_steps > 0")
    if cfg.schedule == "polynomial":
        return tf.keras.optimizers.schedules.PolynomialDecay(
            cfg.learning_rate, cfg.decay_steps, cfg.end_learning_rate, power=cfg.power
        )
    if cfg.schedule == "linear_to_zero":
        return HoldThenLinearDecay(cfg.learning_rate, cfg.hold_steps, cfg.decay_steps)
    raise ValueError(
        f"unknown schedule {cfg.schedule!r}; choose constant, polynomial or linear_to_zero"
    )


def build_optimizer(cfg: OptimizerConfig) -> tf.keras.optimizers.Optimizer:
    """A Keras optimizer for ``cfg`` (build it inside ``strategy.scope()``).

    Example::

        opt = build_optimizer(OptimizerConfig(name="sgd", learning_rate=0.01, momentum=0.9,
                                              nesterov=True))
    """
    extra = {"clipnorm": cfg.clipnorm} if cfg.clipnorm > 0 else {}
    lr = learning_rate(cfg)
    if cfg.name == "adam":
        return tf.keras.optimizers.Adam(
            lr, beta_1=cfg.beta_1, beta_2=cfg.beta_2, epsilon=cfg.epsilon, **extra
        )
    if cfg.name == "sgd":
        return tf.keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **extra)
    if cfg.name == "rmsprop":
        return tf.keras.optimizers.RMSprop(lr, momentum=cfg.momentum, epsilon=cfg.epsilon, **extra)
    raise ValueError(f"unknown optimizer {cfg.name!r}; choose adam, sgd or rmsprop")
