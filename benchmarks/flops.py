"""FLOP counts from TensorFlow's profiler and the convolution micro-benchmark they are compared
with (the "utilisation ratio" of the train-step benchmark).

:func:`count_flops` traces a function with fixed input shapes and sums the floating-point
operations TensorFlow registers per op (``tf.compat.v1.profiler``): ``Conv2D`` counts
``2 * output elements * kh * kw * c_in``, its two gradients the same, ``MatMul`` ``2 m n k``,
``BiasAdd`` one per element, ... Ops without a registered count (ReLU, casts, ...) count 0, so a
train step's count is essentially its convolutions and matrix products, forward and backward.
By default only the ops a call executes are counted (:func:`graph_flops`).

:func:`conv_shapes` lists the distinct ``Conv2D`` shapes of a traced function with their share of
the FLOPs; :func:`conv_step` builds the plain micro-benchmark for one shape: the forward
convolution and both its gradients (input and kernel), the work a train step does per layer.

Example::

    >>> import tensorflow as tf
    >>> conv = tf.keras.layers.Conv2D(2, 3, padding="same", use_bias=False)
    >>> count_flops(conv, tf.TensorSpec([1, 4, 4, 1]))   # 2 * (4*4*2 outputs) * 3*3*1
    576
"""

from __future__ import annotations

import dataclasses
from typing import Callable, List

import tensorflow as tf
from tensorflow.python.framework import ops as tf_ops  # the profiler's per-op FLOP statistics

__all__ = [
    "ConvShape",
    "conv_shapes",
    "conv_step",
    "count_flops",
    "graph_calls",
    "graph_conv_shapes",
    "graph_flops",
    "reference_rate",
    "uncounted_calls",
]

# Op types that call another function: the profiler does not look inside them.
_CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall", "If", "StatelessIf", "While", "Case")


def _graph_of(fn: Callable, specs) -> tf.Graph:
    function = fn if isinstance(fn, tf.types.experimental.GenericFunction) else tf.function(fn)
    return function.get_concrete_function(*specs).graph


def count_flops(fn: Callable, *specs: tf.TensorSpec, executed_only: bool = True) -> int:
    """Floating-point operations of one call of ``fn`` on inputs of the given specs.

    Args:
        fn: a Python callable or ``tf.function`` taking tensors (e.g. ``model.train_step``
            with an ``(x, y)`` structure of specs).
        *specs: ``tf.TensorSpec`` (or nested structures of them) with fully defined shapes;
            an unknown dimension makes the profiler skip the op.
        executed_only: see :func:`graph_flops`.

    Returns:
        The total of TensorFlow's registered per-op float counts.

    Example: ``count_flops(lambda a, b: a @ b, tf.TensorSpec([2, 3]), tf.TensorSpec([3, 4]))
    == 48``.
    """
    return graph_flops(_graph_of(fn, specs), executed_only=executed_only)


def graph_flops(graph: tf.Graph, *, executed_only: bool = True) -> int:
    """FLOPs of an already traced graph (e.g. a ``ConcreteFunction.graph``).

    Args:
        graph: the graph.
        executed_only: count only the ops a call executes: those the function's outputs and
            control outputs (variable updates) depend on. Differentiating twice (PLDMLT's
            meta-gradient) leaves gradient ops in the graph that no output needs; TensorFlow
            prunes them before running, so they must not count. ``False`` counts every op, as
            ``tf.compat.v1.profiler`` does.
    """
    if executed_only:
        total = 0
        for op in _executed_ops(graph):
            try:
                stats = tf_ops.get_stats_for_node_def(graph, op.node_def, "flops")
            except ValueError:  # a shape the count needs is unknown: the profiler skips it too
                continue
            total += int(stats.value or 0)
        return total
    options = (
        tf.compat.v1.profiler.ProfileOptionBuilder(
            tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
        )
        .with_empty_output()
        .build()
    )
    profile = tf.compat.v1.profiler.profile(graph=graph, options=options)
    return int(profile.total_float_ops)


def _executed_ops(graph: tf.Graph) -> list:
    """The ops that the outputs and control outputs of a function graph depend on."""
    pending = [t.op for t in getattr(graph, "outputs", []) if t is not None]
    pending += list(getattr(graph, "control_outputs", []))
    seen = {}
    while pending:
        op = pending.pop()
        if op.name in seen:
            continue
        seen[op.name] = op
        pending.extend(t.op for t in op.inputs)
        pending.extend(op.control_inputs)
    return list(seen.values())


def uncounted_calls(fn: Callable, *specs: tf.TensorSpec) -> List[str]:
    """Names of the nested function calls and control-flow ops in ``fn``'s graph, whose
    insides :func:`count_flops` does not see (an empty list means the count is complete)."""
    return graph_calls(_graph_of(fn, specs))


def graph_calls(graph: tf.Graph) -> List[str]:
    """:func:`uncounted_calls` of an already traced graph."""
    return [op.name for op in graph.get_operations() if op.type in _CALL_OPS]


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """A ``Conv2D`` of a traced function: input ``[batch, height, width, in_channels]``,
    kernel ``[kernel, kernel, in_channels, out_channels]``, ``stride``, ``padding``; ``flops``
    of all the convolutions of this shape in the function (forward only), ``count`` of them."""

    batch: int
    height: int
    width: int
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: str
    flops: int = 0
    count: int = 0

    @property
    def key(self) -> tuple:
        return (
            self.batch,
            self.height,
            self.width,
            self.in_channels,
            self.out_channels,
            self.kernel,
            self.stride,
            self.padding,
        )

    def describe(self) -> str:
        """E.g. ``"2x256x256 64->64 k3 s1"``."""
        return (
            f"{self.batch}x{self.height}x{self.width} {self.in_channels}->{self.out_channels} "
            f"k{self.kernel} s{self.stride}"
        )


def conv_shapes(fn: Callable, *specs: tf.TensorSpec) -> List[ConvShape]:
    """The distinct forward ``Conv2D`` shapes of ``fn`` (square kernels), largest FLOP share
    first; ``flops`` counts ``2 * output elements * k * k * c_in`` per convolution."""
    return graph_conv_shapes(_graph_of(fn, specs))


def graph_conv_shapes(graph: tf.Graph) -> List[ConvShape]:
    """:func:`conv_shapes` of an already traced graph (its forward ``Conv2D`` ops only; the
    gradients of a train step are ``Conv2DBackprop*`` ops)."""
    found = {}
    for op in graph.get_operations():
        if op.type != "Conv2D":
            continue
        x_shape, k_shape = op.inputs[0].shape, op.inputs[1].shape
        if not (x_shape.is_fully_defined() and k_shape.is_fully_defined()):
            continue
        kh, kw, c_in, c_out = k_shape.as_list()
        if kh != kw or op.get_attr("data_format") != b"NHWC":
            continue
        strides = op.get_attr("strides")
        padding = op.get_attr("padding").decode()
        if strides[1] != strides[2] or padding not in ("SAME", "VALID"):
            continue
        batch, height, width, _ = x_shape.as_list()
        shape = ConvShape(batch, height, width, c_in, c_out, kh, strides[1], padding)
        flops = 2 * op.outputs[0].shape.num_elements() * kh * kw * c_in
        old = found.get(shape.key, shape)
        found[shape.key] = dataclasses.replace(old, flops=old.flops + flops, count=old.count + 1)
    return sorted(found.values(), key=lambda s: -s.flops)


def conv_step(shape: ConvShape, seed: int = 0):
    """The plain micro-benchmark of one convolution shape: a ``tf.function`` running the
    forward ``Conv2D`` and its gradients with respect to the input and the kernel (what a train
    step computes for such a layer), and its FLOPs.

    Returns:
        ``(run, flops)``: ``run()`` computes the step once (eager calls return when done).

    Example::

        >>> run, flops = conv_step(ConvShape(1, 8, 8, 4, 4, 3, 1, "SAME"))
        >>> flops == 3 * 2 * (8 * 8 * 4) * 3 * 3 * 4
        True
    """
    rng = tf.random.Generator.from_seed(seed)
    x = rng.normal([shape.batch, shape.height, shape.width, shape.in_channels])
    kernel = rng.normal([shape.kernel, shape.kernel, shape.in_channels, shape.out_channels])
    strides = [1, shape.stride, shape.stride, 1]

    @tf.function
    def step(x, kernel):
        y = tf.nn.conv2d(x, kernel, strides, shape.padding)
        # the upstream gradient is the output itself: same shape, no extra op to time
        dx = tf.raw_ops.Conv2DBackpropInput(
            input_sizes=tf.shape(x),
            filter=kernel,
            out_backprop=y,
            strides=strides,
            padding=shape.padding,
        )
        dk = tf.raw_ops.Conv2DBackpropFilter(
            input=x,
            filter_sizes=tf.shape(kernel),
            out_backprop=y,
            strides=strides,
            padding=shape.padding,
        )
        return dx, dk

    flops = count_flops(step, tf.TensorSpec.from_tensor(x), tf.TensorSpec.from_tensor(kernel))

    def run():
        step(x, kernel)

    return run, flops


def reference_rate(shapes: List[ConvShape], rates: List[float]) -> float:
    """FLOP rate a function made only of ``shapes`` would reach if each convolution ran at its
    micro-benchmark rate: ``sum(f_i) / sum(f_i / r_i)`` (time-weighted, so slow shapes count
    as much as they cost).

    Example: ``reference_rate([ConvShape(1, 1, 1, 1, 1, 1, 1, "SAME", flops=2)] * 2, [1.0, 3.0])
    == 1.5``.
    """
    if not shapes or len(shapes) != len(rates):
        raise ValueError(f"need one rate per shape, got {len(shapes)} shapes, {len(rates)} rates")
    total = sum(s.flops for s in shapes)
    return total / sum(s.flops / r for s, r in zip(shapes, rates))
