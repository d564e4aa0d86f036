"""Which ops of a traced train step TensorFlow 2.15 cannot run deterministically on a GPU.

With op determinism on (``train.deterministic``, :func:`drkeras.training.distribute.
seed_everything`), TensorFlow raises at the first execution of an op that has no deterministic
GPU kernel, e.g. ``ResizeNearestNeighborGrad``, the gradient of ``UpSampling2D``: a run would
stop at its first GPU step, after its data were loaded and its graph traced. :func:`check_model`
finds such ops in a model's traced train step before training and names the op and the layer it
belongs to, so the run can stop at once with the setting to change.

The papers' networks avoid the one such op they used: nearest upsampling is
:class:`drkeras.models.upsampling.NearestUpSampling2D` in our builders and replaces
``UpSampling2D`` in the segmentation-models decoders
(:func:`drkeras.models.upsampling.replace_nearest_upsampling`); ``tests/test_determinism.py``
traces the train step of every paper preset's network and finds none of these ops.

:data:`GPU_NONDETERMINISTIC_OPS` is taken from TensorFlow 2.15.1's own library: the messages of
its GPU kernels that refuse to run under op determinism ("A deterministic GPU implementation of
... is not currently available", "Determinism is not yet supported in GPU implementation of
..."; found with ``strings`` on ``libtensorflow_framework.so.2`` and ``libtensorflow_cc.so.2``).
Left out: the depthwise-convolution filter gradient (only with cuDNN older than 7.6.3; the
pinned cuDNN is 8.9), scatter ops on reference variables (TF2 has resource variables only),
``DebugNumericSummaryV2`` and ``Timestamp`` (never in a train step), and the softmax
cross-entropy ops (the Python API takes a deterministic path under op determinism).

Example::

    findings = find_nondeterministic_ops(model, dataset)   # [] when the step is safe
    for finding in findings:
        print(finding.describe())
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional, Sequence

import tensorflow as tf

__all__ = [
    "GPU_NONDETERMINISTIC_OPS",
    "Finding",
    "NondeterministicOps",
    "check_model",
    "find_in_graph",
    "find_nondeterministic_ops",
]


def _always(node) -> bool:
    return True


def _floating(node) -> bool:
    return tf.as_dtype(node.attr["T"].type).is_floating if "T" in node.attr else True


def _inference_mode(node) -> bool:
    return "is_training" in node.attr and not node.attr["is_training"].b


# op type -> (when it is refused, what TensorFlow 2.15 says)
GPU_NONDETERMINISTIC_OPS: Dict[str, tuple] = {
    "ResizeNearestNeighborGrad": (_always, "gradient of nearest-neighbour resizing"),
    "AdjustContrast": (_always, "contrast adjustment"),
    "AdjustContrastv2": (_always, "contrast adjustment"),
    "SparseTensorDenseMatMul": (_always, "sparse x dense matmul"),
    "CropAndResizeGradImage": (_always, "gradient of crop-and-resize (image)"),
    "CropAndResizeGradBoxes": (_always, "gradient of crop-and-resize (boxes)"),
    "Dilation2DBackpropFilter": (_always, "gradient of morphological dilation"),
    "Dilation2DBackpropInput": (_always, "gradient of morphological dilation"),
    "MaxPoolGradWithArgmax": (_always, "max-pooling gradient with argmax"),
    "Bincount": (_always, "bincount"),
    "DenseBincount": (_always, "bincount"),
    "FakeQuantWithMinMaxVarsGradient": (_always, "fake-quantisation gradient"),
    "FakeQuantWithMinMaxVarsPerChannelGradient": (_always, "fake-quantisation gradient"),
    "FusedBatchNormGrad": (_inference_mode, "batch-norm gradient in inference mode"),
    "FusedBatchNormGradV2": (_inference_mode, "batch-norm gradient in inference mode"),
    "FusedBatchNormGradV3": (_inference_mode, "batch-norm gradient in inference mode"),
    **{
        op: (_floating, "floating-point segment reduction")
        for op in (
            "SegmentSum",
            "SegmentProd",
            "SegmentMin",
            "SegmentMax",
            "SegmentMean",
            "UnsortedSegmentSum",
            "UnsortedSegmentProd",
            "UnsortedSegmentMin",
            "UnsortedSegmentMax",
        )
    },
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One op of a traced step without a deterministic GPU kernel.

    Attributes:
        op: the op type (``ResizeNearestNeighborGrad``).
        node: the node's name in the traced graph.
        layer: the Keras layer the node belongs to (``None`` when no layer name is in its path).
        what: what the op computes.
    """

    op: str
    node: str
    layer: Optional[str]
    what: str

    def describe(self) -> str:
        where = f"layer {self.layer!r}" if self.layer else f"node {self.node!r}"
        return f"{self.op} ({self.what}) in {where}"


class NondeterministicOps(RuntimeError):
    """A train step holds ops that TensorFlow cannot run deterministically on a GPU."""


def _node_defs(graph: tf.Graph):
    """Every node of ``graph`` and of the functions it calls (loops, nested tf.functions)."""
    graph_def = graph.as_graph_def()
    yield from graph_def.node
    for function in graph_def.library.function:
        yield from function.node_def


def _layer_of(node_name: str, layer_names: Sequence[str]) -> Optional[str]:
    # Keras name scopes put the layer's name in the node's path: the innermost one wins.
    parts = node_name.replace("/", " ").replace("_grad ", " ").split()
    known = set(layer_names)
    for part in reversed(parts):
        if part in known:
            return part
    return None


def find_in_graph(graph: tf.Graph, layer_names: Sequence[str] = ()) -> List[Finding]:
    """The nodes of ``graph`` (and its function library) listed in
    :data:`GPU_NONDETERMINISTIC_OPS`, each attributed to one of ``layer_names`` when it can be."""
    findings, seen = [], set()
    for node in _node_defs(graph):
        rule = GPU_NONDETERMINISTIC_OPS.get(node.op)
        if rule is None or not rule[0](node):
            continue
        finding = Finding(node.op, node.name, _layer_of(node.name, layer_names), rule[1])
        key = (finding.op, finding.layer or finding.node)
        if key not in seen:
            seen.add(key)
            findings.append(finding)
    return findings


def _layer_names(model: tf.keras.Model) -> List[str]:
    return [m.name for m in model.submodules if isinstance(m, tf.keras.layers.Layer)]


def _traced_train_step(model: tf.keras.Model, data: tf.data.Dataset) -> tf.Graph:
    """The graph of ``model``'s train step on ``data``, traced without running a step (a model
    compiled with ``run_eagerly=True`` is traced as a graph for the check, then left as it was)."""
    strategy = model.distribute_strategy
    eager = model.run_eagerly
    saved = model.train_function
    try:
        if eager:
            model.run_eagerly = False
        with strategy.scope():
            function = model.make_train_function(force=True)
            iterator = iter(strategy.experimental_distribute_dataset(data))
            return function.get_concrete_function(iterator).graph
    finally:
        if eager:
            model.run_eagerly = True
        model.train_function = saved


def find_nondeterministic_ops(model: tf.keras.Model, data: tf.data.Dataset) -> List[Finding]:
    """The ops of ``model``'s train step on ``data`` that have no deterministic GPU kernel.

    Works on any device: the graph is traced, not run. ``data`` is what ``fit`` receives
    (a ``tf.data.Dataset`` of batches).
    """
    return find_in_graph(_traced_train_step(model, data), _layer_names(model))


def check_model(
    model: tf.keras.Model,
    data: tf.data.Dataset,
    *,
    stage: str,
    setting: str = "train.deterministic=false",
    finder: Callable[..., List[Finding]] = find_nondeterministic_ops,
) -> None:
    """Raise :class:`NondeterministicOps` naming every offending op and layer of the stage.

    Called by :meth:`drkeras.experiment.RunContext.fit` before a stage trains, when op
    determinism is on and a GPU is visible.
    """
    findings = finder(model, data)
    if findings:
        listed = "; ".join(f.describe() for f in findings)
        raise NondeterministicOps(
            f"stage {stage!r}: op determinism is on (train.deterministic) and this GPU train "
            f"step holds ops TensorFlow 2.15 cannot run deterministically on a GPU: {listed}. "
            f"Run with --set {setting} (results then vary by float rounding from run to run)."
        )
