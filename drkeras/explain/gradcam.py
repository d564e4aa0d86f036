"""Batched Grad-CAM (Selvaraju et al. 2017) for any class of any functional Keras model.

PLDMLT (section 3.1, Eq. 1) computes, for a feature layer ``F`` with channels ``F^k`` and a class
``c`` (a DR grade),

    alpha_k^c = mean_{i,j} d y^c / d F^k_{ij}          (per image)
    L^c       = ReLU(sum_k alpha_k^c F^k)

and looks at ``L^c`` for every grade (its Fig. 6). :class:`GradCAM` computes this for a batch at
once: the class scores of different images do not interact in inference mode, so the gradient of
their sum gives every image its own gradient. Each map is then normalised to [0, 1] by its own
maximum and resized to the input size.

``y^c`` is the pre-softmax score, as in Grad-CAM: when the chosen output is made by a softmax
``Activation``/``Softmax`` layer or a ``Dense`` layer with a softmax activation, the logits are
recovered from that layer; any other output is used as the score directly.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np
import tensorflow as tf
from tensorflow import keras

__all__ = ["GradCAM", "find_feature_tensor", "grad_cam", "grad_cam_all_classes", "select_output"]


def select_output(model: keras.Model, output: Optional[str] = None):
    """Return the symbolic output tensor named ``output`` of a functional ``model``.

    Args:
        model: a functional ``tf.keras.Model``.
        output: a key of a dict-output model (e.g. ``drkeras.keys.GRADE_PROBS``) or the name of
            the layer producing the output; ``None`` for a single-output model.

    Example::

        probs = select_output(multitask_model, keys.GRADE_PROBS)
    """
    outputs = model.output
    if output is None:
        flat = tf.nest.flatten(outputs)
        if len(flat) != 1:
            names = sorted(outputs) if isinstance(outputs, dict) else model.output_names
            raise ValueError(
                f"model {model.name!r} has {len(flat)} outputs {names}; pass output=<name> to "
                "choose the one to explain"
            )
        return flat[0]
    if isinstance(outputs, dict) and output in outputs:
        return outputs[output]
    for tensor, name in zip(model.outputs, model.output_names):
        if name == output:
            return tensor
    names = sorted(outputs) if isinstance(outputs, dict) else list(model.output_names)
    raise ValueError(f"model {model.name!r} has no output {output!r}; its outputs are {names}")


def _producer(tensor):
    history = tensor._keras_history
    return history.layer, history.layer._inbound_nodes[history.node_index]


def _ancestors(output_tensor):
    """Every symbolic tensor the output depends on (itself included), each once."""
    stack, seen, found = [output_tensor], {id(output_tensor)}, []
    while stack:
        tensor = stack.pop()
        found.append(tensor)
        for parent in _producer(tensor)[1].keras_inputs:
            if id(parent) not in seen:
                seen.add(id(parent))
                stack.append(parent)
    return found


def find_feature_tensor(model: keras.Model, output_tensor) -> tuple:
    """Find the last 4-D feature map before ``output_tensor``: the Grad-CAM layer by default.

    Walks the functional graph backwards from the output (breadth first) and returns the nearest
    ancestor tensor of rank 4 that is not a model input, so for a grading head
    ``features -> pooling -> dense`` it returns ``features``; ties at the same distance go to the
    layer that comes later in ``model.layers``.

    Returns:
        ``(layer_name, tensor)``.

    Example::

        name, tensor = find_feature_tensor(model, select_output(model, keys.GRADE_PROBS))
    """
    order = {id(layer): index for index, layer in enumerate(model.layers)}
    frontier, seen = [output_tensor], {id(output_tensor)}
    while frontier:
        candidates = []
        next_frontier = []
        for tensor in frontier:
            layer, node = _producer(tensor)
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if tensor is not output_tensor and tensor.shape.rank == 4:
                candidates.append((order.get(id(layer), -1), layer.name, tensor))
                continue
            for parent in node.keras_inputs:
                if id(parent) not in seen:
                    seen.add(id(parent))
                    next_frontier.append(parent)
        if candidates:
            _, name, tensor = max(candidates, key=lambda item: item[0])
            return name, tensor
        frontier = next_frontier
    raise ValueError(
        f"model {model.name!r} has no 4-D feature map before its output {output_tensor.name!r}; "
        "pass layer_name=<a convolutional layer> to GradCAM"
    )


def _logits_fn(output_tensor):
    """A function mapping the final layer's input to pre-softmax scores, and that input."""
    layer, node = _producer(output_tensor)
    activation = getattr(layer, "activation", None)
    is_softmax = getattr(activation, "__name__", "") == "softmax"
    if isinstance(layer, keras.layers.Softmax) or (
        isinstance(layer, keras.layers.Activation) and is_softmax
    ):
        return (lambda inputs: inputs), node.keras_inputs[0]
    if isinstance(layer, keras.layers.Dense) and is_softmax:

        def dense_logits(inputs):
            logits = tf.tensordot(inputs, tf.cast(layer.kernel, inputs.dtype), axes=1)
            if layer.use_bias:
                logits = logits + tf.cast(layer.bias, inputs.dtype)
            return logits

        return dense_logits, node.keras_inputs[0]
    return None, output_tensor


def _as_batch(images):
    images = images if tf.is_tensor(images) else np.asarray(images)
    if len(images.shape) != 4:
        raise ValueError(
            f"GradCAM expects images [batch, height, width, channels], got shape "
            f"{tuple(images.shape)}"
        )
    return images


class GradCAM:
    """Grad-CAM maps of a functional Keras model, batched, for one class or for all of them.

    Args:
        model: a functional ``tf.keras.Model`` with one image input (a grader or a multi-task
            network).
        output: which output to explain (a dict key such as ``drkeras.keys.GRADE_PROBS`` or an
            output layer name); ``None`` for single-output models.
        layer_name: the feature layer ``F`` of Eq. 1; ``None`` picks the last 4-D layer before the
            output (:func:`find_feature_tensor`).
        use_logits: explain the pre-softmax score (Grad-CAM's ``y^c``) when the output is a
            softmax; ``False`` explains the output values themselves.

    Example::

        cam = GradCAM(multitask_model, output=keys.GRADE_PROBS)
        maps = cam(images, class_index=None)        # [B, H, W] for each image's predicted grade
        every = cam.all_classes(images)              # [B, 5, H, W], PLDMLT Fig. 6 (e, g, i, k)

    Implements Eq. 1 of PLDMLT (section 3.1), after Selvaraju et al. (ICCV 2017).
    """

    def __init__(
        self,
        model: keras.Model,
        *,
        output: Optional[str] = None,
        layer_name: Optional[str] = None,
        use_logits: bool = True,
    ):
        if len(model.inputs) != 1:
            raise ValueError(
                f"GradCAM needs a model with one image input; {model.name!r} has "
                f"{len(model.inputs)} inputs"
            )
        self.model = model
        self.output = output
        output_tensor = select_output(model, output)
        if layer_name is None:
            layer_name, feature_tensor = find_feature_tensor(model, output_tensor)
        else:
            found = [
                t for t in _ancestors(output_tensor) if t._keras_history.layer.name == layer_name
            ]
            if len(found) != 1:
                raise ValueError(
                    f"layer {layer_name!r} produces {len(found)} tensors on the path to output "
                    f"{output!r} of {model.name!r}; pick a layer used once before that output"
                )
            feature_tensor = found[0]
            if feature_tensor.shape.rank != 4:
                raise ValueError(
                    f"Grad-CAM needs a 4-D feature map; layer {layer_name!r} outputs shape "
                    f"{feature_tensor.shape}"
                )
        self.layer_name = layer_name
        to_logits, score_input = _logits_fn(output_tensor) if use_logits else (None, None)
        self._to_scores = to_logits or (lambda values: values)
        score_input = score_input if to_logits is not None else output_tensor
        if score_input.shape.rank != 2:
            raise ValueError(
                f"Grad-CAM explains class scores of shape [batch, classes]; output "
                f"{output!r} of {model.name!r} has shape {output_tensor.shape}"
            )
        self.num_classes = int(output_tensor.shape[-1])
        self._grad_model = keras.Model(
            model.inputs, [feature_tensor, score_input], name=f"{model.name}_gradcam"
        )
        self._maps_fn = tf.function(self._maps, reduce_retracing=True)

    def _maps(self, images, class_indices, num_maps):
        """CAMs for ``class_indices`` [C, B]: returns [B, C, H, W]; one forward pass."""
        images = tf.cast(images, self.model.inputs[0].dtype)
        with tf.GradientTape(persistent=True) as tape:
            if images.dtype.is_floating:
                # Records the graph even when every weight is frozen (trainable=False).
                tape.watch(images)
            features, score_input = self._grad_model(images, training=False)
            scores = tf.cast(self._to_scores(score_input), tf.float32)
            picked = [
                tf.gather(scores, indices, axis=1, batch_dims=1)
                for indices in tf.unstack(class_indices, num=num_maps)
            ]
        maps = []
        features32 = tf.cast(features, tf.float32)
        for score in picked:
            grads = tf.cast(tape.gradient(score, features), tf.float32)
            weights = tf.reduce_mean(grads, axis=(1, 2))
            maps.append(tf.nn.relu(tf.einsum("bhwk,bk->bhw", features32, weights)))
        del tape
        maps = tf.image.resize(tf.stack(maps, axis=-1), tf.shape(images)[1:3], method="bilinear")
        # Normalised after resizing, so every non-empty map peaks at exactly 1 at input size.
        peak = tf.reduce_max(maps, axis=(1, 2), keepdims=True)
        maps = tf.clip_by_value(tf.math.divide_no_nan(maps, peak), 0.0, 1.0)
        return tf.transpose(maps, [0, 3, 1, 2])

    def _run(self, images, class_indices, batch_size):
        count = int(images.shape[0])
        batch_size = batch_size or count or 1
        chunks = []
        for start in range(0, count, batch_size):
            stop = min(start + batch_size, count)
            chunk = tf.convert_to_tensor(class_indices[:, start:stop], tf.int32)
            maps = self._maps_fn(images[start:stop], chunk, int(class_indices.shape[0]))
            chunks.append(maps.numpy())
        return np.concatenate(chunks, axis=0)

    def predicted_classes(self, images, batch_size: Optional[int] = None) -> np.ndarray:
        """Argmax class of the explained output for each image, shape [B]."""
        images = _as_batch(images)
        predictions = []
        count = int(images.shape[0])
        batch_size = batch_size or count or 1
        for start in range(0, count, batch_size):
            _, scores = self._grad_model(images[start : start + batch_size], training=False)
            predictions.append(np.argmax(np.asarray(self._to_scores(scores)), axis=-1))
        return np.concatenate(predictions).astype(np.int32)

    def __call__(
        self,
        images,
        class_index: Union[None, int, Sequence[int], np.ndarray] = None,
        *,
        batch_size: Optional[int] = None,
    ) -> np.ndarray:
        """Grad-CAM of one class per image.

        Args:
            images: [B, H, W, C] inputs as the model consumes them.
            class_index: ``None`` (each image's predicted class), one class for every image, or
                one class per image ([B]).
            batch_size: images per forward pass (``None``: all at once).

        Returns:
            float32 [B, H, W] maps in [0, 1].
        """
        images = _as_batch(images)
        count = int(images.shape[0])
        if class_index is None:
            indices = self.predicted_classes(images, batch_size)
        else:
            indices = np.broadcast_to(np.asarray(class_index, np.int32), (count,))
        self._check_classes(indices)
        return self._run(images, indices[None, :], batch_size)[:, 0]

    def all_classes(
        self,
        images,
        classes: Optional[Sequence[int]] = None,
        *,
        batch_size: Optional[int] = None,
    ) -> np.ndarray:
        """Grad-CAM of several classes (default: all, e.g. the five DR grades) for every image.

        One forward pass per batch and one backward pass per class. Returns float32
        [B, len(classes), H, W] in [0, 1] (PLDMLT Fig. 6: one heat map per severity level).
        """
        images = _as_batch(images)
        classes = np.arange(self.num_classes) if classes is None else np.asarray(classes)
        self._check_classes(classes)
        count = int(images.shape[0])
        indices = np.repeat(classes.astype(np.int32)[:, None], count, axis=1)
        return self._run(images, indices, batch_size)

    def _check_classes(self, indices):
        bad = [int(i) for i in np.ravel(indices) if not 0 <= int(i) < self.num_classes]
        if bad:
            raise ValueError(
                f"class indices {sorted(set(bad))} are outside [0, {self.num_classes}) for output "
                f"{self.output!r} of {self.model.name!r}"
            )


def grad_cam(
    model: keras.Model,
    images,
    class_index=None,
    *,
    output: Optional[str] = None,
    layer_name: Optional[str] = None,
    batch_size: Optional[int] = None,
) -> np.ndarray:
    """One-call Grad-CAM: ``GradCAM(model, output=..., layer_name=...)(images, class_index)``.

    Example::

        maps = grad_cam(grader, images, class_index=3)   # [B, H, W] in [0, 1]
    """
    return GradCAM(model, output=output, layer_name=layer_name)(
        images, class_index, batch_size=batch_size
    )


def grad_cam_all_classes(
    model: keras.Model,
    images,
    *,
    output: Optional[str] = None,
    layer_name: Optional[str] = None,
    batch_size: Optional[int] = None,
) -> np.ndarray:
    """Grad-CAM maps of every class, [B, num_classes, H, W] (PLDMLT Fig. 6, section 4.2).

    Example::

        maps = grad_cam_all_classes(multitask_model, images, output=keys.GRADE_PROBS)
    """
    return GradCAM(model, output=output, layer_name=layer_name).all_classes(
        images, batch_size=batch_size
    )
