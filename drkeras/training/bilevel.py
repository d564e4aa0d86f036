"""PLDMLT's bilevel training (Algorithm 1): multi-task network + label update network.

The label update network ``u_psi`` is trained through a second-order meta-gradient: how a
virtual training step of the multi-task network on ``u_psi``'s labels changes the segmentation
loss afterwards. Differentiating through that step needs the multi-task network evaluated at
weights ``theta* = theta - eps * g(theta, psi)`` that are *tensors* depending on ``psi``; an
``assign`` would cut the graph (docs/design.md section 4).

Evaluating a Keras model at substituted weights
-----------------------------------------------
Keras 3 has ``model.stateless_call(trainable_values, ...)``; Keras 2.15 does not. Keras 2's
built-in layers read their weights from plain attributes at call time (``Dense.kernel``,
``Conv2D.bias``, ``BatchNormalization.gamma``, ...), so :func:`substituted_weights` temporarily
points those attributes at the new tensors (bypassing Keras' attribute tracking, so the layers'
weight lists, checkpoints and optimizers still see the original variables) and restores them on
exit. The model is then called normally: one forward-pass implementation (the model's own),
valid for any functional or nested model made of such layers, including the VGG16-UNet. A
variable that is not found as a layer attribute raises an error instead of being silently left
at its old value. While substituted, ``BatchNormalization`` layers keep their moving statistics
(momentum 1), so the virtual forward pass has no side effect. :func:`stateless_call` wraps it.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Dict, Optional, Sequence

import tensorflow as tf
from tensorflow import keras

from drkeras import keys, losses
from drkeras.models.pldmlt import CORRECTED_GRADE, GRADE_MASK, PSEUDO_GRADE
from drkeras.training import distribute

__all__ = ["BilevelMultiTaskTrainer", "stateless_call", "substituted_weights"]


def _layers(model: keras.layers.Layer):
    return [model] + [m for m in model.submodules if isinstance(m, keras.layers.Layer)]


@contextlib.contextmanager
def substituted_weights(
    model: keras.layers.Layer,
    variables: Sequence[tf.Variable],
    values: Sequence[tf.Tensor],
    *,
    freeze_statistics: bool = True,
):
    """Within the context, ``model``'s layers compute with ``values`` in place of ``variables``.

    Args:
        model: a Keras model (or layer) built from layers that keep their weights as attributes
            (every built-in Keras layer does).
        variables: variables of ``model`` to replace (e.g. ``model.trainable_variables``).
        values: tensors of the same shapes; gradients flow through them.
        freeze_statistics: keep ``BatchNormalization`` moving statistics unchanged when the
            model runs in training mode inside the context.

    Raises:
        ValueError: a variable is not an attribute of any layer of ``model``.

    Example::

        with substituted_weights(model, model.trainable_variables, fast_weights):
            out = model(x, training=True)     # computed with fast_weights
    """
    variables, values = list(variables), list(values)
    if len(variables) != len(values):
        raise ValueError(f"{len(variables)} variables but {len(values)} substitute values")
    replacement = {id(v): (v, value) for v, value in zip(variables, values)}
    swapped, frozen, found = [], [], set()
    try:
        for layer in _layers(model):
            for attr, current in list(vars(layer).items()):
                entry = replacement.get(id(current))
                if entry is None or entry[0] is not current:
                    continue
                value = tf.convert_to_tensor(entry[1])
                if type(current).__name__ == "AutoCastVariable" and value.dtype.is_floating:
                    # Mixed precision: the layer would have read its variable cast to the
                    # compute dtype.
                    value = tf.cast(value, layer.compute_dtype)
                swapped.append((layer, attr, current))
                # object.__setattr__ skips Keras' tracking: the variable stays a weight.
                object.__setattr__(layer, attr, value)
                found.add(id(current))
            if freeze_statistics and isinstance(layer, keras.layers.BatchNormalization):
                frozen.append((layer, layer.momentum))
                layer.momentum = 1.0
        missing = [v.name for v in variables if id(v) not in found]
        if missing:
            raise ValueError(
                f"cannot substitute weights {missing} of {model.name!r}: they are not attributes "
                "of its layers (a custom layer keeping weights in a list or dict?); "
                "substituted_weights supports layers that store each weight as an attribute"
            )
        yield
    finally:
        for layer, attr, original in reversed(swapped):
            object.__setattr__(layer, attr, original)
        for layer, momentum in frozen:
            layer.momentum = momentum


def stateless_call(
    model: keras.Model,
    variables: Sequence[tf.Variable],
    values: Sequence[tf.Tensor],
    inputs,
    *,
    training: bool = False,
):
    """``model(inputs)`` computed with ``values`` in place of ``variables`` (no state change).

    The Keras-2 counterpart of Keras 3's ``Model.stateless_call`` for the trainable weights:
    differentiable w.r.t. ``values``, which is what a virtual (look-ahead) optimisation step
    needs. See :func:`substituted_weights`.

    Example::

        theta = model.trainable_variables
        fast = [w - 0.1 * g for w, g in zip(theta, grads)]
        out = stateless_call(model, theta, fast, x, training=True)
    """
    with substituted_weights(model, variables, values):
        return model(inputs, training=training)


def _check_per_example(name, value):
    if value.shape.rank != 1:
        raise ValueError(
            f"{name} must return one loss per example (shape [B]), got shape {value.shape}; "
            "use the per-example functions of drkeras.losses"
        )
    return value


class BilevelMultiTaskTrainer(keras.Model):
    """PLDMLT stage 2 (Algorithm 1): multi-task network and label update network trained jointly.

    ``f_theta`` (the VGG16-UNet of section 3.2, dict outputs ``seg_probs``/``grade_probs``) and
    ``u_psi`` (:func:`drkeras.models.pldmlt.build_label_update_net`) are given to ``__init__``.
    Each ``train_step``, on a batch ``(x, y_S, y_hat, M)`` of images, fused lesion masks, stage-1
    pseudo grades and allowed-grade masks, runs:

    1. ``y_grad = u_psi(x, y_hat)`` with the mask softmax of Eq. 4 (the corrected labels). A
       network from :func:`~drkeras.models.pldmlt.build_label_update_net` starts exactly at the
       label-smoothed stage-1 grade ``y_hat`` and learns a correction of its logits, so the
       labels move away from stage 1's only where the meta-gradient of step 5 says so.
    2. Training loss ``L(theta, psi) = L_S(f^S_theta(x), y_S) + beta L_C(f^C_theta(x), y_grad)``
       (Eq. 3), both categorical focal losses (Eq. 2) averaged over the GLOBAL batch, and its
       gradient ``g = grad_theta L``, recorded by an outer tape so ``g`` stays a function of
       ``psi``.
    3. Virtual SGD step ``theta* = theta - eps g`` (Algorithm 1, "Compute: theta* = ..."),
       written with tensors; under a ``MirroredStrategy`` ``g`` is first summed over replicas
       (a differentiable all-reduce), so ``theta*`` is the step on the whole global batch.
       ``eps`` is ``virtual_lr`` (default: the model optimizer's current learning rate).
    4. Meta loss ``L_meta = L_S(f^S_theta*(x), y_S)`` (+ ``meta_grade_weight *
       L_C(f^C_theta*(x), y_hat)``, 0 by default), the multi-task network evaluated at
       ``theta*`` by :func:`stateless_call`.
    5. ``psi <- psi - eta grad_psi L_meta`` with ``label_optimizer`` (Algorithm 1, "Update:
       theta_1 <- ..."): the true second-order gradient
       ``-eps (d g / d psi)^T grad L_meta(theta*)`` from the nested tapes.
    6. ``theta <- theta - eps grad_theta L`` with ``model_optimizer`` (Algorithm 1, first inner
       loop "Update: theta <- ..."): the real update of the multi-task network on the corrected
       labels of step 1, reusing ``g`` of step 2.

    Reading of the damaged Algorithm 1, rebuilt from sections 3.3.1-3.3.3 and from the scheme
    the label network is "inspired by" (ref. [26]; its mask softmax ``M = B(y, psi)`` and the
    "retain training computational graph" step are those of meta auxiliary learning, Liu et
    al. 2019, where the meta loss is the main task's loss after a virtual step): the paper runs
    the ``theta``
    loop and the ``psi`` loop as separate passes over the data; here both happen on every
    batch, which shares the forward/backward pass of steps 2 and 6. The meta objective is the
    segmentation loss, the task with real labels, so ``u_psi`` learns grade labels whose
    gradients help rather than hurt the shared encoder, the "gradient balance" of section 3.3
    and of the ablation (Table 3); ``meta_grade_weight > 0`` adds the grading loss against the
    stage-1 pseudo grades for the other reading of section 3.3.1. The tie of ``y_grad`` to the
    stage-1 grade that section 3.3.1 asks for ("the initial pseudo label is predicted and
    updated") is the label network's starting point, not a term of the meta loss.
    ``tests/test_label_update.py`` shows both halves: on an image whose lesions contradict its
    stage-1 grade, the label moves step by step towards the allowed grade after which the
    segmentation loss is lowest; and with the paper's learning rates the meta-gradient reaching
    ``u_psi`` is far above Adam's epsilon.

    Data: ``x = {"image", "pseudo_grade" (one-hot [B, G] or integer [B]), "grade_mask"
    (optional [B, G], default all ones)}``, ``y`` = one-hot segmentation target ``[B, H, W,
    C]`` (or ``{seg_output: target}``), optional sample weights;
    :func:`drkeras.models.pldmlt.make_training_pair` builds it. ``evaluate`` reports ``loss``,
    ``seg_loss`` and ``grade_loss`` against the given grades (no label update, no meta step).

    Logs: ``loss`` (``L``), ``seg_loss``, ``grade_loss`` (``L_C`` against ``y_grad``) and
    ``meta_loss``, all unscaled means.

    Args:
        multitask_model: functional model with dict outputs ``seg_output`` and ``grade_output``.
        label_network: the label update network (dict output ``corrected_grade``).
        seg_output, grade_output: output keys of ``multitask_model``.
        name: model name.

    Example::

        with strategy.scope():
            net = build_vgg16_unet(input_shape=(256, 256, 3), num_seg_classes=5,
                                   grade_pooling="avg")
            trainer = BilevelMultiTaskTrainer(net, build_label_update_net(input_shape=(256,
                                              256, 3)))
            trainer.compile(model_optimizer=keras.optimizers.Adam(5e-5),
                            label_optimizer=keras.optimizers.Adam(5e-5, epsilon=1e-12),
                            beta=0.8)
        trainer.fit(dataset, epochs=100)
    """

    def __init__(
        self,
        multitask_model: keras.Model,
        label_network: keras.Model,
        *,
        seg_output: str = keys.SEG_PROBS,
        grade_output: str = keys.GRADE_PROBS,
        name: str = "pldmlt_trainer",
    ):
        super().__init__(name=name)
        outputs = multitask_model.output
        if not isinstance(outputs, dict) or not {seg_output, grade_output} <= set(outputs):
            found = sorted(outputs) if isinstance(outputs, dict) else multitask_model.output_names
            raise ValueError(
                f"multitask_model {multitask_model.name!r} must have dict outputs "
                f"{seg_output!r} and {grade_output!r}; it has {found}"
            )
        label_outputs = label_network.output
        if not isinstance(label_outputs, dict) or CORRECTED_GRADE not in label_outputs:
            raise ValueError(
                f"label_network {label_network.name!r} must have the dict output "
                f"{CORRECTED_GRADE!r} (build it with build_label_update_net)"
            )
        self.multitask = multitask_model
        self.label_network = label_network
        self.seg_output = seg_output
        self.grade_output = grade_output
        self.num_grades = int(outputs[grade_output].shape[-1])
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.seg_loss_tracker = keras.metrics.Mean(name="seg_loss")
        self.grade_loss_tracker = keras.metrics.Mean(name="grade_loss")
        self.meta_loss_tracker = keras.metrics.Mean(name="meta_loss")

    @property
    def metrics(self):
        return [
            self.loss_tracker,
            self.seg_loss_tracker,
            self.grade_loss_tracker,
            self.meta_loss_tracker,
        ]

    def compile(
        self,
        *,
        model_optimizer: keras.optimizers.Optimizer,
        label_optimizer: keras.optimizers.Optimizer,
        seg_loss: Optional[Callable] = None,
        grade_loss: Optional[Callable] = None,
        beta: float = 0.8,
        virtual_lr: Optional[float] = None,
        meta_grade_weight: float = 0.0,
        **kwargs,
    ):
        """Set the optimizers, losses and weights of Algorithm 1.

        Args:
            model_optimizer: updates ``theta`` (the multi-task network); Adam 5e-5 in the paper.
            label_optimizer: updates ``psi`` (the label update network).
                Under a ``mixed_float16`` multi-task network both are wrapped in a
                ``LossScaleOptimizer`` (kept when already wrapped): the training and meta losses
                are scaled before differentiation and the gradients unscaled, the virtual step
                uses the unscaled gradient, and a step with overflowing gradients is skipped by
                the optimizer whose gradients overflowed.
            seg_loss, grade_loss: per-example losses ``(y_true, y_pred) -> [B]``; default the
                categorical focal loss with ``alpha=0.25, gamma=2`` (Eq. 2, section 3.2).
            beta: weight of the grading loss in ``L = L_S + beta L_C`` (Eq. 3; 0.8 on IDRiD,
                0.95 on DDR, Tables 1-2).
            virtual_lr: ``eps`` of the virtual step; ``None`` uses the model optimizer's
                current learning rate. The meta-gradient scales with it: at the paper's 5e-5
                it is tiny, so give the label optimizer a matching learning rate (or a small
                ``epsilon`` for Adam, whose default 1e-7 would otherwise dominate).
            meta_grade_weight: weight of the grading loss against the stage-1 pseudo grades
                in the meta loss (0: segmentation only).
            **kwargs: passed to ``keras.Model.compile`` (``run_eagerly``, ``jit_compile``,
                ``steps_per_execution``); ``optimizer``, ``loss`` and ``metrics`` are refused.
        """
        for ambiguous in ("optimizer", "loss", "loss_weights", "metrics"):
            if ambiguous in kwargs:
                raise TypeError(
                    f"BilevelMultiTaskTrainer.compile() takes model_optimizer=, label_optimizer=, "
                    f"seg_loss=, grade_loss= and beta=; {ambiguous}= is ambiguous here"
                )
        # float16 gradients underflow without loss scaling (as Keras' own compile() does).
        policy = self.multitask.dtype_policy
        model_optimizer = distribute.loss_scale_optimizer(model_optimizer, policy)
        label_optimizer = distribute.loss_scale_optimizer(label_optimizer, policy)
        # The model optimizer doubles as Keras' `optimizer`, so learning-rate callbacks act on it.
        super().compile(optimizer=model_optimizer, **kwargs)
        focal = functools.partial(losses.categorical_focal_loss, alpha=0.25, gamma=2.0)
        self.model_optimizer = model_optimizer
        self.label_optimizer = label_optimizer
        self.seg_loss_fn = seg_loss or focal
        self.grade_loss_fn = grade_loss or focal
        self.beta = float(beta)
        self.virtual_lr = None if virtual_lr is None else float(virtual_lr)
        self.meta_grade_weight = float(meta_grade_weight)

    def call(self, inputs, training=False):
        """Inference of the multi-task network: ``inputs`` is an image batch or a dict with it."""
        image = inputs[keys.IMAGE] if isinstance(inputs, dict) else inputs
        return self.multitask(image, training=training)

    def corrected_grades(self, inputs, training=False):
        """``y_grad = u_psi(x, y_hat)``: the label update network's grade distribution [B, G]."""
        return self.label_network(self._label_inputs(inputs), training=training)[CORRECTED_GRADE]

    def _label_inputs(self, x):
        if not isinstance(x, dict) or keys.IMAGE not in x or PSEUDO_GRADE not in x:
            found = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(
                f"{self.name} expects x = {{{keys.IMAGE!r}: images, {PSEUDO_GRADE!r}: grades, "
                f"optional {GRADE_MASK!r}: allowed grades}}, got {found}; build the pairs with "
                "drkeras.models.pldmlt.make_training_pair"
            )
        dtype = self.label_network.inputs[0].dtype
        pseudo = tf.convert_to_tensor(x[PSEUDO_GRADE])
        if pseudo.shape.rank == 1:
            pseudo = tf.one_hot(tf.cast(pseudo, tf.int32), self.num_grades, dtype=dtype)
        pseudo = tf.cast(pseudo, dtype)
        mask = x.get(GRADE_MASK)
        mask = tf.ones_like(pseudo) if mask is None else tf.cast(mask, dtype)
        return {keys.IMAGE: x[keys.IMAGE], PSEUDO_GRADE: pseudo, GRADE_MASK: mask}

    def _unpack(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        label_inputs = self._label_inputs(x)
        if y is None:
            raise ValueError(
                f"{self.name} needs segmentation targets: data must be (x, y) with y the one-hot "
                f"fused lesion mask [B, H, W, C]"
            )
        seg_true = y[self.seg_output] if isinstance(y, dict) else y
        return label_inputs, seg_true, sample_weight

    def _task_losses(self, outputs, seg_true, grade_true):
        seg = _check_per_example("seg_loss", self.seg_loss_fn(seg_true, outputs[self.seg_output]))
        grade = _check_per_example(
            "grade_loss", self.grade_loss_fn(grade_true, outputs[self.grade_output])
        )
        return seg, grade

    def _step_size(self, dtype):
        lr = self.virtual_lr
        if lr is None:
            lr = self.model_optimizer.learning_rate
            if callable(lr):
                lr = lr(self.model_optimizer.iterations)
        return tf.cast(lr, dtype)

    def bilevel_gradients(self, data) -> Dict[str, object]:
        """Steps 1-5 of Algorithm 1 without applying anything: losses and both gradients.

        Returns a dict with ``model_grads`` (``g``, aligned with
        ``multitask.trainable_variables``), ``label_grads`` (the second-order meta-gradient,
        aligned with ``label_network.trainable_variables``), the scaled ``meta_loss_scaled``
        and the per-example losses ``total``, ``seg``, ``grade``, ``meta``.
        """
        label_inputs, seg_true, sample_weight = self._unpack(data)
        image = label_inputs[keys.IMAGE]
        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        global_batch = tf.shape(image)[0] * replicas
        theta = self.multitask.trainable_variables
        psi = self.label_network.trainable_variables

        with tf.GradientTape() as meta_tape:
            with tf.GradientTape() as inner_tape:
                y_grad = self.label_network(label_inputs, training=True)[CORRECTED_GRADE]
                outputs = self.multitask(image, training=True)
                seg, grade = self._task_losses(outputs, seg_true, y_grad)
                total = seg + tf.cast(self.beta, seg.dtype) * grade
                inner = tf.nn.compute_average_loss(
                    total, global_batch_size=global_batch, sample_weight=sample_weight
                )
                inner = distribute.scale_loss(self.model_optimizer, inner)
            grads = inner_tape.gradient(
                inner, theta, unconnected_gradients=tf.UnconnectedGradients.ZERO
            )
            # Unscaled inside the meta tape: theta* depends on the true gradient g.
            grads = distribute.unscale_gradients(self.model_optimizer, grads)
            step = grads
            if replicas > 1:
                # The step on the global batch; differentiable (its gradient is an all-reduce).
                step = context.all_reduce(tf.distribute.ReduceOp.SUM, grads)
            fast = [w - self._step_size(w.dtype) * g for w, g in zip(theta, step)]
            outputs_star = stateless_call(self.multitask, theta, fast, image, training=True)
            meta_seg, meta_grade = self._task_losses(
                outputs_star, seg_true, label_inputs[PSEUDO_GRADE]
            )
            meta = meta_seg
            if self.meta_grade_weight:
                meta = meta + tf.cast(self.meta_grade_weight, meta.dtype) * meta_grade
            meta_scaled = tf.nn.compute_average_loss(
                meta, global_batch_size=global_batch, sample_weight=sample_weight
            )
            meta_for_grad = distribute.scale_loss(self.label_optimizer, meta_scaled)
        label_grads = meta_tape.gradient(
            meta_for_grad, psi, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        label_grads = distribute.unscale_gradients(self.label_optimizer, label_grads)
        return {
            "model_grads": [tf.stop_gradient(g) for g in grads],
            "label_grads": label_grads,
            "meta_loss_scaled": meta_scaled,
            "total": total,
            "seg": seg,
            "grade": grade,
            "meta": meta,
            "sample_weight": sample_weight,
        }

    def train_step(self, data):
        result = self.bilevel_gradients(data)
        self.label_optimizer.apply_gradients(
            zip(result["label_grads"], self.label_network.trainable_variables)
        )
        self.model_optimizer.apply_gradients(
            zip(result["model_grads"], self.multitask.trainable_variables)
        )
        weight = result["sample_weight"]
        self.loss_tracker.update_state(result["total"], sample_weight=weight)
        self.seg_loss_tracker.update_state(result["seg"], sample_weight=weight)
        self.grade_loss_tracker.update_state(result["grade"], sample_weight=weight)
        self.meta_loss_tracker.update_state(result["meta"], sample_weight=weight)
        return {m.name: m.result() for m in self.metrics}

    def test_step(self, data):
        label_inputs, seg_true, sample_weight = self._unpack(data)
        outputs = self.multitask(label_inputs[keys.IMAGE], training=False)
        seg, grade = self._task_losses(outputs, seg_true, label_inputs[PSEUDO_GRADE])
        total = seg + tf.cast(self.beta, seg.dtype) * grade
        trackers = (self.loss_tracker, self.seg_loss_tracker, self.grade_loss_tracker)
        for tracker, value in zip(trackers, (total, seg, grade)):
            tracker.update_state(value, sample_weight=sample_weight)
        return {tracker.name: tracker.result() for tracker in trackers}
