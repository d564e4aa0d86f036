"""Nearest-neighbour upsampling whose gradient TensorFlow can compute deterministically on a GPU.

``keras.layers.UpSampling2D(interpolation="nearest")`` calls ``tf.image.resize``; its gradient is
the op ``ResizeNearestNeighborGrad``, which TensorFlow 2.15 runs on a GPU with atomic additions
and refuses under op determinism ("A deterministic GPU implementation of
ResizeNearestNeighborGrad is not currently available"; :mod:`drkeras.training.determinism`).

- :class:`NearestUpSampling2D` computes the same function by repeating every pixel with a
  reshape, a broadcast and a reshape: ``[B, H, W, C] -> [B, H, 1, W, 1, C] -> [B, H, fh, W, fw,
  C] -> [B, H fh, W fw, C]``. Its gradient is TensorFlow's gradient of the broadcast: a sum over
  the two repeat axes and reshapes, which have deterministic GPU kernels. Outputs equal
  ``UpSampling2D``'s bit for bit; input gradients too for factors up to 2 x 3 (measured: each
  input pixel's gradient is a sum of ``fh * fw`` output gradients, added in the same order),
  and to float rounding (a different order of the additions) for larger factors.
- :func:`replace_nearest_upsampling` turns a functional model from a library (segmentation-models'
  UNet, LinkNet and FPN decoders) into the same model with every nearest ``UpSampling2D``
  swapped for :class:`NearestUpSampling2D`, nested functional and sequential models included.
  Every other layer is the original object, so weights, their names and their order are kept.

Example::

    x = NearestUpSampling2D(2, name="decoder_up")(x)     # in a builder of ours
    net = replace_nearest_upsampling(sm.Unet("vgg16"))   # a library's network
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import tensorflow as tf
from tensorflow import keras

__all__ = ["NearestUpSampling2D", "nearest_upsampling_layers", "replace_nearest_upsampling"]


def _factors(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    sizes = (size, size) if isinstance(size, int) else tuple(size)
    if len(sizes) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in sizes
    ):
        raise ValueError(
            f"NearestUpSampling2D: size={size!r}; expected a positive integer or two of them "
            "(rows, columns)"
        )
    return sizes


@keras.utils.register_keras_serializable(package="drkeras")
class NearestUpSampling2D(keras.layers.Layer):
    """Nearest-neighbour upsampling by integer factors, channels last, with a gradient that needs
    no ``ResizeNearestNeighborGrad`` (so it runs under op determinism on GPUs).

    The same function and config keys as ``keras.layers.UpSampling2D`` (``size``,
    ``data_format``, ``interpolation``), restricted to what it computes: ``data_format`` must
    be ``channels_last`` (or ``None`` with Keras' default image data format channels last) and
    ``interpolation`` ``nearest``; ``NearestUpSampling2D.from_config(up.get_config())`` turns an
    ``UpSampling2D`` that meets both into this layer. Heights and widths may be unknown until
    run time. Registered as ``drkeras>NearestUpSampling2D`` for ``load_model``.

    Args:
        size: ``(rows, columns)`` factors, or one integer for both.

    Example::

        up = NearestUpSampling2D((2, 3), name="up")
        up(tf.zeros((1, 5, 7, 4))).shape   # (1, 10, 21, 4)
    """

    def __init__(
        self,
        size: Union[int, Sequence[int]] = (2, 2),
        data_format: Optional[str] = None,
        interpolation: str = "nearest",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.size = _factors(size)
        where = f"NearestUpSampling2D {self.name!r}"
        fmt = data_format or keras.backend.image_data_format()
        if fmt != "channels_last":
            raise ValueError(
                f"{where}: data_format={data_format!r}; only 'channels_last' is supported "
                "(inputs [batch, height, width, channels])"
            )
        if interpolation != "nearest":
            raise ValueError(
                f"{where}: interpolation={interpolation!r}; this layer computes 'nearest' only "
                "(keras.layers.UpSampling2D does the others)"
            )
        self.input_spec = keras.layers.InputSpec(ndim=4)

    def call(self, inputs):
        rows, cols = self.size
        if rows == cols == 1:
            return tf.identity(inputs)
        shape = tf.shape(inputs)
        batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
        x = tf.reshape(inputs, tf.stack([batch, height, 1, width, 1, channels]))
        # The gradient of broadcast_to is a sum over the broadcast axes: no resize gradient.
        x = tf.broadcast_to(x, tf.stack([batch, height, rows, width, cols, channels]))
        x = tf.reshape(x, tf.stack([batch, height * rows, width * cols, channels]))
        return tf.ensure_shape(x, self.compute_output_shape(inputs.shape))

    def compute_output_shape(self, input_shape):
        shape = tf.TensorShape(input_shape).as_list()
        if len(shape) != 4:
            raise ValueError(
                f"NearestUpSampling2D {self.name!r}: expected inputs [batch, height, width, "
                f"channels], got shape {shape}"
            )
        grown = [None if n is None else n * f for n, f in zip(shape[1:3], self.size)]
        return tf.TensorShape([shape[0], *grown, shape[3]])

    def get_config(self):
        return {
            **super().get_config(),
            "size": self.size,
            "data_format": "channels_last",
            "interpolation": "nearest",
        }


def _is_nearest_upsampling(layer) -> bool:
    # The exact class: subclasses of UpSampling2D may compute something else.
    return (
        type(layer) is keras.layers.UpSampling2D
        and layer.interpolation == "nearest"
        and layer.data_format == "channels_last"
    )


def nearest_upsampling_layers(model: keras.Model) -> list:
    """The names of every nearest, channels-last ``UpSampling2D`` in ``model``, nested models
    included (``"outer/inner/layer"`` for a layer of a nested model).

    Example: ``nearest_upsampling_layers(sm.Unet("vgg16"))`` lists ``decoder_stage0_upsampling``.
    """
    found = []
    for layer in model.layers:
        if _is_nearest_upsampling(layer):
            found.append(layer.name)
        elif isinstance(layer, keras.Model):
            found += [f"{layer.name}/{name}" for name in nearest_upsampling_layers(layer)]
    return found


def replace_nearest_upsampling(model: keras.Model) -> keras.Model:
    """``model`` with every nearest ``UpSampling2D`` replaced by :class:`NearestUpSampling2D`.

    The result is a new functional (or sequential) model over the same layer objects: the same
    model, input and layer names, the same weight variables in the same order (so checkpoints
    and ``set_weights`` of the original fit), the same outputs; only the upsampling layers are
    new, with the same names and factors. A nested functional or sequential model that holds
    such a layer is rebuilt the same way (a new model object with the original's name); one
    that holds none, like every other layer, is shared with ``model``. A model without nearest
    upsampling is returned as it is.

    Raises:
        ValueError: the upsampling is inside a subclassed model, whose graph cannot be rebuilt
            (naming the model and its layers).

    Example::

        unet = replace_nearest_upsampling(sm.Unet("vgg16", input_shape=(64, 64, 3)))
        nearest_upsampling_layers(unet)   # []
    """
    if not nearest_upsampling_layers(model):
        return model
    if not getattr(model, "_is_graph_network", False):
        raise ValueError(
            f"replace_nearest_upsampling: model {model.name!r} is a subclassed Keras model, whose "
            f"layers cannot be rebuilt; its nearest UpSampling2D layers "
            f"{nearest_upsampling_layers(model)} stay (expected a functional or sequential model)"
        )
    replaced: Dict[int, keras.layers.Layer] = {}

    def swap(layer):
        if id(layer) not in replaced:
            if _is_nearest_upsampling(layer):
                config = layer.get_config()
                replaced[id(layer)] = NearestUpSampling2D.from_config(config)
            elif isinstance(layer, keras.Model):
                replaced[id(layer)] = replace_nearest_upsampling(layer)
            else:
                replaced[id(layer)] = layer
        return replaced[id(layer)]

    rebuilt = keras.models.clone_model(model, clone_function=swap)
    if not model.trainable:  # (setting it to True would unfreeze every frozen layer)
        rebuilt.trainable = False
    return rebuilt
