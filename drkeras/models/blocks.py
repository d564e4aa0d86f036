"""Building blocks shared by the network builders of :mod:`drkeras.models`.

- :func:`vgg16_encoder`: the five convolutional blocks of VGG16 with the layer names of
  ``keras.applications.VGG16`` (``block{b}_conv{c}``, ``block{b}_pool``), so ImageNet weights load
  by name (:func:`load_vgg16_encoder_weights`), and a ``width`` multiplier for tests and quick runs.
- :func:`vgg16_decoder`: the decoder that mirrors VGG16 with transposed convolutions and
  He-normal initialisation (Foo et al. 2020, "Decoder Section"), one stage per encoder block.
- :func:`grading_head` / :func:`segmentation_head`: the named output heads.
- :func:`pretrained_download_guard`: turns a failed weight download into a
  :class:`PretrainedWeightsUnavailable` that names the option to change (``model.encoder_weights``).

Layer names follow docs/design.md (section 5): encoder layers keep the ``keras.applications``
names, decoder layers are ``decoder_stage{b}_{upconv,concat,conv{j}}`` where ``b`` is the encoder
block whose skip the stage receives, outputs are named by :mod:`drkeras.keys`.
"""

from __future__ import annotations

import contextlib
import numbers
import os
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
from tensorflow import keras

from drkeras import keys

__all__ = [
    "VGG16_BLOCKS",
    "VGG16_DOWNSAMPLING",
    "VGG16_OUTPUT_LAYER",
    "VGG16_SKIP_LAYERS",
    "WEIGHTS_OPTION",
    "PretrainedWeightsUnavailable",
    "check_input_shape",
    "grading_head",
    "he_initialise",
    "load_vgg16_encoder_weights",
    "pretrained_download_guard",
    "scaled_filters",
    "seg_output_name",
    "segmentation_head",
    "vgg16_decoder",
    "vgg16_encoder",
    "vgg16_weights_file",
]

# (filters, convolutions) of the five blocks of VGG16 (Simonyan & Zisserman 2014, config D).
VGG16_BLOCKS: Tuple[Tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
# The last convolution of each block: the feature map taken just before each max-pool.
VGG16_SKIP_LAYERS: Tuple[str, ...] = tuple(
    f"block{b}_conv{n}" for b, (_, n) in enumerate(VGG16_BLOCKS, start=1)
)
VGG16_OUTPUT_LAYER = "block5_pool"
VGG16_DOWNSAMPLING = 2 ** len(VGG16_BLOCKS)

# The config key users change to avoid a download (docs/design.md section 1).
WEIGHTS_OPTION = "model.encoder_weights"

# The same file keras.applications.VGG16(include_top=False) downloads, so one cached copy in
# ~/.keras/models serves both.
_VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
_VGG16_NOTOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/" + _VGG16_NOTOP_FILE
)
_VGG16_NOTOP_MD5 = "6d6bbae143d832006294945121d1f1fc"


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were requested but could not be obtained (offline, no cached file).

    Attributes:
        option: the config key whose ``none`` value builds without them (also in the message).
    """

    def __init__(self, message: str, option: str = WEIGHTS_OPTION):
        super().__init__(message)
        self.option = option


def scaled_filters(filters: int, width: float) -> int:
    """``filters * width`` rounded, at least 1: the filter count of a slimmed network.

    Example: ``scaled_filters(512, 0.125) == 64``.
    """
    if not width > 0:
        raise ValueError(f"width must be > 0 (a filter multiplier), got {width!r}")
    return max(1, int(round(filters * width)))


def seg_output_name(activation: str) -> str:
    """The output key of a segmentation head with this final activation.

    ``"softmax"`` (one class per pixel, mutually exclusive) gives :data:`drkeras.keys.SEG_PROBS`;
    ``"sigmoid"`` (independent per-channel probabilities, channels may overlap) gives
    :data:`drkeras.keys.LESION_PROBS`. Example: ``seg_output_name("softmax") == "seg_probs"``.
    """
    if activation == "softmax":
        return keys.SEG_PROBS
    if activation == "sigmoid":
        return keys.LESION_PROBS
    raise ValueError(f"seg_activation must be 'softmax' or 'sigmoid', got {activation!r}")


def check_input_shape(
    input_shape: Sequence[Optional[int]],
    *,
    what: str,
    min_size: int,
    multiple: int = 1,
    channels: Optional[int] = None,
) -> Tuple[Optional[int], Optional[int], int]:
    """Validate an ``(height, width, channels)`` input shape and return it as a tuple.

    Args:
        input_shape: ``(H, W, C)``; ``H``/``W`` may be ``None`` (any size at call time).
        what: the network's name, used in the error message.
        min_size: smallest allowed height/width.
        multiple: height/width must be divisible by this (the network's total downsampling).
        channels: required channel count, if any (3 for ImageNet weights).

    Raises:
        ValueError: naming the network, the shape received and what was expected.

    Example: ``check_input_shape((64, 64, 3), what="vgg16_unet", min_size=32, multiple=32)``.
    """
    shape = tuple(int(s) if isinstance(s, numbers.Integral) else s for s in input_shape)
    expected = (
        f"expected (height, width, channels) with height and width at least {min_size}"
        + (f" and divisible by {multiple}" if multiple > 1 else "")
        + (f", and {channels} channels" if channels else "")
    )
    if len(shape) != 3 or not isinstance(shape[2], int) or shape[2] < 1:
        raise ValueError(f"{what}: input_shape {shape!r} is invalid; {expected}")
    for side in shape[:2]:
        if side is None:
            continue
        if not isinstance(side, int) or side < min_size or side % multiple:
            raise ValueError(f"{what}: input_shape {shape!r} is invalid; {expected}")
    if channels is not None and shape[2] != channels:
        raise ValueError(f"{what}: input_shape {shape!r} is invalid; {expected}")
    return shape


def vgg16_encoder(inputs: tf.Tensor, *, width: float = 1.0) -> Tuple[List[tf.Tensor], tf.Tensor]:
    """The 13 convolutions and 5 max-pools of VGG16, named as in ``keras.applications.VGG16``.

    Kernels start He-normal. The papers load ImageNet weights over them; from random weights
    (mini presets, offline runs) He scaling keeps the activations' spread through the 13 ReLU
    convolutions, where Keras's default Glorot initialisation halves it at every one (std 0.13
    after block 2, 0.003 after block 5 at quarter width and 128 px, measured): MTUnet's
    segmenter then predicted background only.

    Args:
        inputs: image tensor ``(batch, H, W, C)``.
        width: filter multiplier (1.0 = VGG16's 64..512 filters).

    Returns:
        ``(skips, output)``: ``skips[b-1]`` is the output of block ``b``'s last convolution
        (``VGG16_SKIP_LAYERS``, taken before every max-pool, Foo et al. 2020 "Encoder Section"),
        ``output`` is ``block5_pool`` (stride 32).

    Example::

        x = keras.Input((64, 64, 3))
        skips, bottom = vgg16_encoder(x, width=0.125)   # bottom: (None, 2, 2, 64)
    """
    x = inputs
    skips = []
    for block, (filters, convs) in enumerate(VGG16_BLOCKS, start=1):
        for conv in range(1, convs + 1):
            x = keras.layers.Conv2D(
                scaled_filters(filters, width),
                3,
                padding="same",
                activation="relu",
                kernel_initializer="he_normal",
                name=f"block{block}_conv{conv}",
            )(x)
        skips.append(x)
        x = keras.layers.MaxPooling2D(2, strides=2, name=f"block{block}_pool")(x)
    return skips, x


def he_initialise(model: keras.Model) -> keras.Model:
    """Redraw every ``Conv2D`` kernel of ``model`` He-normal (biases untouched) and return it:
    for ``keras.applications`` networks without batch norm (VGG) built from random weights,
    whose Glorot default halves the activations' spread at every ReLU convolution."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.kernel.assign(
                keras.initializers.HeNormal()(layer.kernel.shape, layer.kernel.dtype)
            )
    return model


def vgg16_decoder(
    bottom: tf.Tensor, skips: Sequence[tf.Tensor], *, width: float = 1.0
) -> tf.Tensor:
    """A UNet decoder that mirrors VGG16, from ``block5_pool`` back to the input resolution.

    Stage ``b`` (``b`` = 5, 4, ..., 1) upsamples by 2 with a 3x3 transposed convolution
    (``decoder_stage{b}_upconv``), concatenates the skip of encoder block ``b``
    (``decoder_stage{b}_concat``) and applies as many 3x3 convolutions as VGG16's block ``b``
    with its filter count (``decoder_stage{b}_conv{j}``). All kernels are He-normal, no batch
    norm (Foo et al. 2020, "Decoder Section": transposed convolutions, decoder mirroring VGG16;
    "Performance Study": decoder initialised by He Normal).

    Args:
        bottom: the encoder output (``block5_pool``).
        skips: the five skip tensors of :func:`vgg16_encoder`, shallow to deep.
        width: filter multiplier.

    Returns:
        The last decoder feature map, ``(batch, H, W, 64 * width)``.

    Example::

        skips, bottom = vgg16_encoder(x, width=0.125)
        features = vgg16_decoder(bottom, skips, width=0.125)
    """
    if len(skips) != len(VGG16_BLOCKS):
        raise ValueError(f"vgg16_decoder needs {len(VGG16_BLOCKS)} skips, got {len(skips)}")
    x = bottom
    for block in range(len(VGG16_BLOCKS), 0, -1):
        filters, convs = VGG16_BLOCKS[block - 1]
        filters = scaled_filters(filters, width)
        x = keras.layers.Conv2DTranspose(
            filters,
            3,
            strides=2,
            padding="same",
            activation="relu",
            kernel_initializer="he_normal",
            name=f"decoder_stage{block}_upconv",
        )(x)
        x = keras.layers.Concatenate(name=f"decoder_stage{block}_concat")([x, skips[block - 1]])
        for conv in range(1, convs + 1):
            x = keras.layers.Conv2D(
                filters,
                3,
                padding="same",
                activation="relu",
                kernel_initializer="he_normal",
                name=f"decoder_stage{block}_conv{conv}",
            )(x)
    return x


def segmentation_head(
    features: tf.Tensor, *, num_classes: int, activation: str = "softmax"
) -> Dict[str, tf.Tensor]:
    """A 1x1 convolution to per-pixel class logits and its softmax or sigmoid.

    Softmax makes the pixel classes mutually exclusive (Foo et al. 2020, "Decoder Section": "we
    replace the last sigmoid activation function with a softmax operation since a pixel cannot
    belong to multiple classes"); sigmoid keeps them independent.

    Returns:
        ``{keys.LESION_LOGITS: logits, seg_output_name(activation): probs}``, both float32 (so
        mixed precision keeps the losses stable).

    Example: ``outs = segmentation_head(features, num_classes=4)`` gives ``outs["seg_probs"]``.
    """
    if num_classes < 1:
        raise ValueError(f"num_seg_classes must be >= 1, got {num_classes}")
    probs_name = seg_output_name(activation)
    logits = keras.layers.Conv2D(
        num_classes,
        1,
        kernel_initializer="he_normal",
        dtype="float32",
        name=keys.LESION_LOGITS,
    )(features)
    probs = keras.layers.Activation(activation, dtype="float32", name=probs_name)(logits)
    return {keys.LESION_LOGITS: logits, probs_name: probs}


def grading_head(
    features: tf.Tensor,
    *,
    num_grades: int = keys.NUM_GRADES,
    pooling: str = "max",
    hidden: Sequence[int] = (),
    dropout: float = 0.0,
) -> Dict[str, tf.Tensor]:
    """Global pooling, optional hidden dense layers, and a dense softmax over the DR grades.

    MTUnet replaces VGG16's fully connected layers by global max pooling and a dense layer
    (Foo et al. 2020, "Encoder Section"); PLDMLT adds "a pooling layer with a fully connected
    layer" (section 3.2), which ``pooling="avg"`` gives.

    Args:
        features: a ``(batch, h, w, c)`` feature map.
        num_grades: number of grades (5 on the ICDRS scale).
        pooling: ``"max"`` (``GlobalMaxPooling2D``) or ``"avg"`` (``GlobalAveragePooling2D``).
        hidden: units of ReLU dense layers between pooling and the output (``grade_dense{i}``).
        dropout: rate of the dropout after the pooling and after every hidden layer.

    Returns:
        ``{keys.GRADE_LOGITS: logits, keys.GRADE_PROBS: probs}`` (float32).

    Example: ``grading_head(block5_pool, num_grades=5, pooling="max")``.
    """
    if num_grades < 2:
        raise ValueError(f"num_grades must be >= 2 (or None for no grading head), got {num_grades}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    pools = {"max": keras.layers.GlobalMaxPooling2D, "avg": keras.layers.GlobalAveragePooling2D}
    if pooling not in pools:
        raise ValueError(f"grade_pooling must be 'max' or 'avg', got {pooling!r}")
    x = pools[pooling](name="grade_pool")(features)
    for i, units in enumerate((None, *hidden)):
        if units is not None:
            x = keras.layers.Dense(units, activation="relu", name=f"grade_dense{i}")(x)
        if dropout > 0:
            x = keras.layers.Dropout(dropout, name=f"grade_dropout{i}")(x)
    logits = keras.layers.Dense(num_grades, dtype="float32", name=keys.GRADE_LOGITS)(x)
    probs = keras.layers.Activation("softmax", dtype="float32", name=keys.GRADE_PROBS)(logits)
    return {keys.GRADE_LOGITS: logits, keys.GRADE_PROBS: probs}


def _is_download_failure(err: BaseException) -> bool:
    # keras' get_file raises a bare Exception("URL fetch failure on ...") when offline;
    # requests/urllib raise OSError subclasses (ConnectionError, URLError).
    return isinstance(err, OSError) or "fetch failure" in str(err).lower()


@contextlib.contextmanager
def pretrained_download_guard(what: str, option: str = WEIGHTS_OPTION):
    """Re-raise a failed pretrained-weight download as :class:`PretrainedWeightsUnavailable`.

    The message names ``what`` could not be downloaded and the config option to change, so an
    offline run with ``encoder_weights="imagenet"`` says how to proceed. Other errors pass.

    Args:
        what: the network whose weights are downloaded.
        option: the config key the CALLER reads these weights from (``model.encoder_weights``
            by default; an experiment with its own key passes it, e.g. ``experiments/ssl_gan.py``
            names ``method.pretrained_weights``), so ``--set <option>=none`` is a key the run
            accepts and reads. Kept on the error as ``.option``.

    Example::

        with pretrained_download_guard("DenseNet201"):
            base = keras.applications.DenseNet201(weights="imagenet", include_top=False)
    """
    try:
        yield
    except Exception as err:
        if not _is_download_failure(err):
            raise
        raise PretrainedWeightsUnavailable(
            f"could not download the ImageNet weights of {what} ({err}). Pretrained weights "
            "need a network connection (or the file already cached in ~/.keras/models). To "
            f"build with random weights instead set {option}=none (--set {option}=none on the "
            "command line, encoder_weights=None in Python).",
            option,
        ) from err


def _h5_layer_names(path: str) -> List[str]:
    import h5py  # a TensorFlow dependency; imported here because only weight files need it

    with h5py.File(path, "r") as f:
        group = f["model_weights"] if "model_weights" in f else f
        return [n.decode() if isinstance(n, bytes) else n for n in group.attrs["layer_names"]]


def vgg16_weights_file(encoder_weights: Optional[str]) -> Optional[str]:
    """The checked HDF5 file that ``encoder_weights`` names, downloading ImageNet's if needed.

    Call it before building a network, so a missing download or a wrong file fails at once.

    Args:
        encoder_weights: ``None``, ``"imagenet"`` (the ``keras.applications`` VGG16 no-top
            file, downloaded once into ``~/.keras/models``) or the path of an HDF5 weights
            file with ``keras.applications.VGG16`` layer names (e.g. written by
            ``keras.applications.VGG16(include_top=False).save_weights("vgg16.h5")``).

    Returns:
        The file's path, or ``None`` for ``encoder_weights=None``.

    Raises:
        PretrainedWeightsUnavailable: ``"imagenet"`` requested and the download failed.
        ValueError: the value is not one of the above, or the file lacks VGG16's layers.

    Example: ``path = vgg16_weights_file("imagenet")``.
    """
    if encoder_weights is None:
        return None
    if encoder_weights == "imagenet":
        with pretrained_download_guard("VGG16"):
            path = keras.utils.get_file(
                _VGG16_NOTOP_FILE,
                _VGG16_NOTOP_URL,
                cache_subdir="models",
                file_hash=_VGG16_NOTOP_MD5,
            )
    elif isinstance(encoder_weights, (str, os.PathLike)) and os.path.isfile(encoder_weights):
        path = os.fspath(encoder_weights)
    else:
        raise ValueError(
            f"{WEIGHTS_OPTION}={encoder_weights!r}: expected None, 'imagenet' or the path of an "
            "existing HDF5 weights file with keras.applications.VGG16 layer names"
        )
    conv_names = [
        f"block{b}_conv{c}"
        for b, (_, n) in enumerate(VGG16_BLOCKS, start=1)
        for c in range(1, n + 1)
    ]
    try:
        stored = set(_h5_layer_names(path))
    except (OSError, KeyError) as err:
        raise ValueError(
            f"{path}: not a Keras HDF5 weights file with layer names ({err}); expected VGG16 "
            "weights as written by Model.save_weights('....h5')"
        ) from err
    missing = [n for n in conv_names if n not in stored]
    if missing:
        raise ValueError(
            f"{path}: expected the VGG16 convolution layers {conv_names[0]}..{conv_names[-1]}, "
            f"missing {missing}"
        )
    return path


def load_vgg16_encoder_weights(model: keras.Model, weights_file: Optional[str]) -> None:
    """Load a VGG16 weights file into the ``block{b}_conv{c}`` layers of ``model``, by name.

    Args:
        model: a model built with :func:`vgg16_encoder` at ``width=1.0`` on 3-channel inputs.
        weights_file: a path from :func:`vgg16_weights_file` (``None``: nothing to load).

    Example: ``load_vgg16_encoder_weights(model, vgg16_weights_file("imagenet"))``.
    """
    if weights_file is not None:
        # by_name: the decoder and heads are not in the file and keep their initialisation.
        model.load_weights(weights_file, by_name=True)
