"""Zhou et al., CVPR 2019, section 3.4: the two training stages of collaborative learning.

- Stage 1, generator: :class:`GeneratorPretrainer` trains the multi-lesion mask generator ``G``
  with the binary cross-entropy ``L_CE`` on pixel-level annotated images. (The grading model's
  stage 1, ``L_Cls`` on image-level images, is a plain ``fit`` of
  :func:`drkeras.models.collaborative.build_base_grader` with
  :class:`drkeras.losses.CategoricalFocalLoss`: one network, one loss, no trainer needed.)
- Stage 2: :class:`CollaborativeTrainer` fine-tunes ``G``, the discriminator ``D`` and the
  lesion attentive grader ``C`` end to end, one optimizer per network.

Both reduce their losses over the GLOBAL batch (:func:`drkeras.losses.global_mean`), so a
``MirroredStrategy`` takes the same step as one device (with the networks' synchronised batch
norm, ``sync_batchnorm=True``, for the same reason), and scale losses for ``mixed_float16`` like
the other trainers. GAN noise is not needed: ``G`` is conditioned on images, not on noise.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional

import tensorflow as tf
from tensorflow import keras

from drkeras import keys, losses
from drkeras.data.pipeline import MASK_VALID
from drkeras.models.collaborative import REAL_LOGIT
from drkeras.training import distribute

__all__ = ["CollaborativeTrainer", "GeneratorPretrainer", "masked_lesion_crossentropy"]


def masked_lesion_crossentropy(masks, logits, channel_weights=None):
    """Per-example binary cross-entropy of lesion maps, averaged over pixels and weighted lesions.

    ``L_CE`` of Eq. 3 (``-s log G(x) - (1 - s) log(1 - G(x))``), per lesion channel averaged
    over the pixels (:func:`drkeras.losses.binary_crossentropy` on logits), then averaged over
    the channels with ``channel_weights`` (e.g. ``mask_present``: a lesion type that was not
    annotated for an image is left out, which differs from an empty mask). An example with no
    weighted channel contributes 0.

    Args:
        masks: targets ``[B, H, W, L]`` in ``[0, 1]`` (ground truth or soft pseudo masks).
        logits: the generator's ``lesion_logits`` ``[B, H, W, L]``.
        channel_weights: ``[B, L]`` (default all ones).

    Returns:
        ``[B]`` losses.

    Example::

        ce = masked_lesion_crossentropy(targets["masks"], out["lesion_logits"],
                                        targets["mask_present"])
    """
    logits = tf.convert_to_tensor(logits)
    if logits.shape.rank != 4:
        raise ValueError(f"expected lesion logits [B, H, W, L], got shape {logits.shape}")
    dtype = tf.float32 if logits.dtype != tf.float64 else tf.float64
    logits = tf.cast(logits, dtype)
    masks = tf.cast(masks, dtype)
    shape = tf.shape(logits)
    batch, lesions = shape[0], shape[3]
    # Channels first, then one row per (example, lesion): binary_crossentropy averages each row.
    rows_true = tf.reshape(tf.transpose(masks, [0, 3, 1, 2]), [batch * lesions, -1])
    rows_pred = tf.reshape(tf.transpose(logits, [0, 3, 1, 2]), [batch * lesions, -1])
    per_channel = tf.reshape(
        losses.binary_crossentropy(rows_true, rows_pred, from_logits=True), [batch, lesions]
    )
    if channel_weights is None:
        return tf.reduce_mean(per_channel, axis=1)
    weights = tf.cast(channel_weights, dtype)
    return tf.math.divide_no_nan(
        tf.reduce_sum(weights * per_channel, axis=1), tf.reduce_sum(weights, axis=1)
    )


def _global_batch(tensor) -> tf.Tensor:
    context = tf.distribute.get_replica_context()
    replicas = context.num_replicas_in_sync if context is not None else 1
    return tf.shape(tensor)[0] * replicas


def _share_weights(members, global_batch, dtype=tf.float32) -> tf.Tensor:
    """Per-example weights that turn :func:`drkeras.losses.global_mean` into a mean over the
    members of the GLOBAL batch (one kind of image, e.g. the image-level images ``X_I``).

    ``members`` is 1 for a member and 0 otherwise. A member weighs ``N / N_m``, with ``N`` the
    global batch size and ``N_m`` the members of the global batch (summed across replicas), the
    others 0; so ``global_mean(w * loss, N) = sum over members of loss / N_m``: the expectation
    of Eq. 3 over that kind of image, whatever its share of the batch and however the kinds are
    spread over the replicas (each replica's gradient, summed by the strategy, is that of the
    global mean). No member in the global batch: every weight is 0.

    Example::

        >>> _share_weights(tf.constant([1.0, 0.0, 0.0, 0.0]), 4).numpy()
        array([4., 0., 0., 0.], dtype=float32)
    """
    members = tf.cast(members, dtype)
    count = tf.reduce_sum(members)
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        count = context.all_reduce(tf.distribute.ReduceOp.SUM, count)
    return members * tf.math.divide_no_nan(tf.cast(global_batch, dtype), count)


def _refuse_ambiguous(name: str, kwargs: dict, accepted: str) -> None:
    for ambiguous in ("optimizer", "loss", "loss_weights", "metrics"):
        if ambiguous in kwargs:
            raise TypeError(f"{name}.compile() takes {accepted}; {ambiguous}= is ambiguous here")


def _segmentation_targets(y, name: str):
    if not isinstance(y, dict) or keys.MASKS not in y:
        found = sorted(y) if isinstance(y, dict) else type(y).__name__
        raise ValueError(
            f"{name} expects targets {{{keys.MASKS!r}: [B, H, W, L], {keys.MASK_PRESENT!r}: "
            f"[B, L], ...}} (drkeras.data.pipeline.segmentation_dataset / mixed_dataset), got "
            f"{found}"
        )
    masks = y[keys.MASKS]
    present = y.get(keys.MASK_PRESENT)
    if present is None:
        present = tf.ones(tf.shape(masks)[::3], masks.dtype)
    return masks, present


class GeneratorPretrainer(keras.Model):
    """Stage 1 of Zhou et al. 2019 (section 3.4) for the mask generator: ``L_CE`` only.

    "We pre-train the multi-lesion segmentation model using the pixel-level annotated data by
    L_CE ... Adam ... learning rate of 0.0002 and momentum of 0.5 ... mini-batch size 32 ... 60
    epochs." Each ``train_step`` on ``(image, {"masks", "mask_present"})``:

    1. ``logits = G(x)`` (``lesion_logits``).
    2. ``L_CE`` (Eq. 3, the cross-entropy term) per example over the annotated lesion types
       (:func:`masked_lesion_crossentropy`), averaged over the GLOBAL batch.
    3. ``theta_G <- theta_G - g_optimizer(grad L_CE)``.

    Logs ``ce_loss``; ``evaluate`` reports it too.

    Args:
        generator: :func:`drkeras.models.collaborative.build_xception_unet` (either variant).
        name: model name.

    Example::

        with strategy.scope():
            pre = GeneratorPretrainer(build_xception_unet(input_shape=(640, 640, 3)))
            pre.compile(g_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5))
        pre.fit(segmentation_dataset(..., lesions=("MA", "HE", "EX", "SE")), epochs=60)
    """

    def __init__(self, generator: keras.Model, *, name: str = "generator_pretrainer"):
        super().__init__(name=name)
        self.generator = generator
        self.ce_tracker = keras.metrics.Mean(name="ce_loss")

    @property
    def metrics(self):
        return [self.ce_tracker]

    def compile(self, *, g_optimizer: keras.optimizers.Optimizer, **kwargs):
        """``g_optimizer`` updates the generator; ``kwargs`` go to ``keras.Model.compile``."""
        _refuse_ambiguous(type(self).__name__, kwargs, "g_optimizer=")
        g_optimizer = distribute.loss_scale_optimizer(g_optimizer, self.generator.dtype_policy)
        super().compile(optimizer=g_optimizer, **kwargs)
        self.g_optimizer = g_optimizer

    def call(self, inputs, training=False):
        return self.generator(inputs, training=training)

    def _ce(self, data, training):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        masks, present = _segmentation_targets(y, self.name)
        logits = self.generator(x, training=training)[keys.LESION_LOGITS]
        return masked_lesion_crossentropy(masks, logits, present), x, sample_weight

    def train_step(self, data):
        variables = self.generator.trainable_variables
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(variables)
            ce, x, sample_weight = self._ce(data, training=True)
            loss = tf.nn.compute_average_loss(
                ce, global_batch_size=_global_batch(x), sample_weight=sample_weight
            )
            scaled = distribute.scale_loss(self.g_optimizer, loss)
        grads = distribute.unscale_gradients(self.g_optimizer, tape.gradient(scaled, variables))
        self.g_optimizer.apply_gradients(zip(grads, variables))
        self.ce_tracker.update_state(ce, sample_weight=sample_weight)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        ce, _, sample_weight = self._ce(data, training=False)
        self.ce_tracker.update_state(ce, sample_weight=sample_weight)
        return {m.name: m.result() for m in self.metrics}


class CollaborativeTrainer(keras.Model):
    """Stage 2 of Zhou et al. 2019 (sections 3.2-3.4): generator, discriminator and lesion
    attentive grader fine-tuned end to end, each by its own optimizer.

    Sub-networks (built by :mod:`drkeras.models.collaborative`): ``generator`` ``G`` (image ->
    ``lesion_logits``/``lesion_probs``), ``grader`` ``C`` with the attention model ``att``
    (``{image, masks}`` -> ``grade_probs``, ``attention``) and, for "Semi + Adv",
    ``discriminator`` ``D`` (``{image, masks}`` -> ``real_logit``); without a discriminator the
    trainer is the "Semi" baseline (cross-entropy only). Each ``train_step`` on a mixed batch
    ``(x, {"masks", "mask_present", "mask_valid", "grade"})``
    (:func:`drkeras.data.pipeline.mixed_dataset`: ``mask_valid`` is 1 for pixel-level images
    ``X_P``, 0 for image-level images ``X_I``; ``grade`` -1 when unknown) runs:

    1. ``m = G(x)``, the lesion maps of every image.
    2. ``C(x, stop_gradient(m))``: grade probabilities and the attention maps ``alpha`` (Eqs.
       4-6); the grader reads the masks but does not train ``G`` through them.
    3. Segmentation targets ``s`` (Eq. 1): the ground truth ``s^P`` for ``X_P`` (annotated
       lesion types only) and the pseudo masks ``s~^I = stop_gradient(alpha)`` for ``X_I``
       ("Note that s~^I in Eq. 1 is equal to att(G(X_I))").
    4. ``L_CE`` (Eq. 3) per example, :func:`masked_lesion_crossentropy`.
    5. With ``D``: ``D(x, stop_gradient(m))``; ``L_D`` = BCE towards 1 ("real") for ``X_P`` and
       towards 0 ("fake") for ``X_I``: ``D`` maximises ``E[log D(X_P, G(X_P))] + E[log(1 -
       D(X_I, G(X_I)))]`` (Eq. 3), each expectation a mean over its own kind of image.
    6. ``L_Adv`` for ``G``: ``D(x, m)``. Eq. 1 minimises the whole ``L_Seg`` over ``G``, and both
       branches of Eq. 3 depend on ``G`` (the real branch is ``G``'s own prediction on ``X_P``),
       so both are kept, each in the non-saturating form (Goodfellow et al. 2014, Sec. 3), i.e.
       ``D``'s targets swapped: ``E_I[-log D(X_I, G(X_I))]`` (for ``log(1 - D(X_I, G(X_I)))``)
       plus ``E_P[-log(1 - D(X_P, G(X_P)))]`` (for ``log D(X_P, G(X_P))``).
    7. ``L_Seg = L_Adv + lambda L_CE`` (Eq. 3; ``lambda = 10``): ``L_CE`` averaged over all the
       images of the batch (Eq. 3's one expectation over ``X_(P,I)``), each term of ``L_Adv``
       over its own kind, so ``L_Adv`` has weight 1 whatever the share of ``X_I`` in the batch.
    8. ``L_Cls``: categorical focal loss of the grade (section 3.3), averaged over the images with
       a known grade (Eq. 2's expectation over ``X_I``).
    9. Each loss is reduced over the GLOBAL batch (per-kind means through ``N / N_kind`` weights
       with ``N_kind`` summed across replicas, :func:`_share_weights`) and differentiated by its
       own tape, w.r.t. its own network's variables only: ``L_Seg`` -> ``G`` (``g_optimizer``),
       ``L_D`` -> ``D`` (``d_optimizer``), ``L_Cls`` -> ``C`` including ``att``
       (``c_optimizer``). All gradients are taken at the same parameters, then applied (``D``,
       ``G``, ``C``).

    The three variable sets must be disjoint (checked in ``__init__``): a shared layer would be
    stepped by two optimizers.

    Logs: ``seg_loss`` (``L_Seg``), ``ce_loss``, ``grade_loss`` (mean over graded images) and,
    with ``D``, ``adv_loss`` (``G``'s ``L_Adv``, both terms; ``seg_loss = lambda ce_loss +
    adv_loss``) and ``d_loss`` (``D``'s BCE, both terms); unscaled means.
    ``evaluate`` reports ``ce_loss`` (pixel-level images only, against the ground truth) and
    ``grade_loss``.

    Args:
        generator, grader, discriminator: the networks (``discriminator=None``: no adversarial
            term, the "Lesion (Semi)" / "CE2 + Semi" rows).
        name: model name.

    Example::

        with strategy.scope():
            trainer = CollaborativeTrainer(generator, grader, discriminator)
            trainer.compile(g_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
                            d_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
                            c_optimizer=keras.optimizers.Adam(2e-4, beta_1=0.5),
                            lambda_ce=10.0)
        trainer.fit(mixed_dataset(..., lesions=("MA", "HE", "EX", "SE")), epochs=50)
    """

    def __init__(
        self,
        generator: keras.Model,
        grader: keras.Model,
        discriminator: Optional[keras.Model] = None,
        *,
        name: str = "collaborative_trainer",
    ):
        super().__init__(name=name)
        if not isinstance(generator.output, dict) or keys.LESION_LOGITS not in generator.output:
            raise ValueError(
                f"generator {generator.name!r} must have the dict output {keys.LESION_LOGITS!r} "
                "(build it with build_xception_unet)"
            )
        grader_out = grader.output
        if not isinstance(grader_out, dict) or {keys.GRADE_PROBS, keys.ATTENTION} - set(grader_out):
            raise ValueError(
                f"grader {grader.name!r} must have the dict outputs {keys.GRADE_PROBS!r} and "
                f"{keys.ATTENTION!r} (build it with build_lesion_attentive_grader)"
            )
        if discriminator is not None and REAL_LOGIT not in discriminator.output:
            raise ValueError(
                f"discriminator {discriminator.name!r} must have the output {REAL_LOGIT!r} "
                "(build it with build_discriminator)"
            )
        self.generator = generator
        self.grader = grader
        self.discriminator = discriminator
        self.num_grades = int(grader_out[keys.GRADE_PROBS].shape[-1])
        self._check_disjoint()
        self.seg_tracker = keras.metrics.Mean(name="seg_loss")
        self.ce_tracker = keras.metrics.Mean(name="ce_loss")
        self.grade_tracker = keras.metrics.Mean(name="grade_loss")
        self.adv_tracker = keras.metrics.Mean(name="adv_loss")
        self.d_tracker = keras.metrics.Mean(name="d_loss")

    @property
    def adversarial(self) -> bool:
        return self.discriminator is not None

    @property
    def metrics(self):
        trackers = [self.seg_tracker, self.ce_tracker, self.grade_tracker]
        if self.adversarial:
            trackers += [self.adv_tracker, self.d_tracker]
        return trackers

    def variable_groups(self) -> Dict[str, List[tf.Variable]]:
        """The trainable variables each optimizer steps: ``generator``, ``grader`` (with the
        attention model) and ``discriminator`` (absent without one); disjoint by construction.
        """
        groups = {
            "generator": list(self.generator.trainable_variables),
            "grader": list(self.grader.trainable_variables),
        }
        if self.adversarial:
            groups["discriminator"] = list(self.discriminator.trainable_variables)
        return groups

    def _check_disjoint(self) -> None:
        owner = {}
        for group, variables in self.variable_groups().items():
            for v in variables:
                if id(v) in owner and owner[id(v)] != group:
                    raise ValueError(
                        f"variable {v.name!r} belongs to both the {owner[id(v)]} and the "
                        f"{group}: each network must have its own variables (one optimizer per "
                        "network, Zhou et al. 2019 section 3.4)"
                    )
                owner[id(v)] = group

    def compile(
        self,
        *,
        g_optimizer: keras.optimizers.Optimizer,
        c_optimizer: keras.optimizers.Optimizer,
        d_optimizer: Optional[keras.optimizers.Optimizer] = None,
        lambda_ce: float = 10.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        **kwargs,
    ):
        """Set the optimizers and the weights of the paper's losses.

        Args:
            g_optimizer, c_optimizer, d_optimizer: update the generator, the grader (with the
                attention model) and the discriminator; Adam 2e-4, beta_1 0.5 in the paper.
                ``d_optimizer`` is required with a discriminator and refused without one.
            lambda_ce: ``lambda`` of ``L_Seg = L_Adv + lambda L_CE`` (Eq. 3; 10 in the paper).
            focal_alpha, focal_gamma: the focal loss ``L_Cls`` (Lin et al. 2017 defaults; the
                paper does not give its values).
            **kwargs: passed to ``keras.Model.compile`` (``run_eagerly``, ``jit_compile``);
                ``optimizer``, ``loss`` and ``metrics`` are refused.
        """
        _refuse_ambiguous(
            type(self).__name__, kwargs, "g_optimizer=, c_optimizer=, d_optimizer=, lambda_ce="
        )
        if self.adversarial and d_optimizer is None:
            raise TypeError("a CollaborativeTrainer with a discriminator needs d_optimizer=")
        if not self.adversarial and d_optimizer is not None:
            raise TypeError("d_optimizer= given but the trainer has no discriminator")
        optimizers = [g_optimizer, c_optimizer] + ([d_optimizer] if self.adversarial else [])
        if len({id(o) for o in optimizers}) != len(optimizers):
            raise ValueError("each network needs its own optimizer instance (got the same twice)")
        policy = self.generator.dtype_policy
        g_optimizer = distribute.loss_scale_optimizer(g_optimizer, policy)
        c_optimizer = distribute.loss_scale_optimizer(c_optimizer, policy)
        if d_optimizer is not None:
            d_optimizer = distribute.loss_scale_optimizer(d_optimizer, policy)
        # The generator's optimizer doubles as Keras' `optimizer` for learning-rate callbacks.
        super().compile(optimizer=g_optimizer, **kwargs)
        self.g_optimizer = g_optimizer
        self.c_optimizer = c_optimizer
        self.d_optimizer = d_optimizer
        self.lambda_ce = float(lambda_ce)
        self.focal_alpha = float(focal_alpha)
        self.focal_gamma = float(focal_gamma)

    def call(self, inputs, training=False):
        """Inference: ``{"lesion_probs", "grade_probs", "attention", ...}`` of image batches."""
        image = inputs[keys.IMAGE] if isinstance(inputs, dict) else inputs
        masks = self.generator(image, training=training)[keys.LESION_PROBS]
        out = dict(self.grader({keys.IMAGE: image, keys.MASKS: masks}, training=training))
        out[keys.LESION_PROBS] = masks
        return out

    def _unpack(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        if sample_weight is not None:
            raise ValueError(
                f"{self.name}: sample weights are not supported (the batch's mask_valid and "
                "grade already weight every example)"
            )
        masks, present = _segmentation_targets(y, self.name)
        for key in (MASK_VALID, keys.GRADE):
            if key not in y:
                raise ValueError(
                    f"{self.name} expects the targets of drkeras.data.pipeline.mixed_dataset "
                    f"(with {MASK_VALID!r} and {keys.GRADE!r}); {key!r} is missing"
                )
        image = x[keys.IMAGE] if isinstance(x, dict) else x
        return image, masks, present, y[MASK_VALID], y[keys.GRADE]

    def _grade_loss(self, grade, probs):
        """Per-example focal loss and a 0/1 weight (known grade)."""
        grade = tf.cast(grade, tf.int32)
        known = tf.cast(grade >= 0, probs.dtype)
        one_hot = tf.one_hot(tf.maximum(grade, 0), self.num_grades, dtype=probs.dtype)
        focal = losses.categorical_focal_loss(
            one_hot, probs, alpha=self.focal_alpha, gamma=self.focal_gamma
        )
        return focal * known, known

    def compute_gradients(self, data) -> Dict[str, object]:
        """Steps 1-9 without applying anything: per-example losses and each group's gradients.

        Returns a dict with ``grads`` (``{group: [gradients]}`` aligned with
        :meth:`variable_groups`) and per-example values: ``ce``, ``grade`` (focal loss, 0 when
        the grade is unknown), ``graded`` (0/1) and ``fake`` (0/1: image-level), and the
        per-example terms ``seg``, ``adv`` and ``d`` whose GLOBAL-batch means are ``L_Seg``,
        ``G``'s ``L_Adv`` and ``D``'s loss (the per-kind expectations already weighted in).
        """
        image, masks, present, valid, grade = self._unpack(data)
        groups = self.variable_groups()
        global_batch = _global_batch(image)
        tapes = {}
        # One tape per optimizer, each watching only its own network's variables.
        with contextlib.ExitStack() as stack:
            for group, variables in groups.items():
                tapes[group] = stack.enter_context(tf.GradientTape(watch_accessed_variables=False))
                tapes[group].watch(variables)
            generated = self.generator(image, training=True)
            logits = generated[keys.LESION_LOGITS]
            probs = generated[keys.LESION_PROBS]
            handed = tf.stop_gradient(probs)
            graded = self.grader({keys.IMAGE: image, keys.MASKS: handed}, training=True)
            pseudo = tf.stop_gradient(tf.cast(graded[keys.ATTENTION], probs.dtype))
            v = tf.cast(valid, probs.dtype)
            v_map = v[:, None, None, None]
            targets = v_map * tf.cast(masks, probs.dtype) + (1.0 - v_map) * pseudo
            weights = v[:, None] * tf.cast(present, probs.dtype) + (1.0 - v[:, None])
            ce = masked_lesion_crossentropy(targets, logits, weights)
            seg = self.lambda_ce * ce
            adv = d_loss = None
            fake = 1.0 - v
            if self.adversarial:
                # Each expectation of Eq. 3 over its own kind of image (_share_weights).
                on_real = _share_weights(v, global_batch, ce.dtype)
                on_fake = _share_weights(fake, global_batch, ce.dtype)
                d_real = self.discriminator({keys.IMAGE: image, keys.MASKS: handed}, training=True)[
                    REAL_LOGIT
                ]
                real_bce = losses.adversarial_loss(d_real, True)
                d_loss = on_real * real_bce + on_fake * losses.adversarial_loss(d_real, False)
                d_on_g = self.discriminator({keys.IMAGE: image, keys.MASKS: probs}, training=True)[
                    REAL_LOGIT
                ]
                # G: both branches, D's targets swapped (non-saturating form of Eqs. 1 and 3).
                fake_bce = losses.adversarial_loss(d_on_g, False)
                adv = on_fake * losses.adversarial_loss(d_on_g, True) + on_real * fake_bce
                seg = seg + adv
            grade_loss, known = self._grade_loss(grade, graded[keys.GRADE_PROBS])
            cls = _share_weights(known, global_batch, grade_loss.dtype) * grade_loss
            objectives = {"generator": seg, "grader": cls}
            if self.adversarial:
                objectives["discriminator"] = d_loss
            optimizers = {
                "generator": self.g_optimizer,
                "grader": self.c_optimizer,
                "discriminator": self.d_optimizer,
            }
            scaled = {
                group: distribute.scale_loss(
                    optimizers[group],
                    losses.global_mean(objectives[group], global_batch),
                )
                for group in groups
            }
        grads = {
            group: distribute.unscale_gradients(
                optimizers[group],
                tapes[group].gradient(
                    scaled[group], groups[group], unconnected_gradients=tf.UnconnectedGradients.ZERO
                ),
            )
            for group in groups
        }
        return {
            "grads": grads,
            "seg": seg,
            "ce": ce,
            "grade": grade_loss,
            "graded": known,
            "adv": adv,
            "fake": fake,
            "d": d_loss,
        }

    def train_step(self, data):
        result = self.compute_gradients(data)
        groups = self.variable_groups()
        if self.adversarial:
            self.d_optimizer.apply_gradients(
                zip(result["grads"]["discriminator"], groups["discriminator"])
            )
            self.adv_tracker.update_state(result["adv"])
            self.d_tracker.update_state(result["d"])
        self.g_optimizer.apply_gradients(zip(result["grads"]["generator"], groups["generator"]))
        self.c_optimizer.apply_gradients(zip(result["grads"]["grader"], groups["grader"]))
        self.seg_tracker.update_state(result["seg"])
        self.ce_tracker.update_state(result["ce"])
        self.grade_tracker.update_state(result["grade"], sample_weight=result["graded"])
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        image, masks, present, valid, grade = self._unpack(data)
        logits = self.generator(image, training=False)[keys.LESION_LOGITS]
        probs = tf.sigmoid(logits)
        graded = self.grader({keys.IMAGE: image, keys.MASKS: probs}, training=False)
        v = tf.cast(valid, logits.dtype)
        ce = masked_lesion_crossentropy(masks, logits, v[:, None] * tf.cast(present, v.dtype))
        grade_loss, known = self._grade_loss(grade, graded[keys.GRADE_PROBS])
        self.ce_tracker.update_state(ce, sample_weight=v)
        self.grade_tracker.update_state(grade_loss, sample_weight=known)
        return {t.name: t.result() for t in (self.ce_tracker, self.grade_tracker)}
