"""The semi-supervised feature-matching GAN of Lecouat et al. 2018 (Sec. 2), after Salimans et al.
2016: a ``K+1``-class discriminator trained on labeled and unlabeled patches and a generator
trained by feature matching, with an exponential moving average of the discriminator's weights
for evaluation.

Also here: the evaluation helpers shared by the SSL-GAN and the supervised baselines
(:func:`predict_patch_logits`, :func:`localisation_map`, :func:`choose_threshold`).
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import tensorflow as tf
from tensorflow import keras

from drkeras import keys, losses
from drkeras.data import preprocess
from drkeras.models.ssl_gan import CLASS_LOGITS, FEATURES, initialize_weight_norm
from drkeras.training import distribute

__all__ = [
    "LABELED",
    "UNLABELED",
    "PatchSSLGANTrainer",
    "choose_threshold",
    "localisation_map",
    "paired_weights",
    "predict_patch_logits",
]

# Keys of the trainer's inputs ``x``.
LABELED = "labeled"
UNLABELED = "unlabeled"


def paired_weights(first: keras.Model, second: keras.Model) -> list:
    """``[(w_first, w_second), ...]`` for two models of the same architecture, layer by layer.

    ``model.weights`` is not a safe order to pair: tfa's weight norm re-assigns its inner
    layer's kernel attribute on every call, and Keras then re-lists that layer's weights, so a
    model that was called eagerly lists them in another order than a fresh copy.

    Raises:
        ValueError: when the layers or their weights do not correspond.
    """
    pairs = []
    if len(first.layers) != len(second.layers):
        raise ValueError(f"{first.name} and {second.name} have different layers")
    for a, b in zip(first.layers, second.layers):
        wa, wb = a.weights, b.weights
        if a.name != b.name or len(wa) != len(wb):
            raise ValueError(f"layers {a.name!r} and {b.name!r} do not correspond")
        for va, vb in zip(wa, wb):
            if va.name != vb.name or va.shape != vb.shape:
                raise ValueError(f"weights {va.name} {va.shape} and {vb.name} {vb.shape} differ")
            pairs.append((va, vb))
    return pairs


class _Untracked:
    """A plain attribute holder that Keras and tf.train.Checkpoint do not track."""

    def __init__(self, **values):
        self.__dict__.update(values)


def _replicas() -> int:
    context = tf.distribute.get_replica_context()
    return context.num_replicas_in_sync if context is not None else 1


class PatchSSLGANTrainer(keras.Model):
    """Patch SSL-GAN training (Lecouat et al. 2018, Sec. 2 and Supplement 1).

    Receives the discriminator ``D`` (:func:`drkeras.models.ssl_gan.build_discriminator`, the
    patch classifier), the generator ``G`` (:func:`~drkeras.models.ssl_gan.build_generator`) and
    a second discriminator of the same architecture holding the exponential moving average of
    ``D``'s weights. Each ``train_step``, on ``x = {"labeled": [B_l, P, P, 3], "unlabeled":
    [B_u, P, P, 3]}`` and ``y`` = labels ``[B_l]`` of the labeled patches, runs:

    1. ``z ~ U(0, 1)^100`` for ``B_u`` samples; ``x_fake = G(z)``, held fixed
       (``tf.stop_gradient``) for the discriminator.
    2. Discriminator loss ``L_D = L_supervised + L_unsupervised`` (Sec. 2, the equations of
       ``L_D``): ``L_supervised = -log p_D(y | x, y < K+1)`` on the labeled patches,
       ``L_unsupervised = -log(1 - p_D(K+1 | x_unl)) - log p_D(K+1 | x_fake)`` with the implicit
       fake logit, all from log-sum-exps (:func:`drkeras.losses.ssl_gan_losses`), each averaged
       over the GLOBAL batch; ``d_optimizer`` updates ``D``'s trainable weights only.
    3. ``D_ema <- decay D_ema + (1 - decay) D`` (Supplement 1: "an exponential moving average of
       the parameters for inference", decay 0.999, Table 6).
    4. New noise ``z'``; generator loss ``L_G = || E_x[h(x_unl)] - E_z[h(G(z'))] ||`` (Sec. 2,
       ``L_G``, L1 as written there, or L2 as in Salimans et al.) with ``h`` the activations after
       the NiN layers of the freshly updated ``D``; the real features are constants
       (``tf.stop_gradient``) and ``g_optimizer`` updates ``G``'s trainable weights only. Under a
       ``MirroredStrategy`` the feature means are all-reduced, so they are the GLOBAL batch's
       means and one replica and N replicas take the same step.

    Noise: ``z`` for the whole global batch is drawn from a stateless generator keyed by
    ``(noise_seed, step, phase)``, and each replica takes its own slice: each replica gets
    different samples, the draw is the same whatever the number of replicas, and a resumed run
    (the optimizers' step counters are checkpointed) continues with the same noise. (A
    ``tf.random.Generator`` made in the strategy scope would also give per-replica streams, but
    streams that depend on the replica count, so 1 and 2 replicas could not be compared.)

    Before training call :meth:`initialize` once on a batch of real patches: the data-dependent
    weight-norm initialisation (:func:`drkeras.models.ssl_gan.initialize_weight_norm`) of ``D``
    and ``G``, then ``D_ema = D``. In a distributed run call it in cross-replica context (inside
    ``strategy.scope()``, outside ``strategy.run``).

    ``call`` and ``evaluate`` use the EMA discriminator: its weights are the ones evaluated and
    exported. ``evaluate`` on ``(patches, labels)`` reports ``sup_loss`` and ``accuracy``.

    Logs: ``d_loss`` (``L_D``), ``sup_loss``, ``unsup_loss``, ``fm_loss`` (``L_G``), unscaled.

    Args:
        discriminator: dict outputs ``class_logits`` and ``features``.
        generator: noise ``[B, latent]`` to patches.
        ema_discriminator: same architecture as ``discriminator`` (default: a
            ``keras.models.clone_model`` copy); its weights are set by :meth:`initialize`.
        noise_seed: seed of the noise draws.
        name: model name.

    Example::

        with strategy.scope():
            trainer = PatchSSLGANTrainer(build_discriminator(), build_generator(),
                                         ema_discriminator=build_discriminator())
            trainer.compile(d_optimizer=keras.optimizers.Adam(3e-4, beta_1=0.5),
                            g_optimizer=keras.optimizers.Adam(3e-4, beta_1=0.5))
            trainer.initialize(unlabeled_patches)
        trainer.fit(dataset, epochs=1200, steps_per_epoch=95)
    """

    def __init__(
        self,
        discriminator: keras.Model,
        generator: keras.Model,
        *,
        ema_discriminator: Optional[keras.Model] = None,
        noise_seed: int = 0,
        name: str = "ssl_gan_trainer",
    ):
        super().__init__(name=name)
        outputs = discriminator.output
        if not isinstance(outputs, dict) or not {CLASS_LOGITS, FEATURES} <= set(outputs):
            raise ValueError(
                f"discriminator {discriminator.name!r} must have dict outputs {CLASS_LOGITS!r} "
                f"and {FEATURES!r} (build it with drkeras.models.ssl_gan.build_discriminator)"
            )
        if tuple(generator.output_shape[1:]) != tuple(discriminator.input_shape[1:]):
            raise ValueError(
                f"generator output {generator.output_shape[1:]} does not match the "
                f"discriminator input {discriminator.input_shape[1:]}"
            )
        if ema_discriminator is None:
            ema_discriminator = keras.models.clone_model(discriminator)
        try:
            pairs = paired_weights(ema_discriminator, discriminator)
        except ValueError as err:
            raise ValueError(
                f"ema_discriminator must have the discriminator's architecture: {err}"
            ) from None
        # The average is not trained by any optimizer: its variables are not trainable.
        ema_discriminator.trainable = False
        self.discriminator = discriminator
        self.generator = generator
        self.ema_discriminator = ema_discriminator
        self.latent_dim = int(generator.input_shape[-1])
        self.noise_seed = int(noise_seed)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.sup_loss_tracker = keras.metrics.Mean(name="sup_loss")
        self.unsup_loss_tracker = keras.metrics.Mean(name="unsup_loss")
        self.fm_loss_tracker = keras.metrics.Mean(name="fm_loss")
        self.accuracy_tracker = keras.metrics.Mean(name="accuracy")
        trainable = {id(v) for v in discriminator.trainable_weights}
        # (average, raw) pairs, kept out of Keras' attribute tracking (a list of variables set
        # as an attribute would be listed again among the trainer's own weights); the
        # non-trainable ones are copied once, by initialize()
        self._pairs = _Untracked(
            all=tuple(pairs), ema=tuple((e, d) for e, d in pairs if id(d) in trainable)
        )

    @property
    def weight_pairs(self) -> tuple:
        """``(average, raw)`` pairs of every discriminator weight, layer by layer."""
        return self._pairs.all

    @property
    def metrics(self):
        return [
            self.d_loss_tracker,
            self.sup_loss_tracker,
            self.unsup_loss_tracker,
            self.fm_loss_tracker,
            self.accuracy_tracker,
        ]

    def compile(
        self,
        *,
        d_optimizer: keras.optimizers.Optimizer,
        g_optimizer: keras.optimizers.Optimizer,
        ema_decay: float = 0.999,
        fm_norm: str = "l1",
        **kwargs,
    ):
        """Set the two optimizers and the EMA decay.

        Args:
            d_optimizer: updates the discriminator (Adam 3e-4, beta_1 0.5, Table 6).
            g_optimizer: updates the generator (the same). Under a ``mixed_float16``
                discriminator both are wrapped in a ``LossScaleOptimizer``
                (:func:`drkeras.training.distribute.loss_scale_optimizer`, kept when already
                wrapped): each step scales its own loss by its own optimizer's scale, unscales
                the gradients, and a step whose gradients overflow is skipped by that optimizer.
            ema_decay: decay of the weight average (0.999, Table 6).
            fm_norm: ``"l1"`` (Sec. 2, ``L_G``) or ``"l2"`` (Salimans et al. 2016).
            **kwargs: passed to ``keras.Model.compile`` (``run_eagerly``, ``jit_compile``);
                ``optimizer``, ``loss`` and ``metrics`` are refused.
        """
        for ambiguous in ("optimizer", "loss", "loss_weights", "metrics"):
            if ambiguous in kwargs:
                raise TypeError(
                    f"PatchSSLGANTrainer.compile() takes d_optimizer= and g_optimizer=; "
                    f"{ambiguous}= is ambiguous here"
                )
        if fm_norm not in ("l1", "l2"):
            raise ValueError(f"fm_norm must be 'l1' or 'l2', got {fm_norm!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if d_optimizer is g_optimizer:
            raise ValueError("d_optimizer and g_optimizer must be two optimizer instances")
        # float16 gradients underflow without loss scaling (as Keras' own compile() does).
        policy = self.discriminator.dtype_policy
        d_optimizer = distribute.loss_scale_optimizer(d_optimizer, policy)
        g_optimizer = distribute.loss_scale_optimizer(g_optimizer, policy)
        # The discriminator's optimizer doubles as Keras' `optimizer` (learning-rate callbacks).
        super().compile(optimizer=d_optimizer, **kwargs)
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        self.ema_decay = float(ema_decay)
        self.fm_norm = fm_norm

    # ------------------------------------------------------------------ set-up and inference

    def initialize(self, real_patches, *, noise_batch: Optional[int] = None) -> None:
        """Data-dependent weight-norm initialisation of ``D`` (on ``real_patches``) and ``G``
        (on uniform noise, ``noise_batch`` samples, default as many as patches), then
        ``D_ema = D``. Run once, eagerly, in cross-replica context."""
        real_patches = tf.convert_to_tensor(real_patches, tf.float32)
        n = int(noise_batch or real_patches.shape[0])
        initialize_weight_norm(self.discriminator, real_patches, training=False)
        noise = tf.random.stateless_uniform([n, self.latent_dim], [self.noise_seed, -1])
        initialize_weight_norm(self.generator, noise, training=True)
        for ema, raw in self.weight_pairs:
            ema.assign(raw)

    def call(self, inputs, training=False):
        """Inference of the EMA discriminator (the evaluated patch classifier)."""
        return self.ema_discriminator(inputs, training=False)

    # ------------------------------------------------------------------------ training steps

    def noise(self, batch_size, step, phase: int) -> tf.Tensor:
        """This replica's share of the global noise batch of ``step`` (``phase`` 0: the
        discriminator step, 1: the generator step)."""
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        replica = context.replica_id_in_sync_group if context is not None else 0
        seed = tf.stack(
            [
                tf.constant(self.noise_seed, tf.int64),
                tf.cast(step, tf.int64) * 2 + phase,
            ]
        )
        total = batch_size * replicas
        z = tf.random.stateless_uniform(tf.stack([total, self.latent_dim]), seed)
        start = tf.cast(replica, tf.int32) * batch_size
        return z[start : start + batch_size]

    def _unpack(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError(f"{self.name} does not take sample weights")
        if not isinstance(x, dict) or {LABELED, UNLABELED} - set(x) or y is None:
            found = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(
                f"{self.name} expects data (x, y) with x = {{{LABELED!r}: patches, {UNLABELED!r}: "
                f"patches}} and y the labels of the labeled patches; got x {found}"
            )
        return (
            tf.convert_to_tensor(x[LABELED]),
            tf.reshape(tf.cast(y, tf.int32), [-1]),
            tf.convert_to_tensor(x[UNLABELED]),
        )

    def discriminator_losses(self, x_l, y_l, x_u, fake):
        """Per-example ``(supervised [B_l], unsupervised [B_u])`` losses and the labeled logits
        of ``D`` in training mode."""
        # one call on the three batches together (D has no batch-dependent layer, and dropout
        # masks are drawn per example): a third of the graph of three calls
        logits = self.discriminator(tf.concat([x_l, x_u, fake], 0), training=True)[CLASS_LOGITS]
        logits_l, logits_u, logits_f = tf.split(
            logits, tf.stack([tf.shape(x_l)[0], tf.shape(x_u)[0], tf.shape(fake)[0]])
        )
        sup, unsup = losses.ssl_gan_losses(logits_l, y_l, logits_u, logits_f)
        return sup, unsup, logits_l

    def discriminator_step(self, x_l, y_l, x_u) -> Dict[str, tf.Tensor]:
        """Steps 1-3: one discriminator update and the EMA update."""
        replicas = _replicas()
        batch_u = tf.shape(x_u)[0]
        z = self.noise(batch_u, self.d_optimizer.iterations, 0)
        fake = tf.stop_gradient(self.generator(z, training=True))
        variables = self.discriminator.trainable_variables
        with tf.GradientTape() as tape:
            sup, unsup, logits_l = self.discriminator_losses(x_l, y_l, x_u, fake)
            loss = losses.global_mean(sup, tf.shape(x_l)[0] * replicas) + losses.global_mean(
                unsup, batch_u * replicas
            )
            scaled = distribute.scale_loss(self.d_optimizer, loss)
        grads = distribute.unscale_gradients(self.d_optimizer, tape.gradient(scaled, variables))
        self.d_optimizer.apply_gradients(zip(grads, variables))
        self.update_ema()
        correct = tf.cast(tf.equal(tf.argmax(logits_l, -1, output_type=tf.int32), y_l), tf.float32)
        return {"sup": sup, "unsup": unsup, "correct": correct}

    def update_ema(self) -> None:
        """``D_ema <- decay D_ema + (1 - decay) D`` on every replica (cross-replica update)."""
        decay = self.ema_decay

        def average(ema, raw):
            return ema.assign(decay * ema + (1.0 - decay) * raw)

        def update(strategy):
            for ema, raw in self._pairs.ema:
                strategy.extended.update(ema, average, args=(raw,), group=False)

        context = tf.distribute.get_replica_context()
        if context is None:  # cross-replica context (e.g. a test calling it directly)
            update(tf.distribute.get_strategy())
        else:
            context.merge_call(update)

    def feature_matching_loss(self, x_u, z):
        """``L_G`` on the GLOBAL batch means (all-reduced across replicas), divided by the
        replica count so the summed replica gradients are the gradient of ``L_G``."""
        generated = self.generator(z, training=True)
        features = self.discriminator(tf.concat([x_u, generated], 0), training=True)[FEATURES]
        real, fake = tf.split(features, tf.stack([tf.shape(x_u)[0], tf.shape(generated)[0]]))
        real = tf.stop_gradient(real)  # the data side of the match is a constant for G
        context = tf.distribute.get_replica_context()
        replicas = _replicas()
        if replicas == 1:
            return losses.feature_matching_loss(real, fake, norm=self.fm_norm)
        n_real = tf.cast(tf.shape(real)[0] * replicas, tf.float32)
        n_fake = tf.cast(tf.shape(fake)[0] * replicas, tf.float32)
        mean_real = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(real, 0)) / n_real
        mean_fake = context.all_reduce(tf.distribute.ReduceOp.SUM, tf.reduce_sum(fake, 0)) / n_fake
        # feature_matching_loss of one-example "batches" holding the global means
        fm = losses.feature_matching_loss(mean_real[None], mean_fake[None], norm=self.fm_norm)
        return fm / replicas

    def generator_step(self, x_u) -> tf.Tensor:
        """Step 4: one generator update by feature matching; returns the unscaled ``L_G``."""
        z = self.noise(tf.shape(x_u)[0], self.g_optimizer.iterations, 1)
        variables = self.generator.trainable_variables
        with tf.GradientTape() as tape:
            loss = self.feature_matching_loss(x_u, z)
            scaled = distribute.scale_loss(self.g_optimizer, loss)
        grads = distribute.unscale_gradients(self.g_optimizer, tape.gradient(scaled, variables))
        self.g_optimizer.apply_gradients(zip(grads, variables))
        return loss * _replicas()

    def train_step(self, data):
        x_l, y_l, x_u = self._unpack(data)
        d = self.discriminator_step(x_l, y_l, x_u)
        fm = self.generator_step(x_u)
        self.sup_loss_tracker.update_state(d["sup"])
        self.unsup_loss_tracker.update_state(d["unsup"])
        self.d_loss_tracker.update_state(tf.reduce_mean(d["sup"]) + tf.reduce_mean(d["unsup"]))
        self.fm_loss_tracker.update_state(fm)
        self.accuracy_tracker.update_state(d["correct"])
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        if isinstance(x, dict):
            x = x[LABELED]
        y = tf.reshape(tf.cast(y, tf.int32), [-1])
        logits = self.ema_discriminator(x, training=False)[CLASS_LOGITS]
        sup = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits)
        correct = tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32), y), tf.float32)
        self.sup_loss_tracker.update_state(sup)
        self.accuracy_tracker.update_state(correct)
        return {
            "sup_loss": self.sup_loss_tracker.result(),
            "accuracy": self.accuracy_tracker.result(),
        }


# ---------------------------------------------------------------------------------- evaluation


def predict_patch_logits(
    model: keras.Model, patches, *, batch_size: int = 512, eager: bool = False
) -> np.ndarray:
    """``patch_logits`` of ``model`` (training mode off) for patches ``[..., P, P, 3]``.

    Leading axes are kept: image grids ``[N, 64, P, P, 3]`` give ``[N, 64]``. ``eager`` skips
    the graph trace (faster for a few hundred patches on a CPU).

    Example::

        logits = predict_patch_logits(trainer.ema_discriminator, grids)   # [N, 64]
    """
    patches = np.asarray(patches, np.float32)
    lead = patches.shape[:-3]
    flat = patches.reshape((-1,) + patches.shape[-3:])

    def call(x):
        return model(x, training=False)

    run = call if eager else tf.function(call, reduce_retracing=True)
    out = []
    for start in range(0, flat.shape[0], batch_size):
        result = run(tf.constant(flat[start : start + batch_size]))
        logits = result[keys.PATCH_LOGITS] if isinstance(result, dict) else result
        out.append(np.reshape(logits.numpy(), [-1]))
    logits = np.concatenate(out) if out else np.zeros(0, np.float32)
    return logits.reshape(lead)


def localisation_map(patch_scores, size: int, *, blur: float = 0.5) -> np.ndarray:
    """The Fig. 2 localisation map: patch scores ``[G, G]`` (or ``[N, G, G]``) spread over their
    cells of a ``size x size`` image and smoothed by a Gaussian of ``blur`` patch widths (the
    same map :func:`drkeras.plots.plot_patch_scores` draws).

    Example::

        >>> m = localisation_map(np.eye(2), 8, blur=0.0)
        >>> m[0, 0], m[0, 7], m.shape
        (1.0, 0.0, (8, 8))
    """
    scores = np.asarray(patch_scores, np.float32)
    single = scores.ndim == 2
    if single:
        scores = scores[None]
    grid = scores.shape[-1]
    if scores.ndim != 3 or scores.shape[-2] != grid or size % grid:
        raise ValueError(
            f"localisation_map: expected [N, G, G] scores with size divisible by G, got "
            f"{scores.shape} and size {size}"
        )
    cell = size // grid
    maps = np.repeat(np.repeat(scores, cell, axis=1), cell, axis=2)[..., None]
    if blur > 0:
        maps = preprocess.gaussian_blur(tf.constant(maps), blur * cell).numpy()
    maps = maps[..., 0]
    return maps[0] if single else maps


def choose_threshold(scores, labels) -> float:
    """The image-score threshold (predict diseased when ``score > t``) with the best balanced
    accuracy on ``scores``/``labels`` (e.g. the validation cohort); Sec. 2 "If the image-level
    abnormality score exceeds a threshold" does not say how it is set.

    Example::

        >>> choose_threshold([1.0, 2.0, 5.0, 6.0], [0, 0, 1, 1])
        3.5
    """
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape or not scores.size:
        raise ValueError(f"choose_threshold: {scores.size} scores and {labels.size} labels")
    values = np.unique(scores)
    candidates = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2.0])
    best, best_t = -1.0, float(candidates[0])
    for t in candidates:
        pred = scores > t
        parts = [np.mean(pred[labels] == 1)] if labels.any() else []
        parts += [np.mean(pred[~labels] == 0)] if (~labels).any() else []
        score = float(np.mean(parts))
        if score > best:
            best, best_t = score, float(t)
    return best_t
