"""Networks of the patch-based semi-supervised GAN (Lecouat et al. 2018, Supplement Tables 3-4).

- :func:`build_discriminator`: the weight-normalised "conv-large DR" discriminator of Table 3
  (dropout, leaky ReLU 0.2, two network-in-network layers, global pooling, a dense layer of
  ``K`` class logits). It is also the patch classifier that is evaluated and exported, and, trained
  supervised, the "ConvNet" baseline of Tables 1-2.
- :func:`build_generator`: the generator of Table 4, from 100-d uniform noise through batch-normed
  transposed convolutions to a weight-normalised ``tanh`` output.
- :func:`build_resnet_patch_classifier` / :func:`build_resnet_image_classifier`: the ResNet34
  patch baseline (image-classifiers) and the direct image-level ResNet50 of Table 7.
- :func:`build_image_scorer`: a whole (preprocessed) photograph -> its 8 x 8 patch logits and
  the image abnormality score ``sum_j sigmoid(l_ij)`` (Sec. 2), for export.
- :func:`initialize_weight_norm`: the data-dependent weight-norm initialisation.

Weight normalisation is tensorflow-addons' ``WeightNormalization`` (``w = g v / ||v||``,
Salimans & Kingma 2016) with ``data_init=True``. Three things about it, all handled here:

1. Its data-dependent initialisation computes the pre-activation statistics with the RAW
   kernel ``v`` and sets ``g = 1 / std(v . x)``, ``b = -mean(v . x) / std(v . x)``; the layer
   then computes ``g (v / ||v||) . x + b``, which has unit variance and zero mean only when
   ``||v|| = 1`` for every output unit. :func:`initialize_weight_norm` therefore rescales each
   ``v`` to unit norm (which does not change the function, only the redundant scale of ``v``)
   before running the initialisation, and the outputs are then exactly standardised on the
   initialisation batch, as in Salimans & Kingma (tested).
2. It normalises over every kernel axis but the last. For ``Conv2DTranspose`` the last axis is
   the INPUT channels, so the norm would be per input channel and the data init breaks;
   :class:`TransposedConv2D` stores its kernel ``[kh, kw, in, out]`` so the generator's
   weight-normalised output layer is normalised per output channel.
3. The data-dependent initialisation assigns variables inside ``call``; under a
   ``MirroredStrategy`` each replica would initialise from its own share of the batch and the
   replicas' assignments conflict. :class:`WeightNorm` (tfa's layer with one override) runs it
   only outside a replica context: call :func:`initialize_weight_norm` once on one batch, eagerly
   and in cross-replica context (e.g. ``with strategy.scope():``), before distributed training;
   a replica-context call on an uninitialised layer fails with an error that says so.

Reading choices (where Tables 3-4 are silent or do not fit 32 x 32 patches):

- ``K = 2`` classes (healthy, diseased); Table 3's "dense 10" is the CIFAR-10 network it adapts.
  The fake class is the implicit ``K+1``-th logit fixed at 0 (Salimans et al. 2016, Sec. 5), so
  the patch logit of Sec. 2 is ``l = l_diseased - l_healthy`` (``sigmoid(l) = p(diseased | x,
  real)``), output ``patch_logits``.
- Feature matching uses the output of the second NiN layer (before global pooling), "the
  activation layer after the NiN layers" (Sec. 2), output ``features``.
- Table 4's generator starts at 6 x 6 and doubles four times, to 96 x 96, not the 32 x 32 the
  discriminator takes ("we downsampled the patches to 32 x 32"). We keep every layer of Table 4
  and downsample its 96 x 96 output by 3 x 3 average pooling, as the real patches are
  area-downsampled (128 -> 32). The ``tanh`` output in [-1, 1] is mapped to [0, 1] (``(t+1)/2``),
  the range of max-normalised real patches.
- Weights start from an isotropic Gaussian (std 0.05), biases at 0 (Table 6).
- The generator's batch norms are ``synchronized``: under a ``MirroredStrategy`` they normalise
  with the statistics of the global batch, so the update does not depend on the replica count
  (on one device they are ordinary batch norms).

Example::

    >>> d = build_discriminator(input_shape=(32, 32, 3), width=0.125)
    >>> sorted(d.output)
    ['class_logits', 'features', 'patch_logits']
    >>> g = build_generator(width=0.0625)
    >>> g.output_shape
    (None, 32, 32, 3)
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence, Tuple

import tensorflow as tf
from tensorflow import keras

from drkeras import keys
from drkeras.data import patches as patch_ops
from drkeras.models import blocks

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*TensorFlow Addons.*")
    import tensorflow_addons as tfa

__all__ = [
    "CLASS_LOGITS",
    "FEATURES",
    "LATENT_DIM",
    "PATCH_PROBS",
    "PatchGrid",
    "TransposedConv2D",
    "WeightNorm",
    "build_discriminator",
    "build_generator",
    "build_image_scorer",
    "build_resnet_image_classifier",
    "build_resnet_patch_classifier",
    "initialize_weight_norm",
    "weight_norm_layers",
]

CLASS_LOGITS = "class_logits"
FEATURES = "features"
PATCH_PROBS = "patch_probs"
LATENT_DIM = 100
INIT_STD = 0.05  # Table 6: isotropic Gaussian weight initialisation


def _init():
    return keras.initializers.RandomNormal(stddev=INIT_STD)


@keras.utils.register_keras_serializable(package="drkeras")
class WeightNorm(tfa.layers.WeightNormalization):
    """tensorflow-addons ``WeightNormalization`` whose data-dependent initialisation refuses to
    run inside a replica context (see the module docstring, point 3).

    Outside a distribution strategy, or in cross-replica context, it is tfa's layer unchanged.
    Inside ``strategy.run`` on an initialised layer nothing changes either (the initialisation
    branch is traced but not taken); on an uninitialised one the step fails with a clear message
    instead of initialising each replica differently.

    Example::

        layer = WeightNorm(keras.layers.Conv2D(8, 3, padding="same"), name="conv1")
    """

    def call(self, inputs):
        # Once initialised, skip tfa's tf.cond: tracing its initialisation branch (a second
        # convolution and the moments) in every call of every train step more than doubles
        # the graph. The flag is read outside the graph being traced (init_scope).
        with tf.init_scope():
            ready = tf.executing_eagerly() and bool(self._initialized.numpy())
        if not ready:
            return super().call(inputs)
        kernel = tf.nn.l2_normalize(self.v, axis=self.kernel_norm_axes) * self.g
        self.layer.kernel = kernel
        return self.layer(inputs)

    def _initialize_weights(self, inputs):
        if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context() is False:
            context = tf.distribute.get_replica_context()
            if context is not None and context.num_replicas_in_sync > 1:
                check = tf.debugging.assert_equal(
                    self._initialized,
                    True,
                    message=(
                        f"{self.name}: weight norm is not initialised; call "
                        "drkeras.models.ssl_gan.initialize_weight_norm(model, batch) once, "
                        "outside strategy.run, before distributed training"
                    ),
                )
                return [check]
        return super()._initialize_weights(inputs)

    def _data_dep_init(self, inputs):
        """tfa's data-dependent initialisation with its statistics in the variables' dtype.

        Under a mixed policy (``train.mixed_precision``) the layer computes in float16 or
        bfloat16 while ``g`` and the bias are float32 variables; tfa's version assigns the
        low-precision statistics to them and fails. Here the pre-activations of the raw kernel
        are cast to the variables' dtype before the moments; otherwise as tfa: ``g <- g /
        std``, ``b <- -mean / std``.
        """
        with tf.name_scope("data_dep_init"):
            dtype = self.g.dtype
            x_init = tf.cast(self._naked_clone_layer(inputs), dtype)
            m_init, v_init = tf.nn.moments(x_init, list(range(x_init.shape.rank - 1)))
            scale_init = 1.0 / tf.math.sqrt(v_init + 1e-10)
            g_tensor = self.g.assign(tf.cast(self.g, dtype) * scale_init)
            if getattr(self.layer, "bias", None) is None:
                return [g_tensor]
            return [g_tensor, self.layer.bias.assign(-m_init * scale_init)]


@keras.utils.register_keras_serializable(package="drkeras")
class TransposedConv2D(keras.layers.Layer):
    """A 2-D transposed convolution ("same" padding) whose kernel is stored ``[kh, kw, in, out]``.

    Keras' ``Conv2DTranspose`` stores ``[kh, kw, out, in]``; weight normalisation (which
    normalises over every axis but the last) needs the output channels last. The output is
    ``stride`` times larger than the input.

    Example::

        >>> TransposedConv2D(4, 5, strides=2)(tf.zeros([1, 3, 3, 2])).shape.as_list()
        [1, 6, 6, 4]
    """

    def __init__(
        self,
        filters: int,
        kernel_size: int,
        *,
        strides: int = 2,
        use_bias: bool = True,
        activation=None,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.filters = int(filters)
        self.kernel_size = int(kernel_size)
        self.strides = int(strides)
        self.use_bias = bool(use_bias)
        self.activation = keras.activations.get(activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        channels = int(input_shape[-1])
        k = self.kernel_size
        # a fresh initializer: tfa's data-init copy of this layer would otherwise reuse it
        init = self.kernel_initializer
        init = init.__class__.from_config(init.get_config())
        self.kernel = self.add_weight(
            name="kernel", shape=(k, k, channels, self.filters), initializer=init
        )
        self.bias = (
            self.add_weight(name="bias", shape=(self.filters,), initializer="zeros")
            if self.use_bias
            else None
        )
        super().build(input_shape)

    def call(self, inputs):
        shape = tf.shape(inputs)
        out_shape = tf.stack(
            [shape[0], shape[1] * self.strides, shape[2] * self.strides, self.filters]
        )
        y = tf.nn.conv2d_transpose(
            inputs,
            tf.transpose(self.kernel, [0, 1, 3, 2]),
            out_shape,
            strides=self.strides,
            padding="SAME",
        )
        if self.bias is not None:
            y = y + self.bias
        # tfa's weight norm sets the activation of its data-init copy to None
        return y if self.activation is None else self.activation(y)

    def compute_output_shape(self, input_shape):
        s = self.strides
        h, w = input_shape[1], input_shape[2]
        return tf.TensorShape(
            [input_shape[0], None if h is None else h * s, None if w is None else w * s,
             self.filters]
        )  # fmt: skip

    def get_config(self):
        config = super().get_config()
        config.update(
            filters=self.filters,
            kernel_size=self.kernel_size,
            strides=self.strides,
            use_bias=self.use_bias,
            activation=keras.activations.serialize(self.activation),
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config


@keras.utils.register_keras_serializable(package="drkeras")
class BinaryLogit(keras.layers.Layer):
    """``l_1 - l_0`` of two class logits: the logit of ``p(diseased | x, real)`` (Sec. 2)."""

    def call(self, logits):
        return logits[..., 1] - logits[..., 0]


def _wn_conv(x, filters, *, kernel_size, strides, padding, name, leak):
    conv = keras.layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding, kernel_initializer=_init()
    )
    x = WeightNorm(conv, data_init=True, name=name)(x)
    return keras.layers.LeakyReLU(leak, name=f"{name}_lrelu")(x)


def build_discriminator(
    *,
    input_shape: Sequence[int] = (32, 32, 3),
    num_classes: int = 2,
    widths: Tuple[int, int] = (96, 192),
    nin_width: int = 192,
    width: float = 1.0,
    input_dropout: float = 0.2,
    dropout: float = 0.5,
    leak: float = 0.2,
    name: str = "ssl_gan_discriminator",
) -> keras.Model:
    """The discriminator / patch classifier of Table 3 ("conv-large DR").

    Layers (every convolution weight-normalised and followed by a leaky ReLU):
    dropout ``input_dropout``; three 3x3 convolutions of ``widths[0]`` (the third with stride
    2); dropout; three 3x3 of ``widths[1]`` (stride 2 last); dropout; two 3x3 of ``widths[1]``
    with no padding and stride 2; two NiN (1x1) layers of ``nin_width``; global average
    pooling; a weight-normalised dense layer of ``num_classes`` logits.

    Args:
        input_shape: patch shape ``(32, 32, 3)`` in the paper; the two unpadded stride-2
            convolutions need at least 32 pixels.
        num_classes: ``K`` real classes (2: healthy, diseased).
        widths, nin_width: filters of the two convolution stages and of the NiN layers.
        width: multiplier of every filter count (1.0 = the paper's; smaller for tests).
        input_dropout, dropout: dropout rates (0.2 and 0.5 in Table 3).
        leak: leaky ReLU slope (0.2, Table 6).
        name: model name.

    Returns:
        A functional model from ``patch`` ``[B, H, W, 3]`` (values in [0, 1]) to
        ``{"class_logits": [B, K], "features": [B, h, w, nin] (the NiN activations used by
        feature matching), "patch_logits": [B] (K = 2 only)}``.

    Example::

        d = build_discriminator(input_shape=(32, 32, 3))
        d(patches)["patch_logits"]   # [B]
    """
    shape = blocks.check_input_shape(input_shape, what=name, min_size=32, channels=3)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 real classes, got {num_classes}")
    for rate, what in ((input_dropout, "input_dropout"), (dropout, "dropout")):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"{what} must be in [0, 1), got {rate}")
    w1, w2 = (blocks.scaled_filters(f, width) for f in widths)
    nin = blocks.scaled_filters(nin_width, width)
    inputs = keras.Input(shape, name="patch")
    x = keras.layers.Dropout(input_dropout, name="disc_input_dropout")(inputs)
    for stage, filters in ((1, w1), (2, w2)):
        for j in (1, 2, 3):
            x = _wn_conv(
                x,
                filters,
                kernel_size=3,
                strides=2 if j == 3 else 1,
                padding="same",
                name=f"disc_stage{stage}_conv{j}",
                leak=leak,
            )
        x = keras.layers.Dropout(dropout, name=f"disc_stage{stage}_dropout")(x)
    for j in (1, 2):
        x = _wn_conv(
            x, w2, kernel_size=3, strides=2, padding="valid", name=f"disc_stage3_conv{j}", leak=leak
        )
    for j in (1, 2):
        x = _wn_conv(x, nin, kernel_size=1, strides=1, padding="valid", name=f"disc_nin{j}",
                     leak=leak)  # fmt: skip
    features = keras.layers.Activation("linear", dtype="float32", name=FEATURES)(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="disc_global_pool")(x)
    dense = keras.layers.Dense(num_classes, kernel_initializer=_init())
    logits = WeightNorm(dense, data_init=True, name="disc_dense")(pooled)
    logits = keras.layers.Activation("linear", dtype="float32", name=CLASS_LOGITS)(logits)
    outputs = {CLASS_LOGITS: logits, FEATURES: features}
    if num_classes == 2:
        outputs[keys.PATCH_LOGITS] = BinaryLogit(name=keys.PATCH_LOGITS)(logits)
    return keras.Model(inputs, outputs, name=name)


def build_generator(
    *,
    latent_dim: int = LATENT_DIM,
    start_size: int = 6,
    widths: Tuple[int, int, int, int] = (512, 256, 128, 128),
    width: float = 1.0,
    output_size: int = 32,
    channels: int = 3,
    name: str = "ssl_gan_generator",
) -> keras.Model:
    """The generator of Table 4.

    ``z`` (``latent_dim`` uniform noise) -> dense ``start_size^2 x widths[0]``, batch norm, ReLU
    -> three 5x5 stride-2 transposed convolutions of ``widths[1:]``, each batch norm + ReLU ->
    a weight-normalised 5x5 stride-2 transposed convolution to ``channels``, ``tanh`` ->
    average pooling from ``16 * start_size`` down to ``output_size`` (3 x 3 for the paper's
    96 -> 32, see the module docstring) -> ``(t + 1) / 2`` into [0, 1].

    Args:
        latent_dim: noise dimension (100).
        start_size: side of the first feature map (6).
        widths: filters of the dense layer and the three batch-normed transposed convolutions.
        width: multiplier of those filter counts.
        output_size: side of the generated patches; ``16 * start_size`` must be a multiple.
        channels: output channels (3).
        name: model name.

    Returns:
        A functional model from ``noise`` ``[B, latent_dim]`` to patches
        ``[B, output_size, output_size, channels]`` in [0, 1].

    Example::

        g = build_generator()
        g(tf.random.uniform([4, 100])).shape   # (4, 32, 32, 3)
    """
    if len(widths) != 4:
        raise ValueError(f"widths must hold 4 filter counts (Table 4), got {widths}")
    full = 16 * int(start_size)
    if output_size < 1 or full % output_size:
        raise ValueError(
            f"output_size={output_size} must divide the generator's native size 16 * start_size "
            f"= {full}"
        )
    w = [blocks.scaled_filters(f, width) for f in widths]
    z = keras.Input((latent_dim,), name="noise")
    x = keras.layers.Dense(
        start_size * start_size * w[0], use_bias=False, kernel_initializer=_init(), name="gen_dense"
    )(z)
    # Synchronized: under a MirroredStrategy the statistics are those of the global batch, so
    # the generator's output (and the whole update) does not depend on the replica count.
    x = keras.layers.BatchNormalization(synchronized=True, name="gen_dense_bn")(x)
    x = keras.layers.ReLU(name="gen_dense_relu")(x)
    x = keras.layers.Reshape((start_size, start_size, w[0]), name="gen_reshape")(x)
    for i, filters in enumerate(w[1:], start=1):
        x = TransposedConv2D(
            filters, 5, strides=2, use_bias=False, kernel_initializer=_init(), name=f"gen_up{i}"
        )(x)
        x = keras.layers.BatchNormalization(synchronized=True, name=f"gen_up{i}_bn")(x)
        x = keras.layers.ReLU(name=f"gen_up{i}_relu")(x)
    out = TransposedConv2D(channels, 5, strides=2, kernel_initializer=_init())
    x = WeightNorm(out, data_init=True, name="gen_out")(x)
    x = keras.layers.Activation("tanh", name="gen_tanh")(x)
    if full != output_size:
        factor = full // output_size
        x = keras.layers.AveragePooling2D(factor, name="gen_downsample")(x)
    x = keras.layers.Rescaling(0.5, offset=0.5, dtype="float32", name="generated_patch")(x)
    return keras.Model(z, x, name=name)


def weight_norm_layers(model: keras.Model) -> list:
    """Every tfa ``WeightNormalization`` layer of ``model`` (nested models included), in order."""
    found = []
    for layer in model.layers:
        if isinstance(layer, tfa.layers.WeightNormalization):
            found.append(layer)
        elif isinstance(layer, keras.Model):
            found += weight_norm_layers(layer)
    return found


def initialize_weight_norm(model: keras.Model, inputs, *, training: bool = False) -> None:
    """Data-dependent weight-norm initialisation of every ``WeightNorm`` layer of ``model``.

    Each ``v`` is first rescaled to unit norm per output unit (see the module docstring, point
    1), then ``model`` is called once, eagerly, on ``inputs``: layer after layer, each
    uninitialised layer sets ``g`` and its bias so its pre-activations on this batch have mean
    0 and variance 1, and later layers see the already initialised earlier ones. Layers that
    are already initialised are left alone (a second call changes nothing).

    Call it in cross-replica context (not inside ``strategy.run``), e.g. within
    ``strategy.scope()``: every replica then receives the same values.

    Args:
        model: a model holding ``WeightNorm`` layers.
        inputs: one batch of the model's inputs (real patches for the discriminator, noise for
            the generator), large enough for stable statistics.
        training: the call's ``training`` flag (False: no dropout; the generator is
            initialised with ``training=True`` so its batch norms use batch statistics).

    Example::

        initialize_weight_norm(discriminator, patches[:500])
    """
    if tf.distribute.has_strategy() and not tf.distribute.in_cross_replica_context():
        raise RuntimeError(
            "initialize_weight_norm must run in cross-replica context, not inside strategy.run"
        )
    layers = weight_norm_layers(model)
    if not layers:
        raise ValueError(f"{model.name} has no WeightNorm layers to initialise")
    for layer in layers:
        if not bool(layer._initialized.numpy()):
            unit = tf.nn.l2_normalize(layer.v, axis=layer.kernel_norm_axes)
            layer.v.assign(unit)
            # tfa's data init runs a copy of the layer holding the kernel it had when built
            layer._naked_clone_layer.kernel.assign(unit)
    model(inputs, training=training)
    pending = [layer.name for layer in layers if not bool(layer._initialized.numpy())]
    if pending:
        raise RuntimeError(f"weight norm of {pending} was not initialised by the call")


class PatchGrid(keras.layers.Layer):
    """A square image batch ``[B, S, S, C]`` to its patch grid ``[B, grid*grid, P, P, C]``
    (:func:`drkeras.data.patches.image_patches`: row-major, area-downsampled to ``P``)."""

    def __init__(self, grid: int = 8, patch_size: int = 32, **kwargs):
        super().__init__(**kwargs)
        self.grid = int(grid)
        self.patch_size = int(patch_size)

    def call(self, images):
        p = self.patch_size
        spec = tf.TensorSpec([self.grid * self.grid, p, p, images.shape[-1]], images.dtype)
        return tf.map_fn(
            lambda im: patch_ops.image_patches(im, grid=self.grid, patch_size=p),
            images,
            fn_output_signature=spec,
        )

    def get_config(self):
        return {**super().get_config(), "grid": self.grid, "patch_size": self.patch_size}


def build_image_scorer(
    patch_classifier: keras.Model,
    *,
    image_size: int,
    grid: int = 8,
    name: str = "ssl_gan_image_scorer",
) -> keras.Model:
    """A whole preprocessed photograph -> patch logits, patch probabilities and image score.

    The image (``[B, S, S, 3]``: FOV-cropped, resized to ``S = image_size`` and normalised
    exactly like training, e.g. by :func:`drkeras.data.preprocess.prepare_image`) is cut into
    the ``grid x grid`` patch grid of :mod:`drkeras.data.patches`, every patch is classified,
    and the image abnormality score ``score_i = sum_j sigmoid(l_ij)`` (Lecouat et al. 2018,
    Sec. 2) is their sum.

    Args:
        patch_classifier: a model from patches ``[N, P, P, 3]`` to ``patch_logits`` ``[N]`` (a
            dict output with that key, or a single output).
        image_size: ``S``, divisible by ``grid``.
        grid: patches per side (8).
        name: model name.

    Returns:
        A functional model from ``image`` to ``{"patch_logits": [B, grid, grid],
        "patch_probs": [B, grid, grid], "image_score": [B]}``.

    Example::

        scorer = build_image_scorer(ema_discriminator, image_size=1024)
        scorer(images)["image_score"]
    """
    if image_size % grid:
        raise ValueError(f"image_size={image_size} must be divisible by grid={grid}")
    patch_size = int(patch_classifier.inputs[0].shape[1])
    image = keras.Input((image_size, image_size, 3), name=keys.IMAGE)
    grid_patches = PatchGrid(grid, patch_size, name="patch_grid")(image)
    flat = keras.layers.Lambda(
        lambda t: tf.reshape(t, [-1, patch_size, patch_size, 3]), name="patches_batch"
    )(grid_patches)
    out = patch_classifier(flat)
    logits = out[keys.PATCH_LOGITS] if isinstance(out, dict) else out
    # per image: the classifier's batch is images x patches, so Reshape (per example) cannot
    logits = keras.layers.Lambda(
        lambda t: tf.reshape(tf.cast(t, tf.float32), [-1, grid, grid]), name=keys.PATCH_LOGITS
    )(logits)
    probs = keras.layers.Activation("sigmoid", dtype="float32", name=PATCH_PROBS)(logits)
    score = keras.layers.Lambda(
        lambda p: tf.reduce_sum(p, axis=[1, 2]), dtype="float32", name=keys.IMAGE_SCORE
    )(probs)
    return keras.Model(
        image,
        {keys.PATCH_LOGITS: logits, PATCH_PROBS: probs, keys.IMAGE_SCORE: score},
        name=name,
    )


def _resnet_base(name: str, inputs, weights: Optional[str], option: str):
    from classification_models.tfkeras import Classifiers

    constructor, _ = Classifiers.get(name)
    with blocks.pretrained_download_guard(name, option):
        return constructor(input_tensor=inputs, include_top=False, weights=weights)


def _binary_head(features, prefix: str) -> Dict[str, tf.Tensor]:
    x = keras.layers.GlobalAveragePooling2D(name=f"{prefix}_pool")(features)
    logit = keras.layers.Dense(1, dtype="float32", name=f"{prefix}_logit")(x)
    return keras.layers.Reshape((), dtype="float32", name=keys.PATCH_LOGITS)(logit)


def build_resnet_patch_classifier(
    *,
    input_shape: Sequence[int] = (32, 32, 3),
    depth: int = 34,
    encoder_weights: Optional[str] = None,
    weights_option: str = blocks.WEIGHTS_OPTION,
    name: str = "resnet34_patch",
) -> keras.Model:
    """The ResNet34 patch baseline of Tables 1-2 (image-classifiers' ResNet, He et al. 2016).

    A ResNet without its classifier, global average pooling and one dense logit.

    Args:
        input_shape: patch shape (32 x 32: the ResNet's five downsamplings reach 1 x 1).
        depth: 18, 34 or 50.
        encoder_weights: ``None`` or ``"imagenet"`` (downloads).
        weights_option: the config key that sets ``encoder_weights``, named by the error when
            the download fails (``method.resnet34_weights`` in ``experiments/ssl_gan.py``).
        name: model name.

    Returns:
        A functional model from ``patch`` to ``{"patch_logits": [B]}``.

    Example::

        build_resnet_patch_classifier()(patches)["patch_logits"]
    """
    if depth not in (18, 34, 50):
        raise ValueError(f"depth must be 18, 34 or 50, got {depth}")
    shape = blocks.check_input_shape(input_shape, what=name, min_size=32, channels=3)
    inputs = keras.Input(shape, name="patch")
    # image-classifiers' ResNets normalise their input with a batch norm of their own
    base = _resnet_base(f"resnet{depth}", inputs, encoder_weights, weights_option)
    return keras.Model(inputs, {keys.PATCH_LOGITS: _binary_head(base.output, "cls")}, name=name)


def build_resnet_image_classifier(
    *,
    input_shape: Sequence[int],
    encoder_weights: Optional[str] = None,
    weights_option: str = blocks.WEIGHTS_OPTION,
    name: str = "resnet50_image",
) -> keras.Model:
    """Table 7's direct image-level ResNet50 (``keras.applications``), with or without ImageNet
    pretraining, on whole (max-normalised) photographs.

    The input in [0, 1] is scaled to the 0-255 "caffe" convention the ImageNet weights expect
    (``keras.applications.resnet50.preprocess_input``) inside the model. ``weights_option`` is
    the config key that sets ``encoder_weights`` (``method.pretrained_weights`` in
    ``experiments/ssl_gan.py``): a failed download names it.

    Returns:
        A functional model from ``image`` to ``{"patch_logits": [B]}`` (one logit per image;
        the key is shared with the patch classifiers so one evaluation path serves all).

    Example::

        build_resnet_image_classifier(input_shape=(256, 256, 3), encoder_weights="imagenet")
    """
    shape = blocks.check_input_shape(input_shape, what=name, min_size=32, channels=3)
    inputs = keras.Input(shape, name=keys.IMAGE)
    x = keras.layers.Lambda(
        lambda t: keras.applications.resnet50.preprocess_input(t * 255.0), name="caffe_scaling"
    )(inputs)
    with blocks.pretrained_download_guard("ResNet50", weights_option):
        base = keras.applications.ResNet50(
            include_top=False, weights=encoder_weights, input_tensor=x
        )
    return keras.Model(inputs, {keys.PATCH_LOGITS: _binary_head(base.output, "cls")}, name=name)
