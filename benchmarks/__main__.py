"""``python -m benchmarks --out runs/bench`` (``make bench``): every benchmark section, then
``bench.json`` + ``bench.md`` in ``--out`` and the markdown report on stdout.

Takes 6-10 minutes on a 2-core CPU shared with other work (measured; the first run also
writes the inputs, synthetic photographs under ``--out`` that later runs reuse). ``--quick``
(smaller sizes, fewer rounds) checks that everything runs in about 4.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Optional, Sequence

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

SECTIONS = ("pipeline", "train", "inference", "conversion")

# (full run, --quick) settings of each section
_SETTINGS = {
    "pipeline": (dict(n=16, images=32, rounds=3), dict(n=8, images=16, rounds=2)),
    "train": (
        dict(sizes=(256, 512), scaling_sizes=(256, 512, 1024), rounds=3, reference_size=256),
        dict(sizes=(128, 256), scaling_sizes=(128, 256, 512), rounds=2, reference_size=128),
    ),
    "inference": (dict(sizes=(512, 1024), calls=10), dict(sizes=(256, 512), calls=5)),
    "conversion": (dict(small=50, large=500), dict(small=10, large=40)),
}


def _log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _pipeline_vs_training(pipeline_section, train_section):
    """Goal: the input pipeline delivers >= 10x what the MTUnet train step consumes at the
    same size. Both sides are conservative: the slowest uncached pipeline, and the narrowed
    MTUnet (faster than the paper's full width)."""
    from benchmarks import common, pipeline

    size = pipeline_section.config["size"]
    supply = pipeline.pipeline_rate(pipeline_section, "tf_data")
    demand = [
        r["images_per_s"]
        for r in train_section.rows
        if r["model"] == "mtunet" and r["size"] == size and not r["jit_compile"]
    ]
    if supply is None or not demand:
        note = f"needs the pipeline and an MTUnet train step at {size} px in the same run"
        return common.Goal.at_least(f"tf.data / MTUnet train step at {size} px", None, 10, note)
    width = train_section.config["width"]
    return common.Goal.at_least(
        f"tf.data (slowest, uncached) / MTUnet train step (width {width:g}) at {size} px",
        supply / demand[0],
        10,
        f"{supply:.1f} vs {demand[0]:.2f} images/s",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the benchmarks; returns the exit status (0 even when goals are missed: the report
    says which)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/bench"))
    parser.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (train = sections 2, 3 and 6)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, few rounds")
    parser.add_argument("--width", type=float, default=0.25, help="VGG16-UNet width, section 2")
    parser.add_argument("--seed", type=int, default=0)
    drkeras.startup.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown or not wanted:
        parser.error(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")

    import tensorflow as tf

    from benchmarks import common, conversion, inference, pipeline, report, train_steps

    tf.get_logger().setLevel("ERROR")  # the profiler's deprecation notices
    machine = common.machine_info()
    machine["load_start"] = machine.pop("load_average_1min")
    settings = {name: _SETTINGS[name][1 if args.quick else 0] for name in SECTIONS}
    start = time.perf_counter()
    done = {}
    if "pipeline" in wanted:
        _log("1. input pipeline")
        done["pipeline"] = pipeline.run(args.out, seed=args.seed, **settings["pipeline"])
    if "train" in wanted:
        _log("2, 3, 6. train steps, reference, scaling")
        train, reference, scaling = train_steps.run(
            width=args.width, seed=args.seed, **settings["train"]
        )
        done.update(train=train, reference=reference, scaling=scaling)
    if "inference" in wanted:
        _log("4. inference")
        done["inference"] = inference.run(args.out, seed=args.seed, **settings["inference"])
    if "conversion" in wanted:
        _log("5. conversion")
        done["conversion"] = conversion.run(args.out, seed=args.seed, **settings["conversion"])
    if "pipeline" in done and "train" in done:
        done["pipeline"].goals.append(_pipeline_vs_training(done["pipeline"], done["train"]))
    order = ("pipeline", "train", "reference", "inference", "conversion", "scaling")
    sections = [done[name] for name in order if name in done]
    machine["load_end"] = common.load_average()
    text = report.write(args.out, sections, machine, seconds=time.perf_counter() - start)
    print(text)
    _log(f"wrote {args.out / report.JSON_NAME} and {args.out / report.MARKDOWN_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
