"""Cooperative learning of segmentation and classification: two agents, two optimizers.

The paper ("Joint cooperative end-to-end learning for deep convolutional semantic
segmentation", section II-A and III "Training procedure") trains a classifier agent ``C`` and a
segmentation agent ``S`` that share the encoder ``M`` (:mod:`drkeras.models.cooperative`). Each
agent has its own optimizer (Nesterov momentum, polynomial learning-rate policy); "the shared
parameters of the agents are learned by both of the agents at a different rate", the
classifier's learning rate being 30 times the segmenter's, its batch 32 times larger.

How the shared encoder is updated: in one step both agents compute their gradients at the same
parameters ``(theta_1, theta_2, theta_3)``; the classifier optimizer then applies
``grad_{theta_1, theta_2} J_clf`` to ``M`` and ``C``, the segmentation optimizer
``grad_{theta_1, theta_3} J_seg`` to ``M`` and ``S``. ``M``'s variables thus receive both updates
within the step, each scaled by its own optimizer's learning rate and momentum (each optimizer
keeps its own momentum slot for them); with plain SGD the encoder moves by
``-(lr_clf grad J_clf + lr_seg grad J_seg)``. Neither agent's output feeds the other: they
interact only through ``M``.

:func:`agent_optimizers` builds the two optimizers from ONE configuration (the segmenter's) and
the learning-rate ratio, so the ratio holds at every step of the shared polynomial schedule.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import tensorflow as tf
from tensorflow import keras

from drkeras import keys, losses
from drkeras.config import OptimizerConfig
from drkeras.data.pipeline import CLS_IMAGE, SEG_IMAGE
from drkeras.models.cooperative import ENCODER_OUTPUT, cooperative_agents
from drkeras.training import distribute
from drkeras.training.optim import build_optimizer

__all__ = ["SEG_TARGET", "CooperativeTrainer", "agent_optimizer_configs", "agent_optimizers"]

# Target key of the segmentation stream: one-hot pixel classes [B, H, W, K] (or ids [B, H, W]).
SEG_TARGET = keys.SEG_PROBS


def agent_optimizer_configs(
    seg_config: OptimizerConfig, lr_ratio: float
) -> Tuple[OptimizerConfig, OptimizerConfig]:
    """``(classifier, segmenter)`` optimizer configurations: the classifier's is the
    segmenter's with the initial and final learning rates times ``lr_ratio`` (30 in the paper).

    Example::

        >>> seg = OptimizerConfig(name="sgd", learning_rate=1e-3, momentum=0.9, nesterov=True)
        >>> agent_optimizer_configs(seg, 30.0)[0].learning_rate
        0.03
    """
    if not lr_ratio > 0:
        raise ValueError(f"lr_ratio must be > 0, got {lr_ratio}")
    clf = dataclasses.replace(
        seg_config,
        learning_rate=round(seg_config.learning_rate * lr_ratio, 12),
        end_learning_rate=round(seg_config.end_learning_rate * lr_ratio, 12),
    )
    return clf, seg_config


def agent_optimizers(seg_config: OptimizerConfig, lr_ratio: float):
    """``(clf_optimizer, seg_optimizer)`` built from :func:`agent_optimizer_configs` (build
    them inside ``strategy.scope()``).

    Example::

        clf_opt, seg_opt = agent_optimizers(
            OptimizerConfig(name="sgd", learning_rate=1e-3, momentum=0.9, nesterov=True,
                            schedule="polynomial", decay_steps=10000, power=0.9), 30.0)
    """
    clf, seg = agent_optimizer_configs(seg_config, lr_ratio)
    return build_optimizer(clf), build_optimizer(seg)


class CooperativeTrainer(keras.Model):
    """Cooperative joint segmentation and classification learning (section II-A, Eq. 1-2).

    Receives the shared encoder ``M`` (:func:`~drkeras.models.cooperative.build_shared_encoder`,
    dict outputs ``encoder_output`` and ``encoder_level{i}``), the classifier agent ``C`` (input
    ``encoder_output``, outputs ``grade_logits``/``grade_probs``) and the segmentation agent ``S``
    (input: the encoder's dict, outputs ``lesion_logits``/``seg_probs``).

    Each ``train_step``, on ``x = {"seg_image": [B, H, W, 3], "cls_image": [kB, H, W, 3]}`` (two
    streams, the classifier's k times larger, :func:`drkeras.data.pipeline.two_stream_dataset`)
    and ``y = {"seg_probs": one-hot pixel classes [B, H, W, K] (or ids [B, H, W]),
    "grade": [kB]}``, runs:

    1. Classifier agent, Eq. 1: ``y_clf = C(M(x_cls))``; Eq. 2:
       ``J_clf = Cost(y_clf, y_label_clf)``, softmax cross-entropy averaged over the GLOBAL
       classifier batch; its gradient w.r.t. ``theta_1 u theta_2`` (``M`` and ``C``), tape 1.
    2. Segmentation agent, Eq. 1: ``y_seg = S(M(x_seg))``; Eq. 2:
       ``J_seg = Cost(y_seg, y_label_seg)``, pixel-wise softmax cross-entropy (mean over pixels,
       then over the GLOBAL segmentation batch); its gradient w.r.t. ``theta_1 u theta_3``
       (``M`` and ``S``), tape 2. Both gradients are taken at the same parameters.
    3. ``clf_optimizer`` applies step 1's gradient to ``M`` and ``C``.
    4. ``seg_optimizer`` applies step 2's gradient to ``M`` and ``S``: the shared encoder is
       "learned by both of the agents at a different rate".

    The agents exchange nothing but ``M``'s parameters (no tensor of one enters the other's
    loss), so there is nothing to stop gradients on. Batch normalisation in ``M`` sees both
    streams, and its moving statistics are updated by both forward passes.

    Logs: ``loss`` (``J_clf + J_seg``), ``seg_loss`` (``J_seg``), ``grade_loss`` (``J_clf``),
    unscaled means. ``evaluate`` reports the same on held-out pairs. ``call`` is the joint
    inference path ``image -> {grade_logits, grade_probs, lesion_logits, seg_probs}``.

    Args:
        encoder, classifier, segmenter: ``M``, ``C``, ``S``.
        name: model name.

    Example::

        with strategy.scope():
            joint = build_cooperative_model(input_shape=(224, 224, 3), num_seg_classes=5)
            trainer = CooperativeTrainer(*cooperative_agents(joint))
            clf_opt, seg_opt = agent_optimizers(seg_optimizer_config, lr_ratio=30.0)
            trainer.compile(clf_optimizer=clf_opt, seg_optimizer=seg_opt)
        trainer.fit(two_stream_pairs, steps_per_epoch=1000, epochs=50)
    """

    def __init__(
        self,
        encoder: keras.Model,
        classifier: keras.Model,
        segmenter: keras.Model,
        *,
        name: str = "cooperative_trainer",
    ):
        super().__init__(name=name)
        if not isinstance(encoder.output, dict) or ENCODER_OUTPUT not in encoder.output:
            raise ValueError(
                f"encoder {encoder.name!r} must have dict outputs including {ENCODER_OUTPUT!r} "
                "(build it with drkeras.models.cooperative.build_shared_encoder)"
            )
        for model, wanted in (
            (classifier, keys.GRADE_LOGITS),
            (segmenter, keys.LESION_LOGITS),
        ):
            if not isinstance(model.output, dict) or wanted not in model.output:
                raise ValueError(f"{model.name!r} must have the dict output {wanted!r}")
        self.encoder = encoder
        self.classifier = classifier
        self.segmenter = segmenter
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.seg_loss_tracker = keras.metrics.Mean(name="seg_loss")
        self.grade_loss_tracker = keras.metrics.Mean(name="grade_loss")

    @classmethod
    def from_model(cls, model: keras.Model, **kwargs) -> CooperativeTrainer:
        """The trainer of a :func:`~drkeras.models.cooperative.build_cooperative_model` network
        (its agents, so training it trains ``model``)."""
        return cls(*cooperative_agents(model), **kwargs)

    @property
    def metrics(self):
        return [self.loss_tracker, self.seg_loss_tracker, self.grade_loss_tracker]

    @property
    def clf_variables(self):
        """``theta_1 u theta_2``: what the classifier optimizer updates."""
        return self.encoder.trainable_variables + self.classifier.trainable_variables

    @property
    def seg_variables(self):
        """``theta_1 u theta_3``: what the segmentation optimizer updates."""
        return self.encoder.trainable_variables + self.segmenter.trainable_variables

    def compile(
        self,
        *,
        clf_optimizer: keras.optimizers.Optimizer,
        seg_optimizer: keras.optimizers.Optimizer,
        **kwargs,
    ):
        """Set the two agents' optimizers (build them with :func:`agent_optimizers`).

        Args:
            clf_optimizer: updates ``M`` and ``C`` (the larger learning rate).
            seg_optimizer: updates ``M`` and ``S``. Under ``mixed_float16`` both are wrapped in
                a ``LossScaleOptimizer``.
            **kwargs: passed to ``keras.Model.compile`` (``run_eagerly``, ``jit_compile``);
                ``optimizer``, ``loss``, ``loss_weights`` and ``metrics`` are refused.
        """
        for ambiguous in ("optimizer", "loss", "loss_weights", "metrics"):
            if ambiguous in kwargs:
                raise TypeError(
                    "CooperativeTrainer.compile() takes clf_optimizer= and seg_optimizer=; "
                    f"{ambiguous}= is ambiguous here"
                )
        policy = self.encoder.dtype_policy
        clf_optimizer = distribute.loss_scale_optimizer(clf_optimizer, policy)
        seg_optimizer = distribute.loss_scale_optimizer(seg_optimizer, policy)
        # The classifier optimizer doubles as Keras' `optimizer` (learning-rate callbacks).
        super().compile(optimizer=clf_optimizer, **kwargs)
        self.clf_optimizer = clf_optimizer
        self.seg_optimizer = seg_optimizer

    def call(self, inputs, training=False):
        """Joint inference: ``inputs`` is an image batch (or ``{"image": ...}``)."""
        image = inputs[keys.IMAGE] if isinstance(inputs, dict) else inputs
        features = self.encoder(image, training=training)
        outputs = dict(self.classifier(features[ENCODER_OUTPUT], training=training))
        outputs.update(self.segmenter(features, training=training))
        return outputs

    def _unpack(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError(f"{self.name} does not take sample weights")
        if not isinstance(x, dict) or not {SEG_IMAGE, CLS_IMAGE} <= set(x):
            found = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(
                f"{self.name} expects x = {{{SEG_IMAGE!r}: [B, H, W, 3], {CLS_IMAGE!r}: "
                f"[kB, H, W, 3]}} (drkeras.data.pipeline.two_stream_dataset), got {found}"
            )
        if not isinstance(y, dict) or not {SEG_TARGET, keys.GRADE} <= set(y):
            found = sorted(y) if isinstance(y, dict) else type(y).__name__
            raise ValueError(
                f"{self.name} expects y = {{{SEG_TARGET!r}: one-hot pixel classes [B, H, W, K] "
                f"or class ids [B, H, W], {keys.GRADE!r}: int [kB]}}, got {found}"
            )
        return x[SEG_IMAGE], x[CLS_IMAGE], y[SEG_TARGET], y[keys.GRADE]

    def _grade_loss(self, images, grade, training: bool):
        """Per-example softmax cross-entropy of ``C(M(images))`` (Eq. 2, ``J_clf``)."""
        features = self.encoder(images, training=training)
        logits = self.classifier(features[ENCODER_OUTPUT], training=training)[keys.GRADE_LOGITS]
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(tf.reshape(grade, [-1]), tf.int32), logits=tf.cast(logits, tf.float32)
        )

    def _seg_loss(self, images, seg_target, training: bool):
        """Per-example pixel-wise softmax cross-entropy of ``S(M(images))`` (Eq. 2, ``J_seg``),
        the mean over pixels."""
        features = self.encoder(images, training=training)
        logits = tf.cast(
            self.segmenter(features, training=training)[keys.LESION_LOGITS], tf.float32
        )
        target = tf.convert_to_tensor(seg_target)
        if target.shape.rank == logits.shape.rank - 1:
            target = tf.one_hot(tf.cast(target, tf.int32), tf.shape(logits)[-1])
        if target.shape[-1] is not None and target.shape[-1] != logits.shape[-1]:
            raise ValueError(
                f"{self.name}: segmentation targets have {target.shape[-1]} classes, the "
                f"segmentation agent predicts {logits.shape[-1]}"
            )
        return losses.categorical_crossentropy(
            tf.cast(target, tf.float32), logits, from_logits=True
        )

    def agent_gradients(self, data) -> Dict[str, object]:
        """Steps 1-2 without applying anything.

        Returns ``{"clf_grads"`` (aligned with :attr:`clf_variables`), ``"seg_grads"``
        (aligned with :attr:`seg_variables`), ``"grade"``, ``"seg"`` (per-example losses),
        ``"clf_scaled"``, ``"seg_scaled"`` (the losses that were differentiated)``}``.
        """
        seg_image, cls_image, seg_target, grade = self._unpack(data)
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        cls_global = tf.shape(cls_image)[0] * replicas
        seg_global = tf.shape(seg_image)[0] * replicas
        clf_vars, seg_vars = self.clf_variables, self.seg_variables
        with tf.GradientTape() as clf_tape:
            grade_loss = self._grade_loss(cls_image, grade, training=True)
            clf_scaled = losses.global_mean(grade_loss, cls_global)
            clf_for_grad = distribute.scale_loss(self.clf_optimizer, clf_scaled)
        with tf.GradientTape() as seg_tape:
            seg_loss = self._seg_loss(seg_image, seg_target, training=True)
            seg_scaled = losses.global_mean(seg_loss, seg_global)
            seg_for_grad = distribute.scale_loss(self.seg_optimizer, seg_scaled)
        clf_grads = distribute.unscale_gradients(
            self.clf_optimizer, clf_tape.gradient(clf_for_grad, clf_vars)
        )
        seg_grads = distribute.unscale_gradients(
            self.seg_optimizer, seg_tape.gradient(seg_for_grad, seg_vars)
        )
        return {
            "clf_grads": clf_grads,
            "seg_grads": seg_grads,
            "grade": grade_loss,
            "seg": seg_loss,
            "clf_scaled": clf_scaled,
            "seg_scaled": seg_scaled,
        }

    def _track(self, grade_loss, seg_loss):
        self.grade_loss_tracker.update_state(grade_loss)
        self.seg_loss_tracker.update_state(seg_loss)
        self.loss_tracker.update_state(tf.reduce_mean(grade_loss) + tf.reduce_mean(seg_loss))
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        result = self.agent_gradients(data)
        self.clf_optimizer.apply_gradients(zip(result["clf_grads"], self.clf_variables))
        self.seg_optimizer.apply_gradients(zip(result["seg_grads"], self.seg_variables))
        return self._track(result["grade"], result["seg"])

    def test_step(self, data):
        seg_image, cls_image, seg_target, grade = self._unpack(data)
        grade_loss = self._grade_loss(cls_image, grade, training=False)
        seg_loss = self._seg_loss(seg_image, seg_target, training=False)
        return self._track(grade_loss, seg_loss)
