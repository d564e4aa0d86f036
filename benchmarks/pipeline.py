"""Input-pipeline throughput: images/s from JPEG photographs to augmented 512x512 batches.

``python -m benchmarks.pipeline --out DIR [--n 32] [--source-size 768] [--size 512]
[--batch-size 8] [--epochs 3] [--seed 0]``

Measured in one run, on the same JPEG files (synthetic photographs, written once to
``DIR/raw`` and stored byte for byte in ``DIR/records``):

- ``python_loop``: a plain Python loop, OpenCV decode + NumPy field-of-view crop, OpenCV area
  resize, one OpenCV affine warp (flip/rotation/zoom), normalisation, batches stacked with NumPy;
- ``tf_data``: :func:`drkeras.data.pipeline.grading_dataset` from the records (decode, FOV crop,
  resize, paired augmentation, normalisation, parallel maps, prefetch), no cache;
- ``tf_data_cached``: the same after its first epoch filled the cache at training size (what a
  multi-epoch run sees from the second epoch on).

Each is timed over ``--epochs`` passes after one untimed warm-up pass (the tf.data ones start
thread pools and autotune; the loop has nothing to warm up).

Writes ``DIR/pipeline.json`` and prints a table. Takes about a minute on 2 CPU cores
(generating the photographs is most of it).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from typing import Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from drkeras import keys  # noqa: E402
from drkeras.data import pipeline, records, synthetic  # noqa: E402


def _write_inputs(root: pathlib.Path, n: int, source_size: int, seed: int) -> list:
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    paths = []
    with records.ShardWriter(root / "records", "train", examples_per_shard=16) as writer:
        for i in range(n):
            f = synthetic.generate(seed + i, size=source_size, grade=i % keys.NUM_GRADES)
            path = raw / f"bench_{i:03d}.jpg"
            cv2.imwrite(str(path), cv2.cvtColor(f.image, cv2.COLOR_RGB2BGR))
            paths.append(path)
            writer.write(
                records.encode_example(
                    id=f"bench-train-{i:03d}",
                    dataset="bench",
                    split="train",
                    image=path.read_bytes(),  # the very same JPEG bytes the loop decodes
                    masks=None,
                    mask_present=[False] * keys.NUM_LESIONS,
                    grade=f.grade,
                )
            )
    return paths


def _numpy_prepare(path: pathlib.Path, size: int, rng: np.random.Generator) -> np.ndarray:
    """The reference a researcher would write without tf.data."""
    image = cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    intensity = np.maximum(image[..., 0], image[..., 1]).astype(np.float32)
    inside = intensity > max(25.0, 0.1 * float(intensity.max()))
    rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
    if rows.size and cols.size:
        image = image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = image.shape[:2]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    square = np.zeros((size, size, 3), np.uint8)
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    square[y0 : y0 + nh, x0 : x0 + nw] = resized
    angle = 90.0 * rng.integers(4) + rng.uniform(-15, 15)
    matrix = cv2.getRotationMatrix2D(((size - 1) / 2, (size - 1) / 2), angle, rng.uniform(0.9, 1.1))
    if rng.random() < 0.5:
        square = square[:, ::-1]
    warped = cv2.warpAffine(np.ascontiguousarray(square), matrix, (size, size))
    return warped.astype(np.float32) / 255.0


def _time_python(paths, size: int, batch_size: int, seed: int, epochs: int = 1) -> float:
    """Seconds per epoch of the plain loop, averaged over ``epochs`` passes."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(epochs):
        batch = []
        for path in paths:
            batch.append(_numpy_prepare(path, size, rng))
            if len(batch) == batch_size:
                np.stack(batch)
                batch = []
        if batch:
            np.stack(batch)
    return (time.perf_counter() - start) / epochs


def _time_dataset(ds: tf.data.Dataset, epochs: int = 1) -> float:
    """Seconds per epoch, averaged over ``epochs`` passes."""
    start = time.perf_counter()
    for _ in range(epochs):
        for images, _ in ds:
            images.numpy()
    return (time.perf_counter() - start) / epochs


def run(
    out: pathlib.Path,
    *,
    n: int = 32,
    source_size: int = 768,
    size: int = 512,
    batch_size: int = 8,
    epochs: int = 3,
    seed: int = 0,
) -> dict:
    """Run the benchmark, write ``out/pipeline.json``, return the results.

    Example::

        >>> run(pathlib.Path("/tmp/bench"), n=8, source_size=256, size=128)  # doctest: +SKIP
    """
    out = pathlib.Path(out)
    t0 = time.perf_counter()
    paths = _write_inputs(out, n, source_size, seed)
    setup = time.perf_counter() - t0

    python_s = _time_python(paths, size, batch_size, seed, epochs)

    common = dict(size=size, batch_size=batch_size, augment=True, shuffle=False, seed=seed)
    plain = pipeline.grading_dataset(out / "records", "train", cache=False, **common)
    _time_dataset(plain)  # warm-up epoch: thread pools start, autotuning settles
    tf_s = _time_dataset(plain, epochs)

    cached = pipeline.grading_dataset(out / "records", "train", cache=True, **common)
    _time_dataset(cached)  # the first epoch fills the cache
    cached_s = _time_dataset(cached, epochs)

    rows = [
        ("python_loop", python_s, "OpenCV decode + NumPy preprocessing, one process"),
        ("tf_data", tf_s, "records -> decode -> FOV crop/resize -> augment, parallel maps"),
        ("tf_data_cached", cached_s, "same, cached at training size (second epoch)"),
    ]
    results = {
        "benchmark": "pipeline",
        "images": n,
        "source_height": source_size,
        "output_size": size,
        "batch_size": batch_size,
        "timed_epochs": epochs,
        "setup_seconds": round(setup, 2),
        "cpu_count": os.cpu_count(),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "results": [
            {
                "name": name,
                "seconds": round(seconds, 3),
                "images_per_second": round(n / seconds, 2),
                "speedup_vs_python": round(python_s / seconds, 2),
                "what": what,
            }
            for name, seconds, what in rows
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "pipeline.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return results


def _table(results: dict) -> str:
    head = f"{'pipeline':<16} {'images/s':>9} {'vs python':>10}  what"
    lines = [head, "-" * len(head)]
    for r in results["results"]:
        lines.append(
            f"{r['name']:<16} {r['images_per_second']:>9.1f} {r['speedup_vs_python']:>9.2f}x"
            f"  {r['what']}"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line of ``python -m benchmarks.pipeline``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pipeline", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", required=True, help="folder for inputs and pipeline.json")
    parser.add_argument("--n", type=int, default=32, help="number of photographs")
    parser.add_argument("--source-size", type=int, default=768, help="photograph height")
    parser.add_argument("--size", type=int, default=512, help="training resolution")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="timed passes per pipeline")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = run(
        pathlib.Path(args.out),
        n=args.n,
        source_size=args.source_size,
        size=args.size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        seed=args.seed,
    )
    print(
        f"{results['images']} photographs of height {results['source_height']} -> "
        f"{results['output_size']}x{results['output_size']}, batch {results['batch_size']}, "
        f"{results['cpu_count']} CPUs"
    )
    print(_table(results))
    print(f"wrote {pathlib.Path(args.out) / 'pipeline.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
