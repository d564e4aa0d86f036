"""Section 4, inference: latency per image through the exported SavedModel, preprocessing
included, at 512 and 1024 px, batch 1 and 8, median and 95th percentile.

``python -m benchmarks.inference --out DIR`` (or as part of ``python -m benchmarks``).

MTUnet (random weights, width ``--width``) is exported with :func:`drkeras.export.export_model`
(the export runs its own reload-and-compare check) and reloaded with
:func:`drkeras.export.load_exported`; ``ExportedModel.predict`` is called on uint8 photographs of
IDRiD size (4288 x 2848), so the time includes the FOV crop and resize of
:func:`drkeras.data.preprocess.prepare_batch` inside the serving signature, the network and the
copies in and out. ``preprocess ms`` times ``prepare_batch`` alone on the same photographs (a
``tf.function``), the share of the latency the network does not explain.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Optional, Sequence

import drkeras.startup  # noqa: F401  (first: quiets TensorFlow start-up logs)

import numpy as np

from benchmarks import common

__all__ = ["run"]

_PREPROCESS = {"fov_crop": True, "graham": False, "normalization": "unit"}


def _photographs(n: int, height: int, seed: int) -> np.ndarray:
    return np.stack([common.synthetic_photo(seed + i, height)[0] for i in range(n)])


def run(
    out: pathlib.Path,
    *,
    sizes: Sequence[int] = (512, 1024),
    batches: Sequence[int] = (1, 8),
    width: float = 0.125,
    calls: int = 10,
    photo_height: int = 2848,
    seed: int = 0,
) -> common.Section:
    """Measure exported-model latency (see the module docstring); returns the section.

    Args:
        out: folder for the SavedModels (``out/inference/mtunet_<size>``).
        sizes: model input sizes.
        batches: batch sizes of the calls.
        width: MTUnet width multiplier.
        calls: timed calls per batch size at the smallest model size, scaled down with the
            work per call (at least 5).
        photo_height: height of the input photographs (IDRiD: 2848).
        seed: seed of the weights and photographs.
    """
    import tensorflow as tf
    from tensorflow import keras

    from drkeras import export, keys
    from drkeras.data import preprocess
    from drkeras.models import mtunet

    start = time.perf_counter()
    section = common.Section(
        "inference",
        "4. Inference through the exported SavedModel",
        [
            ("size", "size"),
            ("batch", "batch"),
            ("median_ms", "median ms/img"),
            ("p95_ms", "p95 ms/img"),
            ("preprocess_ms", "preprocess ms/img"),
            ("calls", "calls"),
            ("noise", "noise"),
        ],
        config=dict(
            sizes=list(sizes), batches=list(batches), width=width, photo_height=photo_height
        ),
    )
    photos = _photographs(max(batches), photo_height, seed)
    for size in sizes:
        keras.backend.clear_session()
        tf.keras.utils.set_random_seed(seed)
        model = mtunet.build_mtunet(input_shape=(size, size, 3), width=width)
        path = export.export_model(
            model,
            pathlib.Path(out) / "inference" / f"mtunet_{size}",
            image_size=size,
            preprocess=_PREPROCESS,
            output_names=[keys.GRADE_PROBS, keys.SEG_PROBS],
        )
        exported = export.load_exported(path)
        prepare = tf.function(lambda x, s=size: preprocess.prepare_batch(x, size=s, **_PREPROCESS))
        for batch in batches:
            images = photos[:batch]
            # fewer calls where one call is long: the work grows with size^2 and the batch
            n = max(5, int(round(calls * (sizes[0] / size) ** 2 / batch**0.5)))
            calls_ = common.time_calls(lambda e=exported, x=images: e.predict(x), n)
            per_image = [t / batch for t in calls_]
            tensor = tf.constant(images)
            prep = common.time_calls(lambda f=prepare, x=tensor: f(x).numpy(), max(3, n // 2))
            stats = common.summarize(per_image)
            section.rows.append(
                {
                    "size": size,
                    "batch": batch,
                    "median_ms": stats["median"] * 1e3,
                    "p95_ms": stats["p95"] * 1e3,
                    "preprocess_ms": common.summarize(prep)["median"] / batch * 1e3,
                    "calls": n,
                    "noise": stats["noise"],
                    "seconds_per_image": per_image,
                }
            )
    section.notes.append(
        f"MTUnet width {width:g} with random weights, uint8 photographs "
        f"{photos.shape[2]}x{photos.shape[1]} in, grade_probs and seg_probs out; "
        "ms/img = call time / batch; p95 over the calls."
    )
    section.seconds = time.perf_counter() - start
    return section


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m benchmarks.inference``: run this section alone and print its table."""
    from benchmarks import report

    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__)
    parser.add_argument("--out", required=True, type=pathlib.Path)
    parser.add_argument("--sizes", default="512,1024")
    parser.add_argument("--width", type=float, default=0.125)
    parser.add_argument("--calls", type=int, default=10)
    drkeras.startup.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    section = run(
        args.out,
        sizes=[int(s) for s in args.sizes.split(",")],
        width=args.width,
        calls=args.calls,
    )
    print(report.markdown_table(section.columns, section.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
