"""Losses of the five papers, as per-example functions and as Keras ``Loss`` classes.

Every function returns one loss per example (shape ``[B]``): dense predictions (segmentation maps
``[B, H, W, C]``) are averaged over their non-batch positions. Reduce per-example losses over the
GLOBAL batch with :func:`global_mean` in custom train steps, so one replica and N replicas of a
``MirroredStrategy`` compute the same gradient (docs/design.md section 4). The ``Loss``
subclasses wrap the same functions for ``model.fit``, which applies the reduction itself.

Probabilities are clipped to ``[eps, 1 - eps]`` (``eps = tf.keras.backend.epsilon()``) before a
logarithm, as ``tf.keras.losses`` does; with ``from_logits=True`` the numerically stable
logit formulas are used instead.

Where each loss comes from:

- binary cross-entropy over lesion maps: MTUnet (Foo et al. 2020), Eq. 1;
- categorical cross-entropy for grading: MTUnet Eq. 2;
- categorical focal loss: PLDMLT Eq. 2 (segmentation and grading), Zhou et al. 2019 Sec. 3.3
  (``L_Cls``), both citing Lin et al. 2017;
- adversarial, feature matching and the K+1-class semi-supervised GAN loss: Lecouat et al. 2018
  Sec. 2 (after Salimans et al. 2016), and the adversarial segmentation loss of Zhou et al. 2019.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import tensorflow as tf

__all__ = [
    "BinaryFocalLoss",
    "CategoricalFocalLoss",
    "DiceLoss",
    "WeightedBinaryCrossentropy",
    "adversarial_loss",
    "binary_crossentropy",
    "binary_focal_loss",
    "categorical_crossentropy",
    "categorical_focal_loss",
    "dice_loss",
    "feature_matching_loss",
    "global_mean",
    "ssl_gan_losses",
    "weighted_binary_crossentropy",
]


def _prepare(y_true, y_pred):
    y_pred = tf.convert_to_tensor(y_pred)
    # Mixed-precision models emit bfloat16/float16; losses are computed in float32 (or float64).
    if y_pred.dtype not in (tf.float32, tf.float64):
        y_pred = tf.cast(y_pred, tf.float32)
    y_true = tf.cast(y_true, y_pred.dtype)
    return y_true, y_pred


def _per_example_mean(values):
    """Mean over every axis but the first: one value per example."""
    values = tf.convert_to_tensor(values)
    if values.shape.rank == 1:
        return values
    return tf.reduce_mean(tf.reshape(values, [tf.shape(values)[0], -1]), axis=1)


def _clip(p):
    eps = tf.keras.backend.epsilon()
    return tf.clip_by_value(p, eps, 1.0 - eps)


def binary_crossentropy(y_true, y_pred, *, from_logits: bool = False):
    """Per-example binary cross-entropy, averaged over every non-batch position.

    ``-[y log p + (1 - y) log(1 - p)]`` per element (MTUnet, Foo et al. 2020, Eq. 1, here as a
    mean instead of a sum so the scale does not depend on the image size).

    Args:
        y_true: targets in ``[0, 1]``, any shape ``[B, ...]``.
        y_pred: probabilities (or logits with ``from_logits=True``), same shape.
        from_logits: whether ``y_pred`` holds logits.

    Returns:
        ``[B]`` float32 losses.

    Example::

        >>> float(binary_crossentropy([[1.0]], [[0.5]])[0])  # log 2
        0.6931...
    """
    y_true, y_pred = _prepare(y_true, y_pred)
    if from_logits:
        elem = tf.nn.sigmoid_cross_entropy_with_logits(labels=y_true, logits=y_pred)
    else:
        p = _clip(y_pred)
        elem = -(y_true * tf.math.log(p) + (1.0 - y_true) * tf.math.log(1.0 - p))
    return _per_example_mean(elem)


def weighted_binary_crossentropy(y_true, y_pred, *, pos_weight, from_logits: bool = False):
    """Binary cross-entropy with the positive term multiplied by ``pos_weight``.

    ``-[w y log p + (1 - y) log(1 - p)]`` per element, averaged per example. Lesion pixels are
    rare (microaneurysms cover ~0.1 % of an IDRiD image), so ``w > 1`` keeps the segmentation
    head from predicting background everywhere. ``pos_weight`` may be a scalar or one weight per
    channel (broadcast over the last axis).

    Example::

        >>> float(weighted_binary_crossentropy([[1.0, 0.0]], [[0.5, 0.5]], pos_weight=3.0)[0])
        1.3862...  # (3 log 2 + log 2) / 2
    """
    y_true, y_pred = _prepare(y_true, y_pred)
    w = tf.cast(pos_weight, y_pred.dtype)
    if from_logits:
        elem = tf.nn.weighted_cross_entropy_with_logits(labels=y_true, logits=y_pred, pos_weight=w)
    else:
        p = _clip(y_pred)
        elem = -(w * y_true * tf.math.log(p) + (1.0 - y_true) * tf.math.log(1.0 - p))
    return _per_example_mean(elem)


def _log_probs(y_pred, from_logits):
    if from_logits:
        return tf.nn.log_softmax(y_pred, axis=-1)
    return tf.math.log(_clip(y_pred))


def categorical_crossentropy(y_true_onehot, y_pred, *, from_logits: bool = False):
    """Per-example categorical cross-entropy ``-sum_k y_k log p_k`` (MTUnet Eq. 2).

    The last axis holds the classes; dense inputs ``[B, H, W, K]`` are averaged over pixels.
    Probabilities are used as given (not renormalised), like ``tf.keras.losses``' clipped path.

    Example::

        >>> float(categorical_crossentropy([[0.0, 1.0]], [[0.75, 0.25]])[0])  # -log 0.25
        1.3862...
    """
    y_true, y_pred = _prepare(y_true_onehot, y_pred)
    elem = -tf.reduce_sum(y_true * _log_probs(y_pred, from_logits), axis=-1)
    return _per_example_mean(elem)


def categorical_focal_loss(
    y_true_onehot,
    y_pred,
    *,
    alpha: Union[float, Sequence[float]] = 0.25,
    gamma: float = 2.0,
    from_logits: bool = False,
):
    """Per-example multi-class focal loss ``-alpha (1 - p_t)^gamma log p_t`` on the true class.

    Lin et al. 2017, Eq. 5, in its multi-class form as used by PLDMLT (Eq. 2: ``alpha`` is "the
    category weight value", ``gamma`` the difficulty factor) and by Zhou et al. 2019 (``L_Cls``).
    With ``gamma = 0`` and ``alpha = 1`` it is the categorical cross-entropy.

    Args:
        y_true_onehot: one-hot (or soft) targets ``[B, ..., K]``.
        y_pred: probabilities or logits ``[B, ..., K]``.
        alpha: a scalar weight, or one weight per class (length ``K``).
        gamma: focusing parameter; larger values down-weight well-classified examples.
        from_logits: whether ``y_pred`` holds logits.

    Example::

        >>> # p_t = 0.5: 0.25 * 0.5**2 * log 2
        >>> float(categorical_focal_loss([[1.0, 0.0]], [[0.5, 0.5]])[0])
        0.04332...
    """
    y_true, y_pred = _prepare(y_true_onehot, y_pred)
    log_p = _log_probs(y_pred, from_logits)
    p = tf.exp(log_p)
    a = tf.cast(alpha, y_pred.dtype)
    elem = -tf.reduce_sum(a * y_true * tf.pow(1.0 - p, gamma) * log_p, axis=-1)
    return _per_example_mean(elem)


def binary_focal_loss(
    y_true,
    y_pred,
    *,
    alpha: Optional[float] = 0.25,
    gamma: float = 2.0,
    from_logits: bool = False,
):
    """Per-example binary focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` (Lin et al. 2017, Eq. 5).

    ``p_t = p`` and ``alpha_t = alpha`` on positives, ``p_t = 1 - p`` and ``alpha_t = 1 - alpha``
    on negatives. ``alpha=None`` drops the class balancing (``alpha_t = 1``); then ``gamma = 0``
    gives the binary cross-entropy. Used on multi-label lesion maps (one sigmoid per lesion).

    Example::

        >>> # positive with p = 0.5: 0.25 * 0.25 * log 2
        >>> float(binary_focal_loss([[1.0]], [[0.5]])[0])
        0.04332...
    """
    y_true, y_pred = _prepare(y_true, y_pred)
    if from_logits:
        # log sigmoid(x) = -softplus(-x), log(1 - sigmoid(x)) = -softplus(x): no overflow.
        log_p = -tf.nn.softplus(-y_pred)
        log_q = -tf.nn.softplus(y_pred)
        p = tf.sigmoid(y_pred)
    else:
        p = _clip(y_pred)
        log_p, log_q = tf.math.log(p), tf.math.log(1.0 - p)
    pos = -y_true * tf.pow(1.0 - p, gamma) * log_p
    neg = -(1.0 - y_true) * tf.pow(p, gamma) * log_q
    if alpha is not None:
        a = tf.cast(alpha, y_pred.dtype)
        pos, neg = a * pos, (1.0 - a) * neg
    return _per_example_mean(pos + neg)


def dice_loss(y_true, y_pred, *, smooth: float = 1.0):
    """Per-example soft Dice loss: ``1 - mean_c (2 sum(y p) + s) / (sum y + sum p + s)``.

    Sums run over the spatial positions of each example, separately per channel ``c`` (last
    axis), then the Dice coefficients are averaged over channels. With the default ``smooth=1`` an
    empty target and an empty prediction give Dice 1 (loss 0), so lesion-free images do not
    produce a large, meaningless gradient. ``y_pred`` are probabilities.

    Example::

        >>> float(dice_loss(tf.ones([1, 2, 2, 1]), tf.ones([1, 2, 2, 1]) * 0.5)[0])
        0.2857...  # 1 - (2*2 + 1) / (4 + 2 + 1)
    """
    y_true, y_pred = _prepare(y_true, y_pred)
    rank = y_pred.shape.rank
    if rank is None or rank < 2:
        raise ValueError(f"dice_loss expects [B, ..., C] tensors, got rank {rank}")
    axes = list(range(1, rank - 1))
    if axes:
        inter = tf.reduce_sum(y_true * y_pred, axis=axes)
        total = tf.reduce_sum(y_true, axis=axes) + tf.reduce_sum(y_pred, axis=axes)
    else:
        inter, total = y_true * y_pred, y_true + y_pred
    dice = (2.0 * inter + smooth) / (total + smooth)
    return 1.0 - tf.reduce_mean(dice, axis=-1)


def adversarial_loss(logits, target_is_real: bool):
    """Per-example non-saturating GAN loss: BCE of discriminator logits against real/fake.

    The discriminator minimises ``adversarial_loss(d_real, True) + adversarial_loss(d_fake,
    False)``; the generator (or the segmenter of Zhou et al. 2019, Sec. 3.2) minimises
    ``adversarial_loss(d_fake, True)``, i.e. ``-log D(G(z))`` instead of ``log(1 - D(G(z)))``,
    which does not saturate early in training (Goodfellow et al. 2014, Sec. 3). Dense
    discriminator outputs (``[B, H, W, 1]``) are averaged per example.

    Example::

        >>> float(adversarial_loss([[0.0]], True)[0])  # log 2
        0.6931...
    """
    _, logits = _prepare(0.0, logits)
    target = tf.ones_like(logits) if target_is_real else tf.zeros_like(logits)
    return _per_example_mean(tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits))


def feature_matching_loss(real_features, fake_features, *, norm: str = "l2"):
    """Feature matching on batch means (Salimans et al. 2016, Sec. 3.1).

    ``norm="l2"``: ``mean_f (E[h(x)]_f - E[h(G(z))]_f)^2``, the squared L2 distance of Salimans
    et al. divided by the number of features ``F``, as in their released code, so the scale does
    not grow with the layer width. ``norm="l1"``: ``mean_f |E[h(x)]_f - E[h(G(z))]_f|``, the L1
    form of Lecouat et al. 2018 (``L_G``, Sec. 2), also divided by ``F``.

    Unlike the other losses this is a SCALAR: the expectations are batch means, so there is no
    per-example value. Under a ``MirroredStrategy`` each replica matches its own batch means;
    divide by ``strategy.num_replicas_in_sync`` before taking gradients so the summed replica
    gradients are their average.

    Args:
        real_features: ``[B_real, ...]`` intermediate discriminator activations on data.
        fake_features: ``[B_fake, ...]`` activations on generated samples (same feature shape).
        norm: ``"l2"`` or ``"l1"``.

    Example::

        >>> float(feature_matching_loss([[1.0, 3.0]], [[0.0, 0.0]], norm="l1"))  # (1 + 3) / 2
        2.0
    """
    if norm not in ("l1", "l2"):
        raise ValueError(f"feature_matching_loss: norm must be 'l1' or 'l2', got {norm!r}")
    real = tf.cast(tf.convert_to_tensor(real_features), tf.float32)
    fake = tf.cast(tf.convert_to_tensor(fake_features), tf.float32)
    diff = tf.reduce_mean(real, axis=0) - tf.reduce_mean(fake, axis=0)
    return tf.reduce_mean(tf.square(diff) if norm == "l2" else tf.abs(diff))


def ssl_gan_losses(
    logits_labeled, labels, logits_unl, logits_fake, *, fake_logit: str = "implicit"
):
    """Discriminator losses of the K+1-class semi-supervised GAN (Lecouat et al. 2018, Sec. 2).

    With class logits ``l_1..l_K`` and the fake-class logit ``l_{K+1}`` (``fake_logit="implicit"``:
    fixed to 0, the over-parameterisation removed by Salimans et al. 2016, Sec. 5;
    ``fake_logit="last"``: the last of ``K+1`` columns), writing ``lse`` for log-sum-exp:

    - ``L_supervised = -log p(y | x, y < K+1) = lse(l_1..l_K) - l_y`` on labeled examples;
    - ``L_unsupervised = -log(1 - p(K+1 | x_unl)) - log p(K+1 | G(z))``
      ``= [lse(all_unl) - lse(real_unl)] + [lse(all_fake) - l_{K+1, fake}]``.

    Everything is computed from log-sum-exps, never from exponentiated probabilities, so large
    logits neither overflow nor lose precision.

    Args:
        logits_labeled: ``[B_l, K]`` (or ``[B_l, K+1]``) logits of labeled examples.
        labels: ``[B_l]`` integer class labels in ``0..K-1``.
        logits_unl: ``[B, ...]`` logits of unlabeled real examples.
        logits_fake: ``[B, ...]`` logits of generated examples; the same batch size as
            ``logits_unl``, since the unsupervised loss pairs them example by example.
        fake_logit: ``"implicit"`` or ``"last"`` (see above).

    Returns:
        ``(supervised [B_l], unsupervised [B])`` per-example losses; reduce each with
        :func:`global_mean`.

    Example::

        >>> sup, unsup = ssl_gan_losses([[0.0, 0.0]], [1], [[0.0, 0.0]], [[0.0, 0.0]])
        >>> float(sup[0]), float(unsup[0])  # log 2; log(3/2) + log 3
        (0.6931..., 1.5040...)
    """
    if fake_logit not in ("implicit", "last"):
        raise ValueError(
            f"ssl_gan_losses: fake_logit must be 'implicit' or 'last', not {fake_logit}"
        )

    def split(logits):
        logits = tf.cast(tf.convert_to_tensor(logits), tf.float32)
        if fake_logit == "last":
            return logits[:, :-1], logits[:, -1]
        return logits, tf.zeros_like(logits[:, 0])

    real_l, _ = split(logits_labeled)
    labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
    supervised = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=real_l)

    real_u, fake_u = split(logits_unl)
    real_f, fake_f = split(logits_fake)
    n_unl, n_fake = real_u.shape[0], real_f.shape[0]
    if n_unl is not None and n_fake is not None and n_unl != n_fake:
        raise ValueError(
            f"ssl_gan_losses pairs unlabeled and generated examples: got {n_unl} unlabeled and "
            f"{n_fake} generated logits; use the same batch size for both"
        )
    lse_real_u = tf.reduce_logsumexp(real_u, axis=-1)
    lse_all_u = tf.reduce_logsumexp(tf.concat([real_u, fake_u[:, None]], axis=-1), axis=-1)
    lse_all_f = tf.reduce_logsumexp(tf.concat([real_f, fake_f[:, None]], axis=-1), axis=-1)
    unsupervised = (lse_all_u - lse_real_u) + (lse_all_f - fake_f)
    return supervised, unsupervised


def global_mean(per_example, global_batch_size):
    """Sum of per-example losses divided by the GLOBAL batch size (``tf.nn.compute_average_loss``).

    Inside ``strategy.run`` each replica divides its local sum by the global batch size, so the
    gradients the strategy sums across replicas equal the gradient of the mean over the whole
    global batch: one replica and N replicas take the same step (docs/design.md section 4).

    Example::

        >>> float(global_mean(tf.constant([1.0, 3.0]), 4))
        1.0
    """
    per_example = tf.convert_to_tensor(per_example)
    if per_example.shape.rank != 1:
        raise ValueError(
            f"global_mean expects per-example losses of shape [B], got shape {per_example.shape}"
        )
    return tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)


class _PerExampleLoss(tf.keras.losses.Loss):
    """A Keras ``Loss`` whose ``call`` returns one of this module's per-example losses."""

    def get_config(self):
        config = super().get_config()
        config.update(self._params())
        return config

    def _params(self):  # pragma: no cover - every subclass overrides it
        return {}


@tf.keras.utils.register_keras_serializable(package="drkeras")
class CategoricalFocalLoss(_PerExampleLoss):
    """Keras loss for :func:`categorical_focal_loss` (PLDMLT Eq. 2, Lin et al. 2017).

    Example::

        model.compile(optimizer="adam", loss={"grade_probs": CategoricalFocalLoss(gamma=2.0)})
    """

    def __init__(
        self, alpha=0.25, gamma=2.0, from_logits=False, name="categorical_focal_loss", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.alpha = list(alpha) if isinstance(alpha, (list, tuple)) else float(alpha)
        self.gamma = float(gamma)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        return categorical_focal_loss(
            y_true, y_pred, alpha=self.alpha, gamma=self.gamma, from_logits=self.from_logits
        )

    def _params(self):
        return {"alpha": self.alpha, "gamma": self.gamma, "from_logits": self.from_logits}


@tf.keras.utils.register_keras_serializable(package="drkeras")
class BinaryFocalLoss(_PerExampleLoss):
    """Keras loss for :func:`binary_focal_loss` on multi-label lesion maps (Lin et al. 2017).

    Example::

        model.compile(optimizer="adam", loss={"lesion_probs": BinaryFocalLoss(alpha=0.25)})
    """

    def __init__(
        self, alpha=0.25, gamma=2.0, from_logits=False, name="binary_focal_loss", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.alpha = None if alpha is None else float(alpha)
        self.gamma = float(gamma)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        return binary_focal_loss(
            y_true, y_pred, alpha=self.alpha, gamma=self.gamma, from_logits=self.from_logits
        )

    def _params(self):
        return {"alpha": self.alpha, "gamma": self.gamma, "from_logits": self.from_logits}


@tf.keras.utils.register_keras_serializable(package="drkeras")
class DiceLoss(_PerExampleLoss):
    """Keras loss for :func:`dice_loss` (soft Dice per example, averaged over channels).

    Example::

        model.compile(optimizer="adam", loss={"lesion_probs": DiceLoss(smooth=1.0)})
    """

    def __init__(self, smooth=1.0, name="dice_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        return dice_loss(y_true, y_pred, smooth=self.smooth)

    def _params(self):
        return {"smooth": self.smooth}


@tf.keras.utils.register_keras_serializable(package="drkeras")
class WeightedBinaryCrossentropy(_PerExampleLoss):
    """Keras loss for :func:`weighted_binary_crossentropy` (positive pixels weighted).

    Example::

        model.compile(optimizer="adam", loss={"lesion_probs": WeightedBinaryCrossentropy(10.0)})
    """

    def __init__(
        self, pos_weight=1.0, from_logits=False, name="weighted_binary_crossentropy", **kwargs
    ):
        super().__init__(name=name, **kwargs)
        self.pos_weight = (
            list(pos_weight) if isinstance(pos_weight, (list, tuple)) else float(pos_weight)
        )
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        return weighted_binary_crossentropy(
            y_true, y_pred, pos_weight=self.pos_weight, from_logits=self.from_logits
        )

    def _params(self):
        return {"pos_weight": self.pos_weight, "from_logits": self.from_logits}
