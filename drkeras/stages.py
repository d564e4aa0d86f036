"""Declared stages: what every experiment's run is made of, and what the runner does with them.

An experiment describes its run as a list of :class:`Stage` objects before anything trains
(docs/design.md section 3). Each stage names the networks it trains or evaluates (:class:`Net`),
the datasets it reads (:class:`Data`), its steps, epochs and global batch, the earlier stages
whose outputs it consumes, and a ``run`` callable that does the work (``ctx.fit`` and the
evaluation of its rows). From the declarations alone the runner

- plans (:func:`plan_run`): host RAM, accelerator memory per replica, checkpoint size, disk for
  file caches and the expected time per epoch on a named accelerator, per stage, written to
  ``plan.json`` and checked against the machine before the first stage trains;
- decides where each dataset is cached (:func:`cache_plan`, the ``data.cache`` policy) and
  releases a dataset, and a stage's output, after the last stage that uses it;
- dry-runs every distinct stage for a few steps at per-replica batches 1 and 2
  (``--dry-run``) and writes what it measured to ``dry_run.json``.

Example::

    stage = Stage(
        "pretrain", run=lambda inputs: train(ctx.data("seg_train")),
        nets=[Net("unet", lambda: build_unet(...))],
        data=[Data("seg_train", lambda cache: pipeline.segmentation_dataset(..., cache=cache),
                   examples=54, size=640, masks=4, shuffle_buffer=256, train=True)],
        steps=7, epochs=100, batch=8,
    )
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import re
import shutil
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import numpy as np

GB = 1024**3

# Peak dense throughput (TFLOP/s) of the accelerators a plan can be written for: float32 as
# TensorFlow runs it by default (TF32 tensor cores on Ampere and later) and float16 (mixed
# precision). Vendor data sheets, dense (no sparsity).
ACCELERATORS: Dict[str, Dict[str, float]] = {
    "a100-40gb": {"memory_gb": 40.0, "float32": 156.0, "float16": 312.0},
    "a100-80gb": {"memory_gb": 80.0, "float32": 156.0, "float16": 312.0},
    "h100-80gb": {"memory_gb": 80.0, "float32": 495.0, "float16": 990.0},
    "v100-32gb": {"memory_gb": 32.0, "float32": 15.7, "float16": 125.0},
    "t4-16gb": {"memory_gb": 16.0, "float32": 8.1, "float16": 65.0},
    "rtx3090-24gb": {"memory_gb": 24.0, "float32": 35.6, "float16": 71.0},
}
# The fraction of that peak a convolutional train step is assumed to reach (time estimates).
UTILISATION = 0.3
# Host memory of the TensorFlow runtime itself (measured: resident memory of a process that has
# imported TensorFlow and built a small Keras model, 0.9 GB on this project's CPU machine).
RUNTIME_BYTES = int(1.0 * GB)
# Batches the input pipelines prefetch (tf.data AUTOTUNE, bounded here for the plan).
PREFETCH_BATCHES = 2
# Bytes per optimizer slot per trainable weight (float32) and slots per optimizer.
OPTIMIZER_SLOTS = {"adam": 2, "rmsprop": 1, "sgd": 1, "none": 0}


class PlanExceeded(RuntimeError):
    """The plan of a run needs more memory than the machine (or the stated budget) has."""


@dataclasses.dataclass
class Data:
    """One dataset a stage reads.

    Attributes:
        key: its name in the run; stages that declare the same key share one dataset object,
            built when the first of them asks for it and released after the last one ends.
        build: ``build(cache)`` returns the ``tf.data.Dataset``; ``cache`` is what the runner
            chose (``True``: in memory, a file path: on disk, ``False``: not cached), to pass
            to the pipeline function's ``cache`` argument.
        examples: examples per pass (from the records' labels; the plan multiplies by it).
        size: side of the images as cached (the pipelines cache uint8 images at training size).
        masks: uint8 mask channels cached with each image.
        shuffle_buffer: examples the shuffle buffer holds (uint8, after the cache).
        batch: the global batch the dataset yields (for the prefetch buffers).
        cached: False when the pipeline never caches (e.g. it streams from the records).
        held_bytes: bytes the experiment holds in host memory for this dataset besides the
            pipeline (e.g. a whole split as arrays); evaluation should stream instead.
        train: whether the stage trains on it (the dry run re-batches these).
        rebatch: ``rebatch(dataset, global_batch)``: the same stream at another global batch,
            for the dry run (default: unbatch and batch again).
    """

    key: str
    build: Callable[[Any], Any]
    examples: int
    size: int
    masks: int = 0
    shuffle_buffer: int = 0
    batch: int = 1
    cached: bool = True
    held_bytes: int = 0
    train: bool = False
    rebatch: Optional[Callable[[Any, int], Any]] = None

    @property
    def example_bytes(self) -> int:
        """Bytes of one cached example (uint8 image and masks)."""
        return int(self.size) ** 2 * (3 + int(self.masks))

    @property
    def cache_bytes(self) -> int:
        return self.example_bytes * int(self.examples) if self.cached else 0

    @property
    def buffer_bytes(self) -> int:
        """Shuffle buffer (uint8) and prefetched float32 batches."""
        shuffle = self.example_bytes * min(int(self.shuffle_buffer), int(self.examples))
        prefetch = 4 * self.example_bytes * int(self.batch) * PREFETCH_BATCHES
        return shuffle + prefetch


@dataclasses.dataclass
class Net:
    """One network of a stage, for the plan.

    Attributes:
        name: networks of the same name in several stages are the same architecture (built
            once for the plan).
        build: returns the Keras model at the preset's width and input size (random weights
            are fine: the plan reads shapes only).
        trainable: False for a network the stage runs but does not update (frozen).
        optimizer: ``adam``, ``sgd``, ``rmsprop`` or ``none`` (slots per trainable weight).
        batch: the global batch this network sees per step when it differs from the stage's
            (e.g. a shared encoder fed a segmentation and a larger classification batch: the
            sum); 0 = the stage's batch.
    """

    name: str
    build: Callable[[], Any]
    trainable: bool = True
    optimizer: str = "adam"
    batch: int = 0


@dataclasses.dataclass
class Stage:
    """One stage of a run (see the module docstring).

    Attributes:
        name: unique in the run: ``checkpoints/<name>``, its rows in ``history.csv``; the
            ``ctx.fit`` calls of the stage use it.
        run: ``run(inputs)`` does the stage's work; ``inputs`` maps each name of ``consumes``
            to what that stage's ``run`` returned. Its return value is kept until the last
            stage consuming it has ended.
        nets, data: what it trains/evaluates and reads.
        steps: train steps per epoch (0: the stage does not train).
        epochs: epochs it trains.
        batch: its global train batch.
        consumes: names of earlier stages whose outputs it uses.
        group: stages of one group differ only by fold, run, seed, dataset or the value of a
            hyper-parameter (the same networks, input size and code): a dry run trains the first
            and only builds the data of the others (stages consuming a skipped stage are skipped
            too). Default: the stage's own name.
    """

    name: str
    run: Callable[[Dict[str, Any]], Any]
    nets: Sequence[Net] = ()
    data: Sequence[Data] = ()
    steps: int = 0
    epochs: int = 1
    batch: int = 0
    consumes: Sequence[str] = ()
    group: str = ""

    def __post_init__(self):
        self.group = self.group or self.name


def check_stages(stages: Sequence[Stage]) -> None:
    """Raise ``ValueError`` for duplicate names, a consumed stage that does not come earlier,
    or one key declared with different sizes."""
    seen, data = set(), {}
    for stage in stages:
        if stage.name in seen:
            raise ValueError(f"stage {stage.name!r} is declared twice")
        missing = [name for name in stage.consumes if name not in seen]
        if missing:
            raise ValueError(f"stage {stage.name!r} consumes {missing}, not declared before it")
        seen.add(stage.name)
        for spec in stage.data:
            shape = (spec.examples, spec.size, spec.masks, spec.cached)
            if data.setdefault(spec.key, shape) != shape:
                raise ValueError(
                    f"dataset {spec.key!r} is declared with different sizes "
                    f"{data[spec.key]} and {shape} (examples, size, masks, cached)"
                )


def last_use(stages: Sequence[Stage]) -> Tuple[Dict[str, int], Dict[str, int]]:
    """Index of the last stage using each dataset key, and consuming each stage's output."""
    data, outputs = {}, {}
    for i, stage in enumerate(stages):
        for spec in stage.data:
            data[spec.key] = i
        for name in stage.consumes:
            outputs[name] = i
    return data, outputs


# ------------------------------------------------------------------------------ the machine


def machine_memory_bytes() -> int:
    """Physical memory of this machine (``MemTotal``), or of its cgroup limit when lower."""
    total = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    total = int(line.split()[1]) * 1024
    except OSError:
        total = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = pathlib.Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < total:
            total = int(text)
    return total


def available_memory_bytes() -> int:
    """Memory a new allocation can take now (``MemAvailable``: free memory plus what the kernel
    can reclaim), or the machine's memory where that is not known."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return machine_memory_bytes()


CPU_POOL_VARIABLE = "TF_MKL_ALLOC_MAX_BYTES"


def cap_cpu_pool(reserve_bytes: int = 4 * GB) -> Tuple[int, bool]:
    """Cap TensorFlow's oneDNN CPU memory pool at this machine's memory less ``reserve_bytes``
    (at least half the machine), unless ``TF_MKL_ALLOC_MAX_BYTES`` is set already; returns
    ``(cap in bytes, whether this call set it)``. Takes effect only before TensorFlow creates its
    CPU device (the first op).

    The pool grows by regions of doubling size and never shrinks, so a large step can ask the
    kernel for far more than its tensors need; uncapped, the kernel's out-of-memory killer ends
    the process (the collaborative paper's dry run at 640 px: killed at 23.7 GB resident after
    its last stage). Capped, TensorFlow raises ``ResourceExhaustedError``, which a dry run
    records as a batch that does not fit here."""
    if os.environ.get(CPU_POOL_VARIABLE):
        return int(float(os.environ[CPU_POOL_VARIABLE])), False
    total = machine_memory_bytes()
    cap = max(total - reserve_bytes, total // 2)
    os.environ[CPU_POOL_VARIABLE] = str(cap)
    return cap, True


class TensorMemoryMeter:
    """Peak bytes held by TensorFlow's CPU allocator between :meth:`reset` and :meth:`peak`
    (tensors only: the measure of a step's activations). TensorFlow 2.15 keeps these statistics
    for the CPU only with its oneDNN allocator (the default on x86; ``TF_ENABLE_ONEDNN_OPTS=0``
    turns them off): :attr:`available` is False then, and :meth:`peak` returns 0."""

    def __init__(self, device: str = "CPU:0"):
        self.device = device
        self.available = True
        self._base = 0

    def reset(self) -> None:
        import tensorflow as tf

        try:
            tf.config.experimental.reset_memory_stats(self.device)
            self._base = tf.config.experimental.get_memory_info(self.device)["current"]
        except ValueError:
            self.available = False

    def peak(self) -> int:
        """Peak bytes above what was held at :meth:`reset`."""
        import tensorflow as tf

        if not self.available:
            return 0
        return int(tf.config.experimental.get_memory_info(self.device)["peak"]) - self._base


class MemoryMeter:
    """Peak resident memory of this process between :meth:`reset` and :meth:`peak` (Linux:
    ``VmHWM``, reset through ``/proc/self/clear_refs``; elsewhere the peak since start)."""

    def __init__(self):
        self._resettable = True

    @staticmethod
    def _status(field: str) -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024

    def reset(self) -> None:
        if not self._resettable:
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self._resettable = False

    def current(self) -> int:
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")


def return_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``), so resident
    memory falls after a stage's datasets are released; a no-op elsewhere."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


# ------------------------------------------------------------------------------ caching


def default_host_budget(machine_bytes: int) -> int:
    """``data.host_memory_gb=0``: half the machine's memory for in-memory caches."""
    return machine_bytes // 2


def cache_plan(
    stages: Sequence[Stage],
    policy: str,
    budget_bytes: int,
    cache_dir: pathlib.Path,
    *,
    free_disk_bytes: Optional[int] = None,
) -> Dict[str, Any]:
    """Where each cached dataset lives: ``{key: True | "<file>" | False}``.

    ``memory``: every cached dataset in memory; ``disk``: every one in a file under
    ``cache_dir``; ``none``: nothing cached; ``auto``: in memory while the datasets alive at
    the same time fit ``budget_bytes`` (in declaration order; a dataset lives from its first to
    its last stage), otherwise in a file when the disk has room, otherwise not cached.
    """
    if policy not in ("auto", "memory", "disk", "none"):
        raise ValueError(f"data.cache: expected auto, memory, disk or none, got {policy!r}")
    if free_disk_bytes is None:
        probe = cache_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free_disk_bytes = shutil.disk_usage(probe).free
    first, last = {}, last_use(stages)[0]
    specs = {}
    for i, stage in enumerate(stages):
        for spec in stage.data:
            first.setdefault(spec.key, i)
            specs.setdefault(spec.key, spec)
    choice: Dict[str, Any] = {}
    disk_left = free_disk_bytes * 0.9
    for key, spec in specs.items():
        path = str(cache_dir / re.sub(r"[^A-Za-z0-9_.-]+", "_", key))
        if not spec.cached or policy == "none":
            choice[key] = False
        elif policy == "memory":
            choice[key] = True
        elif policy == "disk":
            choice[key] = path
        else:
            alive = sum(
                specs[k].cache_bytes
                for k, c in choice.items()
                if c is True and first[k] <= last[key] and last[k] >= first[key]
            )
            if alive + spec.cache_bytes <= budget_bytes:
                choice[key] = True
            elif spec.cache_bytes <= disk_left:
                choice[key] = path
                disk_left -= spec.cache_bytes
            else:
                choice[key] = False
    return choice


# ------------------------------------------------------------------------------ networks


@dataclasses.dataclass
class NetFigures:
    """What the plan needs of one network (per example for activations and FLOPs)."""

    params: int
    trainable: int
    activation_elements: int  # per example: forward tensors kept for the backward pass
    forward_flops: int  # per example


def _layers(model) -> list:
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out.extend(_layers(layer))
        else:
            out.append(layer)
    return out


def _shapes(value) -> list:
    import tensorflow as tf

    return [tuple(t.shape) for t in tf.nest.flatten(value) if hasattr(t, "shape")]


def _elements(shape) -> int:
    dims = [d for d in shape[1:]]
    if any(d is None for d in dims):
        return 0
    return int(np.prod(dims)) if dims else 1


def _layer_flops(layer, in_shapes: list, out_shapes: list) -> int:
    """Multiply-adds x 2 of one call of a layer per example (convolutions and dense layers; the
    rest are element-wise and cheap by comparison)."""
    import tensorflow as tf

    kind = type(layer).__name__
    if not out_shapes or not in_shapes:
        return 0
    out_elems, in_shape = _elements(out_shapes[0]), in_shapes[0]
    cin = in_shape[-1] or 0
    if isinstance(layer, tf.keras.layers.DepthwiseConv2D):
        kh, kw = layer.kernel_size
        return 2 * out_elems * kh * kw
    if isinstance(layer, tf.keras.layers.SeparableConv2D):
        kh, kw = layer.kernel_size
        depth_out = out_elems // max(1, layer.filters) * cin * layer.depth_multiplier
        return 2 * depth_out * kh * kw + 2 * out_elems * cin * layer.depth_multiplier
    if isinstance(layer, tf.keras.layers.Conv2DTranspose):
        kh, kw = layer.kernel_size
        return 2 * _elements(in_shape) * kh * kw * layer.filters
    if isinstance(layer, tf.keras.layers.Conv2D) or kind.endswith("Conv2D"):
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            return 0
        kh, kw, kin, _ = kernel.shape
        return 2 * out_elems * kh * kw * kin
    if isinstance(layer, tf.keras.layers.Dense):
        return 2 * out_elems * cin
    return 0


# Peak tensor memory of a train step over the forward tensors kept for its backward pass
# (:func:`_walk`), per example: TensorFlow's allocator peak at batches 1 and 3 on this machine at
# 224 px gave 1.10 (MobileNetV2), 1.16 (DenseNet-121), 1.24 (ResNet-50), 1.31 (FPN-ResNet34),
# 1.33 (InceptionV3), 1.36 (VGG16 U-Net), 1.42 (Xception), 1.45 (EfficientNet-B0) and 2.55
# (the VGG16 classifier, an outlier). The backward pass's own buffers: gradients of the layer
# being differentiated and the kernels' workspaces.
BACKWARD_OVERHEAD = 1.3

# What the backward pass of a layer reads, by layer class (the forward tensors a training step
# keeps alive until that layer's gradient has been computed). Convolutions, dense layers and
# normalisations read their input; ReLU, sigmoid, tanh, softmax and ELU their output; max pooling
# both; additions, concatenations, reshapes, paddings, nearest upsampling and average poolings
# only shapes, as does Keras's InceptionResNetV2 residual scaling (CustomScaleLayer: x + s * r,
# linear). A layer not listed (Lambda, custom layers) is assumed to read input and output.
_READS_NOTHING = (
    "Add", "Subtract", "Concatenate", "Reshape", "Flatten", "Permute", "ZeroPadding2D",
    "Cropping2D", "UpSampling2D", "NearestUpSampling2D", "GlobalAveragePooling2D",
    "AveragePooling2D", "Rescaling", "Normalization", "InputLayer", "Average",
    "RepeatVector", "Identity", "TFOpLambda.reshape", "CustomScaleLayer",
)  # fmt: skip
_READS_OUTPUT = ("ReLU", "Softmax", "ELU")
_OUTPUT_ACTIVATIONS = ("relu", "relu6", "sigmoid", "tanh", "softmax", "elu", "linear")
_READS_INPUT = (
    "Conv1D", "Conv2D", "Conv3D", "Conv2DTranspose", "DepthwiseConv2D", "SeparableConv2D",
    "Dense", "BatchNormalization", "SyncBatchNormalization", "LayerNormalization",
    "GroupNormalization", "LeakyReLU", "PReLU", "Multiply", "Dropout", "SpatialDropout2D",
    "GaussianNoise", "WeightNormalization", "Maximum", "Minimum", "Dot",
)  # fmt: skip


def _backward_reads(layer) -> Tuple[bool, bool]:
    """(reads its inputs, reads its outputs) in the backward pass; see ``_READS_*``."""
    kind = type(layer).__name__
    if kind in _READS_NOTHING:
        return False, False
    if kind == "Activation":
        name = getattr(getattr(layer, "activation", None), "__name__", "")
        return (False, True) if name in _OUTPUT_ACTIVATIONS else (True, False)
    if kind in _READS_OUTPUT:
        return False, True
    if kind.startswith("MaxPooling") or kind.startswith("GlobalMaxPooling"):
        return True, True
    if kind in _READS_INPUT or kind.endswith("Conv2D"):
        activation = getattr(getattr(layer, "activation", None), "__name__", "linear")
        # a fused activation (Conv2D(..., activation="relu")) also keeps the output
        return True, activation not in ("linear", "")
    return True, True


def _graph_nodes(model) -> Optional[list]:
    """The call nodes of a functional model (each call of a shared layer is one), None for a
    subclassed model."""
    by_depth = getattr(model, "_nodes_by_depth", None)
    if not by_depth:
        return None
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]


def _walk(model, seen: set, grad: Optional[set] = None, shapes=None, top=None, alias=None,
          scope: tuple = ()) -> Tuple[int, int]:  # fmt: skip
    """(elements, FLOPs) per example: the distinct forward tensors the backward pass of
    ``model`` reads (each counted once, however many layers read it) and the forward FLOPs of
    every layer call (a shared layer counts per call).

    Only layers a gradient passes through keep tensors: those with trainable weights and those
    downstream of one (``grad`` collects the keys of tensors that carry a gradient); a frozen
    prefix (variant B's segmenter in its step 2) runs forward only.

    A nested model is walked per call (``scope``: the calls leading to it), so a sub-model
    called five times keeps five sets of tensors (Zhou's grading trunk, once per lesion), at the
    shapes of that call (``shapes``, propagated with each layer's ``compute_output_shape``: a
    trunk built on ``Input((None, None, C))`` counts at the size it is called with). Its inputs
    are its caller's tensors (``alias``), counted once with them. Only the outermost model's
    inputs (the batch, held by the input pipeline) are never counted."""
    grad = set() if grad is None else grad
    shapes = {} if shapes is None else shapes
    alias = {} if alias is None else alias
    top = model if top is None else top
    nodes = _graph_nodes(model)
    if nodes is None:  # subclassed: every layer output, once per layer
        elements = flops = 0
        for layer in _layers(model):
            if type(layer).__name__ == "InputLayer" or not _has_output(layer):
                continue
            out_shapes = _shapes(layer.output)
            elements += sum(_elements(s) for s in out_shapes)
            flops += _layer_flops(layer, _shapes(layer.input), out_shapes)
        return elements, flops

    def key(tensor, where=scope):
        return alias.get((where, id(tensor)), (where, id(tensor)))

    batch = {((), id(t)) for t in _flat(getattr(top, "inputs", None) or [])}
    elements = flops = 0
    for node in nodes:
        layer = node.layer
        inputs, outputs = _flat(node.input_tensors), _flat(node.outputs)
        in_shapes = [shapes.get(key(x), tuple(x.shape)) for x in inputs]
        in_grad = any(key(x) in grad for x in inputs)
        if layer is not model and _graph_nodes(layer) is not None:
            inner_scope = scope + (id(node),)
            alias.update(
                ((inner_scope, id(x)), key(y)) for x, y in zip(_flat(layer.inputs), inputs)
            )
            inner = _walk(layer, seen, grad, shapes, top, alias, inner_scope)
            elements, flops = elements + inner[0], flops + inner[1]
            for outer, inner_out in zip(outputs, _flat(layer.outputs)):
                shapes[key(outer)] = shapes.get(key(inner_out, inner_scope), tuple(outer.shape))
            if in_grad or layer.trainable_weights:
                grad.update(key(x) for x in outputs)
            continue
        out_shapes = _call_shapes(layer, in_shapes, [tuple(x.shape) for x in outputs])
        shapes.update((key(x), shape) for x, shape in zip(outputs, out_shapes))
        flops += _layer_flops(layer, in_shapes, out_shapes)
        if not (in_grad or layer.trainable_weights):
            continue  # no gradient reaches or leaves this call: nothing is kept for it
        grad.update(key(x) for x in outputs)
        reads_in, reads_out = _backward_reads(layer)
        kept = list(zip(inputs, in_shapes)) if reads_in else []
        for tensor, shape in kept + (list(zip(outputs, out_shapes)) if reads_out else []):
            k = key(tensor)
            if k not in seen and k not in batch:
                seen.add(k)
                elements += _elements(shape)
    return elements, flops


def _call_shapes(layer, in_shapes: list, static: list) -> list:
    """The output shapes of one call: the layer's static ones where they are fully known, else
    ``compute_output_shape`` of the call's input shapes (the static ones where it fails)."""
    import tensorflow as tf

    if all(None not in shape[1:] for shape in static) or not in_shapes:
        return static
    if any(None in shape[1:] for shape in in_shapes):
        return static
    try:
        arg = [tf.TensorShape(s) for s in in_shapes]
        out = layer.compute_output_shape(arg[0] if len(arg) == 1 else arg)
        flat = list(out.values()) if isinstance(out, dict) else out
        single = isinstance(flat, tf.TensorShape) or (
            isinstance(flat, (list, tuple)) and all(d is None or isinstance(d, int) for d in flat)
        )
        found = [tuple(tf.TensorShape(s).as_list()) for s in ([flat] if single else flat)]
    except Exception:  # noqa: BLE001 - a custom layer without it: keep the static shapes
        return static
    return found if len(found) == len(static) else static


def _flat(value) -> list:
    import tensorflow as tf

    return [t for t in tf.nest.flatten(value) if hasattr(t, "shape")]


def _has_output(layer) -> bool:
    try:
        return layer.output is not None
    except (AttributeError, ValueError, RuntimeError):
        return False


def net_figures(model) -> NetFigures:
    """Parameters, activation elements and forward FLOPs per example of a built Keras model.

    Activations are the distinct forward tensors a training step keeps for its backward pass
    (:func:`_walk`; every call of a shared layer counts). Checked against TensorFlow's
    own allocator on this machine (peak bytes of a train step at batches 1, 2 and 4,
    ``tests/test_stages.py``)."""
    activations, flops = _walk(model, set())
    trainable = int(sum(int(np.prod(w.shape)) for w in model.trainable_weights))
    params = int(sum(int(np.prod(w.shape)) for w in model.weights))
    return NetFigures(params, trainable, activations, flops)


# ------------------------------------------------------------------------------ the plan


@dataclasses.dataclass
class Machine:
    """What the plan is checked against."""

    host_bytes: int
    accelerator: str = "a100-40gb"
    accelerator_bytes: int = 0  # 0: no accelerator visible (the CPU trains: host memory)
    replicas: int = 1
    mixed_precision: bool = False
    cache_budget_bytes: int = 0


def _gb(value: float) -> float:
    return round(value / GB, 3)


def plan_run(
    stages: Sequence[Stage],
    figures: Dict[str, NetFigures],
    cache: Dict[str, Any],
    machine: Machine,
) -> dict:
    """The resource plan of a run (what ``plan.json`` holds); see :func:`check_plan`.

    Per stage: host RAM (TensorFlow's runtime, the in-memory caches alive during the stage,
    shuffle and prefetch buffers, data held by the experiment), accelerator memory per replica
    (weights, gradients and optimizer slots of the trained networks, activations of every
    network at the per-replica batch; of the largest one in a stage that does not train), the
    size of a final-weights and of a resumable checkpoint, disk for file caches, FLOPs per step
    and the expected time per epoch on ``machine.accelerator`` at ``UTILISATION`` of its peak.
    """
    data_last, _ = last_use(stages)
    first: Dict[str, int] = {}
    specs: Dict[str, Data] = {}
    for i, stage in enumerate(stages):
        for spec in stage.data:
            first.setdefault(spec.key, i)
            specs.setdefault(spec.key, spec)
    act_bytes = 2 if machine.mixed_precision else 4
    accel = ACCELERATORS[machine.accelerator]
    peak_flops = accel["float16" if machine.mixed_precision else "float32"] * 1e12
    rows = []
    for i, stage in enumerate(stages):
        alive = [k for k in specs if first[k] <= i <= data_last[k]]
        cache_mem = sum(specs[k].cache_bytes for k in alive if cache.get(k) is True)
        disk = sum(specs[k].cache_bytes for k in alive if isinstance(cache.get(k), str))
        buffers = sum(s.buffer_bytes for s in stage.data)
        held = sum(specs[k].held_bytes for k in alive)
        per_replica = (
            max(1, math.ceil(stage.batch / max(1, machine.replicas))) if stage.batch else 1
        )
        weights = grads = slots = acts = flops = 0
        for net in stage.nets:
            fig = figures[net.name]
            net_batch = (
                max(1, math.ceil(net.batch / max(1, machine.replicas)))
                if net.batch
                else per_replica
            )
            weights += 4 * fig.params
            net_acts = act_bytes * fig.activation_elements * net_batch
            if stage.steps:
                net_acts = int(net_acts * BACKWARD_OVERHEAD)
            # a training step holds every network's activations at once; a stage that does not
            # train runs its networks one after the other
            acts = acts + net_acts if stage.steps else max(acts, net_acts)
            flops += fig.forward_flops * net_batch
            if net.trainable and stage.steps:
                grads += 4 * fig.trainable
                slots += 4 * fig.trainable * OPTIMIZER_SLOTS.get(net.optimizer, 2)
        # forward, then backward (about twice the forward) for a training stage
        step_flops = flops * machine.replicas * (3 if stage.steps else 1)
        seconds = step_flops / machine.replicas / (peak_flops * UTILISATION)
        device = weights + grads + slots + acts
        host = RUNTIME_BYTES + cache_mem + buffers + held
        if not machine.accelerator_bytes:
            host += device  # no accelerator: the CPU trains in host memory
        rows.append(
            {
                "stage": stage.name,
                "group": stage.group,
                "networks": [n.name for n in stage.nets],
                "parameters": int(sum(figures[n.name].params for n in stage.nets)),
                "steps_per_epoch": int(stage.steps),
                "epochs": int(stage.epochs),
                "global_batch": int(stage.batch),
                "per_replica_batch": int(per_replica),
                "host_ram_gb": _gb(host),
                "bytes": {
                    "host_ram": int(host),
                    "memory_caches": int(cache_mem),
                    "accelerator_per_replica": int(device),
                },
                "host_ram_parts_gb": {
                    "runtime": _gb(RUNTIME_BYTES),
                    "memory_caches": _gb(cache_mem),
                    "buffers": _gb(buffers),
                    "held_by_experiment": _gb(held),
                    **({} if machine.accelerator_bytes else {"training_on_cpu": _gb(device)}),
                },
                "accelerator_gb_per_replica": _gb(device),
                # per example of the stage's per-replica batch (the unit a dry run varies): a
                # network fed more images per example (JointSeg's classification batch) counts
                # them all
                "activation_mb_per_example": round(acts / per_replica / 2**20, 1),
                "accelerator_parts_gb": {
                    "weights": _gb(weights),
                    "gradients": _gb(grads),
                    "optimizer_slots": _gb(slots),
                    "activations": _gb(acts),
                },
                "checkpoint_gb": {"final_weights": _gb(weights), "resumable": _gb(weights + slots)},
                "disk_cache_gb": _gb(disk),
                "flops_per_step": int(step_flops),
                "seconds_per_epoch": round(seconds * stage.steps, 1),
            }
        )
    return {
        "machine": {
            "host_ram_gb": _gb(machine.host_bytes),
            "accelerator": machine.accelerator,
            "accelerator_memory_gb": _gb(machine.accelerator_bytes) or None,
            "replicas": machine.replicas,
            "precision": "mixed_float16" if machine.mixed_precision else "float32",
            "cache_budget_gb": _gb(machine.cache_budget_bytes),
        },
        "assumptions": {
            "utilisation": UTILISATION,
            "peak_tflops": peak_flops / 1e12,
            "activation_bytes": act_bytes,
            "activations": "the forward tensors each network of a training stage keeps for its "
            f"backward pass, x {BACKWARD_OVERHEAD} for the backward pass's own buffers, at the "
            "per-replica batch; a stage that does not train: the largest network's kept tensors",
            "train_step_flops": "3 x forward (convolutions and dense layers)",
        },
        "cache": {
            k: ("memory" if v is True else "file" if v else "none") for k, v in cache.items()
        },
        "stages": rows,
        "peak_host_ram_gb": max((r["host_ram_gb"] for r in rows), default=0.0),
        "peak_accelerator_gb_per_replica": max(
            (r["accelerator_gb_per_replica"] for r in rows), default=0.0
        ),
        "gpu_hours_total": round(
            sum(r["seconds_per_epoch"] * r["epochs"] for r in rows) / 3600 * machine.replicas, 2
        ),
    }


def check_plan(plan: dict, machine: Machine) -> None:
    """Raise :class:`PlanExceeded` naming the first stage whose in-memory caches exceed the
    cache budget (``data.cache=memory``; ``auto`` stays within it by construction), whose host
    RAM exceeds the machine, or whose accelerator memory per replica exceeds one device, with
    the setting to change."""
    host_limit = machine.host_bytes / GB
    for row in plan["stages"]:
        caches = row["bytes"]["memory_caches"]
        if machine.cache_budget_bytes and caches > machine.cache_budget_bytes:
            raise PlanExceeded(
                f"stage {row['stage']}: its in-memory caches need {caches / GB:.2g} GB but the "
                f"cache budget (data.host_memory_gb) is {machine.cache_budget_bytes / GB:.2g} GB; "
                "set data.cache=auto (caches in memory what fits, the rest in files) or raise "
                "data.host_memory_gb"
            )
        if row["bytes"]["host_ram"] > machine.host_bytes:
            parts = row["host_ram_parts_gb"]
            biggest = max(parts, key=parts.get)
            advice = {
                "memory_caches": "--set data.cache=auto (or disk, none)",
                "training_on_cpu": "a smaller batch (data.batch_size or the stage's batch "
                "setting) or a machine with GPUs",
                "held_by_experiment": "a smaller evaluation split (data.max_examples)",
                "buffers": "a smaller batch or shuffle buffer",
                "runtime": "a machine with more memory",
            }[biggest]
            raise PlanExceeded(
                f"stage {row['stage']}: the plan needs {row['host_ram_gb']:.1f} GB of host RAM "
                f"({biggest} {parts[biggest]:.1f} GB) but this machine has {host_limit:.1f} GB; "
                f"change {advice}"
            )
        if machine.accelerator_bytes:
            limit = machine.accelerator_bytes / GB
            if row["bytes"]["accelerator_per_replica"] > machine.accelerator_bytes:
                raise PlanExceeded(
                    f"stage {row['stage']}: the plan needs {row['accelerator_gb_per_replica']:.1f}"
                    f" GB per replica at per-replica batch {row['per_replica_batch']} but one "
                    f"accelerator has {limit:.1f} GB (train.accelerator_memory_gb); use more "
                    "replicas, a smaller batch, or --set train.mixed_precision=true"
                )


def format_plan(plan: dict) -> str:
    """The plan as a table for the log."""
    head = (
        f"{'stage':<34} {'batch/rep':>9} {'host GB':>8} {'accel GB':>9} {'ckpt GB':>8} "
        f"{'disk GB':>8} {'s/epoch':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in plan["stages"]:
        lines.append(
            f"{r['stage'][:34]:<34} {r['per_replica_batch']:>9} {r['host_ram_gb']:>8.2f} "
            f"{r['accelerator_gb_per_replica']:>9.2f} {r['checkpoint_gb']['final_weights']:>8.2f} "
            f"{r['disk_cache_gb']:>8.2f} {r['seconds_per_epoch']:>9.1f}"
        )
    m = plan["machine"]
    lines.append(
        f"(time on {m['accelerator']} at {int(100 * plan['assumptions']['utilisation'])} % of "
        f"its peak {m['precision']} throughput, {m['replicas']} replica(s))"
    )
    return "\n".join(lines)


def figures_of(stages: Sequence[Stage]) -> Dict[str, NetFigures]:
    """Build each distinct network once (random weights) and measure it for the plan."""
    import gc

    import tensorflow as tf

    figures = {}
    for stage in stages:
        for net in stage.nets:
            if net.name in figures:
                continue
            model = net.build()
            figures[net.name] = net_figures(model)
            del model
            gc.collect()
    tf.keras.backend.clear_session()
    return figures


__all__ = [
    "ACCELERATORS",
    "BACKWARD_OVERHEAD",
    "available_memory_bytes",
    "cap_cpu_pool",
    "Data",
    "Machine",
    "MemoryMeter",
    "TensorMemoryMeter",
    "Net",
    "NetFigures",
    "PlanExceeded",
    "Stage",
    "cache_plan",
    "check_plan",
    "check_stages",
    "default_host_budget",
    "figures_of",
    "format_plan",
    "last_use",
    "machine_memory_bytes",
    "net_figures",
    "plan_run",
]
