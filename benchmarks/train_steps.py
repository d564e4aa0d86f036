"""Sections 2, 3 and 6: train-step throughput, utilisation, the segmentation-models reference
and scaling with the input size.

``python -m benchmarks.train_steps --out DIR`` (or as part of ``python -m benchmarks``).

Every case is a compiled Keras model (or a drkeras trainer) and a batch of random inputs of the
right structure. A step is Keras' own train function (``model.make_train_function()``, what
``fit`` calls), fed from a repeated one-batch ``tf.data`` iterator so the input pipeline costs
nothing. Per case:

- ``images/s``: batch / median step time over ``rounds`` steps after the first (traced) one;
- ``GFLOP/img``: the train step's floating-point operations per image, counted by TensorFlow's
  profiler on the traced train function (:mod:`benchmarks.flops`): forward, backward and the
  optimizer update;
- ``utilisation``: achieved FLOP rate / the rate of plain ``conv2d`` micro-benchmarks of the
  model's own convolution shapes (forward + both gradients; the shapes holding 90 % of its
  convolution FLOPs, at most twelve, weighted by their time), measured interleaved with the
  steps.

Section 3 times MTUnet against ``segmentation_models.Unet("vgg16")`` (4 softmax classes, the
same pixel loss) at the same size and batch, both at full width. Section 6 fits
``step time ~ pixels ** e`` over 256, 512 and 1024 px.

The VGG16-UNets are benchmarked at a width multiplier (``--width``, default 0.25: filters / 4,
FLOPs / ~16) so 1024 px fits the time budget of a 2-core CPU; section 3 uses full width.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import numpy as np

from benchmarks import common, flops

__all__ = ["CASES", "TrainCase", "measure", "run"]


@dataclasses.dataclass(frozen=True)
class TrainCase:
    """A model whose train step is benchmarked.

    Attributes:
        name: registry key.
        what: one line for the report.
        build: ``build(size, width, jit_compile) -> (model, make_batch)``; ``model`` is
            compiled, ``make_batch(batch, rng) -> (x, y)`` NumPy inputs and targets.
        convolutional: the utilisation goal applies.
        narrowable: ``width`` changes the network (otherwise it is ignored and reported as 1).
    """

    name: str
    what: str
    build: Callable
    convolutional: bool = True
    narrowable: bool = True


def _images(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
    return rng.random((batch, size, size, 3), dtype=np.float32)


def _one_hot_pixels(rng, batch: int, size: int, classes: int) -> np.ndarray:
    ids = rng.integers(0, classes, (batch, size, size))
    return np.eye(classes, dtype=np.float32)[ids]


def _build_mtunet(size: int, width: float, jit_compile: bool):
    from drkeras import keys
    from drkeras.models import mtunet

    model = mtunet.build_mtunet(input_shape=(size, size, 3), width=width)
    mtunet.compile_mtunet(model, jit_compile=jit_compile)
    classes = len(mtunet.class_names())

    def make_batch(batch, rng):
        targets = {
            keys.SEG_PROBS: _one_hot_pixels(rng, batch, size, classes),
            keys.GRADE_PROBS: rng.integers(0, keys.NUM_GRADES, batch),
        }
        return _images(rng, batch, size), targets

    return model, make_batch


def _build_unet_vgg16(size: int, width: float, jit_compile: bool):
    from tensorflow import keras

    from drkeras import keys
    from drkeras.models import baselines, mtunet

    classes = len(mtunet.class_names())
    model = baselines.build_segmenter(
        "unet", input_shape=(size, size, 3), num_classes=classes, backbone="vgg16"
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-5),
        loss={keys.SEG_PROBS: mtunet.PixelBinaryCrossentropy()},
        jit_compile=jit_compile,
    )

    def make_batch(batch, rng):
        return _images(rng, batch, size), {
            keys.SEG_PROBS: _one_hot_pixels(rng, batch, size, classes)
        }

    return model, make_batch


def _build_pldmlt(size: int, width: float, jit_compile: bool):
    from tensorflow import keras

    from drkeras import keys
    from drkeras.models import mtunet, pldmlt
    from drkeras.training.bilevel import BilevelMultiTaskTrainer

    network = mtunet.build_vgg16_unet(
        input_shape=(size, size, 3),
        num_seg_classes=pldmlt.NUM_FUSED_CLASSES,
        grade_pooling="avg",
        width=width,
        name="pldmlt_multitask",
    )
    label_net = pldmlt.build_label_update_net(input_shape=(size, size, 3))
    trainer = BilevelMultiTaskTrainer(network, label_net)
    trainer.compile(
        model_optimizer=keras.optimizers.Adam(5e-5),
        label_optimizer=keras.optimizers.Adam(5e-5, epsilon=1e-12),
        beta=0.8,
        jit_compile=jit_compile,
    )

    def make_batch(batch, rng):
        x = {
            keys.IMAGE: _images(rng, batch, size),
            pldmlt.PSEUDO_GRADE: rng.integers(0, keys.NUM_GRADES, batch),
            pldmlt.GRADE_MASK: np.ones((batch, keys.NUM_GRADES), np.float32),
        }
        y = {keys.SEG_PROBS: _one_hot_pixels(rng, batch, size, pldmlt.NUM_FUSED_CLASSES)}
        return x, y

    return trainer, make_batch


def _build_grader(arch: str):
    def build(size: int, width: float, jit_compile: bool):
        from tensorflow import keras

        from drkeras import keys
        from drkeras.models import baselines

        model = baselines.build_grader(arch, input_shape=(size, size, 3))
        model.compile(
            optimizer=keras.optimizers.Adam(1e-4),
            loss={keys.GRADE_PROBS: keras.losses.SparseCategoricalCrossentropy()},
            jit_compile=jit_compile,
        )

        def make_batch(batch, rng):
            return _images(rng, batch, size), {
                keys.GRADE_PROBS: rng.integers(0, keys.NUM_GRADES, batch)
            }

        return model, make_batch

    return build


CASES: Dict[str, TrainCase] = {
    case.name: case
    for case in (
        TrainCase("mtunet", "MTUnet (VGG16-UNet + grading head, Foo et al. 2020)", _build_mtunet),
        TrainCase(
            "pldmlt",
            "PLDMLT bilevel step (VGG16-UNet + label update net, second order)",
            _build_pldmlt,
        ),
        TrainCase(
            "unet_vgg16",
            "segmentation_models Unet('vgg16'), the reference",
            _build_unet_vgg16,
            narrowable=False,
        ),
        TrainCase(
            "resnext50",
            "ResNeXt-50 grader (PLDMLT pseudo-label model)",
            _build_grader("resnext50"),
            narrowable=False,
        ),
        TrainCase(
            "densenet201",
            "DenseNet-201 grader (MTUnet Table 3)",
            _build_grader("densenet201"),
            narrowable=False,
        ),
    )
}
DEFAULT_CASES = ("mtunet", "pldmlt")


def _specs(structure):
    import tensorflow as tf

    return tf.nest.map_structure(
        lambda a: tf.TensorSpec(np.shape(a), tf.as_dtype(np.asarray(a).dtype)), structure
    )


def _micro_shapes(shapes: List[flops.ConvShape], share: float = 0.9, most: int = 12):
    total = sum(s.flops for s in shapes)
    chosen, covered = [], 0
    for shape in shapes:
        if covered >= share * total or len(chosen) == most:
            break
        chosen.append(shape)
        covered += shape.flops
    return chosen


def measure(
    case: TrainCase,
    *,
    size: int,
    width: float,
    batch: int,
    rounds: int,
    seed: int = 0,
    jit_compile: bool = False,
    micro: bool = True,
) -> dict:
    """Benchmark one train step (see the module docstring); returns one report row.

    Example: ``measure(CASES["mtunet"], size=64, width=0.125, batch=1, rounds=2)``.
    """
    import tensorflow as tf
    from tensorflow import keras

    keras.backend.clear_session()
    tf.keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    width = width if case.narrowable else 1.0
    build_start = time.perf_counter()
    model, make_batch = case.build(size, width, jit_compile)
    built = time.perf_counter()
    x, y = make_batch(batch, rng)
    iterator = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    train = model.make_train_function()
    start = time.perf_counter()
    train(iterator)
    first = time.perf_counter() - start
    graph = train.get_concrete_function(iterator).graph
    step_flops = flops.graph_flops(graph)
    shapes = flops.graph_conv_shapes(graph)
    chosen = _micro_shapes(shapes) if micro and not jit_compile else []
    micro_runs = [flops.conv_step(shape) for shape in chosen]
    step_cpu = []

    def step_measure() -> float:
        start, cpu = time.perf_counter(), common.cpu_seconds()
        train(iterator)
        step_cpu.append(common.cpu_seconds() - cpu)
        return time.perf_counter() - start

    measures = {"step": step_measure}
    for i, (run_micro, _) in enumerate(micro_runs):
        measures[f"conv{i}"] = common.per_call(run_micro)
    for run_micro, _ in micro_runs:
        run_micro()  # trace and warm up
    timed_from, cpu = time.perf_counter(), common.cpu_seconds()
    times = common.interleaved(measures, rounds)
    cores = (common.cpu_seconds() - cpu) / (time.perf_counter() - timed_from)
    step = common.summarize(times["step"])
    if jit_compile:
        step_flops = None  # XLA clusters hide their ops from the profiler's count
    achieved = None if step_flops is None else step_flops / step["median"]
    row = {
        "model": case.name,
        "width": width,
        "size": size,
        "batch": batch,
        "jit_compile": jit_compile,
        "images_per_s": batch / step["median"],
        "step_s": step["median"],
        "noise": step["noise"],
        "cores": cores,
        "cpu_s": common.summarize(step_cpu)["median"],
        "gflop_per_image": None if step_flops is None else step_flops / batch / 1e9,
        "achieved_gflops": None if achieved is None else achieved / 1e9,
        "first_step_s": first,
        "build_s": built - build_start,
        "step_seconds": times["step"],
        "uncounted_calls": len(flops.graph_calls(graph)),
        "conv_share_timed": sum(s.flops for s in chosen) / max(sum(s.flops for s in shapes), 1),
    }
    if micro_runs:
        rates = [
            micro_flops / common.summarize(times[f"conv{i}"])["median"]
            for i, (_, micro_flops) in enumerate(micro_runs)
        ]
        reference = flops.reference_rate(chosen, rates)
        row.update(
            reference_gflops=reference / 1e9,
            utilisation=achieved / reference,
            conv_shapes=[
                {"shape": s.describe(), "gflops": r / 1e9, "share": s.flops / step_flops}
                for s, r in zip(chosen, rates)
            ],
        )
    keras.backend.clear_session()
    return row


def scaling_exponent(sizes: Sequence[int], seconds: Sequence[float]) -> float:
    """Least-squares slope of ``log(step time)`` against ``log(pixels)``: 1 means the time
    grows like the pixel count.

    Example: ``round(scaling_exponent([256, 512], [1.0, 4.0]), 6) == 1.0``.
    """
    if len(sizes) < 2:
        raise ValueError("the scaling exponent needs at least two sizes")
    log_pixels = np.log(np.square(np.asarray(sizes, np.float64)))
    log_time = np.log(np.asarray(seconds, np.float64))
    slope, _ = np.polyfit(log_pixels, log_time, 1)
    return float(slope)


_TRAIN_COLUMNS = [
    ("model", "model"),
    ("width", "width"),
    ("size", "size"),
    ("batch", "batch"),
    ("images_per_s", "images/s"),
    ("step_s", "step s"),
    ("noise", "noise"),
    ("cores", "cores used"),
    ("gflop_per_image", "GFLOP/img"),
    ("achieved_gflops", "GFLOP/s"),
    ("reference_gflops", "conv2d GFLOP/s"),
    ("utilisation", "utilisation"),
    ("first_step_s", "first step s"),
]


def run(
    *,
    cases: Sequence[str] = DEFAULT_CASES,
    sizes: Sequence[int] = (256, 512),
    scaling_sizes: Sequence[int] = (256, 512, 1024),
    width: float = 0.25,
    batch: int = 1,
    rounds: int = 3,
    reference_size: int = 256,
    reference_batch: int = 1,
    jit_check: bool = True,
    seed: int = 0,
) -> Tuple[common.Section, common.Section, common.Section]:
    """Run sections 2 (train steps), 3 (reference) and 6 (scaling); returns the three.

    Args:
        cases: keys of :data:`CASES` for section 2.
        sizes: input sizes of section 2.
        scaling_sizes: MTUnet input sizes of section 6 (sizes already measured in section 2
            with the same batch are reused).
        width: width multiplier of the narrowable networks in sections 2 and 6.
        batch: batch of sections 2 and 6.
        rounds: timed steps per measurement.
        reference_size, reference_batch: input size and batch of section 3 (full width).
        jit_check: also time MTUnet with ``jit_compile=True`` (XLA) at the first size.
        seed: seed of weights and inputs.
    """
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"unknown train case(s) {unknown}; choose from {sorted(CASES)}")
    config = dict(width=width, batch=batch, rounds=rounds, seed=seed)

    train = common.Section("train", "2. Train steps", _TRAIN_COLUMNS, config=dict(config))
    start = time.perf_counter()
    measured = {}
    for name in cases:
        for size in sizes:
            row = measure(CASES[name], size=size, width=width, batch=batch, rounds=rounds)
            train.rows.append(row)
            measured[(name, size)] = row
    if jit_check and "mtunet" in cases:
        xla = measure(
            CASES["mtunet"],
            size=sizes[0],
            width=width,
            batch=batch,
            rounds=rounds,
            jit_compile=True,
        )
        xla["model"] = "mtunet (jit_compile)"
        train.rows.append(xla)
        plain = measured[("mtunet", sizes[0])]
        train.notes.append(
            f"jit_compile=True (XLA) makes the MTUnet step {xla['step_s'] / plain['step_s']:.1f}x "
            f"slower at {sizes[0]} px on this CPU (XLA's CPU convolutions do not use oneDNN); "
            "it stays off."
        )
    for row in train.rows:
        if CASES.get(row["model"], None) and CASES[row["model"]].convolutional:
            train.goals.append(
                common.Goal.at_least(
                    f"utilisation {row['model']} {row['size']} px (width {row['width']:g})",
                    row.get("utilisation"),
                    0.7,
                )
            )
    train.notes.append(
        "utilisation = achieved FLOP rate / rate of plain conv2d (forward + both gradients) of "
        "the model's main convolution shapes, timed interleaved with the steps; GFLOP/img "
        "counts the whole train step (TF profiler). It can exceed 1: the micro-benchmark runs "
        "one convolution at a time, a train step overlaps independent ones (the gradients of "
        "different layers) on the two cores."
    )
    train.seconds = time.perf_counter() - start

    start = time.perf_counter()
    reference = common.Section(
        "reference",
        "3. MTUnet vs segmentation_models Unet('vgg16')",
        _TRAIN_COLUMNS,
        config=dict(size=reference_size, batch=reference_batch, rounds=rounds, width=1.0),
    )
    pair = {}
    for name in ("mtunet", "unet_vgg16"):
        pair[name] = measure(
            CASES[name], size=reference_size, width=1.0, batch=reference_batch, rounds=rounds
        )
        reference.rows.append(pair[name])
    ratio = pair["mtunet"]["step_s"] / pair["unet_vgg16"]["step_s"]
    flop_ratio = pair["mtunet"]["gflop_per_image"] / pair["unet_vgg16"]["gflop_per_image"]
    reference.goals.append(
        common.Goal.at_most(
            f"MTUnet / Unet('vgg16') step time ({reference_size} px, batch {reference_batch})",
            ratio,
            1.15,
            f"MTUnet's step has {flop_ratio:.2f}x the FLOPs (its decoder mirrors VGG16); "
            f"time per FLOP ratio {ratio / flop_ratio:.2f}",
        )
    )
    reference.notes.append(
        f"time ratio {ratio:.2f} = FLOP ratio {flop_ratio:.2f} x time-per-FLOP ratio "
        f"{ratio / flop_ratio:.2f}: near 1, the two steps run at the same FLOP rate and the "
        "time gap is MTUnet's extra work (its decoder mirrors VGG16's 13 convolutions at their "
        "widths, Foo et al. 2020 Fig. 4; segmentation_models' decoder has 10 narrower ones)."
    )
    reference.seconds = time.perf_counter() - start

    start = time.perf_counter()
    scaling = common.Section(
        "scaling",
        "6. Train-step time vs input size (MTUnet)",
        [
            ("size", "size"),
            ("relative_pixels", "pixels (x first)"),
            ("step_s", "step s"),
            ("relative_time", "step time (x first)"),
            ("segment_exponent", "exponent from previous size"),
            ("cpu_s", "CPU s/step"),
            ("relative_cpu", "CPU (x first)"),
            ("segment_cpu_exponent", "CPU exponent from previous size"),
            ("noise", "noise"),
        ],
        config=dict(config, sizes=list(scaling_sizes)),
    )
    rows = []
    for size in scaling_sizes:
        row = measured.get(("mtunet", size))
        if row is None:
            row = measure(
                CASES["mtunet"], size=size, width=width, batch=batch, rounds=rounds, micro=False
            )
            train.rows.append(row)
        rows.append(row)
    sizes_, wall, cpu = list(scaling_sizes), [r["step_s"] for r in rows], [r["cpu_s"] for r in rows]
    for i, (size, row) in enumerate(zip(sizes_, rows)):
        pair = slice(max(i - 1, 0), i + 1)
        scaling.rows.append(
            {
                "size": size,
                "relative_pixels": (size / sizes_[0]) ** 2,
                "step_s": row["step_s"],
                "relative_time": row["step_s"] / wall[0],
                "segment_exponent": scaling_exponent(sizes_[pair], wall[pair]) if i else None,
                "cpu_s": row["cpu_s"],
                "relative_cpu": row["cpu_s"] / cpu[0],
                "segment_cpu_exponent": scaling_exponent(sizes_[pair], cpu[pair]) if i else None,
                "noise": row["noise"],
                "cores": row["cores"],
            }
        )
    what = f"fit over {sizes_} (MTUnet width {width:g}, batch {batch})"
    scaling.goals.append(
        common.Goal.at_most(
            f"exponent e of step time ~ pixels^e, {what}", scaling_exponent(sizes_, wall), 1.0
        )
    )
    scaling.goals.append(
        common.Goal.at_most(
            f"the same for the step's CPU time, {what}",
            scaling_exponent(sizes_, cpu),
            1.0,
            "CPU time does not depend on the share of the cores other work leaves",
        )
    )
    scaling.seconds = time.perf_counter() - start
    return train, reference, scaling


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks.train_steps``: run sections 2, 3 and 6 and print them."""
    from benchmarks import report

    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_steps", description=__doc__)
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES))
    parser.add_argument("--sizes", default="256,512")
    parser.add_argument("--scaling-sizes", default="256,512,1024")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference-size", type=int, default=256)
    parser.add_argument("--no-jit-check", action="store_true")
    drkeras.startup.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    sections = run(
        cases=args.cases.split(","),
        sizes=[int(s) for s in args.sizes.split(",")],
        scaling_sizes=[int(s) for s in args.scaling_sizes.split(",")],
        width=args.width,
        rounds=args.rounds,
        reference_size=args.reference_size,
        jit_check=not args.no_jit_check,
    )
    for section in sections:
        print(f"\n{section.title}\n")
        print(report.markdown_table(section.columns, section.rows))
        for goal in section.goals:
            print(f"{goal.name}: {goal.value} (goal {goal.target}, met: {goal.met}) {goal.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
